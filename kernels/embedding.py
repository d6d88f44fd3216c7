"""LoRA embedding: forward in one kernel, backward in one pass over dY plus small finishing passes.

idx [M] (token positions flattened), W [V, D] frozen, A [r, V], B [D, r], s the scaling; Sa = A[:, idx]^T [M, r].

    Y  = W[idx] + s * Sa B^T                  one kernel: gather the base row and the rank-r row, one rounding
    dS = s * dY B                             [M, r]
    dB = s * dY^T Sa                          [D, r]   (a reduction over tokens)
    dA[:, idx[m]] += dS[m]                    scatter-add; repeated indices add up; padding_idx gets nothing

Backward reads dY once. dS needs a reduction over D and dB one over M, so the pass over dY is split into
programs that each own a [rows, BLOCK_D] strip of dY: a program keeps its [BLOCK_D, r] share of dB in registers
while it walks its rows, and writes its [rows, r] share of dS per D-strip. The two small partial buffers
(d_splits x M x r and m_splits x D x r floats) are then summed in a fixed order, so dS and dB are bitwise
reproducible. The scatter into dA is the only step where order can vary:

- default: fp32 atomic adds of dS rows into dA's columns (order-dependent in the last bits);
- deterministic (``torch.are_deterministic_algorithms_enabled()``): indices sorted (stable), then each
  program sums runs of equal indices with a segmented scan in a fixed order and writes each column of dA once.
  A run longer than a block is summed by the block holding its end, which walks the run's earlier blocks.

Every index is checked against [0, V) on the device before any kernel runs (one reduction, one host sync); the
kernels also mask out-of-range rows, so no input can make them read or write out of bounds.
Offsets that scale with V, D or M are computed in int64 (V * D passes 2^31 for large vocabularies).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import (
    capability,
    dot_dtype,
    embedding_config,
    embedding_shipped_configs,
    input_precision,
    num_programs_target,
    rank_block,
)

__all__ = ["check_indices", "lora_embedding_fwd", "lora_embedding_bwd"]

_INDEX_DTYPES = (torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _emb_fwd_kernel(
    # pointers
    idx_ptr,
    w_ptr,
    a_ptr,
    b_ptr,
    y_ptr,
    # sizes
    M,
    D,
    R,
    V,
    COLS_PER_PROGRAM,
    # strides
    stride_wv,
    stride_wd,
    stride_ar,
    stride_av,
    stride_bd,
    stride_br,
    stride_ym,
    stride_yd,
    # scalars
    scaling,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    RANK_CHUNKS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Y[m, d] = W[idx[m], d] + s * sum_k A[k, idx[m]] B[d, k] for BLOCK_M tokens and COLS_PER_PROGRAM columns,
    walked BLOCK_D at a time. The rank-r rows A[:, idx] are gathered once per program (one scattered load per
    element, so not once per column tile)."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    i_v = tl.load(idx_ptr + o_m, mask=m_m, other=0).to(tl.int64)
    m_v = m_m & (i_v >= 0) & (i_v < V)
    i_v = tl.where(m_v, i_v, 0)
    o_r = tl.arange(0, BLOCK_R)
    p_sa = a_ptr + o_r[None, :].to(tl.int64) * stride_ar + i_v[:, None] * stride_av  # [BLOCK_M, BLOCK_R]
    b_sa = tl.load(p_sa, mask=m_v[:, None] & (o_r < R)[None, :], other=0.0).to(DOT_DTYPE)
    p_w = w_ptr + i_v[:, None] * stride_wv  # [BLOCK_M, 1] row starts
    p_y = y_ptr + o_m[:, None].to(tl.int64) * stride_ym

    col_start = pid_d.to(tl.int64) * COLS_PER_PROGRAM
    col_end = tl.minimum(col_start + COLS_PER_PROGRAM, D)
    for d0 in range(col_start, col_end, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < col_end
        # s * Sa B^T in fp32; ranks above one tile (r > 64) add further chunks
        p_bt = b_ptr + o_d[None, :].to(tl.int64) * stride_bd + o_r[:, None] * stride_br  # [BLOCK_R, BLOCK_D]
        b_bt = tl.load(p_bt, mask=(o_r < R)[:, None] & m_d[None, :], other=0.0).to(DOT_DTYPE)
        b_acc = tl.dot(b_sa, b_bt, input_precision=INPUT_PRECISION)
        for c in tl.static_range(1, RANK_CHUNKS):
            o_rc = c * BLOCK_R + tl.arange(0, BLOCK_R)
            p_sac = a_ptr + o_rc[None, :].to(tl.int64) * stride_ar + i_v[:, None] * stride_av
            b_sac = tl.load(p_sac, mask=m_v[:, None] & (o_rc < R)[None, :], other=0.0).to(DOT_DTYPE)
            p_btc = b_ptr + o_d[None, :].to(tl.int64) * stride_bd + o_rc[:, None] * stride_br
            b_btc = tl.load(p_btc, mask=(o_rc < R)[:, None] & m_d[None, :], other=0.0).to(DOT_DTYPE)
            b_acc = tl.dot(b_sac, b_btc, b_acc, input_precision=INPUT_PRECISION)
        # base row added in fp32: Y is rounded once
        b_w = tl.load(p_w + o_d[None, :].to(tl.int64) * stride_wd, mask=m_v[:, None] & m_d[None, :], other=0.0)
        b_y = b_w.to(tl.float32) + scaling * b_acc
        p_yd = p_y + o_d[None, :].to(tl.int64) * stride_yd
        tl.store(p_yd, b_y.to(y_ptr.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])


@triton.jit
def _emb_bwd_dy_kernel(
    # pointers
    dy_ptr,
    idx_ptr,
    a_ptr,
    b_ptr,
    ds_part_ptr,
    db_part_ptr,
    # sizes
    M,
    D,
    R,
    V,
    ROWS_PER_PROGRAM,
    # strides
    stride_dym,
    stride_dyd,
    stride_ar,
    stride_av,
    stride_bd,
    stride_br,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One pass over dY. Program (i, j, c) owns rows [i * ROWS_PER_PROGRAM, +ROWS_PER_PROGRAM), columns
    [j * BLOCK_D, +BLOCK_D) and rank chunk c; it writes ds_part[j, rows, c] = dY[rows, cols] B[cols, c]
    and db_part[i, cols, c] = dY[rows, cols]^T Sa[rows, c] (unscaled partial sums, fp32)."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_r = tl.program_id(2)
    o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_d = o_d < D
    m_r = o_r < R
    p_b = b_ptr + o_d[:, None].to(tl.int64) * stride_bd + o_r[None, :].to(tl.int64) * stride_br  # [BLOCK_D, BLOCK_R]
    b_b = tl.load(p_b, mask=m_d[:, None] & m_r[None, :], other=0.0).to(DOT_DTYPE)
    b_db = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)

    row_start = pid_m.to(tl.int64) * ROWS_PER_PROGRAM
    row_end = tl.minimum(row_start + ROWS_PER_PROGRAM, M)
    ds_base = ds_part_ptr + pid_d.to(tl.int64) * M * R
    for m0 in range(row_start, row_end, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < row_end
        i_v = tl.load(idx_ptr + o_m, mask=m_m, other=0).to(tl.int64)
        m_v = m_m & (i_v >= 0) & (i_v < V)
        i_v = tl.where(m_v, i_v, 0)
        p_sa = a_ptr + o_r[None, :].to(tl.int64) * stride_ar + i_v[:, None] * stride_av  # [BLOCK_M, BLOCK_R]
        b_sa = tl.load(p_sa, mask=m_v[:, None] & m_r[None, :], other=0.0).to(DOT_DTYPE)
        p_dy = dy_ptr + o_m[:, None].to(tl.int64) * stride_dym + o_d[None, :].to(tl.int64) * stride_dyd
        b_dy = tl.load(p_dy, mask=m_m[:, None] & m_d[None, :], other=0.0).to(DOT_DTYPE)  # [BLOCK_M, BLOCK_D]

        b_ds = tl.dot(b_dy, b_b, input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_R]
        p_ds = ds_base + o_m[:, None].to(tl.int64) * R + o_r[None, :]
        tl.store(p_ds, b_ds, mask=m_m[:, None] & m_r[None, :])
        b_db = tl.dot(tl.trans(b_dy), b_sa, b_db, input_precision=INPUT_PRECISION)

    p_db = db_part_ptr + pid_m.to(tl.int64) * D * R + o_d[:, None].to(tl.int64) * R + o_r[None, :]
    tl.store(p_db, b_db, mask=m_d[:, None] & m_r[None, :])


@triton.jit
def _emb_bwd_scatter_kernel(
    # pointers
    idx_ptr,
    ds_part_ptr,
    da_ptr,
    # sizes
    M,
    R,
    V,
    N_PARTS,
    padding_idx,
    # strides
    stride_dar,
    stride_dav,
    # scalars
    scaling,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    RANK_CHUNKS: tl.constexpr,
):
    """dA[:, idx[m]] += s * sum_j ds_part[j, m] with fp32 atomics (the default, order-dependent scatter)."""
    pid = tl.program_id(0)
    o_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    i_v = tl.load(idx_ptr + o_m, mask=m_m, other=0).to(tl.int64)
    m_keep = m_m & (i_v >= 0) & (i_v < V) & (i_v != padding_idx)
    i_v = tl.where(m_keep, i_v, 0)
    for c in tl.static_range(RANK_CHUNKS):
        o_r = c * BLOCK_R + tl.arange(0, BLOCK_R)
        m_r = o_r < R
        p_ds = ds_part_ptr + o_m[:, None].to(tl.int64) * R + o_r[None, :]
        b_g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for j in range(0, N_PARTS):
            b_g += tl.load(p_ds + tl.cast(j, tl.int64) * M * R, mask=m_m[:, None] & m_r[None, :], other=0.0)
        p_da = da_ptr + o_r[None, :].to(tl.int64) * stride_dar + i_v[:, None] * stride_dav
        tl.atomic_add(p_da, scaling * b_g, mask=m_keep[:, None] & m_r[None, :])


@triton.jit
def _segment_add(a, a_start, b, b_start):
    # segmented sum: a run restarts where b begins a new segment
    return tl.where(b_start != 0, b, a + b), a_start | b_start


@triton.jit
def _emb_bwd_segment_kernel(
    # pointers
    sorted_ptr,
    perm_ptr,
    head_ptr,
    ds_part_ptr,
    da_ptr,
    # sizes
    M,
    R,
    V,
    N_PARTS,
    padding_idx,
    # strides
    stride_dar,
    stride_dav,
    # scalars
    scaling,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    RANK_CHUNKS: tl.constexpr,
):
    """Deterministic scatter. Over sorted positions p (sorted_ptr[p] = idx[perm[p]], a stable sort), each run of
    equal indices v is summed in a fixed order (segmented scan within a block, plus the earlier blocks' part of a
    run that starts before this block: head_ptr[b] is where the run holding block b's first position begins) and
    dA[:, v] is written once, by the block holding the run's end."""
    pid = tl.program_id(0)
    start = pid * BLOCK_M
    o_p = start + tl.arange(0, BLOCK_M)
    m_p = o_p < M
    b_key = tl.load(sorted_ptr + o_p, mask=m_p, other=-1).to(tl.int64)
    b_prev = tl.load(sorted_ptr + o_p - 1, mask=m_p & (o_p > 0), other=-1).to(tl.int64)
    b_next = tl.load(sorted_ptr + o_p + 1, mask=(o_p + 1) < M, other=-1).to(tl.int64)
    b_row = tl.load(perm_ptr + o_p, mask=m_p, other=0).to(tl.int64)
    b_start = ((o_p == start) | (b_key != b_prev)).to(tl.int32)
    m_end = m_p & (b_key != b_next)
    m_write = m_end & (b_key >= 0) & (b_key < V) & (b_key != padding_idx)

    # does the block's first run begin in an earlier block and end in this one? then its head is summed here
    first_key = tl.load(sorted_ptr + start).to(tl.int64)
    first_ends_here = tl.sum((m_end & (b_key == first_key)).to(tl.int32), axis=0) > 0
    head_start = tl.load(head_ptr + pid)
    need_head = first_ends_here & (first_key != padding_idx)
    head_block = tl.where(need_head, head_start - head_start % BLOCK_M, start)
    m_first = b_key == first_key

    i_key = tl.where(m_write, b_key, 0)
    for c in tl.static_range(RANK_CHUNKS):
        o_r = c * BLOCK_R + tl.arange(0, BLOCK_R)
        m_r = o_r < R
        p_ds = ds_part_ptr + b_row[:, None] * R + o_r[None, :]
        b_g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for j in range(0, N_PARTS):
            b_g += tl.load(p_ds + j * M * R, mask=m_p[:, None] & m_r[None, :], other=0.0)
        b_seg, _ = tl.associative_scan((b_g, tl.broadcast_to(b_start[:, None], (BLOCK_M, BLOCK_R))), 0, _segment_add)

        # head of the first run: its part in earlier blocks, block by block in order
        b_head = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for q in range(head_block, start, BLOCK_M):
            o_q = q + tl.arange(0, BLOCK_M)
            m_q = tl.load(sorted_ptr + o_q).to(tl.int64) == first_key
            q_row = tl.load(perm_ptr + o_q).to(tl.int64)
            p_q = ds_part_ptr + q_row[:, None] * R + o_r[None, :]
            b_q = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for j in range(0, N_PARTS):
                b_q += tl.load(p_q + j * M * R, mask=m_q[:, None] & m_r[None, :], other=0.0)
            b_head += tl.sum(b_q, axis=0)

        b_tot = b_seg + tl.where(m_first[:, None], b_head[None, :], 0.0)
        p_da = da_ptr + o_r[None, :].to(tl.int64) * stride_dar + i_key[:, None] * stride_dav
        tl.store(p_da, (scaling * b_tot).to(da_ptr.dtype.element_ty), mask=m_write[:, None] & m_r[None, :])


@triton.jit
def _emb_bwd_reduce_kernel(
    # pointers
    part_ptr,
    out_ptr,
    # sizes
    N_ELEM,
    N_PARTS,
    # scalars
    scaling,
    # meta-parameters
    BLOCK_M: tl.constexpr,
):
    """out[e] = s * sum_j part[j, e], in a fixed order, rounded once to out's dtype."""
    pid = tl.program_id(0)
    o_e = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_e = o_e < N_ELEM
    b_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j in range(0, N_PARTS):
        b_acc += tl.load(part_ptr + tl.cast(j, tl.int64) * N_ELEM + o_e, mask=m_e, other=0.0)
    tl.store(out_ptr + o_e, (scaling * b_acc).to(out_ptr.dtype.element_ty), mask=m_e)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def check_indices(idx: torch.Tensor, num_embeddings: int) -> None:
    """Raise ValueError unless every index is in [0, num_embeddings). Min and max are taken on idx's device."""
    if idx.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(idx.reshape(-1))).tolist()
    if lo < 0 or hi >= num_embeddings:
        raise ValueError(
            f"idx: embedding indices must be in [0, {num_embeddings}) for num_embeddings={num_embeddings}, "
            f"got indices from {lo} to {hi}"
        )


