"""Drop-in LoRA layers. Each wraps a frozen base module's tensors (shared, not copied) and adds
``lora_A`` and ``lora_B`` as plain ``nn.Parameter`` in PEFT's shapes.

While merged (``merge()``), a layer computes the plain base op with ``W + s * delta``; ``unmerge()``
subtracts the delta again. While ``disabled`` it computes the base op alone.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastlora.checks import FLOAT_DTYPES, check_alpha, check_dropout, check_rank
from fastlora.distributed import full_shape, gathered
from fastlora.ops.conv2d import lora_conv2d
from fastlora.ops.dora import dora_weight_norm, lora_linear_dora
from fastlora.ops.embedding import lora_embedding
from fastlora.ops.group import GroupMember
from fastlora.ops.linear import check_linear, lora_linear
from fastlora.ops.linear4bit import check_linear4bit, lora_linear_4bit
from fastlora.ops.merge import merge_delta_, merge_dora_
from fastlora.reference import lora_scaling
from fastlora.reference_4bit import dequantize_4bit_ref

__all__ = ["LoRALayer", "LoRALinear", "LoRALinear4bit", "LoRAEmbedding", "LoRAConv2d", "is_gpt2_conv1d",
           "is_linear4bit", "grouped_lora_B", "AdapterSlot", "BASE_MODULE_ATTR", "DEFAULT_ADAPTER",
           "GROUP_ATTR"]  # fmt: skip

# The attribute (outside the module tree) under which a layer keeps the module it was built from, for unload.
# fastlora.model empties that module of the tensors the layer took over (so a sharded weight leaves no full copy
# behind) and gives them back on unload.
BASE_MODULE_ATTR = "_fastlora_base_module"
# The attribute (outside the module tree) under which a layer keeps the sibling group it belongs to
# (fastlora.grouping.SiblingGroup): the layers sharing its input that are computed with it as one op.
GROUP_ATTR = "_fastlora_group"
# The name of the adapter apply_lora makes unless told otherwise (PEFT's).
DEFAULT_ADAPTER = "default"
# What an adapter of a layer consists of besides its tensors (those are named by ``adapter_names``).
_ADAPTER_SETTINGS = ("r", "lora_alpha", "use_rslora", "lora_dropout", "adapter_names")


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _shared(t):
    """A base tensor as a frozen Parameter (the same object when it already is one)."""
    p = t if isinstance(t, nn.Parameter) else nn.Parameter(t)
    return p.requires_grad_(False)


class AdapterSlot(nn.Module):
    """An adapter a layer holds while another one is active: its tensors (the same Parameter objects, under the
    layer's attribute names), its settings and its options."""

    def __init__(self, layer: LoRALayer):
        super().__init__()
        for name in layer.adapter_names:
            self.register_parameter(name, layer._parameters[name])
        for key in _ADAPTER_SETTINGS:
            setattr(self, key, getattr(layer, key))
        self.options = layer.extra_options()
        self.fan_in_fan_out = getattr(layer, "fan_in_fan_out", False)

    def extra_options(self) -> dict:
        return dict(self.options)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.lora_alpha}, dropout={self.lora_dropout}"


