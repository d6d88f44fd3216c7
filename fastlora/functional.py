"""LoRA autograd functions and the functional API; picks the path for each call.

Paths: CUDA tensors run the Triton kernels in ``fastlora.kernels``; CPU tensors run a torch path with the
same math and the same saved-tensor profile; with ``TRITON_INTERPRET=1`` set before fastlora is imported,
CPU tensors run the Triton kernels under the interpreter (that is how the test suite reaches them).
``use_backend("torch")`` forces the torch path for a block of code.

Linear, with x [M, K] (leading dims flattened), W [N, K], A [r, K], B [N, r], s the scaling and
m [M, K] the dropout mask (0 or 1/(1-p)), drawn from a seed and regenerated in backward, never stored:

    S  = (m * x) A^T            [M, r]   saved for backward, with x itself (an alias)
    Y  = x W^T + s * S B^T + bias
    dS = s * dY B               [M, r]
    dB = s * dY^T S             [N, r]
    dA = dS^T (m * x)           [r, K]
    dX = dY W + m * (dS A)      [M, K]

No gradient is formed for the frozen W. Eager calls go through a ``torch.autograd.Function``; under
``torch.compile`` the same work runs as the ``fastlora::*`` custom ops, which the compiler treats as
opaque, so a model with fastlora layers compiles with ``fullgraph=True``.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings

import torch

try:
    from fastlora.kernels import conv2d as _kconv
    from fastlora.kernels import embedding as _kembedding
    from fastlora.kernels import linear as _klinear
    from fastlora.kernels import merge as _kmerge
    from fastlora.kernels.configs import INTERPRET
except ImportError:  # no Triton on this platform: the torch path serves every call
    _klinear = _kmerge = _kembedding = _kconv = None
    INTERPRET = False

__all__ = ["lora_linear", "lora_embedding", "lora_conv2d", "use_backend", "get_backend", "merge_delta_", "active_path"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BACKENDS = ("auto", "triton", "torch")
_backend = os.environ.get("FASTLORA_BACKEND", "auto")


def get_backend() -> str:
    """The backend setting: "auto" (CUDA -> Triton, CPU -> torch), "triton" or "torch"."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend for the calls made inside the block: "auto", "triton" or "torch"."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def active_path(device: torch.device | str) -> str:
    """Which path a call on this device takes now: "triton", "triton-interpreter" or "torch"."""
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must be a torch.device or a string such as 'cuda:0', got {device!r}") from err
    except TypeError as err:
        raise TypeError(f"device must be a torch.device or a string, got {type(device).__name__}") from err
    if device.type == "meta":  # shape inference only: the torch path's ops all have meta kernels
        return "torch"
    if _backend == "torch" or _klinear is None:
        if _backend == "triton":
            raise RuntimeError("the triton backend was requested but Triton is not installed")
        return "torch"
    if device.type == "cuda":
        return "triton-interpreter" if INTERPRET else "triton"
    if INTERPRET:
        return "triton-interpreter"
    if _backend == "triton":
        raise RuntimeError("the triton backend on CPU tensors needs TRITON_INTERPRET=1 set before importing fastlora")
    return "torch"


def _use_triton(t: torch.Tensor) -> bool:
    return active_path(t.device) != "torch"


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_tensor(name, t, *, ndim=None, floating=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {_dtype_name(t.dtype)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_lora_factors(lora_A, lora_B, in_features, out_features, scaling):
    """Shared checks of A [r, in_features] and B [out_features, r] (or B [out, r, 1, 1] for conv)."""
    _check_tensor("lora_A", lora_A)
    _check_tensor("lora_B", lora_B)
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"LoRA rank must be at least 1, got lora_A of shape {tuple(lora_A.shape)}")
    if lora_A.numel() // max(r, 1) != in_features:
        raise ValueError(f"lora_A must have shape [r, {in_features}], got {tuple(lora_A.shape)}")
    if lora_B.shape[0] != out_features or lora_B.numel() != out_features * r:
        raise ValueError(f"lora_B must have shape [{out_features}, {r}] to match lora_A, got {tuple(lora_B.shape)}")
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise TypeError(f"scaling must be a Python float, got {type(scaling).__name__}")


def check_dropout(dropout_p, name="dropout_p"):
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {dropout_p!r}")


def _check_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    _check_tensor("x", x)
    _check_tensor("weight", weight, ndim=2)
    _check_tensor("lora_A", lora_A, ndim=2)
    _check_tensor("lora_B", lora_B, ndim=2)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (its last is in_features)")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension must be in_features={k}, got x of shape {tuple(x.shape)}")
    autocasting = autocast_enabled(x.device.type)  # then autocast_inputs brings x, weight and bias to one dtype
    if x.dtype != weight.dtype and not autocasting:
        raise TypeError(f"x is {_dtype_name(x.dtype)} but weight is {_dtype_name(weight.dtype)}; they must match")
    if bias is not None:
        _check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != n:
            raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype and not autocasting:
            raise TypeError(f"bias is {_dtype_name(bias.dtype)} but weight is {_dtype_name(weight.dtype)}")
    check_lora_factors(lora_A, lora_B, k, n, scaling)
    check_dropout(dropout_p)
    _check_same_device(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)


