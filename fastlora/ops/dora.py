"""DoRA and lora_bias on a Linear: validation, torch path, autograd Function and compiled entry point.

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
kernels of fastlora.kernels.dora; the GEMMs are fastlora.kernels.linear's LoRA forward and backward, with the
column scale c applied by the forward GEMM's epilogue when its launcher takes ``col_scale``, else by a small
epilogue kernel over Y. With dropout, x_d W^T and the extra ((c - 1) dY) W run as separate GEMMs (torch
matmuls) on the mask the kernels draw.

lora_bias (PEFT's ``lora_bias=True``, the bias of lora_B, key ``lora_B.<adapter>.bias``) on plain LoRA:
Y = x W^T + bias + s * (S B^T + lora_bias): the layer bias becomes bias + s * lora_bias (an N-vector), and the
LoRA op's dbias pass gives d lora_bias = s * rowsum_M(dY). PEFT rejects lora_bias together with DoRA, and so
does this op.
"""

from __future__ import annotations

import inspect

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from fastlora import functional as _lin

try:
    from fastlora.kernels import dora as _kdora
    from fastlora.kernels import linear as _klinear
except ImportError:  # no Triton on this platform: the torch path serves every call
    _kdora = _klinear = None

__all__ = ["lora_linear_dora", "dora_weight_norm", "weight_row_sq_norms"]


def _launcher_has_col_scale() -> bool:
    return _klinear is not None and "col_scale" in inspect.signature(_klinear.lora_linear_fwd).parameters


# Whether kernels.linear's forward launcher applies a per-column scale before the bias (then the DoRA forward
# is one GEMM launch); read once at import.
LAUNCHER_HAS_COL_SCALE = _launcher_has_col_scale()


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def _check_dora(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, lora_bias):
    _lin._check_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    n = weight.shape[0]
    if magnitude is not None:
        _lin._check_tensor("magnitude", magnitude, ndim=1)
        if magnitude.shape[0] != n:
            raise ValueError(
                f"magnitude must have shape [{n}] (one entry per output feature), got {tuple(magnitude.shape)}"
            )
        if lora_bias is not None:
            raise ValueError(
                "lora_bias cannot be combined with DoRA (magnitude given): PEFT rejects "
                "lora_bias=True with use_dora=True, so no adapter has both"
            )
    if lora_bias is not None:
        _lin._check_tensor("lora_bias", lora_bias, ndim=1)
        if lora_bias.shape[0] != n:
            raise ValueError(f"lora_bias must have shape [{n}], got {tuple(lora_bias.shape)}")
    _lin._check_same_device(x=x, weight=weight, magnitude=magnitude, lora_bias=lora_bias)


# ----------------------------------------------------------------------------------------------------------
# The row norm n = ||W + s B A||, and the cached ||W||^2_rows
# ----------------------------------------------------------------------------------------------------------

_WSQ_CACHE = WeakTensorKeyDictionary()
_WSQ_CHUNK_ROWS = 256


def _weight_key(weight):
    """(version, storage pointer) identifying the weight's current values, or None where it has no version counter
    (inference tensors, fake tensors)."""
    try:
        return weight._version, weight.untyped_storage().data_ptr(), weight.data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _cached_wsq(weight):
    key = _weight_key(weight)
    hit = _WSQ_CACHE.get(weight) if key is not None else None
    return hit[1] if hit is not None and hit[0] == key else None


def _store_wsq(weight, wsq):
    key = _weight_key(weight)
    if key is not None:
        _WSQ_CACHE[weight] = (key, wsq)


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
        triton_path = _lin._use_triton(weight) and weight.numel() > 0
    with torch.no_grad():
        if triton_path:
            n, wsq = _kdora.dora_weight_norm(weight, lora_A, lora_B, scaling, wsq=_cached_wsq(weight))
            _store_wsq(weight, wsq)
            return n
        return _torch_weight_norm(weight, lora_A, lora_B, scaling)


# ----------------------------------------------------------------------------------------------------------
# Forward and backward on both paths
# ----------------------------------------------------------------------------------------------------------


def _keep(seed, shape, p, device, triton_path):
    """The dropout multiplier m [M, K] (0 or 1/(1-p)) the path draws for this seed, as x's multiplier."""
    if triton_path:
        keep = _klinear.dropout_mask(seed, shape[0], shape[1], p, device)
    else:
        keep = _lin.dropout_keep(seed, shape, p, device)
    return keep, 1.0 / (1.0 - p)


