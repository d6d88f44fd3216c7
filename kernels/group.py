"""Sibling LoRA linear layers on one input (q/k/v, gate/up): forward and backward kernels and their launchers.

Members j = 0..NUM-1 (NUM <= 4) share x [M, K]; member j has W_j [N_j, K], A_j [r_j, K], B_j [N_j, r_j], s_j, and
its own dropout mask m_j from its own seed (the counter hash of kernels/dropout.py, as lora_linear draws it). The
ranks are laid side by side: column c of S (and of dS) belongs to the member j(c) whose columns [OFF_j, OFF_j + r_j)
hold it, and row c of the float32 dA workspace is row c - OFF_j of dA_j, so the A's read as one [sum r_j, K]
operand (each row gathered from its member's tensor by pointer: nothing is concatenated per call).

    forward:   S = [(m_j x) A_j^T]_j          one pass over x, each member's mask applied to the x tile in
                                              registers (_group_down_kernel)
               Y_j = x W_j^T + s_j S_j B_j^T + bias_j   one GEMM over the concatenated N = sum N_j: each N tile
                                              belongs to one member and takes its W, B, bias and Y by pointer
                                              (_group_gemm_kernel)
    backward:  dS_j = s_j dY_j B_j, dB_j = s_j dY_j^T S_j    one pass over the dY_j, dB by float32 atomics; the
                                              pass also takes dA_j = dS_j^T (m_j x) for the members with dropout
                                              (and for all without dX) while dS is in registers: one read of x,
                                              every member's mask drawn on it (_group_ds_kernel)
               dX = sum_j dY_j W_j + sum_j m_j (dS_j A_j)     one GEMM whose reduction walks the members' dY_j
                                              and W_j; the LoRA terms and the other members' dA shares in its
                                              epilogue (_group_dx_kernel)

On a GPU the forward's GEMM is the faster, measured once per shape (kernels/dispatch.py), of this grouped GEMM and
one GEMM per member on its columns of S (linear's fused GEMM: on Hopper its persistent TMA kernel; or cuBLAS plus
the r-wide update); the dX GEMM likewise against cuBLAS (each member's product added in place) plus the members'
r-wide updates, every dA then taken by the dS pass. Launches at M >= configs.GROUP_MIN_ROWS: forward two (S pass,
grouped GEMM), backward four (one memset of the float32 dA/dB workspace of every member, the dS/dB(/dA) pass, the
dX GEMM, one cast to the adapters' dtype; three with float32 adapters). Members are picked per program or per N
tile by pointer selects, statically where the member is a compile-time loop index, with a scalar select where it
is the tile's (a runtime value).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from fastlora.kernels import configs
from fastlora.kernels import dispatch as _dispatch
from fastlora.kernels.configs import INTERPRET, check_dtype, dot_dtype, input_precision, rank_block
from fastlora.kernels.dropout import dropout_keep, dropout_seed, dropout_threshold
from fastlora.kernels.launch import plans_for
from fastlora.kernels.linear import lora_gemm, lora_update_
from fastlora.kernels.tiles import grouped_tile

__all__ = ["lora_group_fwd", "lora_group_bwd", "MAX_MEMBERS"]

MAX_MEMBERS = 4


# ----------------------------------------------------------------------------------------------------------
# Member selection
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _pick(j: tl.constexpr, v0, v1, v2, v3):
    """The value of member j, a compile-time index."""
    if j == 0:
        v = v0
    elif j == 1:
        v = v1
    elif j == 2:
        v = v2
    else:
        v = v3
    return v


@triton.jit
def _select(j, v0, v1, v2, v3, NUM: tl.constexpr):
    """The value of member j (a runtime scalar or a vector of member indices), from the NUM members' values."""
    v = v0
    if NUM > 1:
        v = tl.where(j == 1, v1, v)
    if NUM > 2:
        v = tl.where(j == 2, v2, v)
    if NUM > 3:
        v = tl.where(j == 3, v3, v)
    return v


@triton.jit
def _bits(j, BITS: tl.constexpr, NUM: tl.constexpr):
    """Whether bit j of the compile-time member set BITS is set, for a runtime member index j."""
    return _select(j, BITS & 1, (BITS >> 1) & 1, (BITS >> 2) & 1, (BITS >> 3) & 1, NUM) != 0


@triton.jit
def _member_seeds(seed_ptr, seed_idx0, seed_idx1, seed_idx2, seed_idx3, BITS: tl.constexpr):
    """The dropout seed of each member in BITS (0 for the others): seed_ptr[seed_idx_j]."""
    seed0 = dropout_seed(seed_ptr + seed_idx0, (BITS & 1) != 0)
    seed1 = dropout_seed(seed_ptr + seed_idx1, (BITS & 2) != 0)
    seed2 = dropout_seed(seed_ptr + seed_idx2, (BITS & 4) != 0)
    seed3 = dropout_seed(seed_ptr + seed_idx3, (BITS & 8) != 0)
    return seed0, seed1, seed2, seed3


@triton.jit
def _put(j: tl.constexpr, value, v0, v1, v2, v3):
    """(v0, v1, v2, v3) with member j's replaced by value (j a compile-time index)."""
    if j == 0:
        v0 = value
    elif j == 1:
        v1 = value
    elif j == 2:
        v2 = value
    else:
        v3 = value
    return v0, v1, v2, v3


