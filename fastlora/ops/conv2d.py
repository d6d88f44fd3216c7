"""LoRA on a 2-D convolution: validation, the torch path, and the op (eager and compiled) over the Triton kernels.

x [Nb, C, H, W], W [O, C/groups, kh, kw], A [r, C, kh, kw] (applied with groups=1, as PEFT does), B [O, r, 1, 1].
As an implicit GEMM with rows m = (n, ho, wo), M = Nb*Ho*Wo, the linear formulas carry over:

    S  = conv(m * x, A)                        [M, r]   saved for backward, with x itself (an alias)
    Y  = conv(x, W) + s * conv1x1(S, B) + bias
    dS = s * dY B                              [M, r]
    dB = s * dY^T S                            [O, r]
    dA = dS^T im2col(m * x)                    [r, C, kh, kw]
    dX = conv_transpose(dY, W) + m * conv_transpose(dS, A)

Padding is carried as (top, bottom, left, right) (see fastlora.kernels.geometry).
"""

from __future__ import annotations

import torch

from fastlora.checks import (
    cached_check,
    check_dropout,
    check_lora_factors,
    check_same_device,
    check_same_dtype,
    check_tensor,
    warn_trainable_base,
)
from fastlora.kernels.geometry import conv2d_pads, input_grad, int_pair, memory_format, output_size
from fastlora.ops import backend
from fastlora.ops._define import Op
from fastlora.ops.backend import (
    HAS_TRITON,
    INTERPRET,
    autocast_enabled,
    autocast_inputs,
    draw_seed,
    dropout_scale,
    no_autocast,
)

if HAS_TRITON:
    from fastlora.kernels import conv2d as _kconv

__all__ = ["lora_conv2d", "check_conv2d", "CONV2D", "CONV_MAX_TRITON_RANK"]

# Rank above which the Triton conv kernels hand over to the torch path (their rank tile holds r whole).
CONV_MAX_TRITON_RANK = 64


