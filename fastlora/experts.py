"""LoRA on the experts of mixture-of-experts models: PEFT's ``target_parameters``, through the model's own code.

Since transformers v5 the experts of a MoE layer are 3-D Parameters (``gate_up_proj`` [E, 2I, H] and
``down_proj`` [E, H, I], or ``up_proj`` for experts without a gate) of one experts module whose forward dispatches
through ``transformers.integrations.moe.ExpertsInterface`` (``@use_experts_implementation``: Qwen2/3-MoE, Mixtral,
gpt-oss, DeepSeek-V2/V3, GLM-4 MoE, OLMoE and about 70 families in transformers 5.25). Module-based LoRA cannot
reach them; PEFT does with ``LoraConfig(target_parameters=[...])`` and a ``ParamWrapper`` per targeted parameter.

fastlora keeps PEFT's structure, shapes, initialisation and keys: per targeted parameter a wrapper around the
experts module (two targets on one module nest, the parameter registered first innermost, its keys with
``base_layer.``), lora_A [r E, in] expert-major and lora_B [out, r E] interleaved (see fastlora.reference_moe).
What differs is the compute: PEFT forms W + s B A for every expert on every call (a second copy of the expert
weights, kept for backward); fastlora computes the split form Y_e = X_e W_e^T + s (X_e A_e^T) B_e^T in a grouped
GEMM over the tokens sorted by expert (fastlora.ops.moe), and no tensor of one expert's out x in elements is formed.

How the model's own code stays in charge: fastlora registers an experts implementation in transformers'
``ExpertsInterface`` and switches the experts' config to it (``config._experts_implementation`` becomes
``"fastlora+<previous>"``). During a call through a wrapper, the wrapper *arms* its experts module with its adapter;
the fastlora implementation then runs the model's routing output through the grouped LoRA GEMMs, the module's own
``_apply_gate`` (or ``act_fn`` when it has no gate), its biases (``has_bias``), its layout (``is_transposed``) and
its ``post_expert_norm`` (``has_post_expert_norm``), and weights and sums the experts' outputs as transformers'
grouped path does. The router and top-k are the model's code, outside the experts module. An experts module that is
not armed (another layer, adapters disabled or merged, PEFT's own ``unload``) runs the previous implementation
unchanged, whatever it was ("eager", "grouped_mm", "batched_mm", ...); ``merge_and_unload`` and ``unload`` put the
previous name back.

``from_peft`` keeps PEFT's ParamWrapper objects (and so their Parameters, their keys and PEFT's own methods): they
get fastlora's forward by becoming ``PeftLoRAExperts``, a ParamWrapper subclass whose ``_activate_lora`` arms the
experts module instead of parametrizing its weight.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from fastlora.checks import FLOAT_DTYPES, check_alpha, check_rank
from fastlora.ops.backend import no_autocast
from fastlora.ops.merge import merge_delta_
from fastlora.ops.moe import experts_linear
from fastlora.reference import lora_scaling
from fastlora.reference_moe import expert_factors

__all__ = [
    "LoRAExperts",
    "ExpertsTarget",
    "AdapterEntry",
    "is_experts_module",
    "expert_parameter_names",
    "lora_experts_forward",
    "check_target_parameters",
    "check_options",
    "matches",
    "select_parameters",
    "install",
    "adapters",
    "has_adapters",
    "adapter_parameters",
    "parameter_key",
    "check_mergeable",
    "merge_and_unload",
    "unload",
    "disabled",
    "state_dict",
    "config_entries",
    "short_targets",
    "plan_names",
    "expected_shapes",
    "fill",
    "convert_peft_layer",
    "peft_wrapper_class",
    "select",
    "set_adapter",
    "release",
]

_IMPL = "fastlora"
_ARMED = "_fastlora_armed"  # in an experts module's __dict__: {parameter name: wrapper} during a wrapper's call
_REFUSED_OPTIONS = {"dropout": "lora_dropout != 0", "use_dora": "use_dora=True", "lora_bias": "lora_bias=True"}


# ----------------------------------------------------------------------------------------------------------
# Experts modules
# ----------------------------------------------------------------------------------------------------------


def is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module whose forward dispatches through the experts interface
    (a class decorated with ``@use_experts_implementation``, which records has_gate, has_bias, is_transposed and
    has_post_expert_norm on the instance)."""
    forward = getattr(type(module), "forward", None)
    flags = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "config")
    return getattr(forward, "__wrapped__", None) is not None and all(hasattr(module, f) for f in flags)


