"""Property tests: every functional op, over drawn shapes, strides, ranks, dtypes, bias and dropout settings,
matches fastlora.reference evaluated in float64, on the torch path and on the Triton kernels under the
interpreter. Output, dX, dA and dB are all compared; the frozen base tensors never get a gradient.

Hypothesis runs a fixed, derandomised set of examples with no example database, so every run (and CI)
draws the same cases. With dropout, the mask an op draws for a seed is read back through the op itself
(an identity probe: zero base weight, A = B = I, input of ones, under the same RNG seed), then checked to
hold only 0 and 1/(1-p) and handed to the reference.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lora_cases import PATHS, kind_param, on_path

import fastlora
from fastlora.reference import lora_conv2d_ref, lora_embedding_ref, lora_linear_ref

PROFILE = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = {"torch": [torch.float32, torch.float16, torch.bfloat16], "triton": [torch.float32, torch.float16]}
# The interpreter runs each kernel program by program in Python: fewer examples there keep the suite quick.
EXAMPLES = {"torch": 12, "triton": 8}


# Sizes start at 2 or 3, so each compared tensor has several elements: a lone dot product can cancel to near
# zero, and no finite-precision path meets a relative bound on a cancelled scalar.


def _layout(gen, shape, dtype, layout):
    """A random leaf tensor of ``shape`` stored as asked: "contig", "transposed" (last two dims swapped in
    memory) or "strided" (every other element of the last dim)."""
    shape = tuple(shape)
    if layout == "transposed" and len(shape) >= 2:
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).transpose(-1, -2)
    elif layout == "strided":
        t = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)[..., ::2]
    else:
        t = torch.randn(*shape, generator=gen)
    return t.to(dtype).detach()


def _leaf(t):
    return t.detach().requires_grad_()


def _ref_leaf(t):
    return t.detach().double().requires_grad_()


def _check_mask(mask, p):
    kept = 1.0 / (1.0 - p)
    assert torch.all((mask == 0) | torch.isclose(mask, torch.tensor(kept, dtype=mask.dtype))), "mask values"


def _compare(out, ref_out, tensors, ref_tensors, grad_names, dtype, dy_seed):
    """Output and the gradients of sum(out * dY) of the named tensors, each against the float64 reference."""
    assert_close(out, ref_out, dtype, "output")
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(dy_seed)).to(out.dtype)
    out.backward(dy)
    ref_out.backward(dy.double())
    for name in grad_names:
        assert tensors[name].grad is not None, f"{name} got no gradient"
        assert_close(tensors[name].grad, ref_tensors[name].grad, dtype, f"grad {name}")
    for name, t in tensors.items():
        if name not in grad_names and isinstance(t, torch.Tensor):
            assert t.grad is None, f"frozen {name} received a gradient"


# ----------------------------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------------------------


def linear_mask(x_shape, p, seed):
    """The dropout mask lora_linear draws for an input of x_shape after torch.manual_seed(seed), read back."""
    k = x_shape[-1]
    eye = torch.eye(k)
    torch.manual_seed(seed)
    with torch.no_grad():
        mask = fastlora.lora_linear(torch.ones(x_shape), torch.zeros(k, k), None, eye, eye, 1.0, p, training=True)
    _check_mask(mask, p)
    return mask


@st.composite
def linear_cases(draw, dtypes):
    lead = draw(st.lists(st.integers(1, 6), min_size=1, max_size=2))
    return {
        "lead": lead,
        "K": draw(st.integers(3, 40)),
        "N": draw(st.integers(3, 40)),
        "r": draw(st.integers(2, 8)),
        "dtype": draw(st.sampled_from(dtypes)),
        "factor_fp32": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "dropout": draw(st.sampled_from([0.0, 0.0, 0.25, 0.6])),
        "training": draw(st.booleans()),
        "x_layout": draw(st.sampled_from(["contig", "transposed", "strided"])),
        "w_layout": draw(st.sampled_from(["contig", "transposed"])),
        "ab_layout": draw(st.sampled_from(["contig", "transposed"])),
        "scaling": draw(st.sampled_from([0.5, 2.0, 1.75])),
        "seed": draw(st.integers(0, 2**20)),
    }


def _run_linear(c):
    dtype = c["dtype"]
    factor_dtype = torch.float32 if c["factor_fp32"] else dtype
    gen = torch.Generator().manual_seed(c["seed"])
    k, n, r = c["K"], c["N"], c["r"]
    t = {
        "x": _leaf(_layout(gen, (*c["lead"], k), dtype, c["x_layout"])),
        "weight": _layout(gen, (n, k), dtype, c["w_layout"]),
        "bias": _layout(gen, (n,), dtype, "contig") if c["bias"] else None,
        "lora_A": _leaf(_layout(gen, (r, k), factor_dtype, c["ab_layout"])),
        "lora_B": _leaf(_layout(gen, (n, r), factor_dtype, c["ab_layout"])),
    }
    ref = {name: (_ref_leaf(v) if v is not None else None) for name, v in t.items()}
    p = c["dropout"]
    mask = linear_mask(t["x"].shape, p, c["seed"]).double() if p > 0 and c["training"] else None
    torch.manual_seed(c["seed"])
    out = fastlora.lora_linear(**t, scaling=c["scaling"], dropout_p=p, training=c["training"])
    assert out.dtype == dtype and out.shape == (*c["lead"], n)
    ref_out = lora_linear_ref(**ref, scaling=c["scaling"], mask=mask)
    _compare(out, ref_out, t, ref, ("x", "lora_A", "lora_B"), dtype, c["seed"] + 1)


@pytest.mark.parametrize("path", PATHS)
def test_lora_linear_matches_reference(path):
    @settings(PROFILE, max_examples=EXAMPLES[path])
    @given(linear_cases(DTYPES[path]))
    def check(case):
        with on_path(path):
            _run_linear(case)

    check()


# ----------------------------------------------------------------------------------------------------------
# Embedding
# ----------------------------------------------------------------------------------------------------------


@st.composite
def embedding_cases(draw, dtypes):
    vocab = draw(st.integers(3, 40))
    return {
        "idx_shape": draw(st.lists(st.integers(1, 9), min_size=1, max_size=2)),
        "V": vocab,
        "D": draw(st.integers(3, 40)),
        "r": draw(st.integers(2, 8)),
        "dtype": draw(st.sampled_from(dtypes)),
        "padding_idx": draw(st.one_of(st.none(), st.integers(0, vocab - 1))),
        "w_layout": draw(st.sampled_from(["contig", "transposed"])),
        "ab_layout": draw(st.sampled_from(["contig", "transposed"])),
        "scaling": draw(st.sampled_from([0.5, 2.0, 1.75])),
        "seed": draw(st.integers(0, 2**20)),
    }


def _run_embedding(c):
    dtype = c["dtype"]
    gen = torch.Generator().manual_seed(c["seed"])
    v, d, r = c["V"], c["D"], c["r"]
    # few distinct ids, so duplicates (whose gradients must add up) and the padding row both occur
    idx = torch.randint(0, v, tuple(c["idx_shape"]), generator=gen)
    t = {
        "weight": _layout(gen, (v, d), dtype, c["w_layout"]),
        "lora_A": _leaf(_layout(gen, (r, v), dtype, c["ab_layout"])),
        "lora_B": _leaf(_layout(gen, (d, r), dtype, c["ab_layout"])),
    }
    ref = {name: _ref_leaf(val) for name, val in t.items()}
    out = fastlora.lora_embedding(idx, **t, scaling=c["scaling"], padding_idx=c["padding_idx"])
    assert out.dtype == dtype and out.shape == (*c["idx_shape"], d)
    ref_out = lora_embedding_ref(idx, **ref, scaling=c["scaling"], padding_idx=c["padding_idx"])
    _compare(out, ref_out, t, ref, ("lora_A", "lora_B"), dtype, c["seed"] + 1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", [kind_param("embedding")])
def test_lora_embedding_matches_reference(kind, path):
    @settings(PROFILE, max_examples=EXAMPLES[path])
    @given(embedding_cases(DTYPES[path]))
    def check(case):
        with on_path(path):
            _run_embedding(case)

    check()


# ----------------------------------------------------------------------------------------------------------
# Conv2d
# ----------------------------------------------------------------------------------------------------------


def conv2d_mask(x_shape, p, seed):
    """The dropout mask lora_conv2d draws on an input of x_shape after torch.manual_seed(seed), read back
    through 1x1 identity convolutions."""
    c = x_shape[1]
    eye = torch.eye(c).reshape(c, c, 1, 1)
    torch.manual_seed(seed)
    with torch.no_grad():
        mask = fastlora.lora_conv2d(
            torch.ones(x_shape), torch.zeros(c, c, 1, 1), None, eye, eye, 1.0, dropout_p=p, training=True
        )
    _check_mask(mask, p)
    return mask


@st.composite
def conv2d_cases(draw, dtypes):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 1))
    min_hw = max(dilation * (max(kh, kw) - 1) + 1 - 2 * padding, 1)
    return {
        "Nb": draw(st.integers(1, 3)),
        "C": groups * draw(st.integers(1, 3)),
        "O": groups * draw(st.integers(1, 3)),
        "groups": groups,
        "H": draw(st.integers(min_hw, min_hw + 6)),
        "W": draw(st.integers(min_hw, min_hw + 6)),
        "kernel": (kh, kw),
        "stride": draw(st.integers(1, 2)),
        "padding": padding,
        "dilation": dilation,
        "r": draw(st.integers(2, 6)),
        "dtype": draw(st.sampled_from(dtypes)),
        "bias": draw(st.booleans()),
        "dropout": draw(st.sampled_from([0.0, 0.0, 0.25])),
        "training": draw(st.booleans()),
        "channels_last": draw(st.booleans()),
        "scaling": draw(st.sampled_from([0.5, 2.0, 1.75])),
        "seed": draw(st.integers(0, 2**20)),
    }


def _run_conv2d(c):
    dtype = c["dtype"]
    gen = torch.Generator().manual_seed(c["seed"])
    cin, cout, r, (kh, kw) = c["C"], c["O"], c["r"], c["kernel"]
    x = _layout(gen, (c["Nb"], cin, c["H"], c["W"]), dtype, "contig")
    if c["channels_last"]:
        x = x.to(memory_format=torch.channels_last)
    t = {
        "x": _leaf(x),
        "weight": _layout(gen, (cout, cin // c["groups"], kh, kw), dtype, "contig"),
        "bias": _layout(gen, (cout,), dtype, "contig") if c["bias"] else None,
        "lora_A": _leaf(_layout(gen, (r, cin, kh, kw), dtype, "contig")),
        "lora_B": _leaf(_layout(gen, (cout, r, 1, 1), dtype, "contig")),
    }
    ref = {name: (_ref_leaf(v) if v is not None else None) for name, v in t.items()}
    geometry = {k: c[k] for k in ("stride", "padding", "dilation", "groups")}
    p = c["dropout"]
    mask = conv2d_mask(x.shape, p, c["seed"]).double() if p > 0 and c["training"] else None
    torch.manual_seed(c["seed"])
    out = fastlora.lora_conv2d(**t, scaling=c["scaling"], **geometry, dropout_p=p, training=c["training"])
    ref_out = lora_conv2d_ref(**ref, scaling=c["scaling"], **geometry, mask=mask)
    assert out.dtype == dtype
    _compare(out, ref_out, t, ref, ("x", "lora_A", "lora_B"), dtype, c["seed"] + 1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", [kind_param("conv2d")])
def test_lora_conv2d_matches_reference(kind, path):
    @settings(PROFILE, max_examples=EXAMPLES[path])
    @given(conv2d_cases(DTYPES[path]))
    def check(case):
        with on_path(path):
            _run_conv2d(case)

    check()
