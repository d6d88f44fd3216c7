"""LoRA over a 4-bit (bitsandbytes NF4/FP4) frozen base weight: validation, torch path, autograd function,
custom ops for torch.compile and the functional entry point.

W [N, K] stays packed (bitsandbytes' ``Params4bit`` data and ``QuantState``); with x [M, K], A [r, K], B [N, r],
s the scaling and m the dropout mask (drawn from a seed, regenerated in backward, never stored):

    S  = (m * x) A^T            [M, r]   saved for backward, with x itself (an alias)
    Y  = x deq(W)^T + s * S B^T + bias
    dS = s * dY B;  dB = s * dY^T S;  dA = dS^T (m * x)
    dX = dY deq(W) + m * (dS A)

deq(W) is bitsandbytes' dequantization (fastlora.reference_4bit), cast to x's dtype. Nothing of N x K elements
is kept: backward dequantizes again (the packed weight and the quant_state tensors are what it saves). The Triton
path (``fastlora.kernels.nf4``) picks per call between dequantizing inside the GEMM (small M) and a shared
workspace plus the fused LoRA GEMM; the torch path dequantizes with bitsandbytes into a temporary and runs the
dense layer's torch path. Needs bitsandbytes (``pip install fastlora[qlora]``).
"""

from __future__ import annotations

import torch

from fastlora.functional import (
    _as_rows,
    _check_same_device,
    _check_tensor,
    _dtype_name,
    _torch_linear_bwd,
    _torch_linear_fwd,
    _use_triton,
    autocast_enabled,
    check_dropout,
    check_lora_factors,
    draw_seed,
    no_autocast,
)
from fastlora.reference_4bit import dequantize_4bit_ref

try:
    from fastlora.kernels import nf4 as _knf4
    from fastlora.kernels.nf4 import Quant4bit
except ImportError:  # no Triton on this platform: the torch path serves every call
    _knf4 = None
    from typing import NamedTuple

    class Quant4bit(NamedTuple):  # the same fields as fastlora.kernels.nf4.Quant4bit
        packed: torch.Tensor
        absmax: torch.Tensor
        code: torch.Tensor
        blocksize: int
        shape: tuple[int, int]
        dtype: torch.dtype
        absmax2: torch.Tensor | None = None
        code2: torch.Tensor | None = None
        offset: torch.Tensor | None = None
        blocksize2: int = 256
        quant_type: str = "nf4"


__all__ = ["lora_linear_4bit", "quant_tensors"]

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
            f"(or 16/32-bit storage) tensor of {nbytes} bytes, got {_dtype_name(weight_packed.dtype)} of shape "
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
    _check_same_device(weight_packed=weight_packed, absmax=absmax, code=code)
    return n, k


