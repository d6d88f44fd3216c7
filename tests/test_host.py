"""Launch plans (kernels/launch.py) and the stand-in driver the host benchmark uses (benchmarks/host.py).

On the interpreter, a plan-launched toy kernel gives the same results as ``kernel[grid](...)``. Under the stand-in
sm_90 driver (a JITFunction compiled for real with the wheel's ptxas, launched into a no-op launcher), later calls
with a known key take the direct path, and a call whose specialisation differs (a misaligned pointer, an integer
that becomes 1) gets a plan of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from fastlora.benchmarks.host import DRIVER_LAUNCH, stand_in_driver
from fastlora.kernels.launch import LaunchPlans
from helpers import assert_close
from triton.runtime.jit import JITFunction


def _axpby(x_ptr, y_ptr, out_ptr, n, alpha, beta, BLOCK: tl.constexpr, HAS_Y: tl.constexpr):
    """out[i] = alpha * x[i] (+ beta * y[i] with HAS_Y), for i < n."""
    i_n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m_n = i_n < n
    b_out = alpha * tl.load(x_ptr + i_n, mask=m_n).to(tl.float32)
    if HAS_Y:
        b_out += beta * tl.load(y_ptr + i_n, mask=m_n).to(tl.float32)
    tl.store(out_ptr + i_n, b_out, mask=m_n)


def _configs():
    return [triton.Config({"BLOCK": 32}, num_warps=1), triton.Config({"BLOCK": 64}, num_warps=2)]


_interpreted = triton.jit(_axpby)  # an InterpretedFunction under TRITON_INTERPRET=1 (tests/conftest.py)


def _run_once(kernel_call, quantiles):
    """The interpreter has no device to time on: each config runs once and all tie (the first one is kept)."""
    kernel_call()
    return [0.0, 0.0, 0.0]


_interpreted_tuned = triton.autotune(configs=_configs(), key=["n"], do_bench=_run_once)(triton.jit(_axpby))
_compiled = JITFunction(_axpby)  # compiled for the active driver whatever the interpreter setting
_compiled_tuned = triton.autotune(configs=_configs(), key=["n"])(JITFunction(_axpby))


def _args(n, has_y=True, offset=0):
    x = torch.randn(n + offset)[offset:]
    y = torch.randn(n)
    out = torch.empty(n)
    return dict(x_ptr=x, y_ptr=y, out_ptr=out, n=n, alpha=0.75, beta=-1.25, HAS_Y=has_y)


def _reference(a):
    ref = a["alpha"] * a["x_ptr"].double()
    if a["HAS_Y"]:
        ref += a["beta"] * a["y_ptr"].double()
    return ref


@pytest.mark.parametrize("tuned", [False, True], ids=["jit", "autotuned"])
@pytest.mark.parametrize("n", [37, 75])
def test_plan_launch_matches_normal_launch_on_interpreter(tuned, n):
    kernel = _interpreted_tuned if tuned else _interpreted
    extra = {} if tuned else {"BLOCK": 16}
    grid = lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]),)  # noqa: E731
    plans = LaunchPlans(kernel, static=("n", "BLOCK", "HAS_Y"))
    for has_y in (True, False):
        for _ in range(2):  # the first call records the plan, the second follows it
            a = _args(n, has_y)
            kernel[grid](**a, **extra)
            normal = a["out_ptr"].clone()
            a["out_ptr"] = torch.empty(n)
            plans.launch((n, has_y), grid, **a, **extra)
            assert torch.equal(a["out_ptr"], normal)
            assert_close(a["out_ptr"], _reference(a), torch.float32)
    assert plans.direct_launches == 0  # the interpreter has no compiled kernel to launch directly


# The stand-in tests compile kernels for real. The interpreter, once a test has called a device function
# directly, leaves triton.language patched for the rest of the process (Triton 3.6: InterpretedFunction.__call__
# patches and never restores), and a real compile then fails: these tests run in a fresh process of their own.
_FRESH = os.environ.get("FASTLORA_TEST_FRESH_PROCESS") == "1"
fresh_process = pytest.mark.skipif(not _FRESH, reason="runs in a fresh process: test_stand_in_in_a_fresh_process")


def test_stand_in_in_a_fresh_process():
    env = {**os.environ, "FASTLORA_TEST_FRESH_PROCESS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", __file__,
           "-k", "stand_in and not fresh_process"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


@pytest.fixture
def launches():
    with stand_in_driver():
        before = DRIVER_LAUNCH.launches
        yield lambda: DRIVER_LAUNCH.launches - before


@fresh_process
def test_stand_in_launch_function_is_c_like(launches):
    """The launch function a compiled kernel's launcher ends in is, as on a GPU, no Python function: neither
    ``__code__`` nor ``__closure__``; for a kernel without tensor descriptors Triton 3.6 keeps it unwrapped."""
    plans = LaunchPlans(_compiled, static=("n",))
    compiled = plans.launch(37, (2,), **_args(37), BLOCK=32)
    launch = compiled.run.launch
    assert launch is DRIVER_LAUNCH or getattr(launch, "__name__", "") == "inner"
    for attr in ("__code__", "__closure__"):
        assert not hasattr(DRIVER_LAUNCH, attr)
    assert launches() == 1


@fresh_process
@pytest.mark.parametrize("tuned", [False, True], ids=["jit", "autotuned"])
def test_stand_in_takes_direct_path(tuned, launches):
    kernel = _compiled_tuned if tuned else _compiled
    extra = {} if tuned else {"BLOCK": 32}
    grid = lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]),)  # noqa: E731
    plans = LaunchPlans(kernel, static=("n", "BLOCK", "HAS_Y"))
    for _ in range(3):
        plans.launch(37, grid, **_args(37), **extra)
    assert (plans.normal_launches, plans.direct_launches, launches()) == (1, 2, 3)
    plan = plans.plan_for(37, **_args(37), **extra)
    block = 32  # the autotuner under the stand-in keeps the first config
    assert plan.direct and plan.grid == (triton.cdiv(37, block), 1, 1)
    assert plan.fixed.get("BLOCK", extra.get("BLOCK")) == block


@fresh_process
def test_stand_in_guard_replans_on_new_specialisation(launches):
    grid = (2, 1, 1)
    plans = LaunchPlans(_compiled, static=("n",))
    plans.launch(37, grid, **_args(37), BLOCK=32)
    plans.launch(37, grid, **_args(37, offset=1), BLOCK=32)  # x no longer 16-byte aligned
    plans.launch(37, grid, **_args(37, has_y=False), BLOCK=32)  # a constexpr the key does not name
    a = _args(37)
    a["alpha"] = 2.0
    plans.launch(37, grid, **a, BLOCK=32)  # a float: no new specialisation, so the direct path
    assert (plans.normal_launches, plans.direct_launches, launches()) == (3, 1, 4)


@fresh_process
def test_stand_in_direct_path_off_takes_normal_path(launches):
    plans = LaunchPlans(_compiled, static=("n",), direct=False)
    for _ in range(2):
        plans.launch(37, (2,), **_args(37), BLOCK=32)
    assert (plans.normal_launches, plans.direct_launches, launches()) == (2, 0, 2)


def _op_calls():
    import fastlora as fl

    def linear(m, k, n, r):
        x = torch.randn(m, k, requires_grad=True)
        w, b = torch.randn(n, k), torch.randn(n)
        a, bb = torch.randn(r, k, requires_grad=True), torch.randn(n, r, requires_grad=True)
        return lambda: fl.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.25, training=True), (x, a, bb)

    def embedding(m, v, d, r):
        idx = torch.randint(0, v, (m,))
        w = torch.randn(v, d)
        a, b = torch.randn(r, v, requires_grad=True), torch.randn(d, r, requires_grad=True)
        return lambda: fl.lora_embedding(idx, w, a, b, 0.5, padding_idx=1), (a, b)

    def conv2d(nb, c, o, r):
        x = torch.randn(nb, c, 7, 6, requires_grad=True)
        w, b = torch.randn(o, c, 3, 3), torch.randn(o)
        a, bb = torch.randn(r, c, 3, 3, requires_grad=True), torch.randn(o, r, 1, 1, requires_grad=True)
        return lambda: fl.lora_conv2d(x, w, b, a, bb, 0.5, padding=1, dropout_p=0.25, training=True), (x, a, bb)

    return {
        "linear": (linear, [(37, 75, 51, 5), (9, 33, 20, 3)]),
        "embedding": (embedding, [(37, 51, 75, 5), (9, 20, 33, 3)]),
        "conv2d": (conv2d, [(2, 5, 7, 5), (1, 3, 4, 3)]),
    }


@pytest.mark.parametrize("op", ["linear", "embedding", "conv2d"])
def test_op_launchers_with_plans_match_plain_launches(op, monkeypatch):
    """Each op's launchers go through kernels/launch.py's plans; calls alternating between two signatures (cached
    grids and configs per signature) give bitwise the results of plain ``kernel[grid]`` launches."""
    from fastlora.kernels import launch

    import fastlora as fl

    make, shapes = _op_calls()[op]

    def run_all():
        results = []
        for shape in [*shapes, *shapes]:
            torch.manual_seed(sum(shape))
            call, params = make(*shape)
            y = call()
            y.backward(torch.randn(y.shape))
            results.append([y.detach(), *(p.grad for p in params)])
        return results

    with fl.use_backend("triton"):
        planned = run_all()
        with monkeypatch.context() as m:
            m.setattr(launch, "plans_for", lambda kernel, dynamic=(): LaunchPlans(kernel, direct=False))
            for module in ("linear", "embedding", "conv2d"):
                m.setattr(f"fastlora.kernels.{module}.plans_for", launch.plans_for)
            plain = run_all()
    for got, want in zip(planned, plain, strict=True):
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)


_REPLAY_SCRIPT = r"""
import json, sys, torch
from fastlora.benchmarks import host
from fastlora.kernels import linear as kl
import fastlora as fl
from fastlora.ops import linear as ops_linear

