"""Bad input, row by row: every public function against wrong shapes, wrong dtypes, mixed devices ("meta" as the
second device), integer tensors, non-contiguous and zero-size inputs, NaN and Inf.

Each row ends in a correct result or in a ValueError/TypeError whose message names the offending argument;
never an assert, a crash from deep inside torch, or a silent wrong answer. NaN and Inf show up in the output
and the gradients exactly where the float64 reference has them: they never vanish.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import assert_close
from lora_cases import PATHS, kind_param, kind_params, on_path

import fastlora
from fastlora.reference import lora_conv2d_ref, lora_embedding_ref, lora_linear_ref

META = "meta"
EMB = kind_param("embedding").marks
CONV = kind_param("conv2d").marks


# ----------------------------------------------------------------------------------------------------------
# Valid argument sets, from which each row changes one thing
# ----------------------------------------------------------------------------------------------------------


def linear_args(**change):
    """lora_linear's arguments: x [7, 5], weight [4, 5], bias [4], lora_A [3, 5], lora_B [4, 3]."""
    args = {
        "x": torch.randn(7, 5),
        "weight": torch.randn(4, 5),
        "bias": torch.randn(4),
        "lora_A": torch.randn(3, 5),
        "lora_B": torch.randn(4, 3),
        "scaling": 0.5,
    }
    args.update(change)
    return args


def embedding_args(**change):
    """lora_embedding's arguments: idx [3, 4] in [0, 11), weight [11, 6], lora_A [3, 11], lora_B [6, 3]."""
    args = {
        "idx": torch.randint(0, 11, (3, 4)),
        "weight": torch.randn(11, 6),
        "lora_A": torch.randn(3, 11),
        "lora_B": torch.randn(6, 3),
        "scaling": 0.5,
    }
    args.update(change)
    return args


def conv2d_args(**change):
    """lora_conv2d's arguments: x [2, 3, 7, 7], weight [4, 3, 3, 3], bias [4], lora_A [2, 3, 3, 3], B [4, 2, 1, 1]."""
    args = {
        "x": torch.randn(2, 3, 7, 7),
        "weight": torch.randn(4, 3, 3, 3),
        "bias": torch.randn(4),
        "lora_A": torch.randn(2, 3, 3, 3),
        "lora_B": torch.randn(4, 2, 1, 1),
        "scaling": 0.5,
    }
    args.update(change)
    return args


# ----------------------------------------------------------------------------------------------------------
# Rows that must raise: (id, call, error type, pattern the message must contain)
# ----------------------------------------------------------------------------------------------------------


def _row(row_id, call, error, names, marks=()):
    return pytest.param(call, error, names, id=row_id, marks=marks)


def lin(**change):
    return lambda: fastlora.lora_linear(**linear_args(**change))


def emb(**change):
    return lambda: fastlora.lora_embedding(**embedding_args(**change))


def conv(**change):
    return lambda: fastlora.lora_conv2d(**conv2d_args(**change))


def layer_call(x, state="active"):
    """Call a LoRALinear(5 -> 4) on x: active, merged into its weight, or with its adapter disabled."""

    def call():
        layer = fastlora.LoRALinear.from_module(nn.Linear(5, 4), r=3, alpha=6)
        if state == "merged":
            layer.merge()
        layer.disabled = state == "disabled"
        return layer(x)

    return call