class LoRALayer(nn.Module):
    """What every fastlora layer shares: rank, scaling, dropout, merge state and the adapter switch.

    A subclass says which modules it wraps (``base_type_error``, ``unsupported_reason``), takes over their tensors
    (``_init_base``), names its adapter tensors and their shapes (``adapter_shapes``) and how merging views them
    (``_merge_views``); ``from_module`` is the same for every kind.

    Named adapters (PEFT's semantics): the active adapter's tensors are the layer's own ``lora_A``, ``lora_B``, ...
    and its settings the layer's ``r``, ``lora_alpha``, ...; other adapters wait in ``lora_adapters`` (an
    ``nn.ModuleDict`` of :class:`AdapterSlot`, present only while there are any), costing no compute.
    ``set_adapter`` swaps the Parameter objects in and out (an optimizer keeps them); a layer that does not hold
    the model's active adapter is ``idle`` and computes its base op alone.
    """

    weight: nn.Parameter
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    # Whether the layer applies dropout on its LoRA branch (PEFT's embeddings do not).
    uses_dropout = True
    # The options (PEFT config flags) from_module takes besides r, alpha, dropout and use_rslora.
    options: tuple[str, ...] = ()
    # Whether layers of this kind can form sibling groups (fastlora.grouping): they then have ``group_member()``.
    groupable = False

    @classmethod
    def base_type_error(cls, module: nn.Module) -> str | None:
        """Why ``module`` is not of a type this layer wraps, or None."""
        raise NotImplementedError

    @classmethod
    def weight_reason(cls, module: nn.Module) -> str | None:
        """Why ``module``'s weight cannot serve as a base weight (apply_lora's rule), or None."""
        weight = module.weight
        if type(weight) is not nn.Parameter or weight.dtype not in FLOAT_DTYPES:
            return (
                f"its weight is a {type(weight).__name__} of {weight.dtype}, not a float16/bfloat16/float32 Parameter"
            )
        return None

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        """Why a module of the right type still cannot be wrapped (an option the layer does not implement), or None."""
        return None

    @classmethod
    def adapter_shapes(cls, module: nn.Module, r: int, **options) -> dict[str, tuple[int, ...]]:
        """{attribute: shape} of the adapter tensors a layer of rank r around ``module`` holds."""
        raise NotImplementedError

    @classmethod
    def from_module(
        cls, module: nn.Module, r: int = 8, alpha: float = 8, dropout: float = 0.0, use_rslora: bool = False, **options
    ):
        """Wrap ``module``; its weight and bias are shared (not copied) and frozen. ``options`` are the kind's own."""
        error = cls.base_type_error(module)
        if error is not None:
            raise TypeError(f"{cls.__name__}.from_module expects {error}, got {type(module).__name__}")
        reason = cls.unsupported_reason(module)
        if reason is not None:
            raise ValueError(f"{cls.__name__} does not support this {type(module).__name__}: {reason}")
        check_rank(r)
        for name in options:
            if name not in cls.options:
                known = ", ".join(cls.options) or "none"
                raise TypeError(f"{cls.__name__}.from_module takes no option {name!r}; its options: {known}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_base(module, **options)
        layer._init_lora(r, alpha, dropout, use_rslora, cls.adapter_shapes(module, r, **options))
        return layer

    def _init_base(self, module: nn.Module):
        raise NotImplementedError

    def _init_lora(self, r, alpha, dropout, use_rslora, shapes):
        check_rank(r)
        check_alpha(alpha)
        check_dropout(dropout, "dropout")
        self.r = r
        self.lora_alpha = alpha
        self.use_rslora = use_rslora
        self.lora_dropout = float(dropout) if self.uses_dropout else 0.0
        self.merged = False
        self.disabled = False
        self.active_adapter = DEFAULT_ADAPTER
        self.idle = False
        factory = {"device": self.weight.device, "dtype": self._adapter_dtype()}
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
        self.adapter_names = tuple(shapes)
        self.reset_lora_parameters()

    def _adapter_dtype(self) -> torch.dtype:
        """The dtype of new adapter tensors: the base weight's."""
        return self.weight.dtype

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trained tensors: lora_A, lora_B and the kind's extra ones (a DoRA magnitude, a lora_B bias)."""
        return [getattr(self, name) for name in self.adapter_names]

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def reset_lora_parameters(self):
        """PEFT's initialisation for Linear and Conv2d: A kaiming-uniform, B zero (the layer starts as the base)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _merge_views(self):
        """(W [N, K] view, A [r, K], B [N, r]) such that merging is W += s * B A."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, safe: bool = False):
        """W += s * B A, in float32, rounded once. With safe=True a non-finite result raises and W is untouched."""
        if self.merged:
            return
        self._apply_delta(1.0, safe)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W -= s * B A: restores the base weight up to the rounding of its dtype."""
        if not self.merged:
            return
        self._apply_delta(-1.0)
        self.merged = False

    def _apply_delta(self, sign: float, safe: bool = False):
        """Fold the adapter into the base tensors (sign +1) or take it out again (sign -1). Under DeepSpeed ZeRO-3 the
        layer's tensors are gathered for it (every rank calls it) and the result is partitioned again."""
        with gathered(self._parameters.values(), modify=True):
            self._fold_delta(sign, safe)

    def _fold_delta(self, sign: float, safe: bool):
        """``_apply_delta`` on whole tensors."""
        w, a, b = self._merge_views()
        merge_delta_(w, a, b, self.scaling, sign=sign, safe=safe)

    def _adopt_weight(self, weight: torch.Tensor):
        """Make ``weight`` (the whole base weight, gathered from its shards) the layer's frozen weight."""
        self.weight = _shared(weight)

    def extra_options(self) -> dict:
        """The options this layer was built with (from_module's keyword arguments beyond the common ones)."""
        return {}

    def _base_only(self) -> bool:
        if self.disabled and self.merged:
            self.unmerge()
        return self.merged or self.disabled or self.idle

    # Named adapters ---------------------------------------------------------------------------------------

    def adapters(self) -> list[str]:
        """The names of the adapters this layer holds, the active one first."""
        return [self.active_adapter, *self._modules.get("lora_adapters", {})]

    def adapter(self, name: str):
        """The holder of adapter ``name``: the layer itself when it is active, else its AdapterSlot."""
        return self if name == self.active_adapter else self.lora_adapters[name]

    def hold_adapter(self, name: str, source: LoRALayer):
        """Keeps the active adapter of ``source`` (a layer of the same kind around the same base) as the inactive
        adapter ``name``."""
        if name in self.adapters():
            raise ValueError(f"this layer already holds an adapter named {name!r}")
        if "lora_adapters" not in self._modules:
            self.lora_adapters = nn.ModuleDict()
        self.lora_adapters[name] = AdapterSlot(source)

    def set_adapter(self, name: str):
        """Makes ``name`` the active adapter (unmerging first); a layer without it becomes idle."""
        if name == self.active_adapter:
            self.idle = False
            return
        parked = self._modules.get("lora_adapters")
        if parked is None or name not in parked:
            self.idle = True
            return
        self.unmerge()
        slot = parked.pop(name)
        parked[self.active_adapter] = AdapterSlot(self)
        self._take(slot, name)
        self.idle = False

    def delete_adapter(self, name: str) -> bool:
        """Drops adapter ``name``; False when it was the layer's last one (the caller removes the layer). Deleting
        the active adapter makes another one active and the layer idle until the model sets its active adapter."""
        parked = self._modules.get("lora_adapters")
        if name != self.active_adapter:
            parked.pop(name)
        elif not parked:
            return False
        else:
            self.unmerge()
            successor = next(iter(parked))
            self._take(parked.pop(successor), successor)
            self.idle = True
        if parked is not None and not parked:
            del self.lora_adapters
        return True

    def _take(self, slot: AdapterSlot, name: str):
        for attr in self.adapter_names:
            if attr not in slot.adapter_names:
                self.register_parameter(attr, None)
        for attr in slot.adapter_names:
            self.register_parameter(attr, slot._parameters[attr])
        for key in _ADAPTER_SETTINGS:
            setattr(self, key, getattr(slot, key))
        self.active_adapter = name

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.lora_alpha}, dropout={self.lora_dropout}, merged={self.merged}"


