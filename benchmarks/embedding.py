"""Embedding: Y = W[idx] + s * A[:, idx]^T B^T with idx [M], W [V, D], A [r, V], B [D, r] (no dropout)."""

from __future__ import annotations

import torch
import torch.nn as nn
from fastlora.benchmarks import providers

from fastlora.reference import PeftStyleEmbedding

LAYER = "embedding"


def inputs(case, device, seed):
    return providers.layer_inputs(LAYER, case, device, seed)


def providers_for(case, t, device):
    s = case.shape
    base = nn.Embedding(s["V"], s["D"], padding_idx=t["padding_idx"], device="meta")
    base.weight = nn.Parameter(t["weight"], requires_grad=False)
    # The frozen lookup has nothing to differentiate: the bare layer is timed forward only.
    provs = providers.build(
        base, s["r"], 0.0, PeftStyleEmbedding, "LoRAEmbedding", device, with_dropout=False, base_modes=("forward",)
    )
    for p in provs:
        if p.is_lora:
            p.set_lora(t["lora_A"], t["lora_B"])
    return provs


def flops(case, mode, lora):
    """Forward: 2MrD for A[:, idx]^T B^T. Backward: 2MDr for dY B and 2MDr for dB."""
    s = case.shape
    if not lora:
        return 0
    fwd, bwd = 2 * s["M"] * s["r"] * s["D"], 4 * s["M"] * s["r"] * s["D"]
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


def bytes_moved(case, mode, lora):
    """Forward: idx, M rows of W (and of A^T), B, Y once. Backward: dY, the A rows again, dA rows and dB."""
    s = case.shape
    M, D, r = s["M"], s["D"], s["r"]
    es = torch.finfo(case.dtype).bits // 8
    fwd = 8 * M + es * 2 * M * D + (es * (M * r + D * r) if lora else 0)
    bwd = es * (M * D + 2 * M * r + 2 * D * r) if lora else 0
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]
