"""QLoRA: Y = x deq(W)^T + bias + s * (dropout(x) A^T) B^T over a bitsandbytes 4-bit W (NF4, double quantized).

Providers: "base" is the frozen ``Linear4bit``; "peft_style" is "dequantize, then cuBLAS, plus LoRA": bitsandbytes
dequantizes W into a temporary, ``F.linear`` multiplies, backward dequantizes again for dX (nothing N x K saved), and
the LoRA branch runs unfused in torch (the Unsloth-style baseline); "peft" is PEFT's ``lora.bnb.Linear4bit``;
"fastlora" is ``LoRALinear4bit``. Adapters are float32 in every LoRA provider, as PEFT makes them.
"""

from __future__ import annotations

import math

import bitsandbytes as bnb
import torch
import torch.nn as nn
import torch.nn.functional as F
from fastlora.benchmarks import providers
from fastlora.benchmarks.harness import Provider
from fastlora.benchmarks.linear import gemm_flops

import fastlora
from fastlora.reference_4bit import dequantize_4bit_ref

LAYER = "linear4bit"


def inputs(case, device, seed):
    return providers.layer_inputs(LAYER, case, device, seed)


class _DequantLinear(torch.autograd.Function):
    """x deq(W)^T + bias; backward dequantizes W again for dX (the packed W is what it saves)."""

    @staticmethod
    def forward(ctx, x, packed, quant_state, bias):
        ctx.save_for_backward(packed)
        ctx.quant_state = quant_state
        return F.linear(x, dequantize_4bit_ref(packed, quant_state).to(x.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        (packed,) = ctx.saved_tensors
        return dy @ dequantize_4bit_ref(packed, ctx.quant_state).to(dy.dtype), None, None, None


class DequantMatmulLoRA(nn.Module):
    """Dequantize, then cuBLAS, plus the unfused LoRA branch (see the module docstring)."""

    def __init__(self, base, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        bias = self.base.bias.to(x.dtype) if self.base.bias is not None else None
        y = _DequantLinear.apply(x, self.base.weight, self.base.weight.quant_state, bias)
        lora = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return y + self.scaling * lora


def linear4bit_module(t, case, device) -> nn.Module:
    """A bitsandbytes Linear4bit holding the case's packed weight and quant_state (and bias)."""
    s, qs = case.shape, t["quant_state"]
    with torch.device("meta"):
        base = bnb.nn.Linear4bit(s["K"], s["N"], bias=bool(s["bias"]), compute_dtype=case.dtype,
                                 compress_statistics=qs.nested, quant_type=qs.quant_type)  # fmt: skip
    base.weight = bnb.nn.Params4bit(
        t["packed"], requires_grad=False, quant_state=qs, blocksize=qs.blocksize, compress_statistics=qs.nested,
        quant_type=qs.quant_type, module=base, bnb_quantized=True,
    )  # fmt: skip
    base.bias = nn.Parameter(t["bias"], requires_grad=False) if t["bias"] is not None else None
    base.support_avx512bf16_for_cpu = False  # bitsandbytes' CPU inference kernel repacks W and computes in bf16
    return base


def _peft_layer(base, r, alpha, dropout):
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        return None
    holder = nn.Module()
    holder.layer = base
    holder.is_loaded_in_4bit = True  # PEFT picks its bnb layer for a model marked so
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["layer"]), holder)
    return holder.layer


def providers_for(case, t, device):
    r, p = case.shape["r"], case.dropout
    alpha = providers.ALPHA_PER_RANK * r
    base = linear4bit_module(t, case, device)
    out = [Provider("base", base, path="torch")]
    ref = DequantMatmulLoRA(base, r, alpha, p)
    out.append(Provider("peft_style", ref, ref.lora_A, ref.lora_B, path="torch"))
    layer = _peft_layer(base, r, alpha, p)
    if layer is not None:
        a, b = providers.peft_factors(layer)
        out.append(Provider("peft", layer, a, b, path="torch"))
    mine = fastlora.LoRALinear4bit.from_module(base, r=r, alpha=alpha, dropout=p)
    out.append(Provider("fastlora", mine, mine.lora_A, mine.lora_B, path=fastlora.active_path(device)))
    for prov in out[1:]:
        prov.set_lora(t["lora_A"], t["lora_B"])
    return out


def flops(case, mode, lora):
    s = case.shape
    return gemm_flops(s["M"], s["K"], s["N"], s["r"], mode, lora)


def bytes_moved(case, mode, lora):
    """The least traffic: activations and adapters once in their dtype, W once as 4-bit codes plus its block
    scales (one byte each when double quantized), per pass that needs W (forward, and backward for dX)."""
    s = case.shape
    M, K, N, r = s["M"], s["K"], s["N"], s["r"]
    es = torch.finfo(case.dtype).bits // 8
    w = N * K // 2 + math.ceil(N * K / s["block"]) * (1 if s["nested"] else 4)
    fwd = es * (M * K + M * N + s["bias"] * N) + w + (es * (r * K + N * r + M * r) if lora else 0)
    bwd = es * (M * N + M * K) + w + (es * (M * K + M * r + 2 * r * K + 2 * N * r) if lora else 0)
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]
