"""DoRA on a Linear: validation, the row norm, the torch path and the op (eager and compiled) over the kernels.

x [M, K] (leading dims flattened), W [N, K] frozen, A [r, K], B [N, r], s the scaling, g [N] the magnitude,
n [N] = ||W + s B A|| per output row (detached: a constant in backward, as PEFT and the DoRA paper do), c = g / n,
m the dropout mask (0 or 1/(1-p)), x_d = m x, S = x_d A^T [M, r]. PEFT's two forms:

    no dropout (p = 0 or eval):   Y  = c * Yp + bias,           Yp = x W^T + s S B^T
    training with dropout:        Y  = x W^T + bias + s S B^T + (c - 1) * Yq,   Yq = x_d W^T + s S B^T
                                     (= x W^T + bias + (c - 1) x_d W^T + c s S B^T, PEFT's expression)

    n^2 = ||W||^2_rows + 2 s rowsum((W A^T) * B) + s^2 rowsum((B (A A^T)) * B)   no N x K matrix is formed;
          ||W||^2_rows is cached per weight tensor and recomputed when its version counter or storage changes.

Backward, given dY [M, N]:

    no dropout:    dY' = c * dY;  then the plain LoRA backward on dY':
                   dS = s dY' B,  dB = s dY'^T S,  dA = dS^T x,  dX = dY' W + dS A
                   dg = rowsum_M(dY * Yp) / n = rowsum_M(dY * (Y - bias)) / g   (Y is the saved output itself)
                   a column with g = 0 has Y = bias, so its Yp is recomputed (x W_j^T + s S B_j^T, that column only)
    with dropout:  dS = s dY (c B),  dB = c * (s dY^T S),  dA = dS^T x_d
                   dX = dY W + m * (((c - 1) dY) W + dS A)
                   dg = rowsum_M(dY * Yq) / n                        (Yq saved: one M x N tensor)
    dbias = rowsum_M(dY) when the bias is trainable.

Saved for backward besides x, the parameters and the output Y: S [M, r] and n [N]; with dropout also Yq [M, N].
Since Y itself is saved, an in-place change of the layer's output before backward raises autograd's
"modified by an inplace operation" error rather than giving a wrong gradient.

The Triton path: the norm's pass over W and the backward's pass over dY (dY' and dg together, and dbias) are
kernels of fastlora.kernels.dora; the GEMMs are fastlora.kernels.linear's LoRA forward (its column scale c applied
in the epilogue, before the bias) and backward. With dropout, x_d W^T and the extra ((c - 1) dY) W run as separate
GEMMs (torch matmuls) on the mask the kernels draw.

PEFT rejects lora_bias together with DoRA; lora_bias on plain LoRA is part of the linear op (fastlora.ops.linear).
"""

from __future__ import annotations

import math

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from fastlora.checks import check_same_device, check_tensor
from fastlora.ops._define import Op
from fastlora.ops.backend import (
    HAS_TRITON,
    as_rows,
    autocast_inputs,
    draw_seed,
    dropout_keep,
    no_autocast,
    use_triton,
)
from fastlora.ops.linear import check_linear, torch_bwd, triton_path, weight_grad

if HAS_TRITON:
    from fastlora.kernels import dora as _kdora
    from fastlora.kernels import linear as _klinear

__all__ = ["lora_linear_dora", "check_dora", "dora_weight_norm", "weight_row_sq_norms", "DORA"]


def check_dora(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p):
    """Validate a lora_linear_dora call (ValueError/TypeError naming the argument)."""
    check_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    n = weight.shape[0]
    check_tensor("magnitude", magnitude, ndim=1)
    if magnitude.shape[0] != n:
        raise ValueError(
            f"magnitude must have shape [{n}] (one entry per output feature), got {tuple(magnitude.shape)}"
        )
    check_same_device(x=x, magnitude=magnitude)


# ----------------------------------------------------------------------------------------------------------
# The row norm n = ||W + s B A||, and the cached ||W||^2_rows
# ----------------------------------------------------------------------------------------------------------

_WSQ_CACHE = WeakTensorKeyDictionary()
_WSQ_CHUNK_ROWS = 256


