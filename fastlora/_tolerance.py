"""The one tolerance table: relative Frobenius error ||out - ref|| / ||ref|| against a float64 evaluation.

Used by ``fastlora validate``, the benchmarks' correctness gate and the test suite (tests/helpers.py).
float32: the kernels accumulate in fp32 (IEEE dot under the interpreter). float16: 11-bit mantissa, inputs
rounded once. bfloat16: 8-bit mantissa (computed in fp32 under the interpreter, rounded on store).
"""

from __future__ import annotations

import torch

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (the plain norm of out - ref when ref is zero); NaN if out has NaN."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / denom if denom > 0 else num
