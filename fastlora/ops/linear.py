"""LoRA on a linear layer: validation, the torch path, and the op (eager and compiled) over the Triton kernels.

x [..., K] (leading dims flattened to M rows), W [N, K], A [r, K], B [N, r], s the scaling and m [M, K] the dropout
mask (0 or 1/(1-p)), drawn from a seed and regenerated in backward, never stored:

    S  = (m * x) A^T            [M, r]   saved for backward, with x itself (an alias)
    Y  = x W^T + s * S B^T + bias'     bias' = bias + s * lora_bias (PEFT's ``lora_bias``: a bias on lora_B)
    dS = s * dY B               [M, r]
    dB = s * dY^T S             [N, r]
    dA = dS^T (m * x)           [r, K]
    dX = dY W + m * (dS A)      [M, K]
    dbias = rowsum_M(dY),  d lora_bias = s * rowsum_M(dY)   (one pass over dY serves both)

No gradient is formed for the frozen W (unless it requires grad, with a warning).
"""

from __future__ import annotations

import math

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
from fastlora.ops._define import Op
from fastlora.ops.backend import (
    HAS_TRITON,
    as_rows,
    autocast_dtype_for,
    autocast_enabled,
    autocast_inputs,
    draw_seed,
    dropout_scale,
    no_autocast,
    use_triton,
)

if HAS_TRITON:
    from fastlora.kernels import linear as _klinear
    from fastlora.kernels.launch import ReplaySlot

__all__ = ["lora_linear", "check_linear", "LINEAR"]


def check_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, lora_bias=None):
    """Validate a lora_linear call (ValueError/TypeError naming the argument); a call signature seen before (shapes,
    dtypes, devices, values, and whether autocast is on for x's device) costs a dictionary lookup."""
    autocasting = isinstance(x, torch.Tensor) and autocast_enabled(x.device.type)
    _check_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, lora_bias, autocasting)


@cached_check
def _check_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, lora_bias, autocasting):
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=2)
    check_tensor("lora_A", lora_A, ndim=2)
    check_tensor("lora_B", lora_B, ndim=2)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (its last is in_features)")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension must be in_features={k}, got x of shape {tuple(x.shape)}")
    if not autocasting:  # else autocast_inputs brings x, weight and bias to one dtype
        check_same_dtype("x", x, weight)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != n:
            raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
        if not autocasting:
            check_same_dtype("bias", bias, weight)
    check_lora_factors(lora_A, lora_B, k, n, scaling)
    if lora_bias is not None:
        check_tensor("lora_bias", lora_bias, ndim=1)
        if lora_bias.shape[0] != n:
            raise ValueError(
                f"lora_bias must have shape [{n}] (one entry per output feature), got {tuple(lora_bias.shape)}"
            )
    check_dropout(dropout_p)
    check_same_device(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, lora_bias=lora_bias)


# ----------------------------------------------------------------------------------------------------------
# Torch path (CPU, or when forced): the same math and saved tensors as the kernels
# ----------------------------------------------------------------------------------------------------------


