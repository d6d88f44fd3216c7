"""The number everything hinges on: the persistent TMA GEMM against torch.mm (cuBLAS) at one shape.

    python -m benchmarks.gemm_check OUT_DIR [--m 8192 --n 4096 --k 4096 --r 16]

Times, side by side in one process, on bf16: torch.mm (x W^T), the fused forward GEMM kernel alone (S given,
the LoRA term in its epilogue), the whole fused forward (S pass + GEMM), and the dX GEMM. Writes
OUT_DIR/gemm_check.json stamped with the GPU, versions, commit and time."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import torch
import triton
from triton.testing import do_bench


def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--m", type=int, default=8192)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gemm_check needs a CUDA GPU", file=sys.stderr)
        return 2
    from fastlora.kernels import linear as klinear

    M, N, K, R = args.m, args.n, args.k, args.r
    dt, dev = torch.bfloat16, "cuda"
    x = torch.randn(M, K, device=dev, dtype=dt)
    w = torch.randn(N, K, device=dev, dtype=dt) / K**0.5
    a = torch.randn(R, K, device=dev, dtype=dt) / K**0.5
    b = torch.randn(N, R, device=dev, dtype=dt)
    dy = torch.randn(M, N, device=dev, dtype=dt)
    y = torch.empty(M, N, device=dev, dtype=dt)
    dx = torch.empty(M, K, device=dev, dtype=dt)
    s = x @ a.t()
    ds = dy @ b
    da = torch.zeros(R, K, device=dev, dtype=torch.float32)

    timings = {
        "torch.mm x W^T": lambda: torch.mm(x, w.t(), out=y),
        "fused GEMM kernel (fwd, S given)": lambda: klinear._gemm(x, w.t(), s, b.t(), None, y, 0.5, direction="fwd"),
        "fused forward (S pass + GEMM)": lambda: klinear.lora_linear_fwd(x, w, None, a, b, 0.5, 0.0, 0),
        "torch.mm dY W": lambda: torch.mm(dy, w, out=dx),
        "fused dX GEMM kernel (dA share)": lambda: klinear._gemm(
            dy, w, ds, a, None, dx, 1.0, x=x, da=da, direction="dx"
        ),
    }
    ms = {name: do_bench(fn, warmup=50, rep=300) for name, fn in timings.items()}
    ref = (x.float() @ w.float().t() + 0.5 * s.float() @ b.float().t()).norm().item()
    klinear._gemm(x, w.t(), s, b.t(), None, y, 0.5, direction="fwd")
    err = (y.float() - (x.float() @ w.float().t() + 0.5 * s.float() @ b.float().t())).norm().item() / ref
    flops = 2.0 * M * N * K
    result = {
        "shape": {"M": M, "N": N, "K": K, "r": R, "dtype": "bfloat16"},
        "ms": ms,
        "tflops": {name: flops / (t * 1e-3) / 1e12 for name, t in ms.items()},
        "ratio_fused_gemm_over_torch_mm": ms["fused GEMM kernel (fwd, S given)"] / ms["torch.mm x W^T"],
        "ratio_fused_dx_over_torch_mm": ms["fused dX GEMM kernel (dA share)"] / ms["torch.mm dY W"],
        "fused_gemm_rel_err_vs_fp32": err,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": _commit(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gemm_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    for name, t in ms.items():
        print(f"{name:36s} {t * 1e3:9.1f} us  {result['tflops'][name]:6.1f} TFLOP/s")
    print(f"fused GEMM / torch.mm: {result['ratio_fused_gemm_over_torch_mm']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
