"""Model-level LoRA: put fastlora layers into any model, take them out again, and convert PEFT models.

Target matching follows PEFT, so a ``target_modules`` written for PEFT selects the same modules here:

- a list of names: a module matches when its dotted name equals an entry or ends with ``"." + entry``;
- a string: a regular expression that must match the whole dotted name (``re.fullmatch``);
- ``"all-linear"``: every ``nn.Linear`` and GPT-2 style ``Conv1D`` except the output head (the module
  ``model.get_output_embeddings()`` returns, or else a top-level ``lm_head``, ``score``, ``classifier`` or ``head``).

``exclude_modules`` uses the same rules and wins over ``target_modules``. ``rank_pattern`` and ``alpha_pattern``
map a regular expression to a rank or alpha; a module takes the first key that matches the end of its name at
a dot boundary (PEFT's rule: ``re.match(rf"(.*\\.)?({key})$", name)``).

Every function here checks all of its input before it changes anything: when it raises, the model is exactly
as it was.
"""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
from collections import Counter
from typing import NamedTuple

import torch
import torch.nn as nn

from fastlora.checks import check_alpha, check_dropout, check_rank
from fastlora.distributed import full_shape, full_tensor, is_sharded
from fastlora.kinds import kind_for_module, kind_for_peft_layer, kind_of_layer, kinds
from fastlora.layers import BASE_MODULE_ATTR, LoRALayer
from fastlora.reference import lora_scaling

__all__ = [
    "apply_lora",
    "merge_and_unload",
    "unload",
    "disable_adapter",
    "print_trainable_parameters",
    "ParameterCount",
    "from_peft",
    "lora_layers",
]

ALL_LINEAR = "all-linear"
_HEAD_NAMES = ("lm_head", "score", "classifier", "head")
_BASE_ATTR = BASE_MODULE_ATTR


# ----------------------------------------------------------------------------------------------------------
# Module kinds (read from the registry in fastlora.kinds)
# ----------------------------------------------------------------------------------------------------------


_EIGHT_BIT = (
    "bitsandbytes' 8-bit Linear8bitLt is not supported; fastlora wraps 4-bit bitsandbytes layers (Linear4bit): "
    "quantize the model in 4 bits (BitsAndBytesConfig(load_in_4bit=True))"
)


def is_linear8bit(module: nn.Module) -> bool:
    """bitsandbytes' ``Linear8bitLt`` (or PEFT's LoRA layer of that name), told by class name (no import)."""
    return type(module).__name__ == "Linear8bitLt"


def unsupported_reason(name: str, module: nn.Module, parent: nn.Module | None) -> str | None:
    """Why ``module`` cannot be wrapped by a fastlora layer, or None when it can."""
    if isinstance(module, LoRALayer):
        return "it already is a fastlora LoRA layer (call fl.unload or fl.merge_and_unload first)"
    if is_linear8bit(module):
        return _EIGHT_BIT
    kind = kind_for_module(module)
    if kind is None:
        names = ", ".join(k.base_names for k in kinds())
        return (
            f"{type(module).__name__} is not one of {names} "
            "(subclasses that override forward, such as quantised layers, are not supported)"
        )
    reason = kind.layer_class.weight_reason(module)
    if reason is not None:
        return reason
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads its projection weights directly, so a wrapped layer would be bypassed"
    return kind.layer_class.unsupported_reason(module)


def build_layer(module: nn.Module, r: int, alpha: float, dropout: float, use_rslora: bool, **options) -> LoRALayer:
    """A fastlora layer around ``module`` (its tensors shared); the module is kept for ``unload``."""
    kind = kind_for_module(module)
    layer = kind.layer_class.from_module(module, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, **options)
    layer.train(module.training)
    object.__setattr__(layer, _BASE_ATTR, module)
    return layer


def _own_tensors(layer: LoRALayer) -> dict[str, nn.Parameter | None]:
    """{name: tensor} of the base tensors a layer takes over from its module: weight, and bias where it has one."""
    return {name: getattr(layer, name, None) for name in ("weight", "bias") if hasattr(layer, name)}


