"""DoRA on a Linear: the row norm of W + s B A without an N x K matrix, and the backward's column scaling.

x [M, K], W [N, K] (frozen), A [r, K], B [N, r], s the scaling, g [N] the magnitude, n [N] = ||W + s B A|| per
output row (a constant in backward), c = g / n:

    norm:      n^2 = ||W||^2_rows + 2 s rowsum((W A^T) * B) + s^2 rowsum((B (A A^T)) * B)
               one pass over W gives W A^T [N, r] and ||W||^2_rows together     (_dora_norm_kernel)
               the rest is r-wide work on [N, r] and [r, r] tensors (torch ops in dora_weight_norm)
    forward:   Y = c * (x W^T + s S B^T) + bias is the LoRA GEMM of fastlora.kernels.linear with its column scale
    backward:  dY' = (c + shift) * dY  and  dg = rowsum_M(dY * Yp) / n  in one pass over dY   (_dora_bwd_kernel)

Where dg's Yp comes from:
- without dropout Yp is recovered from the layer's own output Y = c Yp + bias: dY * Yp / n = dY * (Y - bias) / g,
  so the kernel sums dY * (Y - bias) and divides by g once per column. A column with g = 0 has c = 0 and Y = bias:
  its Yp is gone from Y, so a column tile holding such a column recomputes Yp = x W^T + s S B^T for that tile
  (a K loop, paid only by tiles with a zero magnitude) and divides by n.
- with dropout the op saves Yq = x_d W^T + s S B^T itself (one M x N tensor) and the kernel sums dY * Yq / n.
The sums over M split across programs; the partial sums go to a float32 buffer summed in a fixed order, so the
result is deterministic. dbias = rowsum_M(dY) comes from the same pass when the bias is trainable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastlora.kernels import configs
from fastlora.kernels.configs import (
    check_dtype,
    dora_bwd_config,
    dora_norm_config,
    dot_dtype,
    input_precision,
    rank_block,
)
from fastlora.kernels.launch import plans_for
from fastlora.kernels.tiles import tile_offsets


@triton.jit
def _dora_norm_kernel(
    # pointers
    w_ptr,
    a_ptr,
    wa_ptr,
    wsq_ptr,
    # sizes
    N,
    K,
    R,
    # strides
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_wan,
    stride_war,
    # meta-parameters
    NEED_WSQ: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """wa[N, R] = W A^T and (NEED_WSQ) wsq[N] = ||W||^2_rows, both float32, from one pass over W.
    Grid (N blocks, rank chunks); the first rank chunk also sums the squares."""
    i_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    i_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_n = i_n < N
    m_r = i_r < R
    b_wa = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    b_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        i_k = k0 + tl.arange(0, BLOCK_K)
        m_k = i_k < K
        p_w = w_ptr + tile_offsets(i_n, i_k, stride_wn, stride_wk)
        b_w = tl.load(p_w, mask=m_n[:, None] & m_k[None, :], other=0.0)
        p_a = a_ptr + tile_offsets(i_r, i_k, stride_ar, stride_ak)
        b_a = tl.load(p_a, mask=m_r[:, None] & m_k[None, :], other=0.0)
        b_wa = tl.dot(b_w.to(DOT_DTYPE), tl.trans(b_a.to(DOT_DTYPE)), b_wa, input_precision=PRECISION)
        if NEED_WSQ:
            b_wf = b_w.to(tl.float32)
            b_sq += tl.sum(b_wf * b_wf, axis=1)
    p_wa = wa_ptr + tile_offsets(i_n, i_r, stride_wan, stride_war)
    tl.store(p_wa, b_wa, mask=m_n[:, None] & m_r[None, :])
    if NEED_WSQ:
        if tl.program_id(1) == 0:  # the first rank chunk stores the squares (a branch: Triton 3.9's interpreter
            tl.store(wsq_ptr + i_n, b_sq, mask=m_n)  # refuses a mask that ands in a scalar)


@triton.jit
def _dora_bwd_kernel(
    # pointers
    dy_ptr,
    src_ptr,
    bias_ptr,
    g_ptr,
    n_ptr,
    out_ptr,
    dg_ptr,
    dbias_ptr,
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    # sizes
    M,
    N,
    K,
    R,
    M_PER_SPLIT,
    # strides
    stride_dym,
    stride_dyn,
    stride_srcm,
    stride_srcn,
    stride_om,
    stride_on,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_sm,
    stride_sr,
    stride_bn,
    stride_br,
    # scalars
    scaling,
    shift,
    # meta-parameters
    RECOVER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out = (c + shift) * dY; dg partial [split, N]; dbias partial [split, N]. Grid (N blocks, M splits).

    RECOVER: src is the layer output Y (dg from (Y - bias) / g; zero-magnitude columns recompute Yp);
    otherwise src is Yq itself (dg = rowsum(dY * Yq) / n)."""
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    i_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = i_n < N
    b_g = tl.load(g_ptr + i_n, mask=m_n, other=1.0).to(tl.float32)
    b_nrm = tl.load(n_ptr + i_n, mask=m_n, other=1.0)
    b_scale = b_g / b_nrm + shift
    b_bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if RECOVER and HAS_BIAS:
        b_bias = tl.load(bias_ptr + i_n, mask=m_n, other=0.0).to(tl.float32)
    m_zero = (b_g == 0.0) & m_n
    any_zero = tl.max(m_zero.to(tl.int32), axis=0)
    b_dg = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b_rec = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b_db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m_start = pid_s * M_PER_SPLIT
    for m0 in range(m_start, tl.minimum(m_start + M_PER_SPLIT, M), BLOCK_M):
        i_m = m0 + tl.arange(0, BLOCK_M)
        m_m = i_m < M
        m_mn = m_m[:, None] & m_n[None, :]
        p_dy = dy_ptr + tile_offsets(i_m, i_n, stride_dym, stride_dyn)
        b_dy = tl.load(p_dy, mask=m_mn, other=0.0).to(tl.float32)
        p_o = out_ptr + tile_offsets(i_m, i_n, stride_om, stride_on)
        tl.store(p_o, (b_dy * b_scale[None, :]).to(out_ptr.dtype.element_ty), mask=m_mn)
        p_src = src_ptr + tile_offsets(i_m, i_n, stride_srcm, stride_srcn)
        b_src = tl.load(p_src, mask=m_mn, other=0.0).to(tl.float32)
        if RECOVER:
            b_src = b_src - b_bias[None, :]
        b_dg += tl.sum(b_dy * b_src, axis=0)
        if NEED_DBIAS:
            b_db += tl.sum(b_dy, axis=0)
    if RECOVER:
        if any_zero > 0:  # a second pass over this column tile: Yp = x W^T + s S B^T, since Y holds only the bias
            for m0 in range(m_start, tl.minimum(m_start + M_PER_SPLIT, M), BLOCK_M):
                i_m = m0 + tl.arange(0, BLOCK_M)
                m_m = i_m < M
                p_dy = dy_ptr + tile_offsets(i_m, i_n, stride_dym, stride_dyn)
                b_dy = tl.load(p_dy, mask=m_m[:, None] & m_n[None, :], other=0.0).to(tl.float32)
                b_yp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    i_k = k0 + tl.arange(0, BLOCK_K)
                    m_k = i_k < K
                    p_x = x_ptr + tile_offsets(i_m, i_k, stride_xm, stride_xk)
                    b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)
                    p_w = w_ptr + tile_offsets(i_n, i_k, stride_wn, stride_wk)
                    b_w = tl.load(p_w, mask=m_n[:, None] & m_k[None, :], other=0.0)
                    b_yp = tl.dot(b_x.to(DOT_DTYPE), tl.trans(b_w.to(DOT_DTYPE)), b_yp, input_precision=PRECISION)
                for r0 in range(0, R, BLOCK_R):
                    i_r = r0 + tl.arange(0, BLOCK_R)
                    m_r = i_r < R
                    p_s = s_ptr + tile_offsets(i_m, i_r, stride_sm, stride_sr)
                    b_s = tl.load(p_s, mask=m_m[:, None] & m_r[None, :], other=0.0)
                    p_b = b_ptr + tile_offsets(i_n, i_r, stride_bn, stride_br)
                    b_b = tl.load(p_b, mask=m_n[:, None] & m_r[None, :], other=0.0)
                    b_lora = tl.dot(b_s.to(DOT_DTYPE), tl.trans(b_b.to(DOT_DTYPE)), input_precision=PRECISION)
                    b_yp += scaling * b_lora
                b_rec += tl.sum(b_dy * b_yp, axis=0)
        b_dg = tl.where(m_zero, b_rec / b_nrm, b_dg / tl.where(m_zero, 1.0, b_g))
    else:
        b_dg = b_dg / b_nrm
    tl.store(dg_ptr + pid_s * N + i_n, b_dg, mask=m_n)
    if NEED_DBIAS:
        tl.store(dbias_ptr + pid_s * N + i_n, b_db, mask=m_n)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def dora_weight_norm(weight, lora_A, lora_B, scaling, wsq=None):
    """(n [N], wsq [N]), both float32: n = ||W + s B A|| per row, wsq = ||W||^2_rows (computed unless given).

    One pass over W [N, K] computes W A^T [N, r] (and the squares); the r-wide rest runs as torch ops."""
    check_dtype(weight)
    N, K = weight.shape
    R = lora_A.shape[0]
    a = lora_A.to(weight.dtype)
    wa = torch.empty((N, R), device=weight.device, dtype=torch.float32)
    need_wsq = wsq is None
    if need_wsq:
        wsq = torch.empty((N,), device=weight.device, dtype=torch.float32)
    bn, bk, warps, stages = dora_norm_config()
    br = rank_block(R)
    plans_for(_dora_norm_kernel).launch(
        None,
        (triton.cdiv(N, bn), triton.cdiv(R, br), 1),
        w_ptr=weight,
        a_ptr=a,
        wa_ptr=wa,
        wsq_ptr=wsq,
        N=N,
        K=K,
        R=R,
        stride_wn=weight.stride(0),
        stride_wk=weight.stride(1),
        stride_ar=a.stride(0),
        stride_ak=a.stride(1),
        stride_wan=wa.stride(0),
        stride_war=wa.stride(1),
        NEED_WSQ=need_wsq,
        DOT_DTYPE=dot_dtype(weight.dtype),
        PRECISION=input_precision(weight.dtype),
        BLOCK_N=bn,
        BLOCK_K=bk,
        BLOCK_R=br,
        num_warps=warps,
        num_stages=stages,
    )
    b = lora_B.float()
    a32 = lora_A.float()
    cross = (wa * b).sum(1)
    lora_sq = (b @ (a32 @ a32.t()) * b).sum(1)
    n2 = wsq + (2.0 * scaling) * cross + (scaling * scaling) * lora_sq
    return n2.clamp_(min=0.0).sqrt_(), wsq