@cached_check
def check_conv2d(x, weight, bias, lora_A, lora_B, scaling, stride, padding, dilation, groups, dropout_p):
    """Validate a lora_conv2d call; returns (stride, pads, dilation, groups) normalised."""
    check_tensor("x", x, ndim=4)
    check_tensor("weight", weight, ndim=4)
    check_tensor("lora_A", lora_A, ndim=4)
    check_tensor("lora_B", lora_B, ndim=4)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    nb, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    if c % groups or o % groups:
        raise ValueError(f"in_channels={c} and out_channels={o} must both be divisible by groups={groups}")
    if cg * groups != c:
        raise ValueError(
            f"x has {c} channels but weight of shape {tuple(weight.shape)} expects {cg * groups} (groups={groups})"
        )
    check_same_dtype("x", x, weight)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != o:
            raise ValueError(f"bias must have shape [{o}], got {tuple(bias.shape)}")
        check_same_dtype("bias", bias, weight)
    r = lora_A.shape[0]
    if r < 1 or tuple(lora_A.shape[1:]) != (c, kh, kw):
        raise ValueError(f"lora_A must have shape [r, {c}, {kh}, {kw}] with r >= 1, got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (o, r, 1, 1):
        raise ValueError(f"lora_B must have shape [{o}, {r}, 1, 1] to match lora_A, got {tuple(lora_B.shape)}")
    check_lora_factors(lora_A, lora_B, c * kh * kw, o, scaling, ndim=4)
    check_dropout(dropout_p)
    check_same_device(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    stride = int_pair("stride", stride, 1)
    dilation = int_pair("dilation", dilation, 1)
    pads = conv2d_pads(padding, (kh, kw), stride, dilation)
    ho, wo = output_size(h, w, (kh, kw), stride, pads, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(
            f"the input of spatial size {h}x{w} is smaller than the dilated kernel {kh}x{kw} "
            f"(dilation {dilation}, padding {pads}): the output would be {ho}x{wo}"
        )
    return stride, pads, dilation, groups


# ----------------------------------------------------------------------------------------------------------
# Torch path
# ----------------------------------------------------------------------------------------------------------


def _pad_extra(t, pads):
    """t padded with zeros at the bottom/right by what asymmetric pads add beyond the symmetric top/left pads."""
    extra_h, extra_w = pads[1] - pads[0], pads[3] - pads[2]
    if extra_h == 0 and extra_w == 0:
        return t
    return torch.nn.functional.pad(t, (0, extra_w, 0, extra_h))


def _weight_grad(dy, x, weight, stride, pads, dilation, groups):
    """dW of conv(x, W) (also dA of the LoRA branch's conv(m * x, A), with groups=1)."""
    return torch.ops.aten.convolution_backward(
        dy, _pad_extra(x, pads), weight, None, list(stride), [pads[0], pads[2]], list(dilation), False, [0, 0],
        groups, [False, True, False],
    )[1]  # fmt: skip


def _cpu_16bit(t) -> bool:
    """torch's CPU convolutions in bfloat16/float16 round between steps and, for some dilated and strided shapes,
    give wrong values: on the CPU the torch path computes those dtypes in float32 and rounds each output once."""
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)


def _float(t):
    return None if t is None else t.float()


def _to(t, dtype):
    return None if t is None else t.to(dtype)


def _torch_fwd(x, weight, bias, lora_A, lora_B, scaling, stride, pads, dilation, groups, dropout_p, seed):
    if _cpu_16bit(x):
        y, s = _torch_fwd(
            x.float(), weight.float(), _float(bias), lora_A, lora_B, scaling, stride, pads, dilation, groups,
            dropout_p, seed,
        )  # fmt: skip
        return y.to(x.dtype), s.to(x.dtype)
    dt = x.dtype
    conv = torch.nn.functional.conv2d
    sym = (pads[0], pads[2])
    x_lora = x if dropout_p == 0 else x * dropout_scale(seed, x, dropout_p)
    s4 = conv(_pad_extra(x_lora, pads), lora_A.to(dt), None, stride, sym, dilation)  # [Nb, r, Ho, Wo]
    y = conv(_pad_extra(x, pads), weight, bias, stride, sym, dilation, groups)
    y.add_(conv(s4, lora_B.to(dt)), alpha=scaling)
    y = y.contiguous(memory_format=memory_format(x))
    return y, s4.permute(0, 2, 3, 1).reshape(-1, lora_A.shape[0])


def _torch_bwd(
    dy, x, s, weight, lora_A, lora_B, scaling, stride, pads, dilation, groups, dropout_p, seed, need_dx, need_dbias
):
    if _cpu_16bit(dy):
        dx, da, db, dbias = _torch_bwd(
            dy.float(), x.float(), s.float(), weight.float(), lora_A, lora_B, scaling, stride, pads, dilation, groups,
            dropout_p, seed, need_dx, need_dbias,
        )  # fmt: skip
        return _to(dx, x.dtype), da, db, _to(dbias, dy.dtype)
    dt = dy.dtype
    nb, _, ho, wo = dy.shape
    r = lora_A.shape[0]
    a, b = lora_A.to(dt), lora_B.to(dt)
    s4 = s.reshape(nb, ho, wo, r).permute(0, 3, 1, 2)
    ds4 = torch.nn.functional.conv2d(dy, b.permute(1, 0, 2, 3)).mul_(scaling)  # [Nb, r, Ho, Wo]
    db = torch.einsum("nohw,nrhw->or", dy, s4).mul_(scaling).reshape(lora_B.shape)
    keep = dropout_scale(seed, x, dropout_p) if dropout_p > 0 else None
    da = _weight_grad(ds4, x if keep is None else x * keep, a, stride, pads, dilation, 1)
    dx = None
    if need_dx:
        dx_lora = input_grad(ds4, x, a, stride, pads, dilation, 1)
        dx = input_grad(dy, x, weight, stride, pads, dilation, groups)
        dx = dx.add_(dx_lora if keep is None else dx_lora.mul_(keep)).contiguous(memory_format=memory_format(x))
    dbias = dy.sum((0, 2, 3), dtype=torch.float32).to(dt) if need_dbias else None
    return dx, da.to(lora_A.dtype), db.to(lora_B.dtype), dbias


# ----------------------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------------------


def _out_shape(a):
    ho, wo = output_size(a.x.shape[2], a.x.shape[3], a.weight.shape[2:], a.stride, a.pads, a.dilation)
    return a.x.shape[0], a.weight.shape[0], ho, wo


def _path(a) -> bool:
    """Triton for float16/bfloat16 on CUDA (and every dtype under the interpreter, or when forced); the torch path
    otherwise. float32 on CUDA goes to cuDNN by default, which may use TF32 for convolutions where Triton's float32
    dot would run on plain FMA. Row indices are int32 inside the kernels: M and Nb*H*W stay below 2^31."""
    x = a.x
    if not backend.use_triton(x) or x.numel() == 0:
        return False
    if x.device.type == "cuda" and not INTERPRET and x.dtype == torch.float32 and backend.get_backend() == "auto":
        return False
    nb, _, ho, wo = _out_shape(a)
    rows = max(nb * ho * wo, x.shape[0] * x.shape[2] * x.shape[3])
    return a.lora_A.shape[0] <= CONV_MAX_TRITON_RANK and 0 < rows < 2**31


def _geometry(a) -> dict:
    return dict(scaling=a.scaling, stride=a.stride, pads=a.pads, dilation=a.dilation, groups=a.groups,
                dropout_p=a.dropout_p, seed=a.seed)  # fmt: skip


def _forward(a, triton):
    fwd = _kconv.lora_conv2d_fwd if triton else _torch_fwd
    return fwd(x=a.x, weight=a.weight, bias=a.bias, lora_A=a.lora_A, lora_B=a.lora_B, **_geometry(a))


def _backward(a, saved, grads, needs, triton):
    (s,), (dy,) = saved, grads
    need_dx, need_dw, need_dbias = needs[0], needs[1], needs[2]
    if a.x.shape[0] == 0:
        dx = torch.zeros_like(a.x) if need_dx else None
        dbias = dy.new_zeros(dy.shape[1]) if need_dbias else None
        da, db = torch.zeros_like(a.lora_A), torch.zeros_like(a.lora_B)
    else:
        bwd = _kconv.lora_conv2d_bwd if triton else _torch_bwd
        dx, da, db, dbias = bwd(
            dy=dy, x=a.x, s=s, weight=a.weight, lora_A=a.lora_A, lora_B=a.lora_B, **_geometry(a), need_dx=need_dx,
            need_dbias=need_dbias,
        )  # fmt: skip
    dw = None
    if need_dw:
        warn_trainable_base()
        dw = _weight_grad(dy, a.x, a.weight, a.stride, a.pads, a.dilation, a.groups)
    return dx, dw, dbias, da, db


def _fake(a):
    nb, o, ho, wo = _out_shape(a)
    y = torch.empty((nb, o, ho, wo), dtype=a.x.dtype, device=a.x.device, memory_format=memory_format(a.x))
    return y, a.x.new_empty(nb * ho * wo, a.lora_A.shape[0])


CONV2D = Op(
    "lora_conv2d",
    "Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, int[] stride, int[] pads, "
    "int[] dilation, int groups, float dropout_p, Tensor? seed",
    outputs=("y", "s"),
    differentiable=("x", "weight", "bias", "lora_A", "lora_B"),
    saved_outputs=("s",),
    saved_when_trained=("bias",),
    forward=_forward,
    backward=_backward,
    fake=_fake,
    path=_path,
)


def lora_conv2d(
    x, weight, bias, lora_A, lora_B, scaling, stride=1, padding=0, dilation=1, groups=1, dropout_p=0.0, training=True
):
    """LoRA Conv2d: Y = conv(x, W) + bias + s * conv1x1(conv(dropout(x), A), B).

    Args:
        x: input [Nb, C, H, W], float16, bfloat16 or float32; NCHW or channels_last (the output follows).
        weight: frozen base weight [O, C/groups, kh, kw], same dtype as x. bias: [O] or None.
        lora_A: [r, C, kh, kw], applied with the base's stride, padding and dilation and groups=1 (as PEFT does);
            lora_B: [O, r, 1, 1]; any float dtype (computed in x's dtype, gradients in their own).
        scaling: s, usually alpha / r.
        stride, dilation: int or pair. padding: int, pair, 'same' (stride 1 only) or 'valid'. groups: of the base.
        dropout_p: dropout probability on the LoRA branch's input, in [0, 1); applied only when training.

    Returns:
        Y [Nb, O, Ho, Wo] in x's dtype (the autocast dtype under ``torch.autocast``).

    Paths: float16/bfloat16 on CUDA run the Triton kernels (fastlora.kernels.conv2d); float32 on CUDA and CPU
    tensors run torch's convolutions with the same math, the same saved tensors (x and S [M, r]) and no stored mask.
    """
    stride, pads, dilation, groups = check_conv2d(
        x, weight, bias, lora_A, lora_B, scaling, stride, padding, dilation, groups, dropout_p
    )
    p = float(dropout_p) if training else 0.0
    seed = draw_seed(x) if p > 0 else None
    device_type = x.device.type
    if not autocast_enabled(device_type):  # the common case: no casts, no autocast context to enter
        return CONV2D(x, weight, bias, lora_A, lora_B, float(scaling), stride, pads, dilation, groups, p, seed)[0]
    x, weight, bias = autocast_inputs(x, weight, bias)
    with no_autocast(device_type):
        y, _ = CONV2D(x, weight, bias, lora_A, lora_B, float(scaling), stride, pads, dilation, groups, p, seed)
    return y
