"""LoRA embedding: kernels under the Triton interpreter and the torch path, against the float64 reference.

bfloat16 runs on both paths: under the interpreter the kernels load bfloat16, compute in float32 (the
dot_dtype switch; the interpreter cannot multiply bfloat16) and round on store, so the bf16 tensor-core
path itself is covered only by the ahead-of-time compile (tests/test_aot_compile.py) and by GPU runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastlora as fl
from fastlora.reference import lora_embedding_ref

try:
    from helpers import DTYPE_IDS, TOLERANCE, assert_close
    from lora_cases import PATHS, on_path
except ImportError:  # run as a script for the GPU checks, outside pytest
    DTYPE_IDS = TOLERANCE = assert_close = None
    PATHS, on_path = ("triton", "torch"), fl.use_backend

V, D = 53, 37
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _indices(shape, padding_idx=None, run=None):
    """Random indices with repeats: a few values drawn many times, the padding index among them."""
    idx = torch.randint(0, V, shape)
    flat = idx.view(-1)
    flat[torch.randperm(flat.numel())[: flat.numel() // 3]] = torch.randint(0, V, (3,)).repeat(flat.numel())[
        : flat.numel() // 3
    ]
    if padding_idx is not None:
        flat[torch.randperm(flat.numel())[:4]] = padding_idx % V
    if run is not None:
        flat[run[0] : run[1]] = run[2]
    return idx


def _operands(r, dtype, adapter_dtype=None):
    adapter_dtype = adapter_dtype or dtype
    weight = torch.randn(V, D, dtype=dtype)
    lora_A = torch.randn(r, V, dtype=adapter_dtype).requires_grad_()
    lora_B = (torch.randn(D, r, dtype=adapter_dtype) / r**0.5).requires_grad_()
    return weight, lora_A, lora_B


def _reference(idx, weight, lora_A, lora_B, scaling, padding_idx, dy):
    a64 = lora_A.detach().double().requires_grad_()
    b64 = lora_B.detach().double().requires_grad_()
    y64 = lora_embedding_ref(idx, weight.double(), a64, b64, scaling, padding_idx)
    y64.backward(dy.double())
    return y64.detach(), a64.grad, b64.grad


def _run(idx, weight, lora_A, lora_B, scaling, padding_idx=None):
    y = fl.lora_embedding(idx, weight, lora_A, lora_B, scaling, padding_idx)
    dy = torch.randn_like(y)
    y.backward(dy)
    return y, dy


class _LaunchCounter:
    """Wraps a Triton kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def kernel_launches(monkeypatch):
    """Counts launches of the embedding kernels, so a test can tell which path ran."""
    from fastlora.kernels import embedding as kemb

    counters = {}
    for name in ("_emb_fwd_kernel", "_emb_bwd_dy_kernel", "_emb_bwd_finish_kernel", "_emb_bwd_segment_kernel"):
        counters[name] = _LaunchCounter(getattr(kemb, name))
        monkeypatch.setattr(kemb, name, counters[name])
    return counters