def torch_fwd(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    dt = x2.dtype
    a, b = lora_A.to(dt), lora_B.to(dt)
    x_lora = x2 if dropout_p == 0 else x2 * dropout_scale(seed, x2, dropout_p)
    s = x_lora @ a.t()
    y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
    y.addmm_(s, b.t(), alpha=scaling)
    return y, s


def torch_bwd(dy, x2, s, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_dbias):
    dt = dy.dtype
    a, b = lora_A.to(dt), lora_B.to(dt)
    ds = torch.mm(dy, b).mul_(scaling)
    db = torch.mm(dy.t(), s).mul_(scaling)
    keep = dropout_scale(seed, x2, dropout_p) if dropout_p > 0 else None
    da = ds.t() @ (x2 if keep is None else x2 * keep)
    dx = None
    if need_dx:
        dx = torch.addmm(dy @ weight, ds, a) if keep is None else (dy @ weight).add_((ds @ a).mul_(keep))
    dbias = dy.sum(0, dtype=torch.float32) if need_dbias else None
    return dx, da.to(lora_A.dtype), db.to(lora_B.dtype), dbias


# ----------------------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------------------


def triton_path(a) -> bool:
    """Triton unless the device takes the torch path; shapes with a zero dimension take the torch path too."""
    return use_triton(a.x) and a.x.numel() > 0 and a.weight.shape[0] > 0


def effective_bias(bias, lora_bias, scaling, dtype):
    """bias + s * lora_bias in ``dtype`` (the layer bias with PEFT's lora_bias folded in); bias without lora_bias."""
    if lora_bias is None:
        return bias
    scaled = lora_bias.to(dtype) * scaling
    return scaled if bias is None else scaled.add_(bias)


def _forward(a, triton):
    x2 = as_rows(a.x)
    bias = effective_bias(a.bias, a.lora_bias, a.scaling, x2.dtype)
    if triton:
        replay = a.plan.forward if a.plan is not None else None
        y2, s = _klinear.lora_linear_fwd(
            x2, a.weight, bias, a.lora_A, a.lora_B, a.scaling, a.dropout_p, a.seed, replay=replay
        )
    else:
        y2, s = torch_fwd(x2, a.weight, bias, a.lora_A, a.lora_B, a.scaling, a.dropout_p, a.seed)
    return (y2 if x2 is a.x else y2.reshape(*a.x.shape[:-1], a.weight.shape[0])), s


def bias_grads(dbias_sum, bias, lora_bias, scaling, need_dbias, need_dlb):
    """(dbias, d lora_bias) from rowsum_M(dY) (float32 or dY's dtype): dbias = rowsum, d lora_bias = s * rowsum."""
    dbias = dbias_sum.to(bias.dtype) if need_dbias and bias is not None else None
    dlb = (dbias_sum.float() * scaling).to(lora_bias.dtype) if need_dlb and lora_bias is not None else None
    return dbias, dlb


def _backward(a, saved, grads, needs, triton):
    (s,), (dy,) = saved, grads
    need_dx, need_dw, need_dbias, need_dlb = needs[0], needs[1], needs[2], needs[5]
    need_sum = need_dbias or need_dlb
    x2, dy2 = as_rows(a.x), as_rows(dy).contiguous()
    if x2.shape[0] == 0:
        dx = x2.new_empty(x2.shape) if need_dx else None
        dsum = dy2.new_zeros(dy2.shape[1]) if need_sum else None
        da, db = torch.zeros_like(a.lora_A), torch.zeros_like(a.lora_B)
    else:
        args = (a.weight, a.lora_A, a.lora_B, a.scaling, a.dropout_p, a.seed, need_dx, need_sum)
        if triton:
            replay = a.plan.backward(need_dx, dy2, x2, a.weight, a.lora_A, a.lora_B) if a.plan is not None else None
            dx, da, db, dsum = _klinear.lora_linear_bwd(dy2, x2, s, *args, replay=replay)
        else:
            dx, da, db, dsum = torch_bwd(dy2, x2, s, *args)
    dbias, dlb = bias_grads(dsum, a.bias, a.lora_bias, a.scaling, need_dbias, need_dlb)
    dw = weight_grad(dy2, x2, a.weight) if need_dw else None
    if dx is not None and dx.dim() != a.x.dim():
        dx = dx.reshape(a.x.shape)
    return dx, dw, dbias, da, db, dlb


def weight_grad(dy2, x2, weight):
    """dW = dY^T x for a base weight that requires grad (with the warning that it is meant to be frozen)."""
    warn_trainable_base()
    return (dy2.t() @ x2).to(weight.dtype)


def _fake(a):
    m = math.prod(a.x.shape[:-1])
    return a.x.new_empty(*a.x.shape[:-1], a.weight.shape[0]), a.x.new_empty(m, a.lora_A.shape[0])


LINEAR = Op(
    "lora_linear",
    "Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor? lora_bias, float scaling, "
    "float dropout_p, Tensor? seed",
    outputs=("y", "s"),
    differentiable=("x", "weight", "bias", "lora_A", "lora_B", "lora_bias"),
    saved_outputs=("s",),
    saved_when_trained=("bias", "lora_bias"),
    forward=_forward,
    backward=_backward,
    fake=_fake,
    path=triton_path,
)


class _Plan:
    """What one call signature of ``lora_linear`` has earned (see ``_plan``): its checks passed, and the replay
    slots (kernels/launch.py) of its forward and of each form of its backward."""

    __slots__ = ("forward", "backward_slots")

    def __init__(self):
        self.forward = ReplaySlot() if HAS_TRITON else None
        self.backward_slots = {}

    def backward(self, need_dx, dy, x, weight, lora_A, lora_B):
        """The backward's replay slot: the forward's signature determines every operand's shape, strides, dtype
        and device (dY is made contiguous, in the output's dtype, by autograd and ``_backward``), leaving need_dx
        and the operands' 16-byte alignment (pointers may move between forward and backward, as when a sharded
        weight is gathered again)."""
        align = (dy.data_ptr() | x.data_ptr() | weight.data_ptr() | lora_A.data_ptr() | lora_B.data_ptr()) & 15
        if align:
            align = tuple(t.data_ptr() & 15 for t in (dy, x, weight, lora_A, lora_B))
        key = (need_dx, dy.dtype, align)
        slot = self.backward_slots.get(key)
        if slot is None:
            slot = self.backward_slots[key] = ReplaySlot()
        return slot


# Plans per call signature, at most _MAX_PLANS of them (the oldest go first): variable-length batches cannot grow
# them without limit.
_PLANS: dict = {}
_MAX_PLANS = 256


def _tensor_key(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15)


def _plan(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, lora_bias, autocast_dtype):
    """The plan of a call, found by its signature: every tensor's shape, strides, dtype, device and 16-byte
    alignment, the other arguments by type and value, and the autocast dtype (None without autocast). One
    signature serves the checks (run on its first call; a call that fails them leaves no plan) and the kernels'
    replays, in forward and backward."""
    try:
        key = (
            _tensor_key(x), _tensor_key(weight), _tensor_key(bias), _tensor_key(lora_A), _tensor_key(lora_B),
            _tensor_key(lora_bias), type(scaling), scaling, type(dropout_p), dropout_p, training, autocast_dtype,
        )  # fmt: skip
        plan = _PLANS.get(key)
    except (AttributeError, TypeError, RuntimeError):  # not tensors, unhashable, or without storage (a tensor
        key = plan = None  # subclass): the checks say what is wrong, or run on every call
    if plan is None:
        _check_linear.__wrapped__(
            x, weight, bias, lora_A, lora_B, scaling, dropout_p, lora_bias, autocast_dtype is not None
        )
        plan = _Plan()
        if key is not None:
            if len(_PLANS) >= _MAX_PLANS:  # the oldest go first (keys copied in one step: threads may insert too)
                for old in list(_PLANS)[: len(_PLANS) - _MAX_PLANS + 1]:
                    _PLANS.pop(old, None)
            _PLANS[key] = plan
    return plan


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True, lora_bias=None):
    """LoRA linear layer: Y = x W^T + bias + s * ((dropout(x) A^T) B^T + lora_bias).

    Args:
        x: input [..., K], float16, bfloat16 or float32.
        weight: frozen base weight [N, K], same dtype as x. bias: [N] or None.
        lora_A: [r, K]; lora_B: [N, r]; any float dtype (computed in x's dtype, gradients in their own).
        scaling: s, usually alpha / r.
        dropout_p: dropout probability on the LoRA branch's input, in [0, 1); applied only when training.
        lora_bias: [N] or None, PEFT's ``lora_bias`` (the bias of lora_B, key ``lora_B.bias``), trained.

    Returns:
        Y [..., N] in x's dtype (the autocast dtype under ``torch.autocast``).
    """
    autocast_dtype = autocast_dtype_for(x)
    if torch.compiler.is_compiling():  # checked while tracing; the compiled op has no use for a plan
        _check_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, lora_bias, autocast_dtype is not None)
        plan = None
    else:
        plan = _plan(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, lora_bias, autocast_dtype)
    p = float(dropout_p) if training else 0.0
    seed = draw_seed(x) if p > 0 else None
    if autocast_dtype is None:  # the common case: no casts, no autocast context to enter
        return LINEAR(x, weight, bias, lora_A, lora_B, lora_bias, float(scaling), p, seed, plan=plan)[0]
    x, weight, bias = autocast_inputs(x, weight, bias)
    with no_autocast(x.device.type):
        y, _ = LINEAR(x, weight, bias, lora_A, lora_B, lora_bias, float(scaling), p, seed, plan=plan)
    return y
