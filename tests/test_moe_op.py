"""The lora_experts op (fastlora.ops.moe, kernels/moe.py): the grouped kernels under the Triton interpreter and the
torch path against the float64 reference (fastlora.reference_moe), launches, determinism, the compiled entry
points and bad input.

Shapes are small and odd (K = 37, N = 29, r = 3, 5 experts of 11, 0, 19, 1 and 10 rows), so every tile is partial,
one expert has no rows and one a single row. bfloat16 runs in float32 under the interpreter (the dot_dtype switch);
the bf16 tensor-core path itself is covered by the ahead-of-time compile (tests/test_aot_moe.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TOLERANCE, assert_close
from launches import count_launches, unpoisoned_empty
from lora_cases import PATHS, on_path

import fastlora as fl
from fastlora.ops.moe import EXPERTS, experts_linear, lora_experts
from fastlora.reference_moe import expert_factors, experts_delta_weight, lora_experts_ref

E, K, N, R = 5, 37, 29, 3
COUNTS = (11, 0, 19, 1, 10)
ROWS = sum(COUNTS)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _offsets(counts=COUNTS, dtype=torch.int64):
    return torch.tensor(counts).cumsum(0).to(dtype)


def _operands(dtype, transposed=False, bias=True, lora=True, adapter_dtype=None, rows=ROWS):
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(rows, K, dtype=dtype).requires_grad_()
    weight = (torch.randn(E, K, N) if transposed else torch.randn(E, N, K)).mul_(K**-0.5).to(dtype)
    b = torch.randn(E, N, dtype=dtype) if bias else None
    lora_A = torch.randn(R * E, K, dtype=adapter_dtype).mul_(K**-0.5).requires_grad_() if lora else None
    lora_B = torch.randn(N, R * E, dtype=adapter_dtype).requires_grad_() if lora else None
    return x, weight, b, lora_A, lora_B


def _reference(x, weight, bias, lora_A, lora_B, scaling, offsets, transposed, dy):
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, lora_A, lora_B)]
    y = lora_experts_ref(leaves[0], weight.double(), None if bias is None else bias.double(), leaves[1], leaves[2],
                         scaling, offsets, transposed)  # fmt: skip
    y.backward(dy.double())
    return y.detach(), *[t.grad if t is not None else None for t in leaves]


# Every dtype and layout on the torch path; on the interpreter (a few seconds a case) each dtype once and both
# layouts in float32.
_F64_CASES = [("torch", dt, tr) for dt in DTYPES for tr in (False, True)] + [
    ("triton", torch.float32, False), ("triton", torch.float32, True), ("triton", torch.float16, False),
    ("triton", torch.bfloat16, True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "dtype", "transposed"),
    _F64_CASES,
    ids=[f"{'interp' if p == 'triton' else p}-{str(d)[6:]}-{'EinOut' if t else 'EoutIn'}" for p, d, t in _F64_CASES],
)
def test_matches_float64(path, dtype, transposed):
    x, weight, bias, lora_A, lora_B = _operands(dtype, transposed)
    offsets = _offsets()
    with fl.use_backend(path):
        y = lora_experts(x, weight, bias, lora_A, lora_B, 0.7, offsets, transposed)
        dy = torch.randn_like(y)
        y.backward(dy)
    ref_y, ref_dx, ref_da, ref_db = _reference(x, weight, bias, lora_A, lora_B, 0.7, offsets, transposed, dy)
    assert y.dtype == dtype and lora_A.grad.dtype == dtype
    for name, out, ref in (("y", y, ref_y), ("dx", x.grad, ref_dx), ("dA", lora_A.grad, ref_da),
                           ("dB", lora_B.grad, ref_db)):  # fmt: skip
        assert_close(out, ref, dtype, name)
    assert weight.grad is None and bias.grad is None
    a3, b3 = expert_factors(lora_A.grad, lora_B.grad, E)
    assert not a3[1].any() and not b3[1].any(), "the expert without rows gets exactly zero gradients"


@pytest.mark.parametrize("path", PATHS)
def test_float32_adapters_on_a_bfloat16_base(path):
    """Adapters in float32 over a bf16 base (PEFT's autocast set-up): computed in bf16, gradients in float32."""
    x, weight, bias, lora_A, lora_B = _operands(torch.bfloat16, adapter_dtype=torch.float32)
    offsets = _offsets(dtype=torch.int32)
    with on_path(path):
        y = lora_experts(x, weight, bias, lora_A, lora_B, 2.0, offsets)
        dy = torch.randn_like(y)
        y.backward(dy)
    ref_y, ref_dx, ref_da, ref_db = _reference(x, weight, bias, lora_A, lora_B, 2.0, offsets, False, dy)
    assert lora_A.grad.dtype == lora_B.grad.dtype == torch.float32
    for name, out, ref in (("y", y, ref_y), ("dx", x.grad, ref_dx), ("dA", lora_A.grad, ref_da),
                           ("dB", lora_B.grad, ref_db)):  # fmt: skip
        assert_close(out, ref, torch.bfloat16, name)


@pytest.mark.parametrize("path", PATHS)
def test_without_adapter_and_rank_above_one_tile(path):
    """No adapter: the grouped product alone (dX only). Rank 70 (E=5: 350 rows of A): the rank walked in tiles."""
    x, weight, bias, _, _ = _operands(torch.float32, lora=False)
    offsets = _offsets()
    with on_path(path):
        y = lora_experts(x, weight, bias, None, None, 1.0, offsets)
        dy = torch.randn_like(y)
        y.backward(dy)
    ref_y, ref_dx, _, _ = _reference(x, weight, bias, None, None, 1.0, offsets, False, dy)
    assert_close(y, ref_y, torch.float32, "y")
    assert_close(x.grad, ref_dx, torch.float32, "dx")

    r = 70
    x = x.detach().requires_grad_()
    lora_A = torch.randn(r * E, K).mul_(K**-0.5).requires_grad_()
    lora_B = torch.randn(N, r * E).mul_(r**-0.5).requires_grad_()
    with on_path(path):
        y = lora_experts(x, weight, None, lora_A, lora_B, 0.5, offsets)
        y.backward(dy)
    ref = _reference(x, weight, None, lora_A, lora_B, 0.5, offsets, False, dy)
    for name, out, expected in zip(("y", "dx", "dA", "dB"), (y, x.grad, lora_A.grad, lora_B.grad), ref, strict=True):
        assert_close(out, expected, torch.float32, name)


def test_trained_bias_and_base_weight():
    """A bias that requires grad gets rowsum(dY) per expert; a base weight that requires grad gets dW, with the
    warning (it is meant to be frozen)."""
    x, weight, bias, lora_A, lora_B = _operands(torch.float32)
    bias.requires_grad_()
    weight.requires_grad_()
    offsets = _offsets()
    with pytest.warns(UserWarning, match="requires grad"):
        y = lora_experts(x, weight, bias, lora_A, lora_B, 0.7, offsets)
        dy = torch.randn_like(y)
        y.backward(dy)
    w64, b64 = weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    lora_experts_ref(x.detach().double(), w64, b64, lora_A.detach().double(), lora_B.detach().double(), 0.7,
                     offsets).backward(dy.double())  # fmt: skip
    assert_close(bias.grad, b64.grad, torch.float32, "dbias")
    assert_close(weight.grad, w64.grad, torch.float32, "dW")


def test_delta_weight_is_the_split_form():
    """The reference's merged delta agrees with its split form (the spec is consistent with PEFT's get_delta_weight
    layout: B_e A_e per expert, transposed for [E, in, out] weights)."""
    x, weight, _, lora_A, lora_B = _operands(torch.float64, transposed=True)
    offsets = _offsets()
    merged = weight + experts_delta_weight(lora_A, lora_B, 0.7, E, transposed=True)
    split = lora_experts_ref(x, weight, None, lora_A, lora_B, 0.7, offsets, transposed=True)
    torch.testing.assert_close(lora_experts_ref(x, merged, None, None, None, 0.0, offsets, True), split)


def test_launches_and_no_syncs(monkeypatch):
    """Forward two launches, backward four, on the interpreter (as on a GPU): no torch op, no host read."""
    unpoisoned_empty(monkeypatch)
    x, weight, bias, lora_A, lora_B = _operands(torch.float32)
    offsets = _offsets()
    with on_path("triton"), count_launches() as fwd:
        y = experts_linear(x, weight, bias, lora_A, lora_B, 0.7, offsets)
    with on_path("triton"), count_launches() as bwd:
        y.backward(torch.randn_like(y))
    assert fwd.triton == ["_moe_down_kernel", "_moe_gemm_kernel"] and not fwd.torch and not fwd.syncs, fwd
    assert sorted(bwd.triton) == sorted(["_moe_down_kernel", "_moe_grad_kernel", "_moe_gemm_kernel",
                                         "_moe_grad_kernel"]), bwd  # fmt: skip
    assert not bwd.syncs, bwd


def test_bitwise_reproducible():
    """No atomics and no split partials: every output is summed in a fixed order."""
    x, weight, bias, lora_A, lora_B = _operands(torch.float32)
    offsets = _offsets()
    dy = torch.randn(ROWS, N)
    grads = []
    for _ in range(2):
        for t in (x, lora_A, lora_B):
            t.grad = None
        with on_path("triton"):
            y = lora_experts(x, weight, bias, lora_A, lora_B, 0.7, offsets)
            y.backward(dy)
        grads.append([y.detach(), x.grad, lora_A.grad, lora_B.grad])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_compiled_entry_points_match_eager():
    """torch.compile(fullgraph=True) runs the custom op and its backward; the fake gives the shapes."""
    x, weight, bias, lora_A, lora_B = _operands(torch.float32)
    offsets = _offsets()
    dy = torch.randn(ROWS, N)

    def step(x, lora_A, lora_B):
        return lora_experts(x, weight, bias, lora_A, lora_B, 0.7, offsets)

    with on_path("torch"):
        y = step(x, lora_A, lora_B)
        y.backward(dy)
        eager = [y.detach(), x.grad, lora_A.grad, lora_B.grad]
        for t in (x, lora_A, lora_B):
            t.grad = None
        y = torch.compile(step, backend="aot_eager", fullgraph=True)(x, lora_A, lora_B)
        y.backward(dy)
    for out, ref in zip((y, x.grad, lora_A.grad, lora_B.grad), eager, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (x, weight, lora_A, lora_B, offsets)]
        y, s = EXPERTS._fake(EXPERTS.Args(fake[0], fake[1], None, fake[2], fake[3], fake[4], 0.7, False))
    assert tuple(y.shape) == (ROWS, N) and tuple(s.shape) == (ROWS, R)


def test_empty_rows():
    x, weight, bias, lora_A, lora_B = _operands(torch.float32, rows=0)
    offsets = torch.zeros(E, dtype=torch.int64)
    y = lora_experts(x, weight, bias, lora_A, lora_B, 0.7, offsets)
    y.sum().backward()
    assert y.shape == (0, N) and not lora_A.grad.any() and not lora_B.grad.any()


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: a.update(x=a["x"][:, :-1]), ValueError, "in_features=37"),
        (lambda a: a.update(weight=a["weight"][0]), ValueError, "weight must be 3-D"),
        (lambda a: a.update(bias=a["bias"][:, :-1]), ValueError, r"bias must have shape \[5, 29\]"),
        (lambda a: a.update(lora_A=a["lora_A"][:-1]), ValueError, r"lora_A must have shape \[r \* 5, 37\]"),
        (lambda a: a.update(lora_B=a["lora_B"][:, :-5]), ValueError, r"lora_B must have shape \[29, 15\]"),
        (lambda a: a.update(lora_B=None), ValueError, "both be given or both be None"),
        (lambda a: a.update(offsets=a["offsets"].float()), TypeError, "offsets must be a 1-D int32 or int64"),
        (lambda a: a.update(offsets=a["offsets"][:-1]), ValueError, "one entry per expert"),
        (lambda a: a.update(offsets=torch.tensor([11, 11, 30, 31, 40])), ValueError, "ending at the 41 rows"),
        (lambda a: a.update(offsets=torch.tensor([11, 10, 30, 31, 41])), ValueError, "non-decreasing"),
        (lambda a: a.update(x=a["x"].half()), TypeError, "x is float16 but weight is float32"),
        (lambda a: a.update(scaling=torch.tensor(0.5)), TypeError, "scaling must be a Python float"),
        (lambda a: a.update(transposed=1), TypeError, "transposed must be a bool"),
    ],
)
def test_bad_input(change, error, match):
    x, weight, bias, lora_A, lora_B = _operands(torch.float32)
    args = dict(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, scaling=0.7, offsets=_offsets(),
                transposed=False)  # fmt: skip
    change(args)
    with pytest.raises(error, match=match):
        lora_experts(**args)