def expert_parameter_names(experts: nn.Module) -> tuple[str, str]:
    """The two expert weights of an experts module: (gate_up_proj or up_proj, down_proj)."""
    return ("gate_up_proj" if experts.has_gate else "up_proj", "down_proj")


def _not_expert_reason(module: nn.Module, name: str, param: torch.Tensor) -> str | None:
    if not is_experts_module(module):
        return (
            f"{type(module).__name__} is not a transformers experts module (a class whose forward dispatches through "
            "transformers' experts interface, @use_experts_implementation); fastlora puts LoRA on the 3-D expert "
            "weights of such modules only"
        )
    names = expert_parameter_names(module)
    if name not in names:
        return f"it is not an expert weight of {type(module).__name__} (those are {names[0]} and {names[1]})"
    if param.dim() != 3:
        return f"it is not a 3-D expert weight [E, ., .], got shape {tuple(param.shape)}"
    if type(param) is not nn.Parameter or param.dtype not in FLOAT_DTYPES:
        return f"it is a {type(param).__name__} of {param.dtype}, not a float16/bfloat16/float32 Parameter"
    return None


def _features(experts: nn.Module, name: str) -> tuple[int, int, int]:
    """(E, in_features, out_features) of an expert weight (PEFT's reading: [E, out, in], or [E, in, out] when the
    module is_transposed)."""
    num_experts, d1, d2 = getattr(experts, name).shape
    return (num_experts, d1, d2) if experts.is_transposed else (num_experts, d2, d1)


# ----------------------------------------------------------------------------------------------------------
# The experts implementation registered with transformers
# ----------------------------------------------------------------------------------------------------------


def _dispatch_name(previous: str | None) -> str:
    return _IMPL if previous is None else f"{_IMPL}+{previous}"


def _previous_name(name: str | None) -> str | None:
    """The implementation a fastlora name wraps (None: the module's own forward, without a config choice)."""
    return None if name == _IMPL else name.removeprefix(_IMPL + "+")


def _is_ours(name) -> bool:
    return isinstance(name, str) and (name == _IMPL or name.startswith(_IMPL + "+"))


def _ensure_dispatch(experts: nn.Module) -> None:
    """Switch the experts' config to fastlora's implementation (registered under ``fastlora+<previous>``), unless
    it already is: cheap enough for every call, so a config switched back by hand (``set_experts_implementation``)
    is taken over again rather than silently dropping the adapter, and a name that came back with a pickled model
    is registered again in this process."""
    from transformers.integrations.moe import ExpertsInterface

    config = experts.config
    current = config._experts_implementation
    name = current if _is_ours(current) else _dispatch_name(current)
    if name not in ExpertsInterface._global_mapping:
        ExpertsInterface.register(name, functools.partial(_fastlora_experts_forward, previous=_previous_name(name)))
    if name != current:
        config._experts_implementation_internal = name


def _restore_dispatch(experts: nn.Module) -> None:
    """Put the implementation fastlora's wraps back into the experts' config."""
    config = experts.config
    current = config._experts_implementation
    if _is_ours(current):
        config._experts_implementation_internal = _previous_name(current)


def _previous_forward(experts: nn.Module, previous: str | None):
    if previous is None or previous == "eager":
        return type(experts).forward.__wrapped__
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ALL_EXPERTS_FUNCTIONS[previous]


def _fastlora_experts_forward(experts, hidden_states, top_k_index, top_k_weights, *, previous):
    """The registered implementation: the LoRA experts path while a wrapper arms this module with an active
    adapter, the previous implementation otherwise."""
    armed = experts.__dict__.get(_ARMED)
    factors = {name: w.adapter() for name, w in armed.items() if w.active()} if armed else {}
    if not factors:
        return _previous_forward(experts, previous)(experts, hidden_states, top_k_index, top_k_weights)
    return lora_experts_forward(experts, hidden_states, top_k_index, top_k_weights, factors)


@contextlib.contextmanager
def _armed(experts: nn.Module, wrapper: nn.Module):
    """Within the block, the experts module computes with ``wrapper``'s adapter (see the module docstring)."""
    _ensure_dispatch(experts)
    armed = experts.__dict__.setdefault(_ARMED, {})
    armed[wrapper.parameter_name] = wrapper
    try:
        yield
    finally:
        armed.pop(wrapper.parameter_name, None)