# (r, idx shape, padding_idx): ranks 1, 5, 16; 1-D and 2-D indices; no padding, a padding index, a negative one
CASES = [(1, (41,), None), (5, (3, 14), 7), (16, (41,), -2), (5, (41,), None), (16, (2, 3, 7), 0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"r{c[0]}-idx{'x'.join(map(str, c[1]))}-pad{c[2]}")
@pytest.mark.parametrize("path", PATHS)
def test_matches_reference(kernel_launches, path, case, dtype):
    r, shape, padding_idx = case
    weight, lora_A, lora_B = _operands(r, dtype)
    idx = _indices(shape, padding_idx)
    scaling = 1.7
    with on_path(path):
        y, dy = _run(idx, weight, lora_A, lora_B, scaling, padding_idx)
    expected = 1 if path == "triton" else 0
    assert kernel_launches["_emb_fwd_kernel"].launches == kernel_launches["_emb_bwd_dy_kernel"].launches == expected
    y64, da64, db64 = _reference(idx, weight, lora_A, lora_B, scaling, padding_idx, dy)
    assert y.dtype == dtype and y.shape == (*shape, D)
    assert_close(y, y64, dtype, "Y")
    assert_close(lora_A.grad, da64, dtype, "dA")
    assert_close(lora_B.grad, db64, dtype, "dB")
    assert weight.grad is None
    if padding_idx is not None:
        assert torch.count_nonzero(lora_A.grad[:, padding_idx % V]) == 0


@pytest.mark.parametrize("path", PATHS)
def test_fp32_adapter_on_half_base(path):
    """Adapters kept in float32 over a float16 table: Y in float16, gradients in float32."""
    weight, lora_A, lora_B = _operands(5, torch.float16, adapter_dtype=torch.float32)
    idx = _indices((41,), 3)
    with on_path(path):
        y, dy = _run(idx, weight, lora_A, lora_B, 0.5, 3)
    y64, da64, db64 = _reference(idx, weight, lora_A, lora_B, 0.5, 3, dy)
    assert y.dtype == torch.float16 and lora_A.grad.dtype == lora_B.grad.dtype == torch.float32
    assert_close(y, y64, torch.float16, "Y")
    assert_close(lora_A.grad, da64, torch.float16, "dA")
    assert_close(lora_B.grad, db64, torch.float16, "dB")


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("r", [5, 70])
def test_kernel_backward_both_scatters(r, deterministic):
    """The launchers directly: both dA scatters, a run of one index across several blocks, rank above one tile."""
    from fastlora.kernels import embedding as kemb

    weight, lora_A, lora_B = _operands(r, torch.float32)
    idx = _indices((41,), 3, run=(2, 39, 11))
    y = kemb.lora_embedding_fwd(idx, weight, lora_A.detach(), lora_B.detach(), 0.9)
    dy = torch.randn_like(y)
    da, db = kemb.lora_embedding_bwd(
        dy, idx, lora_A.detach(), lora_B.detach(), 0.9, padding_idx=3, deterministic=deterministic
    )
    y64, da64, db64 = _reference(idx, weight, lora_A, lora_B, 0.9, 3, dy)
    assert_close(y, y64, torch.float32, "Y")
    assert_close(da, da64, torch.float32, "dA")
    assert_close(db, db64, torch.float32, "dB")
    assert torch.count_nonzero(da[:, 3]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: DTYPE_IDS[d])
def test_deterministic_mode_bitwise(kernel_launches, dtype):
    """Under torch.use_deterministic_algorithms the segment scatter runs and dA, dB repeat bit for bit."""
    weight, lora_A, lora_B = _operands(5, dtype)
    idx = _indices((3, 14), 7, run=(1, 30, 20))
    grads = []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            lora_A.grad = lora_B.grad = None
            y = fl.lora_embedding(idx, weight, lora_A, lora_B, 1.3, 7)
            y.backward(torch.ones_like(y))
            grads.append((lora_A.grad.clone(), lora_B.grad.clone()))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert kernel_launches["_emb_bwd_segment_kernel"].launches == 2
    assert kernel_launches["_emb_bwd_finish_kernel"].launches == 0
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    _, da64, db64 = _reference(idx, weight, lora_A, lora_B, 1.3, 7, torch.ones(3, 14, D, dtype=dtype))
    assert_close(grads[0][0], da64, dtype, "dA")
    assert_close(grads[0][1], db64, dtype, "dB")


@pytest.mark.parametrize("path", PATHS)
def test_int32_and_scalar_indices(path):
    weight, lora_A, lora_B = _operands(5, torch.float32)
    idx = _indices((41,), 6).to(torch.int32)
    with on_path(path):
        y, dy = _run(idx, weight, lora_A, lora_B, 1.1, 6)
        y0 = fl.lora_embedding(idx[3], weight, lora_A, lora_B, 1.1, 6)
    y64, da64, db64 = _reference(idx.long(), weight, lora_A, lora_B, 1.1, 6, dy)
    assert_close(y, y64, torch.float32, "Y")
    assert_close(lora_A.grad, da64, torch.float32, "dA")
    assert_close(lora_B.grad, db64, torch.float32, "dB")
    assert y0.shape == (D,)
    assert_close(y0, y64[3], torch.float32, "Y of a scalar index")


@pytest.mark.parametrize("path", PATHS)
def test_saves_idx_and_nothing_of_size_m_by_d(path):
    weight, lora_A, lora_B = _operands(5, torch.float32)
    idx = _indices((41,))
    saved = []
    with on_path(path), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fl.lora_embedding(idx, weight, lora_A, lora_B, 1.0)
    assert any(t is idx for t in saved)
    assert all(t.numel() < idx.numel() * D for t in saved), [tuple(t.shape) for t in saved]


@pytest.mark.parametrize("path", PATHS)
def test_trainable_base_weight_gets_dense_gradient(path):
    weight, lora_A, lora_B = _operands(5, torch.float32)
    weight.requires_grad_()
    idx = _indices((41,), 4)
    with on_path(path), pytest.warns(UserWarning, match="requires grad"):
        y, dy = _run(idx, weight, lora_A, lora_B, 1.0, 4)
    w64 = weight.detach().double().requires_grad_()
    lora_embedding_ref(idx, w64, lora_A.detach().double(), lora_B.detach().double(), 1.0, 4).backward(dy.double())
    assert_close(weight.grad, w64.grad, torch.float32, "dW")


@pytest.mark.parametrize("path", PATHS)
def test_autocast_returns_autocast_dtype(path):
    weight, lora_A, lora_B = _operands(5, torch.float32)
    idx = _indices((41,))
    with on_path(path), torch.autocast("cpu", dtype=torch.bfloat16):
        y, dy = _run(idx, weight, lora_A, lora_B, 2.0)
    y64, da64, db64 = _reference(idx, weight, lora_A, lora_B, 2.0, None, dy)
    assert y.dtype == torch.bfloat16 and lora_A.grad.dtype == torch.float32
    assert_close(y, y64, torch.bfloat16, "Y")
    assert_close(lora_A.grad, da64, torch.bfloat16, "dA")
    assert_close(lora_B.grad, db64, torch.bfloat16, "dB")


@pytest.mark.parametrize("path", PATHS)
def test_empty_indices(path):
    weight, lora_A, lora_B = _operands(5, torch.float32)
    idx = torch.empty(0, 3, dtype=torch.int64)
    with on_path(path):
        y = fl.lora_embedding(idx, weight, lora_A, lora_B, 1.0)
        y.sum().backward()
    assert y.shape == (0, 3, D)
    assert torch.count_nonzero(lora_A.grad) == 0 and torch.count_nonzero(lora_B.grad) == 0


def test_torch_compile_fullgraph_matches_eager():
    weight, lora_A, lora_B = _operands(5, torch.float32)
    idx = _indices((3, 14), 2)

    def step(idx, weight, lora_A, lora_B):
        return fl.lora_embedding(idx, weight, lora_A, lora_B, 0.8, 2)

    y, dy = _run(idx, weight, lora_A, lora_B, 0.8, 2)
    eager = (y.detach(), lora_A.grad.clone(), lora_B.grad.clone())
    lora_A.grad = lora_B.grad = None
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    y_c = compiled(idx, weight, lora_A, lora_B)
    y_c.backward(dy)
    torch.testing.assert_close(y_c, eager[0], rtol=0, atol=0)
    torch.testing.assert_close(lora_A.grad, eager[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lora_B.grad, eager[2], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_layer_starts_as_base_and_shares_weight(path):
    base = nn.Embedding(V, D, padding_idx=5)
    layer = fl.LoRAEmbedding.from_module(base, r=4, alpha=8)
    assert layer.weight is base.weight and not layer.weight.requires_grad
    assert layer.padding_idx == 5 and layer.scaling == 2.0
    assert layer.lora_A.shape == (4, V) and layer.lora_B.shape == (D, 4)
    assert torch.count_nonzero(layer.lora_A) == 0 and torch.count_nonzero(layer.lora_B) == layer.lora_B.numel()
    idx = _indices((3, 14), 5)
    with on_path(path):
        y = layer(idx)
        y.sum().backward()
    assert torch.equal(y, base(idx))
    assert layer.weight.grad is None and torch.count_nonzero(layer.lora_B.grad) == 0
    assert torch.count_nonzero(layer.lora_A.grad[:, 5]) == 0 and torch.count_nonzero(layer.lora_A.grad) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("path", PATHS)
def test_layer_merge_and_unmerge(path, dtype):
    base = nn.Embedding(V, D, padding_idx=1, dtype=dtype)
    original = base.weight.detach().clone()
    layer = fl.LoRAEmbedding.from_module(base, r=5, alpha=10, use_rslora=True)
    with torch.no_grad():
        layer.lora_A.normal_(std=0.05)  # a delta about as large as the weight, as after training
    idx = _indices((41,), 1)
    with on_path(path), torch.no_grad():
        unmerged = layer(idx)
        layer.merge()
        assert layer.merged
        merged = layer(idx)
        layer.unmerge()
        assert not layer.merged
        again = layer(idx)
    delta = fl.lora_scaling(5, 10, True) * (layer.lora_B.double() @ layer.lora_A.double()).t()
    expected = F.embedding(idx, original.double() + delta)
    assert_close(unmerged, expected, dtype, "unmerged Y")
    assert_close(merged, expected, dtype, "merged Y")
    # merge and unmerge each round the weight once: two roundings
    assert_close(base.weight, original.double(), dtype, "unmerged weight", factor=2.0)
    assert_close(again, expected, dtype, "Y after unmerge", factor=2.0)


def test_layer_constructor_and_repr():
    layer = fl.LoRAEmbedding(V, D, r=3, alpha=6, padding_idx=-1)
    assert layer.padding_idx == V - 1 and layer.weight.shape == (V, D) and layer.lora_A.shape == (3, V)
    assert "padding_idx=52" in repr(layer) and "r=3" in repr(layer)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"max_norm": 1.0}, "max_norm"),
        ({"scale_grad_by_freq": True}, "scale_grad_by_freq"),
        ({"sparse": True}, "sparse"),
    ],
)
def test_layer_refuses_unsupported_base_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        fl.LoRAEmbedding.from_module(nn.Embedding(V, D, **kwargs))