# ----------------------------------------------------------------------------------------------------------
# Kernels: the rank-r passes
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _group_down_kernel(
    # pointers
    x_ptr,
    a0_ptr,
    a1_ptr,
    a2_ptr,
    a3_ptr,
    s_ptr,
    seed_ptr,
    # sizes
    M,
    K,
    R0,
    R1,
    R2,
    R3,
    OFF1,
    OFF2,
    OFF3,
    # strides
    stride_xm,
    stride_xk,
    stride_a0r,
    stride_a1r,
    stride_a2r,
    stride_a3r,
    stride_sm,
    stride_sr,
    # scalars
    p_thresh0,
    p_thresh1,
    p_thresh2,
    p_thresh3,
    scale0,
    scale1,
    scale2,
    scale3,
    seed_idx0,
    seed_idx1,
    seed_idx2,
    seed_idx3,
    # meta-parameters
    NUM: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """S[:, OFF_j + r] = scale_j * (m_j x)[M, K] @ A_j[r, :]^T for every member j and the rank block r of this
    program (scale_j = 1 / (1 - p_j)). Each x tile is loaded once and serves every member: the members in the
    compile-time set DROPOUT multiply it by their own mask (seed seed_ptr[seed_idx_j]) for their product."""
    seed0, seed1, seed2, seed3 = _member_seeds(seed_ptr, seed_idx0, seed_idx1, seed_idx2, seed_idx3, DROPOUT)
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    i_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_m = i_m < M
    i_m64, i_r64 = i_m.to(tl.int64), i_r.to(tl.int64)
    acc0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        i_k = k0 + tl.arange(0, BLOCK_K)
        m_k = i_k < K
        p_x = x_ptr + i_m64[:, None] * stride_xm + i_k[None, :].to(tl.int64) * stride_xk
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        if DROPOUT != (1 << NUM) - 1:
            b_xd = b_x.to(DOT_DTYPE)
        for j in tl.static_range(NUM):
            p_a = _pick(j, a0_ptr, a1_ptr, a2_ptr, a3_ptr) + i_r64[None, :] * _pick(
                j, stride_a0r, stride_a1r, stride_a2r, stride_a3r) + i_k[:, None]  # fmt: skip
            m_r = i_r < _pick(j, R0, R1, R2, R3)
            b_a = tl.load(p_a, mask=m_k[:, None] & m_r[None, :], other=0.0).to(DOT_DTYPE)  # [BK, BR]
            if (DROPOUT >> j) & 1:
                keep = dropout_keep(_pick(j, seed0, seed1, seed2, seed3), i_m, i_k,
                                    _pick(j, p_thresh0, p_thresh1, p_thresh2, p_thresh3))  # fmt: skip
                b_xj = tl.where(keep, b_x, 0.0).to(DOT_DTYPE)
            else:
                b_xj = b_xd
            acc = tl.dot(b_xj, b_a, _pick(j, acc0, acc1, acc2, acc3), input_precision=PRECISION)
            acc0, acc1, acc2, acc3 = _put(j, acc, acc0, acc1, acc2, acc3)
    for j in tl.static_range(NUM):
        m_r = i_r < _pick(j, R0, R1, R2, R3)
        p_s = s_ptr + i_m64[:, None] * stride_sm + (_pick(j, 0, OFF1, OFF2, OFF3) + i_r64)[None, :] * stride_sr
        b_s = _pick(j, acc0, acc1, acc2, acc3) * _pick(j, scale0, scale1, scale2, scale3)
        tl.store(p_s, b_s.to(s_ptr.dtype.element_ty), mask=m_m[:, None] & m_r[None, :])


@triton.jit
def _group_ds_kernel(
    # pointers
    dy0_ptr,
    dy1_ptr,
    dy2_ptr,
    dy3_ptr,
    b0_ptr,
    b1_ptr,
    b2_ptr,
    b3_ptr,
    s_ptr,
    x_ptr,
    ds_ptr,
    db_ptr,
    da_ptr,
    seed_ptr,
    # sizes
    M,
    K,
    R0,
    R1,
    R2,
    R3,
    OFF1,
    OFF2,
    OFF3,
    N0,
    N1,
    N2,
    N3,
    SOFF0,
    SOFF1,
    SOFF2,
    SOFF3,
    DBOFF0,
    DBOFF1,
    DBOFF2,
    DBOFF3,
    # strides
    stride_dy0m,
    stride_dy1m,
    stride_dy2m,
    stride_dy3m,
    stride_b0n,
    stride_b1n,
    stride_b2n,
    stride_b3n,
    stride_b0r,
    stride_b1r,
    stride_b2r,
    stride_b3r,
    stride_sm,
    stride_sr,
    stride_xm,
    stride_xk,
    stride_dsm,
    stride_dsr,
    stride_dar,
    # scalars
    scale0,
    scale1,
    scale2,
    scale3,
    inv_keep0,
    inv_keep1,
    inv_keep2,
    inv_keep3,
    p_thresh0,
    p_thresh1,
    p_thresh2,
    p_thresh3,
    seed_idx0,
    seed_idx1,
    seed_idx2,
    seed_idx3,
    # meta-parameters
    NUM: tl.constexpr,
    DROPOUT: tl.constexpr,
    DA: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """For the row block and the rank block r of this program, per member j:
    dS[:, OFF_j + r] = s_j dY_j B_j[:, r], and dB_j[:, r] += s_j dY_j^T S[:, SOFF_j + r] (float32 atomics into
    db_ptr at DBOFF_j, dB_j [N_j, r_j] row-major), one pass over dY_j; then for the members in DA, with every
    member's dS in registers, one pass over x: dA[OFF_j + r, :] += inv_keep_j dS_j^T (m_j x) (float32 atomics;
    m_j for the members in DROPOUT)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    i_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_m = i_m < M
    i_m64, i_r64 = i_m.to(tl.int64), i_r.to(tl.int64)
    ds0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=DOT_DTYPE)
    ds1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=DOT_DTYPE)
    ds2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=DOT_DTYPE)
    ds3 = tl.zeros((BLOCK_M, BLOCK_R), dtype=DOT_DTYPE)
    for j in tl.static_range(NUM):
        R = _pick(j, R0, R1, R2, R3)
        if pid_r * BLOCK_R < R:  # the member has ranks in this block
            m_r = i_r < R
            dy_ptr = _pick(j, dy0_ptr, dy1_ptr, dy2_ptr, dy3_ptr)
            b_ptr = _pick(j, b0_ptr, b1_ptr, b2_ptr, b3_ptr)
            N = _pick(j, N0, N1, N2, N3)
            stride_dym = _pick(j, stride_dy0m, stride_dy1m, stride_dy2m, stride_dy3m)
            stride_bn = _pick(j, stride_b0n, stride_b1n, stride_b2n, stride_b3n)
            stride_br = _pick(j, stride_b0r, stride_b1r, stride_b2r, stride_b3r)
            scale = _pick(j, scale0, scale1, scale2, scale3)
            p_db = db_ptr + _pick(j, DBOFF0, DBOFF1, DBOFF2, DBOFF3) + i_r64[None, :]
            s_cols = _pick(j, SOFF0, SOFF1, SOFF2, SOFF3) + i_r64
            p_s = s_ptr + i_m64[:, None] * stride_sm + s_cols[None, :] * stride_sr
            b_s = tl.load(p_s, mask=m_m[:, None] & m_r[None, :], other=0.0).to(DOT_DTYPE)  # [BM, BR]
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for n0 in range(0, N, BLOCK_K):
                i_n = n0 + tl.arange(0, BLOCK_K)
                m_n = i_n < N
                i_n64 = i_n.to(tl.int64)
                p_dy = dy_ptr + i_m64[:, None] * stride_dym + i_n64[None, :]
                b_dy = tl.load(p_dy, mask=m_m[:, None] & m_n[None, :], other=0.0).to(DOT_DTYPE)  # [BM, BK]
                p_b = b_ptr + i_n64[:, None] * stride_bn + i_r64[None, :] * stride_br
                b_b = tl.load(p_b, mask=m_n[:, None] & m_r[None, :], other=0.0).to(DOT_DTYPE)  # [BK, BR]
                acc = tl.dot(b_dy, b_b, acc, input_precision=PRECISION)
                b_db = tl.dot(tl.trans(b_dy), b_s, input_precision=PRECISION)  # [BK, BR]
                tl.atomic_add(p_db + i_n64[:, None] * R, b_db * scale, mask=m_n[:, None] & m_r[None, :], sem="relaxed")
            b_ds = (acc * scale).to(ds_ptr.dtype.element_ty)
            p_ds = ds_ptr + i_m64[:, None] * stride_dsm + (_pick(j, 0, OFF1, OFF2, OFF3) + i_r64)[None, :] * stride_dsr
            tl.store(p_ds, b_ds, mask=m_m[:, None] & m_r[None, :])
            if (DA >> j) & 1:
                ds0, ds1, ds2, ds3 = _put(j, b_ds.to(DOT_DTYPE), ds0, ds1, ds2, ds3)  # as stored
    if DA != 0:
        seed0, seed1, seed2, seed3 = _member_seeds(seed_ptr, seed_idx0, seed_idx1, seed_idx2, seed_idx3, DROPOUT & DA)
        for k0 in range(0, K, BLOCK_K):
            i_k = k0 + tl.arange(0, BLOCK_K)
            m_k = i_k < K
            i_k64 = i_k.to(tl.int64)
            p_x = x_ptr + i_m64[:, None] * stride_xm + i_k64[None, :] * stride_xk
            b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
            if (DA & ~DROPOUT) != 0:
                b_xt = tl.trans(b_x.to(DOT_DTYPE))
            for j in tl.static_range(NUM):
                if (DA >> j) & 1:
                    if (DROPOUT >> j) & 1:
                        keep = dropout_keep(_pick(j, seed0, seed1, seed2, seed3), i_m, i_k,
                                            _pick(j, p_thresh0, p_thresh1, p_thresh2, p_thresh3))  # fmt: skip
                        b_xj = tl.trans(tl.where(keep, b_x, 0.0).to(DOT_DTYPE))
                    else:
                        b_xj = b_xt
                    b_da = tl.dot(b_xj, _pick(j, ds0, ds1, ds2, ds3), input_precision=PRECISION)  # [BK, BR]
                    b_da *= _pick(j, inv_keep0, inv_keep1, inv_keep2, inv_keep3)
                    rows = (_pick(j, 0, OFF1, OFF2, OFF3) + i_r64)[None, :]
                    m_r = (i_r < _pick(j, R0, R1, R2, R3))[None, :]
                    tl.atomic_add(da_ptr + rows * stride_dar + i_k64[:, None], b_da, mask=m_k[:, None] & m_r,
                                  sem="relaxed")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Kernels: the GEMMs
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _group_gemm_kernel(
    # pointers
    x_ptr,
    s_ptr,
    w0_ptr,
    w1_ptr,
    w2_ptr,
    w3_ptr,
    b0_ptr,
    b1_ptr,
    b2_ptr,
    b3_ptr,
    bias0_ptr,
    bias1_ptr,
    bias2_ptr,
    bias3_ptr,
    y0_ptr,
    y1_ptr,
    y2_ptr,
    y3_ptr,
    # sizes
    M,
    K,
    N0,
    N1,
    N2,
    N3,
    R0,
    R1,
    R2,
    R3,
    SOFF1,
    SOFF2,
    SOFF3,
    M_BUCKET,
    N_SUM,
    # strides
    stride_xm,
    stride_xk,
    stride_sm,
    stride_sr,
    stride_w0n,
    stride_w1n,
    stride_w2n,
    stride_w3n,
    stride_w0k,
    stride_w1k,
    stride_w2k,
    stride_w3k,
    stride_b0n,
    stride_b1n,
    stride_b2n,
    stride_b3n,
    stride_b0r,
    stride_b1r,
    stride_b2r,
    stride_b3r,
    stride_y0m,
    stride_y1m,
    stride_y2m,
    stride_y3m,
    # scalars
    scale0,
    scale1,
    scale2,
    scale3,
    # meta-parameters
    NUM: tl.constexpr,
    BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Y_j[M, N_j] = x[M, K] @ W_j^T + scale_j * S[:, SOFF_j : SOFF_j + R_j] @ B_j^T + bias_j (members in BIAS),
    over the N tiles of every member in one grid: member 0's tiles first, then member 1's, ...; a tile reads its
    member's W, B, bias and writes its Y by pointer (Y_j with a unit inner stride). Pointer loads: any GPU, the
    interpreter."""
    t1 = tl.cdiv(N0, BLOCK_N)
    t2 = t1 + tl.cdiv(N1, BLOCK_N) if NUM > 1 else t1
    t3 = t2 + tl.cdiv(N2, BLOCK_N) if NUM > 2 else t2
    num_pid_n = _pick(NUM - 1, t1, t2, t3, t3 + tl.cdiv(N3, BLOCK_N))
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_pid_n, GROUP_M)
    j = (pid_n >= t1).to(tl.int32)
    if NUM > 2:
        j += (pid_n >= t2).to(tl.int32)
    if NUM > 3:
        j += (pid_n >= t3).to(tl.int32)
    N = _select(j, N0, N1, N2, N3, NUM)
    R = _select(j, R0, R1, R2, R3, NUM)
    w_ptr = _select(j, w0_ptr, w1_ptr, w2_ptr, w3_ptr, NUM)
    stride_wn = _select(j, stride_w0n, stride_w1n, stride_w2n, stride_w3n, NUM)
    stride_wk = _select(j, stride_w0k, stride_w1k, stride_w2k, stride_w3k, NUM)
    i_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_n = (pid_n - _select(j, 0, t1, t2, t3, NUM)) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m, m_n = i_m < M, i_n < N
    i_m64, i_n64 = i_m.to(tl.int64), i_n.to(tl.int64)

    # the frozen product
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    p_x = x_ptr + i_m64[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :] * stride_xk
    p_w = w_ptr + tl.arange(0, BLOCK_K)[:, None] * stride_wk + i_n64[None, :] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        m_k = tl.arange(0, BLOCK_K) < K - k0
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_w = tl.load(p_w, mask=m_k[:, None] & m_n[None, :], other=0.0)
        acc = tl.dot(b_x.to(DOT_DTYPE), b_w.to(DOT_DTYPE), acc, input_precision=PRECISION)
        p_x += BLOCK_K * stride_xk
        p_w += BLOCK_K * stride_wk

    # the epilogue: the member's LoRA term (r-wide steps), its bias, the store into its output
    b_ptr = _select(j, b0_ptr, b1_ptr, b2_ptr, b3_ptr, NUM)
    stride_bn = _select(j, stride_b0n, stride_b1n, stride_b2n, stride_b3n, NUM)
    stride_br = _select(j, stride_b0r, stride_b1r, stride_b2r, stride_b3r, NUM)
    scale = _select(j, scale0, scale1, scale2, scale3, NUM)
    s_off = _select(j, 0, SOFF1, SOFF2, SOFF3, NUM)
    for r0 in range(0, R, BLOCK_R):
        i_r = r0 + tl.arange(0, BLOCK_R)
        m_r = i_r < R
        p_p = s_ptr + i_m64[:, None] * stride_sm + (s_off + i_r)[None, :].to(tl.int64) * stride_sr
        p_q = b_ptr + i_r[:, None].to(tl.int64) * stride_br + i_n64[None, :] * stride_bn
        b_p = tl.load(p_p, mask=m_m[:, None] & m_r[None, :], other=0.0)  # [BM, BR]
        b_q = tl.load(p_q, mask=m_r[:, None] & m_n[None, :], other=0.0).to(DOT_DTYPE)  # [BR, BN]
        acc = tl.dot((b_p.to(tl.float32) * scale).to(DOT_DTYPE), b_q, acc, input_precision=PRECISION)
    if BIAS != 0:
        has_bias = _bits(j, BIAS, NUM)
        bias_ptr = _select(j, bias0_ptr, bias1_ptr, bias2_ptr, bias3_ptr, NUM)
        acc += tl.load(bias_ptr + i_n, mask=m_n & has_bias, other=0.0).to(tl.float32)[None, :]
    y_ptr = _select(j, y0_ptr, y1_ptr, y2_ptr, y3_ptr, NUM)
    stride_ym = _select(j, stride_y0m, stride_y1m, stride_y2m, stride_y3m, NUM)
    p_y = y_ptr + i_m64[:, None] * stride_ym + i_n64[None, :]
    tl.store(p_y, acc.to(y_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _group_dx_kernel(
    # pointers
    dy0_ptr,
    dy1_ptr,
    dy2_ptr,
    dy3_ptr,
    w0_ptr,
    w1_ptr,
    w2_ptr,
    w3_ptr,
    a0_ptr,
    a1_ptr,
    a2_ptr,
    a3_ptr,
    ds_ptr,
    x_ptr,
    da_ptr,
    dx_ptr,
    seed_ptr,
    # sizes
    M,
    K,
    R0,
    R1,
    R2,
    R3,
    OFF1,
    OFF2,
    OFF3,
    N0,
    N1,
    N2,
    N3,
    M_BUCKET,
    N_SUM,
    # strides
    stride_dy0m,
    stride_dy1m,
    stride_dy2m,
    stride_dy3m,
    stride_w0n,
    stride_w1n,
    stride_w2n,
    stride_w3n,
    stride_w0k,
    stride_w1k,
    stride_w2k,
    stride_w3k,
    stride_a0r,
    stride_a1r,
    stride_a2r,
    stride_a3r,
    stride_dsm,
    stride_dsr,
    stride_xm,
    stride_xk,
    stride_dar,
    stride_dxm,
    # scalars
    inv_keep0,
    inv_keep1,
    inv_keep2,
    inv_keep3,
    p_thresh0,
    p_thresh1,
    p_thresh2,
    p_thresh3,
    seed_idx0,
    seed_idx1,
    seed_idx2,
    seed_idx3,
    # meta-parameters
    NUM: tl.constexpr,
    DROPOUT: tl.constexpr,
    DA: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dX[M, K] = sum_j dY_j[M, N_j] @ W_j[N_j, K] + sum_j m_j * inv_keep_j * (dS_j @ A_j), dS_j = dS[:, OFF_j :
    OFF_j + R_j] (the mask m_j for members in DROPOUT), and for the members in DA (none of them in DROPOUT) their
    tile's share of dA[OFF_j + r, K] += dS_j^T @ x (float32 atomics). The reduction walks member 0's N_0, then
    member 1's, ...; dY_j and dX have a unit inner stride, A_j too. This GEMM's N is K (x's features)."""
    tl.static_assert((DA & DROPOUT) == 0, "with dropout a member's dA comes from the dS pass")
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
    i_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m, m_n = i_m < M, i_n < K
    i_m64, i_n64 = i_m.to(tl.int64), i_n.to(tl.int64)

    # the frozen products, one member after the other
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in tl.static_range(NUM):
        N = _pick(j, N0, N1, N2, N3)
        stride_dym = _pick(j, stride_dy0m, stride_dy1m, stride_dy2m, stride_dy3m)
        stride_wn = _pick(j, stride_w0n, stride_w1n, stride_w2n, stride_w3n)
        stride_wk = _pick(j, stride_w0k, stride_w1k, stride_w2k, stride_w3k)
        p_a = _pick(j, dy0_ptr, dy1_ptr, dy2_ptr, dy3_ptr) + i_m64[:, None] * stride_dym
        p_a += tl.arange(0, BLOCK_K)[None, :]
        p_b = _pick(j, w0_ptr, w1_ptr, w2_ptr, w3_ptr) + tl.arange(0, BLOCK_K)[:, None] * stride_wn
        p_b += i_n64[None, :] * stride_wk
        for k0 in range(0, N, BLOCK_K):
            m_k = tl.arange(0, BLOCK_K) < N - k0
            b_a = tl.load(p_a, mask=m_m[:, None] & m_k[None, :], other=0.0)
            b_b = tl.load(p_b, mask=m_k[:, None] & m_n[None, :], other=0.0)
            acc = tl.dot(b_a.to(DOT_DTYPE), b_b.to(DOT_DTYPE), acc, input_precision=PRECISION)
            p_a += BLOCK_K
            p_b += BLOCK_K * stride_wn

    # the epilogue: each member's LoRA term (r-wide steps), its mask, its dA share; a runtime loop over the members
    # (one member's mask and LoRA term live at a time)
    if DA != 0:
        p_x = x_ptr + i_m64[:, None] * stride_xm + i_n64[None, :] * stride_xk
        b_xt = tl.trans(tl.load(p_x, mask=m_m[:, None] & m_n[None, :], other=0.0).to(DOT_DTYPE))  # [BN, BM]
    for j in range(NUM):
        R = _select(j, R0, R1, R2, R3, NUM)
        off = _select(j, 0, OFF1, OFF2, OFF3, NUM)
        a_ptr = _select(j, a0_ptr, a1_ptr, a2_ptr, a3_ptr, NUM)
        stride_ar = _select(j, stride_a0r, stride_a1r, stride_a2r, stride_a3r, NUM)
        dropped = _bits(j, DROPOUT, NUM)
        if DROPOUT != 0:
            lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            i_r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            m_r = i_r < R
            p_p = ds_ptr + i_m64[:, None] * stride_dsm + (off + i_r)[None, :] * stride_dsr
            b_p = tl.load(p_p, mask=m_m[:, None] & m_r[None, :], other=0.0).to(DOT_DTYPE)  # [BM, BR]
            p_q = a_ptr + i_r[:, None] * stride_ar + i_n64[None, :]
            b_q = tl.load(p_q, mask=m_r[:, None] & m_n[None, :], other=0.0).to(DOT_DTYPE)  # [BR, BN] of A_j
            if DROPOUT != 0:
                lora = tl.dot(b_p, b_q, lora, input_precision=PRECISION)
            else:
                acc = tl.dot(b_p, b_q, acc, input_precision=PRECISION)
            if DA != 0:
                if _bits(j, DA, NUM):
                    b_da = tl.dot(b_xt, b_p, input_precision=PRECISION)  # [BN, BR]
                    p_da = da_ptr + (off + i_r)[None, :] * stride_dar + i_n64[:, None]
                    tl.atomic_add(p_da, b_da, mask=m_n[:, None] & m_r[None, :], sem="relaxed")
        if DROPOUT != 0:
            if dropped:
                seed = tl.load(seed_ptr + _select(j, seed_idx0, seed_idx1, seed_idx2, seed_idx3, NUM))
                keep = dropout_keep(seed, i_m, i_n, _select(j, p_thresh0, p_thresh1, p_thresh2, p_thresh3, NUM))
                acc = tl.where(keep, acc + lora * _select(j, inv_keep0, inv_keep1, inv_keep2, inv_keep3, NUM), acc)
            else:
                acc += lora
    p_dx = dx_ptr + i_m64[:, None] * stride_dxm + i_n64[None, :]
    tl.store(p_dx, acc.to(dx_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


# ----------------------------------------------------------------------------------------------------------
# Autotuning: the forward GEMM over linear's tiles (the same loop and epilogue shape), dX over
# configs.group_dx_config_tuples; dX keeps the dA buffer's values across tuning runs (the dS pass may have added
# dropout members' dA to it already)
# ----------------------------------------------------------------------------------------------------------


def _prune_configs(configs_list, named_args, **kwargs):
    """Drop tiles much larger than the problem: they only waste the autotuner's time."""
    args = {**named_args, **kwargs}
    m, n = args["M"], args["N_SUM"] if "y0_ptr" in args else args["K"]  # the forward's N, or dX's
    kept = [c for c in configs_list if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(m))]
    kept = [c for c in kept if c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(n))]
    return kept or configs_list[-1:]


_TUNE_KEY = ["M_BUCKET", "N_SUM", "K"]
_autotuned = {}


def _kernel_for(kernel, major: int, dtype: torch.dtype):
    key = (kernel, major, dtype)
    if key not in _autotuned:
        dx = kernel is _group_dx_kernel
        tiles = configs.group_dx_config_tuples(major, dtype) if dx else configs.gemm_config_tuples(major, dtype)
        _autotuned[key] = triton.autotune(
            configs=configs.gemm_tiles_as_configs(tiles),
            key=_TUNE_KEY,
            prune_configs_by={"early_config_prune": _prune_configs},
            restore_value=["da_ptr"] if dx else None,
        )(kernel)
    return _autotuned[key]


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(a // -b)


def _four(values, fill):
    """values padded to the four member slots with ``fill``."""
    values = list(values)
    return values + [fill] * (MAX_MEMBERS - len(values))


def _slots(prefix: str, values, fill) -> dict:
    return {f"{prefix}{i}": v for i, v in enumerate(_four(values, fill))}


def _offsets(sizes) -> list[int]:
    """Where each of a row of sizes starts when they are laid side by side."""
    return list(itertools.accumulate(sizes, initial=0))[:-1]


def _column_slots(prefix: str, offsets, total: int) -> dict:
    """{prefix1: offset of member 1, ...}: where members 1-3 start (``total`` for absent ones; member 0 at 0)."""
    return {f"{prefix}{i}": v for i, v in enumerate(_four(offsets, total)) if i > 0}


def _bitset(flags) -> int:
    return sum(1 << i for i, on in enumerate(flags) if on)


def _rows_unit(t):
    """t with a unit inner stride (a copy only for an operand that has none)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _same_dtype(tensors):
    """The tensors in one dtype (the kernels select among them by pointer): the first's, others cast if needed."""
    dt = tensors[0].dtype
    return [t if t.dtype == dt else t.to(dt) for t in tensors]


def _skinny(device, side=False):
    """(BLOCK_M, BLOCK_K, warps, stages) of the S pass, or of the dS/dB pass with ``side``."""
    if INTERPRET:
        return configs.SKINNY_INTERPRET
    major = configs.capability(device)
    return configs.skinny_side_config(major) if side else configs.group_skinny_config(major)


def _gemm_launch(kernel, grid_of, args, device, dtype):
    """Launch one of the group GEMMs: the interpreter's small tiles, or the autotuned kernel."""
    if INTERPRET:
        bm, bn, bk, g, _, _ = configs.GEMM_INTERPRET
        grid = grid_of(bm, bn)
        plans_for(kernel).launch(None, grid, **args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g)
        return
    tuned = _kernel_for(kernel, configs.capability(device), dtype)
    plans_for(tuned).launch(None, lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_N"]), **args)


def lora_group_fwd(x, weights, biases, lora_As, lora_Bs, scalings, ps, seeds):
    """Y_j [M, N_j] and S [M, sum r_j] for x [M, K] (any strides) and the members' tensors (see the module docstring);
    ``biases`` are the effective biases (None allowed), ``ps`` the dropout probabilities, ``seeds`` an int64 tensor
    [n] on x's device (or None without dropout)."""
    check_dtype(x)
    n = len(weights)
    M, K = x.shape
    ranks = [a.shape[0] for a in lora_As]
    RT = sum(ranks)
    offs = _offsets(ranks)
    s = torch.empty((M, RT), device=x.device, dtype=x.dtype)
    ys = [torch.empty((M, w.shape[0]), device=x.device, dtype=x.dtype) for w in weights]
    if M == 0:
        return ys, s
    lora_As = _same_dtype([_rows_unit(a) for a in lora_As])
    lora_Bs = _same_dtype(lora_Bs)
    biases = [b.contiguous() if b is not None else None for b in biases]
    dropout = _bitset(p > 0 for p in ps)
    seed_ptr = _check_seeds(seeds, ps, x) if dropout else x
    bm, bk, warps, stages = _skinny(x.device)
    br = rank_block(max(ranks))
    plans_for(_group_down_kernel).launch(
        None,
        (_cdiv(M, bm), _cdiv(max(ranks), br), 1),
        x_ptr=x,
        **{f"a{i}_ptr": a for i, a in enumerate(_four(lora_As, lora_As[0]))},
        s_ptr=s,
        seed_ptr=seed_ptr,
        M=M,
        K=K,
        **_slots("R", ranks, 0),
        **_column_slots("OFF", offs, RT),
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        **{f"stride_a{i}r": a.stride(0) for i, a in enumerate(_four(lora_As, lora_As[0]))},
        stride_sm=s.stride(0),
        stride_sr=s.stride(1),
        **_slots("p_thresh", [dropout_threshold(p) for p in ps], 0),
        **_slots("scale", [1.0 / (1.0 - p) if p > 0 else 1.0 for p in ps], 1.0),
        **_slots("seed_idx", _seed_positions(ps), 0),
        NUM=n,
        DROPOUT=dropout,
        DOT_DTYPE=dot_dtype(x.dtype),
        PRECISION=input_precision(x.dtype),
        BLOCK_M=bm,
        BLOCK_K=bk,
        BLOCK_R=br,
        num_warps=warps,
        num_stages=stages,
    )
    n_sum = sum(w.shape[0] for w in weights)
    weights4 = _four(weights, weights[0])
    bs4 = _four(lora_Bs, lora_Bs[0])
    ys4 = _four(ys, ys[0])
    bias4 = [b if b is not None else y for b, y in zip(_four(biases, None), ys4, strict=True)]  # absent: never read
    args = dict(
        x_ptr=x,
        s_ptr=s,
        **{f"w{i}_ptr": w for i, w in enumerate(weights4)},
        **{f"b{i}_ptr": b for i, b in enumerate(bs4)},
        **{f"bias{i}_ptr": b for i, b in enumerate(bias4)},
        **{f"y{i}_ptr": y for i, y in enumerate(ys4)},
        M=M,
        K=K,
        **_slots("N", [w.shape[0] for w in weights], 0),
        **_slots("R", ranks, 0),
        **_column_slots("SOFF", offs, RT),
        M_BUCKET=1 << max(M - 1, 0).bit_length(),
        N_SUM=n_sum,
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_sm=s.stride(0),
        stride_sr=s.stride(1),
        **{f"stride_w{i}n": w.stride(0) for i, w in enumerate(weights4)},
        **{f"stride_w{i}k": w.stride(1) for i, w in enumerate(weights4)},
        **{f"stride_b{i}n": b.stride(0) for i, b in enumerate(bs4)},
        **{f"stride_b{i}r": b.stride(1) for i, b in enumerate(bs4)},
        **{f"stride_y{i}m": y.stride(0) for i, y in enumerate(ys4)},
        **_slots("scale", scalings, 0.0),
        NUM=n,
        BIAS=_bitset(b is not None for b in biases),
        DOT_DTYPE=dot_dtype(x.dtype),
        PRECISION=input_precision(x.dtype),
        BLOCK_R=rank_block(max(ranks)),
    )

    def grid_of(bm, bn):
        return (_cdiv(M, bm) * sum(_cdiv(w.shape[0], bn) for w in weights),)

    def group():
        _gemm_launch(_group_gemm_kernel, grid_of, args, x.device, x.dtype)

    def members():  # each member's own fused GEMM (on Hopper the persistent TMA kernel) on its columns of S
        for j in range(n):
            s_j = s[:, offs[j] : offs[j] + ranks[j]]
            lora_gemm(x, weights[j].t(), s_j, lora_Bs[j].t(), biases[j], ys[j], scalings[j], direction="fwd")

    def cublas_update():
        for j in range(n):
            torch.mm(x, weights[j].t(), out=ys[j])
            lora_update_(ys[j], s[:, offs[j] : offs[j] + ranks[j]], lora_Bs[j].t(), scalings[j], bias=biases[j])

    # the measured dispatch (kernels/dispatch.py): one GEMM over the concatenated N, or one per member (fused, or
    # cuBLAS plus the r-wide update), whichever this device runs fastest for these shapes; every path writes all of
    # each Y, so the timing runs leave no trace
    paths = {"group": group, "members": members, "cublas+update": cublas_update}
    widths = ",".join(str(w.shape[0]) for w in weights)
    shape = dict(M=M, N=n_sum, K=K, R=RT, dtype=x.dtype, dropout=False)
    paths[_measured_path(f"group_fwd[{widths}]", shape, paths, x.device)]()
    return ys, s


def _measured_path(kind, shape, candidates, device) -> str:
    """The dispatch's choice among ``candidates`` for this shape on this device: "group" where nothing is timed
    (the interpreter, off CUDA, a first call inside a CUDA graph capture)."""
    return _dispatch.choose(_dispatch.shape_key(kind, **shape), candidates, device, default="group")


def _seed_positions(ps) -> list[int]:
    """Where each member's seed is in the seeds tensor (one per member with dropout, in member order)."""
    return [sum(q > 0 for q in ps[:j]) for j in range(len(ps))]


def _check_seeds(seeds, ps, x):
    """The seeds tensor as the kernels read it: one int64 per member with dropout, on x's device, contiguous."""
    n = sum(p > 0 for p in ps)
    if (
        not isinstance(seeds, torch.Tensor)
        or seeds.dtype != torch.int64
        or seeds.numel() != n
        or seeds.device != x.device
        or not seeds.is_contiguous()
    ):
        got = f"{seeds.dtype} of shape {tuple(seeds.shape)} on {seeds.device}" if isinstance(seeds, torch.Tensor) else (
            type(seeds).__name__)  # fmt: skip
        raise ValueError(f"a group's dropout seeds must be {n} contiguous int64 on {x.device}, got {got}")
    return seeds


def lora_group_bwd(dys, x, s, s_offsets, weights, lora_As, lora_Bs, scalings, ps, seeds, need_dx, need_sum):
    """dX [M, K] (or None) and per member dA_j, dB_j and rowsum_M(dY_j) float32 (where need_sum[j]) for the members
    with a gradient dys[j] [M, N_j]; the others get None. s: the forward's S, member j's columns from s_offsets[j]."""
    n = len(dys)
    live = [j for j in range(n) if dys[j] is not None]
    if not live:
        return None, [None] * n, [None] * n, [None] * n
    dy0 = dys[live[0]]
    check_dtype(dy0)
    M, K = x.shape
    ranks = [lora_As[j].shape[0] for j in live]
    RT = sum(ranks)
    offs = _offsets(ranks)
    Ns = [weights[j].shape[0] for j in live]
    db_sizes = [nn * r for nn, r in zip(Ns, ranks, strict=True)]
    db_offs = _offsets(db_sizes)
    # one float32 workspace, one memset: dB_j [N_j, r_j] of every live member, then dA [sum r_j, K]
    grads = torch.zeros(sum(db_sizes) + RT * K, device=x.device, dtype=torch.float32)
    ds = torch.empty((M, RT), device=x.device, dtype=dy0.dtype)
    dx = torch.empty((M, K), device=x.device, dtype=x.dtype) if need_dx else None
    dys_l = [dys[j] for j in live]
    As = _same_dtype([_rows_unit(lora_As[j]) for j in live])
    Bs = _same_dtype([lora_Bs[j] for j in live])
    Ws = [weights[j] for j in live]
    pl = [ps[j] for j in live]
    dropout = _bitset(p > 0 for p in pl)
    every = (1 << len(live)) - 1
    seed_ptr = _check_seeds(seeds, ps, x) if dropout else x
    seed_pos = [_seed_positions(ps)[j] for j in live]
    inv_keep = [1.0 / (1.0 - p) if p > 0 else 1.0 for p in pl]
    thresholds = [dropout_threshold(p) for p in pl]
    dys4, Bs4, As4, Ws4 = _four(dys_l, dys_l[0]), _four(Bs, Bs[0]), _four(As, As[0]), _four(Ws, Ws[0])
    member_args = dict(
        **_slots("R", ranks, 0),
        **_column_slots("OFF", offs, RT),
        **_slots("N", Ns, 0),
        **{f"stride_dy{i}m": d.stride(0) for i, d in enumerate(dys4)},
        **_slots("inv_keep", inv_keep, 1.0),
        **_slots("p_thresh", thresholds, 0),
        **_slots("seed_idx", seed_pos, 0),
        NUM=len(live),
        DROPOUT=dropout,
        DOT_DTYPE=dot_dtype(dy0.dtype),
        PRECISION=input_precision(dy0.dtype),
    )
    bm, bk, warps, stages = _skinny(x.device, side=True)
    br = rank_block(max(ranks))

    def ds_pass(grads, ds, da_members):
        """dS into ds, dB into grads (zeroed), and dA into grads for da_members (a member set)."""
        plans_for(_group_ds_kernel).launch(
            None,
            (_cdiv(M, bm), _cdiv(max(ranks), br), 1),
            **{f"dy{i}_ptr": d for i, d in enumerate(dys4)},
            **{f"b{i}_ptr": b for i, b in enumerate(Bs4)},
            s_ptr=s,
            x_ptr=x,
            ds_ptr=ds,
            db_ptr=grads,
            da_ptr=grads[sum(db_sizes) :],
            seed_ptr=seed_ptr,
            M=M,
            K=K,
            **_slots("SOFF", [s_offsets[j] for j in live], 0),
            **_slots("DBOFF", db_offs, 0),
            **{f"stride_b{i}n": b.stride(0) for i, b in enumerate(Bs4)},
            **{f"stride_b{i}r": b.stride(1) for i, b in enumerate(Bs4)},
            stride_sm=s.stride(0),
            stride_sr=s.stride(1),
            stride_xm=x.stride(0),
            stride_xk=x.stride(1),
            stride_dsm=ds.stride(0),
            stride_dsr=ds.stride(1),
            stride_dar=K,
            **_slots("scale", [scalings[j] for j in live], 0.0),
            **member_args,
            DA=da_members,
            BLOCK_M=bm,
            BLOCK_K=bk,
            BLOCK_R=br,
            num_warps=warps,
            num_stages=stages,
        )

    def group(dx, grads, ds):
        """dA in the dS pass for the members with dropout (their mask drawn once on x), the others' dA shares in
        the dX GEMM's epilogue."""
        ds_pass(grads, ds, dropout)
        args = dict(
            **{f"dy{i}_ptr": d for i, d in enumerate(dys4)},
            **{f"w{i}_ptr": w for i, w in enumerate(Ws4)},
            **{f"a{i}_ptr": a for i, a in enumerate(As4)},
            ds_ptr=ds,
            x_ptr=x,
            da_ptr=grads[sum(db_sizes) :],
            dx_ptr=dx,
            seed_ptr=seed_ptr,
            M=M,
            K=K,
            M_BUCKET=1 << max(M - 1, 0).bit_length(),
            N_SUM=sum(Ns),
            **{f"stride_w{i}n": w.stride(0) for i, w in enumerate(Ws4)},
            **{f"stride_w{i}k": w.stride(1) for i, w in enumerate(Ws4)},
            **{f"stride_a{i}r": a.stride(0) for i, a in enumerate(As4)},
            stride_dsm=ds.stride(0),
            stride_dsr=ds.stride(1),
            stride_xm=x.stride(0),
            stride_xk=x.stride(1),
            stride_dar=K,
            stride_dxm=dx.stride(0),
            **member_args,
            DA=every - dropout,
            BLOCK_R=br,
        )

        def grid_of(bm, bn):
            return (_cdiv(M, bm) * _cdiv(K, bn),)

        _gemm_launch(_group_dx_kernel, grid_of, args, x.device, x.dtype)

    def cublas_update(dx, grads, ds):
        """Every dA in the dS pass; dX from cuBLAS, each member's product added in place, then each LoRA term
        (masked) by the r-wide update."""
        ds_pass(grads, ds, every)
        torch.mm(dys_l[0], Ws[0], out=dx)
        for dy, w in zip(dys_l[1:], Ws[1:], strict=True):
            dx.addmm_(dy, w)
        for q in range(len(live)):
            seed = seeds[seed_pos[q]] if pl[q] > 0 else None
            lora_update_(dx, ds[:, offs[q] : offs[q] + ranks[q]], As[q], inv_keep[q], dropout_p=pl[q], seed=seed)

    if need_dx:
        # the measured dispatch (kernels/dispatch.py) between the grouped dX GEMM and cuBLAS plus the r-wide
        # updates, timed on scratch buffers (the dA/dB atomics must see one run only)
        paths = {"group": group, "cublas+update": cublas_update}
        candidates = {
            name: lambda fn=fn: fn(torch.empty_like(dx), torch.zeros_like(grads), torch.empty_like(ds))
            for name, fn in paths.items()
        }
        widths = ",".join(map(str, Ns))
        shape = dict(M=M, N=K, K=sum(Ns), R=RT, dtype=x.dtype, dropout=dropout != 0)
        paths[_measured_path(f"group_dx[{widths}]", shape, candidates, x.device)](dx, grads, ds)
    else:
        ds_pass(grads, ds, every)
    # the adapters' gradients in their dtypes: one cast when they share one
    dtypes = {t.dtype for j in live for t in (lora_As[j], lora_Bs[j])}
    if len(dtypes) == 1 and torch.float32 not in dtypes:
        grads = grads.to(dtypes.pop())
    das, dbs = [None] * n, [None] * n
    for q, j in enumerate(live):
        db = grads[db_offs[q] : db_offs[q] + db_sizes[q]].view(Ns[q], ranks[q])
        da = grads[sum(db_sizes) + offs[q] * K : sum(db_sizes) + (offs[q] + ranks[q]) * K].view(ranks[q], K)
        dbs[j] = db if db.dtype == lora_Bs[j].dtype else db.to(lora_Bs[j].dtype)
        das[j] = da if da.dtype == lora_As[j].dtype else da.to(lora_As[j].dtype)
    dsums = [dys[j].sum(0, dtype=torch.float32) if need_sum[j] and dys[j] is not None else None for j in range(n)]
    return dx, das, dbs, dsums
