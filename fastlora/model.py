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
import copy
import re
import sys
import warnings
from collections import Counter
from typing import NamedTuple

import torch
import torch.nn as nn

from fastlora import experts as _experts
from fastlora.checks import check_alpha, check_dropout, check_rank
from fastlora.distributed import (
    fsdp_modules,
    fsdp_parameters_moving,
    full_shape,
    full_tensor,
    gathered,
    is_sharded,
    is_zero3,
)
from fastlora.grouping import attach_groups, sibling_groups
from fastlora.kinds import kind_for_module, kind_of_layer, kinds
from fastlora.layers import BASE_MODULE_ATTR, DEFAULT_ADAPTER, LoRALayer
from fastlora.peft import peft_model_of

__all__ = [
    "apply_lora",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "ModulesToSave",
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


def select_targets(
    model: nn.Module, target_modules, exclude_modules=None, layers_too: bool = False
) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs ``target_modules`` selects; raises if none, or if a selected one cannot be wrapped.

    Modules inside fastlora layers and modules_to_save wrappers are never selected. With ``layers_too`` a fastlora
    layer is selected as the module it wraps would be (``add_adapter`` puts a second adapter in it)."""
    spec = _check_name_spec("target_modules", target_modules, allow_none=False)
    exclude = _check_name_spec("exclude_modules", exclude_modules, allow_none=True)
    all_linear = isinstance(spec, str) and spec.lower() == ALL_LINEAR
    head = _output_head(model) if all_linear else None
    containers = tuple(f"{n}." for n, m in model.named_modules() if n and isinstance(m, (LoRALayer, ModulesToSave)))
    selected, refused = [], []
    for name, module in model.named_modules():
        if not name or name_matches(exclude, name) or name.startswith(containers):
            continue
        parent = _parent_of(model, name)
        probe = base_module(module) if layers_too and isinstance(module, LoRALayer) else module
        if all_linear:
            if module is head or isinstance(module, ModulesToSave):
                continue
            if not (_all_linear_kind(probe) or is_linear8bit(probe)) or isinstance(parent, nn.MultiheadAttention):
                continue
        elif not name_matches(spec, name):
            continue
        reason = unsupported_reason(name, probe, parent)
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


# ----------------------------------------------------------------------------------------------------------
# Adapters: settings, the model's record, modules_to_save and trainable flags
# ----------------------------------------------------------------------------------------------------------

# LoraConfig fields (and adapter_config.json keys) that change what an adapter computes and that fastlora does not
# implement: each must be falsy.
UNSUPPORTED_FIELDS = (
    "layer_replication",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "enable_lora",
    "layers_to_transform",
    "layers_pattern",
    "velora_config",
    "monteclora_config",
    "arrow_config",
    "kasa_config",
)
# init_lora_weights values that make a LoRA variant (a different forward or training rule), not just an init.
VARIANT_INITS = ("mica",)
BIAS_MODES = ("none", "all", "lora_only")
# apply_lora / add_adapter settings under PEFT's field names, with their defaults.
_DEFAULTS = {
    "target_modules": None,
    "target_parameters": None,
    "r": 8,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "use_rslora": False,
    "exclude_modules": None,
    "rank_pattern": None,
    "alpha_pattern": None,
    "use_dora": False,
    "lora_bias": False,
    "modules_to_save": None,
    "bias": "none",
    "task_type": None,
}


def _is_lora_config(value) -> bool:
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(value, peft.LoraConfig)


def unsupported_config_fields(config: dict) -> list[str]:
    """The fields of a LoRA config (as a dict) that fastlora does not implement, as ``field=value`` strings."""
    refused = [f"{key}={config[key]!r}" for key in UNSUPPORTED_FIELDS if config.get(key)]
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() in VARIANT_INITS:
        refused.append(f"init_lora_weights={init!r} (the {init} LoRA variant)")
    return refused


def _same(fn: str, a: str, b: str, first, second):
    if first is not None and second is not None and first != second:
        raise TypeError(f"{fn}: {a}={first!r} and {b}={second!r} name one setting (PEFT's name is {b}); pass one")
    return first if first is not None else second


def lora_settings(fn: str, config, given: dict) -> dict:
    """The adapter settings under PEFT's field names: from a ``LoraConfig`` or from keyword arguments (not both),
    the unset ones at their defaults."""
    explicit = {key: value for key, value in given.items() if value is not None}
    if config is None:
        return {**_DEFAULTS, **explicit}
    if not _is_lora_config(config):
        raise TypeError(f"{fn}: config must be a peft.LoraConfig, got {type(config).__name__}")
    if explicit:
        raise TypeError(f"{fn}: pass either a LoraConfig or keyword arguments, not both (got {sorted(explicit)})")
    fields = config.to_dict()
    refused = unsupported_config_fields(fields)
    init = fields.get("init_lora_weights", True)
    if init is not True and not refused:
        refused.append(f"init_lora_weights={init!r} (fastlora initialises as PEFT's default, True)")
    if refused:
        raise ValueError(f"{fn}: the LoraConfig sets {', '.join(refused)}, which fastlora does not implement")
    settings = {key: fields.get(key, default) for key, default in _DEFAULTS.items()}
    for key in ("target_modules", "exclude_modules", "modules_to_save"):
        if isinstance(settings[key], (set, frozenset)):
            settings[key] = sorted(settings[key])
    settings["task_type"] = getattr(settings["task_type"], "value", settings["task_type"])
    return settings


def call_settings(fn: str, config, target_modules, alphas: tuple, dropouts: tuple, **given) -> dict:
    """lora_settings of an apply_lora-style call: a LoraConfig passed as target_modules counts as ``config``, and
    (alpha, lora_alpha), (dropout, lora_dropout) are each one setting under two names."""
    if config is None and _is_lora_config(target_modules):
        config, target_modules = target_modules, None
    given["target_modules"] = target_modules
    given["lora_alpha"] = _same(fn, "alpha", "lora_alpha", *alphas)
    given["lora_dropout"] = _same(fn, "dropout", "lora_dropout", *dropouts)
    return lora_settings(fn, config, given)


def _check_settings(fn: str, s: dict, adapter_name):
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or "/" in adapter_name:
        raise ValueError(f"{fn}: adapter_name must be a non-empty name without '.' or '/', got {adapter_name!r}")
    check_rank(s["r"])
    check_alpha(s["lora_alpha"])
    check_dropout(s["lora_dropout"], "lora_dropout")
    for arg in ("use_rslora", "use_dora", "lora_bias"):
        if not isinstance(s[arg], bool):
            raise TypeError(f"{fn}: {arg} must be a bool, got {s[arg]!r}")
    if s["use_dora"] and s["lora_bias"]:
        raise ValueError("lora_bias=True cannot be combined with use_dora=True (PEFT refuses the pair too)")
    if s["bias"] not in BIAS_MODES:
        raise ValueError(f"{fn}: bias must be one of {', '.join(map(repr, BIAS_MODES))}, got {s['bias']!r}")
    if s["target_modules"] is None and s["target_parameters"] is None:
        raise TypeError(
            f"{fn}: target_modules is required (a list of names, a regex string or 'all-linear'), or "
            "target_parameters (expert weights of MoE models)"
        )


def adapter_record(model: nn.Module) -> dict:
    """{adapter: {"bias", "modules_to_save", "task_type"}} that apply_lora / add_adapter keep on the model."""
    return model.__dict__.setdefault("_fastlora_adapters", {})


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter the model holds (in fastlora layers or modules_to_save wrappers), in the order they came."""
    names = list(model.__dict__.get("_fastlora_adapters", {}))
    for _, module in model.named_modules():
        if isinstance(module, LoRALayer):
            held = module.adapters()
        elif isinstance(module, ModulesToSave):
            held = list(module.copies)
        else:
            continue
        names += [name for name in held if name not in names]
    return names


def active_adapter(model: nn.Module) -> str:
    """The model's active adapter: the one set last (apply_lora's, or set_adapter's)."""
    active = model.__dict__.get("_fastlora_active")
    if active is not None:
        return active
    return next((layer.active_adapter for _, layer in lora_layers(model) if not layer.idle), DEFAULT_ADAPTER)


class ModulesToSave(nn.Module):
    """PEFT's ``modules_to_save``: a trained copy of a module per adapter (``copies``) beside the frozen
    ``original_module``. The forward is the active adapter's copy, or the original while disabled or when the
    active adapter has no copy here. Saved adapters hold the copy's tensors under the module's own name.
    """

    def __init__(self, module: nn.Module, adapter: str):
        super().__init__()
        self.original_module = module
        self.copies = nn.ModuleDict()
        self.active_adapter = adapter
        self.disabled = False
        self.add_copy(adapter)

    def add_copy(self, adapter: str):
        self.copies[adapter] = copy.deepcopy(self.original_module)

    def current(self) -> nn.Module:
        if self.disabled or self.active_adapter not in self.copies:
            return self.original_module
        return self.copies[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks are the current module's (``lm_head.weight``, ``in_features``, ...)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "copies"):
                raise
            return getattr(self.current(), name)


def saved_modules(model: nn.Module) -> list[tuple[str, ModulesToSave]]:
    """Every modules_to_save wrapper of ``model`` with its dotted name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ModulesToSave)]


def _select_saved(model: nn.Module, spec, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs a modules_to_save list selects (PEFT's rule: a name or a dotted suffix)."""
    if spec is None:
        return []
    spec = _check_name_spec("modules_to_save", spec, allow_none=True)
    if isinstance(spec, str):
        spec = [spec]
    found = [(name, m) for name, m in model.named_modules() if name and name_matches(spec, name)]
    found = [(name, m) for name, m in found if not any(name.startswith(other + ".") for other, _ in found)]
    missing = [entry for entry in spec if not any(name_matches([entry], name) for name, _ in found)]
    if missing:
        raise ValueError(f"modules_to_save entries {missing} match no module of {type(model).__name__}")
    clash = [name for name, _ in found if any(t == name or t.startswith(name + ".") for t in targets)]
    if clash:
        raise ValueError(f"modules_to_save {clash} are (or hold) modules that target_modules also selects")
    return found


def _wrap_saved(model: nn.Module, found: list[tuple[str, nn.Module]], adapter: str):
    for name, module in found:
        if isinstance(module, ModulesToSave):
            module.add_copy(adapter)
        else:
            _replace(model, name, ModulesToSave(module, adapter))


def mark_trainable(model: nn.Module, trainable: bool = True):
    """requires_grad=True on what the active adapter trains (``trainable=False``: on nothing), False on every other
    parameter: the adapter tensors of each layer holding it, its modules_to_save copies, and the biases its
    ``bias`` mode names ("all": every bias outside the modules_to_save wrappers, "lora_only": the adapted
    layers')."""
    active = active_adapter(model)
    mode = adapter_record(model).get(active, {}).get("bias", "none")
    keep = set()
    for _, layer in lora_layers(model):
        if not layer.idle:
            keep.update(id(p) for p in layer.adapter_parameters())
            if mode == "lora_only" and getattr(layer, "bias", None) is not None:
                keep.add(id(layer.bias))
    wrappers = saved_modules(model)
    for _, wrapper in wrappers:
        if active in wrapper.copies:
            keep.update(id(p) for p in wrapper.copies[active].parameters())
    if mode == "all":
        inside = tuple(name + "." for name, _ in wrappers)
        keep.update(
            id(p) for n, p in model.named_parameters() if n.rpartition(".")[2] == "bias" and not n.startswith(inside)
        )
    keep.update(id(p) for p in _experts.adapter_parameters(model, active))  # LoRA on experts (fastlora.experts)
    for p in model.parameters():
        p.requires_grad_(trainable and id(p) in keep)


def _plan(model: nn.Module, s: dict, targets, parameter_keys=()) -> list:
    ranks = _check_pattern("rank_pattern", s["rank_pattern"], check_rank)
    alphas = _check_pattern("alpha_pattern", s["alpha_pattern"], check_alpha)
    names = [name for name, _ in targets] + list(parameter_keys)
    for arg, pattern in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        for key in pattern:
            if not any(re.match(rf"(.*\.)?({key})$", name) for name in names):
                raise ValueError(f"{arg} key {key!r} matches none of the adapted modules {names[:6]}")
    options = {"use_dora": s["use_dora"], "lora_bias": s["lora_bias"]}
    return [
        (name, module, pattern_value(ranks, name, s["r"]), pattern_value(alphas, name, s["lora_alpha"]),
         _options_for(module, name, options))
        for name, module in targets
    ]  # fmt: skip


def check_fuse(fn: str, fuse) -> None:
    if not isinstance(fuse, bool):
        raise TypeError(f"{fn}: fuse must be a bool, got {fuse!r}")


def _groupable(module: nn.Module, options: dict) -> bool:
    """Whether the layer built for ``module`` can join a sibling group (plain LoRA on a linear layer)."""
    return kind_for_module(module).layer_class.groupable and not options.get("use_dora")


def _check_bias_mode(model: nn.Module, fn: str, adapter: str, bias: str):
    others = {name: r["bias"] for name, r in adapter_record(model).items() if name != adapter and r["bias"] != "none"}
    if bias != "none" and others:
        raise ValueError(
            f"{fn}: adapter {adapter!r} sets bias={bias!r} while {others} already trains biases; biases are the base "
            "model's own, so only one adapter may train them (PEFT's rule)"
        )


def apply_lora(
    model: nn.Module,
    target_modules=None,
    r: int | None = None,
    alpha: float | None = None,
    dropout: float | None = None,
    use_rslora: bool | None = None,
    exclude_modules=None,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    use_dora: bool | None = None,
    lora_bias: bool | None = None,
    *,
    lora_alpha: float | None = None,
    lora_dropout: float | None = None,
    modules_to_save=None,
    bias: str | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
    config=None,
    target_parameters=None,
    fuse: bool = True,
) -> nn.Module:
    """Replaces the matching modules of ``model`` by fastlora layers in place and freezes everything else.

    Args:
        model: any ``nn.Module`` (a Hugging Face model, a PEFT-free training model, a plain conv net).
        target_modules: a list of names (exact or dotted suffix), a regex string (full match) or "all-linear".
            Matching ``nn.Linear``, GPT-2 ``Conv1D`` (weight [in, out]), ``nn.Embedding``, ``nn.Conv2d`` and
            bitsandbytes' 4-bit ``Linear4bit`` become ``LoRALinear`` / ``LoRAEmbedding`` / ``LoRAConv2d`` /
            ``LoRALinear4bit`` sharing the original weight and bias (8-bit ``Linear8bitLt`` is refused).
            A ``peft.LoraConfig`` here (or as ``config=``) gives every setting below under PEFT's names.
        r, alpha (or PEFT's ``lora_alpha``): rank (default 8) and alpha (default 8); scaling s = alpha / r
            (alpha / sqrt(r) with ``use_rslora``).
        dropout (or PEFT's ``lora_dropout``): dropout probability on the LoRA branch's input (default 0; not used
            by embeddings, as in PEFT).
        exclude_modules: names never to adapt (same rules as target_modules).
        rank_pattern, alpha_pattern: {regex: r} and {regex: alpha} overriding r and alpha per module.
        use_dora: DoRA on the linear layers (PEFT's ``use_dora``; a trained magnitude per output feature).
        lora_bias: a trained bias on lora_B of the linear layers (PEFT's ``lora_bias``); not with use_dora.
        modules_to_save: names of modules trained whole (PEFT's: each gets a trained copy per adapter, saved with
            the adapter; the original stays for ``disable_adapter``).
        bias: "none" (default), "all" (every bias of the model trains) or "lora_only" (the adapted layers' biases
            train); trained biases are saved with the adapter, as PEFT does, and stay changed when the adapter is
            disabled or unloaded (they are the base model's).
        adapter_name: the adapter's name (PEFT's ``adapter_name``, default "default"); more adapters come with
            ``add_adapter``.
        target_parameters: PEFT's ``target_parameters``: a list of parameter names (exact or dotted suffix, such as
            ``"mlp.experts.gate_up_proj"``) of 3-D expert weights of transformers MoE experts modules; each gets
            LoRA in PEFT's layout (fastlora.experts). target_modules may then be None. Not with dropout, use_dora
            or lora_bias (PEFT refuses them on parameters too); rank_pattern and alpha_pattern keys match the
            parameter names.
        fuse: group sibling linear layers that read one input (q/k/v, gate/up) into one op per call (default True;
            see ``fastlora.grouping``: found by one traced forward of a Hugging Face model's dummy inputs, else by
            name). Modules, parameters, state_dict and saved adapters are the same either way.

    Returns:
        ``model`` itself. Only what the new adapter trains (and the adapters of fastlora layers already in the
        model) is trainable afterwards. A fresh adapter leaves the output unchanged (lora_B starts at zero for
        Linear and Conv2d, lora_A for Embedding).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if peft_model_of(model, "apply_lora") is not None:
        raise ValueError(
            "apply_lora: this is a PEFT model; add adapters with its add_adapter (then fl.from_peft), or apply_lora "
            "to the plain model"
        )
    s = call_settings(
        "apply_lora", config, target_modules, (alpha, lora_alpha), (dropout, lora_dropout), r=r, use_rslora=use_rslora,
        exclude_modules=exclude_modules, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, use_dora=use_dora,
        lora_bias=lora_bias, modules_to_save=modules_to_save, bias=bias, target_parameters=target_parameters,
    )  # fmt: skip
    _check_settings("apply_lora", s, adapter_name)
    check_fuse("apply_lora", fuse)
    held = [name for name in adapter_names(model) if name != adapter_name]
    if held:
        raise ValueError(
            f"apply_lora: the model already holds the adapters {held}; add another with fl.add_adapter(model, "
            f"{adapter_name!r}, ...)"
        )
    _check_bias_mode(model, "apply_lora", adapter_name, s["bias"])
    only_parameters = s["target_parameters"] is not None and not s["target_modules"]  # PEFT's target_modules=[]
    targets = [] if only_parameters else select_targets(model, s["target_modules"], s["exclude_modules"])
    # LoRA on expert parameters (fastlora.experts): selected and checked here, installed with the layers
    experts = _experts.select(model, s) if s["target_parameters"] is not None else []
    keys = [t.key(p) for t in experts for p in t.parameters]
    saved = _select_saved(model, s["modules_to_save"], [name for name, _ in targets])
    plan = _plan(model, s, targets, keys)
    groupable = [name for name, module, _, _, options in plan if _groupable(module, options)]
    groups = sibling_groups(model, groupable) if fuse else []
    built = install_layers(model, plan, s["lora_dropout"], s["use_rslora"])
    for layer in built.values():
        layer.active_adapter = adapter_name
    attach_groups(model, groups)
    ranks, alphas = s["rank_pattern"] or {}, s["alpha_pattern"] or {}
    settings = {k: (pattern_value(ranks, k, s["r"]), pattern_value(alphas, k, s["lora_alpha"])) for k in keys}
    _experts.install(model, experts, settings, s["use_rslora"], adapter_name)
    _wrap_saved(model, saved, adapter_name)
    record = adapter_record(model)
    previous = record.get(adapter_name, {})
    record[adapter_name] = {
        "bias": s["bias"] if s["bias"] != "none" else previous.get("bias", "none"),
        "modules_to_save": sorted({*(previous.get("modules_to_save") or []), *(name for name, _ in saved)}) or None,
        "task_type": s["task_type"] or previous.get("task_type"),
    }
    model.__dict__["_fastlora_active"] = adapter_name
    mark_trainable(model)
    return model


def add_adapter(
    model: nn.Module,
    adapter_name: str,
    target_modules=None,
    r: int | None = None,
    alpha: float | None = None,
    dropout: float | None = None,
    use_rslora: bool | None = None,
    exclude_modules=None,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    use_dora: bool | None = None,
    lora_bias: bool | None = None,
    *,
    lora_alpha: float | None = None,
    lora_dropout: float | None = None,
    modules_to_save=None,
    bias: str | None = None,
    config=None,
) -> nn.Module:
    """Adds the adapter ``adapter_name`` to a model that has fastlora adapters, inactive and frozen (PEFT's
    ``add_adapter``): ``set_adapter`` activates it. Settings as in ``apply_lora``; targets may be modules that
    already are fastlora layers (they then hold both adapters) or plain ones. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if peft_model_of(model, "add_adapter") is not None:
        raise ValueError("add_adapter: this is a PEFT model; use its own add_adapter")
    _refuse_fsdp(model, "add_adapter")
    s = call_settings(
        "add_adapter", config, target_modules, (alpha, lora_alpha), (dropout, lora_dropout), r=r, use_rslora=use_rslora,
        exclude_modules=exclude_modules, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, use_dora=use_dora,
        lora_bias=lora_bias, modules_to_save=modules_to_save, bias=bias,
    )  # fmt: skip
    _check_settings("add_adapter", s, adapter_name)
    if s["target_parameters"] is not None:
        raise ValueError("add_adapter: target_parameters (LoRA on expert weights) takes one adapter, from apply_lora")
    existing = adapter_names(model)
    if not existing:
        raise ValueError("add_adapter: the model has no fastlora adapter yet; call apply_lora first")
    if adapter_name in existing:
        raise ValueError(f"add_adapter: the model already has an adapter named {adapter_name!r} (adapters: {existing})")
    _check_bias_mode(model, "add_adapter", adapter_name, s["bias"])
    targets = select_targets(model, s["target_modules"], s["exclude_modules"], layers_too=True)
    saved = _select_saved(model, s["modules_to_save"], [name for name, _ in targets])
    probes = [(name, base_module(m) if isinstance(m, LoRALayer) else m) for name, m in targets]
    plan = _plan(model, s, probes)
    layers = {name: m for name, m in targets if isinstance(m, LoRALayer)}
    fresh = [(name, module, rank, a, o) for name, module, rank, a, o in plan if name not in layers]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        sources = {
            name: build_layer(module, rank, a, s["lora_dropout"], s["use_rslora"], **o)
            for name, module, rank, a, o in plan if name in layers
        }  # fmt: skip
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    built = install_layers(model, fresh, s["lora_dropout"], s["use_rslora"])
    for name, source in sources.items():
        layers[name].hold_adapter(adapter_name, source)
    for layer in built.values():
        layer.active_adapter = adapter_name
        layer.idle = True
    _wrap_saved(model, saved, adapter_name)
    for _, wrapper in saved_modules(model):
        if wrapper.active_adapter not in wrapper.copies:
            wrapper.active_adapter = active_adapter(model)
    adapter_record(model)[adapter_name] = {
        "bias": s["bias"],
        "modules_to_save": sorted(name for name, _ in saved) or None,
        "task_type": s["task_type"],
    }
    mark_trainable(model)
    return model


def _refuse_fsdp(model: nn.Module, fn: str):
    """ValueError when FSDP2 shards ``model``: it manages exactly the parameters it was given, so adapters are added
    and deleted before ``fully_shard`` (switching between them works on the sharded model)."""
    if fsdp_modules(model):
        raise ValueError(
            f"{fn}: the model is sharded by FSDP2 (fully_shard), which manages exactly the parameters it was given; "
            f"{fn.split('_')[0]} adapters before fully_shard (set_adapter works on the sharded model)"
        )


def set_adapter(model: nn.Module, adapter_name: str, inference_mode: bool = False) -> nn.Module:
    """Makes ``adapter_name`` the active adapter of every fastlora layer and modules_to_save wrapper (PEFT's
    ``set_adapter``): layers that hold it compute with it, the others compute their base op, and its tensors are
    the trainable ones (none with ``inference_mode=True``). Merged layers are unmerged first. For a PEFT
    ``PeftModel`` this is PEFT's ``set_adapter``. Returns ``model``.
    """
    peft_model = peft_model_of(model, "set_adapter")
    if peft_model is not None:
        peft_model.set_adapter(adapter_name)
        return model
    names = adapter_names(model)
    if adapter_name not in names:
        raise ValueError(f"set_adapter: the model has no adapter named {adapter_name!r}; its adapters: {names}")
    with fsdp_parameters_moving(model):
        for _, layer in lora_layers(model):
            layer.set_adapter(adapter_name)
    for _, wrapper in saved_modules(model):
        wrapper.active_adapter = adapter_name
    _experts.set_adapter(model, adapter_name)
    model.__dict__["_fastlora_active"] = adapter_name
    mark_trainable(model, trainable=not inference_mode)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Deletes adapter ``adapter_name`` (PEFT's ``delete_adapter``): layers that held only it go back to their
    base modules, modules_to_save copies go. Deleting the active adapter activates the first remaining one, with a
    warning, as PEFT does; the last adapter cannot be deleted (``unload`` removes it). Returns ``model``.
    """
    peft_model = peft_model_of(model, "delete_adapter")
    if peft_model is not None:
        peft_model.delete_adapter(adapter_name)
        return model
    names = adapter_names(model)
    if adapter_name not in names:
        raise ValueError(f"delete_adapter: the model has no adapter named {adapter_name!r}; its adapters: {names}")
    _refuse_fsdp(model, "delete_adapter")
    if len(names) == 1:
        raise ValueError(f"delete_adapter: {adapter_name!r} is the model's only adapter; fl.unload removes it")
    active = active_adapter(model)
    if adapter_name == active:
        active = next(name for name in names if name != adapter_name)
        warnings.warn(
            f"fastlora: deleted the active adapter {adapter_name!r}; {active!r} is the active adapter now", stacklevel=2
        )
    for name, layer in lora_layers(model):
        if adapter_name in layer.adapters() and not layer.delete_adapter(adapter_name):
            layer.unmerge()
            _replace(model, name, base_module(layer))
    for name, wrapper in saved_modules(model):
        wrapper.copies.pop(adapter_name, None)
        if not wrapper.copies:
            _replace(model, name, wrapper.original_module)
    _experts.unload(model, adapter_name)
    adapter_record(model).pop(adapter_name, None)
    return set_adapter(model, active)


def _require_layers(model: nn.Module, fn: str) -> list[tuple[str, LoRALayer]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn} expects a torch.nn.Module, got {type(model).__name__}")
    found = lora_layers(model)
    if not found and not _experts.adapters(model):
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
def _merge_peft_layers(peft_model) -> bool:
    """For a sharded PEFT model, whose LoRA layers PEFT's merge reads whole: under DeepSpeed ZeRO-3 merges each
    layer's active adapters here, under a gather of the layer's tensors (a collective; rank 0's merged base weight
    is partitioned again), and returns True (the caller then unloads without merging again). ValueError under
    FSDP2: PEFT's merge cannot compute on the shards, and the base model it returns is not the module fully_shard
    wrapped. False for a model that is not sharded."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if fsdp_modules(peft_model):
        raise ValueError(
            "merge_and_unload: this PEFT model is sharded by FSDP2, and PEFT's merge works on whole tensors: save "
            "the adapter (fl.save_adapter gathers it) and merge it into the base model in one process"
        )
    tuners = [(name, m) for name, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer)]
    # PEFT merges the outermost ones (a layer such as MultiheadAttention merges what it holds)
    layers = [m for name, m in tuners if not any(name.startswith(f"{outer}.") for outer, _ in tuners)]
    if not any(is_zero3(p) for layer in layers for p in layer.parameters()):
        return False
    for layer in layers:
        with gathered(layer.parameters(), modify=True):
            layer.merge(safe_merge=True)
    return True


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merges every fastlora layer (W += s * B A, in float32, rounded once) and puts plain modules back.

    Returns ``model`` with ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding`` / ``nn.Conv2d`` in place of the LoRA
    layers (the original module objects where available), holding the merged weights. For a PEFT ``PeftModel``
    (converted by ``from_peft`` or not) it returns PEFT's ``merge_and_unload(safe_merge=True)``: the base model.
    A weight tied to another module is copied first, with a warning, so the other module is unchanged. If an adapter
    holds NaN or Inf or merging would overflow the weight's dtype, ValueError is raised and no weight is changed.

    Under FSDP2 or DeepSpeed ZeRO-3 call it on every rank once training is done: the sharded tensors are gathered
    first (a collective), and every rank gets plain modules with whole weights. A PEFT model under ZeRO-3 is merged
    layer by layer under a gather of the layer's tensors (PEFT's own merge reads the partitioned, empty ones), and
    its base model keeps partitioned weights; a PEFT model under FSDP2 is refused (see ``_merge_peft_layers``).
    """
    peft_model = peft_model_of(model, "merge_and_unload")
    if peft_model is not None:
        if _merge_peft_layers(peft_model):
            return _experts.release(peft_model.unload())
        return _experts.release(peft_model.merge_and_unload(safe_merge=True))
    layers = _require_layers(model, "merge_and_unload")
    whole = _gather_layers(layers)
    found = [(name, layer) for name, layer in layers if not layer.idle]
    for name, layer in found:
        for pname in layer.adapter_names:
            if not torch.isfinite(whole.get((id(layer), pname), getattr(layer, pname))).all():
                raise ValueError(f"merge_and_unload: {name}.{pname} holds NaN or Inf; nothing was merged")
    _experts.check_mergeable(model, "merge_and_unload")
    _adopt_gathered(layers, whole)
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
    _experts.merge_and_unload(model)
    _remove_adapters(model)
    return model


def _remove_adapters(model: nn.Module):
    """Puts back every fastlora layer's base module and, for each modules_to_save wrapper, the active adapter's
    trained copy (PEFT's rule; the original where the active adapter has none); forgets the adapters."""
    active = active_adapter(model)
    for name, layer in lora_layers(model):
        _replace(model, name, base_module(layer))
    for name, wrapper in saved_modules(model):
        _replace(model, name, wrapper.copies[active] if active in wrapper.copies else wrapper.original_module)
    model.__dict__.pop("_fastlora_adapters", None)
    model.__dict__.pop("_fastlora_active", None)


@torch.no_grad()
def unload(model: nn.Module) -> nn.Module:
    """Removes every fastlora layer without merging: the plain modules go back with their base weights.

    A merged layer is unmerged first (W -= s * B A), which restores W up to the rounding of its dtype. A
    modules_to_save wrapper gives way to the active adapter's trained copy (PEFT's rule); biases trained with
    ``bias="all"``/``"lora_only"`` stay trained (they are the base model's own).
    Under FSDP2 or DeepSpeed ZeRO-3 call it on every rank: the sharded tensors are gathered first (a collective),
    and every rank gets the original modules back with whole weights.
    Returns ``model``; for a PEFT ``PeftModel``, PEFT's ``unload()`` (the base model).
    """
    peft_model = peft_model_of(model, "unload")
    if peft_model is not None:
        return _experts.release(peft_model.unload())
    found = _require_layers(model, "unload")
    _adopt_gathered(found, _gather_layers(found))
    for _, layer in found:
        layer.unmerge()
    _experts.unload(model)
    _remove_adapters(model)
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Inside the block every fastlora layer computes its base op alone and every modules_to_save wrapper its
    original module (the base model's output).

    Use it for reference-model losses (DPO and the like) without a second copy of the model. A merged layer is
    unmerged on its first call inside the block. The previous switch of each layer is restored on exit.
    For a PEFT ``PeftModel`` this is PEFT's own ``disable_adapter()`` context.
    """
    peft_model = peft_model_of(model, "disable_adapter")
    if peft_model is not None:
        with peft_model.disable_adapter():
            yield model
        return
    found = [m for _, m in _require_layers(model, "disable_adapter")] + [m for _, m in saved_modules(model)]
    bias = adapter_record(model).get(active_adapter(model), {}).get("bias", "none")
    if bias != "none":
        warnings.warn(
            f"fastlora: the active adapter trains biases (bias={bias!r}); they are the base model's own, so the "
            "disabled model computes with the trained biases, not the original ones (as in PEFT)",
            stacklevel=3,
        )
    previous = [module.disabled for module in found]
    for module in found:
        module.disabled = True
    try:
        with _experts.disabled(model):
            yield model
    finally:
        for module, flag in zip(found, previous, strict=True):
            module.disabled = flag


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