def _weight_key(weight):
    """(version, storage pointer, layout) identifying the weight's current values, or None where it has no version
    counter (inference tensors, fake tensors)."""
    try:
        return weight._version, weight.untyped_storage().data_ptr(), weight.data_ptr(), weight.shape, weight.stride()
    except (RuntimeError, NotImplementedError):
        return None


def _owner(weight):
    """The tensor the cache entry hangs on: a view's base (a transposed Conv1D weight is a new view every call)."""
    return weight._base if weight._base is not None else weight


def _cached_wsq(weight):
    key = _weight_key(weight)
    hit = _WSQ_CACHE.get(_owner(weight)) if key is not None else None
    return hit[1] if hit is not None and hit[0] == key else None


def _store_wsq(weight, wsq):
    key = _weight_key(weight)
    if key is not None:
        _WSQ_CACHE[_owner(weight)] = (key, wsq)


def weight_row_sq_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W||^2 per row [N] in float32, from a cache keyed on the weight's version counter and storage (the torch
    path; the Triton path sums the squares inside its pass over W). Rows go through in chunks, so no N x K float32
    copy of a 16-bit W is made."""
    wsq = _cached_wsq(weight)
    if wsq is None:
        with torch.no_grad():
            wsq = (
                torch.cat(
                    [
                        torch.linalg.vector_norm(chunk, dim=1, dtype=torch.float32).square_()
                        for chunk in weight.detach().split(_WSQ_CHUNK_ROWS)
                    ]
                )
                if weight.shape[0] > 0
                else weight.new_zeros(0, dtype=torch.float32)
            )
        _store_wsq(weight, wsq)
    return wsq


def _torch_weight_norm(weight, lora_A, lora_B, scaling):
    dt = weight.dtype
    wsq = weight_row_sq_norms(weight)
    wa = (weight @ lora_A.to(dt).t()).float()  # [N, r]: the one pass over W
    b = lora_B.float()
    a32 = lora_A.float()
    cross = (wa * b).sum(1)
    lora_sq = ((b @ (a32 @ a32.t())) * b).sum(1)
    n2 = wsq + (2.0 * scaling) * cross + (scaling * scaling) * lora_sq
    return n2.clamp_(min=0.0).sqrt_()


def dora_weight_norm(weight, lora_A, lora_B, scaling, triton_path=None):
    """n [N] float32 = ||W + s B A|| per output row, without forming an N x K matrix; no gradient flows through it.

    weight [N, K], lora_A [r, K], lora_B [N, r]. ||W||^2_rows is cached per weight tensor (recomputed when the
    tensor's version counter or storage changes, e.g. after merge/unmerge or any in-place edit)."""
    if triton_path is None:
        triton_path = use_triton(weight) and weight.numel() > 0
    with torch.no_grad():
        if triton_path:
            n, wsq = _kdora.dora_weight_norm(weight, lora_A, lora_B, scaling, wsq=_cached_wsq(weight))
            _store_wsq(weight, wsq)
            return n
        return _torch_weight_norm(weight, lora_A, lora_B, scaling)


# ----------------------------------------------------------------------------------------------------------
# Forward and backward on both paths
# ----------------------------------------------------------------------------------------------------------


def _dropped(x2, p, seed, triton):
    """x_d = m * x [M, K] with the mask the path draws for this seed, and the multiplier m itself."""
    keep = (
        _klinear.dropout_mask(seed, x2.shape[0], x2.shape[1], p, x2.device)
        if triton
        else dropout_keep(seed, x2.shape, p, x2.device)
    )
    m = keep.to(x2.dtype).mul_(1.0 / (1.0 - p))
    return x2 * m, m


def _dora_fwd(x2, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, triton):
    """(Y [M, N], S [M, r], n [N] float32, Yq [M, N] with dropout else an empty tensor)."""
    dt = x2.dtype
    norm = dora_weight_norm(weight, lora_A, lora_B, scaling, triton)
    c = magnitude.detach().float() / norm
    b_t = lora_B.to(dt).t()
    if dropout_p == 0:
        if triton:
            y, s = _klinear.lora_linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, 0.0, 0, col_scale=c)
        else:
            s = x2 @ lora_A.to(dt).t()
            y = (x2 @ weight.t()).addmm_(s, b_t, alpha=scaling).mul_(c)
            if bias is not None:
                y.add_(bias)
        return y, s, norm, x2.new_empty(0)
    x_d, _ = _dropped(x2, dropout_p, seed, triton)
    if triton:  # Y = x W^T + bias + s S B^T with the mask drawn in-kernel; S = x_d A^T
        y, s = _klinear.lora_linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    else:
        s = x_d @ lora_A.to(dt).t()
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        y.addmm_(s, b_t, alpha=scaling)
    yq = (x_d @ weight.t()).addmm_(s, b_t, alpha=scaling)
    y.addcmul_(yq, c - 1.0)
    return y, s, norm, yq


