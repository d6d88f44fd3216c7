"""Fused LoRA linear: forward and backward kernels and their launchers.

x [M, K], W [N, K] (frozen), A [r, K], B [N, r], s the scaling, m the dropout mask (0 or 1/(1-p)),
a pure function of (seed, row, column) so that backward regenerates exactly the mask forward drew,
whatever the tiling:

    forward:   S = (m x) A^T                one pass over x                          (_lora_down_kernel)
               Y = c * (x W^T + s S B^T) + bias     the LoRA term and bias in the GEMM's epilogue (c: an optional
                                            per-column scale, DoRA's g / ||W + s B A||)    (_lora_gemm_*kernel)
    backward:  dS = s dY B, dB = s dY^T S   one pass over dY, dB by float32 atomics   (_lora_down_kernel, side)
               dX = dY W + m (dS A)         the LoRA term in the dX GEMM's epilogue
               dA = dS^T (m x)              without dropout: each dX tile's share in its epilogue (float32 atomics);
                                            with dropout (or without dX): the dS/dB pass, once a row block's dS is
                                            final, reads the block's rows of x (float32 atomics)

Every product accumulates in float32 and every output is rounded once. From configs.SPLIT_FREE_M rows on,
the rank-r passes fill the GPU with row blocks alone: forward is two launches (S pass, GEMM), backward four
with or without dropout (one memset of the float32 dA/dB buffer, the dS/dB(/dA) pass, the dX GEMM, one cast to
the adapters' dtype; three with float32 adapters). Below it the skinny passes split their reduction across
programs into float32 partials summed in a fixed order, and with dropout dA takes a pass over x. With
deterministic algorithms requested no atomics run: dB and dA take their own passes over dY and x.

Dropout's generator is a counter-based hash, not philox (dropout_words): the seed is mixed into one word, each
row gets a key (one 32-bit mix, amortised over the tile's columns), and each pair of columns one add, one
xor-shift and two multiplies, whose products' top halves are the two elements' 16-bit uniforms u; the element
is kept where u >= t, t = min(round(p * 65536), 65535). The exact keep probability is therefore 1 - t / 65536
(within 2^-17 of 1 - p), and kept values are scaled by 1 / (1 - p). About 2.5 instructions per element where a
quarter of a 10-round philox call plus a float conversion took about 35. The hash is elementwise, so it is drawn
in the accumulator's own layout; the TMA epilogue applies it as a 0/1 float factor (dropout_keep_factor: no
predicates to keep alive across the LoRA MMA). Each element's mask is drawn once per pass that reads it: the S
pass, the dS/dB pass (for dA), the dX epilogue (for the LoRA term).

On Hopper with 16-bit inputs the GEMMs are persistent TMA kernels in the form of Triton's persistent-matmul
tutorial: one flattened, software-pipelined loop over (tile, k), the epilogue (LoRA term, mask or dA share,
column scale, bias, store in column halves) keyed to its own tile counter. Which of the fused GEMM and
"cuBLAS for the frozen product plus an r-wide in-place update" runs is measured per shape on the first
CUDA call and cached (kernels/dispatch.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastlora.kernels import configs
from fastlora.kernels import dispatch as _dispatch
from fastlora.kernels.configs import INTERPRET, check_dtype, dot_dtype, input_precision, rank_block
from fastlora.kernels.dropout import (
    dropout_keep,
    dropout_keep_factor,
    dropout_mask,
    dropout_seed,
    dropout_threshold,
)
from fastlora.kernels.launch import Replays, launch_hooks, not_replayable, plans_for, seed_pointer, signature
from fastlora.kernels.tiles import grouped_tile
from triton.tools.tensor_descriptor import TensorDescriptor

__all__ = ["lora_linear_fwd", "lora_linear_bwd", "dropout_mask", "dropout_threshold", "lora_update_", "lora_gemm"]

# ----------------------------------------------------------------------------------------------------------
# Kernels: the rank-r passes
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _lora_down_kernel(
    # pointers
    x_ptr,
    bt_ptr,
    t_ptr,
    out_ptr,
    side_ptr,
    x2_ptr,
    da_ptr,
    # sizes
    M,
    K,
    R,
    K_PER_SPLIT,
    K2,
    # strides
    stride_xm,
    stride_xk,
    stride_bk,
    stride_br,
    stride_tm,
    stride_tr,
    stride_os,
    stride_om,
    stride_or,
    stride_sk,
    stride_sr,
    stride_x2m,
    stride_x2k,
    stride_dar,
    stride_dak,
    # scalars
    scale,
    side_scale,
    da_scale,
    seed_ptr,
    p_thresh,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr,
    HAS_SIDE: tl.constexpr,
    HAS_DA: tl.constexpr,
    DA_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out[split, M, R] = scale * (m x)[M, Ks] @ Bt[Ks, R] over this split's K range Ks.
    With HAS_SIDE also side[K, R] += side_scale * x^T @ T[M, R] (float32 atomics). With HAS_DA (one split: the
    block's out rows are final) also dA[R, K2] += da_scale * out^T @ (m x2)[M, K2] (float32 atomics), the mask on
    x2 with DA_DROPOUT: the backward's dS pass takes its rows' share of dA from x while dS is in registers."""
    seed = dropout_seed(seed_ptr, HAS_DROPOUT or DA_DROPOUT)
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    i_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_m, m_r = i_m < M, i_r < R
    i_m64 = i_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if HAS_SIDE:
        p_t = t_ptr + i_m64[:, None] * stride_tm + i_r[None, :] * stride_tr
        b_t = tl.load(p_t, mask=m_m[:, None] & m_r[None, :], other=0.0).to(DOT_DTYPE)  # [BM, BR]
    k_start = pid_s.to(tl.int64) * K_PER_SPLIT
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):  # K_PER_SPLIT is a multiple of BLOCK_K
        i_k = k_start + k0 + tl.arange(0, BLOCK_K)
        m_k = i_k < K
        p_x = x_ptr + i_m64[:, None] * stride_xm + i_k[None, :].to(tl.int64) * stride_xk
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        if HAS_DROPOUT:
            b_x = tl.where(dropout_keep(seed, i_m, i_k, p_thresh), b_x, 0.0)
        b_x = b_x.to(DOT_DTYPE)
        p_b = bt_ptr + i_k[:, None].to(tl.int64) * stride_bk + i_r[None, :] * stride_br
        b_b = tl.load(p_b, mask=m_k[:, None] & m_r[None, :], other=0.0).to(DOT_DTYPE)  # [BK, BR]
        acc = tl.dot(b_x, b_b, acc, input_precision=PRECISION)
        if HAS_SIDE:
            b_side = tl.dot(tl.trans(b_x), b_t, input_precision=PRECISION)  # [BK, BR]
            p_side = side_ptr + i_k[:, None].to(tl.int64) * stride_sk + i_r[None, :] * stride_sr
            tl.atomic_add(p_side, b_side * side_scale, mask=m_k[:, None] & m_r[None, :], sem="relaxed")
    p_o = out_ptr + pid_s.to(tl.int64) * stride_os + i_m64[:, None] * stride_om + i_r[None, :] * stride_or
    b_out = (acc * scale).to(out_ptr.dtype.element_ty)
    tl.store(p_o, b_out, mask=m_m[:, None] & m_r[None, :])
    if HAS_DA:
        b_ds = b_out.to(DOT_DTYPE)  # [BM, BR], as stored
        for k0 in range(0, K2, BLOCK_K):
            i_k = k0 + tl.arange(0, BLOCK_K)
            m_k = i_k < K2
            i_k64 = i_k.to(tl.int64)
            p_x2 = x2_ptr + i_m64[:, None] * stride_x2m + i_k64[None, :] * stride_x2k
            b_x2 = tl.load(p_x2, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
            if DA_DROPOUT:
                b_x2 = tl.where(dropout_keep(seed, i_m, i_k, p_thresh), b_x2, 0.0)
            b_da = tl.dot(tl.trans(b_x2.to(DOT_DTYPE)), b_ds, input_precision=PRECISION)  # [BK, BR]
            p_da = da_ptr + i_r[None, :] * stride_dar + i_k64[:, None] * stride_dak
            tl.atomic_add(p_da, b_da * da_scale, mask=m_k[:, None] & m_r[None, :], sem="relaxed")


@triton.jit
def _lora_up_t_kernel(
    # pointers
    t_ptr,
    x_ptr,
    out_ptr,
    # sizes
    M,
    K,
    R,
    M_PER_SPLIT,
    # strides
    stride_tm,
    stride_tr,
    stride_xm,
    stride_xk,
    stride_os,
    stride_or,
    stride_ok,
    # scalars
    scale,
    seed_ptr,
    p_thresh,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out[split, R, K] = scale * T[Ms, R]^T @ (m x)[Ms, K] over this split's M range Ms."""
    seed = dropout_seed(seed_ptr, HAS_DROPOUT)
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    i_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    i_r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_k, m_r = i_k < K, i_r < R
    i_k64 = i_k.to(tl.int64)
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)  # out^T: K is the MMA's M side (wgmma needs >= 64)
    m_start = pid_s.to(tl.int64) * M_PER_SPLIT
    for m0 in range(0, M_PER_SPLIT, BLOCK_M):  # M_PER_SPLIT is a multiple of BLOCK_M
        i_m = m_start + m0 + tl.arange(0, BLOCK_M)
        m_m = i_m < M
        i_m64 = i_m.to(tl.int64)
        p_t = t_ptr + i_m64[:, None] * stride_tm + i_r[None, :] * stride_tr
        b_t = tl.load(p_t, mask=m_m[:, None] & m_r[None, :], other=0.0).to(DOT_DTYPE)  # [BM, BR]
        p_x = x_ptr + i_m64[:, None] * stride_xm + i_k64[None, :] * stride_xk
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        if HAS_DROPOUT:
            b_x = tl.where(dropout_keep(seed, i_m, i_k, p_thresh), b_x, 0.0)
        acc = tl.dot(tl.trans(b_x.to(DOT_DTYPE)), b_t, acc, input_precision=PRECISION)
    p_o = out_ptr + pid_s.to(tl.int64) * stride_os + i_k64[:, None] * stride_ok + i_r[None, :] * stride_or
    tl.store(p_o, (acc * scale).to(out_ptr.dtype.element_ty), mask=m_k[:, None] & m_r[None, :])


@triton.jit
def _lora_update_kernel(
    # pointers
    y_ptr,
    p_ptr,
    q_ptr,
    bias_ptr,
    cs_ptr,
    # sizes
    M,
    N,
    R,
    # strides
    stride_ym,
    stride_yn,
    stride_pm,
    stride_pr,
    stride_qr,
    stride_qn,
    # scalars
    lora_scale,
    seed_ptr,
    p_thresh,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Y[M, N] = c * (Y + lora_scale * mask(P[M, R] @ Q[R, N])) + bias, in place: the r-wide half of the
    "cuBLAS + update" path (forward: Y = x W^T from cuBLAS, P = S, Q = B^T; dX: Y = dY W, P = dS, Q = A)."""
    seed = dropout_seed(seed_ptr, HAS_DROPOUT)
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), 8)
    i_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m, m_n = i_m < M, i_n < N
    i_m64, i_n64 = i_m.to(tl.int64), i_n.to(tl.int64)
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        i_r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        m_r = i_r < R
        p_p = p_ptr + i_m64[:, None] * stride_pm + i_r[None, :] * stride_pr
        p_q = q_ptr + i_r[:, None] * stride_qr + i_n64[None, :] * stride_qn
        b_p = tl.load(p_p, mask=m_m[:, None] & m_r[None, :], other=0.0).to(DOT_DTYPE)  # [BM, BR]
        b_q = tl.load(p_q, mask=m_r[:, None] & m_n[None, :], other=0.0).to(DOT_DTYPE)  # [BR, BN]
        lora = tl.dot(b_p, b_q, lora, input_precision=PRECISION)
    if HAS_DROPOUT:
        lora = tl.where(dropout_keep(seed, i_m, i_n, p_thresh), lora, 0.0)
    p_y = y_ptr + i_m64[:, None] * stride_ym + i_n64[None, :] * stride_yn
    m_y = m_m[:, None] & m_n[None, :]
    b_y = tl.load(p_y, mask=m_y, other=0.0).to(tl.float32) + lora * lora_scale
    if HAS_COL_SCALE:
        b_y *= tl.load(cs_ptr + i_n, mask=m_n, other=0.0)[None, :]
    if HAS_BIAS:
        b_y += tl.load(bias_ptr + i_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    tl.store(p_y, b_y.to(y_ptr.dtype.element_ty), mask=m_y)


# ----------------------------------------------------------------------------------------------------------
# Kernels: the GEMMs. Forward: a = x, b = W^T, P = S, Q = B^T, lora_scale = s, no mask.
# Backward dX: a = dY, b = W, P = dS, Q = A, lora_scale = 1 / (1 - p), the mask of x's element (row, col),
# and with HAS_DA the tile's share of dA = dS^T (m x) added to a float32 dA by atomics.
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _lora_gemm_kernel(
    # pointers
    a_ptr,
    b_ptr,
    p_ptr,
    q_ptr,
    bias_ptr,
    cs_ptr,
    x_ptr,
    da_ptr,
    c_ptr,
    # sizes
    M,
    N,
    K,
    R,
    M_BUCKET,
    # strides
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_pm,
    stride_pr,
    stride_qr,
    stride_qn,
    stride_xm,
    stride_xn,
    stride_dar,
    stride_dan,
    stride_cm,
    stride_cn,
    # scalars
    lora_scale,
    seed_ptr,
    p_thresh,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_DA: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[M, N] = c * (a[M, K] @ b[K, N] + lora_scale * mask(P[M, R] @ Q[R, N])) + bias[N]; with HAS_DA (and no
    dropout: with it the dS pass computes dA) also dA[R, N] += lora_scale * P^T @ x[M, N]. Pointer loads: any
    strides, any GPU, the interpreter."""
    tl.static_assert(not (HAS_DA and HAS_DROPOUT), "with dropout the dS pass computes dA")
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    i_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m, m_n = i_m < M, i_n < N
    i_m64, i_n64 = i_m.to(tl.int64), i_n.to(tl.int64)

    # the frozen product
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    p_a = a_ptr + i_m64[:, None] * stride_am + tl.arange(0, BLOCK_K)[None, :] * stride_ak
    p_b = b_ptr + tl.arange(0, BLOCK_K)[:, None] * stride_bk + i_n64[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        m_k = tl.arange(0, BLOCK_K) < K - k0
        b_a = tl.load(p_a, mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_b = tl.load(p_b, mask=m_k[:, None] & m_n[None, :], other=0.0)
        acc = tl.dot(b_a.to(DOT_DTYPE), b_b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        p_a += BLOCK_K * stride_ak
        p_b += BLOCK_K * stride_bk

    # the epilogue: the LoRA term (r-wide steps), its mask, the dA share, column scale, bias
    if HAS_DROPOUT:  # the seed is loaded here, not before the K loop: nothing extra lives through it
        keep = dropout_keep(dropout_seed(seed_ptr, HAS_DROPOUT), i_m, i_n, p_thresh)
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_DA:
        p_x = x_ptr + i_m64[:, None] * stride_xm + i_n64[None, :] * stride_xn
        b_x = tl.load(p_x, mask=m_m[:, None] & m_n[None, :], other=0.0)
        b_xt = tl.trans(b_x.to(DOT_DTYPE))  # [BN, BM]
    for r0 in range(0, R, BLOCK_R):
        i_r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        m_r = i_r < R
        p_p = p_ptr + i_m64[:, None] * stride_pm + i_r[None, :] * stride_pr
        p_q = q_ptr + i_r[:, None] * stride_qr + i_n64[None, :] * stride_qn
        b_p = tl.load(p_p, mask=m_m[:, None] & m_r[None, :], other=0.0)  # [BM, BR]
        b_q = tl.load(p_q, mask=m_r[:, None] & m_n[None, :], other=0.0).to(DOT_DTYPE)  # [BR, BN]
        if HAS_DROPOUT:
            lora = tl.dot(b_p.to(DOT_DTYPE), b_q, lora, input_precision=PRECISION)
        else:
            acc = tl.dot((b_p.to(tl.float32) * lora_scale).to(DOT_DTYPE), b_q, acc, input_precision=PRECISION)
        if HAS_DA:
            b_da = tl.dot(b_xt, b_p.to(DOT_DTYPE), input_precision=PRECISION)  # [BN, BR]
            p_da = da_ptr + i_r[None, :] * stride_dar + i_n64[:, None] * stride_dan
            tl.atomic_add(p_da, b_da * lora_scale, mask=m_n[:, None] & m_r[None, :], sem="relaxed")
    if HAS_DROPOUT:
        acc = tl.where(keep, acc + lora * lora_scale, acc)
    if HAS_COL_SCALE:
        acc *= tl.load(cs_ptr + i_n, mask=m_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + i_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    p_c = c_ptr + i_m64[:, None] * stride_cm + i_n64[None, :] * stride_cn
    tl.store(p_c, acc.to(c_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _tma_epilogue(
    acc,
    b_p,
    b_ps,
    b_q,
    off_m,
    off_n,
    c_desc,
    bias_desc,
    cs_desc,
    x_desc,
    da_ptr,
    N,
    R,
    stride_dar,
    stride_dan,
    lora_scale,
    seed,
    p_thresh,
    HAS_BIAS: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_DA: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One column block [BM, BNP] of the TMA GEMM's epilogue at (off_m, off_n): the masked LoRA term (with
    dropout; without it the term is already in acc) or the dA share (without dropout: with it the dS pass takes
    dA), column scale, bias, and the store. b_ps: the S tile times lora_scale."""
    tl.static_assert(not (HAS_DA and HAS_DROPOUT), "with dropout the dS pass computes dA")
    BM: tl.constexpr = acc.shape[0]
    BNP: tl.constexpr = acc.shape[1]
    if HAS_DROPOUT:
        # the mask as a 0/1 factor (no predicates to keep alive across the MMA): one multiply-add per element
        keep = dropout_keep_factor(seed, off_m + tl.arange(0, BM), off_n + tl.arange(0, BNP), p_thresh)
        acc += tl.dot(b_ps, b_q, input_precision=PRECISION) * keep
    if HAS_DA:
        b_x = x_desc.load([off_m, off_n])  # [BM, BNP], zero beyond M and N
        b_da = tl.dot(tl.trans(b_x.to(DOT_DTYPE)), b_p, input_precision=PRECISION)  # [BNP, BR]
        i_n = off_n + tl.arange(0, BNP)
        i_r = tl.arange(0, b_p.shape[1])
        p_da = da_ptr + i_r[None, :] * stride_dar + i_n.to(tl.int64)[:, None] * stride_dan
        tl.atomic_add(p_da, b_da * lora_scale, mask=(i_n < N)[:, None] & (i_r < R)[None, :], sem="relaxed")
    if HAS_COL_SCALE:
        acc *= cs_desc.load([off_n])[None, :]
    if HAS_BIAS:
        acc += bias_desc.load([off_n]).to(tl.float32)[None, :]
    c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


@triton.jit
def _lora_gemm_tma_kernel(
    # tensor descriptors
    a_desc,
    b_desc,
    p_desc,
    q_desc,
    bias_desc,
    cs_desc,
    x_desc,
    c_desc,
    # pointers
    da_ptr,
    # sizes
    M,
    N,
    K,
    R,
    M_BUCKET,
    # strides
    stride_dar,
    stride_dan,
    # scalars
    lora_scale,
    seed_ptr,
    p_thresh,
    # meta-parameters
    B_NK: tl.constexpr,
    Q_NR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_DA: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr,
    NUM_SMS: tl.constexpr,
):
    """_lora_gemm_kernel for Hopper, in the form of Triton's persistent-matmul tutorial: NUM_SMS programs walk
    the tiles in grouped order in one loop over (tile, k) that the compiler flattens and pipelines; every
    operand moves by TMA (out of bounds zero-filled), the epilogue follows its own tile counter tile_id_c.
    b_desc holds W [N, K] when B_NK (forward), else b [K, N] (dX); q_desc B [N, R] when Q_NR, else A [R, N].
    R <= BLOCK_R: the LoRA term is one rank tile."""
    seed = dropout_seed(seed_ptr, HAS_DROPOUT)
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    tl.assume(k_tiles > 0)  # K >= 1: without it the compiler keeps extra copies of the epilogue for k_tiles = 0
    num_tiles = num_pid_m * num_pid_n
    tile_id_c = start_pid - NUM_SMS
    for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=True):
        pid_m, pid_n = grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_am = pid_m * BLOCK_M
        off_bn = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            b_a = a_desc.load([off_am, off_k]).to(DOT_DTYPE)
            if B_NK:
                acc = tl.dot(b_a, b_desc.load([off_bn, off_k]).to(DOT_DTYPE).T, acc, input_precision=PRECISION)
            else:
                acc = tl.dot(b_a, b_desc.load([off_k, off_bn]).to(DOT_DTYPE), acc, input_precision=PRECISION)

        tile_id_c += NUM_SMS
        pid_m, pid_n = grouped_tile(tile_id_c, num_pid_m, num_pid_n, GROUP_M)
        off_cm = pid_m * BLOCK_M
        off_cn = pid_n * BLOCK_N
        b_p = p_desc.load([off_cm, 0]).to(DOT_DTYPE)  # [BM, BR]
        if Q_NR:
            b_q = q_desc.load([off_cn, 0]).to(DOT_DTYPE).T  # [BR, BN]
        else:
            b_q = q_desc.load([0, off_cn]).to(DOT_DTYPE)
        b_ps = (b_p.to(tl.float32) * lora_scale).to(DOT_DTYPE)  # s folded into the S tile
        if not HAS_DROPOUT:  # the LoRA term as one more MMA into the accumulator
            acc = tl.dot(b_ps, b_q, acc, input_precision=PRECISION)
        if EPILOGUE_SUBTILE:
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            q0, q1 = tl.split(tl.permute(tl.reshape(b_q, (BLOCK_R, 2, BLOCK_N // 2)), (0, 2, 1)))
            _tma_epilogue(acc0, b_p, b_ps, q0, off_cm, off_cn, c_desc, bias_desc, cs_desc, x_desc, da_ptr, N, R,
                          stride_dar, stride_dan, lora_scale, seed, p_thresh, HAS_BIAS, HAS_COL_SCALE, HAS_DROPOUT,
                          HAS_DA, DOT_DTYPE, PRECISION)  # fmt: skip
            _tma_epilogue(acc1, b_p, b_ps, q1, off_cm, off_cn + BLOCK_N // 2, c_desc, bias_desc, cs_desc, x_desc,
                          da_ptr, N, R, stride_dar, stride_dan, lora_scale, seed, p_thresh, HAS_BIAS, HAS_COL_SCALE,
                          HAS_DROPOUT, HAS_DA, DOT_DTYPE, PRECISION)  # fmt: skip
        else:
            _tma_epilogue(acc, b_p, b_ps, b_q, off_cm, off_cn, c_desc, bias_desc, cs_desc, x_desc, da_ptr, N, R,
                          stride_dar, stride_dan, lora_scale, seed, p_thresh, HAS_BIAS, HAS_COL_SCALE, HAS_DROPOUT,
                          HAS_DA, DOT_DTYPE, PRECISION)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Autotuning
# ----------------------------------------------------------------------------------------------------------

_TMA_DESCS = ("a_desc", "b_desc", "p_desc", "q_desc", "bias_desc", "cs_desc", "x_desc", "c_desc")


def _set_tma_block_shapes(nargs):
    """Autotune pre-hook: the descriptors' block shapes follow the config being tried (absent ones are None)."""
    bm, bn, bk, br = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"], nargs["BLOCK_R"]
    bnp = bn // 2 if nargs["EPILOGUE_SUBTILE"] else bn
    shapes = {
        "a_desc": [bm, bk],
        "b_desc": [bn, bk] if nargs["B_NK"] else [bk, bn],
        "p_desc": [bm, br],
        "q_desc": [bn, br] if nargs["Q_NR"] else [br, bn],
        "bias_desc": [bnp],
        "cs_desc": [bnp],
        "x_desc": [bm, bnp],
        "c_desc": [bm, bnp],
    }
    for name, shape in shapes.items():
        if nargs.get(name) is not None:
            nargs[name].block_shape = shape


_set_tma_block_shapes.replay_safe = True  # launch.Replay records the descriptors after it ran


def _prune_gemm_configs(configs_list, named_args, **kwargs):
    """Drop tiles much larger than the problem (small M or N): they only waste the autotuner's time.

    Triton passes the positional arguments as named_args and the keyword ones as kwargs; the launchers use
    keywords."""
    args = {**named_args, **kwargs}
    m, n = args["M"], args["N"]
    kept = [c for c in configs_list if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(m))]
    kept = [c for c in kept if c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(n))]
    return kept or configs_list[-1:]


_GEMM_TUNE_KEY = ["M_BUCKET", "N", "K", "R"]
_autotuned_gemm = {}
_autotuned_gemm_tma = {}


def _gemm_kernel_for(major: int, dtype: torch.dtype, masked: bool, direction: str = "fwd"):
    """The pointer GEMM autotuned over this GPU generation's configs: one autotuner per generation, dtype,
    direction (forward and dX tune apart) and whether the LoRA term is dropout-masked (smaller tiles). The dX
    GEMM adds into dA with atomics, so its tuning runs start from a zeroed dA."""
    key = (major, dtype, masked, direction)
    if key not in _autotuned_gemm:
        _autotuned_gemm[key] = triton.autotune(
            configs=configs.gemm_configs(major, dtype, masked),
            key=_GEMM_TUNE_KEY,
            prune_configs_by={"early_config_prune": _prune_gemm_configs},
            reset_to_zero=["da_ptr"] if direction == "dx" else None,
        )(_lora_gemm_kernel)
    return _autotuned_gemm[key]


def _gemm_tma_kernel_for(major: int, dtype: torch.dtype, direction: str):
    """The persistent TMA GEMM autotuned over the direction's own tiles (configs.gemm_tma_config_tuples); the
    pre-hook re-shapes the descriptors per config."""
    key = (major, dtype, direction)
    if key not in _autotuned_gemm_tma:
        _autotuned_gemm_tma[key] = triton.autotune(
            configs=configs.gemm_tma_configs(direction, pre_hook=_set_tma_block_shapes),
            key=_GEMM_TUNE_KEY,
            prune_configs_by={"early_config_prune": _prune_gemm_configs},
            reset_to_zero=["da_ptr"] if direction == "dx" else None,
        )(_lora_gemm_tma_kernel)
    return _autotuned_gemm_tma[key]


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(a // -b)


def _skinny_config(device, side=False):
    if INTERPRET:
        return configs.SKINNY_INTERPRET
    major = configs.capability(device)
    return configs.skinny_side_config(major) if side else configs.skinny_config_tuples(major)[0]


def _splits(rows: int, blocks: int, programs_without_split: int, device) -> int:
    """How many ways to split a reduction of `blocks` blocks so the launch fills the device: none from
    configs.SPLIT_FREE_M rows on, where the row blocks alone fill it."""
    if rows >= configs.SPLIT_FREE_M:
        return 1
    return max(1, min(blocks, configs.num_programs_target(device) // max(1, programs_without_split)))


def _tma_capable(device) -> bool:
    return configs.capability(device) >= 9


def _tma_ok(t) -> bool:
    """TMA can address t: unit inner stride, 16-byte aligned base and outer strides."""
    if t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    return all((st * t.element_size()) % 16 == 0 for st in t.stride()[:-1])


def _unit_inner(t):
    """(t or t^T with unit inner stride, whether it was transposed), or (None, False)."""
    if t.stride(1) == 1:
        return t, False
    if t.stride(0) == 1:
        return t.t(), True
    return None, False


def _tma_views(a, b, p, q, c, bias=None, col_scale=None, x=None):
    """{"b": W [N, K] or b [K, N], "B_NK", "q": B [N, R] or A [R, N], "Q_NR"} when TMA can address every operand
    of this GEMM, else None."""
    b_view, b_nk = _unit_inner(b)
    q_view, q_nr = _unit_inner(q)
    if b_view is None or q_view is None:
        return None
    if not all(_tma_ok(t) for t in (a, b_view, p, q_view, c, bias, col_scale, x) if t is not None):
        return None
    return {"b": b_view, "B_NK": b_nk, "q": q_view, "Q_NR": q_nr}


def _desc(t, block_shape):
    """TensorDescriptor.from_tensor(t, block_shape) without its per-call re-validation: _tma_views checked the
    base and strides already (and every size is positive on this path)."""
    if t is None:
        return None
    desc = object.__new__(TensorDescriptor)
    desc.base, desc.shape, desc.strides, desc.block_shape, desc.padding = t, t.shape, t.stride(), block_shape, "zero"
    return desc


def _gemm(a, b, p, q, bias, c, lora_scale, dropout_p=0.0, seed=None, col_scale=None, x=None, da=None, direction="fwd"):
    """c[M, N] = col_scale * (a[M, K] @ b[K, N] + lora_scale * mask(p[M, R] @ q[R, N])) + bias; with x and da also
    da[R, N] += lora_scale * p^T @ (m x)[M, N] (float32 atomics). a, b, p, q, x are strided views."""
    M, K = a.shape
    N = b.shape[1]
    R = p.shape[1]
    has_da = da is not None
    common = dict(
        M=M,
        N=N,
        K=K,
        R=R,
        M_BUCKET=1 << max(M - 1, 0).bit_length(),
        stride_dar=da.stride(0) if has_da else 0,
        stride_dan=da.stride(1) if has_da else 0,
        lora_scale=float(lora_scale),
        seed_ptr=seed_pointer(seed if dropout_p > 0 else None, c),
        p_thresh=dropout_threshold(dropout_p),
        HAS_BIAS=bias is not None,
        HAS_COL_SCALE=col_scale is not None,
        HAS_DROPOUT=dropout_p > 0,
        HAS_DA=has_da,
        DOT_DTYPE=dot_dtype(a.dtype),
        PRECISION=input_precision(a.dtype),
    )
    # TMA for 16-bit tiles on Hopper; float32 (an FMA or TF32 product, not a speed target) keeps the pointer kernel
    views = None
    if a.dtype != torch.float32 and _tma_capable(a.device) and R <= configs.GEMM_TMA_MAX_RANK and K > 0:
        views = _tma_views(a, b, p, q, c, bias, col_scale, x)
    if views is not None:
        args = dict(
            a_desc=_desc(a, [1, 1]),
            b_desc=_desc(views["b"], [1, 1]),
            p_desc=_desc(p, [1, 1]),
            q_desc=_desc(views["q"], [1, 1]),
            bias_desc=_desc(bias, [1]),
            cs_desc=_desc(col_scale, [1]),
            x_desc=_desc(x, [1, 1]),
            c_desc=_desc(c, [1, 1]),
            da_ptr=da if has_da else c,
            **common,
            B_NK=views["B_NK"],
            Q_NR=views["Q_NR"],
            BLOCK_R=max(16, 1 << (R - 1).bit_length()),
            NUM_SMS=configs.num_sms(a.device),
        )
        if INTERPRET:
            bm, bn, bk, g, _, _, sub = configs.GEMM_TMA_INTERPRET
            meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, EPILOGUE_SUBTILE=sub)
            _set_tma_block_shapes({**args, **meta})
            grid = (min(args["NUM_SMS"], _cdiv(M, bm) * _cdiv(N, bn)),)
            plans_for(_lora_gemm_tma_kernel).launch(None, grid, **args, **meta)
            return c
        kernel = _gemm_tma_kernel_for(configs.capability(a.device), a.dtype, direction)
        num_sms = args["NUM_SMS"]
        grid = lambda meta: (min(num_sms, _cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"])),)
        plans_for(kernel).launch(None, grid, **args)
        return c
    x_view = x if x is not None else a
    args = dict(
        a_ptr=a,
        b_ptr=b,
        p_ptr=p,
        q_ptr=q,
        bias_ptr=bias if bias is not None else c,
        cs_ptr=col_scale if col_scale is not None else c,
        x_ptr=x_view,
        da_ptr=da if has_da else c,
        c_ptr=c,
        **common,
        stride_am=a.stride(0),
        stride_ak=a.stride(1),
        stride_bk=b.stride(0),
        stride_bn=b.stride(1),
        stride_pm=p.stride(0),
        stride_pr=p.stride(1),
        stride_qr=q.stride(0),
        stride_qn=q.stride(1),
        stride_xm=x_view.stride(0),
        stride_xn=x_view.stride(1),
        stride_cm=c.stride(0),
        stride_cn=c.stride(1),
        BLOCK_R=rank_block(R),
    )
    if INTERPRET:
        bm, bn, bk, g, _, _ = configs.GEMM_INTERPRET
        grid = (_cdiv(M, bm) * _cdiv(N, bn),)
        plans_for(_lora_gemm_kernel).launch(None, grid, **args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g)
        return c
    kernel = _gemm_kernel_for(configs.capability(a.device), a.dtype, dropout_p > 0, direction)
    grid = lambda meta: (_cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"]),)
    plans_for(kernel).launch(None, grid, **args)
    return c


# The fused GEMM as other kernel files launch it (kernels/group.py's per-member path).
lora_gemm = _gemm


def lora_update_(y, p, q, lora_scale, bias=None, col_scale=None, dropout_p=0.0, seed=None):
    """y[M, N] <- col_scale * (y + lora_scale * mask(p[M, R] @ q[R, N])) + bias, in place (p, q strided views):
    the r-wide half of the "cuBLAS + update" path. Returns y."""
    M, N = y.shape
    R = p.shape[1]
    bm, bn, warps, stages = configs.LORA_UPDATE_INTERPRET if INTERPRET else configs.LORA_UPDATE
    plans_for(_lora_update_kernel).launch(
        None,
        (_cdiv(M, bm) * _cdiv(N, bn), 1, 1),
        y_ptr=y,
        p_ptr=p,
        q_ptr=q,
        bias_ptr=bias if bias is not None else y,
        cs_ptr=col_scale if col_scale is not None else y,
        M=M,
        N=N,
        R=R,
        stride_ym=y.stride(0),
        stride_yn=y.stride(1),
        stride_pm=p.stride(0),
        stride_pr=p.stride(1),
        stride_qr=q.stride(0),
        stride_qn=q.stride(1),
        lora_scale=float(lora_scale),
        seed_ptr=seed_pointer(seed if dropout_p > 0 else None, y),
        p_thresh=dropout_threshold(dropout_p),
        HAS_BIAS=bias is not None,
        HAS_COL_SCALE=col_scale is not None,
        HAS_DROPOUT=dropout_p > 0,
        DOT_DTYPE=dot_dtype(y.dtype),
        PRECISION=input_precision(y.dtype),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_R=rank_block(R),
        num_warps=warps,
        num_stages=stages,
    )
    return y


def _down(x, bt, out_dtype, scale, dropout_p=0.0, seed=None, side=None, da=None, out=None):
    """scale * (m x)[M, K] @ bt[K, R] -> [M, R] in out_dtype (written into ``out`` [M, R] when given).

    side = (t [M, R], acc [K, R] float32, side_scale): also acc += side_scale * x^T t, with atomics.
    da = (x2 [M, K2], dA [R, K2] float32, da_scale, dropout_p, seed): also dA += da_scale * out^T (m x2), with
    atomics, the mask on x2 (x itself carries none then); needs one split (M >= configs.SPLIT_FREE_M)."""
    M, K = x.shape
    R = bt.shape[1]
    bm, bk, warps, stages = _skinny_config(x.device, side=side is not None)
    br = rank_block(R)
    grid_m, grid_r = _cdiv(M, bm), _cdiv(R, br)
    k_blocks = _cdiv(K, bk)
    k_per_split = _cdiv(k_blocks, _splits(M, k_blocks, grid_m * grid_r, x.device)) * bk
    split = _cdiv(K, k_per_split)
    if split > 1:
        if da is not None:
            raise ValueError(f"the dA share needs the dS pass in one split, got {split} for {M} rows")
        not_replayable()  # the partials' sum is a torch op between launches
        result = out
        out = torch.empty((split, M, R), device=x.device, dtype=torch.float32)
    else:
        result = out if out is not None else torch.empty((M, R), device=x.device, dtype=out_dtype)
        out = result[None]
    t, acc, side_scale = side if side is not None else (x, out[0], 0.0)
    if da is not None:
        x2, da_acc, da_scale, da_p, seed = da
        if dropout_p > 0:
            raise ValueError("one mask per pass: dropout applies to x2 when the dA share is taken")
    else:
        x2, da_acc, da_scale, da_p = x, out[0], 0.0, 0.0
    plans_for(_lora_down_kernel).launch(
        None,
        (grid_m, grid_r, split),
        x_ptr=x,
        bt_ptr=bt,
        t_ptr=t,
        out_ptr=out,
        side_ptr=acc,
        x2_ptr=x2,
        da_ptr=da_acc,
        M=M,
        K=K,
        R=R,
        K_PER_SPLIT=k_per_split,
        K2=x2.shape[1],
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_bk=bt.stride(0),
        stride_br=bt.stride(1),
        stride_tm=t.stride(0),
        stride_tr=t.stride(1),
        stride_os=out.stride(0),
        stride_om=out.stride(1),
        stride_or=out.stride(2),
        stride_sk=acc.stride(0),
        stride_sr=acc.stride(1),
        stride_x2m=x2.stride(0),
        stride_x2k=x2.stride(1),
        stride_dar=da_acc.stride(0),
        stride_dak=da_acc.stride(1),
        scale=float(scale),
        side_scale=float(side_scale),
        da_scale=float(da_scale),
        seed_ptr=seed_pointer(seed if max(dropout_p, da_p) > 0 else None, x),
        p_thresh=dropout_threshold(max(dropout_p, da_p)),
        HAS_DROPOUT=dropout_p > 0,
        HAS_SIDE=side is not None,
        HAS_DA=da is not None,
        DA_DROPOUT=da_p > 0,
        DOT_DTYPE=dot_dtype(x.dtype),
        PRECISION=input_precision(x.dtype),
        BLOCK_M=bm,
        BLOCK_K=bk,
        BLOCK_R=br,
        num_warps=warps,
        num_stages=stages,
    )
    if split == 1:
        return result
    return out.sum(0).to(out_dtype) if result is None else result.copy_(out.sum(0))


def _up_t(t, x, scale, dropout_p=0.0, seed=None, out=None):
    """scale * t[M, R]^T @ (m x)[M, K] -> out [R, K] float32 (allocated when not given)."""
    M, K = x.shape
    R = t.shape[1]
    bm, bk, warps, stages = _skinny_config(x.device)
    br = rank_block(R)
    grid_k, grid_r = _cdiv(K, bk), _cdiv(R, br)
    m_blocks = _cdiv(M, bm)
    m_per_split = _cdiv(m_blocks, _splits(M, m_blocks, grid_k * grid_r, x.device)) * bm
    split = _cdiv(M, m_per_split)
    if out is None:
        out = torch.empty((R, K), device=x.device, dtype=torch.float32)
    part = torch.empty((split, R, K), device=x.device, dtype=torch.float32) if split > 1 else out[None]
    plans_for(_lora_up_t_kernel).launch(
        None,
        (grid_k, grid_r, split),
        t_ptr=t,
        x_ptr=x,
        out_ptr=part,
        M=M,
        K=K,
        R=R,
        M_PER_SPLIT=m_per_split,
        stride_tm=t.stride(0),
        stride_tr=t.stride(1),
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_os=part.stride(0),
        stride_or=part.stride(1),
        stride_ok=part.stride(2),
        scale=float(scale),
        seed_ptr=seed_pointer(seed if dropout_p > 0 else None, x),
        p_thresh=dropout_threshold(dropout_p),
        HAS_DROPOUT=dropout_p > 0,
        DOT_DTYPE=dot_dtype(x.dtype),
        PRECISION=input_precision(x.dtype),
        BLOCK_M=bm,
        BLOCK_K=bk,
        BLOCK_R=br,
        num_warps=warps,
        num_stages=stages,
    )
    if split > 1:
        not_replayable()
        torch.sum(part, 0, out=out)
    return out


def _measured(kind, device, shape, candidates, run):
    """Run `run[choice]()` for the path the dispatch measured fastest for this shape on this device (timed once,
    on the first call, with the `candidates` closures); under the interpreter and off CUDA the fused path."""
    if INTERPRET or device.type != "cuda":
        return run["fused"]()
    return run[_dispatch.choose(_dispatch.shape_key(kind, **shape), candidates, device)]()


# Replays (kernels/launch.py) of whole launcher calls, per call signature.
REPLAYS = {"fwd": Replays(), "bwd": Replays()}


def lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, col_scale=None, replay=None):
    """Y [M, N] = c * (x W^T + s * S B^T) + bias and S [M, r] = (m x) A^T, for x [M, K] (any strides).

    col_scale: c [N] float32 (DoRA's g / ||W + s B A||), or None for c = 1. replay: the caller's
    ``launch.ReplaySlot`` for this call signature (shapes, strides, dtypes, device, alignment of every tensor,
    scaling, dropout_p), or None to look it up here by ``launch.signature``."""
    M, N, R = x.shape[0], weight.shape[0], lora_A.shape[0]
    if INTERPRET or M == 0 or launch_hooks():
        return _lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, col_scale)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)  # sizes as separate ints: the cheaper overload to parse
    s = torch.empty(M, R, device=x.device, dtype=x.dtype)
    if replay is None:
        replay = REPLAYS["fwd"].slot(signature(x, weight, bias, lora_A, lora_B, col_scale, scaling, dropout_p))
    seed = seed_pointer(seed, x) if dropout_p > 0 else None
    replay(
        (x, weight, bias, lora_A, lora_B, col_scale, y, s, seed),
        lambda: _lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, col_scale, y, s),
    )
    return y, s


def _lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, col_scale=None, y=None, s=None):
    check_dtype(x)
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if col_scale is not None:
        if col_scale.dtype != torch.float32 or tuple(col_scale.shape) != (N,):
            raise ValueError(
                f"col_scale must be a float32 vector of the {N} output features, got {col_scale.dtype} "
                f"{tuple(col_scale.shape)}"
            )
        if col_scale.device != x.device:
            raise ValueError(f"col_scale is on {col_scale.device}, x on {x.device}: pass tensors on one device")
    if y is None:
        y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y, x.new_zeros((0, R))
    inv_keep = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    s = _down(x, lora_A.t(), x.dtype, inv_keep, dropout_p, seed, out=s)

    def fused(out=y):
        return _gemm(x, weight.t(), s, lora_B.t(), bias, out, scaling, col_scale=col_scale, direction="fwd")

    def cublas_update(out=y):
        not_replayable()
        torch.mm(x, weight.t(), out=out)
        return lora_update_(out, s, lora_B.t(), scaling, bias=bias, col_scale=col_scale)

    shape = dict(M=M, N=N, K=K, R=R, dtype=x.dtype, dropout=False)
    paths = {"fused": fused, "cublas+update": cublas_update}  # both write all of y: timing runs leave no trace
    _measured("fwd", x.device, shape, paths, paths)
    return y, s


def _grads_in(buf, dtype):
    return buf if buf.dtype == dtype else buf.to(dtype=dtype)  # the keyword: the cheaper overload to parse


def _grad_views(grads, N, R, K):
    """dB [N, r] and dA [r, K] as views of one flat buffer of N r + r K elements (one view op each)."""
    return grads.as_strided((N, R), (R, 1)), grads.as_strided((R, K), (K, 1), N * R)


def lora_linear_bwd(
    dy, x, s, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx=True, need_dbias=False, replay=None
):
    """dX [M, K] (or None), dA [r, K], dB [N, r], dbias [N] float32 (rowsum_M(dY), or None) for dY [M, N].

    replay: the caller's ``launch.ReplaySlot`` for this call signature (as ``lora_linear_fwd``'s, with dY's and
    need_dx), or None to look it up here by ``launch.signature``."""
    check_dtype(dy)
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    inv_keep = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    dx = torch.empty(M, K, device=x.device, dtype=x.dtype) if need_dx else None
    if torch.are_deterministic_algorithms_enabled():  # no atomics: dB and dA take their own passes
        ds = _down(dy, lora_B, dy.dtype, scaling)
        db = _up_t(s, dy, scaling).t().to(lora_B.dtype, memory_format=torch.contiguous_format)
        da = _up_t(ds, x, inv_keep, dropout_p, seed).to(lora_A.dtype)
        if need_dx:
            _gemm(dy, weight, ds, lora_A, None, dx, inv_keep, dropout_p, seed, direction="dx")
    else:
        # one float32 buffer, one memset: dB [N, r] then dA [r, K], both accumulated with atomics
        grads = torch.zeros(N * R + R * K, device=dy.device, dtype=torch.float32)
        ds = torch.empty(M, R, device=dy.device, dtype=dy.dtype)
        if INTERPRET or launch_hooks():
            _bwd_launches(dy, x, s, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, dx, ds,
                          *_grad_views(grads, N, R, K))  # fmt: skip
        else:
            if replay is None:
                replay = REPLAYS["bwd"].slot(signature(dy, x, s, weight, lora_A, lora_B, scaling, dropout_p, need_dx))
            seed = seed_pointer(seed, x) if dropout_p > 0 else None
            db_at = grads.data_ptr()  # dB and dA by address: a replay makes no views of the buffer
            replay(
                (dy, x, s, weight, lora_A, lora_B, dx, ds, db_at, db_at + 4 * N * R, seed),
                lambda: _bwd_launches(dy, x, s, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, dx, ds,
                                      *_grad_views(grads, N, R, K)),
            )  # fmt: skip
        if lora_A.dtype == lora_B.dtype:  # one cast for both (none for float32 adapters)
            db, da = _grad_views(_grads_in(grads, lora_A.dtype), N, R, K)
        else:
            db32, da32 = _grad_views(grads, N, R, K)
            db, da = _grads_in(db32, lora_B.dtype), _grads_in(da32, lora_A.dtype)
    dbias = dy.sum(0, dtype=torch.float32) if need_dbias else None
    return dx, da, db, dbias


def _bwd_launches(dy, x, s, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, dx, ds, db32, da32):
    """The atomic backward's launches: dS into ds, dB into db32, dA into da32 (both zeroed), dX into dx."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    inv_keep = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    # From SPLIT_FREE_M rows the dS/dB pass finishes each row block's dS in registers and, with dropout or
    # without dX, also takes the block's share of dA from x (drawing the mask once): no pass of its own. Else
    # the dX GEMM's epilogue takes it (no dropout), or a pass over x does.
    da_in_ds = M >= configs.SPLIT_FREE_M and (dropout_p > 0 or not need_dx)
    da_side = (x, da32, inv_keep, dropout_p, seed) if da_in_ds else None
    _down(dy, lora_B, dy.dtype, scaling, side=(s, db32, scaling), da=da_side, out=ds)
    if need_dx:

        def fused(out=dx, da=da32):
            if dropout_p == 0:
                return _gemm(dy, weight, ds, lora_A, None, out, 1.0, x=x, da=da, direction="dx")
            _gemm(dy, weight, ds, lora_A, None, out, inv_keep, dropout_p, seed, direction="dx")
            return out if da_in_ds else _up_t(ds, x, inv_keep, dropout_p, seed, out=da)

        def cublas_update(out=dx, da=da32):
            not_replayable()
            torch.mm(dy, weight, out=out)
            lora_update_(out, ds, lora_A, inv_keep, dropout_p=dropout_p, seed=seed)
            return out if da_in_ds else _up_t(ds, x, inv_keep, dropout_p, seed, out=da)

        def timed(fn):  # timing runs write scratch outputs: the real dA must see one run only
            return lambda: fn(torch.empty_like(dx), torch.zeros_like(da32))

        shape = dict(M=M, N=K, K=N, R=R, dtype=x.dtype, dropout=dropout_p > 0)
        candidates = {"fused": timed(fused), "cublas+update": timed(cublas_update)}
        _measured("dx", x.device, shape, candidates, {"fused": fused, "cublas+update": cublas_update})
    elif not da_in_ds:
        _up_t(ds, x, inv_keep, dropout_p, seed, out=da32)
