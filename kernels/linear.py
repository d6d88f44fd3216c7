"""Fused LoRA linear: forward and backward kernels and their launchers.

x [M, K], W [N, K] (frozen), A [r, K], B [N, r], s the scaling, m the dropout mask (0 or 1/(1-p)),
a pure function of (seed, row, column) so that backward regenerates exactly the mask forward drew,
whatever the tiling:

    forward:   S = (m x) A^T          one pass over x                     (_lora_down_kernel)
               Y = x W^T + s S B^T + bias   the GEMM's accumulator starts at s S B^T   (_lora_gemm_kernel)
    backward:  dS = s dY B, dB = s dY^T S   one pass over dY               (_lora_down_kernel, side output)
               dX = dY W + m (dS A)   the GEMM's accumulator starts at m (dS A)      (_lora_gemm_kernel)
               dA = dS^T (m x)        one pass over x                     (_lora_up_t_kernel)

All products accumulate in float32 and every output is rounded once. The skinny rank-r passes split their
reduction across programs to fill the GPU; the partial sums go to a float32 buffer summed in a fixed order,
except dB in the fused dY pass, which uses float32 atomics unless deterministic algorithms are requested
(then dB takes its own pass over dY and no atomics run anywhere).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastlora.kernels import configs
from fastlora.kernels.configs import INTERPRET, TL_DTYPES, dot_dtype, input_precision, rank_block
from triton.tools.tensor_descriptor import TensorDescriptor

# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def dropout_keep(seed, rows, cols, p):
    """Keep-mask [len(rows), len(cols)] for dropout probability p: philox on the counter (col // 4, row),
    each call giving the 4 lanes of 4 neighbouring columns. cols must start at a multiple of 4 and number
    a multiple of 4 (block sizes are powers of two >= 16)."""
    BM: tl.constexpr = rows.shape[0]
    BC: tl.constexpr = cols.shape[0]
    quads = tl.reshape(cols, (BC // 4, 4))
    c0 = (tl.min(quads, axis=1) // 4)[None, :] + rows[:, None] * 0
    c1 = rows[:, None] + c0 * 0
    zero = c0 * 0
    r0, r1, r2, r3 = tl.random.philox(seed, c0.to(tl.uint32), c1.to(tl.uint32), zero.to(tl.uint32), zero.to(tl.uint32))
    lanes = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # [BM, BC // 4, 2, 2], row-major order r0, r1, r2, r3
    u = tl.random.uint_to_uniform_float(tl.reshape(lanes, (BM, BC)))
    return u >= p


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _lora_down_kernel(
    # pointers
    x_ptr,
    bt_ptr,
    t_ptr,
    out_ptr,
    side_ptr,
    # sizes
    M,
    K,
    R,
    K_PER_SPLIT,
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
    # scalars
    scale,
    side_scale,
    seed,
    p_drop,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr,
    HAS_SIDE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out[split, M, R] = scale * (m x)[M, Ks] @ Bt[Ks, R] over this split's K range Ks.
    With HAS_SIDE also side[K, R] += side_scale * x^T @ T[M, R] (float32 atomics)."""
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
            b_x = tl.where(dropout_keep(seed, i_m, i_k, p_drop), b_x, 0.0)
        b_x = b_x.to(DOT_DTYPE)
        p_b = bt_ptr + i_k[:, None].to(tl.int64) * stride_bk + i_r[None, :] * stride_br
        b_b = tl.load(p_b, mask=m_k[:, None] & m_r[None, :], other=0.0).to(DOT_DTYPE)  # [BK, BR]
        acc = tl.dot(b_x, b_b, acc, input_precision=PRECISION)
        if HAS_SIDE:
            b_side = tl.dot(tl.trans(b_x), b_t, input_precision=PRECISION)  # [BK, BR]
            p_side = side_ptr + i_k[:, None].to(tl.int64) * stride_sk + i_r[None, :] * stride_sr
            tl.atomic_add(p_side, b_side * side_scale, mask=m_k[:, None] & m_r[None, :], sem="relaxed")
    p_o = out_ptr + pid_s.to(tl.int64) * stride_os + i_m64[:, None] * stride_om + i_r[None, :] * stride_or
    tl.store(p_o, (acc * scale).to(out_ptr.dtype.element_ty), mask=m_m[:, None] & m_r[None, :])


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
    seed,
    p_drop,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out[split, R, K] = scale * T[Ms, R]^T @ (m x)[Ms, K] over this split's M range Ms."""
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
            b_x = tl.where(dropout_keep(seed, i_m, i_k, p_drop), b_x, 0.0)
        acc = tl.dot(tl.trans(b_x.to(DOT_DTYPE)), b_t, acc, input_precision=PRECISION)
    p_o = out_ptr + pid_s.to(tl.int64) * stride_os + i_k64[:, None] * stride_ok + i_r[None, :] * stride_or
    tl.store(p_o, (acc * scale).to(out_ptr.dtype.element_ty), mask=m_k[:, None] & m_r[None, :])


@triton.jit
def _lora_gemm_kernel(
    # pointers
    a_ptr,
    b_ptr,
    p_ptr,
    q_ptr,
    bias_ptr,
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
    stride_cm,
    stride_cn,
    # scalars
    lora_scale,
    seed,
    p_drop,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[M, N] = a[M, K] @ b[K, N] + lora_scale * mask(P[M, R] @ Q[R, N]) + bias[N].

    Forward: a = x, b = W^T, P = S, Q = B^T, no mask. Backward dX: a = dY, b = W, P = dS, Q = A, with the
    dropout mask of x's element (row, col) and lora_scale = 1 / (1 - p)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row-blocks share each column-block of b while it sits in L2
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    i_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m, m_n = i_m < M, i_n < N
    i_m64, i_n64 = i_m.to(tl.int64), i_n.to(tl.int64)

    # the LoRA term first: an r-wide K step that seeds the accumulator
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        i_r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        m_r = i_r < R
        b_p = tl.load(
            p_ptr + i_m64[:, None] * stride_pm + i_r[None, :] * stride_pr, mask=m_m[:, None] & m_r[None, :], other=0.0
        )
        b_q = tl.load(
            q_ptr + i_r[:, None] * stride_qr + i_n64[None, :] * stride_qn, mask=m_r[:, None] & m_n[None, :], other=0.0
        )
        acc = tl.dot(b_p.to(DOT_DTYPE), b_q.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if HAS_DROPOUT:
        acc = tl.where(dropout_keep(seed, i_m, i_n, p_drop), acc * lora_scale, 0.0)
    else:
        acc = acc * lora_scale

    # the frozen product
    p_a = a_ptr + i_m64[:, None] * stride_am + tl.arange(0, BLOCK_K)[None, :] * stride_ak
    p_b = b_ptr + tl.arange(0, BLOCK_K)[:, None] * stride_bk + i_n64[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        m_k = tl.arange(0, BLOCK_K) < K - k0
        b_a = tl.load(p_a, mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_b = tl.load(p_b, mask=m_k[:, None] & m_n[None, :], other=0.0)
        acc = tl.dot(b_a.to(DOT_DTYPE), b_b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        p_a += BLOCK_K * stride_ak
        p_b += BLOCK_K * stride_bk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + i_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    p_c = c_ptr + i_m64[:, None] * stride_cm + i_n64[None, :] * stride_cn
    tl.store(p_c, acc.to(c_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _lora_gemm_tma_kernel(
    # tensor descriptors and pointers
    a_desc,
    b_desc,
    c_desc,
    p_ptr,
    q_ptr,
    bias_ptr,
    # sizes
    M,
    N,
    K,
    R,
    M_BUCKET,
    # strides
    stride_pm,
    stride_pr,
    stride_qr,
    stride_qn,
    # scalars
    lora_scale,
    seed,
    p_drop,
    # meta-parameters
    B_NK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
):
    """_lora_gemm_kernel for Hopper: tiles move by TMA (tensor descriptors, out-of-bounds zero-filled), and
    NUM_SMS persistent programs walk the tiles in grouped order. b_desc holds W [N, K] when B_NK (forward),
    else b [K, N] (backward dX)."""
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_pid_in_group = GROUP_M * num_pid_n
    for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=True):
        group_id = tile_id // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (tile_id % group_size_m)
        pid_n = (tile_id % num_pid_in_group) // group_size_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        i_m = off_m + tl.arange(0, BLOCK_M)
        i_n = off_n + tl.arange(0, BLOCK_N)
        m_m, m_n = i_m < M, i_n < N
        i_m64, i_n64 = i_m.to(tl.int64), i_n.to(tl.int64)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            i_r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            m_r = i_r < R
            p_p = p_ptr + i_m64[:, None] * stride_pm + i_r[None, :] * stride_pr
            p_q = q_ptr + i_r[:, None] * stride_qr + i_n64[None, :] * stride_qn
            b_p = tl.load(p_p, mask=m_m[:, None] & m_r[None, :], other=0.0)
            b_q = tl.load(p_q, mask=m_r[:, None] & m_n[None, :], other=0.0)
            acc = tl.dot(b_p.to(DOT_DTYPE), b_q.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if HAS_DROPOUT:
            acc = tl.where(dropout_keep(seed, i_m, i_n, p_drop), acc * lora_scale, 0.0)
        else:
            acc = acc * lora_scale

        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            b_a = a_desc.load([off_m, off_k]).to(DOT_DTYPE)
            if B_NK:
                b_b = b_desc.load([off_n, off_k]).to(DOT_DTYPE)
                acc = tl.dot(b_a, b_b.T, acc, input_precision=PRECISION)
            else:
                b_b = b_desc.load([off_k, off_n]).to(DOT_DTYPE)
                acc = tl.dot(b_a, b_b, acc, input_precision=PRECISION)

        if HAS_BIAS:
            acc += tl.load(bias_ptr + i_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
        c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


def _set_tma_block_shapes(nargs):
    """Autotune pre-hook: the descriptors' block shapes follow the config being tried."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk] if nargs["B_NK"] else [bk, bn]
    nargs["c_desc"].block_shape = [bm, bn]


def _prune_gemm_configs(configs_list, named_args, **kwargs):
    """Drop tiles much larger than the problem (small M or N): they only waste the autotuner's time.

    Triton passes the positional arguments as named_args and the keyword ones as kwargs; the launchers use
    keywords."""
    args = {**named_args, **kwargs}
    m, n = args["M"], args["N"]
    kept = [c for c in configs_list if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(m))]
    kept = [c for c in kept if c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(n))]
    return kept or configs_list[-1:]


@triton.jit
def _dropout_mask_kernel(
    out_ptr, M, K, stride_om, stride_ok, seed, p_drop, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):
    """out[M, K] = the keep-mask the LoRA kernels draw for (seed, p): for tests and `fastlora validate`."""
    i_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    i_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed, i_m, i_k, p_drop)
    p_o = out_ptr + i_m.to(tl.int64)[:, None] * stride_om + i_k.to(tl.int64)[None, :] * stride_ok
    tl.store(p_o, keep.to(tl.int8), mask=(i_m < M)[:, None] & (i_k < K)[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

_autotuned_gemm = {}


def _gemm_kernel_for(major: int, dtype: torch.dtype, masked: bool):
    """The GEMM kernel autotuned over this GPU generation's configs (one autotuner per generation, dtype and
    whether the LoRA term is dropout-masked, which needs smaller tiles)."""
    key = (major, dtype, masked)
    if key not in _autotuned_gemm:
        _autotuned_gemm[key] = triton.autotune(
            configs=configs.gemm_configs(major, dtype, masked),
            key=["M_BUCKET", "N", "K", "R"],
            prune_configs_by={"early_config_prune": _prune_gemm_configs},
        )(_lora_gemm_kernel)
    return _autotuned_gemm[key]


def _skinny_config(device):
    if INTERPRET:
        return configs.SKINNY_INTERPRET
    return configs.skinny_config_tuples(configs.capability(device))[0]


def _splits(blocks: int, programs_without_split: int, device) -> int:
    """How many ways to split a reduction of `blocks` blocks so the launch fills the device."""
    return max(1, min(blocks, configs.num_programs_target(device) // max(1, programs_without_split)))


_autotuned_gemm_tma = {}


def _gemm_tma_kernel_for(major: int, dtype: torch.dtype, masked: bool):
    """The TMA persistent GEMM autotuned over the same tiles; the pre-hook re-shapes the descriptors per config."""
    key = (major, dtype, masked)
    if key not in _autotuned_gemm_tma:
        tuned = [
            triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_set_tma_block_shapes)
            for c in configs.gemm_configs(major, dtype, masked)
        ]
        _autotuned_gemm_tma[key] = triton.autotune(
            configs=tuned, key=["M_BUCKET", "N", "K", "R"], prune_configs_by={"early_config_prune": _prune_gemm_configs}
        )(_lora_gemm_tma_kernel)
    return _autotuned_gemm_tma[key]


def _tma_capable(device) -> bool:
    return configs.capability(device) >= 9


def _tma_views(a, b, c):
    """(a, b as W [N, K] or [K, N], B_NK) when TMA can address all three (unit inner stride, 16-byte aligned
    rows and base), else None."""
    if b.stride(0) == 1:
        b_view, b_nk = b.t(), True
    elif b.stride(1) == 1:
        b_view, b_nk = b, False
    else:
        return None
    for t in (a, b_view, c):
        if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return None
    return a, b_view, b_nk


def _gemm(a, b, p, q, bias, c, lora_scale, dropout_p=0.0, seed=0):
    """c[M, N] = a[M, K] @ b[K, N] + lora_scale * mask(p[M, R] @ q[R, N]) + bias; a, b, p, q are strided views."""
    M, K = a.shape
    N = b.shape[1]
    R = p.shape[1]
    common = dict(
        p_ptr=p,
        q_ptr=q,
        bias_ptr=bias if bias is not None else c,
        M=M,
        N=N,
        K=K,
        R=R,
        M_BUCKET=triton.next_power_of_2(M),
        stride_pm=p.stride(0),
        stride_pr=p.stride(1),
        stride_qr=q.stride(0),
        stride_qn=q.stride(1),
        lora_scale=float(lora_scale),
        seed=int(seed),
        p_drop=float(dropout_p),
        HAS_BIAS=bias is not None,
        HAS_DROPOUT=dropout_p > 0,
        DOT_DTYPE=dot_dtype(a.dtype),
        PRECISION=input_precision(a.dtype),
        BLOCK_R=rank_block(R),
    )
    # TMA for 16-bit tiles on Hopper; float32 (an FMA or TF32 product, not a speed target) keeps the pointer kernel
    views = _tma_views(a, b, c) if a.dtype != torch.float32 and _tma_capable(a.device) else None
    if views is not None:
        a, b_view, b_nk = views
        bm, bn, bk, g, _, _ = configs.GEMM_INTERPRET if INTERPRET else (64, 64, 64, 8, 4, 3)
        descs = dict(
            a_desc=TensorDescriptor.from_tensor(a, [bm, bk]),
            b_desc=TensorDescriptor.from_tensor(b_view, [bn, bk] if b_nk else [bk, bn]),
            c_desc=TensorDescriptor.from_tensor(c, [bm, bn]),
        )
        num_sms = configs.num_sms(a.device)
        if INTERPRET:
            grid = (min(num_sms, triton.cdiv(M, bm) * triton.cdiv(N, bn)),)
            _lora_gemm_tma_kernel[grid](
                **descs, **common, B_NK=b_nk, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, NUM_SMS=num_sms
            )
            return c
        kernel = _gemm_tma_kernel_for(configs.capability(a.device), a.dtype, dropout_p > 0)
        grid = lambda meta: (min(num_sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)
        kernel[grid](**descs, **common, B_NK=b_nk, NUM_SMS=num_sms)
        return c
    args = dict(
        a_ptr=a,
        b_ptr=b,
        c_ptr=c,
        **common,
        stride_am=a.stride(0),
        stride_ak=a.stride(1),
        stride_bk=b.stride(0),
        stride_bn=b.stride(1),
        stride_cm=c.stride(0),
        stride_cn=c.stride(1),
    )
    if INTERPRET:
        bm, bn, bk, g, _, _ = configs.GEMM_INTERPRET
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        _lora_gemm_kernel[grid](**args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g)
        return c
    kernel = _gemm_kernel_for(configs.capability(a.device), a.dtype, dropout_p > 0)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    kernel[grid](**args)
    return c


def _down(x, bt, out_dtype, scale, dropout_p=0.0, seed=0, side=None):
    """scale * (m x)[M, K] @ bt[K, R] -> [M, R] in out_dtype.

    side = (t [M, R], acc [K, R] float32, side_scale): also acc += side_scale * x^T t, with atomics."""
    M, K = x.shape
    R = bt.shape[1]
    bm, bk, warps, stages = _skinny_config(x.device)
    br = rank_block(R)
    grid_m, grid_r = triton.cdiv(M, bm), triton.cdiv(R, br)
    k_blocks = triton.cdiv(K, bk)
    k_per_split = triton.cdiv(k_blocks, _splits(k_blocks, grid_m * grid_r, x.device)) * bk
    split = triton.cdiv(K, k_per_split)
    out = torch.empty(
        (split, M, R) if split > 1 else (1, M, R), device=x.device, dtype=torch.float32 if split > 1 else out_dtype
    )
    t, acc, side_scale = side if side is not None else (x, out, 0.0)
    _lora_down_kernel[(grid_m, grid_r, split)](
        x_ptr=x,
        bt_ptr=bt,
        t_ptr=t,
        out_ptr=out,
        side_ptr=acc,
        M=M,
        K=K,
        R=R,
        K_PER_SPLIT=k_per_split,
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
        scale=float(scale),
        side_scale=float(side_scale),
        seed=int(seed),
        p_drop=float(dropout_p),
        HAS_DROPOUT=dropout_p > 0,
        HAS_SIDE=side is not None,
        DOT_DTYPE=dot_dtype(x.dtype),
        PRECISION=input_precision(x.dtype),
        BLOCK_M=bm,
        BLOCK_K=bk,
        BLOCK_R=br,
        num_warps=warps,
        num_stages=stages,
    )
    return out.sum(0).to(out_dtype) if split > 1 else out[0]


def _up_t(t, x, scale, dropout_p=0.0, seed=0):
    """scale * t[M, R]^T @ (m x)[M, K] -> [R, K] float32."""
    M, K = x.shape
    R = t.shape[1]
    bm, bk, warps, stages = _skinny_config(x.device)
    br = rank_block(R)
    grid_k, grid_r = triton.cdiv(K, bk), triton.cdiv(R, br)
    m_blocks = triton.cdiv(M, bm)
    m_per_split = triton.cdiv(m_blocks, _splits(m_blocks, grid_k * grid_r, x.device)) * bm
    split = triton.cdiv(M, m_per_split)
    out = torch.empty((split, R, K), device=x.device, dtype=torch.float32)
    _lora_up_t_kernel[(grid_k, grid_r, split)](
        t_ptr=t,
        x_ptr=x,
        out_ptr=out,
        M=M,
        K=K,
        R=R,
        M_PER_SPLIT=m_per_split,
        stride_tm=t.stride(0),
        stride_tr=t.stride(1),
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_os=out.stride(0),
        stride_or=out.stride(1),
        stride_ok=out.stride(2),
        scale=float(scale),
        seed=int(seed),
        p_drop=float(dropout_p),
        HAS_DROPOUT=dropout_p > 0,
        DOT_DTYPE=dot_dtype(x.dtype),
        PRECISION=input_precision(x.dtype),
        BLOCK_M=bm,
        BLOCK_K=bk,
        BLOCK_R=br,
        num_warps=warps,
        num_stages=stages,
    )
    return out.sum(0) if split > 1 else out[0]


def _check_dtype(x):
    if x.dtype not in TL_DTYPES:
        raise TypeError(f"fastlora kernels take float16, bfloat16 or float32, got {x.dtype}")


def lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """Y [M, N] = x W^T + bias + s * S B^T and S [M, r] = (m x) A^T, for x [M, K] (any strides)."""
    _check_dtype(x)
    M, _ = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y, x.new_zeros((0, R))
    inv_keep = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    s = _down(x, lora_A.t(), x.dtype, inv_keep, dropout_p, seed)
    _gemm(x, weight.t(), s, lora_B.t(), bias, y, lora_scale=scaling)
    return y, s


def lora_linear_bwd(dy, x, s, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx=True, need_dbias=False):
    """dX [M, K] (or None), dA [r, K], dB [N, r], dbias [N] (or None) for dY [M, N]."""
    _check_dtype(dy)
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    inv_keep = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    if torch.are_deterministic_algorithms_enabled():
        ds = _down(dy, lora_B, dy.dtype, scaling)
        db = _up_t(s, dy, scaling).t()
    else:
        db = torch.zeros((N, R), device=dy.device, dtype=torch.float32)
        ds = _down(dy, lora_B, dy.dtype, scaling, side=(s, db, scaling))
    da = _up_t(ds, x, inv_keep, dropout_p, seed)
    dx = None
    if need_dx:
        dx = torch.empty((M, K), device=x.device, dtype=x.dtype)
        _gemm(dy, weight, ds, lora_A, None, dx, lora_scale=inv_keep, dropout_p=dropout_p, seed=seed)
    dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype) if need_dbias else None
    return dx, da.to(lora_A.dtype), db.to(lora_B.dtype, memory_format=torch.contiguous_format), dbias


def dropout_mask(seed: int, M: int, K: int, p: float, device) -> torch.Tensor:
    """The bool keep-mask [M, K] the kernels draw for (seed, p); m = keep / (1 - p)."""
    out = torch.empty((M, K), device=device, dtype=torch.int8)
    bm, bk = 16, 32
    _dropout_mask_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](
        out_ptr=out,
        M=M,
        K=K,
        stride_om=out.stride(0),
        stride_ok=out.stride(1),
        seed=int(seed),
        p_drop=float(p),
        BLOCK_M=bm,
        BLOCK_K=bk,
    )
    return out.bool()


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases: every shipped config, as the JIT would specialise it for aligned tensors
# ----------------------------------------------------------------------------------------------------------


def _sig(types: dict) -> dict:
    """{"*fp16": "a_ptr b_ptr", "i32": "M N"} -> {"a_ptr": "*fp16", "b_ptr": "*fp16", "M": "i32", "N": "i32"}."""
    return {name: ty for ty, names in types.items() for name in names.split()}


def _aot_case(case_id, major, kernel, signature, constexprs, divisible, warps, stages, expects_mma=True):
    return {
        "id": case_id, "major": major, "kernel": kernel, "signature": signature, "constexprs": constexprs,
        "divisible": divisible.split(), "num_warps": warps, "num_stages": stages, "expects_mma": expects_mma,
    }  # fmt: skip


def aot_cases():
    """The compile cases tests/aot.py builds for sm_80 and sm_90 (contiguous, 16-aligned tensors, r = 16): every
    GEMM tile for each dtype, both directions (forward with bias, backward dX with dropout), the TMA variant on
    sm_90 for 16-bit dtypes, and the skinny passes with dropout and the atomic dB side output."""
    cases = []
    precisions = ((torch.float16, "ieee"), (torch.bfloat16, "ieee"), (torch.float32, "ieee"), (torch.float32, "tf32"))
    for major in (8, 9):
        for dtype, precision in precisions:
            t = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
            tag = "-tf32" if precision == "tf32" else ""
            mma = precision == "tf32" or dtype != torch.float32
            for fwd in (True, False):
                flags = {"HAS_BIAS": fwd, "HAS_DROPOUT": not fwd, "DOT_DTYPE": TL_DTYPES[dtype],
                         "PRECISION": precision, "BLOCK_R": 16, "stride_pr": 1, "stride_qr": 1}  # fmt: skip
                b_strided, b_unit = ("stride_bn", "stride_bk") if fwd else ("stride_bk", "stride_bn")
                for bm, bn, bk, g, w, st in configs.gemm_config_tuples(major, dtype, masked=not fwd):
                    name = f"{'fwd' if fwd else 'bwd'}-{t}{tag}-{bm}x{bn}x{bk}-w{w}s{st}"
                    tiles = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}
                    sig = _sig(
                        {
                            f"*{t}": "a_ptr b_ptr p_ptr q_ptr bias_ptr c_ptr",
                            "fp32": "lora_scale p_drop",
                            "i32": f"M N K R M_BUCKET stride_am stride_pm stride_qn stride_cm seed {b_strided}",
                        }
                    )
                    cases.append(_aot_case(
                        f"gemm-{name}", major, _lora_gemm_kernel, sig,
                        {**flags, **tiles, "stride_ak": 1, b_unit: 1, "stride_cn": 1},
                        f"a_ptr b_ptr p_ptr q_ptr bias_ptr c_ptr N K stride_am {b_strided} stride_pm stride_qn "
                        "stride_cm", w, st, mma,
                    ))  # fmt: skip
                    if major < 9 or dtype == torch.float32:
                        continue
                    b_block = f"{bn}, {bk}" if fwd else f"{bk}, {bn}"
                    sig = _sig({f"*{t}": "p_ptr q_ptr bias_ptr", "fp32": "lora_scale p_drop",
                                "i32": "M N K R M_BUCKET stride_pm stride_qn seed"})  # fmt: skip
                    sig["a_desc"], sig["c_desc"] = f"tensordesc<{t}[{bm}, {bk}]>", f"tensordesc<{t}[{bm}, {bn}]>"
                    sig["b_desc"] = f"tensordesc<{t}[{b_block}]>"
                    cases.append(_aot_case(
                        f"gemm_tma-{name}", major, _lora_gemm_tma_kernel, sig,
                        {**flags, **tiles, "B_NK": fwd, "NUM_SMS": 132},
                        "p_ptr q_ptr bias_ptr N K stride_pm stride_qn", w, st, mma,
                    ))  # fmt: skip
            if dtype == torch.float32:
                continue  # the skinny passes are memory-bound: their 16-bit builds stand for all dtypes
            for bm, bk, w, st in configs.skinny_config_tuples(major):
                meta = {"DOT_DTYPE": TL_DTYPES[dtype], "PRECISION": "tf32", "HAS_DROPOUT": True,
                        "BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_R": 16}  # fmt: skip
                sig = _sig(
                    {
                        f"*{t}": "x_ptr bt_ptr t_ptr out_ptr",
                        "*fp32": "side_ptr",
                        "fp32": "scale side_scale p_drop",
                        "i32": "M K R K_PER_SPLIT stride_xm stride_bk stride_tm stride_os stride_om stride_sk seed",
                    }
                )
                cases.append(_aot_case(
                    f"down-{t}-{bm}x{bk}-w{w}s{st}", major, _lora_down_kernel, sig,
                    {**meta, "HAS_SIDE": True, "stride_xk": 1, "stride_br": 1, "stride_tr": 1, "stride_or": 1,
                     "stride_sr": 1},
                    "x_ptr bt_ptr t_ptr out_ptr side_ptr K K_PER_SPLIT stride_xm stride_bk stride_tm stride_os "
                    "stride_om stride_sk", w, st,
                ))  # fmt: skip
                sig = _sig({f"*{t}": "t_ptr x_ptr", "*fp32": "out_ptr", "fp32": "scale p_drop",
                            "i32": "M K R M_PER_SPLIT stride_tm stride_xm stride_os stride_or seed"})  # fmt: skip
                cases.append(_aot_case(
                    f"up_t-{t}-{bm}x{bk}-w{w}s{st}", major, _lora_up_t_kernel, sig,
                    {**meta, "stride_tr": 1, "stride_xk": 1, "stride_ok": 1},
                    "t_ptr x_ptr out_ptr K M_PER_SPLIT stride_tm stride_xm stride_os stride_or", w, st,
                ))  # fmt: skip
    return cases
