"""Building the providers every setup compares: the bare frozen layer, the PEFT-style reference, PEFT itself
(when installed) and fastlora (when this build has the layer)."""

from __future__ import annotations

import torch.nn as nn
from fastlora.benchmarks.harness import Provider

import fastlora
from fastlora.validate import OPS

# alpha = 2r: scaling 2.0 for every rank, exactly representable.
ALPHA_PER_RANK = 2


def layer_inputs(layer: str, case, device, seed):
    """The op's random inputs for a case (the same builder `fastlora validate` uses), at the benchmarks' scaling."""
    t = OPS[layer].make(case.shape, case.dtype, device, seed)
    t["scaling"] = float(ALPHA_PER_RANK)
    return t


def peft_layer(base: nn.Module, r: int, alpha: float, dropout: float, **options):
    """PEFT's LoRA layer around ``base`` (through ``inject_adapter_in_model``), or None without PEFT. ``options``
    are PEFT's layer options (use_dora, lora_bias)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        return None
    holder = nn.Module()
    holder.layer = base
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["layer"], **options)
    inject_adapter_in_model(config, holder)
    layer = holder.layer
    layer.to(dtype=base.weight.dtype)
    return layer


def peft_factors(layer):
    """(A, B) parameters of a PEFT LoRA layer's default adapter, in fastlora's shapes."""
    if hasattr(layer, "lora_embedding_A") and "default" in layer.lora_embedding_A:
        return layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def build(base: nn.Module, r: int, dropout: float, peft_style_cls, fastlora_cls_name: str, device,
          with_dropout: bool = True, base_modes=None, options=None) -> list[Provider]:  # fmt: skip
    """The four providers around one frozen base module, in the order they are reported. With layer ``options``
    (use_dora, lora_bias) PEFT and fastlora take them and the PEFT-style reference, which has none, is left out."""
    base.requires_grad_(False)
    alpha = ALPHA_PER_RANK * r
    options = {k: v for k, v in (options or {}).items() if v}
    kwargs = {"dropout": dropout} if with_dropout else {}
    out = [Provider("base", base, path="torch", modes=base_modes)]
    if not options:
        ps = peft_style_cls(base, r, alpha, **kwargs)
        out.append(Provider("peft_style", ps, ps.lora_A, ps.lora_B, path="torch"))
    layer = peft_layer(base, r, alpha, dropout if with_dropout else 0.0, **options)
    if layer is not None:
        a, b = peft_factors(layer)
        out.append(Provider("peft", layer, a, b, path="torch"))
    cls = getattr(fastlora, fastlora_cls_name, None)
    if cls is not None:
        layer = cls.from_module(base, r=r, alpha=alpha, **kwargs, **options)
        out.append(Provider("fastlora", layer, layer.lora_A, layer.lora_B, path=fastlora.active_path(device)))
    return out
