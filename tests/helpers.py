"""Shared test helpers: the tolerance table, the error measure and an assert that explains itself."""

from __future__ import annotations

import torch

# Relative Frobenius error ||out - ref|| / ||ref|| against a float64 evaluation, per dtype. One table for the suite.
# float32: the kernels accumulate in fp32 (IEEE dot under the interpreter). float16: 11-bit mantissa, inputs
# rounded once. bfloat16: 8-bit mantissa (computed in fp32 under the interpreter, rounded on store).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double(), ref.detach().double()
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / denom if denom > 0 else num


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str = "output", factor: float = 1.0):
    """out matches the float64 ref within the dtype's tolerance; NaN never passes; the message shows where."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    nan_out, nan_ref = torch.isnan(out.detach()), torch.isnan(ref.detach())
    if not torch.equal(nan_out, nan_ref):
        where = (nan_out != nan_ref).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: NaN pattern differs from the reference at {where}")
    if nan_ref.any():
        out, ref = out[~nan_ref], ref[~nan_ref]
    err = rel_err(out, ref)
    tol = TOLERANCE[dtype] * factor
    if not err <= tol:
        diff = (out.detach().double() - ref.detach().double()).abs().flatten()
        worst = diff.topk(min(5, diff.numel())).indices
        lines = ", ".join(
            f"[{i}] {out.flatten()[i].item():.6g} vs {ref.flatten()[i].item():.6g}" for i in worst.tolist()
        )
        raise AssertionError(
            f"{name}: relative error {err:.3e} > tolerance {tol:.1e} ({DTYPE_IDS[dtype]}); worst: {lines}"
        )