seeds = []
draw = ops_linear.draw_seed
ops_linear.draw_seed = lambda x: seeds.append(draw(x)) or seeds[-1]

calls = []
host.DRIVER_LAUNCH.sink = lambda args: calls[-1].append(args)
# the handles left out: the function, and the metadata (their place in each Triton's launch protocol); a later
# Triton packs the kernel's arguments into one tuple at the end
packed = hasattr(host.DRIVER_LAUNCH, "sink") and host._StandInUtils.launch is host.DRIVER_LAUNCH and \
    hasattr(__import__("triton.backends.driver").backends.driver, "wrap_handle_tensordesc_impl")
handles = (4, 7) if packed else (4, 9)
# descriptors carry their global address, so the comparison below sees which tensor each one points at
host._StandInUtils.fill_tma_descriptor = lambda self, ptr, *rest: ("desc", ptr, repr(rest))
m, k, n, r, p = (int(v) if i < 4 else float(v) for i, v in enumerate(sys.argv[1:]))
dtype = torch.bfloat16
w, bias = torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)
a = torch.randn(r, k, dtype=dtype, requires_grad=True)
b = torch.randn(n, r, dtype=dtype, requires_grad=True)
x0 = torch.randn(m, k, dtype=dtype, requires_grad=True)
dy = torch.randn(m, n, dtype=dtype)
out = []
with host.stand_in_gpu():
    for x in (x0, x0, x0, torch.randn(m, k, dtype=dtype, requires_grad=True)):
        calls.append([])
        fl.lora_linear(x, w, bias, a, b, 0.5, dropout_p=p, training=True).backward(dy)
        names = {x.data_ptr(): "x", w.data_ptr(): "w", bias.data_ptr(): "bias", a.data_ptr(): "A",
                 b.data_ptr(): "B", dy.data_ptr(): "dy"}
        if p > 0:
            names[seeds[-1].data_ptr()] = "seed"  # this call's seed tensor, wherever the allocator put it
        fresh = {}

        def canon(v):
            if isinstance(v, torch.Tensor):
                v = v.data_ptr()
                return names.get(v) or "fresh%d" % fresh.setdefault(v, len(fresh))
            if type(v) is int and v >= 1 << 32:  # a pointer passed as its address (no kernel integer is this large)
                return canon_ptr(v)
            if isinstance(v, tuple) and v[:1] == ("desc",):
                return ["desc", canon_ptr(v[1]), v[2]]
            return v if isinstance(v, (int, float, str, type(None))) else repr(type(v))

        def canon_ptr(ptr):
            return names.get(ptr) or "fresh%d" % fresh.setdefault(ptr, len(fresh))

        flat = [(*args[:-1], *args[-1]) if packed else args for args in calls[-1]]
        out.append([[canon(v) for i, v in enumerate(args) if i not in handles] for args in flat])
