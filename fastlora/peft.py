"""PEFT models with fastlora's ops: ``from_peft``, and what the model-level ``fl.*`` calls do with a PEFT model.

``from_peft`` changes one thing in a PEFT model: the forward of its LoRA layers. Every module, parameter, adapter
dictionary (``lora_A["default"]``, ...) and config stays PEFT's own, so PEFT's ``save_pretrained``,
``get_peft_model_state_dict``, ``merge_and_unload``, ``unload``, ``disable_adapter``, ``set_adapter``,
``add_adapter``, ``delete_adapter`` and ``print_trainable_parameters``, and the Trainer's saves and resumes, give
exactly what they give without it. Each converted layer's class becomes a subclass of its PEFT class (``Fast`` +
its name) that overrides ``forward`` only: a call with one active adapter, neither merged nor disabled, and no
extra arguments runs the layer kind's op (``LayerKind.peft_forward``) on that adapter's tensors; anything else
(mixed-batch ``adapter_names``, several active adapters, a LoRA variant the kind does not implement) runs PEFT's
own forward, so the result is always PEFT's.

The ``fl.*`` functions given a ``PeftModel`` run PEFT's own method (``fl.save_adapter`` is ``save_pretrained``,
``fl.merge_and_unload`` is ``merge_and_unload``, ...), so nothing PEFT trains (``modules_to_save``, trainable tokens,
biases, layers left as PEFT's, other adapters) is left out. Given a model that holds PEFT's adapter modules but is
not the ``PeftModel`` itself, they refuse with a sentence saying so.
"""

from __future__ import annotations

import sys
import warnings

import torch.nn as nn

from fastlora import experts as _experts
from fastlora.distributed import dtensor_class, in_process_group, is_zero3, zero3_read_by
from fastlora.grouping import attach_groups, detach_groups, sibling_groups
from fastlora.kinds import kind_for_peft_layer
from fastlora.layers import GROUP_ATTR, LoRALayer

__all__ = ["from_peft", "converted_layers", "peft_model_of", "FastForward"]


class FastForward:
    """Placed before a PEFT LoRA layer class: ``forward`` runs the kind's op for the one active adapter (or takes its
    output from its sibling group, see fastlora.grouping), and PEFT's own forward for everything else (see the module
    docstring)."""

    @staticmethod
    def _fastlora_forward(module, adapter, x):
        return None

    @staticmethod
    def _fastlora_group_member(module, adapter):
        return None

    def _fastlora_adapter(self) -> str | None:
        """The one active adapter fastlora's op computes, or None (disabled, merged, several active)."""
        if self.disable_adapters or self.merged:
            return None
        active = [name for name in self.active_adapters if name in self.r]
        return active[0] if len(active) == 1 else None

    def group_member(self):
        """This layer's arguments to its sibling group's op, or None while PEFT's forward or its own op serves it."""
        adapter = self._fastlora_adapter()
        return None if adapter is None else self._fastlora_group_member(self, adapter)

    def forward(self, x, *args, **kwargs):
        if not args and not kwargs:
            group = self.__dict__.get(GROUP_ATTR)
            if group is not None:
                y = group.output(self, x)
                if y is not None:
                    return y
            adapter = self._fastlora_adapter()
            if adapter is not None and (not in_process_group() or _whole_for_op(self, adapter)):
                y = self._fastlora_forward(self, adapter, x)
                if y is not None:
                    return y
        return super().forward(x, *args, **kwargs)


def _op_parameters(module, adapter: str) -> list[nn.Parameter]:
    """The parameters fastlora's op reads for ``adapter`` of a PEFT LoRA layer: its base layer's and the adapter's,
    each once (PEFT's DoRA appends ``lora_magnitude_vector`` to ``adapter_layer_names`` that already hold it)."""
    params = [p for p in module.base_layer._parameters.values() if p is not None]
    for attr in dict.fromkeys(module.adapter_layer_names):
        held = module._modules.get(attr)  # an nn.ModuleDict or nn.ParameterDict of adapters
        if held is None or adapter not in held:
            continue
        item = held[adapter]
        if isinstance(item, nn.Parameter):
            params.append(item)
        else:  # read the Parameters directly: a forward pays for this on every call across processes
            params += item.parameters() if item._modules else [p for p in item._parameters.values() if p is not None]
    return list({id(p): p for p in params}.values())