def _project(experts, name, x, offsets, factors):
    """One expert projection over the sorted rows: the grouped GEMM with the LoRA term (if ``name`` has one)."""
    weight = getattr(experts, name)
    bias = getattr(experts, f"{name}_bias") if experts.has_bias else None
    lora_A, lora_B, scaling = factors.get(name, (None, None, 0.0))
    with no_autocast(x.device.type):  # computed in the weight's dtype, as transformers' grouped path does
        return experts_linear(x.to(weight.dtype), weight, bias, lora_A, lora_B, scaling, offsets, experts.is_transposed)


def lora_experts_forward(experts, hidden_states, top_k_index, top_k_weights, factors):
    """The experts block with LoRA on the weights named in ``factors`` ({name: (lora_A, lora_B, scaling)}).

    The routing is the model's: ``top_k_index`` [T, k] and ``top_k_weights`` [T, k] from its router. Rows are sorted
    by expert (offsets from a search of the sorted ids: no host sync), each projection is one grouped GEMM with its
    LoRA term, the module's own ``_apply_gate`` / ``act_fn``, biases and post-expert norm apply in between, and the
    weighted expert outputs are summed per token as transformers' grouped path does."""
    if getattr(experts, "_is_expert_parallel", False):
        raise ValueError(
            f"fastlora's LoRA on experts does not support expert parallelism yet ({type(experts).__name__} is "
            "sharded across ranks); run the model without expert parallelism"
        )
    up_name, down_name = expert_parameter_names(experts)
    num_experts = getattr(experts, up_name).shape[0]
    hidden = hidden_states.shape[-1]
    x_tokens = hidden_states.reshape(-1, hidden)
    top_k = top_k_index.shape[-1]
    ids = top_k_index.reshape(-1)
    sorted_ids, perm = torch.sort(ids, stable=True)
    offsets = torch.searchsorted(sorted_ids, torch.arange(num_experts, device=ids.device), right=True)
    x = x_tokens[perm // top_k]
    h = _project(experts, up_name, x, offsets, factors)
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    out = _project(experts, down_name, h, offsets, factors)
    if experts.has_post_expert_norm:
        out = experts.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return out[inverse].view(x_tokens.shape[0], top_k, hidden).sum(dim=1).to(hidden_states.dtype)


# ----------------------------------------------------------------------------------------------------------
# The wrappers: fastlora's own, and PEFT's ParamWrapper given fastlora's forward
# ----------------------------------------------------------------------------------------------------------


def _innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, _wrapper_types()):
        module = module.base_layer
    return module


