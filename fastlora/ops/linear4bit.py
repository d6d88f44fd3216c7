"""LoRA over a 4-bit (bitsandbytes NF4/FP4) frozen base weight: validation, the torch path, and the op (eager and
compiled, defined once: see ``fastlora.ops._define``) over the kernels of ``fastlora.kernels.nf4``.

W [N, K] stays packed (bitsandbytes' ``Params4bit`` data and ``QuantState``); with x [M, K], A [r, K], B [N, r],
s the scaling and m the dropout mask (drawn from a seed, regenerated in backward, never stored):

    S  = (m * x) A^T            [M, r]   saved for backward, with x itself (an alias)
    Y  = x deq(W)^T + s * S B^T + bias
    dS = s * dY B;  dB = s * dY^T S;  dA = dS^T (m * x)
    dX = dY deq(W) + m * (dS A)

deq(W) is bitsandbytes' dequantization (fastlora.reference_4bit), cast to x's dtype. Nothing of N x K elements
is kept: backward dequantizes again (the packed weight and the quant_state tensors are what it saves). The Triton
path (``fastlora.kernels.nf4``) runs dequantizing inside the GEMM or a shared workspace plus the fused LoRA GEMM,
whichever kernels/dispatch.py timed faster for the shape where both can run (small M), the workspace above; the
torch path dequantizes with bitsandbytes into a temporary and runs the
dense layer's torch path. Needs bitsandbytes (``pip install fastlora[qlora]``).
"""

from __future__ import annotations

import math

import torch

from fastlora.checks import check_dropout, check_lora_factors, check_same_device, check_tensor, dtype_name
from fastlora.kernels.quant4bit import Quant4bit
from fastlora.ops import linear as _linear
from fastlora.ops._define import Op
from fastlora.ops.backend import HAS_TRITON, as_rows, autocast_enabled, draw_seed, no_autocast, use_triton
from fastlora.reference_4bit import dequantize_4bit_ref

if HAS_TRITON:
    from fastlora.kernels import nf4 as _knf4


__all__ = ["lora_linear_4bit", "quant_tensors", "check_quant_state", "check_linear4bit", "LINEAR_4BIT"]

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (64, 128, 256)
_STORAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def _quant_state_class():
    try:
        from bitsandbytes.functional import QuantState
    except ImportError as err:
        raise ImportError("4-bit LoRA needs bitsandbytes: pip install fastlora[qlora]") from err
    return QuantState


