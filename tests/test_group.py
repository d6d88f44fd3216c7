"""The group op (sibling projections on one input): the Triton kernels (under the interpreter) and the torch path
against the float64 reference of each member, one lora_linear per member, its launches and what it saves."""

import pytest
import torch
from fastlora.kernels import linear as klinear
from helpers import DTYPE_IDS, assert_close, saved_bytes
from linear_launches import LaunchCounter
from lora_cases import PATHS, on_path

import fastlora as fl
from fastlora.ops.backend import draw_seed, dropout_keep
from fastlora.ops.group import GROUP_OPS, GroupMember, lora_linear_group
from fastlora.reference import lora_linear_bias_ref, lora_linear_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# q/k/v-like (N_0 > N_1 = N_2, GQA), odd sizes that cross tiles and leave partial ones in every member
QKV = ((51, 5), (19, 3), (19, 7))
M, K = 37, 75


def _members(spec, dtype, ps=None, bias=True, lora_bias=False, lora_dtype=torch.float32, bias_trains=False):
    out = []
    for i, (n, r) in enumerate(spec):
        w = (torch.randn(n, K) / K**0.5).to(dtype)
        b = torch.randn(n).to(dtype).requires_grad_(bias_trains) if bias else None
        a = (torch.randn(r, K) / K**0.5).to(lora_dtype).requires_grad_()
        bb = torch.randn(n, r).to(lora_dtype).requires_grad_()
        lb = torch.randn(n).to(lora_dtype).requires_grad_() if lora_bias else None
        out.append(GroupMember(w, b, a, bb, lb, 0.5 + 0.25 * i, ps[i] if ps else 0.0))
    return out


def _next_seeds(members):
    """Each member's seed the next group call draws (one per member with dropout, in member order; None for the
    others), read off a copy of torch's CPU RNG state."""
    state = torch.get_rng_state()
    drawn = iter(draw_seed(torch.empty(0), len(members)).tolist())
    torch.set_rng_state(state)
    return [next(drawn) if m.dropout_p > 0 else None for m in members]


def _mask(path, seed, p, shape):
    m, k = shape
    keep = klinear.dropout_mask(seed, m, k, p, "cpu") if path == "triton" else dropout_keep(seed, (m, k), p, "cpu")
    return keep.double() / (1.0 - p)