class LoRAExperts(nn.Module):
    """LoRA on one 3-D expert weight of a transformers experts module, PEFT's ``ParamWrapper`` in fastlora.

    ``base_layer`` is the experts module, or another LoRAExperts around it (two targets on one module nest, as
    PEFT nests them). ``lora_A`` [r E, in] and ``lora_B`` [out, r E] are plain Parameters in PEFT's layout
    (A_e = lora_A.view(E, r, in)[e], B_e = lora_B.view(out, r, E)[:, :, e]) and initialisation (A kaiming-uniform,
    B zero, in the weight's dtype); the forward is the wrapped module's, with the adapter applied by fastlora's
    experts implementation. ``merge()`` adds s B_e A_e to every expert weight (float32, rounded once);
    ``unmerge()`` takes it out again; while ``disabled`` the module computes without the adapter, and so it does
    while ``idle`` (another of the model's named adapters is active: ``adapter_name`` is the one it holds).
    """

    def __init__(self, base_layer: nn.Module, parameter_name: str, r: int = 8, alpha: float = 8,
                 use_rslora: bool = False, adapter_name: str = "default"):  # fmt: skip
        super().__init__()
        check_rank(r)
        check_alpha(alpha)
        experts = _innermost(base_layer)
        reason = _not_expert_reason(experts, parameter_name, getattr(experts, parameter_name, None))
        if reason is not None:
            raise ValueError(f"LoRAExperts cannot adapt {parameter_name!r}: {reason}")
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        self.num_experts, self.in_features, self.out_features = _features(experts, parameter_name)
        self.r, self.lora_alpha, self.use_rslora = r, alpha, use_rslora
        self.adapter_name = adapter_name
        self.merged = False
        self.disabled = False
        self.idle = False
        weight = getattr(experts, parameter_name)
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r * self.num_experts, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r * self.num_experts, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def get_base_layer(self) -> nn.Module:
        """The experts module under every wrapper."""
        return _innermost(self)

    def adapter(self):
        """(lora_A, lora_B, scaling) of the adapter."""
        return self.lora_A, self.lora_B, self.scaling

    def active(self) -> bool:
        """Whether a call adds the adapter (not disabled, idle or merged)."""
        return not (self.disabled or self.idle or self.merged)

    def forward(self, *args, **kwargs):
        if (self.disabled or self.idle) and self.merged:
            self.unmerge()
        if not self.active():
            return self.base_layer(*args, **kwargs)
        with _armed(self.get_base_layer(), self):
            return self.base_layer(*args, **kwargs)

    @torch.no_grad()
    def merge(self, safe: bool = False):
        """W_e += s B_e A_e for every expert (float32, rounded once); with safe=True a non-finite result raises
        ValueError and W is untouched."""
        if self.merged:
            return
        if safe:
            _check_merge(self)
        _apply_delta(self, 1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W_e -= s B_e A_e: restores the expert weights up to the rounding of their dtype."""
        if not self.merged:
            return
        _apply_delta(self, -1.0)
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"parameter_name={self.parameter_name!r}, experts={self.num_experts}, in={self.in_features}, "
            f"out={self.out_features}, r={self.r}, alpha={self.lora_alpha}, adapter={self.adapter_name!r}, "
            f"merged={self.merged}"
        )


_PEFT_CLASS = None


def peft_wrapper_class() -> type:
    """``PeftLoRAExperts``: PEFT's ParamWrapper with fastlora's forward (made on first use, since PEFT is optional).

    Only ``_activate_lora`` changes: instead of registering a parametrization that forms W + s B A, it arms the
    experts module (module docstring), so PEFT's forward (its disable and merge logic), its adapters, merge,
    unmerge, save and load stay PEFT's. The class keeps PEFT's name ``ParamWrapper``, which PEFT's own code
    compares by name."""
    global _PEFT_CLASS
    if _PEFT_CLASS is not None:
        return _PEFT_CLASS
    from peft.tuners.lora.layer import ParamWrapper

    class PeftLoRAExperts(ParamWrapper):
        @contextlib.contextmanager
        def _activate_lora(self, active_adapters):
            with _armed(self.get_base_layer(), self):
                yield

        def _adapter_name(self) -> str | None:
            names = [a for a in self.active_adapters if a in self.lora_A]
            if len(names) > 1:
                raise ValueError(
                    f"fastlora computes one active adapter per expert weight; {self.parameter_name} has {names} "
                    "active (set_adapter one of them)"
                )
            return names[0] if names else None

        def adapter(self):
            name = self._adapter_name()
            return self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]

        def active(self) -> bool:
            return not (self.disable_adapters or self.merged) and self._adapter_name() is not None

    PeftLoRAExperts.__name__ = "ParamWrapper"
    PeftLoRAExperts.__qualname__ = "PeftLoRAExperts"
    PeftLoRAExperts.__module__ = __name__
    _PEFT_CLASS = PeftLoRAExperts
    return PeftLoRAExperts


def __getattr__(name: str):
    """``fastlora.experts.PeftLoRAExperts`` resolves (pickle looks classes up by module and name)."""
    if name == "PeftLoRAExperts":
        return peft_wrapper_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _wrapper_types() -> tuple[type, ...]:
    return (LoRAExperts,) if _PEFT_CLASS is None else (LoRAExperts, _PEFT_CLASS)


# ----------------------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------------------


def _merge_views(wrapper):
    """Per expert (W_e as [out, in] view, A_e [r, in], B_e [out, r]) and the scaling: merging is W_e += s B_e A_e."""
    experts = wrapper.get_base_layer()
    weight = getattr(experts, wrapper.parameter_name)
    lora_A, lora_B, scaling = wrapper.adapter()
    a, b = expert_factors(lora_A, lora_B, weight.shape[0])
    views = [(weight[e].t() if experts.is_transposed else weight[e], a[e], b[e]) for e in range(weight.shape[0])]
    return views, scaling


def _check_merge(wrapper, name: str | None = None):
    """ValueError if an adapter tensor holds NaN or Inf, or if merging would make an expert weight non-finite."""
    lora_A, lora_B, _ = wrapper.adapter()
    label = name or wrapper.parameter_name
    for attr, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{label}.{attr} holds NaN or Inf")
    views, scaling = _merge_views(wrapper)
    for e, (w, a, b) in enumerate(views):
        merged = w.float() + scaling * (b.float() @ a.float())
        if not (merged.abs() <= torch.finfo(w.dtype).max).all():
            raise ValueError(f"merging {label} would make expert {e}'s weight non-finite (NaN or Inf)")


def _apply_delta(wrapper, sign: float):
    views, scaling = _merge_views(wrapper)
    for w, a, b in views:
        merge_delta_(w, a, b, scaling, sign=sign)


# ----------------------------------------------------------------------------------------------------------
# Model level: selecting targets, installing, listing, merging, unloading, disabling
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ExpertsTarget:
    """One experts module to adapt: its dotted name in the model (its wrappers' outermost name), the module, and
    the parameter names to wrap in nesting order (innermost first: PEFT's, the order the module registered them)."""

    name: str
    experts: nn.Module
    parameters: list[str]

    def key(self, parameter: str) -> str:
        """The parameter's name in the model without wrappers (PEFT's key for target and pattern matching)."""
        return f"{self.name}.{parameter}" if self.name else parameter


def _strip_base_layer(name: str) -> str:
    parts = name.split(".")
    return ".".join(p for p in parts if p != "base_layer")


def _wrapped_names(model: nn.Module, name: str) -> tuple[list[str], bool]:
    """(parameter names already wrapped around the module at ``name``, whether a foreign wrapper is among them)."""
    module = model.get_submodule(name) if name else model
    names, foreign = [], False
    while hasattr(module, "base_layer") and hasattr(module, "parameter_name"):
        names.append(module.parameter_name)
        foreign = foreign or not isinstance(module, _wrapper_types())
        module = module.base_layer
    return names, foreign


def check_target_parameters(target_parameters) -> list[str]:
    """target_parameters as PEFT takes it: a list (or tuple, set) of non-empty names."""
    if isinstance(target_parameters, str) or not isinstance(target_parameters, (list, tuple, set, frozenset)):
        raise TypeError(
            f"target_parameters must be a list of parameter names (PEFT's rule: a name or a dotted suffix such as "
            f"'mlp.experts.gate_up_proj'), got {target_parameters!r}"
        )
    if not target_parameters or not all(isinstance(t, str) and t for t in target_parameters):
        raise ValueError(f"target_parameters must name at least one parameter, got {target_parameters!r}")
    return sorted(set(target_parameters))


def _named_parameters(model: nn.Module):
    """(key, owner, module, name, parameter) of every parameter, ``key`` its dotted name without wrappers (PEFT's
    target and pattern name) and ``owner`` its module's; wrappers' own tensors are left out."""
    for module_name, module in model.named_modules():
        if isinstance(module, _wrapper_types()):
            continue
        owner = _strip_base_layer(module_name)
        for name, param in module.named_parameters(recurse=False):
            yield (f"{owner}.{name}" if owner else name), owner, module, name, param


def matches(key: str, target_parameters) -> bool:
    """PEFT's rule: a parameter name matches an entry it equals or ends with at a dot."""
    return any(key == t or key.endswith("." + t) for t in target_parameters)


def select_parameters(model: nn.Module, target_parameters, skip_wrapped: bool = False) -> list[ExpertsTarget]:
    """The experts modules and parameters ``target_parameters`` selects, by PEFT's rule: a parameter matches when
    its name in the model (wrappers' ``base_layer`` left out) equals an entry or ends with ``"." + entry``.

    ValueError, naming them, for entries that match no parameter and for matched parameters that are not expert
    weights of a transformers experts module, or already have LoRA (left out instead with ``skip_wrapped``)."""
    targets = check_target_parameters(target_parameters)
    matched = {t: False for t in targets}
    selected: dict[str, ExpertsTarget] = {}
    refused = []
    for key, owner, module, pname, param in _named_parameters(model):
        hits = [t for t in targets if matches(key, [t])]
        if not hits:
            continue
        for t in hits:
            matched[t] = True
        reason = _not_expert_reason(module, pname, param)
        if reason is None and not owner:
            reason = "it belongs to the top-level module, which cannot be wrapped"
        if reason is None:
            wrapped, foreign = _wrapped_names(model, owner)
            if foreign:
                reason = "its module is wrapped by PEFT's LoRA (convert the model with fl.from_peft instead)"
            elif pname in wrapped and skip_wrapped:
                continue
            elif pname in wrapped:
                reason = "it already has a LoRA adapter"
        if reason is not None:
            refused.append(f"{key}: {reason}")
            continue
        selected.setdefault(owner, ExpertsTarget(owner, module, [])).parameters.append(pname)
    unmatched = [t for t, hit in matched.items() if not hit]
    if unmatched:
        raise ValueError(
            f"target_parameters entries {unmatched} match no parameter of {type(model).__name__} (PEFT's rule: a "
            "parameter's dotted name, such as 'model.layers.0.mlp.experts.gate_up_proj', must equal the entry or end "
            "with '.' + entry)"
        )
    if refused:
        listing = "; ".join(refused[:4]) + (f"; and {len(refused) - 4} more" if len(refused) > 4 else "")
        raise ValueError(f"target_parameters selects parameters fastlora cannot adapt: {listing}")
    return list(selected.values())


def check_options(dropout: float = 0.0, use_dora: bool = False, lora_bias: bool = False) -> None:
    """PEFT's refusals for expert parameters: no dropout, no DoRA, no lora_bias (ValueError naming the option)."""
    values = {"dropout": dropout, "use_dora": use_dora, "lora_bias": lora_bias}
    on = [label for key, label in _REFUSED_OPTIONS.items() if values[key]]
    if on:
        raise ValueError(
            f"LoRA on expert parameters (target_parameters) does not work with {', '.join(on)}, as in PEFT: "
            "dropout(x) cannot be factored out of x W_e^T, and DoRA and lora_bias are not defined for them"
        )


def select(model: nn.Module, settings: dict) -> list[ExpertsTarget]:
    """apply_lora's part for ``target_parameters`` (``settings``: its settings under PEFT's field names): the
    options PEFT refuses on parameters are refused, then the parameters are selected (select_parameters)."""
    check_options(settings["lora_dropout"], settings["use_dora"], settings["lora_bias"])
    return select_parameters(model, settings["target_parameters"])


def install(model: nn.Module, targets: list[ExpertsTarget], settings: dict, use_rslora: bool,
            adapter_name: str = "default") -> list[LoRAExperts]:  # fmt: skip
    """Wrap every selected parameter (``settings``: {parameter key: (r, alpha)}) with an adapter named
    ``adapter_name``; returns the new wrappers. The experts' configs switch to fastlora's implementation (module
    docstring)."""
    built = []
    plans = []
    for target in targets:  # build everything first: a bad setting raises before the model changes
        outer = model.get_submodule(target.name)
        chain = []
        for pname in target.parameters:
            r, alpha = settings[target.key(pname)]
            outer = LoRAExperts(outer, pname, r=r, alpha=alpha, use_rslora=use_rslora, adapter_name=adapter_name)
            outer.train(target.experts.training)
            chain.append(outer)
        plans.append((target, outer))
        built += chain
    for target, outer in plans:
        parent, _, child = target.name.rpartition(".")
        setattr(model.get_submodule(parent), child, outer)
        _ensure_dispatch(target.experts)
    return built


def _chains(model: nn.Module) -> list[tuple[str, list[nn.Module], nn.Module]]:
    """(outermost name, wrappers outermost first, experts module) for every experts module fastlora adapts."""
    wrapper_types = _wrapper_types()
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, wrapper_types):
            continue
        parent_name, _, child = name.rpartition(".")
        if child == "base_layer" and isinstance(model.get_submodule(parent_name), wrapper_types):
            continue  # an inner wrapper: part of its outer one's chain
        chain, inner = [], module
        while isinstance(inner, wrapper_types):
            chain.append(inner)
            inner = inner.base_layer
        out.append((name, chain, inner))
    return out


def adapters(model: nn.Module, adapter: str | None = None) -> list[tuple[str, nn.Module]]:
    """(dotted name, wrapper) of every expert adapter fastlora computes (its own wrappers, and PEFT's converted by
    from_peft), outer before inner: the names PEFT saves the adapter under. With ``adapter``: fastlora's wrappers
    of that named adapter only."""
    out = []
    for name, chain, _ in _chains(model):
        for depth, wrapper in enumerate(chain):
            if adapter is None or getattr(wrapper, "adapter_name", None) == adapter:
                out.append((name + ".base_layer" * depth, wrapper))
    return out


def has_adapters(model: nn.Module) -> bool:
    return bool(_chains(model))


def set_adapter(model: nn.Module, adapter: str) -> None:
    """fastlora's wrappers compute while ``adapter`` is the model's active adapter, and are idle otherwise."""
    for _, wrapper in adapters(model):
        if isinstance(wrapper, LoRAExperts):
            wrapper.idle = wrapper.adapter_name != adapter


def _tensors(wrapper) -> tuple[torch.Tensor, torch.Tensor]:
    lora_A, lora_B, _ = wrapper.adapter()
    return lora_A, lora_B


def adapter_parameters(model: nn.Module, adapter: str | None = None) -> list[torch.Tensor]:
    """lora_A and lora_B of every expert adapter (of fastlora's named ``adapter``): the tensors that train."""
    return [t for _, w in adapters(model, adapter) for t in _tensors(w)]


def check_mergeable(model: nn.Module, fn: str) -> None:
    """ValueError (nothing changed yet) if an expert adapter holds NaN or Inf or merging it would overflow."""
    for name, wrapper in adapters(model):
        try:
            _check_merge(wrapper, name)
        except ValueError as err:
            raise ValueError(f"{fn}: {err}; nothing was merged") from None


def _remove(model: nn.Module, name: str, experts: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, experts)
    experts.__dict__.pop(_ARMED, None)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> None:
    """Merge every expert adapter that computes (not idle) into its weight (W_e += s B_e A_e, float32, rounded once;
    check_mergeable first) and put the experts modules back in place of their wrappers, their configs'
    implementations restored: PEFT's merge_and_unload."""
    for name, chain, experts in _chains(model):
        for wrapper in chain:
            if not wrapper.merged and not getattr(wrapper, "idle", False):
                _apply_delta(wrapper, 1.0)
        _remove(model, name, experts)
        _restore_dispatch(experts)


@torch.no_grad()
def unload(model: nn.Module, adapter: str | None = None) -> None:
    """Put the experts modules back without merging (a merged adapter is taken out first), their configs'
    implementations restored: PEFT's unload. With ``adapter``: only the experts adapted by that named adapter
    (delete_adapter)."""
    for name, chain, experts in _chains(model):
        if adapter is not None and all(getattr(w, "adapter_name", None) != adapter for w in chain):
            continue
        for wrapper in chain:
            if wrapper.merged:
                wrapper.unmerge()
        _remove(model, name, experts)
        _restore_dispatch(experts)


def release(model: nn.Module) -> nn.Module:
    """After PEFT's own merge_and_unload or unload of a converted model: every experts module left without a
    wrapper gets its previous implementation back. Returns ``model``."""
    if isinstance(model, nn.Module):
        wrapped = {id(experts) for _, _, experts in _chains(model)}
        for module in model.modules():
            if is_experts_module(module) and id(module) not in wrapped:
                _restore_dispatch(module)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside the block every expert adapter is switched off (the base model's experts); the switches are restored
    on exit."""
    found = [w for _, w in adapters(model)]
    previous = [_disabled(w) for w in found]
    for w in found:
        _set_disabled(w, True)
    try:
        yield
    finally:
        for w, flag in zip(found, previous, strict=True):
            _set_disabled(w, flag)


def _disabled(wrapper) -> bool:
    return wrapper.disabled if isinstance(wrapper, LoRAExperts) else wrapper._disable_adapters


def _set_disabled(wrapper, flag: bool):
    if isinstance(wrapper, LoRAExperts):
        wrapper.disabled = flag
    else:
        wrapper._disable_adapters = flag


# ----------------------------------------------------------------------------------------------------------
# Adapter files (fastlora.io) and PEFT conversion (fastlora.model.from_peft)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class AdapterEntry:
    """What an adapter file says about one expert adapter: its parameter key (PEFT's target and pattern name),
    rank, alpha and rsLoRA switch, read from fastlora's wrapper or PEFT's."""

    key: str
    r: int
    lora_alpha: float
    use_rslora: bool
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False

    def extra_options(self) -> dict:
        return {}


def _settings(wrapper) -> tuple[int, float, bool]:
    if isinstance(wrapper, LoRAExperts):
        return wrapper.r, wrapper.lora_alpha, wrapper.use_rslora
    adapter = wrapper._adapter_name()
    return wrapper.r[adapter], wrapper.lora_alpha[adapter], bool(wrapper.use_rslora[adapter])


def parameter_key(name: str, wrapper) -> str:
    """The name (without wrappers) of the parameter that the wrapper at ``name`` adapts."""
    return f"{_strip_base_layer(name)}.{wrapper.parameter_name}"


def state_dict(model: nn.Module, prefix: str, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The expert adapters' tensors (of fastlora's named ``adapter``) under PEFT's keys,
    ``<prefix><wrapper name>.lora_A.weight`` [r E, in] and ``.lora_B.weight`` [out, r E] (the Parameters)."""
    out = {}
    for name, wrapper in adapters(model, adapter):
        lora_A, lora_B = _tensors(wrapper)
        out[f"{prefix}{name}.lora_A.weight"] = lora_A
        out[f"{prefix}{name}.lora_B.weight"] = lora_B
    return out


def config_entries(model: nn.Module, adapter: str | None = None) -> list[tuple[str, AdapterEntry]]:
    """(parameter key, entry) of every expert adapter, for the adapter config (target_parameters, r, lora_alpha,
    use_rslora, rank_pattern and alpha_pattern keyed by the parameter key, as PEFT matches them)."""
    out = []
    for name, wrapper in adapters(model, adapter):
        key = parameter_key(name, wrapper)
        r, alpha, rslora = _settings(wrapper)
        out.append((key, AdapterEntry(key, r, alpha, rslora)))
    return out


def short_targets(model: nn.Module, keys: list[str]) -> list[str]:
    """target_parameters for an adapter config: ``<module>.<parameter>`` suffixes (``experts.gate_up_proj``) when
    they select exactly ``keys`` by PEFT's rule, else the full keys."""
    short = sorted({".".join(k.split(".")[-2:]) for k in keys})
    hits = {key for key, *_ in _named_parameters(model) if matches(key, short)}
    return short if hits == set(keys) else sorted(keys)


def plan_names(targets: list[ExpertsTarget]) -> dict[str, str]:
    """{wrapper name: parameter key} of the wrappers ``install`` makes for ``targets`` on modules without wrappers:
    the outermost at the module's name, each inner one a ``.base_layer`` deeper (PEFT's nesting)."""
    out = {}
    for target in targets:
        for i, pname in enumerate(target.parameters):
            out[target.name + ".base_layer" * (len(target.parameters) - 1 - i)] = target.key(pname)
    return out


def expected_shapes(model: nn.Module, name: str, key: str, r: int) -> dict[str, tuple[int, ...]]:
    """{"lora_A": shape, "lora_B": shape} of the expert adapter at wrapper name ``name`` for parameter ``key``: the
    wrapper's own when it exists, else rank r's: [r E, in] and [out, r E]."""
    try:
        wrapper = model.get_submodule(name)
    except AttributeError:
        wrapper = None
    if isinstance(wrapper, _wrapper_types()):
        lora_A, lora_B = _tensors(wrapper)
        return {"lora_A": tuple(lora_A.shape), "lora_B": tuple(lora_B.shape)}
    owner, _, pname = key.rpartition(".")
    num_experts, in_features, out_features = _features(_innermost(model.get_submodule(owner)), pname)
    return {"lora_A": (r * num_experts, in_features), "lora_B": (out_features, r * num_experts)}


@torch.no_grad()
def fill(wrapper: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, alpha, use_rslora: bool):
    """Copy an adapter file's tensors and settings into an expert adapter (fastlora's wrapper or PEFT's)."""
    a, b = _tensors(wrapper)
    a.copy_(lora_A)
    b.copy_(lora_B)
    if isinstance(wrapper, LoRAExperts):
        wrapper.lora_alpha, wrapper.use_rslora = alpha, use_rslora
        return
    adapter = wrapper._adapter_name()
    r = wrapper.r[adapter]
    wrapper.lora_alpha[adapter], wrapper.use_rslora[adapter] = alpha, use_rslora
    wrapper.scaling[adapter] = lora_scaling(r, alpha, use_rslora)


def convert_peft_layer(name: str, module: nn.Module) -> bool:
    """from_peft's part for PEFT's ParamWrappers (target_parameters): True when ``module`` is one, then handled here.
    One over an expert weight of a transformers experts module becomes a PeftLoRAExperts (the same object, its class
    swapped: PEFT's adapters, Parameters and methods stay); any other keeps PEFT's forward, with a warning naming it.
    """
    if _PEFT_CLASS is not None and type(module) is _PEFT_CLASS:
        return True
    if type(module).__name__ != "ParamWrapper" or not type(module).__module__.startswith("peft.tuners.lora"):
        return False
    experts = module.get_base_layer()
    param = getattr(experts, module.parameter_name, None)
    reason = _not_expert_reason(experts, module.parameter_name, param) if param is not None else "it is missing"
    if reason is not None:
        warnings.warn(
            f"fastlora.from_peft: {name} (PEFT's target_parameters LoRA on {module.parameter_name}) keeps PEFT's "
            f"forward: {reason}",
            stacklevel=3,
        )
        return True
    module.__class__ = peft_wrapper_class()
    _ensure_dispatch(experts)
    return True