def _torch_dg_recovered(dy, y, x2, s, weight, bias, lora_B, magnitude, norm, scaling):
    """dg [N] float32 = rowsum_M(dY * (Y - bias)) / g; zero-magnitude columns from their recomputed Yp / n."""
    t = y - bias if bias is not None else y.clone()
    num = t.mul_(dy).sum(0, dtype=torch.float32)
    g = magnitude.detach().float()
    zero = g == 0
    dg = num / torch.where(zero, 1.0, g)
    cols = zero.nonzero().squeeze(1)
    if cols.numel():
        yp = torch.mm(x2, weight.index_select(0, cols).t())
        yp.addmm_(s, lora_B.index_select(0, cols).to(s.dtype).t(), alpha=scaling)
        dg[cols] = (yp.float() * dy.index_select(1, cols).float()).sum(0) / norm[cols]
    return dg


def _dora_bwd(a, dy, x2, y, s, norm, yq, need_dx, need_dbias, triton):
    """(dX or None, dA, dB, dg float32, rowsum_M(dY) float32 or None)."""
    weight, bias, lora_A, lora_B, magnitude, scaling = a.weight, a.bias, a.lora_A, a.lora_B, a.magnitude, a.scaling
    dt = dy.dtype
    c = magnitude.detach().float() / norm
    if a.dropout_p == 0:
        if triton:
            dyc, dg, dbias = _kdora.dora_bwd_scale(
                dy, y, bias, magnitude, norm, 0.0, need_dbias, recompute=(x2, weight, s, lora_B, scaling)
            )
            dx, da, db, _ = _klinear.lora_linear_bwd(
                dyc, x2, s, weight, lora_A, lora_B, scaling, 0.0, 0, need_dx=need_dx, need_dbias=False
            )
        else:
            dg = _torch_dg_recovered(dy, y, x2, s, weight, bias, lora_B, magnitude, norm, scaling)
            dbias = dy.sum(0, dtype=torch.float32) if need_dbias else None
            dx, da, db, _ = torch_bwd(dy * c.to(dt), x2, s, weight, lora_A, lora_B, scaling, 0.0, 0, need_dx, False)
        return dx, da, db, dg, dbias
    x_d, m = _dropped(x2, a.dropout_p, a.seed, triton)
    b_c = (lora_B.float() * c[:, None]).to(lora_B.dtype)  # dS = s dY (c B) without an M x N scaled copy of dY
    if triton:
        dyc1, dg, dbias = _kdora.dora_bwd_scale(dy, yq, None, magnitude, norm, -1.0, need_dbias)
        dx, da, db, _ = _klinear.lora_linear_bwd(
            dy, x2, s, weight, lora_A, b_c, scaling, a.dropout_p, a.seed, need_dx=need_dx, need_dbias=False
        )
        if need_dx:
            dx.addcmul_(dyc1 @ weight, m)
    else:
        dg = (dy * yq).sum(0, dtype=torch.float32).div_(norm)
        dbias = dy.sum(0, dtype=torch.float32) if need_dbias else None
        ds = torch.mm(dy, b_c.to(dt)).mul_(scaling)
        db = torch.mm(dy.t(), s).mul_(scaling)
        da = (ds.t() @ x_d).to(lora_A.dtype)
        dx = None
        if need_dx:
            dx = torch.mm(dy * (c - 1.0).to(dt), weight).addmm_(ds, lora_A.to(dt)).mul_(m).addmm_(dy, weight)
    db = (db.float() * c[:, None]).to(lora_B.dtype)
    return dx, da, db, dg, dbias


