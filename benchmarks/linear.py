"""Linear: Y = x W^T + bias + s * (dropout(x) A^T) B^T with x [M, K], W [N, K], A [r, K], B [N, r].

Shapes with ``dora=1`` compare DoRA layers (PEFT's against fastlora's, magnitude g [N] from the case), shapes
with ``lbias=1`` layers with PEFT's lora_bias; the plain LoRA case at the same shape is their baseline."""

from __future__ import annotations

import torch
import torch.nn as nn
from fastlora.benchmarks import providers

from fastlora.reference import PeftStyleLinear

LAYER = "linear"


def inputs(case, device, seed):
    return providers.layer_inputs(LAYER, case, device, seed)


def providers_for(case, t, device):
    s = case.shape
    base = nn.Linear(s["K"], s["N"], bias=bool(s["bias"]), device="meta")
    base.weight = nn.Parameter(t["weight"], requires_grad=False)
    if t["bias"] is not None:
        base.bias = nn.Parameter(t["bias"], requires_grad=False)
    options = {"use_dora": bool(s["dora"]), "lora_bias": bool(s["lbias"])}
    provs = providers.build(base, s["r"], case.dropout, PeftStyleLinear, "LoRALinear", device, options=options)
    for p in provs:
        if p.is_lora:
            p.set_lora(t["lora_A"], t["lora_B"])
            _set_extra(p.module, t)
    return provs


@torch.no_grad()
def _set_extra(module, t):
    """The case's DoRA magnitude or lora_bias into a PEFT or fastlora layer (PEFT keeps them per adapter)."""
    if t["magnitude"] is not None:
        g = module.lora_magnitude_vector
        (g if isinstance(g, nn.Parameter) else g["default"].weight).copy_(t["magnitude"])
    if t["lora_bias"] is not None:
        lb = module.lora_bias if isinstance(module.lora_bias, nn.Parameter) else module.lora_B["default"].bias
        lb.copy_(t["lora_bias"])


def gemm_flops(M, K, N, r, mode, lora):
    """Forward: 2MNK (+ 2Mr(K+N) for S and S B^T). Backward: 2MNK for dX (+ 4Mr(N+K) for dS, dB, dA, dS A)."""
    fwd = 2 * M * N * K + (2 * M * r * (K + N) if lora else 0)
    bwd = 2 * M * N * K + (4 * M * r * (N + K) if lora else 0)
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


def gemm_bytes(M, K, N, r, es, mode, lora, bias=0):
    """The least traffic: each operand read once, each output written once (S [M, r] written, then read back)."""
    fwd = es * (M * K + N * K + M * N + bias * N) + (es * (r * K + N * r + M * r) if lora else 0)
    bwd = es * (M * N + N * K + M * K) + (es * (M * K + M * r + 2 * r * K + 2 * N * r) if lora else 0)
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


def flops(case, mode, lora):
    s = case.shape
    return gemm_flops(s["M"], s["K"], s["N"], s["r"], mode, lora)


def bytes_moved(case, mode, lora):
    s = case.shape
    es = torch.finfo(case.dtype).bits // 8
    return gemm_bytes(s["M"], s["K"], s["N"], s["r"], es, mode, lora, s["bias"])
