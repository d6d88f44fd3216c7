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
import warnings
from collections import Counter
from typing import NamedTuple

import torch
import torch.nn as nn

from fastlora.checks import check_alpha, check_dropout, check_rank
from fastlora.kinds import kind_for_module, kind_of_layer, kinds
from fastlora.layers import BASE_MODULE_ATTR, LoRALayer
from fastlora.peft import peft_model_of

__all__ = [
    "apply_lora",
    "merge_and_unload",
    "unload",
    "disable_adapter",
    "print_trainable_parameters",
    "ParameterCount",
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


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    """Every fastlora layer in ``model`` with its dotted name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALayer)]


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
        _replace(model, name, layer)
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
    if peft_model_of(model, "apply_lora") is not None:
        raise ValueError(
            "apply_lora: this is a PEFT model; add adapters with its add_adapter (then fl.from_peft), or apply_lora "
            "to the plain model"
        )
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
    """The plain module a layer wraps: the original one when it still holds the layer's tensors."""
    base = layer.__dict__.get(_BASE_ATTR)
    bias = getattr(layer, "bias", None)
    if base is not None and base.weight is layer.weight and getattr(base, "bias", None) is bias:
        base.train(layer.training)
        return base
    return _rebuild_base(layer)


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
            own = nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)
            base = layer.__dict__.get(_BASE_ATTR)
            if base is not None and base.weight is layer.weight:
                base.weight = own
            layer.weight = own


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merges every fastlora layer (W += s * B A, in float32, rounded once) and puts plain modules back.

    Returns ``model`` with ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding`` / ``nn.Conv2d`` in place of the LoRA
    layers (the original module objects where available), holding the merged weights. For a PEFT ``PeftModel``
    (converted by ``from_peft`` or not) it returns PEFT's ``merge_and_unload(safe_merge=True)``: the base model.
    A weight tied to another module is copied first, with a warning, so the other module is unchanged. If an adapter
    holds NaN or Inf or merging would overflow the weight's dtype, ValueError is raised and no weight is changed.
    """
    peft_model = peft_model_of(model, "merge_and_unload")
    if peft_model is not None:
        return peft_model.merge_and_unload(safe_merge=True)
    found = _require_layers(model, "merge_and_unload")
    for name, layer in found:
        for pname in layer.adapter_names:
            if not torch.isfinite(getattr(layer, pname)).all():
                raise ValueError(f"merge_and_unload: {name}.{pname} holds NaN or Inf; nothing was merged")
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
    Returns ``model``; for a PEFT ``PeftModel``, PEFT's ``unload()`` (the base model).
    """
    peft_model = peft_model_of(model, "unload")
    if peft_model is not None:
        return peft_model.unload()
    found = _require_layers(model, "unload")
    for name, layer in found:
        layer.unmerge()
        _replace(model, name, base_module(layer))
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Inside the block every fastlora layer computes its base op alone (the base model's output).

    Use it for reference-model losses (DPO and the like) without a second copy of the model. A merged layer is
    unmerged on its first call inside the block. The previous switch of each layer is restored on exit.
    For a PEFT ``PeftModel`` this is PEFT's own ``disable_adapter()`` context.
    """
    peft_model = peft_model_of(model, "disable_adapter")
    if peft_model is not None:
        with peft_model.disable_adapter():
            yield model
        return
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

    ``print_fn=None`` returns the counts without printing. For a PEFT ``PeftModel`` the counts are PEFT's
    (``get_nb_trainable_parameters``, which counts a 4-bit weight's parameters, not its packed bytes).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    peft_model = peft_model_of(model, "print_trainable_parameters")
    if peft_model is not None:
        count = ParameterCount(*peft_model.get_nb_trainable_parameters())
    else:
        params = list(model.parameters())
        count = ParameterCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    if print_fn is not None:
        print_fn(str(count))
    return count