# ----------------------------------------------------------------------------------------------------------
# Torch path (CPU, or when forced): the same math and saved tensors as the kernels
# ----------------------------------------------------------------------------------------------------------


def dropout_keep(seed: int, shape, p: float, device) -> torch.Tensor:
    """The torch path's dropout keep-mask for a seed: a pure function of (seed, shape, p)."""
    if torch.device(device).type == "meta":  # no generator exists on meta; the mask's shape is all it needs
        return torch.empty(shape, dtype=torch.bool, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p


def _torch_linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    dt = x2.dtype
    a, b = lora_A.to(dt), lora_B.to(dt)
    x_lora = x2
    if dropout_p > 0:
        x_lora = x2 * dropout_keep(seed, x2.shape, dropout_p, x2.device).to(dt) * (1.0 / (1.0 - dropout_p))
    s = x_lora @ a.t()
    y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
    y.addmm_(s, b.t(), alpha=scaling)
    return y, s


def _torch_linear_bwd(dy, x2, s, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_dbias):
    dt = dy.dtype
    a, b = lora_A.to(dt), lora_B.to(dt)
    ds = torch.mm(dy, b).mul_(scaling)
    db = torch.mm(dy.t(), s).mul_(scaling)
    keep = None
    if dropout_p > 0:
        keep = dropout_keep(seed, x2.shape, dropout_p, x2.device).to(dt) * (1.0 / (1.0 - dropout_p))
    da = ds.t() @ (x2 if keep is None else x2 * keep)
    dx = None
    if need_dx:
        if keep is None:
            dx = torch.addmm(dy @ weight, ds, a)
        else:
            dx = (dy @ weight).add_((ds @ a).mul_(keep))
    dbias = dy.sum(0, dtype=torch.float32).to(dt) if need_dbias else None
    return dx, da.to(lora_A.dtype), db.to(lora_B.dtype), dbias


def _linear_on_triton(x2, weight) -> bool:
    """Whether this call runs the kernels; shapes with a zero dimension take the torch path."""
    return _use_triton(x2) and x2.shape[0] > 0 and x2.shape[1] > 0 and weight.shape[0] > 0


def _linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, triton_path):
    if triton_path:
        return _klinear.lora_linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return _torch_linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def _linear_bwd(dy, x2, s, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_dbias, triton_path):
    """The backward on the path the forward took (the two paths draw different dropout masks)."""
    if x2.shape[0] == 0:
        dx = x2.new_empty(x2.shape) if need_dx else None
        dbias = dy.new_zeros(dy.shape[1]) if need_dbias else None
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B), dbias
    if triton_path:
        return _klinear.lora_linear_bwd(
            dy, x2, s, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx=need_dx, need_dbias=need_dbias
        )
    return _torch_linear_bwd(dy, x2, s, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_dbias)


def _weight_grad(dy2, x2, weight):
    warnings.warn(
        "fastlora: the base weight requires grad, so its full gradient dW is formed; LoRA normally keeps it "
        "frozen (weight.requires_grad_(False))",
        stacklevel=3,
    )
    return (dy2.t() @ x2).to(weight.dtype)


# ----------------------------------------------------------------------------------------------------------
# Eager autograd function
# ----------------------------------------------------------------------------------------------------------