def triton_scaled_fwd(x2, weight, bias, lora_A, lora_B, scaling, col_scale):
    """(Y = c * (x W^T + s S B^T) + bias, S = x A^T) on the Triton path: the LoRA GEMM's column-scale epilogue when
    its launcher has one (LAUNCHER_HAS_COL_SCALE), else the GEMM followed by the DoRA epilogue kernel over Y."""
    if LAUNCHER_HAS_COL_SCALE:
        return _klinear.lora_linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, 0.0, 0, col_scale=col_scale)
    y, s = _klinear.lora_linear_fwd(x2, weight, None, lora_A, lora_B, scaling, 0.0, 0)
    return _kdora.dora_col_scale_(y, col_scale, bias), s


def _dora_fwd(x2, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, triton_path):
    """(Y [M, N], S [M, r], n [N] float32, Yq [M, N] with dropout else an empty tensor)."""
    dt = x2.dtype
    norm = dora_weight_norm(weight, lora_A, lora_B, scaling, triton_path)
    c = magnitude.detach().float() / norm
    b_t = lora_B.to(dt).t()
    if dropout_p == 0:
        if triton_path:
            y, s = triton_scaled_fwd(x2, weight, bias, lora_A, lora_B, scaling, c)
        else:
            s = x2 @ lora_A.to(dt).t()
            y = (x2 @ weight.t()).addmm_(s, b_t, alpha=scaling).mul_(c)
            if bias is not None:
                y.add_(bias)
        return y, s, norm, x2.new_empty(0)
    keep, inv_keep = _keep(seed, x2.shape, dropout_p, x2.device, triton_path)
    x_d = x2.mul(keep).mul_(inv_keep)
    if triton_path:  # Y = x W^T + bias + s S B^T with the mask drawn in-kernel; S = x_d A^T
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


def _dora_bwd(ctx_vals, dy, x2, y, s, norm, yq, weight, bias, lora_A, lora_B, magnitude, need_dx, need_dbias):
    """(dX or None, dA, dB, dg, dbias or None); dg and dbias in float32."""
    scaling, dropout_p, seed, triton_path = ctx_vals
    dt = dy.dtype
    c = magnitude.detach().float() / norm
    if dropout_p == 0:
        if triton_path:
            dyc, dg, dbias = _kdora.dora_bwd_scale(
                dy, y, bias, magnitude, norm, 0.0, need_dbias, recompute=(x2, weight, s, lora_B, scaling)
            )
            dx, da, db, _ = _klinear.lora_linear_bwd(
                dyc, x2, s, weight, lora_A, lora_B, scaling, 0.0, 0, need_dx=need_dx, need_dbias=False
            )
        else:
            dg = _torch_dg_recovered(dy, y, x2, s, weight, bias, lora_B, magnitude, norm, scaling)
            dbias = dy.sum(0, dtype=torch.float32) if need_dbias else None
            dx, da, db, _ = _lin._torch_linear_bwd(
                dy * c.to(dt), x2, s, weight, lora_A, lora_B, scaling, 0.0, 0, need_dx, False
            )
        return dx, da, db, dg, dbias
    keep, inv_keep = _keep(seed, x2.shape, dropout_p, x2.device, triton_path)
    b_c = (lora_B.float() * c[:, None]).to(lora_B.dtype)  # dS = s dY (c B) without an M x N scaled copy of dY
    if triton_path:
        dyc1, dg, dbias = _kdora.dora_bwd_scale(dy, yq, None, magnitude, norm, -1.0, need_dbias)
        dx, da, db, _ = _klinear.lora_linear_bwd(
            dy, x2, s, weight, lora_A, b_c, scaling, dropout_p, seed, need_dx=need_dx, need_dbias=False
        )
        if need_dx:
            dx.addcmul_(dyc1 @ weight, keep.to(dt), value=inv_keep)
    else:
        dg = (dy * yq).sum(0, dtype=torch.float32).div_(norm)
        dbias = dy.sum(0, dtype=torch.float32) if need_dbias else None
        m = keep.to(dt).mul_(inv_keep)
        ds = torch.mm(dy, b_c.to(dt)).mul_(scaling)
        db = torch.mm(dy.t(), s).mul_(scaling)
        da = ds.t() @ (x2 * m)
        dx = None
        if need_dx:
            dx = torch.mm(dy * (c - 1.0).to(dt), weight).addmm_(ds, lora_A.to(dt)).mul_(m).addmm_(dy, weight)
        da, db = da.to(lora_A.dtype), db.to(lora_B.dtype)
    db = (db.float() * c[:, None]).to(lora_B.dtype)
    return dx, da, db, dg, dbias


