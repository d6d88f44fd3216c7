"""LoRA on an embedding: validation, the torch path, and the op (eager and compiled) over the Triton kernels.

idx [M] (any shape, flattened), W [V, D], A [r, V], B [D, r], Sa = A[:, idx]^T [M, r]:

    Y  = W[idx] + s * Sa B^T
    dB = s * dY^T Sa;   dA[:, idx] += s * (dY B)^T  (repeated indices add up; padding_idx gets nothing)

Saved for backward: idx and the adapter tensors (aliases); Sa is gathered again, nothing of size M x D is kept.
"""

from __future__ import annotations

import torch

from fastlora.checks import (
    check_embedding_indices,
    check_indices,
    check_lora_factors,
    check_padding_idx,
    check_same_device,
    check_tensor,
    warn_trainable_base,
)
from fastlora.ops._define import Op
from fastlora.ops.backend import HAS_TRITON, autocast_enabled, no_autocast, use_triton

if HAS_TRITON:
    from fastlora.kernels import embedding as _kembedding

__all__ = ["lora_embedding", "check_embedding", "EMBEDDING"]


def check_embedding(idx, weight, lora_A, lora_B, scaling, padding_idx):
    """Validate a lora_embedding call; return padding_idx as None or an index in [0, V)."""
    check_indices(idx)
    check_tensor("weight", weight, ndim=2)
    num_embeddings, dim = weight.shape
    check_lora_factors(lora_A, lora_B, num_embeddings, dim, scaling)
    check_same_device(idx=idx, weight=weight, lora_A=lora_A, lora_B=lora_B)
    return check_padding_idx(padding_idx, num_embeddings)


def _torch_fwd(idx1, weight, lora_A, lora_B, scaling, out_dtype):
    sa = lora_A.t()[idx1].to(out_dtype)  # [M, r]
    y = weight[idx1].to(out_dtype)
    return y.addmm_(sa, lora_B.to(out_dtype).t(), alpha=scaling)


def _torch_bwd(dy, idx1, lora_A, lora_B, scaling, padding_idx):
    dt = dy.dtype
    sa = lora_A.t()[idx1].to(dt)
    db = torch.mm(dy.t(), sa).mul_(scaling)
    ds = torch.mm(dy, lora_B.to(dt)).float().mul_(scaling)  # [M, r]
    if padding_idx is not None:
        ds.masked_fill_((idx1 == padding_idx)[:, None], 0.0)
    da = torch.zeros(lora_A.shape, dtype=torch.float32, device=dy.device).index_add_(1, idx1, ds.t())
    return da.to(lora_A.dtype), db.to(lora_B.dtype)


def _path(a) -> bool:
    return use_triton(a.idx)


def _forward(a, triton):
    idx1 = a.idx.reshape(-1)
    args = dict(weight=a.weight, lora_A=a.lora_A, lora_B=a.lora_B, scaling=a.scaling, out_dtype=a.out_dtype)
    if triton:
        y2 = _kembedding.lora_embedding_fwd(idx=idx1, **args)
    else:
        check_embedding_indices(idx1, a.weight.shape[0])
        y2 = _torch_fwd(idx1, **args)
    return (y2.reshape(*a.idx.shape, a.weight.shape[1]),)


def _backward(a, saved, grads, needs, triton):
    """(dW, dA, dB). The forward checked idx already, so the range check is not repeated."""
    (dy,) = grads
    idx1, dy2 = a.idx.reshape(-1), dy.reshape(-1, dy.shape[-1])
    if idx1.shape[0] == 0:
        da, db = torch.zeros_like(a.lora_A), torch.zeros_like(a.lora_B)
    elif triton:
        da, db = _kembedding.lora_embedding_bwd(
            dy=dy2, idx=idx1, lora_A=a.lora_A, lora_B=a.lora_B, scaling=a.scaling, padding_idx=a.padding_idx,
            check=False,
        )  # fmt: skip
    else:
        da, db = _torch_bwd(dy2, idx1, a.lora_A, a.lora_B, a.scaling, a.padding_idx)
    dw = None
    if needs[0]:
        warn_trainable_base("embedding weight", "dW [V, D]")
        dw = torch.zeros(a.weight.shape, dtype=torch.float32, device=dy.device).index_add_(0, idx1, dy2.float())
        if a.padding_idx is not None:
            dw[a.padding_idx] = 0.0
        dw = dw.to(a.weight.dtype)
    return dw, da, db


def _fake(a):
    return (a.weight.new_empty((*a.idx.shape, a.weight.shape[1]), dtype=a.out_dtype),)


EMBEDDING = Op(
    "lora_embedding",
    "Tensor idx, Tensor weight, Tensor lora_A, Tensor lora_B, float scaling, int? padding_idx, ScalarType out_dtype",
    outputs=("y",),
    differentiable=("weight", "lora_A", "lora_B"),
    saved_when_trained=("weight",),
    forward=_forward,
    backward=_backward,
    fake=_fake,
    path=_path,
)


def lora_embedding(idx, weight, lora_A, lora_B, scaling, padding_idx=None):
    """LoRA embedding lookup: Y = W[idx] + s * A[:, idx]^T B^T.

    Args:
        idx: indices of any shape [...], int32 or int64, each in [0, V) (checked: ValueError otherwise).
        weight: frozen base table [V, D], float16, bfloat16 or float32.
        lora_A: [r, V]; lora_B: [D, r]; any float dtype (computed in Y's dtype, gradients in their own).
        scaling: s, usually alpha / r.
        padding_idx: None or an index in [-V, V); that row's LoRA factor (column of A) gets no gradient.
            The forward still returns its row, as nn.Embedding does.

    Returns:
        Y [..., D] in weight's dtype; under ``torch.autocast`` in the autocast dtype, as for lora_linear. Only
        the gathered rows are converted (inside the kernel), never the whole table.
    """
    padding_idx = check_embedding(idx, weight, lora_A, lora_B, scaling, padding_idx)
    device_type = idx.device.type
    if not autocast_enabled(device_type):  # the common case: no autocast context to enter
        return EMBEDDING(idx, weight, lora_A, lora_B, float(scaling), padding_idx, weight.dtype)
    with no_autocast(device_type):
        return EMBEDDING(
            idx, weight, lora_A, lora_B, float(scaling), padding_idx, torch.get_autocast_dtype(device_type)
        )
