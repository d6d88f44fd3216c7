"""Merging an adapter into its base weight: W += sign * s * B A, in float32, rounded once."""

from __future__ import annotations

import torch

from fastlora.ops.backend import HAS_TRITON, use_triton

if HAS_TRITON:
    from fastlora.kernels import merge as _kmerge

__all__ = ["merge_delta_"]


def merge_delta_(weight_2d, lora_A_2d, lora_B_2d, scaling, sign=1.0, safe=False):
    """weight_2d += sign * s * B A, computed in float32 and rounded once; in place.

    weight_2d [N, K] (any strides, e.g. the transpose of an embedding table), lora_A_2d [r, K],
    lora_B_2d [N, r]. With ``safe=True`` a result with NaN or Inf raises ValueError and the weight is
    left unchanged.
    """
    if use_triton(weight_2d):
        _kmerge.merge_(weight=weight_2d, lora_A=lora_A_2d, lora_B=lora_B_2d, coeff=float(sign * scaling), safe=safe)
        return weight_2d
    delta = (lora_B_2d.float() @ lora_A_2d.float()) * (sign * scaling)
    merged = weight_2d.float() + delta
    if safe and not (merged.abs() <= torch.finfo(weight_2d.dtype).max).all():
        raise ValueError("merging the adapter would make the weight non-finite (NaN or Inf); the weight is unchanged")
    weight_2d.copy_(merged)
    return weight_2d