def test_tolerance_table_is_the_shared_one():
    assert TOLERANCE[torch.float32] <= 1e-5  # the fp32 bar the model-level tests hold fastlora to as well
    assert fl.active_path("cpu") in ("triton-interpreter", "torch")


_STAND_IN = """
import json, torch
from fastlora.benchmarks import host
from fastlora.benchmarks.host import DRIVER_LAUNCH
from fastlora.ops.moe import experts_linear
E, K, N, r = 8, 256, 512, 16
offsets = torch.tensor([37, 37, 100, 150, 151, 200, 260, 300])
counts = {}
for dtype in (torch.bfloat16, torch.float32):
    x = torch.randn(300, K, dtype=dtype, requires_grad=True)
    weight = torch.randn(E, K, N, dtype=dtype)
    bias = torch.randn(E, N, dtype=dtype)
    lora_A = torch.randn(r * E, K, requires_grad=True)
    lora_B = torch.randn(N, r * E, requires_grad=True)
    with host.stand_in_gpu():
        for lora in (True, False):
            a, b = (lora_A, lora_B) if lora else (None, None)
            n0 = DRIVER_LAUNCH.launches
            y = experts_linear(x, weight, bias, a, b, 0.5, offsets, True)
            n1 = DRIVER_LAUNCH.launches
            y.backward(torch.ones_like(y))
            counts[f"{dtype}-{lora}"] = [n1 - n0, DRIVER_LAUNCH.launches - n1]
print(json.dumps(counts))
"""


@pytest.mark.slow  # compiles the kernels for sm_90 for real (ptxas), in a fresh process without the interpreter
def test_gpu_launch_path_on_the_stand_in_driver():
    """The GPU path itself, on benchmarks/host.py's stand-in sm_90 driver (kernels compiled for real, launches
    stop at the driver): the autotuned grouped GEMM, the launch plans and the grids work for bf16 and fp32 (float32
    adapters on the bf16 base, transposed weights with biases); forward 2 launches and backward 4 with an adapter,
    1 and 1 without."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _STAND_IN], capture_output=True, text=True, env=env, timeout=900,
                          cwd=Path(__file__).parent.parent)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    for dtype in ("torch.bfloat16", "torch.float32"):
        assert counts[f"{dtype}-True"] == [2, 4] and counts[f"{dtype}-False"] == [1, 1], counts
