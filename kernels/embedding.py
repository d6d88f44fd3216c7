"""LoRA embedding: forward in one kernel, backward in one pass over dY.

idx [M] (token positions flattened), W [V, D] frozen, A [r, V], B [D, r], s the scaling; Sa = A[:, idx]^T [M, r].

    Y  = W[idx] + s * Sa B^T                  one kernel: gather the base row and the rank-r row, one rounding
    dS = s * dY B                             [M, r]
    dB = s * dY^T Sa                          [D, r]   (a reduction over tokens)
    dA[:, idx[m]] += dS[m]                    scatter-add; repeated indices add up; padding_idx gets nothing

Backward reads dY once, in programs that each own a [rows, BLOCK_D] strip of dY and keep their [BLOCK_D, r] share
of dB in registers while they walk their rows. dS needs a reduction over D and dB one over M:

- default: each program adds its share of s * dS straight into dA's columns and its share of s * dB into dB, with
  fp32 atomics into one zeroed workspace, and one finishing kernel writes dA and dB in their dtypes. Three launches
  (the memset, the pass, the finish) whatever M is; the order of the atomic adds, and so the last bits of dA and
  dB, can vary from run to run.
- deterministic (``torch.are_deterministic_algorithms_enabled()``): the programs write fp32 partial sums
  (d_splits x M x r for dS, m_splits x D x r for dB) that are summed in a fixed order: dB by a reduction kernel,
  dA by sorting the indices (stable) and summing runs of equal indices with a segmented scan, each column of dA
  written once. A run longer than a block is summed by the block holding its end, which walks the run's earlier
  blocks. dA and dB are then bitwise reproducible.

Indices out of [0, V) never reach memory: every kernel masks them. They are reported without a device-to-host
sync: the kernel that reads idx clears a one-element flag (cached per device, 1 while every index seen was valid)
when it sees one, and the launcher raises from the flag:

- on CUDA, ``torch._assert_async`` on the flag, queued right after the kernel: the error surfaces as a CUDA
  "device-side assert triggered" RuntimeError at the next call that waits for the device (``.item()``, a copy
  to the host, ``torch.cuda.synchronize()``), as torch's own embedding does; like any device-side assert it ends
  the CUDA context. The output of the failing call is never read before that point by anything on the host.
- on CPU (the Triton interpreter), the flag is host memory: the launcher reads it after the kernel and raises a
  ValueError naming idx and the range before it returns anything.

Debug switch: ``FASTLORA_SYNC_CHECKS=1`` in the environment (read at import; the module attribute SYNC_CHECKS)
checks the range up front with one reduction and one host sync per call and raises the ValueError before any
kernel runs, on CUDA too.

Offsets that scale with V, D or M are computed in int64 (V * D passes 2^31 for large vocabularies).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from fastlora.kernels.configs import (
    capability,
    dot_dtype,
    embedding_config,
    input_precision,
    num_programs_target,
    rank_block,
)
from fastlora.kernels.launch import plans_for

__all__ = ["SYNC_CHECKS", "check_indices", "lora_embedding_fwd", "lora_embedding_bwd"]

SYNC_CHECKS = os.environ.get("FASTLORA_SYNC_CHECKS", "0") == "1"

_INDEX_DTYPES = (torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _load_indices(idx_ptr, flag_ptr, i_m, m_m, V):
    """(i_v, m_v): the vocabulary rows of tokens i_m (0 where masked) and which are in [0, V). Clears the flag
    (flag_ptr[0] = 0) if a token in m_m holds an index outside [0, V)."""
    i_v = tl.load(idx_ptr + i_m, mask=m_m, other=0).to(tl.int64)
    m_v = m_m & (i_v >= 0) & (i_v < V)
    bad = (m_m & ~m_v).to(tl.int32)
    tl.store(flag_ptr, 0, mask=tl.max(bad, axis=0) > 0)
    return tl.where(m_v, i_v, 0), m_v


@triton.jit
def _gather_rank_rows(a_ptr, i_v, m_v, i_r, R, stride_ar, stride_av):
    """[BLOCK_M, BLOCK_R] block of Sa = A[i_r, i_v]^T (0 for masked tokens and ranks past R)."""
    p_sa = a_ptr + i_r[None, :].to(tl.int64) * stride_ar + i_v[:, None] * stride_av
    return tl.load(p_sa, mask=m_v[:, None] & (i_r < R)[None, :], other=0.0)


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
    flag_ptr,
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
    i_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = i_m < M
    i_v, m_v = _load_indices(idx_ptr, flag_ptr, i_m, m_m, V)
    i_r = tl.arange(0, BLOCK_R)
    b_sa = _gather_rank_rows(a_ptr, i_v, m_v, i_r, R, stride_ar, stride_av).to(DOT_DTYPE)
    p_w = w_ptr + i_v[:, None] * stride_wv  # [BLOCK_M, 1] row starts
    p_y = y_ptr + i_m[:, None].to(tl.int64) * stride_ym

    col_start = pid_d.to(tl.int64) * COLS_PER_PROGRAM
    col_end = tl.minimum(col_start + COLS_PER_PROGRAM, D)
    for d0 in range(col_start, col_end, BLOCK_D):
        i_d = d0 + tl.arange(0, BLOCK_D)
        m_d = i_d < col_end
        # s * Sa B^T in fp32; ranks above one tile (r > 64) add further chunks
        p_bt = b_ptr + i_d[None, :].to(tl.int64) * stride_bd + i_r[:, None] * stride_br  # [BLOCK_R, BLOCK_D]
        b_bt = tl.load(p_bt, mask=(i_r < R)[:, None] & m_d[None, :], other=0.0).to(DOT_DTYPE)
        b_acc = tl.dot(b_sa, b_bt, input_precision=INPUT_PRECISION)
        for c in tl.static_range(1, RANK_CHUNKS):
            i_rc = c * BLOCK_R + tl.arange(0, BLOCK_R)
            b_sac = _gather_rank_rows(a_ptr, i_v, m_v, i_rc, R, stride_ar, stride_av).to(DOT_DTYPE)
            p_btc = b_ptr + i_d[None, :].to(tl.int64) * stride_bd + i_rc[:, None] * stride_br
            b_btc = tl.load(p_btc, mask=(i_rc < R)[:, None] & m_d[None, :], other=0.0).to(DOT_DTYPE)
            b_acc = tl.dot(b_sac, b_btc, b_acc, input_precision=INPUT_PRECISION)
        # base row added in fp32: Y is rounded once
        b_w = tl.load(p_w + i_d[None, :].to(tl.int64) * stride_wd, mask=m_v[:, None] & m_d[None, :], other=0.0)
        b_y = b_w.to(tl.float32) + scaling * b_acc
        p_yd = p_y + i_d[None, :].to(tl.int64) * stride_yd
        tl.store(p_yd, b_y.to(y_ptr.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])


@triton.jit
def _emb_bwd_dy_kernel(
    # pointers
    dy_ptr,
    idx_ptr,
    a_ptr,
    b_ptr,
    ds_ptr,
    db_ptr,
    flag_ptr,
    # sizes
    M,
    D,
    R,
    V,
    ROWS_PER_PROGRAM,
    padding_idx,
    # strides
    stride_dym,
    stride_dyd,
    stride_ar,
    stride_av,
    stride_bd,
    stride_br,
    # scalars
    scaling,
    # meta-parameters
    ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One pass over dY. Program (i, j, c) owns rows [i * ROWS_PER_PROGRAM, +ROWS_PER_PROGRAM), columns
    [j * BLOCK_D, +BLOCK_D) and rank chunk c, and computes P = dY[rows, cols] B[cols, c] and
    Q = dY[rows, cols]^T Sa[rows, c].

    ATOMIC: ds_ptr is dA [R, V] and db_ptr dB [D, R] (fp32, contiguous, zeroed): s * P is added into the dA
    columns of the rows' indices (not padding_idx) and s * Q into dB. Otherwise the unscaled fp32 partials
    are stored: ds_ptr[j, rows, c] = P ([d_splits, M, R]) and db_ptr[i, cols, c] = Q ([m_splits, D, R])."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_r = tl.program_id(2)
    i_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    i_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_d = i_d < D
    m_r = i_r < R
    p_b = b_ptr + i_d[:, None].to(tl.int64) * stride_bd + i_r[None, :].to(tl.int64) * stride_br  # [BLOCK_D, BLOCK_R]
    b_b = tl.load(p_b, mask=m_d[:, None] & m_r[None, :], other=0.0).to(DOT_DTYPE)
    b_db = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)

    row_start = pid_m.to(tl.int64) * ROWS_PER_PROGRAM
    row_end = tl.minimum(row_start + ROWS_PER_PROGRAM, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        i_m = m0 + tl.arange(0, BLOCK_M)
        m_m = i_m < row_end
        i_v, m_v = _load_indices(idx_ptr, flag_ptr, i_m, m_m, V)
        b_sa = _gather_rank_rows(a_ptr, i_v, m_v, i_r, R, stride_ar, stride_av).to(DOT_DTYPE)
        p_dy = dy_ptr + i_m[:, None].to(tl.int64) * stride_dym + i_d[None, :].to(tl.int64) * stride_dyd
        b_dy = tl.load(p_dy, mask=m_m[:, None] & m_d[None, :], other=0.0).to(DOT_DTYPE)  # [BLOCK_M, BLOCK_D]

        b_ds = tl.dot(b_dy, b_b, input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_R]
        if ATOMIC:
            m_keep = m_v & (i_v != padding_idx)
            p_da = ds_ptr + i_r[None, :].to(tl.int64) * V + i_v[:, None]
            tl.atomic_add(p_da, scaling * b_ds, mask=m_keep[:, None] & m_r[None, :])
        else:
            p_ds = ds_ptr + (pid_d.to(tl.int64) * M + i_m[:, None]) * R + i_r[None, :]
            tl.store(p_ds, b_ds, mask=m_m[:, None] & m_r[None, :])
        b_db = tl.dot(tl.trans(b_dy), b_sa, b_db, input_precision=INPUT_PRECISION)

    if ATOMIC:
        p_db = db_ptr + i_d[:, None].to(tl.int64) * R + i_r[None, :]
        tl.atomic_add(p_db, scaling * b_db, mask=m_d[:, None] & m_r[None, :])
    else:
        p_db = db_ptr + (pid_m.to(tl.int64) * D + i_d[:, None]) * R + i_r[None, :]
        tl.store(p_db, b_db, mask=m_d[:, None] & m_r[None, :])


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
    i_p = start + tl.arange(0, BLOCK_M)
    m_p = i_p < M
    b_key = tl.load(sorted_ptr + i_p, mask=m_p, other=-1).to(tl.int64)
    b_prev = tl.load(sorted_ptr + i_p - 1, mask=m_p & (i_p > 0), other=-1).to(tl.int64)
    b_next = tl.load(sorted_ptr + i_p + 1, mask=(i_p + 1) < M, other=-1).to(tl.int64)
    i_row = tl.load(perm_ptr + i_p, mask=m_p, other=0).to(tl.int64)
    b_start = ((i_p == start) | (b_key != b_prev)).to(tl.int32)
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
        i_r = c * BLOCK_R + tl.arange(0, BLOCK_R)
        m_r = i_r < R
        p_ds = ds_part_ptr + i_row[:, None] * R + i_r[None, :]
        b_g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for j in range(0, N_PARTS):
            b_g += tl.load(p_ds + j * M * R, mask=m_p[:, None] & m_r[None, :], other=0.0)
        b_seg, _ = tl.associative_scan((b_g, tl.broadcast_to(b_start[:, None], (BLOCK_M, BLOCK_R))), 0, _segment_add)

        # head of the first run: its part in earlier blocks, block by block in order
        b_head = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for q in range(head_block, start, BLOCK_M):
            i_q = q + tl.arange(0, BLOCK_M)
            m_q = tl.load(sorted_ptr + i_q).to(tl.int64) == first_key
            i_qrow = tl.load(perm_ptr + i_q).to(tl.int64)
            p_q = ds_part_ptr + i_qrow[:, None] * R + i_r[None, :]
            b_q = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for j in range(0, N_PARTS):
                b_q += tl.load(p_q + j * M * R, mask=m_q[:, None] & m_r[None, :], other=0.0)
            b_head += tl.sum(b_q, axis=0)

        b_tot = b_seg + tl.where(m_first[:, None], b_head[None, :], 0.0)
        p_da = da_ptr + i_r[None, :].to(tl.int64) * stride_dar + i_key[:, None] * stride_dav
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
    i_e = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_e = i_e < N_ELEM
    b_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j in range(0, N_PARTS):
        b_acc += tl.load(part_ptr + tl.cast(j, tl.int64) * N_ELEM + i_e, mask=m_e, other=0.0)
    tl.store(out_ptr + i_e, (scaling * b_acc).to(out_ptr.dtype.element_ty), mask=m_e)


@triton.jit
def _emb_bwd_finish_kernel(
    # pointers
    ws_ptr,
    da_ptr,
    db_ptr,
    # sizes
    N_A,
    N_B,
    # meta-parameters
    BLOCK_M: tl.constexpr,
):
    """da[e] = ws[e] for e < N_A, db[e] = ws[N_A + e] for e < N_B: the fp32 workspace of the atomic backward
    written once into dA's and dB's dtypes (both contiguous)."""
    i_e = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_e = i_e < N_A + N_B
    b_ws = tl.load(ws_ptr + i_e, mask=m_e, other=0.0)
    m_a = i_e < N_A
    tl.store(da_ptr + i_e, b_ws.to(da_ptr.dtype.element_ty), mask=m_a)
    tl.store(db_ptr + (i_e - N_A), b_ws.to(db_ptr.dtype.element_ty), mask=m_e & ~m_a)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _range_error(idx: torch.Tensor, num_embeddings: int, lo: int, hi: int) -> ValueError:
    return ValueError(
        f"idx: embedding indices must be in [0, {num_embeddings}) for num_embeddings={num_embeddings}, "
        f"got indices from {lo} to {hi}"
    )


def check_indices(idx: torch.Tensor, num_embeddings: int) -> None:
    """Raise ValueError unless every index is in [0, num_embeddings). Min and max are taken on idx's device and
    read back (one host sync): the up-front check of the SYNC_CHECKS debug mode."""
    if idx.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(idx.reshape(-1))).tolist()
    if lo < 0 or hi >= num_embeddings:
        raise _range_error(idx, num_embeddings, lo, hi)


# One-element int32 flags per (device, checked), 1 while every index the kernels saw was in range. The kernels
# clear a flag on a bad index; only the checked flag is ever read (the other takes the writes of unchecked calls).
_FLAGS: dict = {}


def _index_flag(device: torch.device, checked: bool) -> torch.Tensor:
    key = (device, checked)
    if key not in _FLAGS:
        _FLAGS[key] = torch.ones(1, dtype=torch.int32, device=device)
    return _FLAGS[key]


def _host_memory(t: torch.Tensor) -> bool:
    """Whether t lives in host memory, where reading it waits for no device (CPU tensors: the interpreter)."""
    return t.device.type == "cpu"


def _raise_if_flagged(flag: torch.Tensor, idx: torch.Tensor, num_embeddings: int) -> None:
    """Report an out-of-range index the kernel flagged, without a device-to-host sync (see the module docstring):
    a device-side assert queued on a device; on CPU the flag is host memory, read directly."""
    if not _host_memory(flag):
        torch._assert_async(flag, f"idx: embedding indices must be in [0, {num_embeddings})")
    elif flag.numpy()[0] == 0:
        flag.fill_(1)
        lo, hi = torch.stack(torch.aminmax(idx)).tolist()
        raise _range_error(idx, num_embeddings, lo, hi)


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


@functools.lru_cache(maxsize=1024)
def _fwd_geometry(m: int, dim: int, r: int, out_dtype: torch.dtype, major: int, programs: int):
    """(config, grid, COLS_PER_PROGRAM, BLOCK_R, RANK_CHUNKS) of the forward: as few column splits as fill the
    device, since each split gathers the rank-r rows again."""
    r_block = rank_block(r)
    cfg = embedding_config("fwd", major, out_dtype, r_block)
    m_blocks, d_tiles = triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(dim, cfg["BLOCK_D"])
    d_splits = max(1, min(d_tiles, triton.cdiv(programs, m_blocks)))
    cols_per_program = triton.cdiv(d_tiles, d_splits) * cfg["BLOCK_D"]
    return cfg, (m_blocks, triton.cdiv(dim, cols_per_program), 1), cols_per_program, r_block, triton.cdiv(r, r_block)


@functools.lru_cache(maxsize=1024)
def _bwd_geometry(m: int, dim: int, r: int, dtype: torch.dtype, major: int, programs: int):
    """(config, grid, ROWS_PER_PROGRAM, m_splits, d_splits, BLOCK_R, rank chunks) of the pass over dY."""
    r_block = rank_block(r)
    r_chunks = triton.cdiv(r, r_block)
    cfg = embedding_config("bwd_dy", major, dtype, r_block)
    m_blocks, d_splits = triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(dim, cfg["BLOCK_D"])
    m_splits = max(1, min(m_blocks, triton.cdiv(programs, d_splits * r_chunks)))
    rows_per_program = triton.cdiv(m_blocks, m_splits) * cfg["BLOCK_M"]
    m_splits = triton.cdiv(m, rows_per_program)
    return cfg, (m_splits, d_splits, r_chunks), rows_per_program, m_splits, d_splits, r_block, r_chunks


@functools.lru_cache(maxsize=1024)
def _finish_geometry(n: int, dtype: torch.dtype, major: int, r_block: int):
    cfg = embedding_config("bwd_finish", major, dtype, r_block)
    return cfg, (triton.cdiv(n, cfg["BLOCK_M"]), 1, 1)


def lora_embedding_fwd(idx, weight, lora_A, lora_B, scaling, out_dtype=None):
    """Y = W[idx] + s * A[:, idx]^T B^T.

    idx [M] int32/int64, weight [V, D], lora_A [r, V], lora_B [D, r]; Y [M, D] in out_dtype (weight's dtype if
    None; the base row is converted in the kernel, so autocast never copies the table). The LoRA product runs in
    Y's dtype with fp32 accumulation. An index outside [0, V) raises ValueError on CPU before Y is returned, and
    a device-side assert on CUDA (module docstring). One launch, plus the assert's on CUDA.
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
    if SYNC_CHECKS:
        check_indices(idx, num_embeddings)

    idx = idx.contiguous()
    m, r = idx.shape[0], lora_A.shape[0]
    y = torch.empty((m, dim), dtype=out_dtype, device=idx.device)
    if m == 0:
        return y
    device = idx.device
    cfg, grid, cols_per_program, r_block, r_chunks = _fwd_geometry(
        m, dim, r, out_dtype, capability(device), num_programs_target(device)
    )
    flag = _index_flag(device, checked=True)
    plans_for(_emb_fwd_kernel).launch(
        None,
        grid,
        idx_ptr=idx,
        w_ptr=weight,
        a_ptr=lora_A,
        b_ptr=lora_B,
        y_ptr=y,
        flag_ptr=flag,
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
        RANK_CHUNKS=r_chunks,
        DOT_DTYPE=dot_dtype(out_dtype),
        INPUT_PRECISION=input_precision(out_dtype),
        **cfg,
    )
    _raise_if_flagged(flag, idx, num_embeddings)
    return y