def check_quant_state(weight_packed, quant_state) -> tuple[int, int]:
    """(N, K) of a packed 4-bit weight and its bitsandbytes QuantState; TypeError/ValueError if they do not fit."""
    if not isinstance(quant_state, _quant_state_class()):
        raise TypeError(
            "quant_state must be a bitsandbytes QuantState (the .quant_state of a Params4bit weight), "
            f"got {type(quant_state).__name__}"
        )
    if quant_state.quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_state.quant_type must be one of {QUANT_TYPES}, got {quant_state.quant_type!r}")
    if quant_state.blocksize not in BLOCKSIZES:
        raise ValueError(f"quant_state.blocksize must be one of {BLOCKSIZES}, got {quant_state.blocksize!r}")
    shape = tuple(quant_state.shape) if quant_state.shape is not None else ()
    if len(shape) != 2:
        raise ValueError(f"quant_state.shape must be the 2-D weight shape [N, K], got {shape}")
    if quant_state.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quant_state.dtype must be float16, bfloat16 or float32, got {quant_state.dtype}")
    n, k = shape
    if not isinstance(weight_packed, torch.Tensor):
        raise TypeError(f"weight_packed must be a torch.Tensor, got {type(weight_packed).__name__}")
    nbytes = (n * k + 1) // 2
    if (
        weight_packed.dtype not in _STORAGE_DTYPES
        or weight_packed.numel() * weight_packed.element_size() != nbytes
        or not weight_packed.is_contiguous()
    ):
        raise ValueError(
            f"weight_packed must be bitsandbytes' packed 4-bit data of the [{n}, {k}] weight: a contiguous uint8 "
            f"(or 16/32-bit storage) tensor of {nbytes} bytes, got {dtype_name(weight_packed.dtype)} of shape "
            f"{tuple(weight_packed.shape)} (for a dense weight use fastlora.lora_linear)"
        )
    code = quant_state.code
    if not isinstance(code, torch.Tensor) or code.numel() != 16 or code.dtype != torch.float32:
        raise ValueError("quant_state.code must be the 16-entry float32 4-bit code table")
    blocks = -(-n * k // quant_state.blocksize)
    absmax = quant_state.absmax
    if quant_state.nested:
        state2 = quant_state.state2
        if absmax.dtype != torch.uint8 or quant_state.offset is None:
            raise ValueError("a nested quant_state must have uint8 absmax and an offset")
        if state2.absmax.dtype != torch.float32 or state2.code.numel() != 256 or state2.blocksize < 1:
            raise ValueError("quant_state.state2 must hold float32 absmax, a 256-entry code and a block size")
        if state2.absmax.numel() != -(-blocks // state2.blocksize):
            raise ValueError(f"quant_state.state2.absmax has {state2.absmax.numel()} blocks, expected "
                             f"{-(-blocks // state2.blocksize)}")  # fmt: skip
    elif absmax.dtype != torch.float32:
        raise ValueError(f"quant_state.absmax must be float32 (or uint8 with a nested state), got {absmax.dtype}")
    if absmax.numel() != blocks:
        raise ValueError(f"quant_state.absmax has {absmax.numel()} blocks, expected {blocks} for {n * k} elements")
    check_same_device(weight_packed=weight_packed, absmax=absmax, code=code)
    return n, k


def check_linear4bit(x, weight_packed, quant_state, bias, lora_A, lora_B, scaling, dropout_p):
    check_tensor("x", x)
    check_tensor("lora_A", lora_A, ndim=2)
    check_tensor("lora_B", lora_B, ndim=2)
    n, k = check_quant_state(weight_packed, quant_state)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (its last is in_features)")
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension must be in_features={k}, got x of shape {tuple(x.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != n:
            raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
    check_lora_factors(lora_A, lora_B, k, n, scaling)
    check_dropout(dropout_p)
    check_same_device(x=x, weight_packed=weight_packed, bias=bias, lora_A=lora_A, lora_B=lora_B)


def quant_tensors(weight_packed, quant_state) -> Quant4bit:
    """The packed weight and its QuantState as plain tensors (no copies): what the kernels and custom ops take."""
    n, k = quant_state.shape
    nested = quant_state.state2 if quant_state.nested else None
    return Quant4bit(
        packed=weight_packed.view(torch.uint8).reshape(-1),
        absmax=quant_state.absmax,
        code=quant_state.code,
        blocksize=int(quant_state.blocksize),
        shape=(int(n), int(k)),
        dtype=quant_state.dtype,
        absmax2=nested.absmax if nested is not None else None,
        code2=nested.code if nested is not None else None,
        offset=quant_state.offset if nested is not None else None,
        blocksize2=int(nested.blocksize) if nested is not None else 256,
        quant_type=quant_state.quant_type,
    )


def _bnb_state(q: Quant4bit):
    """A bitsandbytes QuantState over the same tensors, for its dequantization on the torch path."""
    QuantState = _quant_state_class()
    state2 = None
    if q.nested:
        state2 = QuantState(absmax=q.absmax2, code=q.code2, blocksize=q.blocksize2, dtype=torch.float32)
    return QuantState(
        absmax=q.absmax,
        shape=torch.Size(q.shape),
        code=q.code,
        blocksize=q.blocksize,
        quant_type=q.quant_type,
        dtype=q.dtype,
        offset=q.offset,
        state2=state2,
    )


# ----------------------------------------------------------------------------------------------------------
# Torch path: bitsandbytes' dequantization into a temporary (never saved), then the dense layer's torch path
# ----------------------------------------------------------------------------------------------------------


def _dequantize(q: Quant4bit, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_4bit_ref(q.packed, _bnb_state(q)).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# The op: the quant_state goes in as its tensors and plain values
# ----------------------------------------------------------------------------------------------------------


def _quant(a) -> Quant4bit:
    nested = a.absmax2 is not None
    return Quant4bit(
        packed=a.packed,
        absmax=a.absmax,
        code=a.code,
        blocksize=a.blocksize,
        shape=(a.out_features, a.x.shape[-1]),
        dtype=a.w_dtype,
        absmax2=a.absmax2,
        code2=a.code2,
        offset=a.offset,
        blocksize2=a.blocksize2 if nested else 256,
        quant_type=a.quant_type,
    )


def _path(a) -> bool:
    """The kernels unless the device takes the torch path; shapes with a zero dimension take the torch path too."""
    return HAS_TRITON and use_triton(a.x) and a.x.numel() > 0 and a.out_features > 0


def _forward(a, triton):
    x2, q = as_rows(a.x), _quant(a)
    args = (a.bias, a.lora_A, a.lora_B, a.scaling, a.dropout_p, a.seed)
    if triton:
        y2, s = _knf4.lora_linear_4bit_fwd(x2, q, *args)
    else:
        y2, s = _linear.torch_fwd(x2, _dequantize(q, x2.dtype), *args)
    return y2.reshape(*a.x.shape[:-1], a.out_features), s


def _backward(a, saved, grads, needs, triton):
    (s,), (dy,) = saved, grads
    need_dx, need_dbias = needs[0], needs[1]
    x2, dy2, q = as_rows(a.x), as_rows(dy).contiguous(), _quant(a)
    if x2.shape[0] == 0:
        dx = x2.new_zeros(x2.shape) if need_dx else None
        dbias = dy2.new_zeros(dy2.shape[1]) if need_dbias else None
        da, db = torch.zeros_like(a.lora_A), torch.zeros_like(a.lora_B)
    elif triton:
        dx, da, db, dbias = _knf4.lora_linear_4bit_bwd(
            dy2, x2, s, q, a.lora_A, a.lora_B, a.scaling, a.dropout_p, a.seed, need_dx=need_dx, need_dbias=need_dbias
        )
    else:
        weight = _dequantize(q, dy2.dtype) if need_dx else None
        dx, da, db, dbias = _linear.torch_bwd(
            dy2, x2, s, weight, a.lora_A, a.lora_B, a.scaling, a.dropout_p, a.seed, need_dx, need_dbias
        )
    return (dx.reshape(a.x.shape) if dx is not None else None), dbias, da, db


def _fake(a):
    m = math.prod(a.x.shape[:-1])
    return a.x.new_empty(*a.x.shape[:-1], a.out_features), a.x.new_empty(m, a.lora_A.shape[0])


LINEAR_4BIT = Op(
    "lora_linear_4bit",
    "Tensor x, Tensor packed, Tensor absmax, Tensor code, Tensor? absmax2, Tensor? code2, Tensor? offset, "
    "Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, Tensor? seed, int blocksize, "
    "int blocksize2, str quant_type, int out_features, ScalarType w_dtype",
    outputs=("y", "s"),
    differentiable=("x", "bias", "lora_A", "lora_B"),
    saved_outputs=("s",),
    saved_when_trained=("bias",),
    forward=_forward,
    backward=_backward,
    fake=_fake,
    path=_path,
)


# ----------------------------------------------------------------------------------------------------------
# Public functional API
# ----------------------------------------------------------------------------------------------------------


def lora_linear_4bit(x, weight_packed, quant_state, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True):
    """LoRA linear layer over a bitsandbytes 4-bit weight: Y = x deq(W)^T + bias + s * (dropout(x) A^T) B^T.

    Args:
        x: input [..., K], float16, bfloat16 or float32 (the compute dtype; deq(W) is cast to it).
        weight_packed: the packed 4-bit W (a ``Params4bit``'s data: uint8, or the quant_storage dtype).
        quant_state: its bitsandbytes ``QuantState`` (NF4 or FP4, plain or nested absmax; shape [N, K]).
        bias: [N] or None (cast to x's dtype, as bitsandbytes does).
        lora_A: [r, K]; lora_B: [N, r]; any float dtype (computed in x's dtype, gradients in their own).
        scaling: s, usually alpha / r.
        dropout_p: dropout probability on the LoRA branch's input, in [0, 1); applied only when training.

    Returns:
        Y [..., N] in x's dtype (the autocast dtype under ``torch.autocast``).
    """
    check_linear4bit(x, weight_packed, quant_state, bias, lora_A, lora_B, scaling, dropout_p)
    if autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    q = quant_tensors(weight_packed, quant_state)
    p = float(dropout_p) if training else 0.0
    with no_autocast(x.device.type):
        y, _ = LINEAR_4BIT(
            x, q.packed, q.absmax, q.code, q.absmax2, q.code2, q.offset, bias, lora_A, lora_B, float(scaling), p,
            draw_seed(x) if p > 0 else None, q.blocksize, q.blocksize2, q.quant_type, q.shape[0], q.dtype,
        )  # fmt: skip
    return y
