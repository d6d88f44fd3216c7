"""LoRA on sibling linear layers that read one input (attention's q/k/v, the MLP's gate/up), as one op.

Members i = 0..n-1 share x [M, K] (leading dims flattened); each has W_i [N_i, K], bias_i, A_i [r_i, K],
B_i [N_i, r_i], s_i and its own dropout mask m_i (its own seed: PEFT applies one nn.Dropout per projection):

    S    = [S_0 | ... | S_{n-1}]  [M, sum r_i]   S_i = (m_i x) A_i^T: one pass over x, the A's one [sum r_i, K] operand
    Y_i  = x W_i^T + s_i S_i B_i^T + bias_i'       one GEMM over the concatenated N = sum N_i
    dS_i = s_i dY_i B_i,  dB_i = s_i dY_i^T S_i     one pass over the dY_i
    dA_i = dS_i^T (m_i x)
    dX   = sum_i dY_i W_i + sum_i m_i (dS_i A_i)    one GEMM (autograd adds no dX tensors)

bias_i' = bias_i + s_i * lora_bias_i (PEFT's ``lora_bias``), as in ``fastlora.ops.linear``. No weight is concatenated
per call: the kernels take each member's W, B, bias and output by pointer. Saved for backward: x once (an alias), S,
the seeds. Each member's output is its own output of the op's one autograd node; a member whose output takes no part
in the loss gets no gradients (None, not zeros) on the eager path.

The torch path (CPU) groups the same way: one matmul for every S without dropout, and dX accumulated in one tensor
(dY_0 W_0, then in-place addmm for the other members and one for every dS A without dropout).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from fastlora.checks import check_same_device
from fastlora.ops._define import Op
from fastlora.ops.backend import (
    HAS_TRITON,
    INTERPRET,
    as_rows,
    autocast_enabled,
    autocast_inputs,
    draw_seed,
    dropout_scale,
    no_autocast,
    use_triton,
)
from fastlora.ops.linear import bias_grads, check_linear, effective_bias, weight_grad

if HAS_TRITON:
    from fastlora.kernels import group as _kgroup
    from fastlora.kernels.configs import GROUP_MIN_ROWS

__all__ = ["GroupMember", "lora_linear_group", "check_group", "group_runs", "MAX_MEMBERS"]

# The most members one group op takes (GPT-J style blocks feed q, k, v and the MLP's input layer from one tensor:
# larger sibling sets are split into groups of at most this many).
MAX_MEMBERS = 4
# Per member, in the op's signature: weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p.
_PER_MEMBER = 7
# Per member, among the op's differentiable inputs (after x): weight, bias, lora_A, lora_B, lora_bias.
_GRADS_PER_MEMBER = 5


class GroupMember(NamedTuple):
    """One projection of a group: the arguments ``lora_linear`` takes besides x (dropout_p already 0 outside
    training)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    lora_bias: torch.Tensor | None
    scaling: float
    dropout_p: float


def check_group(x, members) -> None:
    """Validate a group call: 1 to MAX_MEMBERS members, each a valid ``lora_linear`` call on x (the error names the
    member), all on one device."""
    if not isinstance(members, Sequence) or not all(isinstance(m, GroupMember) for m in members):
        raise TypeError(f"members must be a sequence of GroupMember, got {type(members).__name__}")
    if not 1 <= len(members) <= MAX_MEMBERS:
        raise ValueError(f"a group takes 1 to {MAX_MEMBERS} members, got {len(members)}")
    for i, m in enumerate(members):
        try:
            check_linear(x, m.weight, m.bias, m.lora_A, m.lora_B, m.scaling, m.dropout_p, m.lora_bias)
        except (TypeError, ValueError) as err:
            raise type(err)(f"group member {i}: {err}") from None
    check_same_device(**{f"weight{i}": m.weight for i, m in enumerate(members)})


def group_runs(x: torch.Tensor) -> bool:
    """Whether a group call on x is worth making rather than one ``lora_linear`` per member: always on the torch
    path; on the Triton path from GROUP_MIN_ROWS rows on (below, the members' own kernels split their rank-r passes
    across the GPU, which the group's do not), and not with deterministic algorithms requested (the group's passes
    accumulate dA and dB by atomics)."""
    if not use_triton(x):
        return True
    if torch.are_deterministic_algorithms_enabled():
        return False
    return INTERPRET or math.prod(x.shape[:-1]) >= GROUP_MIN_ROWS


# ----------------------------------------------------------------------------------------------------------
# Torch path (CPU, or when forced): the same math, grouping and saved tensors as the kernels
# ----------------------------------------------------------------------------------------------------------


def _offsets(lora_As) -> list[int]:
    """Each member's first column in S (the running sum of the ranks)."""
    return list(itertools.accumulate((a.shape[0] for a in lora_As), initial=0))[:-1]