# the op's plans hold its replay slots (one signature per call, see fastlora/ops/linear.py); direct launcher calls
# would use kl.REPLAYS
plans = list(ops_linear._PLANS.values())
replays = sorted({"fwd" for plan in plans if plan.forward.replay}
                 | {"bwd" for plan in plans for slot in plan.backward_slots.values() if slot.replay}
                 | {kind for kind, r in kl.REPLAYS.items() if r.replays()})
print(json.dumps({"calls": out, "replays": replays}))
"""


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize(
    "shape",
    [(37, 72, 56, 8), (37, 75, 51, 5), (16, 4096, 56, 8)],
    ids=["M37-K72-N56-r8-tma", "M37-K75-N51-r5", "M16-K4096-N56-r8-split"],
)
def test_linear_replay_launches_what_the_normal_path_launches(shape, p):
    """Under the stand-in sm_90 driver (a subprocess: the kernels compile for real there), the third call of a
    signature replays the launches the second recorded (kernels/launch.py Replay) and a fourth with a new x replays
    with x's pointer: each driver launch gets the same arguments as on the normal path (integers, floats, which
    tensor each pointer and TMA descriptor addresses, the dropout seed's tensor among them: every call's launches
    read that call's seed, never a recorded value), for the forward and the backward. A forward whose S
    pass is split over K (a torch sum of the partials between its launches) is never replayed."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _REPLAY_SCRIPT, *map(str, shape), str(p)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    split = shape[1] == 4096
    assert result["replays"] == (["bwd"] if split else ["bwd", "fwd"])
    first, recorded, replayed, new_x = result["calls"]
    assert len(recorded) == len(first) >= 3
    assert replayed == recorded
    assert new_x == recorded
    reads_seed = ["seed" in args for args in recorded]
    assert any(reads_seed) == (p > 0)
    tma = any(isinstance(v, list) and v[0] == "desc" for args in recorded for v in args)
    assert tma == (shape[3] == 8)  # r = 5 makes S's rows 10 bytes apart: no TMA, the pointer kernels