def _check_operands(idx, lora_A, lora_B, num_embeddings, dim):
    if not isinstance(idx, torch.Tensor) or idx.dtype not in _INDEX_DTYPES or idx.dim() != 1:
        what = f"{idx.dtype} of shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise TypeError(f"idx must be a 1-D int32 or int64 tensor, got {what}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype not in _FLOAT_DTYPES or t.dim() != 2:
            raise TypeError(f"{name} must be a 2-D float16, bfloat16 or float32 tensor, got {t.dtype} {tuple(t.shape)}")
    r = lora_A.shape[0]
    if tuple(lora_A.shape) != (r, num_embeddings) or tuple(lora_B.shape) != (dim, r):
        raise ValueError(
            f"lora_A must be [r, {num_embeddings}] and lora_B [{dim}, r]; got {tuple(lora_A.shape)} "
            f"and {tuple(lora_B.shape)}"
        )
    devices = {t.device for t in (idx, lora_A, lora_B)}
    if len(devices) > 1:
        raise ValueError(f"idx, lora_A and lora_B must be on one device, got {sorted(map(str, devices))}")


def lora_embedding_fwd(idx, weight, lora_A, lora_B, scaling, out_dtype=None):
    """Y = W[idx] + s * A[:, idx]^T B^T.

    idx [M] int32/int64, weight [V, D], lora_A [r, V], lora_B [D, r]; Y [M, D] in out_dtype (weight's dtype if
    None; the base row is converted in the kernel, so autocast never copies the table). The LoRA product runs in
    Y's dtype with fp32 accumulation.
    """
    if weight.dtype not in _FLOAT_DTYPES or weight.dim() != 2:
        raise TypeError(f"weight must be a 2-D float tensor [V, D], got {weight.dtype} {tuple(weight.shape)}")
    num_embeddings, dim = weight.shape
    _check_operands(idx, lora_A, lora_B, num_embeddings, dim)
    if weight.device != idx.device:
        raise ValueError(f"idx and weight must be on one device, got {idx.device} and {weight.device}")
    out_dtype = weight.dtype if out_dtype is None else out_dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    check_indices(idx, num_embeddings)

    idx = idx.contiguous()
    m, r = idx.shape[0], lora_A.shape[0]
    y = torch.empty((m, dim), dtype=out_dtype, device=idx.device)
    if m == 0:
        return y
    r_block = rank_block(r)
    cfg = embedding_config("fwd", capability(idx.device), out_dtype, r_block)
    # as few column splits as fill the device: each split gathers the rank-r rows again
    m_blocks, d_tiles = triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(dim, cfg["BLOCK_D"])
    d_splits = max(1, min(d_tiles, triton.cdiv(num_programs_target(idx.device), m_blocks)))
    cols_per_program = triton.cdiv(d_tiles, d_splits) * cfg["BLOCK_D"]
    _emb_fwd_kernel[(m_blocks, triton.cdiv(dim, cols_per_program))](
        idx_ptr=idx,
        w_ptr=weight,
        a_ptr=lora_A,
        b_ptr=lora_B,
        y_ptr=y,
        M=m,
        D=dim,
        R=r,
        V=num_embeddings,
        COLS_PER_PROGRAM=cols_per_program,
        stride_wv=weight.stride(0),
        stride_wd=weight.stride(1),
        stride_ar=lora_A.stride(0),
        stride_av=lora_A.stride(1),
        stride_bd=lora_B.stride(0),
        stride_br=lora_B.stride(1),
        stride_ym=y.stride(0),
        stride_yd=y.stride(1),
        scaling=float(scaling),
        BLOCK_R=r_block,
        RANK_CHUNKS=triton.cdiv(r, r_block),
        DOT_DTYPE=dot_dtype(out_dtype),
        INPUT_PRECISION=input_precision(out_dtype),
        **cfg,
    )
    return y