def test_layer_refuses_other_modules():
    with pytest.raises(TypeError, match="nn.Embedding"):
        fl.LoRAEmbedding.from_module(nn.Linear(4, 4))


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sync_checks", [False, True], ids=["flag", "sync"])
@pytest.mark.parametrize("bad", [V, -1, 10**6], ids=["V", "negative", "huge"])
@pytest.mark.parametrize("path", PATHS)
def test_out_of_range_indices_raise_before_a_result(kernel_launches, monkeypatch, path, bad, sync_checks):
    """A bad index raises ValueError before anything is returned: by default from the flag the kernel that reads
    idx sets (one launch each, no host sync), under FASTLORA_SYNC_CHECKS before any kernel. Then a good call
    runs clean (the flag is reset)."""
    from fastlora.kernels import embedding as kemb

    monkeypatch.setattr(kemb, "SYNC_CHECKS", sync_checks)
    weight, lora_A, lora_B = _operands(5, torch.float32)
    idx = _indices((3, 14))
    idx[1, 6] = bad
    with on_path(path), pytest.raises(ValueError, match=rf"indices must be in \[0, {V}\).*{bad}"):
        fl.lora_embedding(idx, weight, lora_A, lora_B, 1.0)
    with pytest.raises(ValueError, match=rf"indices must be in \[0, {V}\).*{bad}"):
        kemb.lora_embedding_fwd(idx.view(-1), weight, lora_A.detach(), lora_B.detach(), 1.0)
    with pytest.raises(ValueError, match=rf"indices must be in \[0, {V}\).*{bad}"):
        kemb.lora_embedding_bwd(torch.randn(42, D), idx.view(-1), lora_A.detach(), lora_B.detach(), 1.0)
    launched = {name: counter.launches for name, counter in kernel_launches.items()}
    expected = 0 if sync_checks else 1
    fwd_expected = expected * (2 if path == "triton" else 1)
    assert launched["_emb_fwd_kernel"] == fwd_expected and launched["_emb_bwd_dy_kernel"] == expected, launched
    assert launched["_emb_bwd_finish_kernel"] == launched["_emb_bwd_segment_kernel"] == 0, launched
    idx[1, 6] = 0
    y = kemb.lora_embedding_fwd(idx.view(-1), weight, lora_A.detach(), lora_B.detach(), 1.0)
    assert torch.isfinite(y).all()