# ----------------------------------------------------------------------------------------------------------
# One call signature per lora_linear call (fastlora/ops/linear.py _plan) and the replay slots it holds
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["torch", "triton"], ids=["torch", "interp"])
def test_linear_plan_checks_every_new_signature(path, monkeypatch):
    """A signature that passed its checks keeps its plan; a call that differs in anything the checks read (an
    argument's type, a value, a dtype, a device) is a new signature and is checked again, even with the same
    tensors: a bool scaling after a float one, a dropout of 1, a weight of another dtype."""
    import fastlora as fl
    from fastlora.ops import linear as ops_linear
    from fastlora.reference import lora_linear_ref

    monkeypatch.setattr(ops_linear, "_PLANS", {})
    x, w, bias = torch.randn(7, 5), torch.randn(4, 5), torch.randn(4)
    a, b = torch.randn(3, 5), torch.randn(4, 3)
    with fl.use_backend(path):
        first = fl.lora_linear(x, w, bias, a, b, 1.0)
        assert len(ops_linear._PLANS) == 1
        for scaling, error in ((True, TypeError), ("1.0", TypeError), (torch.tensor(1.0), TypeError)):
            with pytest.raises(error, match="scaling"):
                fl.lora_linear(x, w, bias, a, b, scaling)
        with pytest.raises(ValueError, match="dropout_p"):
            fl.lora_linear(x, w, bias, a, b, 1.0, dropout_p=1.0)
        with pytest.raises(TypeError, match="weight"):
            fl.lora_linear(x, w.double(), bias, a, b, 1.0)
        with pytest.raises(ValueError, match="device"):
            fl.lora_linear(x, w, bias.to("meta"), a, b, 1.0)
        assert len(ops_linear._PLANS) == 1  # failed calls leave no plan
        again = fl.lora_linear(x, w, bias, a, b, 1)  # an int scaling: a signature of its own, the same result
    assert len(ops_linear._PLANS) == 2
    ref = lora_linear_ref(x.double(), w.double(), bias.double(), a.double(), b.double(), 1.0)
    assert_close(first, ref, torch.float32)
    assert torch.equal(again, first)


