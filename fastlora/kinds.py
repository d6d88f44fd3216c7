"""The layer-kind registry: one record per kind of layer fastlora wraps.

A kind is a kernel file (``kernels/``), an op module (``fastlora/ops/``), a LoRA layer class
(``fastlora/layers.py``) and one :class:`LayerKind` record registered here. model.py, io.py, validate.py, the
CLI and the benchmarks read the registry; nothing else switches on the kind. The layer class carries what is
its own (which module types it wraps, which options it refuses, its adapter tensors and their shapes, how it
merges); the record adds what the rest of the library needs to know about the kind.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fastlora import validate
from fastlora.layers import (
    LoRAConv2d,
    LoRAEmbedding,
    LoRALayer,
    LoRALinear,
    LoRALinear4bit,
    grouped_lora_B,
    is_gpt2_conv1d,
    is_linear4bit,
)
from fastlora.ops.conv2d import lora_conv2d
from fastlora.ops.dora import lora_linear_dora
from fastlora.ops.embedding import lora_embedding
from fastlora.ops.group import GroupMember
from fastlora.ops.linear import lora_linear
from fastlora.ops.linear4bit import lora_linear_4bit

__all__ = ["LayerKind", "register_kind", "unregister_kind", "kinds", "get_kind", "kind_for_module", "kind_of_layer",
           "kind_for_peft_layer"]  # fmt: skip


@dataclass(frozen=True)
class LayerKind:
    """What the library needs to know about one kind of LoRA layer.

    Attributes:
        name: the kind's name ("linear", "embedding", ...), also its name in ``fastlora validate``/``bench``.
        wraps: whether a module is a base module of this kind, as it is (a subclass that overrides ``forward``
            computes something else and is not wrapped).
        layer_class: the LoRALayer subclass; ``layer_class.from_module(module, r, alpha, dropout, use_rslora,
            **options)`` builds a layer, ``layer_class.adapter_shapes(module, r, **options)`` gives the shapes of
            its adapter tensors, ``layer._merge_views()`` is its merge rule.
        base_names: the base module types, for messages ("nn.Linear, Conv1D").
        peft_keys: {layer attribute: PEFT key suffix} of every adapter tensor the kind can hold (lora_A, lora_B and
            extra ones such as a magnitude vector or a lora_B bias); a layer saves those it has.
        rebuild: a plain base module (built on the meta device) that takes a layer's weight and bias back.
        all_linear: whether ``target_modules="all-linear"`` selects this kind.
        peft_types: names of the PEFT LoRA layer classes (``peft.tuners.lora.*``) whose forward ``from_peft`` gives
            this kind's op.
        peft_forward: ``peft_forward(module, adapter, x)``: the output of such a PEFT layer (its base layer being one
            this kind wraps) with its one active ``adapter``, computed by the kind's op from PEFT's own tensors; or
            None where the op does not compute exactly what PEFT does (a LoRA variant the kind does not implement,
            PEFT's different math on some modules), and then PEFT's own forward runs.
        peft_group_member: ``peft_group_member(module, adapter)``: such a layer's arguments to a sibling group's op
            (``fastlora.ops.group.GroupMember``), or None where it cannot take part; None for kinds without groups.
        peft_difference: why PEFT computes LoRA on this module (or layer) differently from fastlora, or None; such
            adapters are exact only between fastlora saves and loads.
        validate_case: the accuracy check's case (fastlora.validate), or None.
        bench_setup: the module of the benchmark setup (imported by the suite), or None.
    """

    name: str
    wraps: Callable[[nn.Module], bool]
    layer_class: type[LoRALayer]
    base_names: str
    peft_keys: Mapping[str, str]
    rebuild: Callable[[LoRALayer], nn.Module]
    all_linear: bool = False
    peft_types: tuple[str, ...] = ()
    peft_forward: Callable[[nn.Module, str, torch.Tensor], torch.Tensor | None] | None = None
    peft_group_member: Callable[[nn.Module, str], GroupMember | None] | None = None
    peft_difference: Callable[[nn.Module], str | None] = field(default=lambda module: None)
    validate_case: object = None
    bench_setup: str | None = None


_KINDS: dict[str, LayerKind] = {}


def register_kind(kind: LayerKind) -> LayerKind:
    """Add a kind to the registry (ValueError if its name is taken); returns it."""
    if not isinstance(kind, LayerKind):
        raise TypeError(f"register_kind expects a LayerKind, got {type(kind).__name__}")
    if kind.name in _KINDS:
        raise ValueError(f"a layer kind named {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Remove a kind from the registry (for tests and plugins that register their own)."""
    _KINDS.pop(name)


def kinds() -> tuple[LayerKind, ...]:
    """Every registered kind, in registration order."""
    return tuple(_KINDS.values())


def get_kind(name: str) -> LayerKind:
    """The kind of this name; ValueError naming the known ones otherwise."""
    if name not in _KINDS:
        raise ValueError(f"unknown layer kind {name!r}; expected one of {', '.join(_KINDS)}")
    return _KINDS[name]


def kind_for_module(module: nn.Module) -> LayerKind | None:
    """The kind that wraps ``module`` as it is, or None (also for a module that already is a LoRA layer)."""
    if isinstance(module, LoRALayer):
        return None
    return next((kind for kind in _KINDS.values() if kind.wraps(module)), None)


def kind_of_layer(layer: LoRALayer) -> LayerKind:
    """The kind a LoRA layer belongs to (the most recently registered one whose class it is an instance of)."""
    for kind in reversed(_KINDS.values()):
        if isinstance(layer, kind.layer_class):
            return kind
    raise ValueError(f"{type(layer).__name__} belongs to no registered layer kind")


def kind_for_peft_layer(module: nn.Module) -> LayerKind | None:
    """The kind ``from_peft`` converts a PEFT LoRA layer to, or None."""
    cls = type(module)
    if not cls.__module__.startswith("peft.tuners.lora"):
        return None
    return next((kind for kind in _KINDS.values() if cls.__name__ in kind.peft_types), None)


# ----------------------------------------------------------------------------------------------------------
# The built-in kinds
# ----------------------------------------------------------------------------------------------------------


def _plain(base: type) -> Callable[[nn.Module], bool]:
    """Instances of ``base`` whose forward is base's own."""
    return lambda module: isinstance(module, base) and type(module).forward is base.forward


def _on_meta(factory):
    with torch.device("meta"):
        return factory()


def _rebuild_linear(layer: LoRALinear) -> nn.Module:
    if layer.fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        return _on_meta(lambda: Conv1D(layer.out_features, layer.in_features))
    return _on_meta(lambda: nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None))