def _check_linear4bit(x, weight_packed, quant_state, bias, lora_A, lora_B, scaling, dropout_p):
    _check_tensor("x", x)
    _check_tensor("lora_A", lora_A, ndim=2)
    _check_tensor("lora_B", lora_B, ndim=2)
    n, k = check_quant_state(weight_packed, quant_state)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (its last is in_features)")
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension must be in_features={k}, got x of shape {tuple(x.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != n:
            raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
    check_lora_factors(lora_A, lora_B, k, n, scaling)
    check_dropout(dropout_p)
    _check_same_device(x=x, weight_packed=weight_packed, bias=bias, lora_A=lora_A, lora_B=lora_B)


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
# Paths: the Triton kernels, or torch with bitsandbytes' dequantization (a temporary, never saved)
# ----------------------------------------------------------------------------------------------------------


def _dequantize(q: Quant4bit, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_4bit_ref(q.packed, _bnb_state(q)).to(dtype)


def _on_triton(x2, q: Quant4bit) -> bool:
    """Whether this call runs the kernels; shapes with a zero dimension take the torch path."""
    return _knf4 is not None and _use_triton(x2) and x2.shape[0] > 0 and x2.shape[1] > 0 and q.shape[0] > 0


def _fwd(x2, q, bias, lora_A, lora_B, scaling, dropout_p, seed, triton_path):
    if triton_path:
        return _knf4.lora_linear_4bit_fwd(x2, q, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return _torch_linear_fwd(x2, _dequantize(q, x2.dtype), bias, lora_A, lora_B, scaling, dropout_p, seed)


def _bwd(dy, x2, s, q, lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_dbias, triton_path):
    """The backward on the path (and, on Triton, the route) the forward took."""
    if x2.shape[0] == 0:
        dx = x2.new_zeros(x2.shape) if need_dx else None
        dbias = dy.new_zeros(dy.shape[1]) if need_dbias else None
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B), dbias
    if triton_path:
        return _knf4.lora_linear_4bit_bwd(
            dy, x2, s, q, lora_A, lora_B, scaling, dropout_p, seed, need_dx=need_dx, need_dbias=need_dbias
        )
    weight = _dequantize(q, dy.dtype) if need_dx else None
    return _torch_linear_bwd(dy, x2, s, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_dbias)


# ----------------------------------------------------------------------------------------------------------
# Eager autograd function
# ----------------------------------------------------------------------------------------------------------


class LoRALinear4bitFunction(torch.autograd.Function):
    """Y = x deq(W)^T + bias + s * ((m * x) A^T) B^T; backward gives dX, dA, dB (and dbias if bias is trainable).
    The packed W gets no gradient."""

    @staticmethod
    def forward(ctx, x, weight_packed, bias, lora_A, lora_B, q, scaling, dropout_p, seed):
        x2 = _as_rows(x)
        ctx.triton_path = _on_triton(x2, q)
        y2, s = _fwd(x2, q, bias, lora_A, lora_B, scaling, dropout_p, seed, ctx.triton_path)
        ctx.save_for_backward(x, s, weight_packed, lora_A, lora_B)
        ctx.q = q._replace(packed=None)  # the quant_state tensors; the packed weight goes through save_for_backward
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        ctx.mark_non_differentiable(s)
        return y2.reshape(*x.shape[:-1], q.shape[0]).detach(), s

    @staticmethod
    def backward(ctx, dy, _ds_unused):
        x, s, weight_packed, lora_A, lora_B = ctx.saved_tensors
        q = ctx.q._replace(packed=weight_packed.view(torch.uint8).reshape(-1))
        x2 = _as_rows(x)
        dy2 = _as_rows(dy).contiguous()
        need_dx, need_dbias = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        dx, da, db, dbias = _bwd(
            dy2, x2, s, q, lora_A, lora_B, ctx.scaling, ctx.dropout_p, ctx.seed, need_dx, need_dbias, ctx.triton_path
        )
        dx = dx.reshape(x.shape) if dx is not None else None
        return dx, None, dbias, da, db, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Custom ops for torch.compile: the quant_state goes in as its tensors and plain values
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastlora::lora_linear_4bit", mutates_args=())
def _lora_linear_4bit_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    blocksize: int,
    blocksize2: int,
    quant_type: str,
    out_features: int,
    w_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    q = Quant4bit(packed, absmax, code, blocksize, (out_features, x.shape[1]), w_dtype, absmax2, code2, offset,
                  blocksize2, quant_type)  # fmt: skip
    seed_int = int(seed.item()) if seed is not None else 0
    return _fwd(x, q, bias, lora_A, lora_B, scaling, dropout_p, seed_int, _on_triton(x, q))


@_lora_linear_4bit_op.register_fake
def _(x, packed, absmax, code, absmax2, code2, offset, bias, lora_A, lora_B, scaling, dropout_p, seed, blocksize,
      blocksize2, quant_type, out_features, w_dtype):  # fmt: skip
    return x.new_empty(x.shape[0], out_features), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("fastlora::lora_linear_4bit_backward", mutates_args=())
def _lora_linear_4bit_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    s: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    blocksize: int,
    blocksize2: int,
    quant_type: str,
    w_dtype: torch.dtype,
    need_dx: bool,
    need_dbias: bool,
    triton_path: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q = Quant4bit(packed, absmax, code, blocksize, (dy.shape[1], x.shape[1]), w_dtype, absmax2, code2, offset,
                  blocksize2, quant_type)  # fmt: skip
    seed_int = int(seed.item()) if seed is not None else 0
    dx, da, db, dbias = _bwd(
        dy.contiguous(), x, s, q, lora_A, lora_B, scaling, dropout_p, seed_int, need_dx, need_dbias, triton_path
    )
    dx = dx.contiguous() if dx is not None else x.new_empty(0)
    dbias = dbias if dbias is not None else dy.new_empty(0)
    return dx, da, db, dbias


@_lora_linear_4bit_bwd_op.register_fake
def _(dy, x, s, packed, absmax, code, absmax2, code2, offset, lora_A, lora_B, scaling, dropout_p, seed, blocksize,
      blocksize2, quant_type, w_dtype, need_dx, need_dbias, triton_path):  # fmt: skip
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    dbias = dy.new_empty(dy.shape[1]) if need_dbias else dy.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B), dbias


def _lora_linear_4bit_setup(ctx, inputs, output):
    x, packed, absmax, code, absmax2, code2, offset, bias, lora_A, lora_B = inputs[:10]
    scaling, dropout_p, seed, blocksize, blocksize2, quant_type, out_features, w_dtype = inputs[10:]
    ctx.save_for_backward(x, output[1], packed, absmax, code, absmax2, code2, offset, lora_A, lora_B, seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.blocksize, ctx.blocksize2, ctx.quant_type, ctx.w_dtype = blocksize, blocksize2, quant_type, w_dtype
    q = Quant4bit(packed, absmax, code, blocksize, (out_features, x.shape[1]), w_dtype)
    ctx.triton_path = _on_triton(x, q)


def _lora_linear_4bit_op_backward(ctx, dy, _ds_unused):
    x, s, packed, absmax, code, absmax2, code2, offset, lora_A, lora_B, seed = ctx.saved_tensors
    need_dx, need_dbias = ctx.needs_input_grad[0], ctx.needs_input_grad[7]
    dx, da, db, dbias = torch.ops.fastlora.lora_linear_4bit_backward(
        dy, x, s, packed, absmax, code, absmax2, code2, offset, lora_A, lora_B, ctx.scaling, ctx.dropout_p, seed,
        ctx.blocksize, ctx.blocksize2, ctx.quant_type, ctx.w_dtype, need_dx, need_dbias, ctx.triton_path,
    )  # fmt: skip
    grads = [None] * 18
    grads[0], grads[7], grads[8], grads[9] = (dx if need_dx else None), (dbias if need_dbias else None), da, db
    return tuple(grads)


_lora_linear_4bit_op.register_autograd(_lora_linear_4bit_op_backward, setup_context=_lora_linear_4bit_setup)


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
    _check_linear4bit(x, weight_packed, quant_state, bias, lora_A, lora_B, scaling, dropout_p)
    if autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    q = quant_tensors(weight_packed, quant_state)
    p = float(dropout_p) if training else 0.0
    scaling = float(scaling)
    with no_autocast(x.device.type):
        if torch.compiler.is_compiling():
            seed = draw_seed() if p > 0 else None
            y2, _ = torch.ops.fastlora.lora_linear_4bit(
                _as_rows(x), q.packed, q.absmax, q.code, q.absmax2, q.code2, q.offset, bias, lora_A, lora_B,
                scaling, p, seed, q.blocksize, q.blocksize2, q.quant_type, q.shape[0], q.dtype,
            )  # fmt: skip
            return y2.reshape(*x.shape[:-1], q.shape[0])
        seed = int(draw_seed()) if p > 0 else 0
        y, _ = LoRALinear4bitFunction.apply(x, weight_packed, bias, lora_A, lora_B, q, scaling, p, seed)
        return y
