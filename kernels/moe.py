"""LoRA on MoE experts: a grouped GEMM over tokens sorted by expert, with the LoRA term in its epilogue.

Rows x [S, K] are sorted by expert; ``offsets`` [E] holds where each expert's rows end (transformers' convention:
the cumulative row counts), so expert e owns rows [offsets[e - 1], offsets[e]). W [E, N, K] (or [E, K, N] when the
model stores it transposed), bias [E, N]; the adapter in PEFT's layout: A [r E, K] expert-major (A_e = A.view(E, r,
K)[e]) and B [N, r E] interleaved (B_e = B.view(N, r, E)[:, :, e]), read as stored through strides, never copied.
For the rows X_e of expert e:

    forward:   S_e = X_e A_e^T                       one pass over x (_moe_down_kernel)
               Y_e = X_e W_e^T + s S_e B_e^T + bias_e   the LoRA term in the GEMM's epilogue (_moe_gemm_kernel)
    backward:  dS_e = s dY_e B_e                      one pass over dY (_moe_down_kernel)
               dB_e = s dY_e^T S_e                    per expert, a second pass over dY (_moe_grad_kernel)
               dX_e = dY_e W_e + dS_e A_e             the same GEMM, the LoRA term in its epilogue
               dA_e = dS_e^T X_e                      per expert, one pass over x (_moe_grad_kernel)

No tensor of one expert's N x K elements is formed (no B_e A_e, no W_e + s B_e A_e, no dW). Forward is two launches,
backward four; no atomics and no split partials, so every output is written once, in a fixed order (deterministic).

Row tiles never cross an expert boundary. Each program of the row-tiled kernels finds its expert from the offsets
alone (a cumulative sum of the experts' tile counts, on the device: no host sync); the grid is sized for the most
tiles any routing can need, cdiv(S, BLOCK_M) + E, and programs past the routing's own count exit at once. Offsets
are clamped to [0, S] in the kernels, so offsets that are not the cumulative counts of rows sorted by expert never
make a kernel read or write out of bounds (the op checks them, see fastlora.ops.moe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastlora.kernels import configs
from fastlora.kernels.configs import INTERPRET, dot_dtype, input_precision, rank_block
from fastlora.kernels.launch import plans_for
from fastlora.kernels.tiles import grouped_tile

__all__ = ["lora_experts_fwd", "lora_experts_bwd", "expert_views", "max_row_tiles"]


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _expert_rows(offs_ptr, e, S):
    """[start, end) of expert e's rows: offsets[e - 1] (0 for e = 0) and offsets[e], clamped to [0, S]."""
    end = tl.minimum(tl.maximum(tl.load(offs_ptr + e).to(tl.int32), 0), S)
    prev = tl.load(offs_ptr + tl.maximum(e - 1, 0)).to(tl.int32)
    start = tl.where(e > 0, tl.minimum(tl.maximum(prev, 0), end), 0)
    return start, end