def test_launch_budget(monkeypatch):
    """At M >= 2048, every device launch counted (Triton kernels, memsets, casts, torch ops): forward <= 2,
    backward <= 3, and no device-to-host sync. On CUDA the forward also queues one torch._assert_async on the
    index flag, which the CPU path replaces by a host read: it is added to the count."""
    from launches import count_launches, unpoisoned_empty

    unpoisoned_empty(monkeypatch)
    weight, lora_A, lora_B = _operands(5, torch.float32)
    idx = _indices((2048,), 3)
    with on_path("triton"):
        fl.lora_embedding(idx, weight, lora_A, lora_B, 0.5, 3).sum().backward()  # first call: the index flag
        with count_launches() as forward:
            y = fl.lora_embedding(idx, weight, lora_A, lora_B, 0.5, 3)
        dy = torch.randn_like(y)
        lora_A.grad = lora_B.grad = None
        with count_launches() as backward:
            y.backward(dy)
    assert forward.total + 1 <= 2 and forward.triton == ["_emb_fwd_kernel"], forward
    assert backward.total <= 3 and "_emb_bwd_dy_kernel" in backward.triton, backward
    assert forward.syncs == backward.syncs == [], (forward, backward)
    y64, da64, db64 = _reference(idx, weight, lora_A, lora_B, 0.5, 3, dy)
    assert_close(y, y64, torch.float32, "Y")
    assert_close(lora_A.grad, da64, torch.float32, "dA")
    assert_close(lora_B.grad, db64, torch.float32, "dB")


