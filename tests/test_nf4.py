"""LoRA over a bitsandbytes 4-bit base weight: the dequantization kernel bit for bit against bitsandbytes, and the
layer's two Triton routes (under the interpreter) and torch path against the float64 reference."""

import itertools

import pytest
import torch
from fastlora.kernels import linear as klinear
from fastlora.kernels import nf4
from helpers import DTYPE_IDS, assert_close, saved_bytes

import fastlora as fl
from fastlora.ops.backend import draw_seed, dropout_keep
from fastlora.ops.linear4bit import lora_linear_4bit, quant_tensors
from fastlora.reference import lora_linear_ref
from fastlora.reference_4bit import dequantize_4bit_ref

bnbf = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUANTS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]
QUANT_IDS = ["nf4", "nf4-nested", "fp4", "fp4-nested"]
M, K, N, R = 37, 75, 51, 5


def _quantized(shape, dtype, quant_type, nested, blocksize=64, storage=torch.uint8):
    """(packed, quant_state) of a random W [N, K] in dtype, as bitsandbytes quantizes it."""
    w = torch.randn(shape) / shape[1] ** 0.5
    return bnbf.quantize_4bit(
        w.to(dtype), blocksize=blocksize, quant_type=quant_type, compress_statistics=nested, quant_storage=storage
    )


def _bits(t):
    return t.view({torch.float32: torch.int32}.get(t.dtype, torch.int16))


# ----------------------------------------------------------------------------------------------------------
# Dequantization: bit-exact
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("quant_type,nested", QUANTS, ids=QUANT_IDS)
# K=75: bitsandbytes dequantizes with its portable implementation on CPU; K=128: with its CPU kernel where the
# block size divides K (64, 128), else (256: blocks span rows) with the portable one (fastlora/reference_4bit.py)
@pytest.mark.parametrize("shape", [(51, 75), (40, 128)], ids=["N51-K75", "N40-K128"])
def test_dequantize_bit_exact(shape, quant_type, nested, blocksize, dtype):
    packed, qs = _quantized(shape, dtype, quant_type, nested, blocksize)
    out = nf4.dequantize_4bit(quant_tensors(packed, qs))
    ref = dequantize_4bit_ref(packed, qs)
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
    if quant_type == "fp4":  # bitsandbytes' CPU kernel gives -0.0 for the table's +0.0 (fastlora/reference_4bit.py)
        ref = ref + 0.0  # -0.0 -> +0.0, every other value unchanged
    assert torch.equal(_bits(out), _bits(ref)), f"{(_bits(out) != _bits(ref)).sum()} elements differ"


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("quant_type,nested", QUANTS, ids=QUANT_IDS)
def test_dequantize_16_and_32_bit_storage(quant_type, nested, storage):
    packed, qs = _quantized((52, 74), torch.bfloat16, quant_type, nested, 128, storage)
    assert packed.dtype == storage
    out = nf4.dequantize_4bit(quant_tensors(packed, qs), out_dtype=torch.float32)  # rounded to bf16, stored fp32
    assert torch.equal(out, dequantize_4bit_ref(packed, qs).float())


def test_workspace_is_one_buffer_per_device_and_dtype():
    nf4.release_workspace()
    small, big = _quantized((16, 32), torch.float16, "nf4", False), _quantized((51, 75), torch.float16, "nf4", False)
    for packed, qs in (small, big, small):
        w = nf4._dequantized(quant_tensors(packed, qs), torch.float16)
        assert torch.equal(_bits(w), _bits(dequantize_4bit_ref(packed, qs)))
    assert list(nf4._WORKSPACE) == [(torch.device("cpu"), torch.float16)]
    assert nf4._WORKSPACE[(torch.device("cpu"), torch.float16)].numel() == 51 * 75
    nf4.release_workspace()


# ----------------------------------------------------------------------------------------------------------
# The layer: forward and every gradient against float64
# ----------------------------------------------------------------------------------------------------------

PATHS = [("triton", "fused"), ("triton", "workspace"), ("torch", None)]
PATH_IDS = ["fused", "workspace", "torch"]


