"""With torch.use_deterministic_algorithms(True), outputs and every gradient are bitwise identical run to run, the
kernels that ran executed no atomic operation, and the deterministic gradients match the float64 reference.

The interpreter runs a kernel's programs one after another, so atomics add up in the same order every run and
repeated runs alone could not tell a deterministic kernel from an atomic one: the tests count the atomics.
"""

import os

import pytest
import torch
from lora_cases import (
    DROPOUT_KINDS,
    LAYER_KINDS,
    PATHS,
    build_model,
    count_kernel_work,
    forward_backward,
    kind_param,
    make_input,
    on_path,
)

import fastlora
from fastlora._tolerance import TOLERANCE
from fastlora.validate import OPS, check_case, parse_shape

# cuBLAS needs a fixed workspace to be deterministic; it reads this when its handle is created.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

RUNS = 3

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
]


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


CASES = [
    pytest.param(kind, dropout, id=f"{kind}-p{dropout}", marks=kind_param(kind).marks)
    for kind in LAYER_KINDS
    for dropout in ((0.0, 0.3) if kind in DROPOUT_KINDS else (0.0,))
]


def _assert_runs_identical(runs):
    (out0, grads0), rest = runs[0], runs[1:]
    for i, (out, grads) in enumerate(rest, start=1):
        assert torch.equal(out, out0), f"run {i}: output differs bitwise from run 0"
        for name, g in grads.items():
            assert torch.equal(g, grads0[name]), f"run {i}: gradient {name} differs bitwise from run 0"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("kind", "dropout"), CASES)
def test_layers_bitwise_reproducible(kind, dropout, path, deterministic):
    model = build_model(kind, dropout=dropout)
    x = make_input(kind)
    runs = []
    with on_path(path):
        for _ in range(RUNS):
            torch.manual_seed(3)
            runs.append(forward_backward(model, x))
    _assert_runs_identical(runs)


def _functional_case(kind, device, dtype):
    """(fn, float inputs requiring grad) for one functional op, at a size whose reductions over M cross many tiles."""
    gen = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if kind == "linear":
        x, w, b = rnd(301, 37), rnd(29, 37), rnd(29)
        a, bb = rnd(6, 37), rnd(29, 6)
        return (lambda x, a, bb: fastlora.lora_linear(x, w, b, a, bb, 0.7, dropout_p=0.2)), (x, a, bb)
    if kind == "embedding":
        idx = torch.randint(0, 23, (301,), generator=gen).to(device)  # many repeats: the scatter-add collides
        w = rnd(23, 19)
        a, bb = rnd(6, 23), rnd(19, 6)
        return (lambda a, bb: fastlora.lora_embedding(idx, w, a, bb, 0.7)), (a, bb)
    x, w, b = rnd(3, 5, 11, 11), rnd(7, 5, 3, 3), rnd(7)
    a, bb = rnd(4, 5, 3, 3), rnd(7, 4, 1, 1)
    fn = lambda x, a, bb: fastlora.lora_conv2d(x, w, b, a, bb, 0.7, padding=1, dropout_p=0.2)  # noqa: E731
    return fn, (x, a, bb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", [kind_param(k) for k in LAYER_KINDS])
def test_functional_bitwise_reproducible(kind, path, device, dtype, deterministic):
    fn, inputs = _functional_case(kind, device, dtype)
    runs = []
    with on_path(path), count_kernel_work() as work:
        for _ in range(RUNS):
            leaves = [t.detach().clone().requires_grad_() for t in inputs]
            torch.manual_seed(3)
            out = fn(*leaves)
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out)
            out.backward(g)
            runs.append((out.detach(), {f"input{i}": t.grad for i, t in enumerate(leaves)}))
    _assert_runs_identical(runs)
    if path == "triton" and device == "cpu":
        assert work["launches"], f"{kind}: no Triton kernel ran on the interpreter path"
        assert not work["atomics"], f"{kind}: atomics ran in deterministic mode: {dict(work['atomics'])}"


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_default_mode_runs_atomics_the_counter_sees(kind):
    """Without deterministic mode the linear dB and the embedding dA scatter use atomics: the counter sees them."""
    assert not torch.are_deterministic_algorithms_enabled()
    fn, inputs = _functional_case(kind, "cpu", torch.float32)
    with on_path("triton"), count_kernel_work() as work:
        fn(*[t.detach().clone().requires_grad_() for t in inputs]).sum().backward()
    assert sum(work["atomics"].values()) > 0, f"{kind}: the default kernels ran no atomics: {dict(work['launches'])}"


@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
@pytest.mark.parametrize("path", PATHS)
def test_deterministic_linear_matches_float64(path, p, deterministic):
    """The deterministic linear backward (dB in its own pass over dY) against the float64 reference."""
    shape = parse_shape("M=301,K=37,N=29,r=6", "linear")
    with on_path(path), count_kernel_work() as work:
        rows = check_case(OPS["linear"], shape, torch.float32, "cpu", p, seed=11)
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    assert {r["tensor"] for r in rows} >= {"y", "dx", "dA", "dB"}
    assert all(r["rel_err"] <= TOLERANCE[torch.float32] for r in rows if r["tensor"] != "mask")
    if path == "triton":
        assert work["launches"] and not work["atomics"], dict(work["atomics"])