def _bad_inputs():
    w, a, b = torch.randn(V, D), torch.randn(4, V), torch.randn(D, 4)
    idx = torch.randint(0, V, (9,))
    return [
        ("float idx", (idx.float(), w, a, b, 1.0, None), TypeError, "int32 or int64"),
        ("idx not a tensor", ([1, 2], w, a, b, 1.0, None), TypeError, "torch.Tensor"),
        ("int weight", (idx, w.long(), a, b, 1.0, None), TypeError, "weight must be float16"),
        ("1-D weight", (idx, w[0], a, b, 1.0, None), ValueError, "weight must be 2-D"),
        (
            "A of wrong V",
            (idx, w, torch.randn(4, V + 1), b, 1.0, None),
            ValueError,
            rf"lora_A must have shape \[r, {V}\]",
        ),
        ("B of wrong D", (idx, w, a, torch.randn(D + 1, 4), 1.0, None), ValueError, "lora_B must have shape"),
        ("B of wrong rank", (idx, w, a, torch.randn(D, 3), 1.0, None), ValueError, "lora_B must have shape"),
        ("tensor scaling", (idx, w, a, b, torch.tensor(1.0), None), TypeError, "scaling"),
        ("padding_idx out of range", (idx, w, a, b, 1.0, V), ValueError, "padding_idx must be in"),
        ("padding_idx float", (idx, w, a, b, 1.0, 1.5), TypeError, "padding_idx must be None or an int"),
        ("idx on another device", (idx.to("meta"), w, a, b, 1.0, None), ValueError, "one device"),
    ]


@pytest.mark.parametrize("args, error, match", [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()])
@pytest.mark.parametrize("path", PATHS)
def test_bad_input_raises(path, args, error, match):
    with on_path(path), pytest.raises(error, match=match):
        fl.lora_embedding(*args)


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ----------------------------------------------------------------------------------------------------------
# On a GPU: the compiled kernels themselves (a subprocess with the interpreter off)
# ----------------------------------------------------------------------------------------------------------


