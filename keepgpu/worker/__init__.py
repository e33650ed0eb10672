"""Worker side: `python -m keepgpu.worker`.

Only keepgpu.worker.engines.torch_engine imports torch.
"""
