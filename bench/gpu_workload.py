"""Reference workloads for gpu_interference (run as their own process, like a user's job).

  python bench/gpu_workload.py --kinds matmul,train --seconds 8 --warmup 3

matmul: bf16 torch.mm of two 8192x8192 matrices in a loop -> TFLOP/s.
train:  a small transformer (4 encoder layers, d_model 1024, 16 heads, batch 16 x 512 tokens,
        bf16 autocast, AdamW) on synthetic data -> steps/s.
Prints one JSON line per kind: {"kind", "rate", "unit", "iters", "seconds"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch


def timed_loop(step: Callable[[], None], warmup: float, seconds: float, every: int
               ) -> tuple[int, float]:
    """Run `step` for `warmup` seconds, then count iterations over `seconds` (synchronising
    every `every` iterations and at the end)."""
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        for _ in range(every):
            step()
        torch.cuda.synchronize()
    iters = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        for _ in range(every):
            step()
        iters += every
        torch.cuda.synchronize()
    return iters, time.perf_counter() - t0


def matmul(warmup: float, seconds: float) -> dict[str, object]:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    iters, dt = timed_loop(lambda: torch.mm(a, b, out=c), warmup, seconds, every=20)
    return {"kind": "matmul", "rate": 2 * n**3 * iters / dt / 1e12, "unit": "TFLOP/s",
            "iters": iters, "seconds": dt}


def train(warmup: float, seconds: float) -> dict[str, object]:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=1024, nhead=16, dim_feedforward=4096,
                                             batch_first=True)
    model = torch.nn.TransformerEncoder(layer, num_layers=4).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(16, 512, 1024, device="cuda")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()

    iters, dt = timed_loop(step, warmup, seconds, every=5)
    return {"kind": "train", "rate": iters / dt, "unit": "steps/s", "iters": iters,
            "seconds": dt}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--kinds", default="matmul,train")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=3.0)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_workload: ERROR: torch sees no CUDA GPU")
    kinds = {"matmul": matmul, "train": train}
    for kind in args.kinds.split(","):
        print(json.dumps(kinds[kind](args.warmup, args.seconds)), flush=True)


if __name__ == "__main__":
    main()