def _dora_weight_grad(a, dy, x2, norm, triton):
    """dW for a trainable base weight (n stays detached): (c dY)^T x, or dY^T x + ((c - 1) dY)^T x_d with dropout."""
    c = (a.magnitude.detach().float() / norm).to(dy.dtype)
    if a.dropout_p == 0:
        return weight_grad(dy * c, x2, a.weight)
    x_d, _ = _dropped(x2, a.dropout_p, a.seed, triton)
    return weight_grad(dy, x2, a.weight) + ((dy * (c - 1)).t() @ x_d).to(a.weight.dtype)


# ----------------------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------------------


def _forward(a, triton):
    x2 = as_rows(a.x)
    y2, s, norm, yq = _dora_fwd(
        x2, a.weight, a.bias, a.lora_A, a.lora_B, a.magnitude, a.scaling, a.dropout_p, a.seed, triton
    )
    return y2.reshape(*a.x.shape[:-1], a.weight.shape[0]), s, norm, yq


def _backward(a, saved, grads, needs, triton):
    (y, s, norm, yq), (dy,) = saved, grads
    need_dx, need_dw, need_dbias = needs[0], needs[1], needs[2]
    x2, y2, dy2 = as_rows(a.x), as_rows(y), as_rows(dy).contiguous()
    if x2.shape[0] == 0:
        dx = x2.new_zeros(x2.shape) if need_dx else None
        dbias = dy2.new_zeros(dy2.shape[1], dtype=torch.float32) if need_dbias else None
        da, db, dg = torch.zeros_like(a.lora_A), torch.zeros_like(a.lora_B), torch.zeros_like(a.magnitude)
    else:
        dx, da, db, dg, dbias = _dora_bwd(a, dy2, x2, y2, s, norm, yq, need_dx, need_dbias, triton)
    dw = _dora_weight_grad(a, dy2, x2, norm, triton) if need_dw else None
    dx = dx.reshape(a.x.shape) if dx is not None else None
    dbias = dbias.to(a.bias.dtype) if dbias is not None else None
    return dx, dw, dbias, da, db, dg.to(a.magnitude.dtype)


def _fake(a):
    m, n = math.prod(a.x.shape[:-1]), a.weight.shape[0]
    yq = a.x.new_empty(m, n) if a.dropout_p > 0 else a.x.new_empty(0)
    y = a.x.new_empty(*a.x.shape[:-1], n)
    return y, a.x.new_empty(m, a.lora_A.shape[0]), a.x.new_empty(n, dtype=torch.float32), yq


DORA = Op(
    "lora_linear_dora",
    "Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor magnitude, float scaling, "
    "float dropout_p, Tensor? seed",
    outputs=("y", "s", "norm", "yq"),
    differentiable=("x", "weight", "bias", "lora_A", "lora_B", "magnitude"),
    saved_outputs=("y", "s", "norm", "yq"),
    forward=_forward,
    backward=_backward,
    fake=_fake,
    path=triton_path,
)


def lora_linear_dora(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, training=True):
    """DoRA linear layer (PEFT's ``use_dora=True``); c = g / ||W + s B A|| per output row, the norm detached.

        no dropout (dropout_p = 0 or not training):  Y = c * (x W^T + s (x A^T) B^T) + bias
        training with dropout, x_d = dropout(x):     Y = x W^T + bias + (c - 1) * (x_d W^T) + c * s (x_d A^T) B^T

    Args:
        x: input [..., K], float16, bfloat16 or float32.
        weight: frozen base weight [N, K], same dtype as x. bias: [N] or None.
        lora_A: [r, K]; lora_B: [N, r]; magnitude: g [N] (PEFT's ``lora_magnitude_vector``); any float dtype,
            gradients in their own dtype.
        scaling: s, usually alpha / r. dropout_p: in [0, 1); applied only when training.

    Returns:
        Y [..., N] in x's dtype (the autocast dtype under ``torch.autocast``).
    """
    check_dora(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p)
    x, weight, bias = autocast_inputs(x, weight, bias)
    p = float(dropout_p) if training else 0.0
    with no_autocast(x.device.type):
        y = DORA(x, weight, bias, lora_A, lora_B, magnitude, float(scaling), p, draw_seed(x) if p > 0 else None)
    return y[0]