class LoRALinearFunction(torch.autograd.Function):
    """Y = x W^T + bias + s * ((m * x) A^T) B^T; backward gives dX, dA, dB (and dbias if bias is trainable)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        x2 = _as_rows(x)
        ctx.triton_path = _linear_on_triton(x2, weight)
        y2, s = _linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, ctx.triton_path)
        ctx.save_for_backward(x, s, weight, lora_A, lora_B)
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(s)
        # detach() drops the view link to y2: a custom Function's output that is a view forbids in-place ops on it,
        # which nn.Linear's output allows (`h = layer(x); h += residual`)
        return y2.reshape(*x.shape[:-1], weight.shape[0]).detach(), s

    @staticmethod
    def backward(ctx, dy, _ds_unused):
        x, s, weight, lora_A, lora_B = ctx.saved_tensors
        x2 = _as_rows(x)
        dy2 = _as_rows(dy).contiguous()
        need_dx, need_dw, need_dbias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dx, da, db, dbias = _linear_bwd(
            dy2,
            x2,
            s,
            weight,
            lora_A,
            lora_B,
            ctx.scaling,
            ctx.dropout_p,
            ctx.seed,
            need_dx,
            need_dbias,
            ctx.triton_path,
        )
        dw = _weight_grad(dy2, x2, weight) if need_dw else None
        dx = dx.reshape(x.shape) if dx is not None else None
        return dx, dw, dbias, da, db, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Custom ops for torch.compile
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastlora::lora_linear", mutates_args=())
def _lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    seed_int = int(seed.item()) if seed is not None else 0
    y2, s = _linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_int, _linear_on_triton(x, weight))
    return y2, s


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("fastlora::lora_linear_backward", mutates_args=())
def _lora_linear_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    need_dx: bool,
    need_dbias: bool,
    triton_path: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    seed_int = int(seed.item()) if seed is not None else 0
    dx, da, db, dbias = _linear_bwd(
        dy.contiguous(), x, s, weight, lora_A, lora_B, scaling, dropout_p, seed_int, need_dx, need_dbias, triton_path
    )
    dx = dx.contiguous() if dx is not None else x.new_empty(0)
    dbias = dbias if dbias is not None else dy.new_empty(0)
    return dx, da, db, dbias


@_lora_linear_bwd_op.register_fake
def _(dy, x, s, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_dbias, triton_path):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)  # contiguous, like the real dx, whatever x's strides
    dbias = dy.new_empty(dy.shape[1]) if need_dbias else dy.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B), dbias


def _lora_linear_setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, output[1], weight, lora_A, lora_B, seed)
    ctx.scaling, ctx.dropout_p, ctx.triton_path = scaling, dropout_p, _linear_on_triton(x, weight)


def _lora_linear_op_backward(ctx, dy, _ds_unused):
    x, s, weight, lora_A, lora_B, seed = ctx.saved_tensors
    need_dx, need_dw, need_dbias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dx, da, db, dbias = torch.ops.fastlora.lora_linear_backward(
        dy, x, s, weight, lora_A, lora_B, ctx.scaling, ctx.dropout_p, seed, need_dx, need_dbias, ctx.triton_path
    )
    dw = _weight_grad(dy, x, weight) if need_dw else None
    return (dx if need_dx else None), dw, (dbias if need_dbias else None), da, db, None, None, None


_lora_linear_op.register_autograd(_lora_linear_op_backward, setup_context=_lora_linear_setup)


# ----------------------------------------------------------------------------------------------------------
# Public functional API
# ----------------------------------------------------------------------------------------------------------


def autocast_enabled(device_type: str) -> bool:
    """Whether torch.autocast is on for this device type (never on a device without autocast, such as meta)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_inputs(x, *tensors):
    """Cast x and the frozen base tensors to the autocast dtype when autocast is on for x's device."""
    device_type = x.device.type
    if not autocast_enabled(device_type):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, *tensors))


def no_autocast(device_type: str):
    """Autocast off around an op that has cast its own inputs; a device without autocast (meta) needs nothing."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., C] as [prod(...), C]; unlike reshape(-1, C) this also works when C is 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def draw_seed() -> torch.Tensor:
    """A dropout seed from torch's default CPU generator (so torch.manual_seed and checkpointing replay it)."""
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True):
    """LoRA linear layer: Y = x W^T + bias + s * (dropout(x) A^T) B^T.

    Args:
        x: input [..., K], float16, bfloat16 or float32.
        weight: frozen base weight [N, K], same dtype as x. bias: [N] or None.
        lora_A: [r, K]; lora_B: [N, r]; any float dtype (computed in x's dtype, gradients in their own).
        scaling: s, usually alpha / r.
        dropout_p: dropout probability on the LoRA branch's input, in [0, 1); applied only when training.

    Returns:
        Y [..., N] in x's dtype (the autocast dtype under ``torch.autocast``).
    """
    _check_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    x, weight, bias = autocast_inputs(x, weight, bias)
    p = float(dropout_p) if training else 0.0
    scaling = float(scaling)
    with no_autocast(x.device.type):
        if torch.compiler.is_compiling():
            seed = draw_seed() if p > 0 else None
            y2, _ = torch.ops.fastlora.lora_linear(_as_rows(x), weight, bias, lora_A, lora_B, scaling, p, seed)
            return y2.reshape(*x.shape[:-1], weight.shape[0])
        seed = int(draw_seed()) if p > 0 else 0
        y, _ = LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, p, seed)
        return y


# ----------------------------------------------------------------------------------------------------------
# Merge
# ----------------------------------------------------------------------------------------------------------


def merge_delta_(weight_2d, lora_A_2d, lora_B_2d, scaling, sign=1.0, safe=False):
    """weight_2d += sign * s * B A, computed in float32 and rounded once; in place.

    weight_2d [N, K] (any strides, e.g. the transpose of an embedding table), lora_A_2d [r, K],
    lora_B_2d [N, r]. With ``safe=True`` a result with NaN or Inf raises ValueError and the weight is
    left unchanged.
    """
    if _kmerge is not None and _use_triton(weight_2d):
        _kmerge.merge_(weight_2d, lora_A_2d, lora_B_2d, float(sign * scaling), safe=safe)
        return weight_2d
    delta = (lora_B_2d.float() @ lora_A_2d.float()) * (sign * scaling)
    merged = weight_2d.float() + delta
    if safe and not (merged.abs() <= torch.finfo(weight_2d.dtype).max).all():
        raise ValueError("merging the adapter would make the weight non-finite (NaN or Inf); the weight is unchanged")
    weight_2d.copy_(merged)
    return weight_2d