def swap_in(model: nn.Module, name: str, layer: LoRALayer):
    """Puts ``layer`` in the place of the module it was built from. That module stays with the layer (for unload)
    but without the tensors the layer took over, so nothing but the layer holds them: when FSDP2 shards the
    layer's weight, or merging replaces a 4-bit one, no full copy stays alive through the kept module."""
    _replace(model, name, layer)
    base = layer.__dict__.get(_BASE_ATTR)
    if base is None:
        return
    for attr in _own_tensors(layer):
        if base._parameters.get(attr) is not None:
            setattr(base, attr, None)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    """Every fastlora layer in ``model`` with its dotted name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALayer)]


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The user's model inside a PEFT ``PeftModel`` / ``LoraModel`` (the names PEFT saves are relative to it)."""
    peft = sys.modules.get("peft")
    if peft is None:
        return model
    if isinstance(model, peft.PeftModel):
        model = model.base_model
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, BaseTuner):
        model = model.model
    return model


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def _parent_of(model: nn.Module, name: str) -> nn.Module | None:
    if not name:
        return None
    return model.get_submodule(_split(name)[0])


def _replace(model: nn.Module, name: str, new: nn.Module):
    parent = model.get_submodule(_split(name)[0])
    setattr(parent, _split(name)[1], new)


# ----------------------------------------------------------------------------------------------------------
# Target matching and validation
# ----------------------------------------------------------------------------------------------------------


def _check_name_spec(arg: str, spec, allow_none: bool):
    if spec is None and allow_none:
        return None
    if isinstance(spec, str):
        if not spec:
            raise ValueError(f"{arg} must be a non-empty string, list of names or 'all-linear', got ''")
        try:
            re.compile(spec)
        except re.error as err:
            raise ValueError(f"{arg}={spec!r} is not a valid regular expression: {err}") from None
        return spec
    if isinstance(spec, (list, tuple, set, frozenset)) and all(isinstance(t, str) and t for t in spec):
        if not spec and not allow_none:
            raise ValueError(f"{arg} must name at least one module, got an empty {type(spec).__name__}")
        return list(spec)
    raise TypeError(f"{arg} must be a regex string, 'all-linear' or a list of non-empty names, got {spec!r}")


def name_matches(spec, name: str) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list entry must equal it or be a dotted suffix."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def pattern_value(pattern: dict, name: str, default):
    """The value of the first key of ``pattern`` that matches the end of ``name`` (PEFT's rank_pattern rule)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _check_pattern(arg: str, pattern, value_check):
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise TypeError(f"{arg} must be a dict of regex -> value, got {type(pattern).__name__}")
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{arg} keys must be non-empty regex strings, got {key!r}")
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(f"{arg} key {key!r} is not a valid regular expression: {err}") from None
        value_check(value, f"{arg}[{key!r}]")
    return dict(pattern)


def _all_linear_kind(module: nn.Module) -> bool:
    kind = kind_for_module(module)
    return kind is not None and kind.all_linear


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        with contextlib.suppress(Exception):
            head = get()
            if isinstance(head, nn.Module):
                return head
    for name in _HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module) and _all_linear_kind(head):
            return head
    return None


def select_targets(model: nn.Module, target_modules, exclude_modules=None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs ``target_modules`` selects; raises if none, or if a selected one cannot be wrapped."""
    spec = _check_name_spec("target_modules", target_modules, allow_none=False)
    exclude = _check_name_spec("exclude_modules", exclude_modules, allow_none=True)
    all_linear = isinstance(spec, str) and spec.lower() == ALL_LINEAR
    head = _output_head(model) if all_linear else None
    selected, refused = [], []
    for name, module in model.named_modules():
        if not name or name_matches(exclude, name):
            continue
        parent = _parent_of(model, name)
        if all_linear:
            if module is head or not (_all_linear_kind(module) or is_linear8bit(module)):
                continue
            if isinstance(parent, nn.MultiheadAttention):
                continue
        elif not name_matches(spec, name):
            continue
        reason = unsupported_reason(name, module, parent)
        if reason is not None:
            refused.append(f"{name}: {reason}")
        else:
            selected.append((name, module))
    if refused:
        listing = "; ".join(refused[:5]) + (f"; and {len(refused) - 5} more" if len(refused) > 5 else "")
        raise ValueError(f"target_modules={target_modules!r} selects modules fastlora cannot wrap: {listing}")
    names = [n for n, _ in model.named_modules() if n]
    if not selected:
        hint = ""
        if isinstance(spec, str) and not all_linear:
            example = f" such as {names[-1]!r}" if names else ""
            hint = (
                f". Strings are full-match regular expressions (PEFT's rule): {spec!r} must match a whole dotted "
                f"name{example}; to select modules by their name, pass a list: [{spec!r}]"
            )
        raise ValueError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matches no module of "
            f"{type(model).__name__}; module names look like {names[:6]}{hint}"
        )
    if isinstance(spec, list):
        unmatched = [t for t in spec if not any(name_matches([t], n) for n in names)]
        if unmatched:
            warnings.warn(
                f"fastlora: target_modules entries {unmatched} match no module of {type(model).__name__} "
                f"(a misspelling?); LoRA was put on the modules the other entries name",
                stacklevel=3,
            )
    return selected