def _whole_for_op(module, adapter: str) -> bool:
    """Across processes, whether fastlora's op can read the layer's parameters whole now (making it so under ZeRO-3).

    The op reads the base layer's and the adapter's parameters without calling those submodules, so the hooks
    that gather a sharded parameter around its own module's forward never run for it. Under DeepSpeed ZeRO-3 the
    layer takes them as its own external parameters (``zero3_read_by``): gathered around its forward and backward.
    Under FSDP2 they are whole inside the layer's forward when ``fully_shard`` was applied to the layer or a module
    around it; when it was applied to a module inside the layer (the base layer alone, say: a size-based wrapping
    policy may do that), they are still sharded ``DTensor``s here, and PEFT's forward runs instead (it calls the
    submodules, whose FSDP2 hooks gather them).
    """
    params = _op_parameters(module, adapter)
    dtensor = dtensor_class()
    if dtensor is not None and any(isinstance(p, dtensor) for p in params):
        warnings.warn(
            f"fastlora: a {type(module).__name__} runs PEFT's forward: fully_shard was applied to a module inside "
            "it, so its parameters are sharded when it runs; apply fully_shard to the LoRA layer or a module around "
            "it (a decoder block) for fastlora's op",
            stacklevel=3,
        )
        return False
    zero3 = [p for p in params if is_zero3(p)]
    if zero3:
        zero3_read_by(module, zero3)
    return True


_FAST_CLASSES: dict[type, type] = {}


def _fast_class(cls: type, kind) -> type:
    """The subclass of PEFT's layer class ``cls`` whose forward is fastlora's (one per class)."""
    if cls not in _FAST_CLASSES:
        namespace = {
            "_fastlora_forward": staticmethod(kind.peft_forward),
            "_fastlora_group_member": staticmethod(kind.peft_group_member or FastForward._fastlora_group_member),
            "_fastlora_groupable": kind.peft_group_member is not None,
            "__module__": __name__,
        }
        _FAST_CLASSES[cls] = type(f"Fast{cls.__name__}", (FastForward, cls), namespace)
    return _FAST_CLASSES[cls]


def converted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every PEFT LoRA layer of ``model`` that ``from_peft`` gave fastlora's forward, with its dotted name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FastForward)]


def _peft_classes():
    try:
        from peft.tuners.lora.layer import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as err:
        raise ImportError("from_peft needs the peft package") from err
    return LoraLayer, BaseTunerLayer


def _skip_reason(module, kind, nested_in: str | None) -> str | None:
    """Why a PEFT LoRA layer keeps PEFT's forward, or None when fastlora's op can run it."""
    from fastlora.model import is_linear8bit, unsupported_reason

    cls = type(module)
    if nested_in is not None:
        return f"it sits inside {nested_in}, which stays PEFT's (and calls it its own way)"
    if is_linear8bit(module):
        return f"{cls.__module__}.{cls.__name__}: 8-bit base layers have no fastlora op"
    if kind is None:
        return f"{cls.__module__}.{cls.__name__} has no fastlora equivalent"
    reason = unsupported_reason("base_layer", module.base_layer, None)
    if reason is not None:
        return f"its base layer is not one fastlora's op computes: {reason}"
    return None