# ==========================================================================================================
# Embedding
#
# idx [M] (any shape, flattened), W [V, D], A [r, V], B [D, r], Sa = A[:, idx]^T [M, r]:
#     Y  = W[idx] + s * Sa B^T
#     dB = s * dY^T Sa;   dA[:, idx] += s * (dY B)^T  (repeated indices add up; padding_idx gets nothing)
# Saved for backward: idx and the adapter tensors (aliases); Sa is gathered again, nothing of size M x D is kept.
# ==========================================================================================================

_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_embedding(idx, weight, lora_A, lora_B, scaling, padding_idx):
    """Validate the operands; return padding_idx as None or an index in [0, V)."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx must be a torch.Tensor of indices, got {type(idx).__name__}")
    if idx.dtype not in _INDEX_DTYPES:
        raise TypeError(f"idx must be an int32 or int64 tensor of indices, got {_dtype_name(idx.dtype)}")
    _check_tensor("weight", weight, ndim=2)
    _check_tensor("lora_A", lora_A, ndim=2)
    _check_tensor("lora_B", lora_B, ndim=2)
    num_embeddings, dim = weight.shape
    check_lora_factors(lora_A, lora_B, num_embeddings, dim, scaling)
    _check_same_device(idx=idx, weight=weight, lora_A=lora_A, lora_B=lora_B)
    if padding_idx is None:
        return None
    if not isinstance(padding_idx, int) or isinstance(padding_idx, bool):
        raise TypeError(f"padding_idx must be None or an int, got {type(padding_idx).__name__}")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx must be in [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
    return padding_idx % num_embeddings


def check_embedding_indices(idx: torch.Tensor, num_embeddings: int) -> None:
    """Raise ValueError unless every index is in [0, num_embeddings) (min and max taken on idx's device)."""
    if idx.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(idx.reshape(-1))).tolist()
    if lo < 0 or hi >= num_embeddings:
        raise ValueError(
            f"idx: embedding indices must be in [0, {num_embeddings}) for num_embeddings={num_embeddings}, "
            f"got indices from {lo} to {hi}"
        )


def _torch_embedding_fwd(idx1, weight, lora_A, lora_B, scaling, out_dtype):
    sa = lora_A.t()[idx1].to(out_dtype)  # [M, r]
    y = weight[idx1].to(out_dtype)
    return y.addmm_(sa, lora_B.to(out_dtype).t(), alpha=scaling)


def _torch_embedding_bwd(dy, idx1, lora_A, lora_B, scaling, padding_idx):
    dt = dy.dtype
    sa = lora_A.t()[idx1].to(dt)
    db = torch.mm(dy.t(), sa).mul_(scaling)
    ds = torch.mm(dy, lora_B.to(dt)).float().mul_(scaling)  # [M, r]
    if padding_idx is not None:
        ds.masked_fill_((idx1 == padding_idx)[:, None], 0.0)
    da = torch.zeros(lora_A.shape, dtype=torch.float32, device=dy.device).index_add_(1, idx1, ds.t())
    return da.to(lora_A.dtype), db.to(lora_B.dtype)


def _embedding_fwd(idx1, weight, lora_A, lora_B, scaling, out_dtype):
    if _use_triton(idx1):
        return _kembedding.lora_embedding_fwd(idx1, weight, lora_A, lora_B, scaling, out_dtype=out_dtype)
    check_embedding_indices(idx1, weight.shape[0])
    return _torch_embedding_fwd(idx1, weight, lora_A, lora_B, scaling, out_dtype)


def _embedding_bwd(dy, idx1, lora_A, lora_B, scaling, padding_idx):
    """(dA, dB). The forward checked this idx already, so the range check is not repeated."""
    if idx1.shape[0] == 0:
        return torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    if _use_triton(idx1):
        return _kembedding.lora_embedding_bwd(dy, idx1, lora_A, lora_B, scaling, padding_idx, check=False)
    return _torch_embedding_bwd(dy, idx1, lora_A, lora_B, scaling, padding_idx)


def _embedding_weight_grad(dy2, idx1, weight_shape, weight_dtype, padding_idx):
    warnings.warn(
        "fastlora: the base embedding weight requires grad, so its full gradient dW [V, D] is formed; LoRA "
        "normally keeps it frozen (weight.requires_grad_(False))",
        stacklevel=3,
    )
    dw = torch.zeros(weight_shape, dtype=torch.float32, device=dy2.device).index_add_(0, idx1, dy2.float())
    if padding_idx is not None:
        dw[padding_idx] = 0.0
    return dw.to(weight_dtype)


class LoRAEmbeddingFunction(torch.autograd.Function):
    """Y = W[idx] + s * A[:, idx]^T B^T; backward gives dA (scatter-add) and dB, never dW unless W is trainable."""

    @staticmethod
    def forward(ctx, idx, weight, lora_A, lora_B, scaling, padding_idx, out_dtype):
        idx1 = idx.reshape(-1)
        y2 = _embedding_fwd(idx1, weight, lora_A, lora_B, scaling, out_dtype)
        ctx.save_for_backward(idx, lora_A, lora_B)
        ctx.scaling, ctx.padding_idx = scaling, padding_idx
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        # detach() drops the view link to y2, so in-place ops on the output work as on nn.Embedding's
        return y2.reshape(*idx.shape, weight.shape[1]).detach()

    @staticmethod
    def backward(ctx, dy):
        idx, lora_A, lora_B = ctx.saved_tensors
        idx1 = idx.reshape(-1)
        dy2 = dy.reshape(-1, dy.shape[-1])
        da, db = _embedding_bwd(dy2, idx1, lora_A, lora_B, ctx.scaling, ctx.padding_idx)
        dw = None
        if ctx.needs_input_grad[1]:
            dw = _embedding_weight_grad(dy2, idx1, ctx.weight_shape, ctx.weight_dtype, ctx.padding_idx)
        return None, dw, da, db, None, None, None


