"""Conv2d: Y = conv(x, W) + bias + s * conv1x1(conv(dropout(x), A), B), counted as the implicit GEMM
M = Nb*Ho*Wo, K = C*kh*kw, N = O."""

from __future__ import annotations

import torch
import torch.nn as nn
from fastlora.benchmarks import providers
from fastlora.benchmarks.linear import gemm_bytes, gemm_flops

from fastlora.reference import PeftStyleConv2d
from fastlora.validate import OPS

LAYER = "conv2d"


def inputs(case, device, seed):
    return providers.layer_inputs(LAYER, case, device, seed)


def providers_for(case, t, device):
    s = case.shape
    base = nn.Conv2d(
        s["C"], s["O"], s["k"], stride=t["stride"], padding=t["padding"], dilation=t["dilation"],
        bias=bool(s["bias"]), device="meta",
    )  # fmt: skip
    base.weight = nn.Parameter(t["weight"], requires_grad=False)
    if t["bias"] is not None:
        base.bias = nn.Parameter(t["bias"], requires_grad=False)
    provs = providers.build(base, s["r"], case.dropout, PeftStyleConv2d, "LoRAConv2d", device)
    for p in provs:
        if p.is_lora:
            p.set_lora(t["lora_A"], t["lora_B"])
    return provs


def _gemm_dims(case):
    s = case.shape
    ho, wo = OPS[LAYER].out_hw(s)
    return s["N"] * ho * wo, s["C"] * s["k"] ** 2, s["O"], s["r"]


def flops(case, mode, lora):
    return gemm_flops(*_gemm_dims(case), mode, lora)


def bytes_moved(case, mode, lora):
    """As the GEMM, but x is read as the Nb*C*H*W input, not as the M x K unfolded matrix."""
    s = case.shape
    M, K, N, r = _gemm_dims(case)
    es = torch.finfo(case.dtype).bits // 8
    unfolded = gemm_bytes(M, K, N, r, es, mode, lora, s["bias"])
    x_reads = {"forward": 1, "backward": 1 + bool(lora), "forward+backward": 2 + bool(lora)}[mode]
    return unfolded - es * x_reads * (M * K - s["N"] * s["C"] * s["H"] * s["W"])