def _reference(x, members, path, seeds, dys):
    """Each member's float64 output and gradients (x's gradient summed over the members)."""
    x64 = x.detach().double().requires_grad_()
    refs = []
    for m, seed, dy in zip(members, seeds, dys, strict=True):
        a, b = (t.detach().double().requires_grad_() for t in (m.lora_A, m.lora_B))
        bias = m.bias.detach().double().requires_grad_() if m.bias is not None else None
        mask = _mask(path, seed, m.dropout_p, (x.numel() // K, K)).reshape(x.shape) if m.dropout_p > 0 else None
        if m.lora_bias is not None:
            lb = m.lora_bias.detach().double().requires_grad_()
            y = lora_linear_bias_ref(x64, m.weight.double(), bias, a, b, lb, m.scaling, mask=mask)
        else:
            lb = None
            y = lora_linear_ref(x64, m.weight.double(), bias, a, b, m.scaling, mask=mask)
        y.backward(dy.double())
        refs.append({"y": y, "dA": a.grad, "dB": b.grad, "dbias": bias.grad if bias is not None else None,
                     "dlb": lb.grad if lb is not None else None})  # fmt: skip
    return x64.grad, refs


def _check(path, dtype, members, lead=(), factor=1.0):
    x = torch.randn(*lead, M, K, dtype=dtype).requires_grad_()
    seeds = _next_seeds(members)
    with on_path(path):
        ys = lora_linear_group(x, members)
    dys = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, dys)
    dx64, refs = _reference(x, members, path, seeds, dys)
    assert_close(x.grad, dx64, dtype, "dX", factor)
    for i, (m, y, ref) in enumerate(zip(members, ys, refs, strict=True)):
        assert y.dtype == dtype and y.shape == (*lead, M, m.weight.shape[0])
        assert_close(y, ref["y"], dtype, f"Y{i}", factor)
        assert_close(m.lora_A.grad, ref["dA"], dtype, f"dA{i}", factor)
        assert_close(m.lora_B.grad, ref["dB"], dtype, f"dB{i}", factor)
        assert m.weight.grad is None
        if m.bias is not None and m.bias.requires_grad:
            assert_close(m.bias.grad, ref["dbias"], dtype, f"dbias{i}", factor)
        if m.lora_bias is not None:
            assert_close(m.lora_bias.grad, ref["dlb"], dtype, f"dlora_bias{i}", factor)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("ps", [(0.0, 0.0, 0.0), (0.25, 0.0, 0.5), (0.1, 0.2, 0.3)], ids=["p0", "mixed", "all"])
def test_matches_reference(path, dtype, ps):
    _check(path, dtype, _members(QKV, dtype, ps=ps))


@pytest.mark.parametrize("path", PATHS)
def test_two_members_trained_bias_and_lora_bias(path):
    """gate/up-like (two members of one width), trained biases and PEFT's lora_bias, 3-D input."""
    members = _members(((43, 4), (43, 4)), torch.float32, bias_trains=True, lora_bias=True)
    _check(path, torch.float32, members, lead=(2,))


@pytest.mark.parametrize("path", PATHS)
def test_ranks_beyond_one_rank_tile(path):
    """Ranks summing past the 64-wide rank tile: the rank passes and the dX epilogue walk several tiles, a member
    straddling two of them."""
    _check(path, torch.float32, _members(((21, 40), (17, 33), (9, 2)), torch.float32, ps=(0.0, 0.3, 0.0)))


@pytest.mark.parametrize("path", PATHS)
def test_one_and_four_members(path):
    _check(path, torch.float32, _members(((23, 3),), torch.float32, ps=(0.2,)))
    _check(path, torch.float32, _members(((23, 3), (9, 5), (31, 2), (9, 6)), torch.float32, ps=(0.2, 0, 0.1, 0)))


@pytest.mark.parametrize("choice", ["members", "cublas+update"])
def test_dispatch_alternatives(monkeypatch, choice):
    """The alternatives the measured dispatch may pick on a GPU, under the interpreter: for the forward GEMM one
    fused GEMM per member on its columns of S ("members") or cuBLAS plus the r-wide update; for dX cuBLAS plus the
    members' r-wide (masked) updates, every dA from the dS pass."""
    from fastlora.kernels import group as kgroup

    def pick(kind, shape, candidates, device):
        return choice if choice in candidates else "cublas+update"

    monkeypatch.setattr(kgroup, "_measured_path", pick)
    _check("triton", torch.float32, _members(QKV, torch.float32, ps=(0.2, 0.0, 0.3)))


@pytest.mark.parametrize("path", PATHS)
def test_equals_one_lora_linear_per_member(path):
    """With the seeds each member's own call would draw, the group gives each member lora_linear's output and
    gradients (the same kernels' math and masks)."""
    members = _members(QKV, torch.float32, ps=(0.3, 0.0, 0.2))
    x = torch.randn(M, K).requires_grad_()
    torch.manual_seed(11)
    with on_path(path):
        ys = lora_linear_group(x, members)
    dys = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, dys)
    grads = [(m.lora_A.grad.clone(), m.lora_B.grad.clone()) for m in members]
    dx = x.grad.clone()
    x.grad = None
    for m in members:
        m.lora_A.grad = m.lora_B.grad = None
    torch.manual_seed(11)  # one draw of n seeds equals n draws of one on the CPU generator
    with on_path(path):
        singles = [fl.lora_linear(x, *m[:4], m.scaling, m.dropout_p, lora_bias=m.lora_bias) for m in members]
    torch.autograd.backward(singles, dys)
    for i, (m, y, s) in enumerate(zip(members, ys, singles, strict=True)):
        assert_close(y, s.double(), torch.float32, f"Y{i}")
        assert_close(grads[i][0], m.lora_A.grad.double(), torch.float32, f"dA{i}")
        assert_close(grads[i][1], m.lora_B.grad.double(), torch.float32, f"dB{i}")
    assert_close(dx, x.grad.double(), torch.float32, "dX")


