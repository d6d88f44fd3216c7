"""Drop-in LoRA layers. Each wraps a frozen base module's tensors (shared, not copied) and adds
``lora_A`` and ``lora_B`` as plain ``nn.Parameter`` in PEFT's shapes.

While merged (``merge()``), a layer computes the plain base op with ``W + s * delta``; ``unmerge()``
subtracts the delta again. While ``disabled`` it computes the base op alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastlora.functional import _check_linear, check_dropout, lora_linear, merge_delta_
from fastlora.reference import lora_scaling

__all__ = ["LoRALayer", "LoRALinear"]


def _check_rank_alpha(r, alpha):
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoRA rank r must be an int >= 1, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise TypeError(f"LoRA alpha must be a number, got {type(alpha).__name__}")


class LoRALayer(nn.Module):
    """What every fastlora layer shares: rank, scaling, dropout, merge state and the adapter switch."""

    weight: nn.Parameter
    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def _init_lora(self, r, alpha, dropout, use_rslora, a_shape, b_shape, factory):
        _check_rank_alpha(r, alpha)
        check_dropout(dropout, "dropout")
        self.r = r
        self.lora_alpha = alpha
        self.use_rslora = use_rslora
        self.lora_dropout = float(dropout)
        self.merged = False
        self.disabled = False
        self.lora_A = nn.Parameter(torch.empty(a_shape, **factory))
        self.lora_B = nn.Parameter(torch.empty(b_shape, **factory))
        self.reset_lora_parameters()

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
        w, a, b = self._merge_views()
        merge_delta_(w, a, b, self.scaling, sign=1.0, safe=safe)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W -= s * B A: restores the base weight up to the rounding of its dtype."""
        if not self.merged:
            return
        w, a, b = self._merge_views()
        merge_delta_(w, a, b, self.scaling, sign=-1.0)
        self.merged = False

    def _base_only(self) -> bool:
        if self.disabled and self.merged:
            self.unmerge()
        return self.merged or self.disabled

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.lora_alpha}, dropout={self.lora_dropout}, merged={self.merged}"


class LoRALinear(LoRALayer):
    """LoRA on a Linear: Y = x W^T + bias + s * (dropout(x) A^T) B^T.

    ``weight`` [out, in] (or [in, out] with ``fan_in_fan_out``, as in GPT-2's Conv1D) and ``bias`` are
    frozen; ``lora_A`` [r, in] and ``lora_B`` [out, r] are trained.
    """

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
    ):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        weight = base.weight.t().contiguous() if fan_in_fan_out else base.weight
        self._init_base(weight, base.bias, fan_in_fan_out)
        self._init_lora(r, alpha, dropout, use_rslora, (r, in_features), (out_features, r), self._factory())

    def _init_base(self, weight, bias, fan_in_fan_out):
        self.fan_in_fan_out = fan_in_fan_out
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.weight.requires_grad_(False)
        if bias is not None:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
            self.bias.requires_grad_(False)
        else:
            self.register_parameter("bias", None)
        w = self.base_weight
        self.out_features, self.in_features = w.shape

    def _factory(self):
        return {"device": self.weight.device, "dtype": self.weight.dtype}

    @classmethod
    def from_module(cls, module: nn.Module, r: int = 8, alpha: float = 8, dropout: float = 0.0, use_rslora=False):
        """Wrap an ``nn.Linear`` (or a GPT-2 style ``Conv1D`` with weight [in, out]); its tensors are shared."""
        fan_in_fan_out = type(module).__name__ == "Conv1D" and hasattr(module, "nf")
        if not isinstance(module, nn.Linear) and not fan_in_fan_out:
            raise TypeError(f"LoRALinear.from_module expects nn.Linear or Conv1D, got {type(module).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_base(module.weight, module.bias, fan_in_fan_out)
        a_shape, b_shape = (r, layer.in_features), (layer.out_features, r)
        layer._init_lora(r, alpha, dropout, use_rslora, a_shape, b_shape, layer._factory())
        return layer

    @property
    def base_weight(self) -> torch.Tensor:
        """The base weight as [out, in] (a transposed view for fan_in_fan_out)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _merge_views(self):
        return self.base_weight, self.lora_A, self.lora_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._base_only():
            _check_linear(x, self.base_weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.lora_dropout)
            return F.linear(x, self.base_weight, self.bias)
        return lora_linear(
            x, self.base_weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.lora_dropout, self.training
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {super().extra_repr()}"
