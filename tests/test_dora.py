"""DoRA and lora_bias on a Linear: the float64 reference against PEFT's layers, and the op (Triton kernels under
the interpreter, and the torch path) against the reference and against PEFT, outputs and every gradient."""

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.utils._pytree as pytree
from fastlora.kernels import dora as kdora
from helpers import DTYPE_IDS, assert_close
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

import fastlora as fl
from fastlora.ops import dora as fdora
from fastlora.ops.backend import draw_seed
from fastlora.ops.dora import lora_linear_dora
from fastlora.reference import dora_linear_ref, dora_weight_norm_ref, lora_linear_bias_ref

BACKENDS = ["triton", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
M, K, N, R = 37, 75, 51, 5


class FixedMask(nn.Module):
    """Stands in for PEFT's nn.Dropout: multiplies by a given mask, so PEFT and the reference see one mask."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask.to(x.dtype)


def _inputs(dtype, zero_magnitude=True, lead=(), lora_dtype=torch.float32):
    x = torch.randn(*lead, M, K, dtype=dtype).requires_grad_()
    w = (torch.randn(N, K) / K**0.5).to(dtype)
    b = torch.randn(N).to(dtype)
    a = (torch.randn(R, K) / K**0.5).to(lora_dtype).requires_grad_()
    bb = torch.randn(N, R).to(lora_dtype).requires_grad_()
    g = torch.rand(N) + 0.5
    if zero_magnitude:
        g[N // 3] = 0.0
    return x, w, b, a, bb, g.to(lora_dtype).requires_grad_()


def _seed_of_next_call():
    """The dropout seed the op will draw next, read off a copy of torch's CPU RNG state."""
    state = torch.get_rng_state()
    seed = int(draw_seed(torch.empty(0)))
    torch.set_rng_state(state)
    return seed


def _op_mask(backend, seed, shape, p):
    """The dropout multiplier m (0 or 1/(1-p)) the path draws for a seed, as float64."""
    _, m = fdora._dropped(torch.ones(shape), p, seed, backend == "triton")
    return m.double()


def _leaves64(*tensors):
    return [t.detach().double().requires_grad_() if t is not None else None for t in tensors]


# ----------------------------------------------------------------------------------------------------------
# The reference is PEFT's DoRA and lora_bias, exactly
# ----------------------------------------------------------------------------------------------------------


def _peft_layer(p, *, use_dora=True, lora_bias=False, bias=True, dtype=torch.float64):
    base = nn.Sequential(nn.Linear(K, N, bias=bias))
    config = LoraConfig(r=R, lora_alpha=7, target_modules=["0"], use_dora=use_dora, lora_dropout=p, lora_bias=lora_bias)
    model = get_peft_model(base, config).to(dtype)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.randn(N, K) / K**0.5)
        if bias:
            layer.base_layer.bias.copy_(torch.randn(N))
        layer.lora_A["default"].weight.copy_(torch.randn(R, K) / K**0.5)
        layer.lora_B["default"].weight.copy_(torch.randn(N, R))
        if lora_bias:
            layer.lora_B["default"].bias.copy_(torch.randn(N))
        if use_dora:
            g = layer.lora_magnitude_vector["default"].weight
            g.copy_(torch.rand(N) + 0.5)
            g[N // 3] = 0.0
    model.train()
    return model, layer


def _peft_params(layer):
    params = {
        "weight": layer.base_layer.weight,
        "bias": layer.base_layer.bias,
        "lora_A": layer.lora_A["default"].weight,
        "lora_B": layer.lora_B["default"].weight,
        "scaling": layer.scaling["default"],
    }
    if "default" in layer.lora_magnitude_vector:
        params["magnitude"] = layer.lora_magnitude_vector["default"].weight
    if layer.lora_bias["default"]:
        params["lora_bias"] = layer.lora_B["default"].bias
    return params


def _peft_grads(layer, x, dy):
    out = layer(x)
    out.backward(dy)
    grads = {"x": x.grad}
    grads.update({name: t.grad for name, t in _peft_params(layer).items() if name not in ("weight", "bias", "scaling")})
    return out, grads


@pytest.mark.parametrize("mode", ["p0", "eval", "dropout"])
def test_reference_is_peft_dora(mode):
    p = 0.0 if mode == "p0" else 0.3
    _, layer = _peft_layer(p)
    mask = None
    if mode == "eval":
        layer.eval()
    elif mode == "dropout":
        mask = (torch.rand(M, K) >= p).double() / (1 - p)
        layer.lora_dropout["default"] = FixedMask(mask)
    x = torch.randn(M, K, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(M, N, dtype=torch.float64)
    out, grads = _peft_grads(layer, x, dy)
    prm = _peft_params(layer)
    x64, a64, b64, g64 = _leaves64(x, prm["lora_A"], prm["lora_B"], prm["magnitude"])
    w, b = prm["weight"].detach(), prm["bias"].detach()
    ref = dora_linear_ref(x64, w, b, a64, b64, g64, prm["scaling"], mask)
    ref.backward(dy)
    for name, got, want in [("Y", ref, out), ("dX", x64.grad, grads["x"]), ("dA", a64.grad, grads["lora_A"]),
                            ("dB", b64.grad, grads["lora_B"]), ("dg", g64.grad, grads["magnitude"])]:  # fmt: skip
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_reference_is_peft_lora_bias(p):
    _, layer = _peft_layer(p, use_dora=False, lora_bias=True)
    mask = None
    if p > 0:
        mask = (torch.rand(M, K) >= p).double() / (1 - p)
        layer.lora_dropout["default"] = FixedMask(mask)
    x = torch.randn(M, K, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(M, N, dtype=torch.float64)
    out, grads = _peft_grads(layer, x, dy)
    prm = _peft_params(layer)
    x64, a64, b64, lb64 = _leaves64(x, prm["lora_A"], prm["lora_B"], prm["lora_bias"])
    ref = lora_linear_bias_ref(x64, prm["weight"].detach(), prm["bias"].detach(), a64, b64, lb64, prm["scaling"], mask)
    ref.backward(dy)
    pairs = [("Y", ref, out), ("dX", x64.grad, grads["x"]), ("dA", a64.grad, grads["lora_A"])]
    pairs += [("dB", b64.grad, grads["lora_B"]), ("dlora_bias", lb64.grad, grads["lora_bias"])]
    for name, got, want in pairs:
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), name


# ----------------------------------------------------------------------------------------------------------
# The op against the float64 reference
# ----------------------------------------------------------------------------------------------------------


def _run_dora(backend, x, w, b, a, bb, g, scaling, dtype, p=0.0, training=True):
    seed = _seed_of_next_call()
    with fl.use_backend(backend):
        y = lora_linear_dora(x, w, b, a, bb, g, scaling, dropout_p=p, training=training)
    dy = torch.randn_like(y)
    y.backward(dy)
    mask = None
    if p > 0 and training:
        mask = _op_mask(backend, seed, (x.numel() // K, K), p).reshape(x.shape)
    x64, a64, b64, g64, bias64 = _leaves64(x, a, bb, g, b if b is not None and b.requires_grad else None)
    bias_ref = bias64 if bias64 is not None else (b.double() if b is not None else None)
    ref = dora_linear_ref(x64, w.double(), bias_ref, a64, b64, g64, scaling, mask)
    ref.backward(dy.double())
    assert y.dtype == dtype and y.shape == ref.shape
    assert_close(y, ref, dtype, "Y")
    assert_close(x.grad, x64.grad, dtype, "dX")
    assert_close(a.grad, a64.grad, dtype, "dA")
    assert_close(bb.grad, b64.grad, dtype, "dB")
    assert_close(g.grad, g64.grad, dtype, "dg")
    assert w.grad is None
    if bias64 is not None:
        assert_close(b.grad, bias64.grad, dtype, "dbias")
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_dora_matches_reference(backend, dtype, p):
    x, w, b, a, bb, g = _inputs(dtype)
    _run_dora(backend, x, w, b, a, bb, g, 1.4, dtype, p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_dora_no_bias_trainable_bias_leading_dims(backend, p):
    x, w, b, a, bb, g = _inputs(torch.float32, lead=(2,))
    _run_dora(backend, x, w, None, a, bb, g, 0.6, torch.float32, p)
    x, w, b, a, bb, g = _inputs(torch.float16)
    _run_dora(backend, x, w, b.requires_grad_(), a, bb, g, 0.6, torch.float16, p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dora_eval_takes_the_no_dropout_form(backend):
    x, w, b, a, bb, g = _inputs(torch.float32)
    y = _run_dora(backend, x, w, b, a, bb, g, 2.0, torch.float32, p=0.5, training=False)
    with fl.use_backend(backend), torch.no_grad():
        assert torch.equal(y, lora_linear_dora(x, w, b, a, bb, g, 2.0, dropout_p=0.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_bias_matches_reference(backend, dtype, p):
    x, w, b, a, bb, _ = _inputs(dtype)
    lb = torch.randn(N).requires_grad_()
    for bias in (b, None):
        x.grad = a.grad = bb.grad = lb.grad = None
        seed = _seed_of_next_call()
        with fl.use_backend(backend):
            y = fl.lora_linear(x, w, bias, a, bb, 0.8, dropout_p=p, lora_bias=lb)
        dy = torch.randn_like(y)
        y.backward(dy)
        mask = _op_mask(backend, seed, (M, K), p) if p > 0 else None
        x64, a64, b64, lb64 = _leaves64(x, a, bb, lb)
        ref = lora_linear_bias_ref(
            x64, w.double(), bias.double() if bias is not None else None, a64, b64, lb64, 0.8, mask
        )
        ref.backward(dy.double())
        assert_close(y, ref, dtype, "Y")
        for name, got, want in [("dX", x.grad, x64.grad), ("dA", a.grad, a64.grad), ("dB", bb.grad, b64.grad),
                                ("dlora_bias", lb.grad, lb64.grad)]:  # fmt: skip
            assert_close(got, want, dtype, name)
        assert w.grad is None


# ----------------------------------------------------------------------------------------------------------
# The op against PEFT's layers
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_dora_matches_peft(backend, p):
    _, layer = _peft_layer(p, dtype=torch.float32)
    prm = _peft_params(layer)
    x = torch.randn(M, K, requires_grad=True)
    seed = _seed_of_next_call()
    with fl.use_backend(backend):
        y = lora_linear_dora(
            x, prm["weight"], prm["bias"], prm["lora_A"], prm["lora_B"], prm["magnitude"], prm["scaling"], p
        )
    dy = torch.randn_like(y)
    y.backward(dy)
    ours = {"x": x.grad, "lora_A": prm["lora_A"].grad, "lora_B": prm["lora_B"].grad, "magnitude": prm["magnitude"].grad}
    for t in (prm["lora_A"], prm["lora_B"], prm["magnitude"]):
        t.grad = None
    if p > 0:
        layer.lora_dropout["default"] = FixedMask(_op_mask(backend, seed, (M, K), p))
    x_peft = x.detach().clone().requires_grad_()
    out, grads = _peft_grads(layer, x_peft, dy)
    assert_close(y, out, torch.float32, "Y vs PEFT", factor=4.0)
    for name in ours:
        assert_close(ours[name], grads[name], torch.float32, f"d{name} vs PEFT", factor=4.0)
    assert prm["weight"].grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_bias_matches_peft(backend):
    _, layer = _peft_layer(0.0, use_dora=False, lora_bias=True, dtype=torch.float32)
    prm = _peft_params(layer)
    x = torch.randn(M, K, requires_grad=True)
    with fl.use_backend(backend):
        y = fl.lora_linear(
            x, prm["weight"], prm["bias"], prm["lora_A"], prm["lora_B"], prm["scaling"], lora_bias=prm["lora_bias"]
        )
    dy = torch.randn_like(y)
    y.backward(dy)
    ours = {"x": x.grad, "lora_A": prm["lora_A"].grad, "lora_B": prm["lora_B"].grad, "lora_bias": prm["lora_bias"].grad}
    for t in (prm["lora_A"], prm["lora_B"], prm["lora_bias"]):
        t.grad = None
    out, grads = _peft_grads(layer, x.detach().clone().requires_grad_(), dy)
    assert_close(y, out, torch.float32, "Y vs PEFT", factor=4.0)
    for name in ours:
        assert_close(ours[name], grads[name], torch.float32, f"d{name} vs PEFT", factor=4.0)


# ----------------------------------------------------------------------------------------------------------
# The norm, its cache, and what is stored and allocated
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_weight_norm_and_its_cache(backend, dtype):
    _, w, _, a, bb, _ = _inputs(dtype)
    w = w.clone()
    with fl.use_backend(backend):
        n = fdora.dora_weight_norm(w, a, bb, 1.3)
        assert n.dtype == torch.float32
        assert_close(n, dora_weight_norm_ref(w.double(), a.double(), bb.double(), 1.3), dtype, "n")
        assert fdora._cached_wsq(w) is not None
        with torch.no_grad():
            w.mul_(1.5)  # an in-place edit (as merge does) bumps the version: the cached ||W||^2 must not be reused
        assert fdora._cached_wsq(w) is None
        n = fdora.dora_weight_norm(w, a, bb, 1.3)
        assert_close(n, dora_weight_norm_ref(w.double(), a.double(), bb.double(), 1.3), dtype, "n after edit")
        assert_close(fdora.dora_weight_norm(w, a, bb, 1.3), n, dtype, "n from the cache")


def test_norm_kernel_rank_chunks():
    """r = 70 spans two rank tiles of the norm kernel."""
    w, a, bb = torch.randn(N, K), torch.randn(70, K) / K**0.5, torch.randn(N, 70) / 8
    n, wsq = kdora.dora_weight_norm(w, a, bb, 0.9)
    assert_close(n, dora_weight_norm_ref(w.double(), a.double(), bb.double(), 0.9), torch.float32, "n")
    assert_close(wsq, w.double().square().sum(1), torch.float32, "||W||^2")


def _saved_elements(fn, *exclude):
    """Elements saved for backward beyond the given tensors (x, the parameters) and the output itself."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    excluded.add(out.untyped_storage().data_ptr())
    return sum(t.numel() for t in saved if t.untyped_storage().data_ptr() not in excluded)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_for_backward(backend, p):
    x, w, b, a, bb, g = _inputs(torch.float16)
    with fl.use_backend(backend):
        saved = _saved_elements(lambda: lora_linear_dora(x, w, b, a, bb, g, 1.0, dropout_p=p), x, w, b, a, bb, g)
    assert saved <= M * R + N + (M * N + 1 if p > 0 else 0)  # with dropout: the dropped x and the int64 seed


class AllocationSizes(TorchDispatchMode):
    """Records the element count of every tensor an op allocates (outputs on a storage none of its inputs has;
    views such as W^T are not allocations)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        storages = {t.untyped_storage().data_ptr() for t in inputs}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages:
                self.sizes.append((func.__name__, t.numel()))
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_no_n_by_k_tensor_is_allocated(backend, p):
    """Rows M = 8, so that N x K (3825) stands above every M x K, M x N, N x r tensor the op may form."""
    x, w, b, a, bb, g = _inputs(torch.float16)
    x = x.detach()[:8].requires_grad_()
    fdora._WSQ_CACHE.clear()
    with fl.use_backend(backend), AllocationSizes() as mode:
        lora_linear_dora(x, w, b, a, bb, g, 1.0, dropout_p=p).sum().backward()
    big = [(name, numel) for name, numel in mode.sizes if numel >= N * K]
    assert not big, big
    assert g.grad is not None
    with AllocationSizes() as mode:  # the check sees the N x K matrices the plain formula forms
        dora_linear_ref(*_leaves64(x, w, b, a, bb, g), 1.0).sum().backward()
    assert any(numel >= N * K for _, numel in mode.sizes)


# ----------------------------------------------------------------------------------------------------------
# torch.compile and bad input
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_compiled_matches_eager(p):
    torch._dynamo.reset()
    x, w, b, a, bb, g = _inputs(torch.float32)

    def step(fn):
        for t in (x, a, bb, g):
            t.grad = None
        torch.manual_seed(3)
        y = fn(x, w, b, a, bb, g)
        y.square().sum().backward()
        return y.detach(), [t.grad.clone() for t in (x, a, bb, g)]

    def f(x, w, b, a, bb, g):
        return lora_linear_dora(x, w, b, a, bb, g, 1.5, dropout_p=p)

    with fl.use_backend("torch"):
        ref_y, ref_grads = step(f)
        y, grads = step(torch.compile(f, backend="aot_eager", fullgraph=True))
    assert_close(y, ref_y, torch.float32, "Y")
    for got, want in zip(grads, ref_grads, strict=True):
        assert_close(got, want, torch.float32, "grad")
    torch._dynamo.reset()


def test_custom_ops_pass_opcheck():
    x, w, b, a, bb, g = _inputs(torch.float32)
    with fl.use_backend("torch"):
        torch.library.opcheck(
            torch.ops.fastlora.lora_linear_dora.default, (x.detach()[:9], w, b, a, bb, g, 1.5, 0.0, None)
        )


def test_bad_input():
    x, w, b, a, bb, g = _inputs(torch.float32)
    with pytest.raises(ValueError, match="magnitude must have shape"):
        lora_linear_dora(x, w, b, a, bb, g[:-1], 1.0)
    with pytest.raises(TypeError, match="magnitude must be float16, bfloat16 or float32"):
        lora_linear_dora(x, w, b, a, bb, torch.ones(N, dtype=torch.int64), 1.0)
    with pytest.raises(TypeError, match="magnitude must be a torch.Tensor"):
        lora_linear_dora(x, w, b, a, bb, [1.0] * N, 1.0)
    with pytest.raises(ValueError, match="lora_bias must have shape"):
        fl.lora_linear(x, w, b, a, bb, 1.0, lora_bias=torch.zeros(N + 1))
    with pytest.raises(TypeError, match="lora_bias must be"):
        fl.lora_linear(x, w, b, a, bb, 1.0, lora_bias=[0.0] * N)
    with pytest.raises(ValueError, match="magnitude must be 1-D"):
        lora_linear_dora(x, w, b, a, bb, g[None], 1.0)
    with pytest.raises(ValueError, match="dropout"):
        lora_linear_dora(x, w, b, a, bb, g, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="in_features"):
        lora_linear_dora(x[:, :-1], w, b, a, bb, g, 1.0)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_forward_is_one_gemm_launch_with_the_column_scale(monkeypatch, p):
    """Without dropout the DoRA forward hands c = g / n to kernels.linear's forward launcher (its epilogue scales
    x W^T + s S B^T before the bias); with dropout the launcher runs unscaled and Yq carries c."""
    klinear = fdora._klinear
    plain = klinear.lora_linear_fwd
    calls = []

    def spy(*args, col_scale=None):
        calls.append(col_scale is not None)
        return plain(*args, col_scale=col_scale)

    monkeypatch.setattr(klinear, "lora_linear_fwd", spy)
    x, w, b, a, bb, g = _inputs(torch.float32)
    _run_dora("triton", x, w, b, a, bb, g, 1.1, torch.float32, p)
    assert calls == [p == 0]


# ----------------------------------------------------------------------------------------------------------
# The layer: PEFT's initialisation, merge / unmerge, the norm cache across them
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d-layout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_layer_init_merge_unmerge(dtype, fan_in_fan_out):
    layer = fl.LoRALinear(K, N, r=R, alpha=7, dtype=dtype, fan_in_fan_out=fan_in_fan_out, use_dora=True)
    w0 = layer.base_weight.detach().double()
    assert_close(layer.lora_magnitude_vector, torch.linalg.vector_norm(w0, dim=1), dtype, "g = ||W|| at init")
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(N, R) / 4)
        layer.lora_magnitude_vector.mul_(torch.rand(N, dtype=dtype) + 0.5)
    x = torch.randn(M, K, dtype=dtype)
    with fl.use_backend("torch"), torch.no_grad():
        y = layer(x)
        weight_before = layer.weight.detach().clone()
        assert fdora._cached_wsq(layer.base_weight) is not None
        layer.merge(safe=True)
        assert layer.merged and fdora._cached_wsq(layer.base_weight) is None  # merged W has a new version
        ref = dora_linear_ref(x.double(), w0, layer.bias.double(), layer.lora_A.double(), layer.lora_B.double(),
                              layer.lora_magnitude_vector.double(), layer.scaling)  # fmt: skip
        assert_close(layer(x), ref, dtype, "merged output")
        layer.unmerge()
        assert not layer.merged
        assert_close(layer.weight, weight_before.double(), dtype, "W after unmerge")
        assert_close(layer(x), y, dtype, "output after unmerge")
        unmerged = layer.weight.detach().clone()
        layer.lora_B[0, 0] = float("inf")
        with pytest.raises(ValueError, match="NaN or Inf"):
            layer.merge(safe=True)
        assert torch.equal(layer.weight, unmerged) and not layer.merged


def test_layer_options_refused():
    with pytest.raises(ValueError, match="cannot be combined"):
        fl.LoRALinear.from_module(nn.Linear(4, 3), r=2, use_dora=True, lora_bias=True)
    with pytest.raises(TypeError, match="use_dora must be a bool"):
        fl.LoRALinear.from_module(nn.Linear(4, 3), r=2, use_dora="yes")
    with pytest.raises(TypeError, match="LoRAEmbedding.from_module takes no option 'use_dora'"):
        fl.LoRAEmbedding.from_module(nn.Embedding(5, 3), r=2, use_dora=True)


def test_lora_bias_merge_creates_and_removes_a_bias():
    layer = fl.LoRALinear.from_module(nn.Linear(K, N, bias=False), r=R, lora_bias=True)
    assert torch.equal(layer.lora_bias, torch.zeros(N))
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_bias.normal_()
    x = torch.randn(M, K)
    with fl.use_backend("torch"), torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.bias is not None
        assert_close(layer(x), y.double(), torch.float32, "merged")
        layer.unmerge()
        assert layer.bias is None
        assert_close(layer(x), y.double(), torch.float32, "unmerged")