# ----------------------------------------------------------------------------------------------------------
# Applying and removing
# ----------------------------------------------------------------------------------------------------------


def install_layers(model: nn.Module, plan: list[tuple[str, nn.Module, int, float, dict]], dropout, use_rslora):
    """Builds a fastlora layer for each (name, module, r, alpha, options) and swaps them all in; all or nothing.

    Building sets the base tensors' ``requires_grad`` to False; if a build fails the flags are put back.
    Returns {name: layer}.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        built = {
            name: build_layer(module, r, alpha, dropout, use_rslora, **options)
            for name, module, r, alpha, options in plan
        }
    except Exception:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    for name, layer in built.items():
        swap_in(model, name, layer)
    return built


def _options_for(module: nn.Module, name: str, options: dict) -> dict:
    """The options ``module``'s layer class takes; ValueError for a true one it does not take."""
    accepted = kind_for_module(module).layer_class.options
    refused = [key for key, value in options.items() if value and key not in accepted]
    if refused:
        raise ValueError(
            f"{name} ({type(module).__name__}) does not support {', '.join(f'{k}=True' for k in refused)}; "
            "fastlora implements these options for linear layers (exclude the module or target linear layers only)"
        )
    return {key: value for key, value in options.items() if key in accepted}


def freeze_except_lora(model: nn.Module):
    """requires_grad=True on every adapter tensor of a fastlora layer (lora_A, lora_B, a DoRA magnitude, a lora_B
    bias), False on every other parameter."""
    lora = {id(p) for _, layer in lora_layers(model) for p in layer.adapter_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in lora)


def apply_lora(
    model: nn.Module,
    target_modules,
    r: int = 8,
    alpha: float = 8,
    dropout: float = 0.0,
    use_rslora: bool = False,
    exclude_modules=None,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    use_dora: bool = False,
    lora_bias: bool = False,
) -> nn.Module:
    """Replaces the matching modules of ``model`` by fastlora layers in place and freezes everything else.

    Args:
        model: any ``nn.Module`` (a Hugging Face model, a PEFT-free training model, a plain conv net).
        target_modules: a list of names (exact or dotted suffix), a regex string (full match) or "all-linear".
            Matching ``nn.Linear``, GPT-2 ``Conv1D`` (weight [in, out]), ``nn.Embedding``, ``nn.Conv2d`` and
            bitsandbytes' 4-bit ``Linear4bit`` become ``LoRALinear`` / ``LoRAEmbedding`` / ``LoRAConv2d`` /
            ``LoRALinear4bit`` sharing the original weight and bias (8-bit ``Linear8bitLt`` is refused).
        r, alpha: rank and alpha; scaling s = alpha / r (alpha / sqrt(r) with ``use_rslora``).
        dropout: dropout probability on the LoRA branch's input (not used by embeddings, as in PEFT).
        exclude_modules: names never to adapt (same rules as target_modules).
        rank_pattern, alpha_pattern: {regex: r} and {regex: alpha} overriding r and alpha per module.
        use_dora: DoRA on the linear layers (PEFT's ``use_dora``; a trained magnitude per output feature).
        lora_bias: a trained bias on lora_B of the linear layers (PEFT's ``lora_bias``); not with use_dora.

    Returns:
        ``model`` itself. Only the new lora_A / lora_B parameters (and those of fastlora layers already in the
        model) are trainable afterwards. A fresh adapter leaves the output unchanged (lora_B starts at zero for
        Linear and Conv2d, lora_A for Embedding).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_rank(r)
    check_alpha(alpha)
    check_dropout(dropout, "dropout")
    for arg, value in (("use_rslora", use_rslora), ("use_dora", use_dora), ("lora_bias", lora_bias)):
        if not isinstance(value, bool):
            raise TypeError(f"{arg} must be a bool, got {value!r}")
    if use_dora and lora_bias:
        raise ValueError("lora_bias=True cannot be combined with use_dora=True (PEFT refuses the pair too)")
    ranks = _check_pattern("rank_pattern", rank_pattern, check_rank)
    alphas = _check_pattern("alpha_pattern", alpha_pattern, check_alpha)
    targets = select_targets(model, target_modules, exclude_modules)
    names = [name for name, _ in targets]
    for arg, pattern in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        for key in pattern:
            if not any(re.match(rf"(.*\.)?({key})$", name) for name in names):
                raise ValueError(f"{arg} key {key!r} matches none of the adapted modules {names[:6]}")
    options = {"use_dora": use_dora, "lora_bias": lora_bias}
    plan = [
        (name, module, pattern_value(ranks, name, r), pattern_value(alphas, name, alpha),
         _options_for(module, name, options))
        for name, module in targets
    ]  # fmt: skip
    install_layers(model, plan, dropout, use_rslora)
    freeze_except_lora(model)
    return model


def _require_layers(model: nn.Module, fn: str) -> list[tuple[str, LoRALayer]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn} expects a torch.nn.Module, got {type(model).__name__}")
    found = lora_layers(model)
    if not found:
        raise ValueError(f"{fn}: {type(model).__name__} has no fastlora LoRA layers (apply_lora or load_adapter first)")
    return found


def _rebuild_base(layer: LoRALayer) -> nn.Module:
    """A plain module holding the layer's own weight and bias, for layers that were not built from a module."""
    base = kind_of_layer(layer).rebuild(layer)
    base.weight = layer.weight
    if getattr(layer, "bias", None) is not None:
        base.bias = layer.bias
    base.train(layer.training)
    return base