class LoRALinear(LoRALayer):
    """LoRA on a Linear: Y = x W^T + bias + s * (dropout(x) A^T) B^T.

    ``weight`` [out, in] (or [in, out] with ``fan_in_fan_out``, as in GPT-2's Conv1D) and ``bias`` are
    frozen; ``lora_A`` [r, in] and ``lora_B`` [out, r] are trained. PEFT's options, with PEFT's semantics:

    - ``use_dora=True``: DoRA, Y = c * (x W^T + s (x A^T) B^T) + bias with c = g / ||W + s B A|| per output row
      (the norm detached; with dropout PEFT's form, see fastlora.ops.dora). ``lora_magnitude_vector`` g [out] is
      trained, initialised to the row norms of W.
    - ``lora_bias=True``: a bias on lora_B, ``lora_bias`` [out] (PEFT's ``lora_B.bias``), initialised to zero and
      scaled by s: Y = x W^T + bias + s * ((dropout(x) A^T) B^T + lora_bias). PEFT refuses it together with DoRA.

    Merging computes W <- W + s B A (DoRA: W <- c * (W + s B A), with c kept for ``unmerge``) and
    bias <- bias + s * lora_bias.
    """

    options = ("use_dora", "lora_bias")
    groupable = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        alpha: float = 8,
        dropout: float = 0.0,
        use_rslora: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
        fan_in_fan_out: bool = False,
        use_dora: bool = False,
        lora_bias: bool = False,
    ):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        shapes = self.adapter_shapes(base, r, use_dora=use_dora, lora_bias=lora_bias)
        weight = base.weight.t().contiguous() if fan_in_fan_out else base.weight
        self._set_base(weight, base.bias, fan_in_fan_out)
        self._init_options()
        self._init_lora(r, alpha, dropout, use_rslora, shapes)

    @classmethod
    def base_type_error(cls, module):
        return None if isinstance(module, nn.Linear) or is_gpt2_conv1d(module) else "nn.Linear or Conv1D"

    @staticmethod
    def _features(module) -> tuple[int, int]:
        """(in, out) of an nn.Linear or of a Conv1D (weight [in, out])."""
        shape = full_shape(module.weight)
        return tuple(shape) if is_gpt2_conv1d(module) else (shape[1], shape[0])

    @classmethod
    def adapter_shapes(cls, module, r, use_dora: bool = False, lora_bias: bool = False):
        for name, value in (("use_dora", use_dora), ("lora_bias", lora_bias)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        if use_dora and lora_bias:
            raise ValueError("lora_bias=True cannot be combined with use_dora=True (PEFT refuses the pair too)")
        k, n = cls._features(module)
        shapes = {"lora_A": (r, k), "lora_B": (n, r)}
        if use_dora:
            shapes["lora_magnitude_vector"] = (n,)
        if lora_bias:
            shapes["lora_bias"] = (n,)
        return shapes

    def _init_base(self, module, use_dora: bool = False, lora_bias: bool = False):
        self._set_base(module.weight, module.bias, is_gpt2_conv1d(module))
        self._init_options()

    def _init_options(self):
        """No magnitude and no lora_bias until _init_lora creates those the options ask for."""
        self.register_parameter("lora_magnitude_vector", None)
        self.register_parameter("lora_bias", None)
        self._dora_scale = None  # c [out] float32 while a DoRA layer is merged
        self._merged_bias = False  # whether merging lora_bias created the bias (the base layer had none)

    @property
    def use_dora(self) -> bool:
        return self._parameters["lora_magnitude_vector"] is not None

    def reset_lora_parameters(self):
        """PEFT's initialisation: A kaiming-uniform, B zero, lora_bias zero, g = ||W + s B A|| per row (= ||W||)."""
        super().reset_lora_parameters()
        if getattr(self, "lora_bias", None) is not None:
            nn.init.zeros_(self.lora_bias)
        if getattr(self, "lora_magnitude_vector", None) is not None:
            with torch.no_grad(), gathered([self.weight]):
                norm = dora_weight_norm(self.base_weight, self.lora_A, self.lora_B, self.scaling)
                self.lora_magnitude_vector.copy_(norm)

    def _set_base(self, weight, bias, fan_in_fan_out):
        self.fan_in_fan_out = fan_in_fan_out
        self.weight = _shared(weight)
        if bias is not None:
            self.bias = _shared(bias)
        else:
            self.register_parameter("bias", None)
        shape = full_shape(self.weight)
        self.out_features, self.in_features = reversed(shape) if fan_in_fan_out else shape

    @property
    def base_weight(self) -> torch.Tensor:
        """The base weight as [out, in] (a transposed view for fan_in_fan_out)."""
        weight = self._parameters["weight"]
        return weight.t() if self.fan_in_fan_out else weight

    def _merge_views(self):
        return self.base_weight, self.lora_A, self.lora_B

    def _fold_delta(self, sign, safe):
        w, a, b = self._merge_views()
        if self.use_dora:
            if sign > 0:
                c = self.lora_magnitude_vector.float() / dora_weight_norm(w, a, b, self.scaling)
                merge_dora_(w, a, b, self.scaling, c, sign=1.0, safe=safe)
                self._dora_scale = c
            else:
                merge_dora_(w, a, b, self.scaling, self._dora_scale, sign=-1.0)
                self._dora_scale = None
        else:
            merge_delta_(w, a, b, self.scaling, sign=sign, safe=safe)
        if self.lora_bias is not None:
            self._apply_lora_bias(sign)

    def _apply_lora_bias(self, sign):
        """bias += sign * s * lora_bias, in float32, rounded once; a base layer without a bias gets one while merged."""
        delta = self.lora_bias.float() * (sign * self.scaling)
        if self.bias is None:
            self.bias = _shared(delta.to(self.weight.dtype))
            self._merged_bias = True
        elif sign < 0 and self._merged_bias:
            self.register_parameter("bias", None)
            self._merged_bias = False
        else:
            self.bias.copy_(self.bias.float() + delta)

    def group_member(self) -> GroupMember | None:
        """This layer's arguments to a sibling group's op (fastlora.grouping), or None while it cannot take part
        (merged, disabled, idle, DoRA)."""
        if self._base_only() or self.use_dora:
            return None
        p = self.lora_dropout if self.training else 0.0
        return GroupMember(self.base_weight, self.bias, self.lora_A, self.lora_B, self.lora_bias, self.scaling, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.__dict__.get(GROUP_ATTR)
        if group is not None:
            y = group.output(self, x)
            if y is not None:
                return y
        if self._base_only():
            check_linear(x, self.base_weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.lora_dropout)
            return F.linear(x, self.base_weight, self.bias)
        if self.use_dora:
            return lora_linear_dora(
                x, self.base_weight, self.bias, self.lora_A, self.lora_B, self.lora_magnitude_vector, self.scaling,
                self.lora_dropout, self.training,
            )  # fmt: skip
        p = self._parameters  # one read: an attribute read of a parameter fails over to Module.__getattr__
        return lora_linear(
            x, self.base_weight, p["bias"], p["lora_A"], p["lora_B"], self.scaling, self.lora_dropout, self.training,
            lora_bias=p["lora_bias"],
        )  # fmt: skip

    def extra_options(self) -> dict:
        """The options this layer was built with (from_module's keyword arguments)."""
        return {"use_dora": self.use_dora, "lora_bias": self.lora_bias is not None}

    def extra_repr(self) -> str:
        flags = "".join(f", {name}=True" for name, on in self.extra_options().items() if on)
        return f"in_features={self.in_features}, out_features={self.out_features}, {super().extra_repr()}{flags}"


# ----------------------------------------------------------------------------------------------------------
# Linear over a bitsandbytes 4-bit weight (QLoRA)
# ----------------------------------------------------------------------------------------------------------


def is_linear4bit(module: nn.Module) -> bool:
    """bitsandbytes' ``Linear4bit`` (or a subclass that keeps its forward, such as ``LinearNF4``). False without
    importing bitsandbytes when nothing has imported it (then no module can be one)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return False
    base = bnb.nn.Linear4bit
    return isinstance(module, base) and type(module).forward is base.forward


class LoRALinear4bit(LoRALayer):
    """LoRA on a bitsandbytes ``Linear4bit`` (QLoRA): Y = x deq(W)^T + bias + s * (dropout(x) A^T) B^T.

    ``weight`` is the base module's ``Params4bit`` itself (the packed NF4/FP4 codes; its ``quant_state`` holds the
    block scales), shared and never dequantized into a lasting tensor; ``bias`` is the base's. ``lora_A`` [r, in]
    and ``lora_B`` [out, r] are float32, as PEFT makes them. As ``Linear4bit`` does, the input is cast to the base's
    ``compute_dtype`` (when set) and the output back to the input's dtype; the LoRA branch runs in the compute dtype.

    Merging follows PEFT: dequantize W, add s * B A in float32, quantize again with the same quant type, block size
    and double quantization. The merged weight carries a second 4-bit rounding (a warning says so), and unmerging
    (or ``unload`` after a merge) gives W back only up to that rounding.

    The layer keeps the ``QuantState`` and the storage dtype itself, outside the parameter: FSDP2 replaces the
    ``Params4bit`` by a plain sharded Parameter that carries neither (bitsandbytes' own ``Linear4bit`` keeps a copy
    on the module for the same reason). Under FSDP2 the packed bytes are sharded like any parameter, in their
    storage dtype (``bnb_4bit_quant_storage``: uint8, or bfloat16 to match the rest of the model); a mixed
    precision policy that casts them to another dtype would scramble the codes, and forward refuses that.
    """

    @classmethod
    def base_type_error(cls, module):
        return None if is_linear4bit(module) else "bitsandbytes.nn.Linear4bit"

    @classmethod
    def weight_reason(cls, module):
        if getattr(module.weight, "quant_state", None) is None:
            return (
                "its Params4bit weight is not quantized yet (bitsandbytes quantizes it when the module moves to a "
                "device: call .to(device) first, or load the model with a BitsAndBytesConfig)"
            )
        return None

    @classmethod
    def adapter_shapes(cls, module, r, **options):
        return {"lora_A": (r, module.in_features), "lora_B": (module.out_features, r)}

    def _init_base(self, module):
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacks the codes for its CPU inference kernel on an eval-mode call; its own state_dict
            # takes them back to the standard layout the same way
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        self._set_weight(weight)
        if module.bias is not None:
            self.bias = _shared(module.bias)
        else:
            self.register_parameter("bias", None)
        self.in_features, self.out_features = module.in_features, module.out_features
        self.compute_dtype = module.compute_dtype

    def _set_weight(self, weight):
        """``weight`` (a quantized Params4bit) becomes the layer's; its QuantState and storage dtype are kept too."""
        self.weight = _shared(weight)
        self._quant_state = weight.quant_state
        self._quant_storage = weight.dtype

    def _adopt_weight(self, weight):
        """The gathered packed bytes become a Params4bit again, with the QuantState the layer kept."""
        import bitsandbytes as bnb

        state = self._quant_state
        self.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_state=state, blocksize=state.blocksize,
            compress_statistics=state.nested, quant_type=state.quant_type, quant_storage=self._quant_storage,
            bnb_quantized=True,
        )  # fmt: skip

    def _adapter_dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def quant_state(self):
        """The bitsandbytes QuantState of the packed base weight: the Params4bit's own, or the one the layer kept
        when the weight is no longer a Params4bit (under FSDP2)."""
        own = getattr(self.weight, "quant_state", None)
        return own if own is not None else self._quant_state

    def _packed_weight(self):
        """(packed weight, QuantState) as forward uses them; ValueError when the bytes were cast to another dtype."""
        w = self.weight
        if w.dtype != self._quant_storage:
            raise ValueError(
                f"the packed 4-bit weight reached forward as {w.dtype}, but bitsandbytes stores it as "
                f"{self._quant_storage}: a cast (such as FSDP2's MixedPrecisionPolicy(param_dtype=...) on a float "
                "quant storage) scrambles the 4-bit codes. Quantize with bnb_4bit_quant_storage equal to the policy's "
                "param_dtype, or with uint8 storage (FSDP2 never casts integer parameters)"
            )
        state = self.quant_state
        if state.absmax.device != w.device:
            state.to(w.device)  # FSDP2 moved the parameter (to its mesh's device) but not the kept state
        return w, state

    def _base_forward(self, x: torch.Tensor, weight, state) -> torch.Tensor:
        import bitsandbytes as bnb

        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return bnb.matmul_4bit(x, weight, bias=bias, quant_state=state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        w, state = self._packed_weight()
        if self._base_only():
            check_linear4bit(x, w, state, self.bias, self.lora_A, self.lora_B, self.scaling, 0.0)
            y = self._base_forward(x, w, state)
        else:
            y = lora_linear_4bit(
                x, w, state, self.bias, self.lora_A, self.lora_B, self.scaling, self.lora_dropout, self.training,
            )  # fmt: skip
        return y.to(inp_dtype)

    @torch.no_grad()
    def merge(self, safe: bool = False):
        """W = quantize(deq(W) + s * B A) (see the class docstring); with safe=True a non-finite sum raises."""
        if self.merged:
            return
        self._requantize(1.0, safe)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W = quantize(deq(W) - s * B A): the base weight up to a second 4-bit rounding."""
        if not self.merged:
            return
        self._requantize(-1.0, False)
        self.merged = False

    def _requantize(self, sign: float, safe: bool):
        import bitsandbytes as bnb

        old = self.weight
        state = self.quant_state
        with gathered([old, self.lora_A, self.lora_B]):
            w = dequantize_4bit_ref(old.data, state).float()
            w.addmm_(self.lora_B.float(), self.lora_A.float(), alpha=sign * self.scaling)
        if safe and not torch.isfinite(w).all():
            raise ValueError("merging gives a non-finite weight")
        warnings.warn(
            "fastlora: merging a LoRA adapter into a 4-bit weight quantizes W + s * B A again, so the merged layer "
            "differs from the unmerged one by that rounding (as with PEFT)",
            stacklevel=3,
        )
        new = bnb.nn.Params4bit(
            w.to(state.dtype).cpu(), requires_grad=False, blocksize=state.blocksize, compress_statistics=state.nested,
            quant_type=state.quant_type, quant_storage=self._quant_storage,
        ).to(old.device)  # fmt: skip
        self._set_weight(new)

    def extra_repr(self) -> str:
        q = self.quant_state
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, quant_type={q.quant_type}, "
            f"{super().extra_repr()}"
        )


# ----------------------------------------------------------------------------------------------------------
# Embedding
# ----------------------------------------------------------------------------------------------------------


class LoRAEmbedding(LoRALayer):
    """LoRA on an Embedding: Y = W[idx] + s * A[:, idx]^T B^T.

    ``weight`` [V, D] is frozen; ``lora_A`` [r, V] and ``lora_B`` [D, r] are trained (PEFT's
    ``lora_embedding_A`` / ``lora_embedding_B``), initialised as PEFT does: A zero, B normal, so a fresh
    adapter leaves the model unchanged. The ``padding_idx`` column of A gets no gradient. The base module's
    ``max_norm``, ``scale_grad_by_freq`` and ``sparse`` are not supported (``from_module`` refuses them).
    A dropout given to ``from_module`` is checked and not used, as in PEFT.
    """

    uses_dropout = False

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int = 8,
        alpha: float = 8,
        use_rslora: bool = False,
        padding_idx: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        base = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx, device=device, dtype=dtype)
        self._init_base(base)
        self._init_lora(r, alpha, 0.0, use_rslora, self.adapter_shapes(base, r))

    @classmethod
    def base_type_error(cls, module):
        return None if isinstance(module, nn.Embedding) else "nn.Embedding"

    @classmethod
    def unsupported_reason(cls, module):
        unsupported = {
            "max_norm": module.max_norm is not None,
            "scale_grad_by_freq": module.scale_grad_by_freq,
            "sparse": module.sparse,
        }
        refused = [name for name, on in unsupported.items() if on]
        if refused:
            return (
                f"an nn.Embedding with {', '.join(refused)} set is not supported; "
                "expected max_norm=None, scale_grad_by_freq=False and sparse=False"
            )
        return None

    @classmethod
    def adapter_shapes(cls, module, r, **options):
        v, d = full_shape(module.weight)
        return {"lora_A": (r, v), "lora_B": (d, r)}

    def _init_base(self, module):
        self.weight = _shared(module.weight)
        self.num_embeddings, self.embedding_dim = full_shape(self.weight)
        self.padding_idx = module.padding_idx

    def reset_lora_parameters(self):
        """PEFT's initialisation for Embedding: A zero, B standard normal (the layer starts as the base)."""
        nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)

    def _merge_views(self):
        # W [V, D] += s * (B A)^T  is  W^T [D, V] += s * B A
        return self.weight.t(), self.lora_A, self.lora_B

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self._base_only():
            return F.embedding(input, self.weight, self.padding_idx)
        return lora_embedding(input, self.weight, self.lora_A, self.lora_B, self.scaling, self.padding_idx)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        lora = f"r={self.r}, alpha={self.lora_alpha}, merged={self.merged}"
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}, {lora}"


