"""4-bit base weights (bitsandbytes NF4/FP4): dequantization and the LoRA GEMMs that dequantize in their main loop.

The layout is bitsandbytes' (``Params4bit`` with its ``QuantState``): W [N, K] flattened row-major, element e's
4-bit code in byte e // 2 of the packed tensor (high nibble for even e), read as uint8 whatever the storage
dtype; block j = e // blocksize has the scale absmax[j]. With nested (double) quantization absmax is uint8 and

    absmax[j] = code2[absmax_u8[j]] * absmax2[j // blocksize2] + offset        (float32, the product rounded first)

and W[e] = code[nibble(e)] * absmax[e // blocksize] in float32, rounded once to the quant_state's dtype: the
arithmetic of ``bitsandbytes.functional.dequantize_4bit``, so the result is bit-exact with it. The kernels are
compiled without floating-point contraction (``enable_fp_fusion=False``): an FMA would skip the product's rounding.
The code tables are read from the tensors given (quant_state.code, state2.code), not written here.

Two routes for x [M, K], A [r, K], B [N, r], s the scaling, m the dropout mask (kernels.dropout's, from a seed),
chosen per shape by kernels/dispatch.py among those choose_route allows (both at small M, timed once on the GPU):

    large M (workspace):  W = dequantize into a buffer shared by every layer and call (one per device and dtype,
                          grown as needed, never kept per layer), then kernels.linear.lora_linear_fwd / _bwd.
    small M (fused):      Y^T = deq(W) x^T + s B S^T + bias and dX^T = deq(W)^T dY^T + m (A^T dS^T), the W tiles
                          dequantized in the main loop (_nf4_lora_fwd_kernel, _nf4_lora_dx_kernel). N (forward)
                          or K (dX) is the MMA's M side, so wgmma applies however small M is. The forward also
                          forms S = (m x) A^T in its loop (stored by the first column of programs); the dX kernel
                          forms dS = s dY B in its loop. dA and dB never need W: kernels.linear.lora_linear_bwd
                          computes them (need_dx=False) on both routes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastlora.kernels import configs, dispatch
from fastlora.kernels import linear as _klinear
from fastlora.kernels.configs import (
    INTERPRET,
    NF4_DEQUANT_BLOCK,
    NF4_DEQUANT_WARPS,
    NF4_FUSED_DX,
    NF4_FUSED_FWD,
    NF4_FUSED_INTERPRET,
    TL_DTYPES,
    check_dtype,
    dot_dtype,
    input_precision,
    rank_block,
)
from fastlora.kernels.dropout import dropout_args, dropout_keep_t, dropout_seed
from fastlora.kernels.launch import plans_for
from fastlora.kernels.quant4bit import Quant4bit

# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------

FUSED_MAX_M = 64  # at most this many rows: dequantize inside the GEMM (no workspace); above, workspace + fused GEMM
FUSED_MAX_RANK = 64  # the fused kernels hold S (or dS) for all r in one rank tile
BLOCKSIZES = (64, 128, 256)
KERNEL_OPTIONS = {"enable_fp_fusion": False}


def fused_m_block(M: int) -> int:
    """BLOCK_M of the fused kernels: the padded M (at least 16, the tensor-core minimum); 16 under the interpreter,
    so that the tests cover several M blocks."""
    if INTERPRET:
        return 16
    return min(FUSED_MAX_M, max(16, triton.next_power_of_2(M)))


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _dequant(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    i_e,
    m_e,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
):
    """float32 W[e] for the flat element indices i_e (int64, any shape), masked by m_e."""
    b_byte = tl.load(packed_ptr + i_e // 2, mask=m_e, other=0).to(tl.int32)
    i_code = tl.where(i_e % 2 == 0, b_byte >> 4, b_byte & 15)
    b_code = tl.load(code_ptr + i_code)  # the 16-entry table stays in L1
    i_blk = i_e // BLOCKSIZE
    if NESTED:
        b_q = tl.load(absmax_ptr + i_blk, mask=m_e, other=0).to(tl.int32)
        b_absmax = tl.load(code2_ptr + b_q) * tl.load(absmax2_ptr + i_blk // BLOCKSIZE2, mask=m_e, other=0.0)
        b_absmax = b_absmax + tl.load(offset_ptr)
    else:
        b_absmax = tl.load(absmax_ptr + i_blk, mask=m_e, other=0.0)
    return b_code * b_absmax


@triton.jit
def _round_bf16(v):
    """float32 v rounded to the nearest bfloat16 (ties to even), kept in float32. Only under the interpreter,
    whose own float32 -> bfloat16 cast truncates; on the GPU the cast itself rounds to nearest."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _to_w_dtype(v, W_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """float32 v rounded to W's dtype (the quant_state dtype), as bitsandbytes rounds its dequantized W."""
    if EMULATE_BF16:
        return _round_bf16(v)
    return v.to(W_DTYPE)


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _nf4_dequant_kernel(
    # pointers
    packed_ptr,
    absmax_ptr,
    code_ptr,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    out_ptr,
    # sizes
    numel,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    W_DTYPE: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[e] = W[e] for e < numel, rounded to W_DTYPE, stored in out's dtype."""
    i_e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_e = i_e < numel
    b_w = _dequant(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, i_e, m_e,
                   BLOCKSIZE, BLOCKSIZE2, NESTED)  # fmt: skip
    b_w = _to_w_dtype(b_w, W_DTYPE, EMULATE_BF16)
    tl.store(out_ptr + i_e, b_w.to(out_ptr.dtype.element_ty), mask=m_e)


@triton.jit
def _nf4_lora_fwd_kernel(
    # pointers
    x_ptr,
    packed_ptr,
    absmax_ptr,
    code_ptr,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    a_ptr,
    b_ptr,
    bias_ptr,
    y_ptr,
    s_ptr,
    # sizes
    M,
    N,
    K,
    R,
    # strides
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    stride_sm,
    stride_sr,
    # scalars
    scaling,
    inv_keep,
    seed_ptr,
    p_thresh,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    W_DTYPE: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Y^T [N, M] = deq(W) [N, K] @ x^T [K, M] + s * B [N, R] @ S^T [R, M] + bias, with S^T = A (m x)^T formed
    in the same K loop; the programs of the first N block store S [M, R]."""
    seed = dropout_seed(seed_ptr, HAS_DROPOUT)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    i_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    i_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_r = tl.arange(0, BLOCK_R)
    m_n, m_m, m_r = i_n < N, i_m < M, i_r < R
    i_n64, i_m64 = i_n.to(tl.int64), i_m.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # Y^T
    acc_s = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)  # S^T
    for k0 in range(0, K, BLOCK_K):
        i_k = k0 + tl.arange(0, BLOCK_K)
        m_k = i_k < K
        i_k64 = i_k.to(tl.int64)
        p_x = x_ptr + i_k64[:, None] * stride_xk + i_m64[None, :] * stride_xm
        b_xt = tl.load(p_x, mask=m_k[:, None] & m_m[None, :], other=0.0)  # [BK, BM]
        i_e = i_n64[:, None] * K + i_k64[None, :]  # W [BN, BK]
        b_w = _dequant(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, i_e,
                       m_n[:, None] & m_k[None, :], BLOCKSIZE, BLOCKSIZE2, NESTED)  # fmt: skip
        b_w = _to_w_dtype(b_w, W_DTYPE, EMULATE_BF16).to(DOT_DTYPE)
        acc = tl.dot(b_w, b_xt.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if HAS_DROPOUT:
            b_xt = tl.where(dropout_keep_t(seed, i_m, i_k, p_thresh), b_xt, 0.0)  # [BK, BM]
        p_a = a_ptr + i_r[:, None] * stride_ar + i_k64[None, :] * stride_ak
        b_a = tl.load(p_a, mask=m_r[:, None] & m_k[None, :], other=0.0)  # [BR, BK]
        acc_s = tl.dot(b_a.to(DOT_DTYPE), b_xt.to(DOT_DTYPE), acc_s, input_precision=PRECISION)
    b_st = (acc_s * inv_keep).to(s_ptr.dtype.element_ty)  # S rounded once, as kernels.linear stores it
    p_s = s_ptr + i_r[:, None] * stride_sr + i_m64[None, :] * stride_sm
    if pid_n == 0:  # the first N block's programs store S (a branch, not a mask: Triton 3.9's interpreter refuses
        tl.store(p_s, b_st, mask=m_r[:, None] & m_m[None, :])  # a mask that ands in a scalar)
    p_b = b_ptr + i_n64[:, None] * stride_bn + i_r[None, :] * stride_br
    b_b = tl.load(p_b, mask=m_n[:, None] & m_r[None, :], other=0.0)  # [BN, BR]
    acc += scaling * tl.dot(b_b.to(DOT_DTYPE), b_st.to(DOT_DTYPE), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + i_n, mask=m_n, other=0.0).to(tl.float32)[:, None]
    p_y = y_ptr + i_n64[:, None] * stride_yn + i_m64[None, :] * stride_ym
    tl.store(p_y, acc.to(y_ptr.dtype.element_ty), mask=m_n[:, None] & m_m[None, :])


@triton.jit
def _nf4_lora_dx_kernel(
    # pointers
    dy_ptr,
    packed_ptr,
    absmax_ptr,
    code_ptr,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    a_ptr,
    b_ptr,
    dx_ptr,
    # sizes
    M,
    N,
    K,
    R,
    # strides
    stride_dym,
    stride_dyn,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_dxm,
    stride_dxk,
    # scalars
    scaling,
    inv_keep,
    seed_ptr,
    p_thresh,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    W_DTYPE: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """dX^T [K, M] = deq(W)^T [K, N] @ dY^T [N, M] + m * (A^T [K, R] @ dS^T [R, M]), with dS^T = s B^T dY^T
    formed in the same N loop (rounded to dY's dtype, as kernels.linear rounds dS)."""
    seed = dropout_seed(seed_ptr, HAS_DROPOUT)
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    i_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    i_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_r = tl.arange(0, BLOCK_R)
    m_k, m_m, m_r = i_k < K, i_m < M, i_r < R
    i_k64, i_m64 = i_k.to(tl.int64), i_m.to(tl.int64)
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)  # dX^T
    acc_ds = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)  # dS^T / s
    for n0 in range(0, N, BLOCK_N):
        i_n = n0 + tl.arange(0, BLOCK_N)
        m_n = i_n < N
        i_n64 = i_n.to(tl.int64)
        p_dy = dy_ptr + i_n64[:, None] * stride_dyn + i_m64[None, :] * stride_dym
        b_dyt = tl.load(p_dy, mask=m_n[:, None] & m_m[None, :], other=0.0).to(DOT_DTYPE)  # [BN, BM]
        i_e = i_n64[None, :] * K + i_k64[:, None]  # W^T [BK, BN]
        b_wt = _dequant(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, i_e,
                        m_k[:, None] & m_n[None, :], BLOCKSIZE, BLOCKSIZE2, NESTED)  # fmt: skip
        b_wt = _to_w_dtype(b_wt, W_DTYPE, EMULATE_BF16).to(DOT_DTYPE)
        acc = tl.dot(b_wt, b_dyt, acc, input_precision=PRECISION)
        p_b = b_ptr + i_r[:, None] * stride_br + i_n64[None, :] * stride_bn
        b_bt = tl.load(p_b, mask=m_r[:, None] & m_n[None, :], other=0.0).to(DOT_DTYPE)  # [BR, BN]
        acc_ds = tl.dot(b_bt, b_dyt, acc_ds, input_precision=PRECISION)
    b_dst = (acc_ds * scaling).to(dx_ptr.dtype.element_ty).to(DOT_DTYPE)
    p_a = a_ptr + i_r[None, :] * stride_ar + i_k64[:, None] * stride_ak
    b_at = tl.load(p_a, mask=m_k[:, None] & m_r[None, :], other=0.0).to(DOT_DTYPE)  # [BK, BR]
    lora = tl.dot(b_at, b_dst, input_precision=PRECISION)  # (dS A)^T [BK, BM]
    if HAS_DROPOUT:
        lora = tl.where(dropout_keep_t(seed, i_m, i_k, p_thresh), lora * inv_keep, 0.0)
    acc += lora
    p_dx = dx_ptr + i_k64[:, None] * stride_dxk + i_m64[None, :] * stride_dxm
    tl.store(p_dx, acc.to(dx_ptr.dtype.element_ty), mask=m_k[:, None] & m_m[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _quant_args(q: Quant4bit) -> dict:
    nested = q.nested
    return dict(
        packed_ptr=q.packed,
        absmax_ptr=q.absmax,
        code_ptr=q.code,
        absmax2_ptr=q.absmax2 if nested else q.code,
        code2_ptr=q.code2 if nested else q.code,
        offset_ptr=q.offset if nested else q.code,
        BLOCKSIZE=q.blocksize,
        BLOCKSIZE2=q.blocksize2 if nested else 256,
        NESTED=nested,
        W_DTYPE=TL_DTYPES[q.dtype],
        EMULATE_BF16=INTERPRET and q.dtype == torch.bfloat16,
    )


def dequantize_4bit(q: Quant4bit, out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None):
    """W [N, K] dequantized (rounded to q.dtype, then stored as out_dtype, q.dtype by default) into out
    (any contiguous tensor of N*K elements) or a new tensor."""
    n, k = q.shape
    if out is None:
        out = torch.empty((n, k), device=q.packed.device, dtype=out_dtype or q.dtype)
    if out.numel() != n * k or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of {n * k} elements, got shape {tuple(out.shape)}")
    if n * k == 0:
        return out.view(n, k)
    plans_for(_nf4_dequant_kernel).launch(
        None,
        (triton.cdiv(n * k, NF4_DEQUANT_BLOCK), 1, 1),
        **_quant_args(q),
        out_ptr=out,
        numel=n * k,
        BLOCK=NF4_DEQUANT_BLOCK,
        num_warps=NF4_DEQUANT_WARPS,
        **KERNEL_OPTIONS,
    )
    return out.view(n, k)


_WORKSPACE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def workspace(numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The first numel elements of the one dequantization buffer for (device, dtype), grown as needed.

    Every layer and call on a device shares it; kernels run in stream order, so a layer's GEMM has read it
    before the next layer's dequantization overwrites it."""
    key = (torch.device(device), dtype)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < numel:
        _WORKSPACE.pop(key, None)  # free the smaller buffer before allocating the larger one
        buf = torch.empty(numel, device=device, dtype=dtype)
        _WORKSPACE[key] = buf
    return buf[:numel]


def release_workspace() -> None:
    """Free the dequantization buffers (the next large-M call allocates again)."""
    _WORKSPACE.clear()


def choose_route(M: int, R: int) -> str:
    """The rule: "fused" (dequantize inside the GEMM) where that route can run, small M (at most FUSED_MAX_M rows)
    and rank at most FUSED_MAX_RANK, else "workspace" (dequantize, then the fused LoRA GEMM). Where it says
    "fused", kernels/dispatch.py times both routes once per shape on the GPU; this is what runs where nothing is
    timed."""
    return "fused" if M <= FUSED_MAX_M and R <= FUSED_MAX_RANK else "workspace"


def _route(route, kind: str, M: int, N: int, K: int, R: int, dtype, dropout_p, q: Quant4bit, device, paths) -> str:
    """The route a call takes: route itself when given (the launchers check it), else the dispatch's choice among the
    routes the rule allows (paths: name -> a function running that route once)."""
    if route is not None:
        return route
    rule = choose_route(M, R)
    allowed = paths if rule == "fused" else {"workspace": paths["workspace"]}
    key = dispatch.shape_key(
        f"nf4_{kind}", M=M, N=N, K=K, R=R, dtype=dtype, dropout=dropout_p > 0,
        q=q.quant_type, b=q.blocksize, nested=int(q.nested),
    )  # fmt: skip
    return dispatch.choose(key, allowed, device, default=rule)


def _fused_config(device, table):
    if INTERPRET:
        return NF4_FUSED_INTERPRET
    return table[9 if configs.capability(device) >= 9 else 8]


def _check_route(route, M, R):
    if route not in ("fused", "workspace"):
        raise ValueError(f'route must be "fused", "workspace" or None, got {route!r}')
    if route == "fused" and R > FUSED_MAX_RANK:
        raise ValueError(f"the fused route holds at most rank {FUSED_MAX_RANK}, got r={R}")
    return route


def _dequantized(q: Quant4bit, dtype: torch.dtype) -> torch.Tensor:
    n, k = q.shape
    return dequantize_4bit(q, out=workspace(n * k, q.packed.device, dtype)).view(n, k)


def lora_linear_4bit_fwd(x, q: Quant4bit, bias, lora_A, lora_B, scaling, dropout_p, seed, route=None):
    """Y [M, N] = x deq(W)^T + s * S B^T + bias and S [M, r] = (m x) A^T, for x [M, K] (any strides).

    route: "fused", "workspace", or None (choose_route's rule, measured where it allows both; see _route)."""
    check_dtype(x)
    M, K = x.shape
    N, R = q.shape[0], lora_A.shape[0]
    args = (x, q, bias, lora_A, lora_B, scaling, dropout_p, seed)
    if route is not None:
        _check_route(route, M, R)
    if M == 0:
        return _workspace_fwd(*args)
    paths = {"fused": lambda: _fused_fwd(*args), "workspace": lambda: _workspace_fwd(*args)}
    return paths[_route(route, "fwd", M, N, K, R, x.dtype, dropout_p, q, x.device, paths)]()


def _workspace_fwd(x, q: Quant4bit, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return _klinear.lora_linear_fwd(x, _dequantized(q, x.dtype), bias, lora_A, lora_B, scaling, dropout_p, seed)


def _fused_fwd(x, q: Quant4bit, bias, lora_A, lora_B, scaling, dropout_p, seed):
    M, K = x.shape
    N, R = q.shape[0], lora_A.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    s = torch.empty((M, R), device=x.device, dtype=x.dtype)
    bn, bk, warps, stages = _fused_config(x.device, NF4_FUSED_FWD)
    bm = fused_m_block(M)
    plans_for(_nf4_lora_fwd_kernel).launch(
        None,
        (triton.cdiv(N, bn), triton.cdiv(M, bm), 1),
        x_ptr=x,
        **_quant_args(q),
        a_ptr=lora_A,
        b_ptr=lora_B,
        bias_ptr=bias if bias is not None else y,
        y_ptr=y,
        s_ptr=s,
        M=M,
        N=N,
        K=K,
        R=R,
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_ar=lora_A.stride(0),
        stride_ak=lora_A.stride(1),
        stride_bn=lora_B.stride(0),
        stride_br=lora_B.stride(1),
        stride_ym=y.stride(0),
        stride_yn=y.stride(1),
        stride_sm=s.stride(0),
        stride_sr=s.stride(1),
        scaling=float(scaling),
        **dropout_args(dropout_p, seed, x),
        HAS_BIAS=bias is not None,
        DOT_DTYPE=dot_dtype(x.dtype),
        PRECISION=input_precision(x.dtype),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        BLOCK_R=rank_block(R),
        num_warps=warps,
        num_stages=stages,
        **KERNEL_OPTIONS,
    )
    return y, s


def _fused_dx(dy, q: Quant4bit, lora_A, lora_B, scaling, dropout_p, seed):
    M, N = dy.shape
    K, R = q.shape[1], lora_A.shape[0]
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    bk, bn, warps, stages = _fused_config(dy.device, NF4_FUSED_DX)
    bm = fused_m_block(M)
    plans_for(_nf4_lora_dx_kernel).launch(
        None,
        (triton.cdiv(K, bk), triton.cdiv(M, bm), 1),
        dy_ptr=dy,
        **_quant_args(q),
        a_ptr=lora_A,
        b_ptr=lora_B,
        dx_ptr=dx,
        M=M,
        N=N,
        K=K,
        R=R,
        stride_dym=dy.stride(0),
        stride_dyn=dy.stride(1),
        stride_ar=lora_A.stride(0),
        stride_ak=lora_A.stride(1),
        stride_bn=lora_B.stride(0),
        stride_br=lora_B.stride(1),
        stride_dxm=dx.stride(0),
        stride_dxk=dx.stride(1),
        scaling=float(scaling),
        **dropout_args(dropout_p, seed, dy),
        DOT_DTYPE=dot_dtype(dy.dtype),
        PRECISION=input_precision(dy.dtype),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        BLOCK_R=rank_block(R),
        num_warps=warps,
        num_stages=stages,
        **KERNEL_OPTIONS,
    )
    return dx


def lora_linear_4bit_bwd(
    dy, x, s, q: Quant4bit, lora_A, lora_B, scaling, dropout_p, seed, need_dx=True, need_dbias=False, route=None
):
    """dX [M, K] (or None), dA [r, K], dB [N, r], dbias [N] (or None) for dY [M, N].

    route: as for lora_linear_4bit_fwd, chosen on its own (either route's gradients fit either forward's S)."""
    check_dtype(dy)
    M, K = x.shape
    N, R = q.shape[0], lora_A.shape[0]
    args = (dy, x, s, q, lora_A, lora_B, scaling, dropout_p, seed, need_dbias)
    if route is not None:
        _check_route(route, M, R)
    if not need_dx:
        return _adapter_grads(*args)
    if M == 0:
        return _workspace_bwd(*args)
    paths = {"fused": lambda: _fused_bwd(*args), "workspace": lambda: _workspace_bwd(*args)}
    return paths[_route(route, "bwd", M, N, K, R, dy.dtype, dropout_p, q, dy.device, paths)]()


def _workspace_bwd(dy, x, s, q: Quant4bit, lora_A, lora_B, scaling, dropout_p, seed, need_dbias):
    return _klinear.lora_linear_bwd(
        dy, x, s, _dequantized(q, dy.dtype), lora_A, lora_B, scaling, dropout_p, seed, True, need_dbias
    )


def _adapter_grads(dy, x, s, q: Quant4bit, lora_A, lora_B, scaling, dropout_p, seed, need_dbias):
    """(None, dA, dB, dbias): they never read W, so the launcher takes it for its shape only."""
    w_shape = dy.new_empty(()).expand(q.shape)
    return _klinear.lora_linear_bwd(
        dy, x, s, w_shape, lora_A, lora_B, scaling, dropout_p, seed, need_dx=False, need_dbias=need_dbias
    )


def _fused_bwd(dy, x, s, q: Quant4bit, lora_A, lora_B, scaling, dropout_p, seed, need_dbias):
    _, da, db, dbias = _adapter_grads(dy, x, s, q, lora_A, lora_B, scaling, dropout_p, seed, need_dbias)
    return _fused_dx(dy, q, lora_A, lora_B, scaling, dropout_p, seed), da, db, dbias