ERROR_ROWS = [
    # lora_linear: shapes
    _row("linear-x-last-dim", lin(x=torch.randn(7, 6)), ValueError, r"\bx\b"),
    _row("linear-x-0d", lin(x=torch.tensor(1.0)), ValueError, r"\bx\b"),
    _row("linear-weight-1d", lin(weight=torch.randn(20)), ValueError, "weight"),
    _row("linear-weight-3d", lin(weight=torch.randn(4, 5, 1)), ValueError, "weight"),
    _row("linear-bias-length", lin(bias=torch.randn(5)), ValueError, "bias"),
    _row("linear-bias-2d", lin(bias=torch.randn(4, 1)), ValueError, "bias"),
    _row("linear-A-in-features", lin(lora_A=torch.randn(3, 6)), ValueError, "lora_A"),
    _row("linear-A-1d", lin(lora_A=torch.randn(15)), ValueError, "lora_A"),
    _row("linear-A-rank0", lin(lora_A=torch.randn(0, 5), lora_B=torch.randn(4, 0)), ValueError, "lora_A"),
    _row("linear-B-out-features", lin(lora_B=torch.randn(5, 3)), ValueError, "lora_B"),
    _row("linear-B-rank", lin(lora_B=torch.randn(4, 2)), ValueError, "lora_B"),
    _row("linear-B-flat", lin(lora_B=torch.randn(12, 1)), ValueError, "lora_B"),
    # lora_linear: dtypes and types
    _row("linear-x-int", lin(x=torch.randint(0, 3, (7, 5))), TypeError, r"\bx\b"),
    _row("linear-x-float64", lin(x=torch.randn(7, 5, dtype=torch.float64)), TypeError, r"\bx\b"),
    _row("linear-x-complex", lin(x=torch.randn(7, 5, dtype=torch.complex64)), TypeError, r"\bx\b"),
    _row("linear-x-fp16-weight-fp32", lin(x=torch.randn(7, 5).half()), TypeError, r"\bx\b.*weight"),
    _row("linear-weight-int", lin(weight=torch.randint(0, 3, (4, 5))), TypeError, "weight"),
    _row("linear-bias-fp16", lin(bias=torch.randn(4).half()), TypeError, "bias"),
    _row("linear-A-int", lin(lora_A=torch.randint(0, 3, (3, 5), dtype=torch.int32)), TypeError, "lora_A"),
    _row("linear-B-bool", lin(lora_B=torch.ones(4, 3, dtype=torch.bool)), TypeError, "lora_B"),
    _row("linear-x-list", lin(x=[[1.0] * 5] * 7), TypeError, r"\bx\b"),
    _row("linear-weight-None", lin(weight=None), TypeError, "weight"),
    _row("linear-scaling-tensor", lin(scaling=torch.tensor(0.5)), TypeError, "scaling"),
    _row("linear-scaling-str", lin(scaling="0.5"), TypeError, "scaling"),
    _row("linear-dropout-1", lin(dropout_p=1.0), ValueError, "dropout_p"),
    _row("linear-dropout-negative", lin(dropout_p=-0.1), ValueError, "dropout_p"),
    _row("linear-dropout-str", lin(dropout_p="0.1"), (ValueError, TypeError), "dropout_p"),
    # lora_linear: mixed devices
    _row("linear-x-meta", lin(x=torch.randn(7, 5, device=META)), ValueError, r"\bx on meta"),
    _row("linear-weight-meta", lin(weight=torch.randn(4, 5, device=META)), ValueError, "weight on meta"),
    _row("linear-bias-meta", lin(bias=torch.randn(4, device=META)), ValueError, "bias on meta"),
    _row("linear-A-meta", lin(lora_A=torch.randn(3, 5, device=META)), ValueError, "lora_A on meta"),
    _row("linear-B-meta", lin(lora_B=torch.randn(4, 3, device=META)), ValueError, "lora_B on meta"),
    # LoRALinear
    _row("LoRALinear-forward-shape", layer_call(torch.randn(7, 6)), ValueError, r"\bx\b"),
    _row("LoRALinear-forward-int", layer_call(torch.randint(0, 3, (7, 5))), TypeError, r"\bx\b"),
    _row("LoRALinear-forward-meta", layer_call(torch.randn(7, 5, device=META)), ValueError, r"\bx on meta"),
    _row("LoRALinear-merged-shape", layer_call(torch.randn(7, 6), "merged"), ValueError, r"\bx\b"),
    _row("LoRALinear-merged-fp16", layer_call(torch.randn(7, 5).half(), "merged"), TypeError, r"\bx\b"),
    _row("LoRALinear-disabled-int", layer_call(torch.randint(0, 3, (7, 5)), "disabled"), TypeError, r"\bx\b"),
    _row("LoRALinear-disabled-meta", layer_call(torch.randn(7, 5, device=META), "disabled"), ValueError, "meta"),
    _row(
        "LoRALinear-from-conv",
        lambda: fastlora.LoRALinear.from_module(nn.Conv2d(3, 4, 1)),
        TypeError,
        "nn.Linear",
    ),
    _row("LoRALinear-r0", lambda: fastlora.LoRALinear.from_module(nn.Linear(5, 4), r=0), ValueError, r"\br\b"),
    _row("LoRALinear-r-float", lambda: fastlora.LoRALinear.from_module(nn.Linear(5, 4), r=2.5), ValueError, r"\br\b"),
    _row("LoRALinear-alpha-str", lambda: fastlora.LoRALinear(5, 4, alpha="8"), TypeError, "alpha"),
    _row("LoRALinear-dropout-1", lambda: fastlora.LoRALinear(5, 4, dropout=1.0), ValueError, "dropout"),
    # small public helpers
    _row("lora_scaling-r0", lambda: fastlora.lora_scaling(0, 8), ValueError, r"\br\b"),
    _row("lora_scaling-alpha-str", lambda: fastlora.lora_scaling(4, "8"), TypeError, "alpha"),
    _row("use_backend-unknown", lambda: fastlora.use_backend("cudnn").__enter__(), ValueError, "backend"),
    _row("active_path-unknown", lambda: fastlora.active_path("gpu0"), ValueError, "device"),
    _row("active_path-float", lambda: fastlora.active_path(0.5), TypeError, "device"),
    # lora_embedding
    _row("embedding-idx-float", emb(idx=torch.rand(3, 4)), TypeError, "idx", EMB),
    _row("embedding-idx-meta", emb(idx=torch.randint(0, 11, (3, 4), device=META)), ValueError, "idx", EMB),
    _row("embedding-idx-out-of-range", emb(idx=torch.tensor([0, 11])), ValueError, "idx", EMB),
    _row("embedding-idx-negative", emb(idx=torch.tensor([0, -1])), ValueError, "idx", EMB),
    _row("embedding-weight-1d", emb(weight=torch.randn(66)), ValueError, "weight", EMB),
    _row("embedding-weight-int", emb(weight=torch.randint(0, 3, (11, 6))), TypeError, "weight", EMB),
    _row("embedding-A-vocab", emb(lora_A=torch.randn(3, 12)), ValueError, "lora_A", EMB),
    _row("embedding-B-dim", emb(lora_B=torch.randn(7, 3)), ValueError, "lora_B", EMB),
    _row("embedding-B-rank", emb(lora_B=torch.randn(6, 2)), ValueError, "lora_B", EMB),
    _row("embedding-A-int", emb(lora_A=torch.randint(0, 3, (3, 11))), TypeError, "lora_A", EMB),
    _row("embedding-B-meta", emb(lora_B=torch.randn(6, 3, device=META)), ValueError, "lora_B", EMB),
    _row("embedding-padding-idx", emb(padding_idx=11), ValueError, "padding_idx", EMB),
    _row("embedding-scaling-tensor", emb(scaling=torch.tensor(0.5)), TypeError, "scaling", EMB),
    # lora_conv2d
    _row("conv2d-x-3d", conv(x=torch.randn(3, 7, 7)), ValueError, r"\bx\b", CONV),
    _row("conv2d-x-int", conv(x=torch.randint(0, 3, (2, 3, 7, 7))), TypeError, r"\bx\b", CONV),
    _row("conv2d-x-channels", conv(x=torch.randn(2, 4, 7, 7)), ValueError, r"\bx\b|weight", CONV),
    _row("conv2d-x-meta", conv(x=torch.randn(2, 3, 7, 7, device=META)), ValueError, r"\bx on meta", CONV),
    _row("conv2d-weight-3d", conv(weight=torch.randn(4, 3, 9)), ValueError, "weight", CONV),
    _row("conv2d-weight-fp16", conv(weight=torch.randn(4, 3, 3, 3).half()), TypeError, "weight", CONV),
    _row("conv2d-bias-length", conv(bias=torch.randn(5)), ValueError, "bias", CONV),
    _row("conv2d-A-kernel", conv(lora_A=torch.randn(2, 3, 2, 2)), ValueError, "lora_A", CONV),
    _row("conv2d-A-channels", conv(lora_A=torch.randn(2, 4, 3, 3)), ValueError, "lora_A", CONV),
    _row("conv2d-B-out", conv(lora_B=torch.randn(5, 2, 1, 1)), ValueError, "lora_B", CONV),
    _row("conv2d-B-rank", conv(lora_B=torch.randn(4, 3, 1, 1)), ValueError, "lora_B", CONV),
    _row("conv2d-A-int", conv(lora_A=torch.randint(0, 3, (2, 3, 3, 3))), TypeError, "lora_A", CONV),
    _row("conv2d-B-meta", conv(lora_B=torch.randn(4, 2, 1, 1, device=META)), ValueError, "lora_B", CONV),
    _row("conv2d-stride-0", conv(stride=0), ValueError, "stride", CONV),
    _row("conv2d-padding-negative", conv(padding=-1), ValueError, "padding", CONV),
    _row("conv2d-dilation-0", conv(dilation=0), ValueError, "dilation", CONV),
    _row("conv2d-groups", conv(groups=2), ValueError, "groups", CONV),
    _row("conv2d-dropout-1", conv(dropout_p=1.0), ValueError, "dropout_p", CONV),
    _row("conv2d-scaling-tensor", conv(scaling=torch.tensor(0.5)), TypeError, "scaling", CONV),
    # layer constructors of the other kinds
    _row(
        "LoRAEmbedding-from-linear",
        lambda: fastlora.LoRAEmbedding.from_module(nn.Linear(5, 4), r=2, alpha=2),
        TypeError,
        "Embedding",
        EMB,
    ),
    _row(
        "LoRAEmbedding-r0",
        lambda: fastlora.LoRAEmbedding.from_module(nn.Embedding(11, 6), r=0, alpha=2),
        ValueError,
        r"\br\b",
        EMB,
    ),
    _row(
        "LoRAConv2d-from-linear",
        lambda: fastlora.LoRAConv2d.from_module(nn.Linear(5, 4), r=2, alpha=2, dropout=0.0),
        TypeError,
        "Conv2d",
        CONV,
    ),
    _row(
        "LoRAConv2d-dropout-1",
        lambda: fastlora.LoRAConv2d.from_module(nn.Conv2d(3, 4, 3), r=2, alpha=2, dropout=1.0),
        ValueError,
        "dropout",
        CONV,
    ),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("call", "error", "names"), ERROR_ROWS)
