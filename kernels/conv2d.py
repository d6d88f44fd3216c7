"""LoRA Conv2d as an implicit GEMM: the base convolution and the LoRA term share one accumulator.

Shapes: x [Nb, C, H, W] (any strides: NCHW or channels_last), weight [O, C/groups, kh, kw], A [r, C, kh, kw]
(applied with groups=1, as PEFT does), B [O, r] (the [O, r, 1, 1] parameter viewed 2-D), y [Nb, O, Ho, Wo]
in x's memory format. Rows m = (n, ho, wo), M = Nb*Ho*Wo; the reduction runs over k = (tap (i, j), channel c),
K = kh*kw*C; columns are output channels o. Row m at tap (i, j) reads input pixel
h = ho*sh - pad_top + i*dh, w = wo*sw - pad_left + j*dw, zero outside the image.

Forward:
    S  = im2col(m * x) A^T                 [M, r]   _conv_down_kernel: one pass over x, mask drawn in-kernel
    Y  = im2col(x) W^T + s * S B^T + bias           _conv_fwd_kernel: accumulator seeded with s * S B^T;
         or torch's convolution (cuDNN) plus s * S B^T added in place by _conv_up_kernel, where that is faster.
Backward, given dY:
    dS = s * dY B                          [M, r]   _conv_ds_db_kernel: one pass over dY gives dS and dB
    dB = s * dY^T S                        [O, r]
    dA = dS^T im2col(m * x)                [r, K]   _conv_da_kernel: split over M, partial sums added in fp32
    dX = conv_transpose(dY, W) + m * conv_transpose(dS, A)   _conv_dgrad_kernel: one accumulator, stored once
         (no dropout); or torch's dgrad (cuDNN) plus the LoRA term added in place by _conv_dx_kernel, with
         dropout or where that is faster.
No dW is formed. The dropout mask m (0 or 1/(1-p)) is a pure function of the seed and the input element's
flat NCHW index (n, c, h, w), so every kernel regenerates the same mask whatever its tiling or memory format.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
import triton.testing

from .configs import (
    CONV_GEMM_INTERPRET,
    CONV_SKINNY_KINDS,
    capability,
    conv_dgrad_config_tuples,
    conv_dgrad_configs,
    conv_gemm_config_tuples,
    conv_gemm_configs,
    conv_skinny_config,
    dot_dtype,
    input_precision,
    num_programs_target,
)

__all__ = ["lora_conv2d_fwd", "lora_conv2d_bwd", "conv2d_dropout_mask", "output_size", "conv_rank_block"]


def conv_rank_block(r: int) -> int:
    """Rank tile of the conv kernels: the padded rank (at least 16, the tensor-core minimum)."""
    return max(16, triton.next_power_of_2(r))


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _keep_scale(seed, p, scale, n, c, h, w, C, H, W):
    """Dropout factor (0 or 1/(1-p)) of input element (n, c, h, w): keyed on its flat NCHW index (int64)."""
    flat = ((n.to(tl.int64) * C + c) * H + h) * W + w
    return tl.where(tl.rand(seed, flat) >= p, scale, 0.0)


@triton.jit
def _pixel_rows(offs_m, Ho, Wo):
    """Row index m = (n, ho, wo) -> its three coordinates."""
    wo = offs_m % Wo
    t = offs_m // Wo
    return t // Ho, t % Ho, wo


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _conv_down_kernel(
    # pointers
    x_ptr,
    a_ptr,
    s_ptr,
    # sizes
    M,
    C,
    H,
    W,
    Ho,
    Wo,
    R,
    # strides
    sxn,
    sxc,
    sxh,
    sxw,
    sar,
    sac,
    sah,
    saw,
    # dropout
    seed,
    p,
    drop_scale,
    # meta-parameters
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    DIL_H: tl.constexpr,
    DIL_W: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """S [M, R] = im2col(m * x) A^T, one program per BLOCK_M output pixels."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < R
    n, ho, wo = _pixel_rows(offs_m, Ho, Wo)
    n64 = n.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    num_c = tl.cdiv(C, BLOCK_K)
    for it in range(0, KH * KW * num_c):
        tap = it // num_c
        c = (it % num_c) * BLOCK_K + offs_k  # [BK]
        i = tap // KW
        j = tap - i * KW
        h = ho * STRIDE_H - PAD_H + i * DIL_H
        w = wo * STRIDE_W - PAD_W + j * DIL_W
        row_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        c_ok = c < C
        row_off = n64 * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
        p_x = x_ptr + row_off[:, None] + c.to(tl.int64)[None, :] * sxc
        b_x = tl.load(p_x, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = _keep_scale(seed, p, drop_scale, n[:, None], c[None, :], h[:, None], w[:, None], C, H, W)
            b_x = b_x.to(tl.float32) * keep
        a_tap = tl.cast(i, tl.int64) * sah + tl.cast(j, tl.int64) * saw
        p_a = a_ptr + offs_r.to(tl.int64)[None, :] * sar + c.to(tl.int64)[:, None] * sac + a_tap
        b_a = tl.load(p_a, mask=c_ok[:, None] & r_ok[None, :], other=0.0)  # [BK, BR]
        acc = tl.dot(b_x.to(DOT_DTYPE), b_a.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)

    p_s = s_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :]
    tl.store(p_s, acc.to(s_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _conv_fwd_kernel(
    # pointers
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    bias_ptr,
    y_ptr,
    # sizes
    M,
    H,
    W,
    Ho,
    Wo,
    R,
    Cg,
    Og,
    # strides
    sxn,
    sxc,
    sxh,
    sxw,
    swo,
    swc,
    swh,
    sww,
    sbo,
    sbr,
    syn,
    syc,
    syh,
    syw,
    scaling,
    # meta-parameters
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    DIL_H: tl.constexpr,
    DIL_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Y [Nb, O, Ho, Wo] = im2col(x) W^T + s * S B^T + bias; tiles over (group, pixels, output channels of the group).

    The accumulator starts as s * S B^T (an r-wide step) and then runs over kh*kw taps x Cg/BLOCK_K channel steps.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(Og, BLOCK_N)
    g = pid // num_pid_n // num_pid_m  # the group: pid // (tiles per group), in 32-bit divisions
    g64 = g.to(tl.int64)
    pid = (pid - g64 * num_pid_m * num_pid_n).to(tl.int32)  # the tile within group g, below the grid size
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_on = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channel within the group
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    o_ok = offs_on < Og
    r_ok = offs_r < R
    n, ho, wo = _pixel_rows(offs_m, Ho, Wo)
    n64 = n.to(tl.int64)
    # group g's channels: inputs from g * Cg, outputs from g * Og
    x_ptr += g64 * Cg * sxc
    w_ptr += g64 * Og * swo
    b_ptr += g64 * Og * sbo
    bias_ptr += g64 * Og
    y_ptr += g64 * Og * syc

    # Seed: s * S B^T, S [BM, BR] and B^T [BR, BN].
    p_s = s_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :]
    b_s = tl.load(p_s, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    p_b = b_ptr + offs_on.to(tl.int64)[None, :] * sbo + offs_r.to(tl.int64)[:, None] * sbr
    b_b = tl.load(p_b, mask=r_ok[:, None] & o_ok[None, :], other=0.0)
    acc = tl.dot(b_s.to(DOT_DTYPE), b_b.to(DOT_DTYPE), input_precision=INPUT_PRECISION) * scaling

    num_c = tl.cdiv(Cg, BLOCK_K)
    for it in range(0, KH * KW * num_c):
        tap = it // num_c
        c = (it % num_c) * BLOCK_K + offs_k  # channel within the group [BK]
        i = tap // KW
        j = tap - i * KW
        h = ho * STRIDE_H - PAD_H + i * DIL_H
        w = wo * STRIDE_W - PAD_W + j * DIL_W
        row_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        c_ok = c < Cg
        row_off = n64 * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
        p_x = x_ptr + row_off[:, None] + c.to(tl.int64)[None, :] * sxc
        b_x = tl.load(p_x, mask=row_ok[:, None] & c_ok[None, :], other=0.0)  # [BM, BK]
        w_tap = tl.cast(i, tl.int64) * swh + tl.cast(j, tl.int64) * sww
        p_w = w_ptr + offs_on.to(tl.int64)[None, :] * swo + c.to(tl.int64)[:, None] * swc + w_tap
        b_w = tl.load(p_w, mask=c_ok[:, None] & o_ok[None, :], other=0.0)  # [BK, BN]
        acc = tl.dot(b_x.to(DOT_DTYPE), b_w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_on, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    row_off = n64 * syn + ho.to(tl.int64) * syh + wo.to(tl.int64) * syw
    p_y = y_ptr + row_off[:, None] + offs_on.to(tl.int64)[None, :] * syc
    tl.store(p_y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & o_ok[None, :])


@triton.jit
def _conv_up_kernel(
    # pointers
    y_ptr,
    s_ptr,
    b_ptr,
    # sizes
    M,
    O,
    Ho,
    Wo,
    R,
    # strides
    syn,
    syc,
    syh,
    syw,
    sbo,
    sbr,
    scaling,
    # meta-parameters
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Y [Nb, O, Ho, Wo] += s * S B^T in place, for a Y computed by torch's convolution; tiles over (pixels, O)."""
    pid_m = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = pid_o * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    o_ok = offs_o < O
    r_ok = offs_r < R
    n, ho, wo = _pixel_rows(offs_m, Ho, Wo)
    p_s = s_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :]
    b_s = tl.load(p_s, mask=m_ok[:, None] & r_ok[None, :], other=0.0)  # [BM, BR]
    p_b = b_ptr + offs_o.to(tl.int64)[None, :] * sbo + offs_r.to(tl.int64)[:, None] * sbr
    b_b = tl.load(p_b, mask=r_ok[:, None] & o_ok[None, :], other=0.0)  # [BR, BK]
    acc = tl.dot(b_s.to(DOT_DTYPE), b_b.to(DOT_DTYPE), input_precision=INPUT_PRECISION) * scaling
    row_off = n.to(tl.int64) * syn + ho.to(tl.int64) * syh + wo.to(tl.int64) * syw
    p_y = y_ptr + row_off[:, None] + offs_o.to(tl.int64)[None, :] * syc
    io_mask = m_ok[:, None] & o_ok[None, :]
    b_y = tl.load(p_y, mask=io_mask, other=0.0).to(tl.float32)
    tl.store(p_y, (b_y + acc).to(y_ptr.dtype.element_ty), mask=io_mask)


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _conv_ds_db_kernel(
    # pointers
    dy_ptr,
    s_ptr,
    b_ptr,
    ds_ptr,
    dbp_ptr,
    # sizes
    M,
    O,
    Ho,
    Wo,
    R,
    # strides
    sdn,
    sdc,
    sdh,
    sdw,
    sbo,
    sbr,
    scaling,
    # meta-parameters
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """dS [M, R] = s * dY B (fp32), and this tile's share of dY^T S into dbp [num_tiles, O, R] (fp32).

    One pass over dY: each [BLOCK_M, BLOCK_K] tile of dY feeds both products.
    """
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < R
    n, ho, wo = _pixel_rows(offs_m, Ho, Wo)
    row_off = n.to(tl.int64) * sdn + ho.to(tl.int64) * sdh + wo.to(tl.int64) * sdw

    p_s = s_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :]
    b_s = tl.load(p_s, mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BM, BR]
    acc_ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    dbp_row = dbp_ptr + pid.to(tl.int64) * O * R
    for o0 in range(0, O, BLOCK_K):
        o = o0 + offs_k
        o_ok = o < O
        p_dy = dy_ptr + row_off[:, None] + o.to(tl.int64)[None, :] * sdc
        b_dy = tl.load(p_dy, mask=m_ok[:, None] & o_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BM, BK]
        p_b = b_ptr + o.to(tl.int64)[:, None] * sbo + offs_r[None, :] * sbr
        b_b = tl.load(p_b, mask=o_ok[:, None] & r_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BK, BR]
        acc_ds = tl.dot(b_dy, b_b, acc_ds, input_precision=INPUT_PRECISION)
        b_db = tl.dot(tl.trans(b_dy), b_s, input_precision=INPUT_PRECISION)  # [BK, BR]
        p_db = dbp_row + o.to(tl.int64)[:, None] * R + offs_r[None, :]
        tl.store(p_db, b_db, mask=o_ok[:, None] & r_ok[None, :])

    p_ds = ds_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :]
    tl.store(p_ds, acc_ds * scaling, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _conv_da_kernel(
    # pointers
    x_ptr,
    ds_ptr,
    dap_ptr,
    # sizes
    M,
    C,
    H,
    W,
    Ho,
    Wo,
    R,
    # strides
    sxn,
    sxc,
    sxh,
    sxw,
    # dropout
    seed,
    p,
    drop_scale,
    # meta-parameters
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    DIL_H: tl.constexpr,
    DIL_W: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """dap [SPLIT, R, C, KH, KW] (fp32): split program_id(1)'s share of dS^T im2col(m * x) for one (tap, channel block).

    Axis 0 runs over (channel block, tap) with the tap fastest, so the kh*kw programs reading shifted copies of the
    same x rows run side by side and share them through L2.
    """
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    tap = pid_k % (KH * KW)
    i = tap // KW
    j = tap - i * KW
    c = (pid_k // (KH * KW)) * BLOCK_K + tl.arange(0, BLOCK_K)
    c_ok = c < C
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R

    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)  # dA^T: channels as the MMA's M side
    for m0 in range(split * BLOCK_M, M, num_splits * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        n, ho, wo = _pixel_rows(offs_m, Ho, Wo)
        h = ho * STRIDE_H - PAD_H + i * DIL_H
        w = wo * STRIDE_W - PAD_W + j * DIL_W
        row_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        row_off = n.to(tl.int64) * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
        p_x = x_ptr + row_off[:, None] + c.to(tl.int64)[None, :] * sxc
        b_x = tl.load(p_x, mask=row_ok[:, None] & c_ok[None, :], other=0.0)  # [BM, BK]
        if HAS_DROPOUT:
            keep = _keep_scale(seed, p, drop_scale, n[:, None], c[None, :], h[:, None], w[:, None], C, H, W)
            b_x = b_x.to(tl.float32) * keep
        p_ds = ds_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :]
        b_ds = tl.load(p_ds, mask=m_ok[:, None] & r_ok[None, :], other=0.0)  # [BM, BR]
        acc = tl.dot(tl.trans(b_x.to(DOT_DTYPE)), b_ds.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)

    # dap[split, r, c, i, j]
    p_da = (
        dap_ptr
        + split.to(tl.int64) * R * C * KH * KW
        + offs_r.to(tl.int64)[None, :] * (C * KH * KW)
        + c.to(tl.int64)[:, None] * (KH * KW)
        + tap
    )
    tl.store(p_da, acc, mask=c_ok[:, None] & r_ok[None, :])


@triton.jit
def _conv_dx_kernel(
    # pointers
    dx_ptr,
    ds_ptr,
    a_ptr,
    # sizes
    P,
    C,
    H,
    W,
    Ho,
    Wo,
    R,
    # strides
    sxn,
    sxc,
    sxh,
    sxw,
    sar,
    sac,
    sah,
    saw,
    # dropout
    seed,
    p,
    drop_scale,
    # meta-parameters
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    DIL_H: tl.constexpr,
    DIL_W: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """dX [Nb, C, H, W] += m * conv_transpose(dS, A), in place; tiles over (input pixels (n, h, w), channels).

    Input pixel h receives output row ho at tap i when h + pad_top - i*dh = ho * sh with 0 <= ho < Ho.
    """
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < P
    c_ok = c < C
    r_ok = offs_r < R
    n, h, w = _pixel_rows(offs_m, H, W)
    n_rows = n.to(tl.int64) * Ho

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for tap in range(0, KH * KW):
        i = tap // KW
        j = tap - i * KW
        hs = h + PAD_H - i * DIL_H
        ws = w + PAD_W - j * DIL_W
        ho = tl.maximum(hs, 0) // STRIDE_H
        wo = tl.maximum(ws, 0) // STRIDE_W
        src_ok = m_ok & (hs >= 0) & (ws >= 0) & (ho < Ho) & (wo < Wo)
        if STRIDE_H > 1:
            src_ok = src_ok & (hs % STRIDE_H == 0)
        if STRIDE_W > 1:
            src_ok = src_ok & (ws % STRIDE_W == 0)
        rows = (n_rows + ho) * Wo + wo
        p_ds = ds_ptr + rows[:, None] * R + offs_r[None, :]
        b_ds = tl.load(p_ds, mask=src_ok[:, None] & r_ok[None, :], other=0.0)  # [BM, BR]
        a_tap = tl.cast(i, tl.int64) * sah + tl.cast(j, tl.int64) * saw
        p_a = a_ptr + offs_r.to(tl.int64)[:, None] * sar + c.to(tl.int64)[None, :] * sac + a_tap
        b_a = tl.load(p_a, mask=r_ok[:, None] & c_ok[None, :], other=0.0)  # [BR, BK]
        acc = tl.dot(b_ds.to(DOT_DTYPE), b_a.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)

    if HAS_DROPOUT:
        acc = acc * _keep_scale(seed, p, drop_scale, n[:, None], c[None, :], h[:, None], w[:, None], C, H, W)
    row_off = n.to(tl.int64) * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
    p_dx = dx_ptr + row_off[:, None] + c.to(tl.int64)[None, :] * sxc
    io_mask = m_ok[:, None] & c_ok[None, :]
    b_dx = tl.load(p_dx, mask=io_mask, other=0.0).to(tl.float32)
    tl.store(p_dx, (b_dx + acc).to(dx_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _conv_dgrad_kernel(
    # pointers
    dy_ptr,
    w_ptr,
    ds_ptr,
    a_ptr,
    dx_ptr,
    # sizes
    P,
    C,
    H,
    W,
    Ho,
    Wo,
    R,
    Cg,
    Og,
    # strides
    sdn,
    sdc,
    sdh,
    sdw,
    swo,
    swc,
    swh,
    sww,
    sar,
    sac,
    sah,
    saw,
    sxn,
    sxc,
    sxh,
    sxw,
    # meta-parameters
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    DIL_H: tl.constexpr,
    DIL_W: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dX [Nb, C, H, W] = conv_transpose(dY, W) + conv_transpose(dS, A) with one accumulator, stored once.

    Without dropout only: the mask's Philox rounds over a [BLOCK_M, BLOCK_N] tile would spill next to this
    accumulator. Tiles over (group, input pixels (n, h, w), input channels of the group). The accumulator first
    takes the r-wide LoRA term over the kh*kw taps, then runs over kh*kw taps x Og/BLOCK_K channel steps of dY W.
    Input pixel h receives output row ho at tap i when h + pad_top - i*dh = ho * sh with 0 <= ho < Ho.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(P, BLOCK_M)
    num_pid_n = tl.cdiv(Cg, BLOCK_N)
    g = pid // num_pid_n // num_pid_m  # the group: pid // (tiles per group), in 32-bit divisions
    g64 = g.to(tl.int64)
    pid = (pid - g64 * num_pid_m * num_pid_n).to(tl.int32)  # the tile within group g, below the grid size
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel within the group
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < P
    c_ok = offs_cn < Cg
    r_ok = offs_r < R
    n, h, w = _pixel_rows(offs_m, H, W)
    n64 = n.to(tl.int64)
    # group g's slices of dX (input channels from g * Cg) and of dY and W (output channels from g * Og)
    dx_ptr += g64 * Cg * sxc
    dy_ptr += g64 * Og * sdc
    w_ptr += g64 * Og * swo

    # LoRA term: sum over taps of dS[source rows] A[:, c, i, j], dS [BM, BR] and A [BR, BN].
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(0, KH * KW):
        i = tap // KW
        j = tap - i * KW
        hs = h + PAD_H - i * DIL_H
        ws = w + PAD_W - j * DIL_W
        ho = tl.maximum(hs, 0) // STRIDE_H
        wo = tl.maximum(ws, 0) // STRIDE_W
        src_ok = m_ok & (hs >= 0) & (ws >= 0) & (ho < Ho) & (wo < Wo)
        if STRIDE_H > 1:
            src_ok = src_ok & (hs % STRIDE_H == 0)
        if STRIDE_W > 1:
            src_ok = src_ok & (ws % STRIDE_W == 0)
        rows = (n64 * Ho + ho) * Wo + wo
        b_ds = tl.load(ds_ptr + rows[:, None] * R + offs_r[None, :], mask=src_ok[:, None] & r_ok[None, :], other=0.0)
        a_tap = tl.cast(i, tl.int64) * sah + tl.cast(j, tl.int64) * saw
        p_a = a_ptr + offs_r.to(tl.int64)[:, None] * sar + (g64 * Cg + offs_cn)[None, :] * sac + a_tap
        b_a = tl.load(p_a, mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(b_ds.to(DOT_DTYPE), b_a.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)

    # Base term: sum over taps and output channels of dY[source pixels, o] W[o, c, i, j].
    num_o = tl.cdiv(Og, BLOCK_K)
    for it in range(0, KH * KW * num_o):
        tap = it // num_o
        o = (it % num_o) * BLOCK_K + offs_k  # output channel within the group [BK]
        i = tap // KW
        j = tap - i * KW
        hs = h + PAD_H - i * DIL_H
        ws = w + PAD_W - j * DIL_W
        ho = tl.maximum(hs, 0) // STRIDE_H
        wo = tl.maximum(ws, 0) // STRIDE_W
        src_ok = m_ok & (hs >= 0) & (ws >= 0) & (ho < Ho) & (wo < Wo)
        if STRIDE_H > 1:
            src_ok = src_ok & (hs % STRIDE_H == 0)
        if STRIDE_W > 1:
            src_ok = src_ok & (ws % STRIDE_W == 0)
        o_ok = o < Og
        o64 = o.to(tl.int64)
        row_off = n64 * sdn + ho.to(tl.int64) * sdh + wo.to(tl.int64) * sdw
        b_dy = tl.load(dy_ptr + row_off[:, None] + o64[None, :] * sdc, mask=src_ok[:, None] & o_ok[None, :], other=0.0)
        w_tap = tl.cast(i, tl.int64) * swh + tl.cast(j, tl.int64) * sww
        p_w = w_ptr + o64[:, None] * swo + offs_cn.to(tl.int64)[None, :] * swc + w_tap
        b_w = tl.load(p_w, mask=o_ok[:, None] & c_ok[None, :], other=0.0)  # [BK, BN]
        acc = tl.dot(b_dy.to(DOT_DTYPE), b_w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)

    row_off = n64 * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
    p_dx = dx_ptr + row_off[:, None] + offs_cn.to(tl.int64)[None, :] * sxc
    tl.store(p_dx, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def _conv_mask_kernel(out_ptr, numel, C, H, W, seed, p, drop_scale, BLOCK: tl.constexpr):
    """out [Nb, C, H, W] contiguous = the dropout factor of each input element (what the other kernels draw)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = offs % W
    t = offs // W
    h = t % H
    t = t // H
    c = t % C
    n = t // C
    tl.store(out_ptr + offs, _keep_scale(seed, p, drop_scale, n, c, h, w, C, H, W), mask=offs < numel)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def output_size(h: int, w: int, kernel_size, stride, pads, dilation):
    """(Ho, Wo) of a convolution; pads = (top, bottom, left, right)."""
    kh, kw = kernel_size
    ho = (h + pads[0] + pads[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + pads[2] + pads[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


def _memory_format(x: torch.Tensor):
    """channels_last when x is laid out that way (and not also plain contiguous), else contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _geometry(kernel_size, stride, pads, dilation):
    return {
        "KH": kernel_size[0],
        "KW": kernel_size[1],
        "STRIDE_H": stride[0],
        "STRIDE_W": stride[1],
        "PAD_H": pads[0],
        "PAD_W": pads[2],
        "DIL_H": dilation[0],
        "DIL_W": dilation[1],
    }


def _dropout_args(dropout_p, seed):
    if dropout_p > 0:
        return {"seed": seed, "p": float(dropout_p), "drop_scale": 1.0 / (1.0 - dropout_p), "HAS_DROPOUT": True}
    return {"seed": 0, "p": 0.0, "drop_scale": 1.0, "HAS_DROPOUT": False}


def _skinny(device, kind, dtype):
    bm, bk, warps, stages = conv_skinny_config(capability(device), kind, dtype)
    return {"BLOCK_M": bm, "BLOCK_K": bk}, {"num_warps": warps, "num_stages": stages}


# Autotune key: the sizes, plus the geometry and the layout (unit channel stride), which are compile-time.
_FWD_TUNE_KEY = ["M", "Og", "Cg", "R", "H", "W", "sxc", "KH", "KW", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W"]


@functools.cache
def _tuned_fwd_kernel(major: int, dtype: torch.dtype):
    return triton.autotune(configs=conv_gemm_configs(major, dtype), key=_FWD_TUNE_KEY)(_conv_fwd_kernel)


def _precision(dtype):
    return {"DOT_DTYPE": dot_dtype(dtype), "INPUT_PRECISION": input_precision(dtype)}


def lora_conv2d_fwd(
    x, weight, bias, lora_A, lora_B, scaling, stride, pads, dilation, groups, dropout_p, seed, fused=None
):
    """Y = conv(x, W) + bias + s * conv1x1(conv(m * x, A), B), and S [M, r] for backward.

    x [Nb, C, H, W], weight [O, C/groups, kh, kw], bias [O] or None, lora_A [r, C, kh, kw], lora_B [O, r, 1, 1];
    stride, dilation pairs; pads (top, bottom, left, right). Returns y [Nb, O, Ho, Wo] (x's memory format), S.
    fused: True seeds the implicit GEMM with s * S B^T (_conv_fwd_kernel); False takes conv(x, W) + bias from
    torch (cuDNN) and adds s * S B^T in place (_conv_up_kernel); None (default) times both once per shape on the
    GPU and keeps the faster, and fuses under the interpreter.
    """
    nb, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    r = lora_A.shape[0]
    ho, wo = output_size(h, w, (kh, kw), stride, pads, dilation)
    m = nb * ho * wo
    geometry = _geometry((kh, kw), stride, pads, dilation)
    precision = _precision(x.dtype)
    block_r = conv_rank_block(r)
    # Channels innermost in A (a no-op when it is already channels_last): each kernel tap then reads BLOCK_K
    # contiguous channels, which vectorise and pipeline.
    a_cl = lora_A.contiguous(memory_format=torch.channels_last)

    s = torch.empty((m, r), device=x.device, dtype=x.dtype)
    meta, launch = _skinny(x.device, "down", x.dtype)
    _conv_down_kernel[(triton.cdiv(m, meta["BLOCK_M"]),)](
        x_ptr=x, a_ptr=a_cl, s_ptr=s,
        M=m, C=c, H=h, W=w, Ho=ho, Wo=wo, R=r,
        sxn=x.stride(0), sxc=x.stride(1), sxh=x.stride(2), sxw=x.stride(3),
        sar=a_cl.stride(0), sac=a_cl.stride(1), sah=a_cl.stride(2), saw=a_cl.stride(3),
        **_dropout_args(dropout_p, seed), **geometry, **precision, **meta, BLOCK_R=block_r, **launch,
    )  # fmt: skip

    args = (x, weight, bias, s, lora_B.reshape(o, r), scaling, stride, pads, dilation, groups, geometry, precision)
    if fused is None:
        fused = _fused_wins("fwd", args, _y_fused, _y_split)
    return (_y_fused(*args) if fused else _y_split(*args)), s


def _y_fused(x, weight, bias, s, b2, scaling, stride, pads, dilation, groups, geometry, precision):
    """Y = im2col(x) W^T + s * S B^T + bias in one kernel, the accumulator seeded with the LoRA term."""
    nb, _, h, w = x.shape
    o, cg = weight.shape[0], weight.shape[1]
    m, r = s.shape
    ho, wo = output_size(h, w, (geometry["KH"], geometry["KW"]), stride, pads, dilation)
    weight = weight.contiguous(memory_format=torch.channels_last)  # channels innermost, as for A
    y = torch.empty((nb, o, ho, wo), device=x.device, dtype=x.dtype, memory_format=_memory_format(x))
    og = o // groups
    args = dict(
        x_ptr=x, w_ptr=weight, s_ptr=s, b_ptr=b2, bias_ptr=bias if bias is not None else y, y_ptr=y,
        M=m, H=h, W=w, Ho=ho, Wo=wo, R=r, Cg=cg, Og=og,
        sxn=x.stride(0), sxc=x.stride(1), sxh=x.stride(2), sxw=x.stride(3),
        swo=weight.stride(0), swc=weight.stride(1), swh=weight.stride(2), sww=weight.stride(3),
        sbo=b2.stride(0), sbr=b2.stride(1),
        syn=y.stride(0), syc=y.stride(1), syh=y.stride(2), syw=y.stride(3),
        scaling=float(scaling), HAS_BIAS=bias is not None, BLOCK_R=conv_rank_block(r), **geometry, **precision,
    )  # fmt: skip
    grid = lambda meta: (groups * triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(og, meta["BLOCK_N"]),)
    major = capability(x.device)
    if major == 0:
        bm, bn, bk, gm, warps, stages = CONV_GEMM_INTERPRET
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm}
        _conv_fwd_kernel[grid(meta)](**args, **meta, num_warps=warps, num_stages=stages)
    else:
        _tuned_fwd_kernel(major, x.dtype)[grid](**args)
    return y


def _y_split(x, weight, bias, s, b2, scaling, stride, pads, dilation, groups, geometry, precision):
    """Y = conv(x, W) + bias by torch (cuDNN on the GPU), then += s * S B^T in place."""
    extra_h, extra_w = pads[1] - pads[0], pads[3] - pads[2]
    x_in = x if extra_h == 0 and extra_w == 0 else torch.nn.functional.pad(x, (0, extra_w, 0, extra_h))
    y = torch.nn.functional.conv2d(x_in, weight, bias, stride, (pads[0], pads[2]), dilation, groups)
    y = y.contiguous(memory_format=_memory_format(x))
    m, r = s.shape
    o = y.shape[1]
    meta, launch = _skinny(x.device, "up", x.dtype)
    _conv_up_kernel[(triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(o, meta["BLOCK_K"]))](
        y_ptr=y, s_ptr=s, b_ptr=b2,
        M=m, O=o, Ho=y.shape[2], Wo=y.shape[3], R=r,
        syn=y.stride(0), syc=y.stride(1), syh=y.stride(2), syw=y.stride(3),
        sbo=b2.stride(0), sbr=b2.stride(1), scaling=float(scaling),
        **precision, **meta, BLOCK_R=conv_rank_block(r), **launch,
    )  # fmt: skip
    return y


_PATH_CHOICE: dict = {}


def _fused_wins(kind, args, fused, split) -> bool:
    """Whether the fused kernel beats torch's convolution plus the separate LoRA kernel for these arguments:
    timed once per (kind, shapes, strides, dtype, geometry) on the GPU; always True under the interpreter and off
    CUDA. The first call per shape pays for the timing (and the autotuning inside it)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if capability(tensors[0].device) == 0:
        return True
    rest = tuple(a for a in args if not isinstance(a, (torch.Tensor, dict)))
    key = (kind, tensors[0].dtype, *((tuple(t.shape), t.stride()) for t in tensors), rest)
    if key not in _PATH_CHOICE:
        t_fused = triton.testing.do_bench(lambda: fused(*args), warmup=5, rep=25)
        t_split = triton.testing.do_bench(lambda: split(*args), warmup=5, rep=25)
        _PATH_CHOICE[key] = t_fused < t_split
    return _PATH_CHOICE[key]


def _input_grad_base(dy, x, weight, stride, pads, dilation, groups):
    """conv_transpose(dY, W) by torch (cuDNN on the GPU), in x's memory format; asymmetric pads ('same' with an
    even kernel extent) are the symmetric top/left pads on an input extended at the bottom/right, then cut."""
    nb, c, h, w = x.shape
    extra_h, extra_w = pads[1] - pads[0], pads[3] - pads[2]
    shape = [nb, c, h + extra_h, w + extra_w]
    ref = x if extra_h == 0 and extra_w == 0 else x.new_empty(()).expand(shape)
    dx = torch.ops.aten.convolution_backward(
        dy, ref, weight, None, list(stride), [pads[0], pads[2]], list(dilation), False, [0, 0], groups,
        [True, False, False],
    )[0]  # fmt: skip
    if extra_h or extra_w:
        dx = dx[:, :, :h, :w]
    return dx.contiguous(memory_format=_memory_format(x))


def _dx_split(dy, x, ds, weight, lora_A, stride, pads, dilation, groups, drop, geometry, precision, block_r):
    """dX = conv_transpose(dY, W) by torch, then += m * conv_transpose(dS, A) in place."""
    nb, c, h, w = x.shape
    r = lora_A.shape[0]
    dx = _input_grad_base(dy, x, weight, stride, pads, dilation, groups)
    a_cl = lora_A.contiguous(memory_format=torch.channels_last)
    meta, launch = _skinny(x.device, "dx", x.dtype)
    grid = (triton.cdiv(nb * h * w, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_K"]))
    _conv_dx_kernel[grid](
        dx_ptr=dx, ds_ptr=ds, a_ptr=a_cl,
        P=nb * h * w, C=c, H=h, W=w, Ho=dy.shape[2], Wo=dy.shape[3], R=r,
        sxn=dx.stride(0), sxc=dx.stride(1), sxh=dx.stride(2), sxw=dx.stride(3),
        sar=a_cl.stride(0), sac=a_cl.stride(1), sah=a_cl.stride(2), saw=a_cl.stride(3),
        **drop, **geometry, **precision, **meta, BLOCK_R=block_r, **launch,
    )  # fmt: skip
    return dx


# Autotune key of the fused dX kernel: sizes, geometry and layout (unit channel stride of dY).
_DGRAD_TUNE_KEY = ["P", "Cg", "Og", "R", "H", "W", "sdc", "KH", "KW", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W"]


@functools.cache
def _tuned_dgrad_kernel(major: int, dtype: torch.dtype):
    return triton.autotune(configs=conv_dgrad_configs(major, dtype), key=_DGRAD_TUNE_KEY)(_conv_dgrad_kernel)


def _dx_fused(dy, x, ds, weight, lora_A, stride, pads, dilation, groups, drop, geometry, precision, block_r):
    """dX = conv_transpose(dY, W) + conv_transpose(dS, A) in one kernel (no dropout)."""
    nb, c, h, w = x.shape
    o = weight.shape[0]
    weight = weight.contiguous(memory_format=torch.channels_last)
    a_cl = lora_A.contiguous(memory_format=torch.channels_last)
    dx = torch.empty((nb, c, h, w), device=x.device, dtype=x.dtype, memory_format=_memory_format(x))
    p, cg, og = nb * h * w, c // groups, o // groups
    args = dict(
        dy_ptr=dy, w_ptr=weight, ds_ptr=ds, a_ptr=a_cl, dx_ptr=dx,
        P=p, C=c, H=h, W=w, Ho=dy.shape[2], Wo=dy.shape[3], R=lora_A.shape[0], Cg=cg, Og=og,
        sdn=dy.stride(0), sdc=dy.stride(1), sdh=dy.stride(2), sdw=dy.stride(3),
        swo=weight.stride(0), swc=weight.stride(1), swh=weight.stride(2), sww=weight.stride(3),
        sar=a_cl.stride(0), sac=a_cl.stride(1), sah=a_cl.stride(2), saw=a_cl.stride(3),
        sxn=dx.stride(0), sxc=dx.stride(1), sxh=dx.stride(2), sxw=dx.stride(3),
        BLOCK_R=block_r, **geometry, **precision,
    )  # fmt: skip
    grid = lambda meta: (groups * triton.cdiv(p, meta["BLOCK_M"]) * triton.cdiv(cg, meta["BLOCK_N"]),)
    major = capability(x.device)
    if major == 0:
        bm, bn, bk, gm, warps, stages = CONV_GEMM_INTERPRET
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm}
        _conv_dgrad_kernel[grid(meta)](**args, **meta, num_warps=warps, num_stages=stages)
    else:
        _tuned_dgrad_kernel(major, x.dtype)[grid](**args)
    return dx


def lora_conv2d_bwd(
    dy,
    x,
    s,
    weight,
    lora_A,
    lora_B,
    scaling,
    stride,
    pads,
    dilation,
    groups,
    dropout_p,
    seed,
    need_dx,
    need_dbias,
    fused_dgrad=None,
):
    """dX, dA, dB (and dbias) of lora_conv2d_fwd; dy [Nb, O, Ho, Wo] in any layout, s the forward's S [M, r].

    dX is None unless need_dx, dbias None unless need_dbias. dA and dB come in lora_A's and lora_B's dtypes.
    fused_dgrad (without dropout only): True computes dX in one Triton kernel (_conv_dgrad_kernel); False takes
    conv_transpose(dY, W) from torch (cuDNN) and adds the LoRA term in place (_conv_dx_kernel), as every call
    with dropout does; None (default) times both once per shape on the GPU and keeps the faster, and fuses under
    the interpreter.
    """
    nb, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    r = lora_A.shape[0]
    ho, wo = dy.shape[2], dy.shape[3]
    m = nb * ho * wo
    geometry = _geometry((kh, kw), stride, pads, dilation)
    precision = _precision(x.dtype)
    drop = _dropout_args(dropout_p, seed)
    block_r = conv_rank_block(r)
    b2 = lora_B.reshape(o, r)

    meta, launch = _skinny(x.device, "ds_db", x.dtype)
    num_tiles = triton.cdiv(m, meta["BLOCK_M"])
    ds = torch.empty((m, r), device=x.device, dtype=torch.float32)
    dbp = torch.empty((num_tiles, o, r), device=x.device, dtype=torch.float32)
    _conv_ds_db_kernel[(num_tiles,)](
        dy_ptr=dy, s_ptr=s, b_ptr=b2, ds_ptr=ds, dbp_ptr=dbp,
        M=m, O=o, Ho=ho, Wo=wo, R=r,
        sdn=dy.stride(0), sdc=dy.stride(1), sdh=dy.stride(2), sdw=dy.stride(3),
        sbo=b2.stride(0), sbr=b2.stride(1), scaling=float(scaling),
        **precision, **meta, BLOCK_R=block_r, **launch,
    )  # fmt: skip
    db = dbp.sum(0).mul_(scaling).to(lora_B.dtype).reshape(lora_B.shape)

    meta, launch = _skinny(x.device, "da", x.dtype)
    k_blocks = kh * kw * triton.cdiv(c, meta["BLOCK_K"])
    splits = max(1, min(triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(num_programs_target(x.device), k_blocks)))
    dap = torch.empty((splits, r, c, kh, kw), device=x.device, dtype=torch.float32)
    _conv_da_kernel[(k_blocks, splits)](
        x_ptr=x, ds_ptr=ds, dap_ptr=dap,
        M=m, C=c, H=h, W=w, Ho=ho, Wo=wo, R=r,
        sxn=x.stride(0), sxc=x.stride(1), sxh=x.stride(2), sxw=x.stride(3),
        **drop, **geometry, **precision, **meta, BLOCK_R=block_r, **launch,
    )  # fmt: skip
    da = dap.sum(0).to(lora_A.dtype)
    if lora_A.is_contiguous(memory_format=torch.channels_last) and not lora_A.is_contiguous():
        da = da.contiguous(memory_format=torch.channels_last)

    dx = None
    if need_dx:
        args = (dy, x, ds, weight, lora_A, stride, pads, dilation, groups, drop, geometry, precision, block_r)
        if drop["HAS_DROPOUT"]:
            fused_dgrad = False
        elif fused_dgrad is None:
            fused_dgrad = _fused_wins("dgrad", args, _dx_fused, _dx_split)
        dx = _dx_fused(*args) if fused_dgrad else _dx_split(*args)
    dbias = dy.sum((0, 2, 3), dtype=torch.float32).to(dy.dtype) if need_dbias else None
    return dx, da, db, dbias


def conv2d_dropout_mask(shape, dropout_p: float, seed: int, device) -> torch.Tensor:
    """The dropout factors [Nb, C, H, W] (0 or 1/(1-p), float32) the conv kernels draw for an input of this shape."""
    nb, c, h, w = shape
    out = torch.empty((nb, c, h, w), device=device, dtype=torch.float32)
    numel = out.numel()
    block = 1024
    drop = _dropout_args(dropout_p, seed)
    _conv_mask_kernel[(triton.cdiv(numel, block),)](
        out, numel, c, h, w, drop["seed"], drop["p"], drop["drop_scale"], BLOCK=block
    )
    return out


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases
# ----------------------------------------------------------------------------------------------------------

# The specialisation a real launch gets for the benchmark layer (3x3, stride 1, padding 1, C = O = 256): unit
# strides become constants, the other strides, the channel counts, M and the pointers are multiples of 16.
_AOT_GEOMETRY = {"KH": 3, "KW": 3, "STRIDE_H": 1, "STRIDE_W": 1, "PAD_H": 1, "PAD_W": 1, "DIL_H": 1, "DIL_W": 1}
_AOT_DIVISIBLE = set(
    "M C O Cg Og P sxn sxh sxw sxc swo swh sww swc sbo syn syh syw syc sdn sdh sdw sdc sar sah saw sac".split()
)
# Per kernel: float32 pointer args, float scalar args, and the unit-stride args per memory format of x.
_AOT_KERNELS = {
    "fwd": (
        _conv_fwd_kernel,
        set(),
        {"scaling"},
        {"channels_last": {"sxc", "swc", "syc", "sbr"}, "nchw": {"sxw", "swc", "syw", "sbr"}},
    ),
    "dgrad": (
        _conv_dgrad_kernel,
        {"ds_ptr"},
        set(),
        {"channels_last": {"sdc", "swc", "sac", "sxc"}, "nchw": {"sdw", "swc", "sac", "sxw"}},
    ),
    "up": (_conv_up_kernel, set(), {"scaling"}, {"channels_last": {"syc", "sbr"}}),
    "down": (_conv_down_kernel, set(), {"p", "drop_scale"}, {"channels_last": {"sxc", "sac"}}),
    "ds_db": (_conv_ds_db_kernel, {"ds_ptr", "dbp_ptr"}, {"scaling"}, {"channels_last": {"sdc", "sbr"}}),
    "da": (_conv_da_kernel, {"ds_ptr", "dap_ptr"}, {"p", "drop_scale"}, {"channels_last": {"sxc"}}),
    "dx": (_conv_dx_kernel, {"ds_ptr"}, {"p", "drop_scale"}, {"channels_last": {"sxc", "sac"}}),
}


def _aot_case(kind, major, t, tl_dtype, layout, meta, num_warps, num_stages):
    """One compile case: the kernel of `kind` specialised as a launch on the benchmark layer in `layout`."""
    fn, fp32_ptrs, float_args, unit_strides = _AOT_KERNELS[kind]
    flags = {"HAS_BIAS": True, "HAS_DROPOUT": True}
    constexprs = {**meta, "DOT_DTYPE": tl_dtype, "INPUT_PRECISION": "ieee", "BLOCK_R": 16}
    signature, divisible = {}, []
    for name in fn.arg_names:
        if name in constexprs:
            continue
        if name in _AOT_GEOMETRY or name in flags or name in unit_strides[layout]:
            constexprs[name] = _AOT_GEOMETRY.get(name, flags.get(name, 1))
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in fp32_ptrs else f"*{t}"
            divisible.append(name)
        elif name in float_args:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in _AOT_DIVISIBLE:
                divisible.append(name)
    tile = "x".join(str(meta[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in meta)
    group = f"-g{meta['GROUP_M']}" if "GROUP_M" in meta else ""
    return {
        "id": f"conv-{kind}-{t}-{layout}-{tile}{group}-w{num_warps}s{num_stages}",
        "major": major,
        "kernel": fn,
        "signature": signature,
        "constexprs": constexprs,
        "divisible": divisible,
        "num_warps": num_warps,
        "num_stages": num_stages,
        "expects_mma": t != "fp32",
    }


def aot_cases():
    """Compile cases for tests/aot.py: every shipped config of every conv kernel for sm_80 and sm_90. Both memory
    formats of x for the two big GEMMs (forward, dX) in fp16 and fp32; the 16-bit products must run on tensor
    cores."""
    cases = []
    for major in (8, 9):
        for dtype, t, tl_dtype in (
            (torch.float16, "fp16", tl.float16),
            (torch.bfloat16, "bf16", tl.bfloat16),
            (torch.float32, "fp32", tl.float32),
        ):
            layouts = ("channels_last", "nchw") if t != "bf16" else ("channels_last",)
            for kind, tuples in (("fwd", conv_gemm_config_tuples), ("dgrad", conv_dgrad_config_tuples)):
                for bm, bn, bk, g, w, s in tuples(major, dtype):
                    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}
                    cases += [_aot_case(kind, major, t, tl_dtype, layout, meta, w, s) for layout in layouts]
            for kind in CONV_SKINNY_KINDS:
                bm, bk, w, s = conv_skinny_config(major, kind, dtype)
                meta = {"BLOCK_M": bm, "BLOCK_K": bk}
                cases.append(_aot_case(kind, major, t, tl_dtype, "channels_last", meta, w, s))
    return cases