def _seed_of_next_call():
    state = torch.get_rng_state()
    seed = int(draw_seed(torch.empty(0)))
    torch.set_rng_state(state)
    return seed


def _check_layer(
    monkeypatch, backend, route, dtype, quant_type, nested, p, shape=(M, K, N, R), bias_trainable=False, lead=()
):
    m, k, n, r = shape
    if route is not None:
        monkeypatch.setattr(nf4, "FUSED_MAX_M", 64 if route == "fused" else 0)
        assert nf4.choose_route(m, r) == route
        nf4.release_workspace()
    packed, qs = _quantized((n, k), dtype, quant_type, nested)
    x = torch.randn(*lead, m, k, dtype=dtype, requires_grad=True)
    bias = torch.randn(n).to(dtype).requires_grad_(bias_trainable)
    a = (torch.randn(r, k) / k**0.5).requires_grad_()
    b = torch.randn(n, r).requires_grad_()
    seed = _seed_of_next_call()
    with fl.use_backend(backend):
        y = lora_linear_4bit(x, packed, qs, bias, a, b, 0.75, dropout_p=p)
        dy = torch.randn_like(y)
        y.backward(dy)
    mask = None
    if p > 0:
        rows = x.numel() // k
        if backend == "triton":
            keep = klinear.dropout_mask(seed, rows, k, p, "cpu")
        else:
            keep = dropout_keep(seed, (rows, k), p, "cpu")
        mask = (keep.double() / (1.0 - p)).reshape(x.shape)
    w64 = dequantize_4bit_ref(packed, qs).to(dtype).double()
    x64, a64, b64, bias64 = (t.detach().double().requires_grad_() for t in (x, a, b, bias))
    ref = lora_linear_ref(x64, w64, bias64, a64, b64, 0.75, mask=mask)
    ref.backward(dy.double())
    assert y.dtype == dtype
    assert_close(y, ref, dtype, "Y")
    assert_close(x.grad, x64.grad, dtype, "dX")
    assert_close(a.grad, a64.grad, dtype, "dA")
    assert_close(b.grad, b64.grad, dtype, "dB")
    assert packed.grad is None and not packed.requires_grad
    if route == "fused":
        assert not nf4._WORKSPACE, "the fused route dequantizes inside the GEMM, into no workspace"
    elif route == "workspace":
        assert list(nf4._WORKSPACE) == [(torch.device("cpu"), dtype)]
    if bias_trainable:
        assert_close(bias.grad, bias64.grad, dtype, "dbias")
    else:
        assert bias.grad is None


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("quant_type,nested", QUANTS, ids=QUANT_IDS)
def test_torch_path(monkeypatch, quant_type, nested, dtype, p):
    _check_layer(monkeypatch, "torch", None, dtype, quant_type, nested, p)


# Under the interpreter: every route x dtype x dropout, the four quantizations taking turns (the dequantization
# itself is checked bit for bit above, through the same device helper the GEMMs use)
_KERNEL_CASES = [
    pytest.param(route, *QUANTS[i % 4], dtype, p, id=f"{route}-{QUANT_IDS[i % 4]}-{DTYPE_IDS[dtype]}-p{p:g}")
    for i, (route, dtype, p) in enumerate(itertools.product(["fused", "workspace"], DTYPES, [0.0, 0.1]))
]


@pytest.mark.parametrize("route,quant_type,nested,dtype,p", _KERNEL_CASES)
def test_kernels(monkeypatch, route, quant_type, nested, dtype, p):
    _check_layer(monkeypatch, "triton", route, dtype, quant_type, nested, p)


@pytest.mark.parametrize("backend,route", PATHS, ids=PATH_IDS)
def test_trainable_bias_rank_above_16_and_leading_dims(monkeypatch, backend, route):
    _check_layer(
        monkeypatch, backend, route, torch.float32, "nf4", True, 0.1, (19, 75, 51, 21), bias_trainable=True, lead=(2,)
    )


def test_default_route_by_rows():
    assert nf4.choose_route(nf4.FUSED_MAX_M, 16) == "fused"
    assert nf4.choose_route(nf4.FUSED_MAX_M + 1, 16) == "workspace"
    assert nf4.choose_route(8, nf4.FUSED_MAX_RANK + 1) == "workspace"


