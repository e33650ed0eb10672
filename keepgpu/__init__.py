"""keepgpu: keep shared GPUs held while their owner is not computing on them."""

from keepgpu._version import __version__

__all__ = ["__version__"]