def lora_embedding_bwd(dy, idx, lora_A, lora_B, scaling, padding_idx=None, deterministic=None, check=True):
    """(dA [r, V], dB [D, r]) for Y = W[idx] + s * A[:, idx]^T B^T, given dY [M, D].

    dB = s * dY^T A[:, idx]^T; dA[:, idx] += s * (dY B)^T, repeated indices adding up and the padding_idx column
    getting nothing. deterministic (default: torch.are_deterministic_algorithms_enabled()) makes dA bitwise
    reproducible; dB is always. check=False skips the index range check, for callers that ran it on this very
    idx already (the forward did). dA and dB come in lora_A's and lora_B's dtypes.
    """
    if not isinstance(dy, torch.Tensor) or dy.dtype not in _FLOAT_DTYPES or dy.dim() != 2:
        raise TypeError("dy must be a 2-D float16, bfloat16 or float32 tensor [M, D]")
    m, dim = dy.shape
    num_embeddings = lora_A.shape[-1]
    _check_operands(idx, lora_A, lora_B, num_embeddings, dim)
    if idx.shape[0] != m or dy.device != idx.device:
        raise ValueError(f"dy must be [{idx.shape[0]}, {dim}] on {idx.device}, got {tuple(dy.shape)} on {dy.device}")
    if padding_idx is not None and not 0 <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx must be None or in [0, {num_embeddings}), got {padding_idx}")
    if check:
        check_indices(idx, num_embeddings)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()

    device, r = dy.device, lora_A.shape[0]
    if m == 0:
        return torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    idx = idx.contiguous()
    major, r_block = capability(device), rank_block(r)
    r_chunks = triton.cdiv(r, r_block)
    pad = -1 if padding_idx is None else int(padding_idx)
    scaling = float(scaling)

    # the pass over dY: a grid of row strips x column strips x rank chunks, sized to fill the device
    cfg = embedding_config("bwd_dy", major, dy.dtype, r_block)
    m_blocks, d_splits = triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(dim, cfg["BLOCK_D"])
    m_splits = max(1, min(m_blocks, triton.cdiv(num_programs_target(device), d_splits * r_chunks)))
    rows_per_program = triton.cdiv(m_blocks, m_splits) * cfg["BLOCK_M"]
    m_splits = triton.cdiv(m, rows_per_program)
    ds_part = torch.empty((d_splits, m, r), dtype=torch.float32, device=device)
    db_part = torch.empty((m_splits, dim, r), dtype=torch.float32, device=device)
    _emb_bwd_dy_kernel[(m_splits, d_splits, r_chunks)](
        dy_ptr=dy,
        idx_ptr=idx,
        a_ptr=lora_A,
        b_ptr=lora_B,
        ds_part_ptr=ds_part,
        db_part_ptr=db_part,
        M=m,
        D=dim,
        R=r,
        V=num_embeddings,
        ROWS_PER_PROGRAM=rows_per_program,
        stride_dym=dy.stride(0),
        stride_dyd=dy.stride(1),
        stride_ar=lora_A.stride(0),
        stride_av=lora_A.stride(1),
        stride_bd=lora_B.stride(0),
        stride_br=lora_B.stride(1),
        BLOCK_R=r_block,
        DOT_DTYPE=dot_dtype(dy.dtype),
        INPUT_PRECISION=input_precision(dy.dtype),
        **cfg,
    )

    # dB: the row-strip partials summed in order, scaled, rounded once
    db = torch.empty((dim, r), dtype=lora_B.dtype, device=device)
    cfg = embedding_config("bwd_reduce", major, lora_B.dtype, r_block)
    _emb_bwd_reduce_kernel[(triton.cdiv(dim * r, cfg["BLOCK_M"]),)](
        part_ptr=db_part, out_ptr=db, N_ELEM=dim * r, N_PARTS=m_splits, scaling=scaling, **cfg
    )

    # dA: scatter of dS = s * (sum of the column-strip partials)
    if deterministic:
        sorted_idx, perm = torch.sort(idx, stable=True)
        cfg = embedding_config("bwd_segment", major, lora_A.dtype, r_block)
        head = torch.searchsorted(sorted_idx, sorted_idx[:: cfg["BLOCK_M"]].contiguous())  # run start per block
        da = torch.zeros((r, num_embeddings), dtype=lora_A.dtype, device=device)
        _emb_bwd_segment_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
            sorted_ptr=sorted_idx,
            perm_ptr=perm,
            head_ptr=head,
            ds_part_ptr=ds_part,
            da_ptr=da,
            M=m,
            R=r,
            V=num_embeddings,
            N_PARTS=d_splits,
            padding_idx=pad,
            stride_dar=da.stride(0),
            stride_dav=da.stride(1),
            scaling=scaling,
            BLOCK_R=r_block,
            RANK_CHUNKS=r_chunks,
            **cfg,
        )
        return da, db
    da32 = torch.zeros((r, num_embeddings), dtype=torch.float32, device=device)
    cfg = embedding_config("bwd_scatter", major, torch.float32, r_block)
    _emb_bwd_scatter_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
        idx_ptr=idx,
        ds_part_ptr=ds_part,
        da_ptr=da32,
        M=m,
        R=r,
        V=num_embeddings,
        N_PARTS=d_splits,
        padding_idx=pad,
        stride_dar=da32.stride(0),
        stride_dav=da32.stride(1),
        scaling=scaling,
        BLOCK_R=r_block,
        RANK_CHUNKS=r_chunks,
        **cfg,
    )
    return da32.to(lora_A.dtype), db


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases
# ----------------------------------------------------------------------------------------------------------