def _rebuild_embedding(layer: LoRAEmbedding) -> nn.Module:
    return _on_meta(lambda: nn.Embedding(layer.num_embeddings, layer.embedding_dim, padding_idx=layer.padding_idx))


def _rebuild_conv2d(layer: LoRAConv2d) -> nn.Module:
    return _on_meta(
        lambda: nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
            layer.groups, bias=layer.bias is not None,
        )
    )  # fmt: skip


def _rebuild_linear4bit(layer: LoRALinear4bit) -> nn.Module:
    import bitsandbytes as bnb

    w = layer.weight
    return _on_meta(
        lambda: bnb.nn.Linear4bit(
            layer.in_features, layer.out_features, bias=layer.bias is not None, compute_dtype=layer.compute_dtype,
            compress_statistics=w.compress_statistics, quant_type=w.quant_type, quant_storage=w.quant_storage,
        )
    )  # fmt: skip


def _peft_dropout(module, adapter) -> float:
    """The dropout probability of one adapter of a PEFT layer (an nn.Dropout, or nn.Identity for none)."""
    dropout = module.lora_dropout[adapter]
    return float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0


def _peft_linear_forward(module, adapter, x):
    base, lora_A, lora_B = module.base_layer, module.lora_A[adapter], module.lora_B[adapter]
    weight = base.weight.t() if is_gpt2_conv1d(base) else base.weight
    args = (module.scaling[adapter], _peft_dropout(module, adapter), module.training)
    variant = module.lora_variant.get(adapter)
    if variant is None:
        return lora_linear(x, weight, base.bias, lora_A.weight, lora_B.weight, *args, lora_bias=lora_B.bias)
    from peft.tuners.lora.variants import DoraLinearVariant

    if type(variant) is not DoraLinearVariant:
        return None
    magnitude = module.lora_magnitude_vector[adapter].weight
    return lora_linear_dora(x, weight, base.bias, lora_A.weight, lora_B.weight, magnitude, *args)


def _peft_linear_group_member(module, adapter) -> GroupMember | None:
    if module.lora_variant.get(adapter) is not None:
        return None
    base, lora_A, lora_B = module.base_layer, module.lora_A[adapter], module.lora_B[adapter]
    weight = base.weight.t() if is_gpt2_conv1d(base) else base.weight
    p = _peft_dropout(module, adapter) if module.training else 0.0
    return GroupMember(weight, base.bias, lora_A.weight, lora_B.weight, lora_B.bias, module.scaling[adapter], p)