@torch.library.custom_op("fastlora::lora_embedding", mutates_args=())
def _lora_embedding_op(
    idx: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    padding_idx: int | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return _embedding_fwd(idx, weight, lora_A, lora_B, scaling, out_dtype)


@_lora_embedding_op.register_fake
def _(idx, weight, lora_A, lora_B, scaling, padding_idx, out_dtype):
    return weight.new_empty((idx.shape[0], weight.shape[1]), dtype=out_dtype)


@torch.library.custom_op("fastlora::lora_embedding_backward", mutates_args=())
def _lora_embedding_bwd_op(
    dy: torch.Tensor,
    idx: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    padding_idx: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _embedding_bwd(dy, idx, lora_A, lora_B, scaling, padding_idx)


@_lora_embedding_bwd_op.register_fake
def _(dy, idx, lora_A, lora_B, scaling, padding_idx):
    return torch.empty_like(lora_A), torch.empty_like(lora_B)


def _lora_embedding_setup(ctx, inputs, output):
    idx, weight, lora_A, lora_B, scaling, padding_idx, _ = inputs
    ctx.save_for_backward(idx, lora_A, lora_B)
    ctx.scaling, ctx.padding_idx = scaling, padding_idx
    ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype


def _lora_embedding_op_backward(ctx, dy):
    idx, lora_A, lora_B = ctx.saved_tensors
    da, db = torch.ops.fastlora.lora_embedding_backward(dy, idx, lora_A, lora_B, ctx.scaling, ctx.padding_idx)
    dw = None
    if ctx.needs_input_grad[1]:
        dw = _embedding_weight_grad(dy, idx, ctx.weight_shape, ctx.weight_dtype, ctx.padding_idx)
    return None, dw, da, db, None, None, None


_lora_embedding_op.register_autograd(_lora_embedding_op_backward, setup_context=_lora_embedding_setup)


def lora_embedding(idx, weight, lora_A, lora_B, scaling, padding_idx=None):
    """LoRA embedding lookup: Y = W[idx] + s * A[:, idx]^T B^T.

    Args:
        idx: indices of any shape [...], int32 or int64, each in [0, V) (checked: ValueError otherwise).
        weight: frozen base table [V, D], float16, bfloat16 or float32.
        lora_A: [r, V]; lora_B: [D, r]; any float dtype (computed in Y's dtype, gradients in their own).
        scaling: s, usually alpha / r.
        padding_idx: None or an index in [-V, V); that row's LoRA factor (column of A) gets no gradient.
            The forward still returns its row, as nn.Embedding does.

    Returns:
        Y [..., D] in weight's dtype; under ``torch.autocast`` in the autocast dtype, as for lora_linear. Only
        the gathered rows are converted (inside the kernel), never the whole table.
    """
    padding_idx = _check_embedding(idx, weight, lora_A, lora_B, scaling, padding_idx)
    device_type = idx.device.type
    out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    scaling = float(scaling)
    with torch.autocast(device_type, enabled=False):
        if torch.compiler.is_compiling():
            y2 = torch.ops.fastlora.lora_embedding(
                idx.reshape(-1), weight, lora_A, lora_B, scaling, padding_idx, out_dtype
            )
            return y2.reshape(*idx.shape, weight.shape[1])
        return LoRAEmbeddingFunction.apply(idx, weight, lora_A, lora_B, scaling, padding_idx, out_dtype)


# ==========================================================================================================
# Conv2d
# ==========================================================================================================
#
# x [Nb, C, H, W], W [O, C/groups, kh, kw], A [r, C, kh, kw] (applied with groups=1, as PEFT does), B [O, r, 1, 1].
# As an implicit GEMM with rows m = (n, ho, wo), M = Nb*Ho*Wo, the linear formulas above carry over:
#
#     S  = conv(m * x, A)                        [M, r]   saved for backward, with x itself (an alias)
#     Y  = conv(x, W) + s * conv1x1(S, B) + bias
#     dS = s * dY B                              [M, r]
#     dB = s * dY^T S                            [O, r]
#     dA = dS^T im2col(m * x)                    [r, C, kh, kw]
#     dX = conv_transpose(dY, W) + m * conv_transpose(dS, A)
#
# Padding is carried as (top, bottom, left, right): 'same' with an even kernel extent pads one more at the
# bottom/right, as torch does.


# Rank above which the Triton conv kernels hand over to the torch path (their rank tile holds r whole).
CONV_MAX_TRITON_RANK = 64


def _conv_use_triton(x: torch.Tensor, r: int, m: int) -> bool:
    """Triton for float16/bfloat16 on CUDA (and every dtype under the interpreter, or when forced); the torch path
    otherwise. float32 on CUDA goes to cuDNN by default, which may use TF32 for convolutions where Triton's float32
    dot would run on plain FMA. Row indices are int32 inside the kernels: M and Nb*H*W stay below 2^31."""
    if _kconv is None or not _use_triton(x):
        return False
    if x.device.type == "cuda" and not INTERPRET and x.dtype == torch.float32 and _backend == "auto":
        return False
    rows = max(m, x.shape[0] * x.shape[2] * x.shape[3])
    return r <= CONV_MAX_TRITON_RANK and 0 < rows < 2**31


def _int_pair(name, value, minimum):
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair)
    ):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def conv2d_pads(padding, kernel_size, stride, dilation):
    """Normalise padding (int, pair, 'same' or 'valid') to (top, bottom, left, right)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        if stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1 (as in torch), got stride {stride}")
        pads = []
        for k, d in zip(kernel_size, dilation, strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = _int_pair("padding", padding, 0)
    return (ph, ph, pw, pw)


def _check_conv2d(x, weight, bias, lora_A, lora_B, scaling, stride, padding, dilation, groups, dropout_p):
    """Validate a lora_conv2d call; returns (stride, pads, dilation, groups) normalised."""
    _check_tensor("x", x, ndim=4)
    _check_tensor("weight", weight, ndim=4)
    _check_tensor("lora_A", lora_A, ndim=4)
    _check_tensor("lora_B", lora_B, ndim=4)
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
    if x.dtype != weight.dtype:
        raise TypeError(f"x is {_dtype_name(x.dtype)} but weight is {_dtype_name(weight.dtype)}; they must match")
    if bias is not None:
        _check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != o:
            raise ValueError(f"bias must have shape [{o}], got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias is {_dtype_name(bias.dtype)} but weight is {_dtype_name(weight.dtype)}")
    r = lora_A.shape[0]
    if r < 1 or tuple(lora_A.shape[1:]) != (c, kh, kw):
        raise ValueError(f"lora_A must have shape [r, {c}, {kh}, {kw}] with r >= 1, got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (o, r, 1, 1):
        raise ValueError(f"lora_B must have shape [{o}, {r}, 1, 1] to match lora_A, got {tuple(lora_B.shape)}")
    check_lora_factors(lora_A, lora_B, c * kh * kw, o, scaling)
    check_dropout(dropout_p)
    _check_same_device(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    stride = _int_pair("stride", stride, 1)
    dilation = _int_pair("dilation", dilation, 1)
    pads = conv2d_pads(padding, (kh, kw), stride, dilation)
    ho = (h + pads[0] + pads[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + pads[2] + pads[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(
            f"the input of spatial size {h}x{w} is smaller than the dilated kernel {kh}x{kw} "
            f"(dilation {dilation}, padding {pads}): the output would be {ho}x{wo}"
        )
    return stride, pads, dilation, groups


def _conv_out_format(x: torch.Tensor):
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _pad_extra(t, pads):
    """t padded with zeros at the bottom/right by what asymmetric pads add beyond the symmetric top/left pads."""
    extra_h, extra_w = pads[1] - pads[0], pads[3] - pads[2]
    if extra_h == 0 and extra_w == 0:
        return t
    return torch.nn.functional.pad(t, (0, extra_w, 0, extra_h))


def _conv_keep(seed, x, p):
    return dropout_keep(seed, x.shape, p, x.device).to(x.dtype) * (1.0 / (1.0 - p))


def _torch_conv_fwd(x, weight, bias, lora_A, lora_B, scaling, stride, pads, dilation, groups, dropout_p, seed):
    dt = x.dtype
    conv = torch.nn.functional.conv2d
    sym = (pads[0], pads[2])
    x_lora = x if dropout_p == 0 else x * _conv_keep(seed, x, dropout_p)
    s4 = conv(_pad_extra(x_lora, pads), lora_A.to(dt), None, stride, sym, dilation)  # [Nb, r, Ho, Wo]
    y = conv(_pad_extra(x, pads), weight, bias, stride, sym, dilation, groups)
    y.add_(conv(s4, lora_B.to(dt)), alpha=scaling)
    y = y.contiguous(memory_format=_conv_out_format(x))
    return y, s4.permute(0, 2, 3, 1).reshape(-1, lora_A.shape[0])


def _conv_grad_input(x, weight, dy, stride, pads, dilation, groups):
    xp = _pad_extra(x, pads)
    dx = torch.ops.aten.convolution_backward(
        dy, xp, weight, None, list(stride), [pads[0], pads[2]], list(dilation), False, [0, 0], groups,
        [True, False, False],
    )[0]  # fmt: skip
    return dx[:, :, : x.shape[2], : x.shape[3]]


def _torch_conv_bwd(
    dy, x, s, weight, lora_A, lora_B, scaling, stride, pads, dilation, groups, dropout_p, seed, need_dx, need_dbias
):
    dt = dy.dtype
    nb, _, ho, wo = dy.shape
    r = lora_A.shape[0]
    a, b = lora_A.to(dt), lora_B.to(dt)
    s4 = s.reshape(nb, ho, wo, r).permute(0, 3, 1, 2)
    ds4 = torch.nn.functional.conv2d(dy, b.permute(1, 0, 2, 3)).mul_(scaling)  # [Nb, r, Ho, Wo]
    db = torch.einsum("nohw,nrhw->or", dy, s4).mul_(scaling).reshape(lora_B.shape)
    keep = _conv_keep(seed, x, dropout_p) if dropout_p > 0 else None
    x_lora = x if keep is None else x * keep
    da = torch.ops.aten.convolution_backward(
        ds4, _pad_extra(x_lora, pads), a, None, list(stride), [pads[0], pads[2]], list(dilation), False, [0, 0], 1,
        [False, True, False],
    )[1]  # fmt: skip
    dx = None
    if need_dx:
        dx_lora = _conv_grad_input(x, a, ds4, stride, pads, dilation, 1)
        dx = _conv_grad_input(x, weight, dy, stride, pads, dilation, groups)
        dx = dx.add_(dx_lora if keep is None else dx_lora.mul_(keep)).contiguous(memory_format=_conv_out_format(x))
    dbias = dy.sum((0, 2, 3), dtype=torch.float32).to(dt) if need_dbias else None
    return dx, da.to(lora_A.dtype), db.to(lora_B.dtype), dbias


def _conv_on_triton(x, weight, lora_A, stride, pads, dilation) -> bool:
    """Whether a conv call runs the kernels; decided once in forward, and backward follows it (the two paths
    draw different dropout masks)."""
    nb, _, ho, wo = _conv_out_shape(x, weight, stride, pads, dilation)
    return _conv_use_triton(x, lora_A.shape[0], nb * ho * wo) and x.numel() > 0


def _conv_fwd(x, weight, bias, lora_A, lora_B, scaling, stride, pads, dilation, groups, dropout_p, seed, triton_path):
    if triton_path:
        return _kconv.lora_conv2d_fwd(
            x, weight, bias, lora_A, lora_B, scaling, stride, pads, dilation, groups, dropout_p, seed
        )
    return _torch_conv_fwd(x, weight, bias, lora_A, lora_B, scaling, stride, pads, dilation, groups, dropout_p, seed)


def _conv_bwd(
    dy, x, s, weight, lora_A, lora_B, scaling, stride, pads, dilation, groups, dropout_p, seed, need_dx, need_dbias,
    triton_path,
):  # fmt: skip
    if x.shape[0] == 0:
        dx = torch.zeros_like(x) if need_dx else None
        dbias = dy.new_zeros(dy.shape[1]) if need_dbias else None
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B), dbias
    args = (dy, x, s, weight, lora_A, lora_B, scaling, stride, pads, dilation, groups, dropout_p, seed)
    if triton_path:
        return _kconv.lora_conv2d_bwd(*args, need_dx=need_dx, need_dbias=need_dbias)
    return _torch_conv_bwd(*args, need_dx, need_dbias)


def _conv_weight_grad(dy, x, weight, stride, pads, dilation, groups):
    warnings.warn(
        "fastlora: the base weight requires grad, so its full gradient dW is formed; LoRA normally keeps it "
        "frozen (weight.requires_grad_(False))",
        stacklevel=3,
    )
    return torch.ops.aten.convolution_backward(
        dy, _pad_extra(x, pads), weight, None, list(stride), [pads[0], pads[2]], list(dilation), False, [0, 0],
        groups, [False, True, False],
    )[1]  # fmt: skip


class LoRAConv2dFunction(torch.autograd.Function):
    """Y = conv(x, W) + bias + s * conv1x1(conv(m * x, A), B); backward gives dX, dA, dB (and dbias if trainable).

    Saves x (an alias), S [M, r] and the seed; never a mask, never a dropped copy of x.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, stride, pads, dilation, groups, dropout_p, seed):
        ctx.triton_path = _conv_on_triton(x, weight, lora_A, stride, pads, dilation)
        y, s = _conv_fwd(
            x, weight, bias, lora_A, lora_B, scaling, stride, pads, dilation, groups, dropout_p, seed, ctx.triton_path
        )
        ctx.save_for_backward(x, s, weight, lora_A, lora_B)
        ctx.conv = (scaling, stride, pads, dilation, groups, dropout_p, seed)
        ctx.mark_non_differentiable(s)
        return y, s

    @staticmethod
    def backward(ctx, dy, _ds_unused):
        x, s, weight, lora_A, lora_B = ctx.saved_tensors
        scaling, stride, pads, dilation, groups, dropout_p, seed = ctx.conv
        need_dx, need_dw, need_dbias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dx, da, db, dbias = _conv_bwd(
            dy, x, s, weight, lora_A, lora_B, scaling, stride, pads, dilation, groups, dropout_p, seed,
            need_dx, need_dbias, ctx.triton_path,
        )  # fmt: skip
        dw = _conv_weight_grad(dy, x, weight, stride, pads, dilation, groups) if need_dw else None
        return dx, dw, dbias, da, db, None, None, None, None, None, None, None


