"""LoRA on MoE experts: validation, the torch path, and the op (eager and compiled) over the grouped Triton kernels.

Rows x [S, K] sorted by expert, offsets [E] the cumulative row counts (expert e owns rows [offsets[e - 1],
offsets[e])), W [E, N, K] (or [E, K, N] for experts stored transposed), bias [E, N], and the adapter in PEFT's
``target_parameters`` layout: A [r E, K] with A_e = A.view(E, r, K)[e], B [N, r E] with B_e = B.view(N, r, E)[:, :, e]
(see fastlora.reference_moe). For each expert's rows X_e:

    S_e  = X_e A_e^T                       [S_e, r]   saved for backward, with x itself (an alias)
    Y_e  = X_e W_e^T + s S_e B_e^T + bias_e
    dS_e = s dY_e B_e
    dB_e = s dY_e^T S_e                    written into B's interleaved columns
    dA_e = dS_e^T X_e                      written into A's expert-major rows
    dX_e = dY_e W_e + dS_e A_e
    dbias_e = rowsum(dY_e)                 only when the bias is trained

Split LoRA: no tensor of one expert's N x K elements is formed in forward or backward (no B_e A_e, no
W_e + s B_e A_e, no dW), unless the frozen W itself requires grad (then dW is formed, with a warning). There is no
dropout: PEFT refuses lora_dropout on expert parameters, since dropout(x) cannot be factored out of x W_e^T.
"""

from __future__ import annotations

import torch

from fastlora.checks import (
    INDEX_DTYPES,
    cached_check,
    check_same_device,
    check_same_dtype,
    check_scaling,
    check_tensor,
    dtype_name,
    host_memory,
    warn_trainable_base,
)
from fastlora.ops._define import Op
from fastlora.ops.backend import HAS_TRITON, use_triton
from fastlora.reference_moe import expert_factors

if HAS_TRITON:
    from fastlora.kernels import moe as _kmoe

__all__ = ["lora_experts", "check_experts", "check_offsets", "EXPERTS"]


def _features(weight: torch.Tensor, transposed: bool) -> tuple[int, int, int]:
    """(E, in_features K, out_features N) of an expert weight [E, N, K] (or [E, K, N] when transposed)."""
    num_experts, d1, d2 = weight.shape
    return (num_experts, d1, d2) if transposed else (num_experts, d2, d1)


@cached_check
def check_experts(x, weight, bias, lora_A, lora_B, scaling, offsets, transposed):
    """Validate a lora_experts call (ValueError/TypeError naming the argument); returns the rank r (0 without an
    adapter). A call signature seen before costs a dictionary lookup."""
    check_tensor("x", x, ndim=2)
    check_tensor("weight", weight, ndim=3)
    if not isinstance(transposed, bool):
        raise TypeError(f"transposed must be a bool, got {transposed!r}")
    num_experts, k, n = _features(weight, transposed)
    layout = "[E, in, out]" if transposed else "[E, out, in]"
    if num_experts < 1:
        raise ValueError(f"weight must hold at least one expert, got shape {tuple(weight.shape)}")
    if x.shape[1] != k:
        raise ValueError(
            f"x's last dimension must be in_features={k} (weight {tuple(weight.shape)} is {layout}), got x of shape "
            f"{tuple(x.shape)}"
        )
    check_same_dtype("x", x, weight)
    if bias is not None:
        check_tensor("bias", bias, ndim=2)
        if tuple(bias.shape) != (num_experts, n):
            raise ValueError(f"bias must have shape [{num_experts}, {n}] (one row per expert), got {tuple(bias.shape)}")
        check_same_dtype("bias", bias, weight)
    if not isinstance(offsets, torch.Tensor) or offsets.dtype not in INDEX_DTYPES or offsets.dim() != 1:
        is_tensor = isinstance(offsets, torch.Tensor)
        what = f"{dtype_name(offsets.dtype)} of shape {tuple(offsets.shape)}" if is_tensor else type(offsets).__name__
        raise TypeError(f"offsets must be a 1-D int32 or int64 tensor (row ends per expert), got {what}")
    if offsets.shape[0] != num_experts:
        raise ValueError(f"offsets must have one entry per expert ({num_experts}), got {offsets.shape[0]}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must both be given or both be None")
    r = 0
    if lora_A is not None:
        check_tensor("lora_A", lora_A, ndim=2)
        check_tensor("lora_B", lora_B, ndim=2)
        rows = lora_A.shape[0]
        if rows < num_experts or rows % num_experts or lora_A.shape[1] != k:
            raise ValueError(
                f"lora_A must have shape [r * {num_experts}, {k}] (r rows per expert, expert-major), got "
                f"{tuple(lora_A.shape)}"
            )
        r = rows // num_experts
        if tuple(lora_B.shape) != (n, rows):
            raise ValueError(
                f"lora_B must have shape [{n}, {rows}] (r * E interleaved columns) to match lora_A, got "
                f"{tuple(lora_B.shape)}"
            )
    check_scaling(scaling)
    check_same_device(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, offsets=offsets)
    return r