def base_module(layer: LoRALayer) -> nn.Module:
    """The plain module a layer wraps, holding the layer's base tensors: the module it was built from when it kept
    one (see ``swap_in``), else a new one of the same kind."""
    base = layer.__dict__.get(_BASE_ATTR)
    if base is None:
        return _rebuild_base(layer)
    for attr, tensor in _own_tensors(layer).items():
        if attr in base._parameters:
            setattr(base, attr, tensor)
    base.train(layer.training)
    return base


def _gather_layers(found: list[tuple[str, LoRALayer]]) -> dict[tuple[int, str], torch.Tensor]:
    """{(id(layer), name): whole tensor} of every sharded parameter (FSDP2's DTensor, DeepSpeed ZeRO-3) of the
    layers. A collective: every rank calls it and gets the whole tensors; nothing is changed yet."""
    return {
        (id(layer), attr): full_tensor(p).reshape(full_shape(p))
        for _, layer in found
        for attr, p in layer._parameters.items()
        if p is not None and is_sharded(p)
    }


def _adopt_gathered(found: list[tuple[str, LoRALayer]], whole: dict[tuple[int, str], torch.Tensor]):
    """The layers take the whole tensors in place of their sharded ones. The sharded parameters the training engine
    holds are left as they were; the layers (about to leave the model) no longer use them."""
    for _, layer in found:
        for attr, p in list(layer._parameters.items()):
            full = whole.get((id(layer), attr))
            if full is None:
                continue
            if attr == "weight":
                layer._adopt_weight(full)
            else:
                setattr(layer, attr, nn.Parameter(full, requires_grad=p.requires_grad))