def _member_seeds(seeds, ps) -> list:
    """Each member's seed as an int (None without dropout): the seeds tensor holds one per member with dropout."""
    values = iter(seeds.tolist() if seeds is not None else ())
    return [next(values) if p > 0 else None for p in ps]


def torch_group_fwd(x2, weights, biases, lora_As, lora_Bs, scalings, ps, seeds):
    """Y_i [M, N_i] and S [M, sum r_i] for x2 [M, K]."""
    dt = x2.dtype
    if not any(ps):  # every S from one matmul
        a = torch.cat([a.to(dt) for a in lora_As]) if len(lora_As) > 1 else lora_As[0].to(dt)
        s = x2 @ a.t()
    else:
        parts = zip(lora_As, ps, _member_seeds(seeds, ps), strict=True)
        s = torch.cat([(x2 if p == 0 else x2 * dropout_scale(seed, x2, p)) @ a.to(dt).t() for a, p, seed in parts], 1)
    ys = []
    for w, bias, b, scaling, off in zip(weights, biases, lora_Bs, scalings, _offsets(lora_As), strict=True):
        y = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()
        y.addmm_(s[:, off : off + b.shape[1]], b.to(dt).t(), alpha=scaling)
        ys.append(y)
    return ys, s


def torch_group_bwd(dys, x2, s, offsets, weights, lora_As, lora_Bs, scalings, ps, seeds, need_dx, need_dbias):
    """dX [M, K] (or None) and per member dA_i, dB_i, dbias_i (rowsum_M(dY_i) float32, or None) for the members with
    a gradient dys[i] [M, N_i]; those with None get None throughout."""
    dt = x2.dtype
    n = len(dys)
    live = [i for i in range(n) if dys[i] is not None]
    seed_ints = _member_seeds(seeds, ps)
    ds = {i: torch.mm(dys[i], lora_Bs[i].to(dt)).mul_(scalings[i]) for i in live}
    db = {i: torch.mm(dys[i].t(), s[:, offsets[i] : offsets[i] + lora_As[i].shape[0]]).mul_(scalings[i]) for i in live}
    keep = {i: dropout_scale(seed_ints[i], x2, ps[i]) for i in live if ps[i] > 0}
    plain = [i for i in live if i not in keep]
    da = {}
    if plain:  # every dA without dropout from one matmul
        ds_plain = torch.cat([ds[i] for i in plain], dim=1) if len(plain) > 1 else ds[plain[0]]
        for i, d in zip(plain, (ds_plain.t() @ x2).split([lora_As[i].shape[0] for i in plain]), strict=True):
            da[i] = d
    for i, k in keep.items():
        da[i] = ds[i].t() @ (x2 * k)
    dx = None
    if need_dx and live:
        for i in live:
            dx = dys[i] @ weights[i] if dx is None else dx.addmm_(dys[i], weights[i])
        if plain:
            a_plain = torch.cat([lora_As[i].to(dt) for i in plain]) if len(plain) > 1 else lora_As[plain[0]].to(dt)
            dx.addmm_(ds_plain, a_plain)
        for i, k in keep.items():
            dx.add_((ds[i] @ lora_As[i].to(dt)).mul_(k))
    das = [da[i].to(lora_As[i].dtype) if i in da else None for i in range(n)]
    dbs = [db[i].to(lora_Bs[i].dtype) if i in db else None for i in range(n)]
    dsums = [dys[i].sum(0, dtype=torch.float32) if need_dbias[i] and dys[i] is not None else None for i in range(n)]
    return dx, das, dbs, dsums


# ----------------------------------------------------------------------------------------------------------
# The op, one per member count
# ----------------------------------------------------------------------------------------------------------


def _members(a, n: int) -> list[tuple]:
    """(weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p) of each member, from the op's arguments."""
    return [tuple(a[1 + _PER_MEMBER * i : 1 + _PER_MEMBER * (i + 1)]) for i in range(n)]


def _forward(n):
    def forward(a, triton):
        x2 = as_rows(a.x)
        ms = _members(a, n)
        weights = [m[0] for m in ms]
        biases = [effective_bias(m[1], m[4], m[5], x2.dtype) for m in ms]
        lora_As, lora_Bs = [m[2] for m in ms], [m[3] for m in ms]
        scalings, ps = [m[5] for m in ms], [m[6] for m in ms]
        args = (x2, weights, biases, lora_As, lora_Bs, scalings, ps, a.seeds)
        ys, s = _kgroup.lora_group_fwd(*args) if triton else torch_group_fwd(*args)
        if x2 is not a.x:
            lead = a.x.shape[:-1]
            ys = [y.reshape(*lead, y.shape[1]) for y in ys]
        return (*ys, s)

    return forward


