"""Merge a LoRA adapter into its base weight: W += c * B A, in float32, rounded once.

W [N, K] may be any strided view (an embedding table is merged through its transpose, a conv weight
through its [O, C*kh*kw] view), A [r, K], B [N, r]. The safe mode runs a checking pass first and writes
nothing if any merged element would be NaN or Inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastlora.kernels.configs import INTERPRET, MERGE_CONFIG, MERGE_INTERPRET, rank_block
from fastlora.kernels.launch import plans_for
from fastlora.kernels.tiles import tile_offsets


@triton.jit
def _merge_kernel(
    # pointers
    w_ptr,
    a_ptr,
    b_ptr,
    flag_ptr,
    # sizes
    N,
    K,
    R,
    # strides
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    # scalars
    coeff,
    limit,
    # meta-parameters
    CHECK_ONLY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """W[n, k] += coeff * sum_r B[n, r] A[r, k] in float32; with CHECK_ONLY, only flag a non-finite result."""
    i_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    i_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_n, m_k = i_n < N, i_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        i_r = r0 + tl.arange(0, BLOCK_R)
        m_r = i_r < R
        b_b = tl.load(b_ptr + tile_offsets(i_n, i_r, stride_bn, stride_br), mask=m_n[:, None] & m_r[None, :], other=0.0)
        b_a = tl.load(a_ptr + tile_offsets(i_r, i_k, stride_ar, stride_ak), mask=m_r[:, None] & m_k[None, :], other=0.0)
        acc = tl.dot(b_b.to(tl.float32), b_a.to(tl.float32), acc, input_precision="ieee")
    p_w = w_ptr + tile_offsets(i_n, i_k, stride_wn, stride_wk)
    m_w = m_n[:, None] & m_k[None, :]
    merged = tl.load(p_w, mask=m_w, other=0.0).to(tl.float32) + coeff * acc
    if CHECK_ONLY:
        bad = tl.where(m_w & ((merged != merged) | (tl.abs(merged) > limit)), 1, 0)
        tl.atomic_max(flag_ptr, tl.max(tl.max(bad, axis=1), axis=0))
    else:
        tl.store(p_w, merged.to(w_ptr.dtype.element_ty), mask=m_w)


def merge_(weight, lora_A, lora_B, coeff: float, safe: bool = False):
    """weight[N, K] += coeff * lora_B[N, r] @ lora_A[r, K], in place. With safe=True, raises ValueError and
    leaves the weight unchanged if the result would hold NaN or Inf (also when the result would overflow
    the weight's dtype)."""
    N, K = weight.shape
    R = lora_A.shape[0]
    bn, bk, warps = MERGE_INTERPRET if INTERPRET else MERGE_CONFIG
    grid = (triton.cdiv(N, bn), triton.cdiv(K, bk), 1)
    args = dict(
        w_ptr=weight,
        a_ptr=lora_A,
        b_ptr=lora_B,
        N=N,
        K=K,
        R=R,
        stride_wn=weight.stride(0),
        stride_wk=weight.stride(1),
        stride_ar=lora_A.stride(0),
        stride_ak=lora_A.stride(1),
        stride_bn=lora_B.stride(0),
        stride_br=lora_B.stride(1),
        coeff=float(coeff),
        limit=float(torch.finfo(weight.dtype).max),
        BLOCK_N=bn,
        BLOCK_K=bk,
        BLOCK_R=rank_block(R),
        num_warps=warps,
    )
    if safe:
        flag = torch.zeros(1, device=weight.device, dtype=torch.int32)
        plans_for(_merge_kernel).launch(None, grid, flag_ptr=flag, CHECK_ONLY=True, **args)
        if flag.item() != 0:
            raise ValueError(
                "merging the adapter would make the weight non-finite (NaN or Inf); the weight is unchanged"
            )
    plans_for(_merge_kernel).launch(None, grid, flag_ptr=weight, CHECK_ONLY=False, **args)
    return weight