def test_bad_input_raises_clear_error(call, error, names, path):
    with on_path(path), pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert re.search(names, message), f"the message does not name the argument ({names!r}): {message!r}"
    assert len(message) > 20, f"the message is too short to say what was expected: {message!r}"


# ----------------------------------------------------------------------------------------------------------
# Rows that must give a correct result: each op against its float64 reference, output and gradients
# ----------------------------------------------------------------------------------------------------------


def _assert_matches(out, ref, name, nan_may_spread=False):
    """Same NaN and Inf positions as the float64 reference (non-finite values never vanish), the rest close.

    nan_may_spread: NaN may also appear where the reference is finite (never the other way), for a NaN weight
    in an implicit GEMM, whose zero padding meets the NaN (0 * NaN) at taps the reference's convolution skips."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    for what, test in (("NaN", torch.isnan), ("Inf", torch.isinf)):
        got, want = test(out.detach()), test(ref.detach())
        if nan_may_spread and what == "NaN":
            assert not (want & ~got).any(), f"{name}: NaN vanished at {(want & ~got).nonzero()[:5].tolist()}"
            continue
        assert torch.equal(got, want), f"{name}: {what} at {(got != want).nonzero()[:5].tolist()} differs from ref"
    finite = torch.isfinite(ref.detach()) & torch.isfinite(out.detach())
    if finite.any():
        assert_close(out.detach()[finite], ref.detach()[finite], torch.float32, name)


def _run_and_compare(fn, ref_fn, args, grad_names, dy=None, nan_may_spread=()):
    """Call fn(**args) and ref_fn on float64 copies; compare the output and the grads of grad_names."""
    leaves = {k: (v.detach().requires_grad_() if k in grad_names else v) for k, v in args.items()}
    refs = {
        k: (
            v.detach().double().requires_grad_(k in grad_names)
            if isinstance(v, torch.Tensor) and v.is_floating_point()
            else v
        )
        for k, v in args.items()
    }
    out = fn(**leaves)
    ref = ref_fn(**refs)
    _assert_matches(out, ref, "output")
    dy = torch.randn(out.shape) if dy is None else dy
    out.backward(dy)
    ref.backward(dy.double())
    for k in grad_names:
        assert leaves[k].grad is not None, f"{k} got no gradient"
        _assert_matches(leaves[k].grad, refs[k].grad, f"grad {k}", nan_may_spread=k in nan_may_spread)
    return out, leaves


def _nan_at(t, index, value=float("nan")):
    t = t.clone()
    t[index] = value
    return t


LINEAR_GRADS = ("x", "lora_A", "lora_B")


def _x_transposed():
    return torch.randn(5, 7).t()


def _x_strided():
    return torch.randn(7, 10)[:, ::2]


LINEAR_RESULT_ROWS = {
    "x-transposed": {"x": _x_transposed},
    "x-strided": {"x": _x_strided},
    "x-3d-view": {"x": lambda: torch.randn(2, 5, 7).transpose(1, 2)},
    "weight-transposed": {"weight": lambda: torch.randn(5, 4).t()},
    "A-B-transposed": {"lora_A": lambda: torch.randn(5, 3).t(), "lora_B": lambda: torch.randn(3, 4).t()},
    "no-bias": {"bias": lambda: None},
    "x-1d": {"x": lambda: torch.randn(5)},
    "K0": {"x": lambda: torch.randn(7, 0), "weight": lambda: torch.randn(4, 0), "lora_A": lambda: torch.randn(3, 0)},
    "N0": {"weight": lambda: torch.randn(0, 5), "bias": lambda: torch.randn(0), "lora_B": lambda: torch.randn(0, 3)},
    "x-nan": {"x": lambda: _nan_at(torch.randn(7, 5), (2, 3))},
    "x-inf": {"x": lambda: _nan_at(torch.randn(7, 5), (4, 1), float("inf"))},
    "x-minus-inf": {"x": lambda: _nan_at(torch.randn(7, 5), (0, 0), float("-inf"))},
    "weight-nan": {"weight": lambda: _nan_at(torch.randn(4, 5), (1, 2))},
    "bias-inf": {"bias": lambda: _nan_at(torch.randn(4), 3, float("inf"))},
    "A-nan": {"lora_A": lambda: _nan_at(torch.randn(3, 5), (1, 4))},
    "B-inf": {"lora_B": lambda: _nan_at(torch.randn(4, 3), (2, 0), float("inf"))},
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("row", list(LINEAR_RESULT_ROWS), ids=list(LINEAR_RESULT_ROWS))
def test_linear_result_rows(row, path):
    args = linear_args(**{k: make() for k, make in LINEAR_RESULT_ROWS[row].items()})
    with on_path(path):
        _run_and_compare(fastlora.lora_linear, lora_linear_ref, args, LINEAR_GRADS)


@pytest.mark.parametrize("path", PATHS)
def test_linear_nan_in_grad_output_reaches_every_gradient(path):
    dy = _nan_at(torch.randn(7, 4), (3, 2))
    with on_path(path):
        _run_and_compare(fastlora.lora_linear, lora_linear_ref, linear_args(), LINEAR_GRADS, dy=dy)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("x_shape", [(0, 5), (2, 0, 5)], ids=["M0", "lead0"])
@pytest.mark.parametrize("path", PATHS)
def test_linear_zero_rows(x_shape, dropout_p, path):
    """M = 0: an empty output, an empty dX and zero-filled (not unwritten) LoRA gradients."""
    args = linear_args(x=torch.randn(x_shape))
    leaves = {k: (v.requires_grad_() if k in LINEAR_GRADS else v) for k, v in args.items()}
    with on_path(path):
        out = fastlora.lora_linear(**leaves, dropout_p=dropout_p)
        assert out.shape == (*x_shape[:-1], 4)
        out.sum().backward()
    assert leaves["x"].grad.shape == x_shape
    for k in ("lora_A", "lora_B"):
        assert torch.equal(leaves[k].grad, torch.zeros_like(leaves[k])), f"{k}.grad is not zero-filled"
    assert leaves["weight"].grad is None


def test_meta_inputs_give_meta_output():
    """All inputs on "meta" (shape inference, deferred initialisation): a meta output of the right shape."""
    args = linear_args(**{k: v.to(META) for k, v in linear_args(x=torch.randn(2, 7, 5)).items() if k != "scaling"})
    for p in (0.0, 0.3):
        out = fastlora.lora_linear(**args, dropout_p=p)
        assert out.device.type == META and out.shape == (2, 7, 4)


@pytest.mark.parametrize("path", PATHS)
def test_layer_merge_refuses_non_finite(path):
    layer = fastlora.LoRALinear.from_module(nn.Linear(5, 4), r=3, alpha=6)
    with torch.no_grad():
        layer.lora_B.copy_(_nan_at(torch.randn(4, 3), (1, 1)))
    before = layer.weight.detach().clone()
    with on_path(path), pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe=True)
    assert torch.equal(layer.weight, before) and not layer.merged


@pytest.mark.parametrize("merged", [False, True], ids=["active", "merged"])
@pytest.mark.parametrize("path", PATHS)
def test_mixed_dtypes_under_autocast(path, merged):
    """Under torch.autocast the second layer gets bfloat16 input and float32 weights, as nn.Linear would:
    a correct bfloat16 result, not a dtype error."""
    model = nn.Sequential(
        fastlora.LoRALinear.from_module(nn.Linear(13, 11), r=3, alpha=6),
        fastlora.LoRALinear.from_module(nn.Linear(11, 7), r=2, alpha=4),
    )
    for layer in model:
        nn.init.normal_(layer.lora_B)
    ref_params = {n: p.detach().double().requires_grad_(p.requires_grad) for n, p in model.named_parameters()}
    if merged:
        model[1].merge()
    x = torch.randn(5, 13)
    with on_path(path), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    # the specification under autocast: each layer's input and tensors rounded to bfloat16 (as autocast casts them),
    # then exact arithmetic; the rounding casts pass gradients through unchanged
    ref = x.double()
    for i, layer in enumerate(model):
        w, b, a, bb = (ref_params[f"{i}.{n}"].bfloat16().double() for n in ("weight", "bias", "lora_A", "lora_B"))
        ref = lora_linear_ref(ref.bfloat16().double(), w, b, a, bb, layer.scaling)
    # two chained layers, each rounding its bfloat16 intermediates (S, dS, the first layer's output and dX) on top of
    # the inputs: twice one op's bfloat16 tolerance (measured worst over 1,000 draws: 2.5e-2 for a gradient)
    chain = 2.0
    assert_close(out, ref, torch.bfloat16, "output", factor=chain)
    dy = torch.randn(out.shape)
    out.float().backward(dy)
    ref.backward(dy.bfloat16().double())  # the gradient reaches the bfloat16 output rounded to it
    assert model[0].lora_A.grad.dtype == torch.float32
    trained = ("0.lora_A", "0.lora_B") if merged else ("0.lora_A", "0.lora_B", "1.lora_A", "1.lora_B")
    for name in trained:
        grad, ref_grad = model.get_parameter(name).grad, ref_params[name].grad
        assert_close(grad, ref_grad, torch.bfloat16, f"grad {name}", factor=chain)


EMBEDDING_RESULT_ROWS = {
    "weight-transposed": {"weight": lambda: torch.randn(6, 11).t()},
    "A-B-transposed": {"lora_A": lambda: torch.randn(11, 3).t(), "lora_B": lambda: torch.randn(3, 6).t()},
    "idx-1d": {"idx": lambda: torch.tensor([3, 3, 0, 10, 3])},
    "idx-non-contiguous": {"idx": lambda: torch.randint(0, 11, (4, 3)).t()},
    "idx-int32": {"idx": lambda: torch.randint(0, 11, (3, 4), dtype=torch.int32)},
    "weight-nan": {"idx": lambda: torch.tensor([1, 2, 2, 5]), "weight": lambda: _nan_at(torch.randn(11, 6), (2, 4))},
    "A-inf": {
        "idx": lambda: torch.tensor([1, 2, 2, 5]),
        "lora_A": lambda: _nan_at(torch.randn(3, 11), (0, 5), float("inf")),
    },
    "B-nan": {"lora_B": lambda: _nan_at(torch.randn(6, 3), (4, 1))},
}


def _embedding_ref(idx, weight, lora_A, lora_B, scaling):
    return lora_embedding_ref(idx.long(), weight, lora_A, lora_B, scaling)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("row", [pytest.param(r, id=r, marks=EMB) for r in EMBEDDING_RESULT_ROWS])
def test_embedding_result_rows(row, path):
    args = embedding_args(**{k: make() for k, make in EMBEDDING_RESULT_ROWS[row].items()})
    with on_path(path):
        _run_and_compare(fastlora.lora_embedding, _embedding_ref, args, ("lora_A", "lora_B"))


@pytest.mark.parametrize("idx_shape", [(0,), (3, 0)], ids=["M0", "lead0"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", [kind_param("embedding")])
def test_embedding_zero_rows(kind, idx_shape, path):
    args = embedding_args(idx=torch.zeros(idx_shape, dtype=torch.long))
    args["lora_A"].requires_grad_()
    args["lora_B"].requires_grad_()
    with on_path(path):
        out = fastlora.lora_embedding(**args)
        assert out.shape == (*idx_shape, 6)
        out.sum().backward()
    for k in ("lora_A", "lora_B"):
        assert torch.equal(args[k].grad, torch.zeros_like(args[k])), f"{k}.grad is not zero-filled"


CONV2D_GRADS = ("x", "lora_A", "lora_B")

CONV2D_RESULT_ROWS = {
    "x-channels-last": {"x": lambda: torch.randn(2, 3, 7, 7).to(memory_format=torch.channels_last)},
    "x-strided": {"x": lambda: torch.randn(2, 3, 7, 14)[..., ::2]},
    "no-bias": {"bias": lambda: None},
    "x-nan": {"x": lambda: _nan_at(torch.randn(2, 3, 7, 7), (1, 2, 3, 3))},
    "x-inf": {"x": lambda: _nan_at(torch.randn(2, 3, 7, 7), (0, 0, 0, 6), float("inf"))},
    "A-nan": {"lora_A": lambda: _nan_at(torch.randn(2, 3, 3, 3), (1, 0, 2, 2))},
    "B-inf": {"lora_B": lambda: _nan_at(torch.randn(4, 2, 1, 1), (3, 1, 0, 0), float("inf"))},
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("row", [pytest.param(r, id=r, marks=CONV) for r in CONV2D_RESULT_ROWS])
def test_conv2d_result_rows(row, path):
    args = conv2d_args(**{k: make() for k, make in CONV2D_RESULT_ROWS[row].items()})
    # the kernels' dX is an implicit GEMM over all taps: a NaN in A meets the zero padding of dS there
    spread = ("x",) if row == "A-nan" and path == "triton" else ()
    with on_path(path):
        _run_and_compare(fastlora.lora_conv2d, lora_conv2d_ref, args, CONV2D_GRADS, nan_may_spread=spread)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", [kind_param("conv2d")])
def test_conv2d_zero_batch(kind, path):
    args = conv2d_args(x=torch.randn(0, 3, 7, 7))
    for k in CONV2D_GRADS:
        args[k].requires_grad_()
    with on_path(path):
        out = fastlora.lora_conv2d(**args, dropout_p=0.3)
        assert out.shape == (0, 4, 5, 5)
        out.sum().backward()
    assert args["x"].grad.shape == (0, 3, 7, 7)
    for k in ("lora_A", "lora_B"):
        assert torch.equal(args[k].grad, torch.zeros_like(args[k])), f"{k}.grad is not zero-filled"


# ----------------------------------------------------------------------------------------------------------
# Offsets past 2^31 elements
# ----------------------------------------------------------------------------------------------------------
# Two halves. On CPU, a strided view whose last element lies past 2^31 elements goes through the torch path
# (the storage is reserved, not touched: only the three rows in use are ever written). For the Triton kernels,
# the compiled TTIR is read back and every address computation is checked for 32-bit products of run-time
# values (tests/ttir_offsets.py); a large view under the interpreter would copy the whole 4 GiB storage on
# every launch, so the kernels' half of the proof is the inspection.

ROW_STRIDE = 2**30 + 17  # three rows: the last element sits past 2^31


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_torch_path_offsets_past_2_31(dropout_p):
    rows, k, n, r = 3, 8, 5, 2
    try:  # 4 GiB of address space, reserved but never touched beyond three rows
        x = torch.empty_strided((rows, k), (ROW_STRIDE, 1), dtype=torch.float16)
    except RuntimeError as err:
        pytest.skip(f"this machine cannot reserve 4 GiB of address space: {err}")
    with torch.no_grad():
        x.copy_(torch.randn(rows, k))
    assert (rows - 1) * ROW_STRIDE + k > 2**31
    args = linear_args(x=x, weight=torch.randn(n, k).half(), bias=torch.randn(n).half())
    args.update(lora_A=torch.randn(r, k).half(), lora_B=torch.randn(n, r).half())
    leaves = {key: (v.requires_grad_() if key in LINEAR_GRADS else v) for key, v in args.items()}
    refs = {
        key: (v.detach().double().requires_grad_(key in LINEAR_GRADS) if key != "scaling" else v)
        for key, v in args.items()
    }
    mask = None
    if dropout_p > 0:
        torch.manual_seed(5)
        eye = torch.eye(k)
        with on_path("torch"):  # the mask of the path under test (each path draws its own)
            mask = fastlora.lora_linear(torch.ones(rows, k), torch.zeros(k, k), None, eye, eye, 1.0, dropout_p)
        mask = mask.double()
    with on_path("torch"):
        torch.manual_seed(5)
        out = fastlora.lora_linear(**leaves, dropout_p=dropout_p)
    ref = lora_linear_ref(**refs, mask=mask)
    assert_close(out, ref, torch.float16, "output")
    dy = torch.randn(rows, n).half()
    out.backward(dy)
    ref.backward(dy.double())
    for key in LINEAR_GRADS:
        assert_close(leaves[key].grad, refs[key].grad, torch.float16, f"grad {key}")


def test_offset_inspection_tells_32_from_64_bits():
    """The inspection itself: it flags the 32-bit offsets of the toy kernels and passes their 64-bit twins."""
    pytest.importorskip("triton")
    import toy_offset_kernels as toy
    from ttir_offsets import capture_launches, compile_ttir, distinct, offsets_32bit

    x = torch.randn(20, 11).t()
    a, b = torch.randn(37, 21).half(), torch.randn(21, 19).half()
    with capture_launches() as launches:
        for kernel in (toy.gather_rows_i32, toy.gather_rows_i64):
            assert torch.equal(toy.gather_rows(x, kernel), x.contiguous())
        for wide in (False, True):
            torch.testing.assert_close(toy.matmul(a, b, wide), a.float() @ b.float())
    compiled = compile_ttir(distinct(launches), extra_path=[Path(__file__).parent])
    found = {(c["name"], i): offsets_32bit(c["ttir"]) for i, c in enumerate(compiled)}
    narrow32, wide32, narrow_mm, wide_mm = found.values()
    assert len(narrow32) == 3, narrow32  # row * stride_xm, col * stride_xk, row * K
    assert len(narrow_mm) == 4, narrow_mm  # the row and column offsets of A, B and C
    assert wide32 == [] and wide_mm == []


def _exercise_kernels(kind):
    """Forward and backward (and merge) of one op on small inputs, with and without dropout, fp32 and fp16."""
    for dtype in (torch.float32, torch.float16):
        if kind == "linear":
            for p in (0.0, 0.2):
                x = torch.randn(37, 75, dtype=dtype, requires_grad=True)
                layer = fastlora.LoRALinear.from_module(nn.Linear(75, 51).to(dtype), r=5, alpha=10, dropout=p)
                layer(x).sum().backward()
                layer.merge()
                layer.unmerge()
        elif kind == "embedding":
            layer = fastlora.LoRAEmbedding.from_module(nn.Embedding(53, 29).to(dtype), r=5, alpha=10)
            layer(torch.randint(0, 53, (37,))).sum().backward()
            layer.merge()
            layer.unmerge()
        else:
            for p in (0.0, 0.2):
                x = torch.randn(2, 6, 9, 9, dtype=dtype, requires_grad=True)
                layer = fastlora.LoRAConv2d.from_module(
                    nn.Conv2d(6, 7, 3, padding=1).to(dtype), r=5, alpha=10, dropout=p
                )
                layer(x).sum().backward()
                layer.merge()
                layer.unmerge()


@pytest.mark.parametrize("kind", kind_params())
def test_kernels_compute_offsets_in_64_bits(kind):
    """Every kernel an op launches, compiled for sm_90 as launched: no 32-bit product of run-time values
    reaches an address."""
    from ttir_offsets import capture_launches, compile_ttir, distinct, offsets_32bit

    with on_path("triton"), capture_launches() as launches:
        _exercise_kernels(kind)
    assert launches, f"{kind}: no Triton kernel ran"
    failures = {}
    for launch, compiled in zip(distinct(launches), compile_ttir(distinct(launches)), strict=True):
        found = offsets_32bit(compiled["ttir"])
        if found:
            failures[f"{launch['module']}.{launch['name']}"] = found
    assert not failures, f"32-bit address arithmetic: {failures}"


def test_torch_path_dropout_refuses_cuda_graph_capture(monkeypatch):
    """The torch path seeds its generator from the host, so a captured step would replay one mask at every step:
    capture with dropout > 0 there is a clear error, and dropout 0 draws no seed at all. (The Triton kernels read
    a seed drawn on the device, which graph replays redraw: benchmarks/graphs_check.py checks that on a GPU.)"""
    from fastlora.ops import backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    x, w, a, b = torch.randn(5, 7), torch.randn(3, 7), torch.randn(2, 7), torch.randn(3, 2)
    with fastlora.use_backend("torch"), pytest.raises(RuntimeError, match="CUDA graph"):
        backend.draw_seed(x)
    with fastlora.use_backend("torch"), pytest.raises(RuntimeError, match="CUDA graph"):
        fastlora.lora_linear(x, w, None, a, b, 0.5, dropout_p=0.1)
    with fastlora.use_backend("torch"):
        y = fastlora.lora_linear(x, w, None, a, b, 0.5, dropout_p=0.0)
    torch.testing.assert_close(y, x @ w.t() + 0.5 * (x @ a.t()) @ b.t())