def from_peft(peft_model: nn.Module, fuse: bool = True) -> nn.Module:
    """Gives the LoRA layers of a PEFT model fastlora's forward, in place; the model stays a PEFT model.

    Layers of ``peft.tuners.lora`` ``Linear`` (over ``nn.Linear`` or GPT-2's ``Conv1D``, plain, DoRA or lora_bias),
    ``Embedding``, ``Conv2d`` and ``bnb.Linear4bit`` keep every tensor, adapter and setting; their class becomes a
    subclass that computes a call with one active adapter with fastlora's op and anything else with PEFT's own
    forward (see the module docstring). ``ParamWrapper`` layers (``target_parameters`` on MoE expert weights) keep
    theirs too and compute with fastlora's grouped experts op (fastlora.experts). Other layers (8-bit,
    Conv1d/Conv3d, MultiheadAttention and the layers inside it, quantised or subclassed base layers) keep PEFT's
    forward, with a warning naming each. PEFT's and
    transformers' own methods work as before, and so do optimizers built before the call. Calling it again
    converts layers added since (``add_adapter`` on new modules).

    With ``fuse`` (default True) sibling linear layers that read one input (q/k/v, gate/up) are computed as one op
    per call (see fastlora.grouping); PEFT's modules, state_dict and saved adapters are the same either way.

    Returns ``peft_model``.
    """
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"from_peft expects a torch.nn.Module, got {type(peft_model).__name__}")
    if not isinstance(fuse, bool):
        raise TypeError(f"from_peft: fuse must be a bool, got {fuse!r}")
    LoraLayer, BaseTunerLayer = _peft_classes()
    found = [(name, m) for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    if not found:
        raise ValueError(f"from_peft: {type(peft_model).__name__} has no PEFT LoRA layers")
    tuner_names = [name for name, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer)]
    convert = {}
    for name, module in found:
        if isinstance(module, FastForward) or _experts.convert_peft_layer(name, module):  # ParamWrappers: experts.py
            continue
        nested_in = next((outer for outer in tuner_names if name.startswith(outer + ".")), None)
        kind = kind_for_peft_layer(module)
        reason = _skip_reason(module, kind, nested_in)
        if reason is not None:
            warnings.warn(f"fastlora.from_peft: {name} keeps PEFT's forward: {reason}", stacklevel=2)
            continue
        convert[name] = kind
    detach_groups(peft_model)
    groupable = [
        name
        for name, m in found
        if (
            convert[name].peft_group_member is not None
            if name in convert
            else type(m).__dict__.get("_fastlora_groupable")
        )
    ]
    groups = sibling_groups(peft_model, groupable) if fuse else []  # traced before fastlora's forward is in
    for name, kind in convert.items():
        module = peft_model.get_submodule(name)
        module.__class__ = _fast_class(type(module), kind)
    attach_groups(peft_model, groups)
    return peft_model


# ----------------------------------------------------------------------------------------------------------
# What fl.* does with a PEFT model
# ----------------------------------------------------------------------------------------------------------


def _peft_modules(model: nn.Module) -> list[str]:
    """Names of PEFT's adapter modules in ``model`` (tuner layers and modules_to_save / trainable-token wrappers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return [name for name, m in model.named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


def peft_model_of(model: nn.Module, fn: str):
    """``model`` when it is a PEFT ``PeftModel`` (the ``fl.*`` call ``fn`` then runs PEFT's own method), None when it
    holds no PEFT adapter module; ValueError when it holds some but is not the PeftModel, or when it also holds
    fastlora layers (no single method would serve both)."""
    peft = sys.modules.get("peft")
    if peft is None:
        return None
    if isinstance(model, peft.PeftModel):
        mixed = next((name for name, m in model.named_modules() if isinstance(m, LoRALayer)), None)
        if mixed is not None:
            raise ValueError(
                f"{fn}: this PEFT model also holds the fastlora layer {mixed}; one call cannot serve both: use PEFT's "
                "add_adapter for further adapters (and fl.from_peft for fastlora's forward)"
            )
        return model
    held = _peft_modules(model)
    if held:
        raise ValueError(
            f"{fn}: {type(model).__name__} holds PEFT's adapter modules ({', '.join(held[:3])}"
            f"{', ...' if len(held) > 3 else ''}) but is not the PeftModel that owns them; pass the PeftModel "
            "(fastlora then runs PEFT's own method, which serves every adapter, modules_to_save and bias)"
        )
    return None