def _conv_out_shape(x, weight, stride, pads, dilation):
    kh, kw = weight.shape[2], weight.shape[3]
    ho = (x.shape[2] + pads[0] + pads[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] + pads[2] + pads[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.shape[0], weight.shape[0], ho, wo


@torch.library.custom_op("fastlora::lora_conv2d", mutates_args=())
def _lora_conv2d_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    stride: list[int],
    pads: list[int],
    dilation: list[int],
    groups: int,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    seed_int = int(seed.item()) if seed is not None else 0
    stride, pads, dilation = tuple(stride), tuple(pads), tuple(dilation)
    triton_path = _conv_on_triton(x, weight, lora_A, stride, pads, dilation)
    y, s = _conv_fwd(
        x, weight, bias, lora_A, lora_B, scaling, stride, pads, dilation, groups, dropout_p, seed_int, triton_path
    )
    return y, s


@_lora_conv2d_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, stride, pads, dilation, groups, dropout_p, seed):
    nb, o, ho, wo = _conv_out_shape(x, weight, stride, pads, dilation)
    y = torch.empty((nb, o, ho, wo), dtype=x.dtype, device=x.device, memory_format=_conv_out_format(x))
    return y, x.new_empty(nb * ho * wo, lora_A.shape[0])


@torch.library.custom_op("fastlora::lora_conv2d_backward", mutates_args=())
def _lora_conv2d_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    stride: list[int],
    pads: list[int],
    dilation: list[int],
    groups: int,
    dropout_p: float,
    seed: torch.Tensor | None,
    need_dx: bool,
    need_dbias: bool,
    triton_path: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    seed_int = int(seed.item()) if seed is not None else 0
    dx, da, db, dbias = _conv_bwd(
        dy, x, s, weight, lora_A, lora_B, scaling, tuple(stride), tuple(pads), tuple(dilation), groups, dropout_p,
        seed_int, need_dx, need_dbias, triton_path,
    )  # fmt: skip
    dx = dx.contiguous(memory_format=_conv_out_format(x)) if dx is not None else x.new_empty(0)
    dbias = dbias if dbias is not None else dy.new_empty(0)
    return dx, da.contiguous(), db.contiguous(), dbias


@_lora_conv2d_bwd_op.register_fake
def _(
    dy, x, s, weight, lora_A, lora_B, scaling, stride, pads, dilation, groups, dropout_p, seed, need_dx, need_dbias,
    triton_path,
):  # fmt: skip
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_conv_out_format(x))
    dx = dx if need_dx else x.new_empty(0)
    dbias = dy.new_empty(dy.shape[1]) if need_dbias else dy.new_empty(0)
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape), dbias