def _dora_weight_grad(dy, x2, magnitude, norm, dropout_p, seed, triton_path, weight):
    """dW for a trainable base weight (n stays detached): (c dY)^T x, or dY^T x + ((c - 1) dY)^T x_d with dropout."""
    c = (magnitude.detach().float() / norm).to(dy.dtype)
    if dropout_p == 0:
        return _lin._weight_grad(dy * c, x2, weight)
    keep, inv_keep = _keep(seed, x2.shape, dropout_p, x2.device, triton_path)
    x_d = x2 * keep.to(x2.dtype) * inv_keep
    return _lin._weight_grad(dy, x2, weight) + ((dy * (c - 1)).t() @ x_d).to(weight.dtype)


def _on_triton(x2, weight) -> bool:
    return _lin._linear_on_triton(x2, weight)


# ----------------------------------------------------------------------------------------------------------
# Eager autograd function
# ----------------------------------------------------------------------------------------------------------


class DoRALinearFunction(torch.autograd.Function):
    """DoRA linear (PEFT's two forms, see the module docstring); backward gives dX, dA, dB, dg (and dbias)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed):
        x2 = _lin._as_rows(x)
        ctx.triton_path = _on_triton(x2, weight)
        y2, s, norm, yq = _dora_fwd(
            x2, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, ctx.triton_path
        )
        y = y2.reshape(*x.shape[:-1], weight.shape[0]).detach()
        ctx.save_for_backward(x, y, s, norm, yq, weight, bias, lora_A, lora_B, magnitude)
        ctx.vals = (scaling, dropout_p, seed, ctx.triton_path)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, s, norm, yq, weight, bias, lora_A, lora_B, magnitude = ctx.saved_tensors
        x2, y2 = _lin._as_rows(x), _lin._as_rows(y)
        dy2 = _lin._as_rows(dy).contiguous()
        need_dx, need_dw, need_dbias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if x2.shape[0] == 0:
            dx = x.new_zeros(x.shape) if need_dx else None
            dbias = dy2.new_zeros(dy2.shape[1]) if need_dbias else None
            zeros = (torch.zeros_like(lora_A), torch.zeros_like(lora_B), torch.zeros_like(magnitude))
            return dx, None, dbias, *zeros, None, None, None
        dx, da, db, dg, dbias = _dora_bwd(
            ctx.vals, dy2, x2, y2, s, norm, yq, weight, bias, lora_A, lora_B, magnitude, need_dx, need_dbias
        )
        dw = None
        if need_dw:
            dw = _dora_weight_grad(dy2, x2, magnitude, norm, ctx.vals[1], ctx.vals[2], ctx.vals[3], weight)
        dx = dx.reshape(x.shape) if dx is not None else None
        dbias = dbias.to(bias.dtype) if dbias is not None else None
        return dx, dw, dbias, da, db, dg.to(magnitude.dtype), None, None, None


# ----------------------------------------------------------------------------------------------------------
# Custom ops for torch.compile
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastlora::lora_linear_dora", mutates_args=())
def _dora_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    seed_int = int(seed.item()) if seed is not None else 0
    triton_path = _on_triton(x, weight)
    y, s, norm, yq = _dora_fwd(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed_int, triton_path)
    return y, s, norm, yq


@_dora_op.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed):
    m, n = x.shape[0], weight.shape[0]
    yq = x.new_empty(m, n) if dropout_p > 0 else x.new_empty(0)
    return x.new_empty(m, n), x.new_empty(m, lora_A.shape[0]), x.new_empty(n, dtype=torch.float32), yq


@torch.library.custom_op("fastlora::lora_linear_dora_backward", mutates_args=())
def _dora_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    s: torch.Tensor,
    norm: torch.Tensor,
    yq: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    need_dx: bool,
    need_dbias: bool,
    triton_path: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    seed_int = int(seed.item()) if seed is not None else 0
    vals = (scaling, dropout_p, seed_int, triton_path)
    dx, da, db, dg, dbias = _dora_bwd(
        vals, dy.contiguous(), x, y, s, norm, yq, weight, bias, lora_A, lora_B, magnitude, need_dx, need_dbias
    )
    dx = dx.contiguous() if dx is not None else x.new_empty(0)
    dbias = dbias.to(dy.dtype) if dbias is not None else dy.new_empty(0)
    return dx, da, db, dg.to(magnitude.dtype), dbias


@_dora_bwd_op.register_fake
def _(
    dy,
    x,
    y,
    s,
    norm,
    yq,
    weight,
    bias,
    lora_A,
    lora_B,
    magnitude,
    scaling,
    dropout_p,
    seed,
    need_dx,
    need_dbias,
    triton_path,
):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    dbias = dy.new_empty(dy.shape[1]) if need_dbias else dy.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B), torch.empty_like(magnitude), dbias


def _dora_setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed = inputs
    y, s, norm, yq = output
    ctx.save_for_backward(x, y, s, norm, yq, weight, bias, lora_A, lora_B, magnitude, seed)
    ctx.scaling, ctx.dropout_p, ctx.triton_path = scaling, dropout_p, _on_triton(x, weight)


def _dora_op_backward(ctx, dy, _ds, _dn, _dyq):
    x, y, s, norm, yq, weight, bias, lora_A, lora_B, magnitude, seed = ctx.saved_tensors
    need_dx, need_dw, need_dbias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dx, da, db, dg, dbias = torch.ops.fastlora.lora_linear_dora_backward(
        dy,
        x,
        y,
        s,
        norm,
        yq,
        weight,
        bias,
        lora_A,
        lora_B,
        magnitude,
        ctx.scaling,
        ctx.dropout_p,
        seed,
        need_dx,
        need_dbias,
        ctx.triton_path,
    )
    dw = None
    if need_dw:
        seed_int = int(seed.item()) if seed is not None else 0
        dw = _dora_weight_grad(dy, x, magnitude, norm, ctx.dropout_p, seed_int, ctx.triton_path, weight)
    return (dx if need_dx else None), dw, (dbias if need_dbias else None), da, db, dg, None, None, None


_dora_op.register_autograd(_dora_op_backward, setup_context=_dora_setup)


# ----------------------------------------------------------------------------------------------------------
# Public functional API
# ----------------------------------------------------------------------------------------------------------


def _biased(bias, lora_bias, scaling, dtype):
    """The layer bias with PEFT's lora_bias folded in: bias + s * lora_bias, in the weight's dtype."""
    scaled = lora_bias.to(dtype) * scaling
    return scaled if bias is None else torch.add(bias, scaled)


def lora_linear_dora(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, training=True, lora_bias=None):
    """DoRA linear layer (PEFT's ``use_dora=True``), or LoRA with PEFT's ``lora_bias`` when magnitude is None.

    DoRA, with c = g / ||W + s B A|| per output row (the norm detached) and x_d = dropout(x):
        no dropout (dropout_p = 0 or not training):  Y = c * (x W^T + s (x A^T) B^T) + bias
        training with dropout:   Y = x W^T + bias + (c - 1) * (x_d W^T) + c * s (x_d A^T) B^T
    magnitude None:              Y = x W^T + bias + s * ((x_d A^T) B^T + lora_bias)   (lora_bias None: plain LoRA)

    Args:
        x: input [..., K], float16, bfloat16 or float32.
        weight: frozen base weight [N, K], same dtype as x. bias: [N] or None.
        lora_A: [r, K]; lora_B: [N, r]; magnitude: g [N] (PEFT's ``lora_magnitude_vector``) or None;
            lora_bias: [N] (PEFT's ``lora_B.bias``) or None, only without magnitude. Any float dtype; gradients
            in their own dtype.
        scaling: s, usually alpha / r. dropout_p: in [0, 1); applied only when training.

    Returns:
        Y [..., N] in x's dtype (the autocast dtype under ``torch.autocast``).
    """
    _check_dora(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, lora_bias)
    if magnitude is None:
        if lora_bias is not None:
            x, weight, bias = _lin.autocast_inputs(x, weight, bias)
            with _lin.no_autocast(x.device.type):
                bias = _biased(bias, lora_bias, float(scaling), weight.dtype)
        return _lin.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
    x, weight, bias = _lin.autocast_inputs(x, weight, bias)
    p = float(dropout_p) if training else 0.0
    scaling = float(scaling)
    with _lin.no_autocast(x.device.type):
        if torch.compiler.is_compiling():
            seed = _lin.draw_seed() if p > 0 else None
            y2 = torch.ops.fastlora.lora_linear_dora(
                _lin._as_rows(x), weight, bias, lora_A, lora_B, magnitude, scaling, p, seed
            )[0]
            return y2.reshape(*x.shape[:-1], weight.shape[0])
        seed = int(_lin.draw_seed()) if p > 0 else 0
        return DoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, magnitude, scaling, p, seed)