def _gpu_checks() -> list[dict]:
    """Compiled kernels on CUDA against the float64 reference: every dtype, both dA scatters, a table with
    V * D > 2^31 elements, repeat-run determinism and the index check. Returns one row per check."""
    from fastlora.kernels import embedding as kemb

    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
    rows = []

    def compare(name, dtype, v, d, r, m, padding_idx, deterministic, low=0):
        gen = torch.Generator(device="cuda").manual_seed(len(rows))
        weight = torch.randn(v, d, device="cuda", dtype=dtype, generator=gen)
        lora_A = torch.randn(r, v, device="cuda", dtype=dtype, generator=gen)
        lora_B = torch.randn(d, r, device="cuda", dtype=dtype, generator=gen) / r**0.5
        idx = torch.randint(low, v, (m,), device="cuda", generator=gen)
        idx[: m // 4] = idx[m // 2]  # a long run of one index
        if padding_idx is not None:
            idx[1::7] = padding_idx
        y = kemb.lora_embedding_fwd(idx, weight, lora_A, lora_B, 0.5)
        dy = torch.randn(y.shape, device="cuda", dtype=dtype, generator=gen)
        da, db = kemb.lora_embedding_bwd(dy, idx, lora_A, lora_B, 0.5, padding_idx, deterministic=deterministic)
        da2, db2 = kemb.lora_embedding_bwd(dy, idx, lora_A, lora_B, 0.5, padding_idx, deterministic=deterministic)
        rows_used = torch.unique(idx)
        a64 = lora_A[:, rows_used].double().requires_grad_()
        b64 = lora_B.double().requires_grad_()
        local = torch.searchsorted(rows_used, idx)
        pad_local = (
            None
            if padding_idx is None
            else int(torch.searchsorted(rows_used, torch.tensor(padding_idx, device="cuda")))
        )
        base = weight[rows_used].double()
        y64 = lora_embedding_ref(local, base, a64, b64, 0.5, pad_local)
        y64.backward(dy.double())
        da_used = da[:, rows_used]
        unused = torch.ones(v, dtype=torch.bool, device="cuda")
        unused[rows_used] = False
        errors = {
            "Y": ((y.double() - y64).norm() / y64.norm()).item(),
            "dA": ((da_used.double() - a64.grad).norm() / a64.grad.norm()).item(),
            "dB": ((db.double() - b64.grad).norm() / b64.grad.norm()).item(),
        }
        ok = all(e <= tol[dtype] for e in errors.values()) and torch.count_nonzero(da[:, unused]).item() == 0
        if deterministic:
            ok = ok and torch.equal(da, da2) and torch.equal(db, db2)
        rows.append({"name": name, "ok": bool(ok), **errors})

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for r in (8, 16, 70):
            for deterministic in (False, True):
                name = f"{DTYPE_NAMES[dtype]}-r{r}-{'det' if deterministic else 'atomic'}"
                compare(name, dtype, 32000, 1024, r, 4096, 3, deterministic)
    compare("bf16-V600000-D4096-int64-offsets", torch.bfloat16, 600000, 4096, 16, 512, None, True, low=590000)
    kemb.SYNC_CHECKS = True  # the debug switch: a ValueError before any kernel
    try:
        kemb.lora_embedding_fwd(*_bad_index_call())
        rows.append({"name": "out-of-range raises (sync checks)", "ok": False})
    except ValueError:
        rows.append({"name": "out-of-range raises (sync checks)", "ok": True})
    finally:
        kemb.SYNC_CHECKS = False
    torch.cuda.synchronize()
    return rows


def _bad_index_call():
    idx = torch.tensor([0, 5, 32000], device="cuda")
    weight, lora_A, lora_B = (torch.randn(*shape, device="cuda") for shape in ((32000, 64), (4, 32000), (64, 4)))
    return idx, weight, lora_A, lora_B, 1.0


def _gpu_async_index_assert():
    """Default mode on CUDA: the forward returns without a sync; the index flag's device-side assert fails the
    next synchronising call (this ends the CUDA context, hence its own process)."""
    from fastlora.kernels import embedding as kemb

    kemb.lora_embedding_fwd(*_bad_index_call())
    torch.cuda.synchronize()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernels_on_gpu():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run(
        [sys.executable, __file__, "--gpu"], capture_output=True, text=True, env=env, timeout=600, check=True
    ).stdout
    rows = json.loads(out.strip().splitlines()[-1])
    failed = [row for row in rows if not row["ok"]]
    assert not failed, failed
    bad = subprocess.run(
        [sys.executable, __file__, "--gpu-assert"], capture_output=True, text=True, env=env, timeout=600
    )
    assert bad.returncode != 0 and "device-side assert" in bad.stderr, bad.stderr[-2000:]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--gpu"]:
        print(json.dumps(_gpu_checks()))
    if sys.argv[1:2] == ["--gpu-assert"]:
        _gpu_async_index_assert()