def dora_bwd_scale(dy, src, bias, magnitude, norm, shift, need_dbias, recompute=None):
    """One pass over dY [M, N]: (dY' = (c + shift) dY in dY's dtype, dg [N] float32, dbias [N] float32 or None).

    src: the layer output Y when ``recompute`` = (x [M, K], W [N, K], S [M, r], B [N, r], s) is given (no dropout:
    Yp recovered as (Y - bias) / c, recomputed for zero-magnitude columns), else Yq [M, N] (dg = rowsum(dY Yq) / n).
    c = magnitude / norm."""
    check_dtype(dy)
    M, N = dy.shape
    bm, bn, bk, warps = dora_bwd_config()
    grid_n = triton.cdiv(N, bn)
    m_blocks = triton.cdiv(M, bm)
    split = max(1, min(m_blocks, configs.num_programs_target(dy.device) // grid_n))
    m_per_split = triton.cdiv(m_blocks, split) * bm
    split = triton.cdiv(M, m_per_split)
    out = torch.empty((M, N), device=dy.device, dtype=dy.dtype)
    dg = torch.empty((split, N), device=dy.device, dtype=torch.float32)
    dbias = torch.empty((split, N), device=dy.device, dtype=torch.float32) if need_dbias else dg
    if recompute is not None:
        x, weight, s, lora_B, scaling = recompute
        R = s.shape[1]
    else:
        x, weight, s, lora_B, scaling, R = dy, dy, dy, dy, 0.0, 1
    plans_for(_dora_bwd_kernel).launch(
        None,
        (grid_n, split, 1),
        dy_ptr=dy,
        src_ptr=src,
        bias_ptr=bias if bias is not None else dy,
        g_ptr=magnitude,
        n_ptr=norm,
        out_ptr=out,
        dg_ptr=dg,
        dbias_ptr=dbias,
        x_ptr=x,
        w_ptr=weight,
        s_ptr=s,
        b_ptr=lora_B,
        M=M,
        N=N,
        K=x.shape[1],
        R=R,
        M_PER_SPLIT=m_per_split,
        stride_dym=dy.stride(0),
        stride_dyn=dy.stride(1),
        stride_srcm=src.stride(0),
        stride_srcn=src.stride(1),
        stride_om=out.stride(0),
        stride_on=out.stride(1),
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_wn=weight.stride(0),
        stride_wk=weight.stride(1),
        stride_sm=s.stride(0),
        stride_sr=s.stride(1),
        stride_bn=lora_B.stride(0),
        stride_br=lora_B.stride(1),
        scaling=float(scaling),
        shift=float(shift),
        RECOVER=recompute is not None,
        HAS_BIAS=bias is not None,
        NEED_DBIAS=need_dbias,
        DOT_DTYPE=dot_dtype(dy.dtype),
        PRECISION=input_precision(dy.dtype),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        BLOCK_R=rank_block(R),
        num_warps=warps,
    )
    return out, dg.sum(0), (dbias.sum(0) if need_dbias else None)