def test_linear_plans_are_bounded(monkeypatch):
    """Variable-length batches make a signature per length: the plans keep the newest _MAX_PLANS of them."""
    import fastlora as fl
    from fastlora.ops import linear as ops_linear

    monkeypatch.setattr(ops_linear, "_PLANS", {})
    monkeypatch.setattr(ops_linear, "_MAX_PLANS", 5)
    w, a, b = torch.randn(4, 5), torch.randn(3, 5), torch.randn(4, 3)
    with fl.use_backend("torch"):
        for m in range(1, 13):
            fl.lora_linear(torch.randn(m, 5), w, None, a, b, 0.5)
            assert len(ops_linear._PLANS) == min(m, 5)
    assert [key[0][0][0] for key in ops_linear._PLANS] == [8, 9, 10, 11, 12]  # x's rows, oldest dropped first


def test_linear_backward_slot_per_alignment():
    """The backward's replay slot is chosen by need_dx, dY's dtype and the operands' 16-byte alignment: a
    misaligned dY (a view one element in) gets a slot of its own, never the aligned call's replay."""
    pytest.importorskip("triton")
    from fastlora.ops.linear import _Plan

    plan = _Plan()
    x, w, a, b = torch.randn(7, 5), torch.randn(4, 5), torch.randn(3, 5), torch.randn(4, 3)
    dy, dy_shifted = torch.randn(7, 4), torch.randn(7 * 4 + 1)[1:].view(7, 4)
    aligned = plan.backward(True, dy, x, w, a, b)
    assert plan.backward(True, torch.randn(7, 4), x, w, a, b) is aligned
    assert plan.backward(False, dy, x, w, a, b) is not aligned
    assert plan.backward(True, dy_shifted, x, w, a, b) is not aligned
    assert plan.backward(True, dy.half(), x, w, a, b) is not aligned
    assert len(plan.backward_slots) == 4


def test_replay_slot_without_launches_stays_on_the_normal_path():
    """A ReplaySlot runs its call on the first call, records it on the second and, when the recording cannot be
    replayed (here: no launches at all), takes the normal path for good; Replays keeps maxsize slots."""
    from fastlora.kernels.launch import Replays, ReplaySlot

    calls = []
    slot = ReplaySlot()
    for i in range(4):
        assert slot((), lambda i=i: calls.append(i) or i) == i
    assert calls == [0, 1, 2, 3] and slot.replay is None
    replays = Replays(maxsize=2)
    for key in "abc":
        replays(key, (), lambda: None)
    assert len(replays) == 2 and replays.replays() == {}


def test_descriptor_expansions_are_bounded(monkeypatch):
    """The replay's expanded tensor descriptors are kept per base pointer, DESCRIPTORS_KEPT of them, the oldest
    dropped first; a kept one is what Triton's own expansion gives for that tensor. (Only Triton 3.6's launcher,
    whose descriptor expansion the replay takes over, has these.)"""
    pytest.importorskip("triton.tools.tensor_descriptor")
    from fastlora.kernels import launch
    from triton.backends.nvidia import driver as nvidia_driver

    if getattr(nvidia_driver, "_BASE_ARGS_FORMAT_LEN", None) != 13:
        pytest.skip("the replay expands descriptors itself only under Triton 3.6's launch protocol")
    make_tensordesc_arg = nvidia_driver.make_tensordesc_arg
    from triton.tools.tensor_descriptor import TensorDescriptor

    monkeypatch.setattr(launch, "DESCRIPTORS_KEPT", 3)
    meta = {"swizzle": 0, "elem_size": 4, "elem_type": 7, "block_size": [4, 4], "fp4_padded": False}
    tensors = [torch.randn(8, 4) for _ in range(5)]
    with stand_in_driver():
        cache, expand = launch._expander(TensorDescriptor.from_tensor(tensors[0], [4, 4]), meta)
        for t in tensors:
            args = expand(t)
            want = make_tensordesc_arg(TensorDescriptor.from_tensor(t, [4, 4]), meta)
            assert args[1:] == want[1:] and type(args[0]) is type(want[0])
    assert list(cache) == [t.data_ptr() for t in tensors[2:]]
