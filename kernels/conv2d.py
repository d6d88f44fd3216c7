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
No dW is formed. The dropout mask m (0 or 1/(1-p)) is linear's (kernels/dropout.py: the counter hash of the seed,
a row and a column) with the input pixel (n, h, w) as the row, (n H + h) W + w, and the channel c as the column:
a pure function of the seed and the element, so every kernel regenerates the same mask whatever its tiling or
memory format, and conv2d_dropout_mask reads it back as linear's mask of x viewed as [Nb*H*W, C]. The seed reaches
the kernels as the address of one int64 that each loads (kernels/dropout.py: dropout_args), not as a launch
argument, so a CUDA graph replay that redraws the seed on the device draws a fresh mask.

Which of the two ways to Y (and, without dropout, to dX) runs is decided per shape by kernels/dispatch.py: timed
once on the GPU, the fused kernel where nothing can be timed.
"""

from __future__ import annotations

import functools
import weakref

import torch
import triton
import triton.language as tl
from fastlora.kernels import dispatch
from fastlora.kernels.configs import (
    CONV_GEMM_INTERPRET,
    capability,
    conv_dgrad_configs,
    conv_gemm_configs,
    conv_skinny_config,
    dot_dtype,
    input_precision,
    num_programs_target,
    rank_block,
)
from fastlora.kernels.dropout import dropout_args, dropout_keep, dropout_mask, dropout_seed
from fastlora.kernels.geometry import input_grad, memory_format, output_size
from fastlora.kernels.launch import plans_for
from fastlora.kernels.tiles import grouped_tile, tile_offsets

__all__ = ["lora_conv2d_fwd", "lora_conv2d_bwd", "conv2d_dropout_mask"]


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _dropped(b, seed, i_n, i_h, i_w, H, W, i_c, p_thresh):
    """b [BLOCK_M, BLOCK_K] at input pixels (n, h, w) and channels i_c (from an even one) with dropout's mask
    applied (0 where dropped, unscaled): the mask of element (n, c, h, w) is linear's at row (n H + h) W + w,
    column c (kernels/dropout.py), so each input element has one mask whatever the tiling or memory format."""
    keep = dropout_keep(seed, (i_n * H + i_h) * W + i_w, i_c, p_thresh)
    return tl.where(keep, b, 0.0)


@triton.jit
def _pixel_rows(i_m, Ho, Wo):
    """Row index m = (n, ho, wo) -> its three coordinates."""
    i_wo = i_m % Wo
    t = i_m // Wo
    return t // Ho, t % Ho, i_wo


@triton.jit
def _pixel_offset(i_n, i_h, i_w, stride_n, stride_h, stride_w):
    """Offset (int64) of pixels (n, h, w), channel 0, in an [Nb, C, H, W] tensor with these strides."""
    return i_n.to(tl.int64) * stride_n + i_h.to(tl.int64) * stride_h + i_w.to(tl.int64) * stride_w


@triton.jit
def _load_rank_rows(s_ptr, i_m, m_m, i_r, R):
    """[BLOCK_M, BLOCK_R] block of rows i_m of a contiguous [M, R] tensor (S or dS), zero where masked."""
    return tl.load(s_ptr + tile_offsets(i_m, i_r, R, 1), mask=m_m[:, None] & (i_r < R)[None, :], other=0.0)


@triton.jit
def _lora_up(
    s_ptr,
    b_ptr,
    i_m,
    m_m,
    i_o,
    m_o,
    i_r,
    R,
    stride_bo,
    stride_br,
    scaling,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """s * S[i_m] B[i_o]^T, [BLOCK_M, BLOCK_O] in fp32: the LoRA term of output channels i_o."""
    b_s = _load_rank_rows(s_ptr, i_m, m_m, i_r, R)  # [BM, BR]
    p_b = b_ptr + tile_offsets(i_r, i_o, stride_br, stride_bo)
    b_b = tl.load(p_b, mask=(i_r < R)[:, None] & m_o[None, :], other=0.0)  # [BR, BO]
    return tl.dot(b_s.to(DOT_DTYPE), b_b.to(DOT_DTYPE), input_precision=INPUT_PRECISION) * scaling


@triton.jit
def _tap_offset(tap, KW: tl.constexpr, stride_h, stride_w):
    """Offset (int64) of kernel tap `tap` (row-major over KH x KW) in a [.., .., KH, KW] weight with these strides."""
    tap_h = tap // KW
    return tl.cast(tap_h, tl.int64) * stride_h + tl.cast(tap - tap_h * KW, tl.int64) * stride_w


@triton.jit
def _tap_pixels(
    i_n,
    i_ho,
    i_wo,
    m_m,
    tap,
    H,
    W,
    stride_n,
    stride_h,
    stride_w,
    KW: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    DIL_H: tl.constexpr,
    DIL_W: tl.constexpr,
):
    """The input pixels output pixels (n, ho, wo) read at kernel tap `tap`: (h, w), whether each lies in the image
    (and in m_m), and its offset (int64) in an [Nb, C, H, W] tensor with these strides (channel 0)."""
    tap_h = tap // KW
    i_h = i_ho * STRIDE_H - PAD_H + tap_h * DIL_H
    i_w = i_wo * STRIDE_W - PAD_W + (tap - tap_h * KW) * DIL_W
    m_row = m_m & (i_h >= 0) & (i_h < H) & (i_w >= 0) & (i_w < W)
    return i_h, i_w, m_row, _pixel_offset(i_n, i_h, i_w, stride_n, stride_h, stride_w)


@triton.jit
def _source_pixels(
    i_h,
    i_w,
    m_m,
    tap,
    Ho,
    Wo,
    KW: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    DIL_H: tl.constexpr,
    DIL_W: tl.constexpr,
):
    """The output pixels input pixels (h, w) receive from at kernel tap `tap` (the transposed convolution):
    h + pad_top - i*dh = ho * sh with 0 <= ho < Ho. Returns (ho, wo) and whether there is one (and m_m holds)."""
    tap_h = tap // KW
    i_hs = i_h + PAD_H - tap_h * DIL_H
    i_ws = i_w + PAD_W - (tap - tap_h * KW) * DIL_W
    i_ho = tl.maximum(i_hs, 0) // STRIDE_H
    i_wo = tl.maximum(i_ws, 0) // STRIDE_W
    m_src = m_m & (i_hs >= 0) & (i_ws >= 0) & (i_ho < Ho) & (i_wo < Wo)
    if STRIDE_H > 1:
        m_src = m_src & (i_hs % STRIDE_H == 0)
    if STRIDE_W > 1:
        m_src = m_src & (i_ws % STRIDE_W == 0)
    return i_ho, i_wo, m_src


@triton.jit
def _lora_dgrad(
    acc,
    ds_ptr,
    a_ptr,
    i_n,
    i_h,
    i_w,
    m_m,
    i_c,
    m_c,
    i_r,
    R,
    Ho,
    Wo,
    stride_ar,
    stride_ac,
    stride_ah,
    stride_aw,
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
):
    """acc [BLOCK_M, BLOCK_C] + conv_transpose(dS, A) at input pixels (n, h, w) and input channels i_c: the sum
    over taps of dS[source rows] A[:, c, tap], dS [M, R] contiguous, dS blocks [BM, BR] and A blocks [BR, BC]."""
    for tap in range(0, KH * KW):
        i_ho, i_wo, m_src = _source_pixels(
            i_h, i_w, m_m, tap, Ho, Wo, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W
        )
        i_src = (i_n.to(tl.int64) * Ho + i_ho) * Wo + i_wo
        b_ds = _load_rank_rows(ds_ptr, i_src, m_src, i_r, R)
        a_tap = _tap_offset(tap, KW, stride_ah, stride_aw)
        p_a = a_ptr + tile_offsets(i_r, i_c, stride_ar, stride_ac) + a_tap
        b_a = tl.load(p_a, mask=(i_r < R)[:, None] & m_c[None, :], other=0.0)
        acc = tl.dot(b_ds.to(DOT_DTYPE), b_a.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _group_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(group g as int64, pid_m, pid_n) of program `pid` in a grid of groups x (M x N tiles), grouped order within
    each group."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    g = (pid // num_pid_n // num_pid_m).to(tl.int64)  # pid // (tiles per group), in 32-bit divisions
    tile_id = (pid - g * num_pid_m * num_pid_n).to(tl.int32)  # the tile within group g, below the grid size
    pid_m, pid_n = grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
    return g, pid_m, pid_n


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
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_ar,
    stride_ac,
    stride_ah,
    stride_aw,
    # dropout
    seed_ptr,
    p_thresh,
    inv_keep,
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
    seed = dropout_seed(seed_ptr, HAS_DROPOUT)
    pid = tl.program_id(0)
    i_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    i_k = tl.arange(0, BLOCK_K)
    i_r = tl.arange(0, BLOCK_R)
    m_m = i_m < M
    m_r = i_r < R
    i_n, i_ho, i_wo = _pixel_rows(i_m, Ho, Wo)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    num_c = tl.cdiv(C, BLOCK_K)
    for it in range(0, KH * KW * num_c):
        tap = it // num_c
        i_c = (it % num_c) * BLOCK_K + i_k  # [BK]
        m_c = i_c < C
        i_h, i_w, m_row, row_off = _tap_pixels(
            i_n, i_ho, i_wo, m_m, tap, H, W, stride_xn, stride_xh, stride_xw, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W,
            DIL_H, DIL_W,
        )  # fmt: skip
        p_x = x_ptr + row_off[:, None] + i_c.to(tl.int64)[None, :] * stride_xc
        b_x = tl.load(p_x, mask=m_row[:, None] & m_c[None, :], other=0.0)
        if HAS_DROPOUT:
            b_x = _dropped(b_x, seed, i_n, i_h, i_w, H, W, i_c, p_thresh)
        a_tap = _tap_offset(tap, KW, stride_ah, stride_aw)
        p_a = a_ptr + tile_offsets(i_c, i_r, stride_ac, stride_ar) + a_tap
        b_a = tl.load(p_a, mask=m_c[:, None] & m_r[None, :], other=0.0)  # [BK, BR]
        acc = tl.dot(b_x.to(DOT_DTYPE), b_a.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)

    if HAS_DROPOUT:
        acc = acc * inv_keep
    p_s = s_ptr + tile_offsets(i_m, i_r, R, 1)
    tl.store(p_s, acc.to(s_ptr.dtype.element_ty), mask=m_m[:, None] & m_r[None, :])


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
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wo,
    stride_wc,
    stride_wh,
    stride_ww,
    stride_bo,
    stride_br,
    stride_yn,
    stride_yc,
    stride_yh,
    stride_yw,
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
    g64, pid_m, pid_n = _group_tile(tl.program_id(0), M, Og, BLOCK_M, BLOCK_N, GROUP_M)
    i_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channel within the group
    i_k = tl.arange(0, BLOCK_K)
    i_r = tl.arange(0, BLOCK_R)
    m_m = i_m < M
    m_o = i_o < Og
    i_n, i_ho, i_wo = _pixel_rows(i_m, Ho, Wo)
    # group g's channels: inputs from g * Cg, outputs from g * Og
    x_ptr += g64 * Cg * stride_xc
    w_ptr += g64 * Og * stride_wo
    b_ptr += g64 * Og * stride_bo
    bias_ptr += g64 * Og
    y_ptr += g64 * Og * stride_yc

    # Seed: s * S B^T, S [BM, BR] and B^T [BR, BN].
    acc = _lora_up(s_ptr, b_ptr, i_m, m_m, i_o, m_o, i_r, R, stride_bo, stride_br, scaling, DOT_DTYPE, INPUT_PRECISION)

    num_c = tl.cdiv(Cg, BLOCK_K)
    for it in range(0, KH * KW * num_c):
        tap = it // num_c
        i_c = (it % num_c) * BLOCK_K + i_k  # channel within the group [BK]
        m_c = i_c < Cg
        _, _, m_row, row_off = _tap_pixels(
            i_n,
            i_ho,
            i_wo,
            m_m,
            tap,
            H,
            W,
            stride_xn,
            stride_xh,
            stride_xw,
            KW,
            STRIDE_H,
            STRIDE_W,
            PAD_H,
            PAD_W,
            DIL_H,
            DIL_W,
        )
        p_x = x_ptr + row_off[:, None] + i_c.to(tl.int64)[None, :] * stride_xc
        b_x = tl.load(p_x, mask=m_row[:, None] & m_c[None, :], other=0.0)  # [BM, BK]
        w_tap = _tap_offset(tap, KW, stride_wh, stride_ww)
        p_w = w_ptr + i_o.to(tl.int64)[None, :] * stride_wo + i_c.to(tl.int64)[:, None] * stride_wc + w_tap
        b_w = tl.load(p_w, mask=m_c[:, None] & m_o[None, :], other=0.0)  # [BK, BN]
        acc = tl.dot(b_x.to(DOT_DTYPE), b_w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + i_o, mask=m_o, other=0.0).to(tl.float32)[None, :]
    row_off = _pixel_offset(i_n, i_ho, i_wo, stride_yn, stride_yh, stride_yw)
    p_y = y_ptr + row_off[:, None] + i_o.to(tl.int64)[None, :] * stride_yc
    tl.store(p_y, acc.to(y_ptr.dtype.element_ty), mask=m_m[:, None] & m_o[None, :])


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
    stride_yn,
    stride_yc,
    stride_yh,
    stride_yw,
    stride_bo,
    stride_br,
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
    i_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_o = pid_o * BLOCK_K + tl.arange(0, BLOCK_K)
    i_r = tl.arange(0, BLOCK_R)
    m_m = i_m < M
    m_o = i_o < O
    i_n, i_ho, i_wo = _pixel_rows(i_m, Ho, Wo)
    acc = _lora_up(s_ptr, b_ptr, i_m, m_m, i_o, m_o, i_r, R, stride_bo, stride_br, scaling, DOT_DTYPE, INPUT_PRECISION)
    row_off = _pixel_offset(i_n, i_ho, i_wo, stride_yn, stride_yh, stride_yw)
    p_y = y_ptr + row_off[:, None] + i_o.to(tl.int64)[None, :] * stride_yc
    m_io = m_m[:, None] & m_o[None, :]
    b_y = tl.load(p_y, mask=m_io, other=0.0).to(tl.float32)
    tl.store(p_y, (b_y + acc).to(y_ptr.dtype.element_ty), mask=m_io)


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
    db_part_ptr,
    # sizes
    M,
    O,
    Ho,
    Wo,
    R,
    # strides
    stride_dyn,
    stride_dyc,
    stride_dyh,
    stride_dyw,
    stride_bo,
    stride_br,
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
    i_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    i_k = tl.arange(0, BLOCK_K)
    i_r = tl.arange(0, BLOCK_R)
    m_m = i_m < M
    m_r = i_r < R
    i_n, i_ho, i_wo = _pixel_rows(i_m, Ho, Wo)
    row_off = _pixel_offset(i_n, i_ho, i_wo, stride_dyn, stride_dyh, stride_dyw)
    b_s = _load_rank_rows(s_ptr, i_m, m_m, i_r, R).to(DOT_DTYPE)  # [BM, BR]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    p_db_part = db_part_ptr + pid.to(tl.int64) * O * R
    for o0 in range(0, O, BLOCK_K):
        i_o = o0 + i_k
        m_o = i_o < O
        p_dy = dy_ptr + row_off[:, None] + i_o.to(tl.int64)[None, :] * stride_dyc
        b_dy = tl.load(p_dy, mask=m_m[:, None] & m_o[None, :], other=0.0).to(DOT_DTYPE)  # [BM, BK]
        p_b = b_ptr + tile_offsets(i_o, i_r, stride_bo, stride_br)
        b_b = tl.load(p_b, mask=m_o[:, None] & m_r[None, :], other=0.0).to(DOT_DTYPE)  # [BK, BR]
        acc = tl.dot(b_dy, b_b, acc, input_precision=INPUT_PRECISION)
        b_db = tl.dot(tl.trans(b_dy), b_s, input_precision=INPUT_PRECISION)  # [BK, BR]
        p_db = p_db_part + tile_offsets(i_o, i_r, R, 1)
        tl.store(p_db, b_db, mask=m_o[:, None] & m_r[None, :])

    p_ds = ds_ptr + tile_offsets(i_m, i_r, R, 1)
    tl.store(p_ds, acc * scaling, mask=m_m[:, None] & m_r[None, :])


@triton.jit
def _conv_da_kernel(
    # pointers
    x_ptr,
    ds_ptr,
    da_part_ptr,
    # sizes
    M,
    C,
    H,
    W,
    Ho,
    Wo,
    R,
    # strides
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    # dropout
    seed_ptr,
    p_thresh,
    inv_keep,
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
    seed = dropout_seed(seed_ptr, HAS_DROPOUT)
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    tap = pid_k % (KH * KW)
    i_c = (pid_k // (KH * KW)) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_c = i_c < C
    i_r = tl.arange(0, BLOCK_R)
    m_r = i_r < R

    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)  # dA^T: channels as the MMA's M side
    for m0 in range(split * BLOCK_M, M, num_splits * BLOCK_M):
        i_m = m0 + tl.arange(0, BLOCK_M)
        m_m = i_m < M
        i_n, i_ho, i_wo = _pixel_rows(i_m, Ho, Wo)
        i_h, i_w, m_row, row_off = _tap_pixels(
            i_n, i_ho, i_wo, m_m, tap, H, W, stride_xn, stride_xh, stride_xw, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W,
            DIL_H, DIL_W,
        )  # fmt: skip
        p_x = x_ptr + row_off[:, None] + i_c.to(tl.int64)[None, :] * stride_xc
        b_x = tl.load(p_x, mask=m_row[:, None] & m_c[None, :], other=0.0)  # [BM, BK]
        if HAS_DROPOUT:
            b_x = _dropped(b_x, seed, i_n, i_h, i_w, H, W, i_c, p_thresh)
        b_ds = _load_rank_rows(ds_ptr, i_m, m_m, i_r, R)  # [BM, BR]
        acc = tl.dot(tl.trans(b_x.to(DOT_DTYPE)), b_ds.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)

    if HAS_DROPOUT:
        acc = acc * inv_keep
    # da_part[split, r, c, i, j]
    p_da = (
        da_part_ptr
        + split.to(tl.int64) * R * C * KH * KW
        + i_r.to(tl.int64)[None, :] * (C * KH * KW)
        + i_c.to(tl.int64)[:, None] * (KH * KW)
        + tap
    )
    tl.store(p_da, acc, mask=m_c[:, None] & m_r[None, :])


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
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_ar,
    stride_ac,
    stride_ah,
    stride_aw,
    # dropout
    seed_ptr,
    p_thresh,
    inv_keep,
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
    seed = dropout_seed(seed_ptr, HAS_DROPOUT)
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    i_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_c = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)
    i_r = tl.arange(0, BLOCK_R)
    m_m = i_m < P
    m_c = i_c < C
    i_n, i_h, i_w = _pixel_rows(i_m, H, W)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc = _lora_dgrad(
        acc, ds_ptr, a_ptr, i_n, i_h, i_w, m_m, i_c, m_c, i_r, R, Ho, Wo, stride_ar, stride_ac, stride_ah, stride_aw,
        KH, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, DOT_DTYPE, INPUT_PRECISION,
    )  # fmt: skip
    if HAS_DROPOUT:
        acc = _dropped(acc * inv_keep, seed, i_n, i_h, i_w, H, W, i_c, p_thresh)
    row_off = _pixel_offset(i_n, i_h, i_w, stride_xn, stride_xh, stride_xw)
    p_dx = dx_ptr + row_off[:, None] + i_c.to(tl.int64)[None, :] * stride_xc
    m_io = m_m[:, None] & m_c[None, :]
    b_dx = tl.load(p_dx, mask=m_io, other=0.0).to(tl.float32)
    tl.store(p_dx, (b_dx + acc).to(dx_ptr.dtype.element_ty), mask=m_io)


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
    stride_dyn,
    stride_dyc,
    stride_dyh,
    stride_dyw,
    stride_wo,
    stride_wc,
    stride_wh,
    stride_ww,
    stride_ar,
    stride_ac,
    stride_ah,
    stride_aw,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
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

    Without dropout only (with dropout, torch's dgrad plus _conv_dx_kernel runs). Tiles over (group, input pixels
    (n, h, w), input channels of the group). The accumulator first takes the r-wide LoRA term over the kh*kw taps,
    then runs over kh*kw taps x Og/BLOCK_K channel steps of dY W.
    Input pixel h receives output row ho at tap i when h + pad_top - i*dh = ho * sh with 0 <= ho < Ho.
    """
    g64, pid_m, pid_n = _group_tile(tl.program_id(0), P, Cg, BLOCK_M, BLOCK_N, GROUP_M)
    i_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel within the group
    i_k = tl.arange(0, BLOCK_K)
    i_r = tl.arange(0, BLOCK_R)
    m_m = i_m < P
    m_c = i_c < Cg
    i_n, i_h, i_w = _pixel_rows(i_m, H, W)
    # group g's slices of dX (input channels from g * Cg) and of dY and W (output channels from g * Og)
    dx_ptr += g64 * Cg * stride_xc
    dy_ptr += g64 * Og * stride_dyc
    w_ptr += g64 * Og * stride_wo

    # LoRA term: conv_transpose(dS, A) over the group's channels of A
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _lora_dgrad(
        acc, ds_ptr, a_ptr, i_n, i_h, i_w, m_m, g64 * Cg + i_c, m_c, i_r, R, Ho, Wo, stride_ar, stride_ac, stride_ah,
        stride_aw, KH, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, DOT_DTYPE, INPUT_PRECISION,
    )  # fmt: skip

    # Base term: sum over taps and output channels of dY[source pixels, o] W[o, c, i, j].
    num_o = tl.cdiv(Og, BLOCK_K)
    for it in range(0, KH * KW * num_o):
        tap = it // num_o
        i_o = (it % num_o) * BLOCK_K + i_k  # output channel within the group [BK]
        m_o = i_o < Og
        i_ho, i_wo, m_src = _source_pixels(
            i_h, i_w, m_m, tap, Ho, Wo, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W
        )
        row_off = _pixel_offset(i_n, i_ho, i_wo, stride_dyn, stride_dyh, stride_dyw)
        p_dy = dy_ptr + row_off[:, None] + i_o.to(tl.int64)[None, :] * stride_dyc
        b_dy = tl.load(p_dy, mask=m_src[:, None] & m_o[None, :], other=0.0)  # [BM, BK]
        w_tap = _tap_offset(tap, KW, stride_wh, stride_ww)
        p_w = w_ptr + i_o.to(tl.int64)[:, None] * stride_wo + i_c.to(tl.int64)[None, :] * stride_wc + w_tap
        b_w = tl.load(p_w, mask=m_o[:, None] & m_c[None, :], other=0.0)  # [BK, BN]
        acc = tl.dot(b_dy.to(DOT_DTYPE), b_w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)

    row_off = _pixel_offset(i_n, i_h, i_w, stride_xn, stride_xh, stride_xw)
    p_dx = dx_ptr + row_off[:, None] + i_c.to(tl.int64)[None, :] * stride_xc
    tl.store(p_dx, acc.to(dx_ptr.dtype.element_ty), mask=m_m[:, None] & m_c[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


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


def _skinny(device, kind, dtype):
    bm, bk, warps, stages = conv_skinny_config(capability(device), kind, dtype)
    return {"BLOCK_M": bm, "BLOCK_K": bk}, {"num_warps": warps, "num_stages": stages}


# Autotune key: the sizes, plus the geometry and the layout (unit channel stride), which are compile-time.
_FWD_TUNE_KEY = ["M", "Og", "Cg", "R", "H", "W", "stride_xc", "KH", "KW", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W"]


@functools.cache
def _tuned_fwd_kernel(major: int, dtype: torch.dtype):
    return triton.autotune(configs=conv_gemm_configs(major, dtype), key=_FWD_TUNE_KEY)(_conv_fwd_kernel)


def _launch_gemm(kernel, tuned, grid, args, x, groups):
    """Launch one of the conv GEMMs: autotuned per (generation, dtype) on a GPU, the small fixed tiles under the
    interpreter. grid maps the meta-parameters to the launch grid; groups keys the plan with the arguments."""
    major = capability(x.device)
    if major == 0:
        bm, bn, bk, gm, warps, stages = CONV_GEMM_INTERPRET
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm}
        plans_for(kernel).launch(groups, grid(meta), **args, **meta, num_warps=warps, num_stages=stages)
    else:
        plans_for(tuned(major, x.dtype)).launch(groups, grid, **args)


_CHANNELS_LAST: dict = {}
_MAX_CHANNELS_LAST = 256


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """t in channels_last memory format: t itself when it is already, else a copy made once per version of t
    (the frozen weight: once; an adapter: once per optimiser step, shared by forward and backward), remembered
    beside a weak reference to t, so a tensor that died never answers for a new one at its address."""
    if t.is_contiguous(memory_format=torch.channels_last):
        return t
    entry = _CHANNELS_LAST.get(id(t))
    if entry is not None and entry[0]() is t and entry[1] == (t._version, t.shape, t.stride(), t.data_ptr()):
        return entry[2]
    copy = t.contiguous(memory_format=torch.channels_last)
    if torch.compiler.is_compiling() or torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return copy  # a copy inside a graph lives in the graph's memory pool: never kept past it
    if len(_CHANNELS_LAST) >= _MAX_CHANNELS_LAST:
        del _CHANNELS_LAST[next(iter(_CHANNELS_LAST))]
    key = id(t)

    def forget(ref, key=key):  # t died: its copy goes with it
        entry = _CHANNELS_LAST.get(key)
        if entry is not None and entry[0] is ref:
            del _CHANNELS_LAST[key]

    _CHANNELS_LAST[key] = (weakref.ref(t, forget), (t._version, t.shape, t.stride(), t.data_ptr()), copy)
    return copy


def _precision(dtype):
    return {"DOT_DTYPE": dot_dtype(dtype), "INPUT_PRECISION": input_precision(dtype)}


def lora_conv2d_fwd(
    x, weight, bias, lora_A, lora_B, scaling, stride, pads, dilation, groups, dropout_p, seed, fused=None
):
    """Y = conv(x, W) + bias + s * conv1x1(conv(m * x, A), B), and S [M, r] for backward.

    x [Nb, C, H, W], weight [O, C/groups, kh, kw], bias [O] or None, lora_A [r, C, kh, kw], lora_B [O, r, 1, 1];
    stride, dilation pairs; pads (top, bottom, left, right). Returns y [Nb, O, Ho, Wo] (x's memory format), S.
    seed (read only when dropout_p > 0): a one-element int64 tensor on x's device, which the kernels read from
    memory, or an int (copied to the device).
    fused: True seeds the implicit GEMM with s * S B^T (_conv_fwd_kernel); False takes conv(x, W) + bias from
    torch (cuDNN) and adds s * S B^T in place (_conv_up_kernel); None (default) leaves it to kernels/dispatch.py
    (timed once per shape on the GPU, the same on every rank; fused where nothing is timed).
    """
    nb, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    r = lora_A.shape[0]
    ho, wo = output_size(h, w, (kh, kw), stride, pads, dilation)
    m = nb * ho * wo
    geometry = _geometry((kh, kw), stride, pads, dilation)
    precision = _precision(x.dtype)
    block_r = rank_block(r, max_block=None)
    # Channels innermost in A (a no-op when it is already channels_last): each kernel tap then reads BLOCK_K
    # contiguous channels, which vectorise and pipeline.
    a_cl = channels_last(lora_A)

    s = torch.empty((m, r), device=x.device, dtype=x.dtype)
    meta, launch = _skinny(x.device, "down", x.dtype)
    plans_for(_conv_down_kernel).launch(
        None, (triton.cdiv(m, meta["BLOCK_M"]), 1, 1),
        x_ptr=x, a_ptr=a_cl, s_ptr=s,
        M=m, C=c, H=h, W=w, Ho=ho, Wo=wo, R=r,
        stride_xn=x.stride(0), stride_xc=x.stride(1), stride_xh=x.stride(2), stride_xw=x.stride(3),
        stride_ar=a_cl.stride(0), stride_ac=a_cl.stride(1), stride_ah=a_cl.stride(2), stride_aw=a_cl.stride(3),
        **dropout_args(dropout_p, seed, x), **geometry, **precision, **meta, BLOCK_R=block_r, **launch,
    )  # fmt: skip

    args = (x, weight, bias, s, lora_B.reshape(o, r), scaling, stride, pads, dilation, groups, geometry, precision)
    if fused is None:
        fused = _fused_wins(
            "fwd", lambda: _y_fused(*args), lambda: _y_split(*args), x, weight, r, stride, pads, dilation, groups, x
        )
    return (_y_fused(*args) if fused else _y_split(*args)), s


def _y_fused(x, weight, bias, s, b2, scaling, stride, pads, dilation, groups, geometry, precision):
    """Y = im2col(x) W^T + s * S B^T + bias in one kernel, the accumulator seeded with the LoRA term."""
    nb, _, h, w = x.shape
    o, cg = weight.shape[0], weight.shape[1]
    m, r = s.shape
    ho, wo = output_size(h, w, (geometry["KH"], geometry["KW"]), stride, pads, dilation)
    weight = channels_last(weight)  # channels innermost, as for A
    y = torch.empty((nb, o, ho, wo), device=x.device, dtype=x.dtype, memory_format=memory_format(x))
    og = o // groups
    args = dict(
        x_ptr=x, w_ptr=weight, s_ptr=s, b_ptr=b2, bias_ptr=bias if bias is not None else y, y_ptr=y,
        M=m, H=h, W=w, Ho=ho, Wo=wo, R=r, Cg=cg, Og=og,
        stride_xn=x.stride(0), stride_xc=x.stride(1), stride_xh=x.stride(2), stride_xw=x.stride(3),
        stride_wo=weight.stride(0), stride_wc=weight.stride(1), stride_wh=weight.stride(2), stride_ww=weight.stride(3),
        stride_bo=b2.stride(0), stride_br=b2.stride(1),
        stride_yn=y.stride(0), stride_yc=y.stride(1), stride_yh=y.stride(2), stride_yw=y.stride(3),
        scaling=float(scaling), HAS_BIAS=bias is not None, BLOCK_R=rank_block(r, max_block=None), **geometry,
        **precision,
    )  # fmt: skip
    grid = lambda meta: (groups * triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(og, meta["BLOCK_N"]),)
    _launch_gemm(_conv_fwd_kernel, _tuned_fwd_kernel, grid, args, x, groups)
    return y


def _y_split(x, weight, bias, s, b2, scaling, stride, pads, dilation, groups, geometry, precision):
    """Y = conv(x, W) + bias by torch (cuDNN on the GPU), then += s * S B^T in place."""
    extra_h, extra_w = pads[1] - pads[0], pads[3] - pads[2]
    x_in = x if extra_h == 0 and extra_w == 0 else torch.nn.functional.pad(x, (0, extra_w, 0, extra_h))
    y = torch.nn.functional.conv2d(x_in, weight, bias, stride, (pads[0], pads[2]), dilation, groups)
    y = y.contiguous(memory_format=memory_format(x))
    m, r = s.shape
    o = y.shape[1]
    meta, launch = _skinny(x.device, "up", x.dtype)
    plans_for(_conv_up_kernel).launch(
        None, (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(o, meta["BLOCK_K"]), 1),
        y_ptr=y, s_ptr=s, b_ptr=b2,
        M=m, O=o, Ho=y.shape[2], Wo=y.shape[3], R=r,
        stride_yn=y.stride(0), stride_yc=y.stride(1), stride_yh=y.stride(2), stride_yw=y.stride(3),
        stride_bo=b2.stride(0), stride_br=b2.stride(1), scaling=float(scaling),
        **precision, **meta, BLOCK_R=rank_block(r, max_block=None), **launch,
    )  # fmt: skip
    return y


def _fused_wins(kind, fused, split, x, weight, r, stride, pads, dilation, groups, *tensors) -> bool:
    """Whether the fused kernel runs: kernels/dispatch.py's choice between fused() and split() (each runs its path
    once), keyed by the sizes, the geometry and the memory formats of tensors; the fused kernel where nothing is
    timed (off CUDA, under the interpreter, a shape first met inside a CUDA graph capture)."""
    nb, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    layout = "".join("c" if memory_format(t) == torch.channels_last else "n" for t in tensors)
    key = dispatch.shape_key(
        f"conv_{kind}", M=nb * h * w, N=o, K=c * kh * kw, R=r, dtype=x.dtype, dropout=False,
        hw=(h, w), k=(kh, kw), s=stride, p=pads, d=dilation, g=groups, layout=layout,
    )  # fmt: skip
    return dispatch.choose(key, {"fused": fused, "split": split}, x.device) == "fused"


def _dx_split(dy, x, ds, weight, lora_A, stride, pads, dilation, groups, drop, geometry, precision, block_r):
    """dX = conv_transpose(dY, W) by torch, then += m * conv_transpose(dS, A) in place."""
    nb, c, h, w = x.shape
    r = lora_A.shape[0]
    dx = input_grad(dy, x, weight, stride, pads, dilation, groups)
    a_cl = channels_last(lora_A)
    meta, launch = _skinny(x.device, "dx", x.dtype)
    grid = (triton.cdiv(nb * h * w, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_K"]), 1)
    plans_for(_conv_dx_kernel).launch(
        None, grid,
        dx_ptr=dx, ds_ptr=ds, a_ptr=a_cl,
        P=nb * h * w, C=c, H=h, W=w, Ho=dy.shape[2], Wo=dy.shape[3], R=r,
        stride_xn=dx.stride(0), stride_xc=dx.stride(1), stride_xh=dx.stride(2), stride_xw=dx.stride(3),
        stride_ar=a_cl.stride(0), stride_ac=a_cl.stride(1), stride_ah=a_cl.stride(2), stride_aw=a_cl.stride(3),
        **drop, **geometry, **precision, **meta, BLOCK_R=block_r, **launch,
    )  # fmt: skip
    return dx


# Autotune key of the fused dX kernel: sizes, geometry and layout (unit channel stride of dY).
_DGRAD_TUNE_KEY = ["P", "Cg", "Og", "R", "H", "W", "stride_dyc", "KH", "KW", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W"]


@functools.cache
def _tuned_dgrad_kernel(major: int, dtype: torch.dtype):
    return triton.autotune(configs=conv_dgrad_configs(major, dtype), key=_DGRAD_TUNE_KEY)(_conv_dgrad_kernel)


def _dx_fused(dy, x, ds, weight, lora_A, stride, pads, dilation, groups, drop, geometry, precision, block_r):
    """dX = conv_transpose(dY, W) + conv_transpose(dS, A) in one kernel (no dropout)."""
    nb, c, h, w = x.shape
    o = weight.shape[0]
    weight = channels_last(weight)
    a_cl = channels_last(lora_A)
    dx = torch.empty((nb, c, h, w), device=x.device, dtype=x.dtype, memory_format=memory_format(x))
    p, cg, og = nb * h * w, c // groups, o // groups
    args = dict(
        dy_ptr=dy, w_ptr=weight, ds_ptr=ds, a_ptr=a_cl, dx_ptr=dx,
        P=p, C=c, H=h, W=w, Ho=dy.shape[2], Wo=dy.shape[3], R=lora_A.shape[0], Cg=cg, Og=og,
        stride_dyn=dy.stride(0), stride_dyc=dy.stride(1), stride_dyh=dy.stride(2), stride_dyw=dy.stride(3),
        stride_wo=weight.stride(0), stride_wc=weight.stride(1), stride_wh=weight.stride(2), stride_ww=weight.stride(3),
        stride_ar=a_cl.stride(0), stride_ac=a_cl.stride(1), stride_ah=a_cl.stride(2), stride_aw=a_cl.stride(3),
        stride_xn=dx.stride(0), stride_xc=dx.stride(1), stride_xh=dx.stride(2), stride_xw=dx.stride(3),
        BLOCK_R=block_r, **geometry, **precision,
    )  # fmt: skip
    grid = lambda meta: (groups * triton.cdiv(p, meta["BLOCK_M"]) * triton.cdiv(cg, meta["BLOCK_N"]),)
    _launch_gemm(_conv_dgrad_kernel, _tuned_dgrad_kernel, grid, args, x, groups)
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
    seed: the forward's (a one-element int64 tensor on x's device, read from memory, or an int).
    fused_dgrad (without dropout only): True computes dX in one Triton kernel (_conv_dgrad_kernel); False takes
    conv_transpose(dY, W) from torch (cuDNN) and adds the LoRA term in place (_conv_dx_kernel), as every call
    with dropout does; None (default) leaves it to kernels/dispatch.py, as lora_conv2d_fwd does.
    """
    nb, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    r = lora_A.shape[0]
    ho, wo = dy.shape[2], dy.shape[3]
    m = nb * ho * wo
    geometry = _geometry((kh, kw), stride, pads, dilation)
    precision = _precision(x.dtype)
    drop = dropout_args(dropout_p, seed, x)
    block_r = rank_block(r, max_block=None)
    b2 = lora_B.reshape(o, r)

    meta, launch = _skinny(x.device, "ds_db", x.dtype)
    num_tiles = triton.cdiv(m, meta["BLOCK_M"])
    ds = torch.empty((m, r), device=x.device, dtype=torch.float32)
    dbp = torch.empty((num_tiles, o, r), device=x.device, dtype=torch.float32)
    plans_for(_conv_ds_db_kernel).launch(
        None, (num_tiles, 1, 1),
        dy_ptr=dy, s_ptr=s, b_ptr=b2, ds_ptr=ds, db_part_ptr=dbp,
        M=m, O=o, Ho=ho, Wo=wo, R=r,
        stride_dyn=dy.stride(0), stride_dyc=dy.stride(1), stride_dyh=dy.stride(2), stride_dyw=dy.stride(3),
        stride_bo=b2.stride(0), stride_br=b2.stride(1), scaling=float(scaling),
        **precision, **meta, BLOCK_R=block_r, **launch,
    )  # fmt: skip
    db = dbp.sum(0).mul_(scaling).to(lora_B.dtype).reshape(lora_B.shape)

    meta, launch = _skinny(x.device, "da", x.dtype)
    k_blocks = kh * kw * triton.cdiv(c, meta["BLOCK_K"])
    splits = max(1, min(triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(num_programs_target(x.device), k_blocks)))
    dap = torch.empty((splits, r, c, kh, kw), device=x.device, dtype=torch.float32)
    plans_for(_conv_da_kernel).launch(
        None, (k_blocks, splits, 1),
        x_ptr=x, ds_ptr=ds, da_part_ptr=dap,
        M=m, C=c, H=h, W=w, Ho=ho, Wo=wo, R=r,
        stride_xn=x.stride(0), stride_xc=x.stride(1), stride_xh=x.stride(2), stride_xw=x.stride(3),
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
            fused_dgrad = _fused_wins(
                "dx", lambda: _dx_fused(*args), lambda: _dx_split(*args), x, weight, r, stride, pads, dilation,
                groups, x, dy,
            )  # fmt: skip
        dx = _dx_fused(*args) if fused_dgrad else _dx_split(*args)
    dbias = dy.sum((0, 2, 3), dtype=torch.float32).to(dy.dtype) if need_dbias else None
    return dx, da, db, dbias


def conv2d_dropout_mask(shape, dropout_p: float, seed: int | torch.Tensor, device) -> torch.Tensor:
    """The dropout factors [Nb, C, H, W] (0 or 1/(1-p), float32) the conv kernels draw for an input of this shape:
    linear's mask (kernels/dropout.py) of x viewed as [Nb*H*W, C], pixels as rows, channels as columns.

    seed: an int or a one-element int64 tensor on device, as the launchers take it."""
    nb, c, h, w = shape
    if dropout_p <= 0:
        return torch.ones((nb, c, h, w), device=device, dtype=torch.float32)
    keep = dropout_mask(seed, nb * h * w, c, dropout_p, device)
    factors = keep.to(torch.float32).mul_(1.0 / (1.0 - dropout_p))
    return factors.view(nb, h, w, c).permute(0, 3, 1, 2).contiguous()