def _lora_conv2d_setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, stride, pads, dilation, groups, dropout_p, seed = inputs
    ctx.save_for_backward(x, output[1], weight, lora_A, lora_B, seed)
    ctx.conv = (scaling, stride, pads, dilation, groups, dropout_p)
    ctx.triton_path = _conv_on_triton(x, weight, lora_A, tuple(stride), tuple(pads), tuple(dilation))


def _lora_conv2d_op_backward(ctx, dy, _ds_unused):
    x, s, weight, lora_A, lora_B, seed = ctx.saved_tensors
    scaling, stride, pads, dilation, groups, dropout_p = ctx.conv
    need_dx, need_dw, need_dbias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dx, da, db, dbias = torch.ops.fastlora.lora_conv2d_backward(
        dy, x, s, weight, lora_A, lora_B, scaling, stride, pads, dilation, groups, dropout_p, seed,
        need_dx, need_dbias, ctx.triton_path,
    )  # fmt: skip
    dw = _conv_weight_grad(dy, x, weight, stride, pads, dilation, groups) if need_dw else None
    return (
        (dx if need_dx else None), dw, (dbias if need_dbias else None), da, db,
        None, None, None, None, None, None, None,
    )  # fmt: skip


_lora_conv2d_op.register_autograd(_lora_conv2d_op_backward, setup_context=_lora_conv2d_setup)


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
    stride, pads, dilation, groups = _check_conv2d(
        x, weight, bias, lora_A, lora_B, scaling, stride, padding, dilation, groups, dropout_p
    )
    x, weight, bias = autocast_inputs(x, weight, bias)
    p = float(dropout_p) if training else 0.0
    scaling = float(scaling)
    with torch.autocast(x.device.type, enabled=False):
        if torch.compiler.is_compiling():
            seed = draw_seed() if p > 0 else None
            y, _ = torch.ops.fastlora.lora_conv2d(
                x, weight, bias, lora_A, lora_B, scaling, list(stride), list(pads), list(dilation), groups, p, seed
            )
            return y
        seed = int(draw_seed()) if p > 0 else 0
        y, _ = LoRAConv2dFunction.apply(
            x, weight, bias, lora_A, lora_B, scaling, stride, pads, dilation, groups, p, seed
        )
        return y
