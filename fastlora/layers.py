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

from fastlora.functional import _check_linear, check_dropout, lora_conv2d, lora_embedding, lora_linear, merge_delta_
from fastlora.reference import lora_scaling

__all__ = ["LoRALayer", "LoRALinear", "LoRAEmbedding", "LoRAConv2d"]


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


# ----------------------------------------------------------------------------------------------------------
# Embedding
# ----------------------------------------------------------------------------------------------------------


class LoRAEmbedding(LoRALayer):
    """LoRA on an Embedding: Y = W[idx] + s * A[:, idx]^T B^T.

    ``weight`` [V, D] is frozen; ``lora_A`` [r, V] and ``lora_B`` [D, r] are trained (PEFT's
    ``lora_embedding_A`` / ``lora_embedding_B``), initialised as PEFT does: A zero, B normal, so a fresh
    adapter leaves the model unchanged. The ``padding_idx`` column of A gets no gradient. The base module's
    ``max_norm``, ``scale_grad_by_freq`` and ``sparse`` are not supported (``from_module`` refuses them).
    """

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
        self._init_base(base.weight, base.padding_idx)
        self._init_lora(r, alpha, 0.0, use_rslora, (r, num_embeddings), (embedding_dim, r), self._factory())

    def _init_base(self, weight, padding_idx):
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.weight.requires_grad_(False)
        self.num_embeddings, self.embedding_dim = self.weight.shape
        self.padding_idx = padding_idx

    def _factory(self):
        return {"device": self.weight.device, "dtype": self.weight.dtype}

    @classmethod
    def from_module(cls, module: nn.Module, r: int = 8, alpha: float = 8, use_rslora: bool = False):
        """Wrap an ``nn.Embedding``; its weight is shared, not copied, and its padding_idx kept."""
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"LoRAEmbedding.from_module expects nn.Embedding, got {type(module).__name__}")
        unsupported = {
            "max_norm": module.max_norm is not None,
            "scale_grad_by_freq": module.scale_grad_by_freq,
            "sparse": module.sparse,
        }
        refused = [name for name, on in unsupported.items() if on]
        if refused:
            raise ValueError(
                f"LoRAEmbedding does not support an nn.Embedding with {', '.join(refused)} set; "
                "expected max_norm=None, scale_grad_by_freq=False and sparse=False"
            )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_base(module.weight, module.padding_idx)
        a_shape, b_shape = (r, layer.num_embeddings), (layer.embedding_dim, r)
        layer._init_lora(r, alpha, 0.0, use_rslora, a_shape, b_shape, layer._factory())
        return layer

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


class LoRAConv2d(LoRALayer):
    """LoRA on a Conv2d: Y = conv(x, W) + bias + s * conv1x1(conv(dropout(x), A), B).

    ``weight`` [O, C/groups, kh, kw] and ``bias`` [O] are frozen; ``lora_A`` [r, C, kh, kw] (the base's stride,
    padding and dilation, groups=1, as in PEFT) and ``lora_B`` [O, r, 1, 1] are trained. Only
    ``padding_mode='zeros'`` is supported; with ``groups > 1`` the layer trains but cannot merge (the delta
    B A spans all input channels, the grouped weight only C/groups of them).
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
        self._init_lora(r, alpha, dropout, use_rslora, *self._lora_shapes(r), self._factory())

    def _init_base(self, conv: nn.Conv2d):
        if conv.padding_mode != "zeros":
            raise ValueError(f"LoRAConv2d supports padding_mode='zeros' only, got padding_mode={conv.padding_mode!r}")
        self.weight = conv.weight
        self.weight.requires_grad_(False)
        if conv.bias is not None:
            self.bias = conv.bias
            self.bias.requires_grad_(False)
        else:
            self.register_parameter("bias", None)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.dilation = tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation)
        self.padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        self.groups = conv.groups

    def _lora_shapes(self, r):
        return (r, self.in_channels, *self.kernel_size), (self.out_channels, r, 1, 1)

    def _factory(self):
        return {"device": self.weight.device, "dtype": self.weight.dtype}

    @classmethod
    def from_module(cls, module: nn.Module, r: int = 8, alpha: float = 8, dropout: float = 0.0, use_rslora=False):
        """Wrap an ``nn.Conv2d`` (padding_mode 'zeros'); its weight and bias are shared, not copied."""
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"LoRAConv2d.from_module expects nn.Conv2d, got {type(module).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_base(module)
        layer._init_lora(r, alpha, dropout, use_rslora, *layer._lora_shapes(r), layer._factory())
        return layer

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
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.stride, self.padding,
            self.dilation, self.groups, self.lora_dropout, self.training,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, {super().extra_repr()}"
        )