def _peft_linear4bit_forward(module, adapter, x):
    lora_A, lora_B = module.lora_A[adapter], module.lora_B[adapter]
    if adapter in module.lora_variant or lora_B.bias is not None:
        return None
    base = module.base_layer
    out_dtype = x.dtype
    if base.compute_dtype is not None:
        x = x.to(base.compute_dtype)
    y = lora_linear_4bit(
        x, base.weight, base.weight.quant_state, base.bias, lora_A.weight, lora_B.weight, module.scaling[adapter],
        _peft_dropout(module, adapter), module.training,
    )  # fmt: skip
    return y.to(out_dtype)


def _peft_embedding_forward(module, adapter, x):
    if adapter in module.lora_variant:
        return None
    base = module.base_layer
    lora_A, lora_B = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]
    return lora_embedding(x, base.weight, lora_A, lora_B, module.scaling[adapter], base.padding_idx)


def _peft_conv2d_forward(module, adapter, x):
    base = module.base_layer
    if adapter in module.lora_variant or tuple(base.dilation) != (1, 1):
        return None  # PEFT's lora_A runs without the base's dilation
    lora_A, lora_B = module.lora_A[adapter], module.lora_B[adapter]
    if lora_B.bias is not None:
        return None
    return lora_conv2d(
        x, base.weight, base.bias, lora_A.weight, grouped_lora_B(lora_B.weight, base.groups), module.scaling[adapter],
        base.stride, base.padding, base.dilation, base.groups, _peft_dropout(module, adapter), module.training,
    )  # fmt: skip


def _conv2d_peft_difference(module) -> str | None:
    if tuple(module.dilation) != (1, 1):
        return "PEFT's LoRA branch on a dilated Conv2d differs from fastlora's (PEFT's lora_A ignores the dilation)"
    return None


_AB_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
# PEFT saves a DoRA magnitude as ``<module>.lora_magnitude_vector`` (no ".weight") and lora_bias as lora_B's bias.
_LINEAR_KEYS = {**_AB_KEYS, "lora_magnitude_vector": "lora_magnitude_vector", "lora_bias": "lora_B.bias"}

register_kind(
    LayerKind(
        name="linear",
        wraps=lambda m: _plain(nn.Linear)(m) or is_gpt2_conv1d(m),
        layer_class=LoRALinear,
        base_names="nn.Linear, Conv1D",
        peft_keys=_LINEAR_KEYS,
        rebuild=_rebuild_linear,
        all_linear=True,
        peft_types=("Linear",),
        peft_forward=_peft_linear_forward,
        peft_group_member=_peft_linear_group_member,
        validate_case=validate.LinearCase(),
        bench_setup="fastlora.benchmarks.linear",
    )
)
register_kind(
    LayerKind(
        name="embedding",
        wraps=_plain(nn.Embedding),
        layer_class=LoRAEmbedding,
        base_names="nn.Embedding",
        peft_keys={"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"},
        rebuild=_rebuild_embedding,
        peft_types=("Embedding",),
        peft_forward=_peft_embedding_forward,
        validate_case=validate.EmbeddingCase(),
        bench_setup="fastlora.benchmarks.embedding",
    )
)
register_kind(
    LayerKind(
        name="conv2d",
        wraps=_plain(nn.Conv2d),
        layer_class=LoRAConv2d,
        base_names="nn.Conv2d",
        peft_keys=_AB_KEYS,
        rebuild=_rebuild_conv2d,
        peft_types=("Conv2d",),
        peft_forward=_peft_conv2d_forward,
        peft_difference=_conv2d_peft_difference,
        validate_case=validate.Conv2dCase(),
        bench_setup="fastlora.benchmarks.conv2d",
    )
)
# bitsandbytes is optional: the kind is always known (a module can only be a Linear4bit once bitsandbytes is
# imported, and is_linear4bit never imports it), its accuracy check and benchmark only where it is installed
_HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
register_kind(
    LayerKind(
        name="linear4bit",
        wraps=is_linear4bit,
        layer_class=LoRALinear4bit,
        base_names="bitsandbytes Linear4bit",
        peft_keys=_AB_KEYS,
        rebuild=_rebuild_linear4bit,
        all_linear=True,
        peft_types=("Linear4bit",),
        peft_forward=_peft_linear4bit_forward,
        validate_case=validate.Linear4bitCase() if _HAS_BNB else None,
        bench_setup="fastlora.benchmarks.linear4bit" if _HAS_BNB else None,
    )
)