# ----------------------------------------------------------------------------------------------------------
# Memory: nothing of N x K saved for backward
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("backend,route", PATHS, ids=PATH_IDS)
def test_saved_for_backward_is_S_only(monkeypatch, backend, route, p):
    if route is not None:
        monkeypatch.setattr(nf4, "FUSED_MAX_M", 64 if route == "fused" else 0)
    packed, qs = _quantized((N, K), torch.float16, "nf4", True)
    x = torch.randn(M, K, dtype=torch.float16, requires_grad=True)
    a, b = torch.randn(R, K).requires_grad_(), torch.randn(N, R).requires_grad_()
    state = (packed, qs.absmax, qs.code, qs.state2.absmax, qs.state2.code, qs.offset)
    with fl.use_backend(backend):
        saved = saved_bytes(lambda: lora_linear_4bit(x, packed, qs, None, a, b, 1.0, dropout_p=p), x, a, b, *state)
    seed = 8 if p > 0 else 0  # the int64 dropout seed
    assert saved <= M * R * x.element_size() + seed < N * K * x.element_size()


# ----------------------------------------------------------------------------------------------------------
# torch.compile and bad input
# ----------------------------------------------------------------------------------------------------------


def test_compiles_fullgraph_and_matches_eager():
    packed, qs = _quantized((N, K), torch.float32, "nf4", True)
    x = torch.randn(M, K, requires_grad=True)
    bias, a, b = torch.randn(N), torch.randn(R, K).requires_grad_(), torch.randn(N, R).requires_grad_()
    with fl.use_backend("torch"):
        fn = torch.compile(
            lambda x: lora_linear_4bit(x, packed, qs, bias, a, b, 0.5), fullgraph=True, backend="aot_eager"
        )
        y = fn(x)
        y.sum().backward()
        grads = [t.grad.clone() for t in (x, a, b)]
        for t in (x, a, b):
            t.grad = None
        lora_linear_4bit(x, packed, qs, bias, a, b, 0.5).sum().backward()
    for got, t in zip(grads, (x, a, b), strict=True):
        assert torch.allclose(got, t.grad)


def _valid(**change):
    packed, qs = _quantized((6, 8), torch.float32, "nf4", False)
    args = dict(x=torch.randn(3, 8), weight_packed=packed, quant_state=qs, bias=torch.randn(6),
                lora_A=torch.randn(2, 8), lora_B=torch.randn(6, 2), scaling=1.0)  # fmt: skip
    args.update(change)
    return args


def _other_state(**kw):
    return _quantized((6, 16), torch.float32, "nf4", False, **kw)[1]


@pytest.mark.parametrize(
    "change,error,words",
    [
        (dict(weight_packed=torch.randn(6, 8)), ValueError, "packed 4-bit data"),
        (dict(quant_state=None), TypeError, "QuantState"),
        (dict(quant_state={"absmax": 1}), TypeError, "QuantState"),
        (dict(quant_state=_other_state()), ValueError, "packed 4-bit data"),
        (dict(quant_state=_other_state(blocksize=32)), ValueError, "blocksize"),
        (dict(x=torch.randn(3, 7)), ValueError, "in_features=8"),
        (dict(bias=torch.randn(5)), ValueError, "bias"),
        (dict(lora_A=torch.randn(2, 7)), ValueError, "lora_A"),
        (dict(x=torch.randint(0, 3, (3, 8))), TypeError, "x must be"),
    ],
    ids=[
        "dense-weight",
        "no-state",
        "dict-state",
        "state-of-another-shape",
        "blocksize-32",
        "x-K",
        "bias-N",
        "lora_A-K",
        "int-x",
    ],  # fmt: skip
)
def test_bad_input_names_the_argument(change, error, words):
    with pytest.raises(error, match=words):
        lora_linear_4bit(**_valid(**change))


def test_bad_absmax_count():
    args = _valid()
    qs = args["quant_state"]
    qs.absmax = qs.absmax[:-1]
    with pytest.raises(ValueError, match="absmax has"):
        lora_linear_4bit(**args)