def _untie(model: nn.Module, found: list[tuple[str, LoRALayer]]):
    """Gives each layer whose weight another module also uses (tied embeddings) its own copy before merging."""
    users = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for name, layer in found:
        if users[id(layer.weight)] > 1:
            warnings.warn(
                f"fastlora: {name}.weight is shared with another module (tied weights); merging gives {name} its own "
                "copy so that the other module keeps the base weight",
                stacklevel=3,
            )
            layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merges every fastlora layer (W += s * B A, in float32, rounded once) and puts plain modules back.

    Returns ``model`` with ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding`` / ``nn.Conv2d`` in place of the LoRA
    layers (the original module objects where available), holding the merged weights. A weight tied to another
    module is copied first, with a warning, so the other module is unchanged. If an adapter holds NaN or Inf or
    merging would overflow the weight's dtype, ValueError is raised and no weight is changed.

    Under FSDP2 or DeepSpeed ZeRO-3 call it on every rank once training is done: the sharded tensors are gathered
    first (a collective), and every rank gets plain modules with whole weights.
    """
    found = _require_layers(model, "merge_and_unload")
    whole = _gather_layers(found)
    for name, layer in found:
        for pname in layer.adapter_names:
            if not torch.isfinite(whole.get((id(layer), pname), getattr(layer, pname))).all():
                raise ValueError(f"merge_and_unload: {name}.{pname} holds NaN or Inf; nothing was merged")
    _adopt_gathered(found, whole)
    _untie(model, found)
    merged_here = []
    try:
        for _, layer in found:
            if not layer.merged:
                layer.merge(safe=True)
                merged_here.append(layer)
    except ValueError as err:
        for layer in merged_here:
            layer.unmerge()
        raise ValueError(f"merge_and_unload: {err}; no layer was merged") from None
    for name, layer in found:
        _replace(model, name, base_module(layer))
    return model


@torch.no_grad()
def unload(model: nn.Module) -> nn.Module:
    """Removes every fastlora layer without merging: the plain modules go back with their base weights.

    A merged layer is unmerged first (W -= s * B A), which restores W up to the rounding of its dtype.
    Under FSDP2 or DeepSpeed ZeRO-3 call it on every rank: the sharded tensors are gathered first (a collective),
    and every rank gets the original modules back with whole weights. Returns ``model``.
    """
    found = _require_layers(model, "unload")
    _adopt_gathered(found, _gather_layers(found))
    for name, layer in found:
        layer.unmerge()
        _replace(model, name, base_module(layer))
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Inside the block every fastlora layer computes its base op alone (the base model's output).

    Use it for reference-model losses (DPO and the like) without a second copy of the model. A merged layer is
    unmerged on its first call inside the block. The previous switch of each layer is restored on exit.
    """
    found = _require_layers(model, "disable_adapter")
    previous = [layer.disabled for _, layer in found]
    for _, layer in found:
        layer.disabled = True
    try:
        yield model
    finally:
        for (_, layer), flag in zip(found, previous, strict=True):
            layer.disabled = flag


class ParameterCount(NamedTuple):
    """Trainable and total parameter counts (tied parameters counted once)."""

    trainable: int
    total: int

    def __str__(self) -> str:
        percent = 100.0 * self.trainable / self.total if self.total else 0.0
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {percent:.4f}"