@triton.jit
def _expert_tile(offs_ptr, tile, E, S, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(e, first row, end row) of row tile ``tile`` when every expert's rows are cut into BLOCK_M-row tiles and the
    experts' tiles are numbered in order; first row >= end row for a tile past the last one."""
    i_e = tl.arange(0, BLOCK_E)
    m_e = i_e < E
    ends = tl.minimum(tl.maximum(tl.load(offs_ptr + i_e, mask=m_e, other=0).to(tl.int32), 0), S)
    prev = tl.load(offs_ptr + i_e - 1, mask=m_e & (i_e > 0), other=0).to(tl.int32)
    starts = tl.minimum(tl.maximum(prev, 0), ends)
    tiles = tl.where(m_e, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    cum = tl.cumsum(tiles, 0)
    e = tl.sum((cum <= tile).to(tl.int32), 0)  # experts whose tiles all come before this one
    sel = i_e == e
    first_tile = tl.sum(tl.where(sel, cum - tiles, 0), 0)
    row0 = tl.sum(tl.where(sel, starts, 0), 0) + (tile - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(sel, ends, 0), 0)
    return e, row0, row_end


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _moe_down_kernel(
    # pointers
    t_ptr,
    v_ptr,
    offs_ptr,
    out_ptr,
    # sizes
    S,
    C,
    R,
    E,
    # strides
    stride_tm,
    stride_tc,
    stride_ve,
    stride_vc,
    stride_vr,
    stride_om,
    stride_or,
    # scalars
    scale,
    # meta-parameters
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """out[m, j] = scale * sum_c T[m, c] V_e[c, j] for the rows m of expert e, V_e[c, j] at
    v_ptr + e stride_ve + c stride_vc + j stride_vr (S = x A_e^T: V_e = A_e^T; dS = s dY B_e: V_e = B_e)."""
    e, row0, row_end = _expert_tile(offs_ptr, tl.program_id(0), E, S, BLOCK_M, BLOCK_E)
    if row0 >= row_end:
        return
    i_m = row0 + tl.arange(0, BLOCK_M)
    i_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_m, m_r = i_m < row_end, i_r < R
    i_m64, i_r64 = i_m.to(tl.int64), i_r.to(tl.int64)
    p_v = v_ptr + e.to(tl.int64) * stride_ve + i_r64[None, :] * stride_vr
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        i_c = c0 + tl.arange(0, BLOCK_C)
        m_c = i_c < C
        i_c64 = i_c.to(tl.int64)
        b_t = tl.load(t_ptr + i_m64[:, None] * stride_tm + i_c64[None, :] * stride_tc, mask=m_m[:, None] & m_c[None, :],
                      other=0.0)  # fmt: skip
        b_v = tl.load(p_v + i_c64[:, None] * stride_vc, mask=m_c[:, None] & m_r[None, :], other=0.0)  # [BC, BR]
        acc = tl.dot(b_t.to(DOT_DTYPE), b_v.to(DOT_DTYPE), acc, input_precision=PRECISION)
    p_o = out_ptr + i_m64[:, None] * stride_om + i_r64[None, :] * stride_or
    tl.store(p_o, (acc * scale).to(out_ptr.dtype.element_ty), mask=m_m[:, None] & m_r[None, :])


@triton.jit
def _moe_gemm_kernel(
    # pointers
    a_ptr,
    b_ptr,
    p_ptr,
    q_ptr,
    bias_ptr,
    offs_ptr,
    c_ptr,
    # sizes
    S,
    N,
    K,
    R,
    E,
    S_BUCKET,
    # strides
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_pm,
    stride_pr,
    stride_qe,
    stride_qr,
    stride_qn,
    stride_biase,
    stride_biasn,
    stride_cm,
    stride_cn,
    # scalars
    lora_scale,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[m, n] = a[m, :] b_e[:, n] + lora_scale * P[m, :] Q_e[:, n] + bias_e[n] for the rows m of expert e, with
    b_e[k, n] at b_ptr + e stride_be + k stride_bk + n stride_bn and Q_e[j, n] at q_ptr + e stride_qe + j stride_qr +
    n stride_qn. Forward: a = x, b_e = W_e^T, P = S, Q_e = B_e^T. dX: a = dY, b_e = W_e, P = dS, Q_e = A_e.
    The grid's row tiles (max_row_tiles) go in grouped order, so GROUP_M row tiles of one expert share W_e's column
    block while it sits in L2; S_BUCKET is the autotuner's key."""
    m_tiles = tl.minimum(tl.cdiv(S, BLOCK_M) + E, S)
    pid_m, pid_n = grouped_tile(tl.program_id(0), m_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
    e, row0, row_end = _expert_tile(offs_ptr, pid_m, E, S, BLOCK_M, BLOCK_E)
    if row0 >= row_end:
        return
    e64 = e.to(tl.int64)
    i_m = row0 + tl.arange(0, BLOCK_M)
    i_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m, m_n = i_m < row_end, i_n < N
    i_m64, i_n64 = i_m.to(tl.int64), i_n.to(tl.int64)

    # the frozen product
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    p_a = a_ptr + i_m64[:, None] * stride_am + tl.arange(0, BLOCK_K)[None, :] * stride_ak
    p_b = b_ptr + e64 * stride_be + tl.arange(0, BLOCK_K)[:, None] * stride_bk + i_n64[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        m_k = tl.arange(0, BLOCK_K) < K - k0
        b_a = tl.load(p_a, mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_b = tl.load(p_b, mask=m_k[:, None] & m_n[None, :], other=0.0)
        acc = tl.dot(b_a.to(DOT_DTYPE), b_b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        p_a += BLOCK_K * stride_ak
        p_b += BLOCK_K * stride_bk

    # the epilogue: the LoRA term in r-wide steps, the expert's bias
    if HAS_LORA:
        for r0 in range(0, R, BLOCK_R):
            i_r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            m_r = i_r < R
            p_p = p_ptr + i_m64[:, None] * stride_pm + i_r[None, :] * stride_pr
            p_q = q_ptr + e64 * stride_qe + i_r[:, None] * stride_qr + i_n64[None, :] * stride_qn
            b_p = tl.load(p_p, mask=m_m[:, None] & m_r[None, :], other=0.0)  # [BM, BR]
            b_q = tl.load(p_q, mask=m_r[:, None] & m_n[None, :], other=0.0)  # [BR, BN]
            b_ps = (b_p.to(tl.float32) * lora_scale).to(DOT_DTYPE)
            acc = tl.dot(b_ps, b_q.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if HAS_BIAS:
        b_bias = tl.load(bias_ptr + e64 * stride_biase + i_n64 * stride_biasn, mask=m_n, other=0.0)
        acc += b_bias.to(tl.float32)[None, :]
    p_c = c_ptr + i_m64[:, None] * stride_cm + i_n64[None, :] * stride_cn
    tl.store(p_c, acc.to(c_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _moe_grad_kernel(
    # pointers
    t_ptr,
    u_ptr,
    offs_ptr,
    out_ptr,
    # sizes
    S,
    C,
    R,
    # strides
    stride_tm,
    stride_tc,
    stride_um,
    stride_ur,
    stride_oe,
    stride_oc,
    stride_or,
    # scalars
    scale,
    # meta-parameters
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out_e[c, j] = scale * sum_{m of expert e} T[m, c] U[m, j], out_e[c, j] at out_ptr + e stride_oe + c stride_oc
    + j stride_or; program (e, c block, rank block) walks its expert's rows in order (dB_e = s dY_e^T S_e into B's
    interleaved columns, dA_e^T = X_e^T dS_e into A's expert-major rows). An expert without rows gets zeros."""
    e = tl.program_id(0)
    start, end = _expert_rows(offs_ptr, e, S)
    i_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    i_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_c, m_r = i_c < C, i_r < R
    i_c64, i_r64 = i_c.to(tl.int64), i_r.to(tl.int64)
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)  # out_e^T's tile: C is the MMA's M side
    for m0 in range(start, end, BLOCK_M):
        i_m = m0 + tl.arange(0, BLOCK_M)
        m_m = i_m < end
        i_m64 = i_m.to(tl.int64)
        b_t = tl.load(t_ptr + i_m64[:, None] * stride_tm + i_c64[None, :] * stride_tc, mask=m_m[:, None] & m_c[None, :],
                      other=0.0)  # fmt: skip
        b_u = tl.load(u_ptr + i_m64[:, None] * stride_um + i_r64[None, :] * stride_ur, mask=m_m[:, None] & m_r[None, :],
                      other=0.0)  # fmt: skip
        acc = tl.dot(tl.trans(b_t.to(DOT_DTYPE)), b_u.to(DOT_DTYPE), acc, input_precision=PRECISION)
    p_o = out_ptr + e.to(tl.int64) * stride_oe + i_c64[:, None] * stride_oc + i_r64[None, :] * stride_or
    tl.store(p_o, (acc * scale).to(out_ptr.dtype.element_ty), mask=m_c[:, None] & m_r[None, :])


# ----------------------------------------------------------------------------------------------------------
# Autotuning
# ----------------------------------------------------------------------------------------------------------

_GEMM_TUNE_KEY = ["S_BUCKET", "N", "K", "R", "E"]
_autotuned_gemm: dict = {}


def _prune_gemm_configs(configs_list, named_args, **kwargs):
    """Drop tiles taller than the average expert's rows or wider than N (they only waste the autotuner's time)."""
    args = {**named_args, **kwargs}
    rows = max(1, args["S"] // max(1, args["E"]))
    kept = [c for c in configs_list if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(rows))]
    kept = [c for c in kept if c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(args["N"]))]
    return kept or configs_list[-1:]


def _gemm_kernel_for(major: int, dtype: torch.dtype):
    """The grouped GEMM autotuned over this generation's tiles (one autotuner per generation and dtype). Every
    config writes all of C and nothing else, so tuning runs leave no trace."""
    key = (major, dtype)
    if key not in _autotuned_gemm:
        _autotuned_gemm[key] = triton.autotune(
            configs=configs.gemm_tiles_as_configs(configs.moe_gemm_config_tuples(major, dtype)),
            key=_GEMM_TUNE_KEY,
            prune_configs_by={"early_config_prune": _prune_gemm_configs},
        )(_moe_gemm_kernel)
    return _autotuned_gemm[key]


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(a // -b)


def max_row_tiles(rows: int, block_m: int, num_experts: int) -> int:
    """The most BLOCK_M-row tiles any routing of ``rows`` rows over ``num_experts`` experts needs (each expert's
    last tile may be partial; no tile is empty)."""
    return min(_cdiv(rows, block_m) + num_experts, rows)


def expert_views(weight, lora_A, lora_B, transposed: bool) -> dict:
    """Per-expert strides (expert, row, column) of each operand as the kernels read it, from the stored tensors:

    - "w_fwd": b_e = W_e^T [K, N], "w_dx": b_e = W_e [N, K] (W [E, N, K], or [E, K, N] when ``transposed``);
    - "a_t": A_e^T [K, r] and "a": A_e [r, K] in A [r E, K] (A_e = A.view(E, r, K)[e]);
    - "b": B_e [N, r] and "b_t": B_e^T [r, N] in B [N, r E] (B_e = B.view(N, r, E)[:, :, e], interleaved).
    """
    w0, w1, w2 = weight.stride()
    out = {"w_fwd": (w0, w1, w2) if transposed else (w0, w2, w1), "w_dx": (w0, w2, w1) if transposed else (w0, w1, w2)}
    if lora_A is not None:
        num_experts = weight.shape[0]
        r = lora_A.shape[0] // num_experts
        a0, a1 = lora_A.stride()
        b0, b1 = lora_B.stride()
        out.update(a_t=(r * a0, a1, a0), a=(r * a0, a0, a1))
        out.update(b=(b1, b0, num_experts * b1), b_t=(b1, num_experts * b1, b0))
    return out


def _down(t, v, v_strides, offsets, rank, scale, out):
    """out [S, r] = scale * T[m] V_e for the rows m of each expert (out's dtype)."""
    S, C = t.shape
    E = offsets.shape[0]
    major = configs.capability(t.device)
    bm, bc, warps, stages = configs.moe_skinny_config(major, "down")
    br = rank_block(rank)
    plans_for(_moe_down_kernel).launch(
        None,
        (max_row_tiles(S, bm, E), _cdiv(rank, br), 1),
        t_ptr=t,
        v_ptr=v,
        offs_ptr=offsets,
        out_ptr=out,
        S=S,
        C=C,
        R=rank,
        E=E,
        stride_tm=t.stride(0),
        stride_tc=t.stride(1),
        stride_ve=v_strides[0],
        stride_vc=v_strides[1],
        stride_vr=v_strides[2],
        stride_om=out.stride(0),
        stride_or=out.stride(1),
        scale=float(scale),
        DOT_DTYPE=dot_dtype(t.dtype),
        PRECISION=input_precision(t.dtype),
        BLOCK_M=bm,
        BLOCK_C=bc,
        BLOCK_R=br,
        BLOCK_E=triton.next_power_of_2(E),
        num_warps=warps,
        num_stages=stages,
    )
    return out


def _grad(t, u, offsets, out, out_strides, features, rank, scale):
    """out_e [C, r] = scale * T_e^T U_e for every expert, written through ``out_strides`` (expert, feature, rank)."""
    S = t.shape[0]
    E = offsets.shape[0]
    major = configs.capability(t.device)
    bm, bc, warps, stages = configs.moe_skinny_config(major, "grad")
    br = rank_block(rank)
    plans_for(_moe_grad_kernel).launch(
        None,
        (E, _cdiv(features, bc), _cdiv(rank, br)),
        t_ptr=t,
        u_ptr=u,
        offs_ptr=offsets,
        out_ptr=out,
        S=S,
        C=features,
        R=rank,
        stride_tm=t.stride(0),
        stride_tc=t.stride(1),
        stride_um=u.stride(0),
        stride_ur=u.stride(1),
        stride_oe=out_strides[0],
        stride_oc=out_strides[1],
        stride_or=out_strides[2],
        scale=float(scale),
        DOT_DTYPE=dot_dtype(t.dtype),
        PRECISION=input_precision(t.dtype),
        BLOCK_M=bm,
        BLOCK_C=bc,
        BLOCK_R=br,
        num_warps=warps,
        num_stages=stages,
    )
    return out


def _gemm(a, weight, b_strides, p, q, q_strides, bias, offsets, c, lora_scale):
    """c [S, N] = a b_e + lora_scale * p Q_e + bias_e over each expert's rows (p None: no LoRA term)."""
    S, K = a.shape
    N = c.shape[1]
    E = offsets.shape[0]
    R = p.shape[1] if p is not None else 0
    has_lora = p is not None and R > 0
    args = dict(
        a_ptr=a,
        b_ptr=weight,
        p_ptr=p if has_lora else c,
        q_ptr=q if has_lora else c,
        bias_ptr=bias if bias is not None else c,
        offs_ptr=offsets,
        c_ptr=c,
        S=S,
        N=N,
        K=K,
        R=R,
        E=E,
        S_BUCKET=1 << max(S - 1, 0).bit_length(),
        stride_am=a.stride(0),
        stride_ak=a.stride(1),
        stride_be=b_strides[0],
        stride_bk=b_strides[1],
        stride_bn=b_strides[2],
        stride_pm=p.stride(0) if has_lora else 0,
        stride_pr=p.stride(1) if has_lora else 0,
        stride_qe=q_strides[0] if has_lora else 0,
        stride_qr=q_strides[1] if has_lora else 0,
        stride_qn=q_strides[2] if has_lora else 0,
        stride_biase=bias.stride(0) if bias is not None else 0,
        stride_biasn=bias.stride(1) if bias is not None else 0,
        stride_cm=c.stride(0),
        stride_cn=c.stride(1),
        lora_scale=float(lora_scale),
        HAS_BIAS=bias is not None,
        HAS_LORA=has_lora,
        DOT_DTYPE=dot_dtype(a.dtype),
        PRECISION=input_precision(a.dtype),
        BLOCK_R=rank_block(max(R, 1)),
        BLOCK_E=triton.next_power_of_2(E),
    )
    if INTERPRET:
        bm, bn, bk, g, _, _ = configs.MOE_GEMM_INTERPRET
        grid = (max_row_tiles(S, bm, E) * _cdiv(N, bn),)
        plans_for(_moe_gemm_kernel).launch(None, grid, **args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g)
        return c
    kernel = _gemm_kernel_for(configs.capability(a.device), a.dtype)
    grid = lambda meta: (max_row_tiles(S, meta["BLOCK_M"], E) * _cdiv(N, meta["BLOCK_N"]),)
    plans_for(kernel).launch(None, grid, **args)
    return c


def lora_experts_fwd(x, weight, bias, lora_A, lora_B, scaling, offsets, transposed):
    """(Y [S, N], S [S, r]) for rows x [S, K] sorted by expert: Y_e = X_e W_e^T + s (X_e A_e^T) B_e^T + bias_e.

    weight [E, N, K] ([E, K, N] when ``transposed``), bias [E, N] or None, lora_A [r E, K] and lora_B [N, r E] in
    PEFT's layout, or both None (no LoRA term; S is then [S, 0]); offsets [E] int32/int64, the cumulative row counts.
    Y in x's dtype, S in x's dtype; two launches (one without LoRA)."""
    rows = x.shape[0]
    num_experts = weight.shape[0]
    n = weight.shape[2] if transposed else weight.shape[1]
    views = expert_views(weight, lora_A, lora_B, transposed)
    y = torch.empty((rows, n), device=x.device, dtype=x.dtype)
    if lora_A is None:
        s = x.new_empty((rows, 0))
        return _gemm(x, weight, views["w_fwd"], None, None, None, bias, offsets, y, 0.0), s
    r = lora_A.shape[0] // num_experts
    s = _down(x, lora_A, views["a_t"], offsets, r, 1.0, torch.empty((rows, r), device=x.device, dtype=x.dtype))
    _gemm(x, weight, views["w_fwd"], s, lora_B, views["b_t"], bias, offsets, y, scaling)
    return y, s


def lora_experts_bwd(dy, x, s, weight, lora_A, lora_B, scaling, offsets, transposed, need_dx=True):
    """(dX [S, K] or None, dA [r E, K] or None, dB [N, r E] or None) for dY [S, N] (no LoRA: dX only).

    dS = s dY_e B_e; dB_e = s dY_e^T S_e; dX = dY_e W_e + dS_e A_e; dA_e = dS_e^T X_e. dX in dY's dtype, dA and dB
    in the adapters' dtypes, each written once (an expert without rows gets zero gradients). Four launches."""
    rows, k = x.shape
    n = dy.shape[1]
    num_experts = weight.shape[0]
    views = expert_views(weight, lora_A, lora_B, transposed)
    dx = torch.empty((rows, k), device=dy.device, dtype=dy.dtype) if need_dx else None
    if lora_A is None:
        if need_dx:
            _gemm(dy, weight, views["w_dx"], None, None, None, None, offsets, dx, 0.0)
        return dx, None, None
    r = lora_A.shape[0] // num_experts
    ds = _down(dy, lora_B, views["b"], offsets, r, scaling, torch.empty((rows, r), device=dy.device, dtype=dy.dtype))
    db = torch.empty(lora_B.shape, device=dy.device, dtype=lora_B.dtype)
    _grad(dy, s, offsets, db, (db.stride(1), db.stride(0), num_experts * db.stride(1)), n, r, scaling)
    if need_dx:
        _gemm(dy, weight, views["w_dx"], ds, lora_A, views["a"], None, offsets, dx, 1.0)
    da = torch.empty(lora_A.shape, device=dy.device, dtype=lora_A.dtype)
    _grad(x, ds, offsets, da, (r * da.stride(0), da.stride(1), da.stride(0)), k, r, 1.0)
    return dx, da, db