# Argument values of a representative call (the target shape: V=128256, D=4096, 8192 tokens, contiguous tensors).
# Triton specialises integers equal to 1 as constants and marks multiples of 16 as such; aot_cases does the same,
# so tests/aot.py builds the very kernels a GPU run builds for this shape.
_AOT_SIZES = {"M": 8192, "D": 4096, "V": 128256, "COLS_PER_PROGRAM": 1024, "ROWS_PER_PROGRAM": 256}
_AOT_SIZES.update(stride_wv=4096, stride_wd=1, stride_ym=4096, stride_yd=1, stride_dym=4096, stride_dyd=1)
_AOT_SIZES.update(stride_ar=128256, stride_av=1, stride_br=1, stride_dar=128256, stride_dav=1)
_AOT_SIZES.update(N_PARTS=16, padding_idx=-1)
# Pointers whose type does not follow the table's dtype: indices, and the float32 partial sums.
_AOT_POINTERS = {"idx_ptr": "*i64", "sorted_ptr": "*i64", "perm_ptr": "*i64", "head_ptr": "*i64"}
_AOT_POINTERS.update(ds_part_ptr="*fp32", db_part_ptr="*fp32", part_ptr="*fp32")


def aot_cases():
    """Compile cases for tests/aot.py: every (kind, target, dtype, rank tile) config the launchers can pick,
    specialised as a launch at the representative shape above. The rank-r products (fwd, bwd_dy) must run on
    tensor cores."""
    kernels = {
        "fwd": _emb_fwd_kernel,
        "bwd_dy": _emb_bwd_dy_kernel,
        "bwd_scatter": _emb_bwd_scatter_kernel,
        "bwd_segment": _emb_bwd_segment_kernel,
        "bwd_reduce": _emb_bwd_reduce_kernel,
    }
    types = {
        torch.float16: ("fp16", tl.float16),
        torch.bfloat16: ("bf16", tl.bfloat16),
        torch.float32: ("fp32", tl.float32),
    }
    cases = []
    for kind, major, dtype, r_block, cfg in embedding_shipped_configs():
        kernel = kernels[kind]
        t, tl_dtype = types[dtype]
        constexprs = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        constexprs.update(BLOCK_R=r_block, RANK_CHUNKS=1, DOT_DTYPE=tl_dtype)
        constexprs["INPUT_PRECISION"] = "tf32" if dtype == torch.float32 else "ieee"
        sizes = {**_AOT_SIZES, "R": r_block, "stride_bd": r_block, "N_ELEM": 4096 * r_block}
        signature, divisible = {}, []
        for name in kernel.arg_names:
            if name in constexprs:
                continue
            if sizes.get(name) == 1:
                constexprs[name] = 1
            elif name.endswith("_ptr"):
                signature[name] = _AOT_POINTERS.get(name, f"*{t}")
                divisible.append(name)
            elif name == "scaling":
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
                if sizes[name] % 16 == 0:
                    divisible.append(name)
        cases.append(
            {
                "id": f"emb-{kind}-{t}-R{r_block}",
                "major": major,
                "kernel": kernel,
                "signature": signature,
                "constexprs": {k: v for k, v in constexprs.items() if k in kernel.arg_names},
                "divisible": divisible,
                "num_warps": cfg["num_warps"],
                "num_stages": cfg.get("num_stages", 1),
                "expects_mma": kind in ("fwd", "bwd_dy"),
            }
        )
    return cases