@pytest.mark.parametrize("path", PATHS)
def test_member_without_gradient_gets_none(path):
    """A member whose output takes no part in the loss gets no gradients (None), and dX is the others' alone."""
    members = _members(QKV, torch.float32, ps=(0.0, 0.2, 0.0))
    x = torch.randn(M, K).requires_grad_()
    seeds = _next_seeds(members)
    with on_path(path):
        ys = lora_linear_group(x, members)
    dys = [torch.randn_like(y) for y in ys]
    torch.autograd.backward([ys[0], ys[2]], [dys[0], dys[2]])
    assert members[1].lora_A.grad is None and members[1].lora_B.grad is None
    dx64, refs = _reference(x, [members[0], members[2]], path, [seeds[0], seeds[2]], [dys[0], dys[2]])
    assert_close(x.grad, dx64, torch.float32, "dX")
    for i, ref in zip((0, 2), refs, strict=True):
        assert_close(members[i].lora_A.grad, ref["dA"], torch.float32, f"dA{i}")
        assert_close(members[i].lora_B.grad, ref["dB"], torch.float32, f"dB{i}")


def test_saves_x_once_and_one_s(monkeypatch):
    """Saved for backward beyond x and the parameters: S [M, sum r] and the seeds, nothing of size M x K or M x N."""
    members = _members(QKV, torch.float32, ps=(0.1, 0.1, 0.1))
    x = torch.randn(M, K).requires_grad_()
    with on_path("torch"):
        extra = saved_bytes(lambda: lora_linear_group(x, members)[0], x, *[t for m in members for t in m[:4]])
    assert extra == M * sum(r for _, r in QKV) * 4 + 3 * 8


def test_interpreter_launches(monkeypatch):
    """Under the interpreter: forward two kernels and no torch work; backward the memset of the float32 dA/dB
    workspace, the dS/dB pass, the dX GEMM and one cast (bfloat16 adapters)."""
    import helpers  # noqa: F401 (conftest's poisoning is undone below)
    from launches import unpoisoned_empty

    unpoisoned_empty(monkeypatch)
    members = _members(QKV, torch.bfloat16, lora_dtype=torch.bfloat16, bias=False)
    x = torch.randn(M, K, dtype=torch.bfloat16).requires_grad_()
    with on_path("triton"), LaunchCounter() as fwd:
        ys = lora_linear_group(x, members)
    assert fwd.kernels == ["_group_down_kernel", "_group_gemm_kernel"], fwd.kernels
    assert fwd.torch_ops == [], fwd.torch_ops
    dys = [torch.randn_like(y) for y in ys]
    with on_path("triton"), LaunchCounter() as bwd:
        torch.autograd.backward(ys, dys)
    assert bwd.kernels == ["_group_ds_kernel", "_group_dx_kernel"], bwd.kernels
    assert bwd.total <= 4, (bwd.kernels, bwd.torch_ops)


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda ms: ms[:1] + [ms[1]._replace(weight=torch.randn(19, K + 1))] + ms[2:], "group member 1"),
        (lambda ms: ms + ms[:2], "1 to 4 members"),
        (lambda ms: [], "1 to 4 members"),
        (lambda ms: ms[:2] + [ms[2]._replace(dropout_p=1.0)], "group member 2"),
        (lambda ms: ms[:2] + [ms[2]._replace(lora_B=torch.randn(19, 4))], "group member 2"),
    ],
    ids=["in-features", "five", "none", "dropout", "rank"],
)
def test_bad_members_are_refused(change, error):
    members = change(_members(QKV, torch.float32))
    with pytest.raises(ValueError, match=error):
        lora_linear_group(torch.randn(M, K), members)


def test_members_must_be_group_members():
    with pytest.raises(TypeError, match="GroupMember"):
        lora_linear_group(torch.randn(M, K), [(torch.randn(3, K),)])


@pytest.mark.parametrize("n", [2, 3])
def test_opcheck(n):
    """The compiled custom op: schema, fake, autograd registration."""
    members = _members(QKV[:n], torch.float32, ps=(0.0,) * n)
    x = torch.randn(M, K).requires_grad_()
    flat = []
    for m in members:
        flat += [m.weight, m.bias, m.lora_A, m.lora_B, m.lora_bias, float(m.scaling), 0.0]
    with on_path("torch"):
        torch.library.opcheck(getattr(torch.ops.fastlora, GROUP_OPS[n].name), (x, *flat, None))