def _backward(n):
    def backward(a, saved, grads, needs, triton):
        (s,) = saved
        x2 = as_rows(a.x)
        ms = _members(a, n)
        weights, lora_As, lora_Bs = [m[0] for m in ms], [m[2] for m in ms], [m[3] for m in ms]
        scalings, ps = [m[5] for m in ms], [m[6] for m in ms]
        dys = [None if g is None else as_rows(g).contiguous() for g in grads]
        per = [needs[1 + _GRADS_PER_MEMBER * i : 1 + _GRADS_PER_MEMBER * (i + 1)] for i in range(n)]
        need_sum = [p[1] or p[4] for p in per]  # dbias or d lora_bias
        offsets = _offsets(lora_As)
        args = (dys, x2, s, offsets, weights, lora_As, lora_Bs, scalings, ps, a.seeds, needs[0], need_sum)
        dx, das, dbs, dsums = _kgroup.lora_group_bwd(*args) if triton else torch_group_bwd(*args)
        out = [dx.reshape(a.x.shape) if dx is not None and dx.dim() != a.x.dim() else dx]
        for i, m in enumerate(ms):
            dy = dys[i]
            if dy is None:
                out += [None] * _GRADS_PER_MEMBER
                continue
            dbias, dlb = bias_grads(dsums[i], m[1], m[4], m[5], per[i][1], per[i][4]) if dsums[i] is not None else (
                None, None)  # fmt: skip
            dw = weight_grad(dy, x2, m[0]) if per[i][0] else None
            out += [dw, dbias, das[i], dbs[i], dlb]
        return tuple(out)

    return backward


def _fake(n):
    def fake(a):
        lead = a.x.shape[:-1]
        ms = _members(a, n)
        ys = [a.x.new_empty(*lead, m[0].shape[0]) for m in ms]
        return (*ys, a.x.new_empty(math.prod(lead), sum(m[2].shape[0] for m in ms)))

    return fake


def _triton_path(n):
    def path(a) -> bool:
        return use_triton(a.x) and a.x.numel() > 0 and all(m[0].shape[0] > 0 for m in _members(a, n))

    return path


def _make_op(n: int) -> Op:
    member = ("Tensor weight{i}, Tensor? bias{i}, Tensor lora_A{i}, Tensor lora_B{i}, Tensor? lora_bias{i}, "
              "float scaling{i}, float dropout_p{i}")  # fmt: skip
    signature = ", ".join(["Tensor x", *(member.format(i=i) for i in range(n)), "Tensor? seeds"])
    ys = tuple(f"y{i}" for i in range(n))
    grads = [("weight", "bias", "lora_A", "lora_B", "lora_bias")] * n
    return Op(
        f"lora_linear_group{n}",
        signature,
        outputs=(*ys, "s"),
        differentiable=("x", *(f"{name}{i}" for i, names in enumerate(grads) for name in names)),
        differentiable_outputs=ys,
        saved_outputs=("s",),
        saved_when_trained=tuple(f"{name}{i}" for i in range(n) for name in ("bias", "lora_bias")),
        materialize_grads=False,
        forward=_forward(n),
        backward=_backward(n),
        fake=_fake(n),
        path=_triton_path(n),
    )


GROUP_OPS = {n: _make_op(n) for n in range(1, MAX_MEMBERS + 1)}


def lora_linear_group(x, members, training: bool = True) -> list[torch.Tensor]:
    """LoRA linear layers that share their input, computed together: for each member i,
    Y_i = x W_i^T + bias_i + s_i * ((dropout_i(x) A_i^T) B_i^T + lora_bias_i), each with its own dropout mask.

    Args:
        x: input [..., K], float16, bfloat16 or float32.
        members: 1 to MAX_MEMBERS ``GroupMember`` (weight [N_i, K] in x's dtype, bias [N_i] or None, lora_A [r_i, K],
            lora_B [N_i, r_i], lora_bias [N_i] or None, scaling s_i, dropout_p in [0, 1)), as ``lora_linear``
            takes them.
        training: dropout applies only when True.

    Returns:
        [Y_0, ..., Y_{n-1}], Y_i [..., N_i] in x's dtype (the autocast dtype under ``torch.autocast``).
    """
    check_group(x, members)
    n = len(members)
    ps = [float(m.dropout_p) if training else 0.0 for m in members]
    dropped = sum(p > 0 for p in ps)
    seeds = draw_seed(x, dropped) if dropped else None  # one per member with dropout, in member order
    autocasting = autocast_enabled(x.device.type)
    if autocasting:
        cast = [autocast_inputs(x, m.weight, m.bias) for m in members]
        x = cast[0][0]
        members = [m._replace(weight=c[1], bias=c[2]) for m, c in zip(members, cast, strict=True)]
    flat = []
    for m, p in zip(members, ps, strict=True):
        flat += [m.weight, m.bias, m.lora_A, m.lora_B, m.lora_bias, float(m.scaling), p]
    if not autocasting:
        return list(GROUP_OPS[n](x, *flat, seeds)[:n])
    with no_autocast(x.device.type):
        return list(GROUP_OPS[n](x, *flat, seeds)[:n])