def check_offsets(offsets: torch.Tensor, rows: int) -> None:
    """offsets must be the cumulative row counts of rows sorted by expert: non-decreasing, from >= 0, ending at
    ``rows``. Host tensors are read here (ValueError); device tensors (and any inside torch.compile) get an assert
    queued after the comparison (``torch._assert_async``: no sync; on a device the error surfaces at the next call
    that waits for it)."""
    message = f"offsets must be non-decreasing cumulative row counts ending at the {rows} rows of x"
    if not host_memory(offsets) or torch.compiler.is_compiling():  # compiled: a traced assert, no data read
        ok = (offsets[-1] == rows) & (offsets[0] >= 0) & (offsets[1:] >= offsets[:-1]).all()
        torch._assert_async(ok, message)
        return
    ends = offsets.tolist()
    if ends[-1] != rows or ends[0] < 0 or any(b < a for a, b in zip(ends[:-1], ends[1:], strict=True)):
        raise ValueError(f"{message}, got {ends if len(ends) <= 16 else ends[:16] + ['...']}")


# ----------------------------------------------------------------------------------------------------------
# Torch path (CPU, or when forced): the same math and saved tensors as the kernels, one expert at a time
# ----------------------------------------------------------------------------------------------------------


def _bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) per expert (read on the host: one sync for a device tensor)."""
    ends = offsets.tolist()
    return list(zip([0] + ends[:-1], ends, strict=True))


def _w_t(weight, e, transposed):
    """W_e^T as [K, N] (a view)."""
    return weight[e] if transposed else weight[e].t()


def _factors(lora_A, lora_B, num_experts, dtype):
    """(A_e [E, r, K], B_e [E, N, r]) in the compute dtype; B_e gathered out of B's interleaved columns once per call
    (E N r elements, the adapter's size), so every expert's products read unit-stride operands."""
    a3, b3 = expert_factors(lora_A.to(dtype), lora_B.to(dtype), num_experts)
    return a3, b3.contiguous()


def _torch_fwd(x, weight, bias, lora_A, lora_B, scaling, offsets, transposed):
    num_experts, _, n = _features(weight, transposed)
    rows = x.shape[0]
    y = x.new_empty((rows, n))
    lora = lora_A is not None
    r = lora_A.shape[0] // num_experts if lora else 0
    s = x.new_empty((rows, r))
    if lora:
        a3, b3 = _factors(lora_A, lora_B, num_experts, x.dtype)
    for e, (lo, hi) in enumerate(_bounds(offsets)):
        if hi <= lo:
            continue
        xe, ye = x[lo:hi], y[lo:hi]
        if bias is not None:
            torch.addmm(bias[e], xe, _w_t(weight, e, transposed), out=ye)
        else:
            torch.mm(xe, _w_t(weight, e, transposed), out=ye)
        if lora:
            se = torch.mm(xe, a3[e].t(), out=s[lo:hi])
            ye.addmm_(se, b3[e].t(), alpha=scaling)
    return y, s


def _torch_bwd(dy, x, s, weight, lora_A, lora_B, scaling, offsets, transposed, need_dx):
    num_experts, k, n = _features(weight, transposed)
    dt = dy.dtype
    dx = x.new_empty(x.shape) if need_dx else None
    lora = lora_A is not None
    if lora:
        r = lora_A.shape[0] // num_experts
        a3, b3 = _factors(lora_A, lora_B, num_experts, dt)
        da3 = torch.zeros((num_experts, r, k), dtype=dt, device=dy.device)
        db3 = torch.zeros((num_experts, n, r), dtype=dt, device=dy.device)
    for e, (lo, hi) in enumerate(_bounds(offsets)):
        if hi <= lo:
            continue
        dye = dy[lo:hi]
        if need_dx:
            dxe = torch.mm(dye, _w_t(weight, e, transposed).t(), out=dx[lo:hi])
        if lora:
            dse = torch.mm(dye, b3[e]).mul_(scaling)
            torch.mm(dye.t(), s[lo:hi], out=db3[e]).mul_(scaling)
            torch.mm(dse.t(), x[lo:hi], out=da3[e])
            if need_dx:
                dxe.addmm_(dse, a3[e])
    if not lora:
        return dx, None, None
    da = da3.reshape(num_experts * r, k).to(lora_A.dtype)
    db = db3.permute(1, 2, 0).reshape(n, r * num_experts).to(lora_B.dtype)  # B_e = B.view(N, r, E)[:, :, e]
    return dx, da, db


# ----------------------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------------------


def _path(a) -> bool:
    """Triton unless the device takes the torch path; shapes with a zero dimension take the torch path too."""
    return use_triton(a.x) and a.x.numel() > 0 and a.weight.numel() > 0


def _forward(a, triton):
    args = (a.x, a.weight, a.bias, a.lora_A, a.lora_B, a.scaling, a.offsets, a.transposed)
    return _kmoe.lora_experts_fwd(*args) if triton else _torch_fwd(*args)


def _backward(a, saved, grads, needs, triton):
    (s,), (dy,) = saved, grads
    need_dx, need_dw, need_dbias = needs[0], needs[1], needs[2]
    args = (dy, a.x, s, a.weight, a.lora_A, a.lora_B, a.scaling, a.offsets, a.transposed, need_dx)
    if a.x.shape[0] == 0 or not triton:
        dx, da, db = _torch_bwd(*args)
    else:
        dx, da, db = _kmoe.lora_experts_bwd(*args)
    dbias = None
    if need_dbias and a.bias is not None:  # a trained expert bias: rowsum of dY per expert
        lengths = torch.diff(a.offsets, prepend=a.offsets.new_zeros(1))
        dbias = torch.segment_reduce(dy.float(), "sum", lengths=lengths, axis=0, unsafe=True).to(a.bias.dtype)
    dw = _weight_grad(dy, a.x, a.weight, a.offsets, a.transposed) if need_dw else None
    return dx, dw, dbias, da, db


def _weight_grad(dy, x, weight, offsets, transposed):
    """dW for an expert weight that requires grad (with the warning that it is meant to be frozen)."""
    warn_trainable_base()
    dw = torch.zeros_like(weight)
    for e, (lo, hi) in enumerate(_bounds(offsets)):
        g = dy[lo:hi].t() @ x[lo:hi]  # [N, K]
        dw[e] = g.t() if transposed else g
    return dw


def _fake(a):
    num_experts, _, n = _features(a.weight, a.transposed)
    r = a.lora_A.shape[0] // num_experts if a.lora_A is not None else 0
    return a.x.new_empty(a.x.shape[0], n), a.x.new_empty(a.x.shape[0], r)


EXPERTS = Op(
    "lora_experts",
    "Tensor x, Tensor weight, Tensor? bias, Tensor? lora_A, Tensor? lora_B, Tensor offsets, float scaling, "
    "bool transposed",
    outputs=("y", "s"),
    differentiable=("x", "weight", "bias", "lora_A", "lora_B"),
    saved_outputs=("s",),
    saved_when_trained=("bias",),
    forward=_forward,
    backward=_backward,
    fake=_fake,
    path=_path,
)


def experts_linear(x, weight, bias, lora_A, lora_B, scaling, offsets, transposed=False):
    """lora_experts without the check of the offsets' values: for callers that made the offsets themselves from the
    routing (fastlora.experts). The arguments are still validated."""
    check_experts(x, weight, bias, lora_A, lora_B, scaling, offsets, transposed)
    return EXPERTS(x, weight, bias, lora_A, lora_B, offsets, float(scaling), transposed)[0]


def lora_experts(x, weight, bias, lora_A, lora_B, scaling, offsets, transposed=False):
    """LoRA on the experts of a MoE layer, over rows sorted by expert: Y_e = X_e W_e^T + bias_e + s (X_e A_e^T) B_e^T.

    Args:
        x: rows [S, K] sorted by expert (float16, bfloat16 or float32).
        weight: the frozen expert weights [E, N, K], or [E, K, N] with ``transposed=True`` (models whose experts
            compute x W_e, such as gpt-oss); x's dtype.
        bias: [E, N] or None (x's dtype).
        lora_A: [r E, K], expert-major (A_e = lora_A.view(E, r, K)[e]); lora_B: [N, r E], interleaved
            (B_e = lora_B.view(N, r, E)[:, :, e]): PEFT's ``target_parameters`` layout, read as stored. Both None
            for the grouped product alone. Any float dtype (computed in x's, gradients in their own).
        scaling: s, usually alpha / r.
        offsets: [E] int32 or int64, the cumulative row counts: expert e owns rows [offsets[e - 1], offsets[e]).
            Checked: on the host here, on a device by a queued device-side assert (no sync).

    Returns:
        Y [S, N] in x's dtype.
    """
    check_experts(x, weight, bias, lora_A, lora_B, scaling, offsets, transposed)
    check_offsets(offsets, x.shape[0])
    return EXPERTS(x, weight, bias, lora_A, lora_B, offsets, float(scaling), transposed)[0]