def lora_embedding_bwd(dy, idx, lora_A, lora_B, scaling, padding_idx=None, deterministic=None, check=True):
    """(dA [r, V], dB [D, r]) for Y = W[idx] + s * A[:, idx]^T B^T, given dY [M, D].

    dB = s * dY^T A[:, idx]^T; dA[:, idx] += s * (dY B)^T, repeated indices adding up and the padding_idx column
    getting nothing. deterministic (default: torch.are_deterministic_algorithms_enabled()) makes dA and dB bitwise
    reproducible. check=False does not report out-of-range indices (they are still masked), for callers whose
    forward checked this very idx already. dA and dB come in lora_A's and lora_B's dtypes. Default mode: three
    launches (a memset, the pass over dY, the finish), plus the index assert's on CUDA when check is on.
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
    if check and SYNC_CHECKS:
        check_indices(idx, num_embeddings)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()

    device, r = dy.device, lora_A.shape[0]
    if m == 0:
        return torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    idx = idx.contiguous()
    major = capability(device)
    pad = -1 if padding_idx is None else int(padding_idx)
    scaling = float(scaling)

    # the pass over dY: a grid of row strips x column strips x rank chunks, sized to fill the device
    cfg, grid, rows_per_program, m_splits, d_splits, r_block, r_chunks = _bwd_geometry(
        m, dim, r, dy.dtype, major, num_programs_target(device)
    )
    if deterministic:
        ds_out = torch.empty((d_splits, m, r), dtype=torch.float32, device=device)
        db_out = torch.empty((m_splits, dim, r), dtype=torch.float32, device=device)
    else:
        ws = torch.zeros(r * num_embeddings + dim * r, dtype=torch.float32, device=device)
        ds_out, db_out = ws[: r * num_embeddings], ws[r * num_embeddings :]
    flag = _index_flag(device, checked=check)
    plans_for(_emb_bwd_dy_kernel, dynamic=("padding_idx",)).launch(  # the pad index: guarded, not keyed
        None,
        grid,
        dy_ptr=dy,
        idx_ptr=idx,
        a_ptr=lora_A,
        b_ptr=lora_B,
        ds_ptr=ds_out,
        db_ptr=db_out,
        flag_ptr=flag,
        M=m,
        D=dim,
        R=r,
        V=num_embeddings,
        ROWS_PER_PROGRAM=rows_per_program,
        padding_idx=pad,
        stride_dym=dy.stride(0),
        stride_dyd=dy.stride(1),
        stride_ar=lora_A.stride(0),
        stride_av=lora_A.stride(1),
        stride_bd=lora_B.stride(0),
        stride_br=lora_B.stride(1),
        scaling=scaling,
        ATOMIC=not deterministic,
        BLOCK_R=r_block,
        DOT_DTYPE=dot_dtype(dy.dtype),
        INPUT_PRECISION=input_precision(dy.dtype),
        **cfg,
    )
    if check:
        _raise_if_flagged(flag, idx, num_embeddings)

    da = torch.empty((r, num_embeddings), dtype=lora_A.dtype, device=device)
    db = torch.empty((dim, r), dtype=lora_B.dtype, device=device)
    if not deterministic:
        cfg, grid = _finish_geometry(r * num_embeddings + dim * r, lora_A.dtype, major, r_block)
        plans_for(_emb_bwd_finish_kernel).launch(
            None, grid, ws_ptr=ws, da_ptr=da, db_ptr=db, N_A=r * num_embeddings, N_B=dim * r, **cfg
        )
        return da, db

    # dB: the row-strip partials summed in order, scaled, rounded once
    cfg = embedding_config("bwd_reduce", major, lora_B.dtype, r_block)
    plans_for(_emb_bwd_reduce_kernel).launch(
        None,
        (triton.cdiv(dim * r, cfg["BLOCK_M"]), 1, 1),
        part_ptr=db_out,
        out_ptr=db,
        N_ELEM=dim * r,
        N_PARTS=m_splits,
        scaling=scaling,
        **cfg,
    )
    # dA: runs of equal indices summed in order over the column-strip partials of dS, each column written once
    sorted_idx, perm = torch.sort(idx, stable=True)
    cfg = embedding_config("bwd_segment", major, lora_A.dtype, r_block)
    head = torch.searchsorted(sorted_idx, sorted_idx[:: cfg["BLOCK_M"]].contiguous())  # run start per block
    da.zero_()
    plans_for(_emb_bwd_segment_kernel, dynamic=("padding_idx",)).launch(
        None,
        (triton.cdiv(m, cfg["BLOCK_M"]), 1, 1),
        sorted_ptr=sorted_idx,
        perm_ptr=perm,
        head_ptr=head,
        ds_part_ptr=ds_out,
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