def print_trainable_parameters(model: nn.Module, print_fn=print) -> ParameterCount:
    """Prints one line like PEFT's and returns ``ParameterCount(trainable, total)``.

    ``print_fn=None`` returns the counts without printing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = list(model.parameters())
    count = ParameterCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    if print_fn is not None:
        print_fn(str(count))
    return count


# ----------------------------------------------------------------------------------------------------------
# PEFT conversion
# ----------------------------------------------------------------------------------------------------------


def _peft_skip_reason(module, adapter: str) -> str | None:
    kind = kind_for_peft_layer(module)
    if is_linear8bit(module):
        return f"{type(module).__module__}.{type(module).__name__}: {_EIGHT_BIT}"
    if kind is None:
        return f"{type(module).__module__}.{type(module).__name__} has no fastlora equivalent"
    base = module.base_layer
    reason = unsupported_reason("base_layer", base, None)
    if reason is not None:
        return f"its base layer cannot be wrapped: {reason}"
    if set(module.r) != {adapter}:
        return f"it holds the adapters {sorted(module.r)}, fastlora converts a layer with exactly {adapter!r}"
    options = _peft_options(module, adapter)
    refused = [key for key, on in options.items() if on and key not in kind.layer_class.options]
    if refused:
        flags = ", ".join(f"{key}=True" for key in refused)
        return f"it uses {flags}, which fastlora implements for Linear layers only, not for {type(base).__name__}"
    if options["use_dora"] and module.merged_adapters:
        return "its DoRA adapter is merged (unmerge it first: the merged weight hides the norm fastlora needs)"
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None and not options["use_dora"]:
        return f"it uses the LoRA variant {type(variant).__name__}"
    difference = kind.peft_difference(base)
    if difference is not None:
        return difference
    r, alpha, scaling = module.r[adapter], module.lora_alpha[adapter], module.scaling[adapter]
    if scaling not in (lora_scaling(r, alpha, False), lora_scaling(r, alpha, True)):
        return f"its scaling {scaling} is neither alpha/r nor alpha/sqrt(r) (changed with set_scale?)"
    return None


def _peft_options(module, adapter: str) -> dict:
    """PEFT's per-layer option flags of one adapter, under fastlora's option names."""
    return {
        "use_dora": bool(getattr(module, "use_dora", {}).get(adapter, False)),
        "lora_bias": bool(getattr(module, "lora_bias", {}).get(adapter, False)),
    }


@torch.no_grad()
def from_peft(peft_model: nn.Module) -> nn.Module:
    """Swaps PEFT's LoRA layers for fastlora layers in place, keeping the very same Parameter objects.

    Converts ``peft.tuners.lora.Linear`` (over ``nn.Linear`` or ``Conv1D``), ``Embedding``, ``Conv2d`` and
    ``bnb.Linear4bit`` (over bitsandbytes' ``Linear4bit``): the fastlora layer's ``weight``/``bias`` are the base
    layer's, its ``lora_A``/``lora_B`` are PEFT's parameters (so an optimizer built before the call keeps working),
    and so are a DoRA layer's magnitude (``lora_magnitude_vector``) and a ``lora_bias`` layer's lora_B bias. A layer
    that cannot be converted exactly (DoRA on an Embedding, a Conv2d or a 4-bit base, a merged DoRA layer, another
    variant, 8-bit or other base layers, a changed scaling) stays PEFT's, with a warning naming it.
    A model with more than one adapter, or more than one active adapter, is refused with ValueError.

    Returns ``peft_model``. Afterwards use fastlora's functions (``fl.disable_adapter``, ``fl.save_adapter``,
    ``fl.merge_and_unload``) on it; PEFT's own adapter methods no longer see the converted layers.
    """
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"from_peft expects a torch.nn.Module, got {type(peft_model).__name__}")
    try:
        from peft.tuners.lora import layer as plora
    except ImportError as err:
        raise ImportError("from_peft needs the peft package") from err
    configs = getattr(peft_model, "peft_config", None) or {}
    if len(configs) > 1:
        raise ValueError(
            f"from_peft converts a model with one adapter, this one has {sorted(configs)}; "
            "delete the others (delete_adapter) or merge them first"
        )
    found = [(name, m) for name, m in peft_model.named_modules() if isinstance(m, plora.LoraLayer)]
    if not found:
        raise ValueError(f"from_peft: {type(peft_model).__name__} has no PEFT LoRA layers")
    for name, module in found:
        if len(module.active_adapters) != 1:
            raise ValueError(
                f"from_peft: {name} has active adapters {list(module.active_adapters)}; fastlora layers hold exactly "
                "one adapter, so activate one (set_adapter) first"
            )
    plan = []
    for name, module in found:
        adapter = module.active_adapters[0]
        reason = _peft_skip_reason(module, adapter)
        if reason is not None:
            warnings.warn(f"fastlora.from_peft: {name} stays a PEFT layer: {reason}", stacklevel=2)
            continue
        plan.append((name, module, adapter))
    built = {}
    for name, module, adapter in plan:
        base = module.base_layer
        kind = kind_for_peft_layer(module)
        flags = [(p, p.requires_grad) for p in base.parameters()]
        r, alpha = module.r[adapter], module.lora_alpha[adapter]
        use_rslora = module.scaling[adapter] != lora_scaling(r, alpha, False)
        dropout_mod = module.lora_dropout[adapter] if adapter in module.lora_dropout else None
        dropout = float(dropout_mod.p) if isinstance(dropout_mod, nn.Dropout) else 0.0
        options = {key: on for key, on in _peft_options(module, adapter).items() if on}
        layer = build_layer(base, r, alpha, dropout, use_rslora, **options)
        for p, flag in flags:
            p.requires_grad_(flag)
        tensors = kind.peft_tensors(module, adapter)
        theirs = [tuple(full_shape(t)) for t in tensors.values()]
        ours = [tuple(full_shape(getattr(layer, attr))) for attr in tensors]
        if theirs != ours:
            warnings.warn(
                f"fastlora.from_peft: {name} stays a PEFT layer: its adapter shapes {', '.join(map(str, theirs))} "
                f"differ from fastlora's {', '.join(map(str, ours))}",
                stacklevel=2,
            )
            continue
        for attr, t in tensors.items():
            setattr(layer, attr, t)
        layer.merged = bool(module.merged_adapters)
        layer.disabled = bool(module.disable_adapters)
        layer.train(module.training)
        built[name] = layer
    for name, layer in built.items():
        swap_in(peft_model, name, layer)
    return peft_model
