"""Plain-PyTorch LoRA, written for clarity. This file is the specification.

Every kernel and every fast path in fastlora is tested against these functions (evaluated in float64
for error budgets), and the benchmarks use the ``PeftStyle*`` modules as the unfused baseline. The
conventions are PEFT's, so adapters move freely between the two libraries:

- ``lora_A`` maps the input down to rank ``r``; ``lora_B`` maps it back up. ``lora_B`` starts at zero,
  so a fresh adapter leaves the model unchanged.
- ``scaling`` is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
- Dropout applies to the input of the LoRA branch only, never to the base product. Functions here take
  the dropout as an explicit ``mask`` (0 for dropped elements, ``1 / (1 - p)`` for kept ones), so a test
  can feed the very mask a kernel drew.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "lora_scaling",
    "lora_linear_ref",
    "lora_embedding_ref",
    "lora_conv2d_ref",
    "linear_delta_weight",
    "embedding_delta_weight",
    "conv2d_delta_weight",
    "PeftStyleLinear",
    "PeftStyleEmbedding",
    "PeftStyleConv2d",
]


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The LoRA scaling factor s: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoRA rank r must be an int >= 1, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise TypeError(f"LoRA alpha must be a number, got {type(alpha).__name__}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_linear_ref(x, weight, bias, lora_A, lora_B, scaling, mask=None):
    """Y = x W^T + bias + s * ((mask * x) A^T) B^T.

    x [..., K], weight [N, K], bias [N] or None, lora_A [r, K], lora_B [N, r], mask like x or None.
    """
    base = F.linear(x, weight, bias)
    x_lora = x if mask is None else x * mask
    return base + scaling * F.linear(F.linear(x_lora, lora_A), lora_B)


def lora_embedding_ref(idx, weight, lora_A, lora_B, scaling, padding_idx=None):
    """Y = W[idx] + s * A[:, idx]^T B^T.

    idx [...] integer, weight [V, D], lora_A [r, V], lora_B [D, r]. padding_idx rows get no gradient.
    """
    base = F.embedding(idx, weight, padding_idx)
    after_a = F.embedding(idx, lora_A.t(), padding_idx)
    return base + scaling * (after_a @ lora_B.t())


def lora_conv2d_ref(x, weight, bias, lora_A, lora_B, scaling, stride=1, padding=0, dilation=1, groups=1, mask=None):
    """Y = conv(x, W) + bias + s * conv1x1(conv(mask * x, A), B).

    x [Nb, C, H, W], weight [O, C/groups, kh, kw], lora_A [r, C, kh, kw] (the base's stride, padding
    and dilation), lora_B [O, r, 1, 1].
    """
    base = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    x_lora = x if mask is None else x * mask
    down = F.conv2d(x_lora, lora_A, None, stride, padding, dilation)
    return base + scaling * F.conv2d(down, lora_B)


def linear_delta_weight(lora_A, lora_B, scaling):
    """The merged change to a Linear weight: s * B A  [N, K]."""
    return scaling * (lora_B @ lora_A)


def embedding_delta_weight(lora_A, lora_B, scaling):
    """The merged change to an Embedding weight: s * (B A)^T  [V, D]."""
    return scaling * (lora_B @ lora_A).t()


def conv2d_delta_weight(lora_A, lora_B, scaling):
    """The merged change to a Conv2d weight: s * B A with the kernel dims kept  [O, C, kh, kw]."""
    r = lora_A.shape[0]
    return scaling * (lora_B.reshape(-1, r) @ lora_A.reshape(r, -1)).reshape(lora_B.shape[0], *lora_A.shape[1:])


class PeftStyleLinear(nn.Module):
    """LoRA on a Linear the way PEFT computes it: four separate ops and a dropout module.

    The unfused baseline of the benchmarks; its parameters have the same names and shapes as fastlora's.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.base = base
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = lora_scaling(r, alpha, use_rslora)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling


class PeftStyleEmbedding(nn.Module):
    """LoRA on an Embedding the way PEFT computes it (A zero, B normal at initialisation)."""

    def __init__(self, base: nn.Embedding, r: int, alpha: float, use_rslora: bool = False):
        super().__init__()
        self.base = base
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.zeros(r, base.num_embeddings, **factory))
        self.lora_B = nn.Parameter(torch.randn(base.embedding_dim, r, **factory))
        self.scaling = lora_scaling(r, alpha, use_rslora)

    def forward(self, idx):
        after_a = F.embedding(idx, self.lora_A.t(), self.base.padding_idx)
        return self.base(idx) + (after_a @ self.lora_B.t()) * self.scaling


class PeftStyleConv2d(nn.Module):
    """LoRA on a Conv2d the way PEFT computes it: a conv down to rank r, then a 1x1 conv up."""

    def __init__(self, base: nn.Conv2d, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.base = base
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_channels, *base.kernel_size, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_channels, r, 1, 1, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = lora_scaling(r, alpha, use_rslora)

    def forward(self, x):
        b = self.base
        down = F.conv2d(self.dropout(x), self.lora_A, None, b.stride, b.padding, b.dilation)
        return b(x) + F.conv2d(down, self.lora_B) * self.scaling


# ----------------------------------------------------------------------------------------------------------
# DoRA and lora_bias on a Linear (PEFT's ``use_dora=True`` and ``lora_bias=True``)
# ----------------------------------------------------------------------------------------------------------

__all__ += ["dora_weight_norm_ref", "dora_linear_ref", "lora_linear_bias_ref"]


def dora_weight_norm_ref(weight, lora_A, lora_B, scaling):
    """n [N] = ||W + s B A|| per output row, formed the plain way (an N x K matrix), detached as PEFT does."""
    return torch.linalg.vector_norm(weight + scaling * (lora_B @ lora_A), dim=1).detach()


def dora_linear_ref(x, weight, bias, lora_A, lora_B, magnitude, scaling, mask=None):
    """DoRA on a Linear, exactly as PEFT's ``DoraLinearLayer`` computes it; c = g / n with n detached.

    x [..., K], weight [N, K], bias [N] or None, lora_A [r, K], lora_B [N, r], magnitude g [N], mask like x or None.

    - mask None (no dropout, or eval):  Y = c * (x W^T + s (x A^T) B^T) + bias
    - with a dropout mask, x_d = mask * x (PEFT applies dropout to the whole DoRA change W' - W):
      Y = x W^T + bias + (c - 1) * (x_d W^T) + c * s (x_d A^T) B^T
    """
    c = magnitude / dora_weight_norm_ref(weight, lora_A, lora_B, scaling)
    if mask is None:
        return c * (F.linear(x, weight) + scaling * F.linear(F.linear(x, lora_A), lora_B)) + (
            0.0 if bias is None else bias
        )
    x_d = x * mask
    return (
        F.linear(x, weight, bias)
        + (c - 1) * F.linear(x_d, weight)
        + c * scaling * F.linear(F.linear(x_d, lora_A), lora_B)
    )


def lora_linear_bias_ref(x, weight, bias, lora_A, lora_B, lora_bias, scaling, mask=None):
    """LoRA with PEFT's ``lora_bias=True``: lora_B is a Linear with a bias, scaled by s like the rest of the branch.

    Y = x W^T + bias + s * (((mask * x) A^T) B^T + lora_bias); lora_bias [N] (PEFT key ``lora_B.<adapter>.bias``).
    """
    x_lora = x if mask is None else x * mask
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x_lora, lora_A), lora_B, lora_bias)
