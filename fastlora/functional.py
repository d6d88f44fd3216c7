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
    from fastlora.kernels import linear as _klinear
    from fastlora.kernels import merge as _kmerge
    from fastlora.kernels.configs import INTERPRET
except ImportError:  # no Triton on this platform: the torch path serves every call
    _klinear = _kmerge = None
    INTERPRET = False

__all__ = ["lora_linear", "use_backend", "get_backend", "merge_delta_", "active_path"]

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


def _linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    if _use_triton(x2):
        return _klinear.lora_linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return _torch_linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def _linear_bwd(dy, x2, s, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_dbias):
    if x2.shape[0] == 0:
        dx = x2.new_empty(x2.shape) if need_dx else None
        dbias = dy.new_zeros(dy.shape[1]) if need_dbias else None
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B), dbias
    if _use_triton(x2):
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
        y2, s = _linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
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
            dy2, x2, s, weight, lora_A, lora_B, ctx.scaling, ctx.dropout_p, ctx.seed, need_dx, need_dbias
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
    y2, s = _linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_int)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    seed_int = int(seed.item()) if seed is not None else 0
    dx, da, db, dbias = _linear_bwd(
        dy.contiguous(), x, s, weight, lora_A, lora_B, scaling, dropout_p, seed_int, need_dx, need_dbias
    )
    dx = dx.contiguous() if dx is not None else x.new_empty(0)
    dbias = dbias if dbias is not None else dy.new_empty(0)
    return dx, da, db, dbias


@_lora_linear_bwd_op.register_fake
def _(dy, x, s, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_dbias):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)  # contiguous, like the real dx, whatever x's strides
    dbias = dy.new_empty(dy.shape[1]) if need_dbias else dy.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B), dbias


def _lora_linear_setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, output[1], weight, lora_A, lora_B, seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _lora_linear_op_backward(ctx, dy, _ds_unused):
    x, s, weight, lora_A, lora_B, seed = ctx.saved_tensors
    need_dx, need_dw, need_dbias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dx, da, db, dbias = torch.ops.fastlora.lora_linear_backward(
        dy, x, s, weight, lora_A, lora_B, ctx.scaling, ctx.dropout_p, seed, need_dx, need_dbias
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
    if safe and not torch.isfinite(merged).all():
        raise ValueError("merging the adapter would make the weight non-finite (NaN or Inf); the weight is unchanged")
    weight_2d.copy_(merged)
    return weight_2d

