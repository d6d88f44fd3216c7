"""Merging an adapter into its base weight: W += sign * s * B A (DoRA: W <- c * (W + s B A)), in float32, rounded
once."""

from __future__ import annotations

import torch

from fastlora.ops.backend import HAS_TRITON, use_triton

if HAS_TRITON:
    from fastlora.kernels import merge as _kmerge

__all__ = ["merge_delta_", "merge_dora_"]


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


_MERGE_CHUNK_ROWS = 256


def merge_dora_(weight_2d, lora_A_2d, lora_B_2d, scaling, col_scale, sign=1.0, safe=False):
    """DoRA's merge (sign +1): W <- c * (W + s B A); its unmerge (sign -1): W <- W / c - s B A. In place.

    weight_2d [N, K] (any strides), lora_A_2d [r, K], lora_B_2d [N, r], col_scale c [N] float32 (g / ||W + s B A||
    at merge time, kept by the layer for the unmerge). Computed in float32 per block of rows and rounded once, so
    unmerge restores W up to the rounding of its dtype. With ``safe=True`` a result with NaN or Inf raises
    ValueError and the weight is left unchanged; unmerging a row with c = 0 (a zero magnitude) raises too."""
    c = col_scale.float()
    if sign < 0 and bool((c == 0).any()):
        raise ValueError("cannot unmerge a DoRA layer with a zero magnitude entry: W * 0 keeps nothing of W")
    a32, b32 = lora_A_2d.float(), lora_B_2d.float()
    rows = weight_2d.shape[0]
    starts = range(0, rows, _MERGE_CHUNK_ROWS)

    def block(i):
        j = min(i + _MERGE_CHUNK_ROWS, rows)
        w, cj = weight_2d[i:j].float(), c[i:j, None]
        delta = (b32[i:j] @ a32) * scaling
        return (w + delta) * cj if sign > 0 else w / cj - delta

    if safe:
        limit = torch.finfo(weight_2d.dtype).max
        if not all(bool((block(i).abs() <= limit).all()) for i in starts):
            raise ValueError(
                "merging the adapter would make the weight non-finite (NaN or Inf); the weight is unchanged"
            )
    for i in starts:
        weight_2d[i : i + _MERGE_CHUNK_ROWS].copy_(block(i))
    return weight_2d