# ----------------------------------------------------------------------------------------------------------
# Conv2d
# ----------------------------------------------------------------------------------------------------------


def grouped_lora_B(lora_B: torch.Tensor, groups: int) -> torch.Tensor:
    """PEFT's grouped lora_B [O, r/groups, 1, 1] as the block-diagonal [O, r, 1, 1] weight of the same 1x1 conv
    (differentiable: the gradient of each block flows back to lora_B). ``lora_B`` itself when groups is 1."""
    if groups == 1:
        return lora_B
    o, rg = lora_B.shape[:2]
    blocks = lora_B.reshape(groups, o // groups, rg)
    return torch.block_diag(*blocks).view(o, groups * rg, 1, 1)


class LoRAConv2d(LoRALayer):
    """LoRA on a Conv2d: Y = conv(x, W) + bias + s * conv1x1(conv(dropout(x), A), B).

    ``weight`` [O, C/groups, kh, kw] and ``bias`` [O] are frozen; ``lora_A`` [r, C, kh, kw] (the base's stride,
    padding and dilation, groups=1, as in PEFT) and ``lora_B`` [O, r/groups, 1, 1] are trained. As in PEFT, lora_B
    is a 1x1 convolution with the base's groups (output channel o of group j reads the r/groups channels of S in
    group j), so r must be a multiple of groups; the op receives it as the block-diagonal [O, r, 1, 1] weight
    (``grouped_lora_B``). Only ``padding_mode='zeros'`` is supported; with ``groups > 1`` the layer trains but cannot
    merge (the delta B A spans all input channels, the grouped weight only C/groups of them).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        r: int = 8,
        alpha: float = 8,
        dropout: float = 0.0,
        use_rslora: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        base = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device=device, dtype=dtype
        )
        self._init_base(base)
        self._init_lora(r, alpha, dropout, use_rslora, self.adapter_shapes(base, r))

    @classmethod
    def base_type_error(cls, module):
        return None if isinstance(module, nn.Conv2d) else "nn.Conv2d"

    @classmethod
    def unsupported_reason(cls, module):
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
        return None

    @classmethod
    def adapter_shapes(cls, module, r, **options):
        if r % module.groups:
            raise ValueError(
                f"a LoRA rank of a Conv2d with groups={module.groups} must be a multiple of its groups (PEFT's rule: "
                f"lora_B is a grouped 1x1 convolution), got r={r}"
            )
        return {
            "lora_A": (r, module.in_channels, *module.kernel_size),
            "lora_B": (module.out_channels, r // module.groups, 1, 1),
        }

    def _init_base(self, conv: nn.Conv2d):
        self.weight = _shared(conv.weight)
        if conv.bias is not None:
            self.bias = _shared(conv.bias)
        else:
            self.register_parameter("bias", None)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.dilation = tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation)
        self.padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        self.groups = conv.groups

    def _merge_views(self):
        """W viewed [O, K], A [r, K], B [O, r], with K = C*kh*kw in W's memory order (NCHW or channels_last)."""
        if self.groups != 1:
            raise ValueError(
                f"cannot merge a LoRA adapter into a grouped convolution (groups={self.groups}): the delta B A "
                "spans all input channels, while the grouped weight holds only in_channels/groups of them"
            )
        o, r = self.out_channels, self.r
        w = self.weight
        if w.is_contiguous():
            return w.view(o, -1), self.lora_A.reshape(r, -1), self.lora_B.reshape(o, r)
        if w.is_contiguous(memory_format=torch.channels_last):
            w2 = w.permute(0, 2, 3, 1).view(o, -1)
            return w2, self.lora_A.permute(0, 2, 3, 1).reshape(r, -1), self.lora_B.reshape(o, r)
        raise ValueError(f"cannot merge into a conv weight with strides {w.stride()}: expected NCHW or channels_last")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._base_only():
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return lora_conv2d(
            x, self.weight, self.bias, self.lora_A, grouped_lora_B(self.lora_B, self.groups), self.scaling,
            self.stride, self.padding, self.dilation, self.groups, self.lora_dropout, self.training,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, {super().extra_repr()}"
        )
