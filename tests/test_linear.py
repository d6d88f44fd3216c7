"""LoRA linear: the Triton kernels (under the interpreter) and the torch path against the float64 reference."""

import pytest
import torch
import torch.nn as nn
from fastlora.kernels import linear as klinear
from helpers import DTYPE_IDS, assert_close, saved_bytes
from linear_launches import LaunchCounter
from lora_cases import PATHS, on_path

import fastlora as fl
from fastlora.ops.backend import draw_seed, dropout_keep
from fastlora.reference import lora_linear_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(M, K, N, r, dtype, bias=True, lora_dtype=torch.float32, lead=()):
    x = torch.randn(*lead, M, K, dtype=dtype)
    w = (torch.randn(N, K) / K**0.5).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    a = (torch.randn(r, K) / K**0.5).to(lora_dtype).requires_grad_()
    bb = torch.randn(N, r).to(lora_dtype).requires_grad_()
    return x.requires_grad_(), w, b, a, bb


def _kernel_mask(path, seed, shape, p):
    """The dropout multiplier m (0 or 1/(1-p)) that the given path draws for a seed, as float64."""
    m, k = shape
    keep = klinear.dropout_mask(seed, m, k, p, "cpu") if path == "triton" else dropout_keep(seed, (m, k), p, "cpu")
    return keep.double() / (1.0 - p)


def _seed_of_next_call():
    """The seed lora_linear will draw next, read off a copy of torch's CPU RNG state."""
    state = torch.get_rng_state()
    seed = int(draw_seed(torch.empty(0)))
    torch.set_rng_state(state)
    return seed


def _run_and_compare(path, x, w, b, a, bb, scaling, dtype, dropout_p=0.0, bias_trainable=False):
    if bias_trainable:
        b.requires_grad_()
    seed = _seed_of_next_call()
    with on_path(path):
        y = fl.lora_linear(x, w, b, a, bb, scaling, dropout_p=dropout_p)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, bb))
    bias64 = b.detach().double().requires_grad_() if b is not None else None
    mask = None
    if dropout_p > 0:
        mask = _kernel_mask(path, seed, (x.numel() // x.shape[-1], x.shape[-1]), dropout_p).reshape(x.shape)
    ref = lora_linear_ref(x64, w.double(), bias64, a64, b64, scaling, mask=mask)
    ref.backward(dy.double())
    assert y.dtype == dtype and y.shape == ref.shape
    assert_close(y, ref, dtype, "Y")
    assert_close(x.grad, x64.grad, dtype, "dX")
    assert_close(a.grad, a64.grad, dtype, "dA")
    assert_close(bb.grad, b64.grad, dtype, "dB")
    assert w.grad is None
    if bias_trainable:
        assert_close(b.grad, bias64.grad, dtype, "dbias")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("r", [1, 5, 16, 64])
def test_matches_reference(path, dtype, r):
    x, w, b, a, bb = _inputs(37, 75, 51, r, dtype)
    _run_and_compare(path, x, w, b, a, bb, 0.75, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("r", [8, 16])
def test_hopper_tma_gemm_matches_reference(monkeypatch, dtype, p, r):
    """The sm_90 path (tensor descriptors, persistent tiles, the LoRA term, mask and dA share in the epilogue),
    forced on under the interpreter. Rows are 16-byte aligned (K=72, N=56, r a multiple of 8) so TMA can address
    every operand; the pointer kernel covers the rest."""
    monkeypatch.setattr(klinear, "_tma_capable", lambda device: True)
    x, w, b, a, bb = _inputs(37, 72, 56, r, dtype, lead=(2,))
    with LaunchCounter() as launches:
        _run_and_compare("triton", x, w, b, a, bb, 0.5, dtype, dropout_p=p)
    assert launches.kernels.count("_lora_gemm_tma_kernel") == 2 and "_lora_gemm_kernel" not in launches.kernels


@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_column_scale_multiplies_before_bias(monkeypatch, tma, dtype):
    """DoRA's forward: Y = c * (x W^T + s S B^T) + bias with c [N] float32, in the GEMM's epilogue."""
    monkeypatch.setattr(klinear, "_tma_capable", lambda device: tma)
    x, w, b, a, bb = (t.detach() for t in _inputs(37, 72, 56, 8, dtype))
    c = torch.rand(56) + 0.5
    y, _ = klinear.lora_linear_fwd(x, w, b, a.to(dtype), bb.to(dtype), 0.75, 0.0, 0, col_scale=c)
    a64, b64 = a.to(dtype).double(), bb.to(dtype).double()
    ref = c.double() * lora_linear_ref(x.double(), w.double(), None, a64, b64, 0.75) + b.double()
    assert_close(y, ref, dtype, "Y")
    with pytest.raises(ValueError, match="col_scale"):
        klinear.lora_linear_fwd(x, w, b, a, bb, 0.75, 0.0, 0, col_scale=c.double())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_rank_update_in_place(dtype, p):
    """The dispatch's alternative path: Y <- c * (Y + s * mask(P Q)) + bias in place, the mask being x's."""
    M, N, r, seed = 37, 51, 5, 99
    y0 = torch.randn(M, N, dtype=dtype)
    pm, q = torch.randn(M, r, dtype=dtype), torch.randn(N, r, dtype=dtype).t()
    bias, c = torch.randn(N, dtype=dtype), torch.rand(N) + 0.5
    y = y0.clone()
    assert klinear.lora_update_(y, pm, q, 0.5, bias=bias, col_scale=c, dropout_p=p, seed=seed) is y
    keep = klinear.dropout_mask(seed, M, N, p, "cpu").double() if p > 0 else 1.0
    ref = c.double() * (y0.double() + 0.5 * keep * (pm.double() @ q.double())) + bias.double()
    assert_close(y, ref, dtype, "Y")


def _budget_inputs(dtype, lora_dtype):
    # M = 2048 rows (past configs.SPLIT_FREE_M); tiny K, N, r keep the interpreter quick (r = 8: TMA-aligned rows)
    x, w, b, a, bb = (t.detach() for t in _inputs(2048, 24, 40, 8, dtype, lora_dtype=lora_dtype))
    return x, w, b, a, bb


@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_launch_budget_at_2048_rows(monkeypatch, tma, lora_dtype, p):
    """From 2048 rows: forward <= 2 launches, backward <= 4, every launch counted (Triton kernels, memsets,
    casts, sums), with no split partials; the outputs come back in their final dtypes."""
    monkeypatch.setattr(klinear, "_tma_capable", lambda device: tma)
    monkeypatch.setattr(torch, "empty", torch._C._VariableFunctions.empty)  # no NaN poisoning: it launches fills
    monkeypatch.setattr(torch, "empty_like", torch._C._VariableFunctions.empty_like)
    x, w, b, a, bb = _budget_inputs(torch.bfloat16, lora_dtype)
    with LaunchCounter() as fwd:
        y, s = klinear.lora_linear_fwd(x, w, b, a, bb, 0.5, p, 7)
    dy = torch.randn_like(y)
    with LaunchCounter() as bwd:
        dx, da, db, _ = klinear.lora_linear_bwd(dy, x, s, w, a, bb, 0.5, p, 7)
    assert fwd.total <= 2, (fwd.kernels, fwd.torch_ops)
    # with dropout the dS/dB pass takes dA from x: dX's epilogue draws the mask only for the LoRA term
    assert bwd.total <= 4, (bwd.kernels, bwd.torch_ops)
    assert ("_lora_gemm_tma_kernel" in fwd.kernels + bwd.kernels) == tma
    assert "sum" not in bwd.torch_ops + fwd.torch_ops
    assert y.dtype == dx.dtype == torch.bfloat16 and da.dtype == db.dtype == lora_dtype
    # and the answer is right
    keep = klinear.dropout_mask(7, 2048, 24, p, "cpu").double() / (1 - p) if p > 0 else None
    x64, a64, b64 = x.double().requires_grad_(), a.double().requires_grad_(), bb.double().requires_grad_()
    ref = lora_linear_ref(x64, w.double(), b.double(), a64, b64, 0.5, mask=keep)
    ref.backward(dy.double())
    assert_close(y, ref, torch.bfloat16, "Y")
    assert_close(dx, x64.grad, torch.bfloat16, "dX")
    assert_close(da, a64.grad, torch.bfloat16, "dA")
    assert_close(db, b64.grad, torch.bfloat16, "dB")


@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
@pytest.mark.parametrize("rows", [37, 2048])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_backward_without_dx_never_touches_the_weight(monkeypatch, tma, rows, p):
    """The QLoRA contract: lora_linear_bwd(..., need_dx=False) gets a zero-stride placeholder weight
    (dy.new_empty(()).expand(N, K)); it reads only its shape: no GEMM, no tensor descriptor, and a NaN placeholder
    leaves dA and dB exact (below and from SPLIT_FREE_M rows, where the dS/dB pass takes dA)."""
    monkeypatch.setattr(klinear, "_tma_capable", lambda device: tma)
    x, w, _, a, bb = (t.detach() for t in _inputs(rows, 24, 40, 5, torch.bfloat16))
    y, s = klinear.lora_linear_fwd(x, w, None, a, bb, 0.5, p, 11)
    dy = torch.randn_like(y)

    def refuse(*args, **kwargs):
        raise AssertionError("the weight was used without dX")

    for name in ("_gemm", "_desc", "lora_update_"):
        monkeypatch.setattr(klinear, name, refuse)
    monkeypatch.setattr(klinear.TensorDescriptor, "from_tensor", refuse)
    placeholder = dy.new_full((), float("nan")).expand(*w.shape)
    dx, da, db, _ = klinear.lora_linear_bwd(dy, x, s, placeholder, a, bb, 0.5, p, 11, need_dx=False)
    assert dx is None
    keep = klinear.dropout_mask(11, rows, 24, p, "cpu").double() / (1 - p) if p > 0 else None
    a64, b64 = a.double().requires_grad_(), bb.double().requires_grad_()
    lora_linear_ref(x.double(), w.double(), None, a64, b64, 0.5, mask=keep).backward(dy.double())
    assert_close(da, a64.grad, torch.bfloat16, "dA")
    assert_close(db, b64.grad, torch.bfloat16, "dB")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_3d_input_no_bias_trainable_bias(path, dtype):
    x, w, _, a, bb = _inputs(13, 40, 70, 5, dtype, lead=(3,))
    _run_and_compare(path, x, w, None, a, bb, 2.0, dtype)
    x, w, b, a, bb = _inputs(13, 40, 70, 5, dtype, lead=(3,))
    _run_and_compare(path, x, w, b, a, bb, 2.0, dtype, bias_trainable=True)


@pytest.mark.parametrize("path", PATHS)
def test_non_contiguous_input_and_weight(path):
    dtype = torch.float16
    base = torch.randn(75, 37 * 2, dtype=dtype)
    x = base[:, ::2].t().requires_grad_()  # [37, 75], strides (2, 74)
    assert not x.is_contiguous()
    w = (torch.randn(75, 51) / 9).to(dtype).t()  # [51, 75] transposed view, as for GPT-2's Conv1D
    _, _, b, a, bb = _inputs(37, 75, 51, 5, dtype)
    _run_and_compare(path, x, w, b, a, bb, 0.5, dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_lora_factors_in_another_dtype(path, dtype):
    """Adapters often stay float32 while the base is 16-bit; gradients come back in the adapter's dtype."""
    x, w, b, a, bb = _inputs(37, 75, 51, 8, torch.bfloat16 if dtype == torch.float32 else dtype, lora_dtype=dtype)
    _run_and_compare(path, x, w, b, a, bb, 0.5, x.dtype)
    assert a.grad.dtype == dtype and bb.grad.dtype == dtype


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_uses_one_mask_in_forward_and_backward(path, dtype, p):
    x, w, b, a, bb = _inputs(37, 75, 51, 5, dtype)
    _run_and_compare(path, x, w, b, a, bb, 1.5, dtype, dropout_p=p)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(p):
    """The kernel's mask keeps 1 - t / 65536 of the elements (t the 16-bit threshold, within 2^-17 of p), within
    5 standard deviations, with no pattern across rows."""
    m, k = 203, 301
    keep = klinear.dropout_mask(12345, m, k, p, "cpu").double()
    n = m * k
    q = 1 - klinear.dropout_threshold(p) / 65536
    assert abs(q - (1 - p)) <= 2**-17
    sigma = (q * (1 - q) / n) ** 0.5
    assert abs(keep.mean().item() - q) < 5 * sigma
    # no drift along rows or columns: the keep rate of each half of the rows and of the columns
    for part in (keep[: m // 2], keep[m // 2 :], keep[:, : k // 2], keep[:, k // 2 :]):
        assert abs(part.mean().item() - q) < 5 * (q * (1 - q) / part.numel()) ** 0.5
    # rows and columns differ: no two rows or columns share one mask
    assert len({tuple(row.tolist()) for row in keep}) == m
    assert len({tuple(col.tolist()) for col in keep.t()}) == k
    # a different seed gives a different mask; the same seed the same
    assert not torch.equal(keep, klinear.dropout_mask(54321, m, k, p, "cpu").double())
    assert torch.equal(keep, klinear.dropout_mask(12345, m, k, p, "cpu").double())


def _z_corr(a, b):
    """The correlation of two equally shaped 0/1 masks, in standard errors of independent ones (about N(0, 1))."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return ((a * b).mean() / ((a * a).mean() * (b * b).mean()).sqrt() * a.numel() ** 0.5).item()


def test_dropout_mask_has_no_structure():
    """A 1024 x 1024 mask at p = 0.5 (every bit of the uniform counts) looks independent: no correlation between
    neighbouring rows, columns (within a hashed pair and across pairs), diagonals or seeds (seed + 1, seed + 2^32),
    runs along rows and row / column keep counts as for independent draws (5 standard errors), and no row or column
    of one seed's mask reappears in a neighbouring seed's (a row key of row ^ seed would swap rows across seeds)."""
    n, p, seed = 1024, 0.5, 2**33 + 12344
    keep = klinear.dropout_mask(seed, n, n, p, "cpu")
    q = 1 - klinear.dropout_threshold(p) / 65536
    pairs = {
        "rows": (keep[1:], keep[:-1]),
        "columns in a pair": (keep[:, 0::2], keep[:, 1::2]),
        "columns across pairs": (keep[:, 1:-1:2], keep[:, 2::2]),
        "columns two apart": (keep[:, 2:], keep[:, :-2]),
        "diagonal": (keep[1:, 1:], keep[:-1, :-1]),
        "anti-diagonal": (keep[1:, :-1], keep[:-1, 1:]),
    }
    for other in (seed + 1, seed - 1, seed + 2**32):
        other_keep = klinear.dropout_mask(other, n, n, p, "cpu")
        pairs[f"seed {other}"] = (keep, other_keep)
        rows = {bytes(r.numpy()) for r in keep}
        assert not rows & {bytes(r.numpy()) for r in other_keep}, f"rows shared with seed {other}"
        assert not {bytes(c.numpy()) for c in keep.t()} & {bytes(c.numpy()) for c in other_keep.t()}
    z = {name: _z_corr(a, b) for name, (a, b) in pairs.items()}
    assert max(abs(v) for v in z.values()) < 5, z
    mean = keep.double().mean().item()
    assert abs(mean - q) < 5 * (q * (1 - q) / n**2) ** 0.5
    runs = 1 + (keep[:, 1:] != keep[:, :-1]).sum(1).double()
    expected = 1 + 2 * (n - 1) * q * (1 - q)
    assert abs(runs.mean().item() - expected) < 5 * (runs.var().item() / n) ** 0.5
    for counts in (keep.sum(1).double(), keep.sum(0).double()):  # binomial spread: variance n q (1 - q)
        assert abs(counts.var().item() / (n * q * (1 - q)) - 1) < 5 * (2 / (n - 1)) ** 0.5


def test_dropout_mask_is_a_function_of_seed_row_and_column():
    """The mask of a sub-block equals that block of the full mask: what forward and backward draw does not depend
    on their tiles (the pointer GEMM, the TMA epilogue halves and the rank-r passes all tile differently)."""
    full = klinear.dropout_mask(777, 75, 90, 0.3, "cpu")
    for rows, cols in ((slice(0, 37), slice(0, 45)), (slice(16, 75), slice(32, 90))):
        # the kernel draws rows/cols from 0; a sub-block's mask is the full mask's block
        block = klinear.dropout_mask(777, rows.stop, cols.stop, 0.3, "cpu")[rows, cols]
        assert torch.equal(block, full[rows, cols])


@pytest.mark.parametrize("path", PATHS)
def test_dropout_same_torch_seed_same_output(path):
    x, w, b, a, bb = _inputs(37, 75, 51, 5, torch.float32)
    with on_path(path):
        torch.manual_seed(7)
        y1 = fl.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.3)
        torch.manual_seed(7)
        y2 = fl.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.3)
        y3 = fl.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.3)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)


@pytest.mark.parametrize("path", PATHS)
def test_p_zero_and_eval_take_the_no_dropout_path(path):
    x, w, b, a, bb = _inputs(37, 75, 51, 5, torch.float32)
    ref = lora_linear_ref(x.double(), w.double(), b.double(), a.double(), bb.double(), 1.0)
    with on_path(path):
        for y in (fl.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.0), fl.lora_linear(x, w, b, a, bb, 1.0, 0.5, False)):
            assert_close(y, ref, torch.float32)


@pytest.mark.parametrize("path", PATHS)
def test_empty_batch(path):
    x, w, b, a, bb = _inputs(0, 75, 51, 5, torch.float32)
    with on_path(path):
        y = fl.lora_linear(x, w, b, a, bb, 1.0)
        assert y.shape == (0, 51)
        y.sum().backward()
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(bb.grad, torch.zeros_like(bb))
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("path", PATHS)
def test_nan_in_input_shows_in_output(path):
    x, w, b, a, bb = _inputs(37, 75, 51, 5, torch.float32)
    x = x.detach().clone()
    x[3, 10] = float("nan")
    x[20, 4] = float("inf")
    with on_path(path):
        y = fl.lora_linear(x, w, b, a, bb, 1.0)
    assert torch.isnan(y[3]).all()
    assert not torch.isfinite(y[20]).any()
    assert torch.isfinite(y[0]).all()


def test_trainable_base_weight_gets_a_correct_gradient_with_a_warning():
    x, w, b, a, bb = _inputs(9, 20, 12, 3, torch.float32)
    w.requires_grad_()
    with pytest.warns(UserWarning, match="base weight requires grad"):
        fl.lora_linear(x, w, b, a, bb, 1.0).sum().backward()
    ref_w = w.detach().clone().requires_grad_()
    lora_linear_ref(x.detach(), ref_w, b, a.detach(), bb.detach(), 1.0).sum().backward()
    torch.testing.assert_close(w.grad, ref_w.grad)


@pytest.mark.parametrize("path", PATHS)
def test_autocast_computes_in_the_autocast_dtype(path):
    x, w, b, a, bb = _inputs(37, 75, 51, 5, torch.float32)
    with on_path(path), torch.autocast("cpu", dtype=torch.bfloat16):
        y = fl.lora_linear(x, w, b, a, bb, 1.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and a.grad.dtype == torch.float32
    ref = lora_linear_ref(x.double(), w.double(), b.double(), a.double(), bb.double(), 1.0)
    assert_close(y, ref, torch.bfloat16)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_for_backward_is_x_and_S_only(path, p):
    M, K, N, r = 37, 75, 51, 5
    x, w, b, a, bb = _inputs(M, K, N, r, torch.float16)
    with on_path(path):
        saved = saved_bytes(lambda: fl.lora_linear(x, w, b, a, bb, 1.0, dropout_p=p), x, w, b, a, bb)
    assert x.requires_grad  # x saved as itself, an alias, costs nothing
    assert saved <= M * r * x.element_size() + (8 if p > 0 else 0)  # S, and with dropout the int64 seed
    # the unfused PEFT-style layer saves far more with dropout: the dropped copy of x and the mask
    peft = fl.reference.PeftStyleLinear(nn.Linear(K, N, dtype=torch.float16), r, r, dropout=p)
    params = (x, peft.base.weight, peft.base.bias, peft.lora_A, peft.lora_B)
    peft_saved = saved_bytes(lambda: peft(x), *params)
    if p > 0:
        assert peft_saved >= M * K * x.element_size() + saved


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_layer_merge_unmerge(path, dtype):
    base = nn.Linear(75, 51).to(dtype)
    layer = fl.LoRALinear.from_module(base, r=5, alpha=10)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 37, 75, dtype=dtype)
    w0 = base.weight.detach().clone()
    with on_path(path):
        unmerged = layer(x)
        layer.merge()
        assert layer.merged
        merged = layer(x)
        ref = lora_linear_ref(
            x.double(), w0.double(), base.bias.double(), layer.lora_A.double(), layer.lora_B.double(), 2.0
        )
        assert_close(unmerged, ref, dtype, "unmerged")
        assert_close(merged, ref, dtype, "merged", factor=2.0)
        delta = fl.reference.linear_delta_weight(layer.lora_A.double(), layer.lora_B.double(), 2.0)
        assert_close(layer.weight, w0.double() + delta, dtype, "merged weight")
        layer.unmerge()
    assert not layer.merged
    # W + d - d, each rounded once: back within two roundings of the dtype
    ulp = torch.finfo(dtype).eps * (w0.abs().double() + (w0.double() + delta).abs())
    assert ((layer.weight.double() - w0.double()).abs() <= 2 * ulp + torch.finfo(dtype).tiny).all()


@pytest.mark.parametrize("path", PATHS)
def test_safe_merge_refuses_non_finite(path):
    layer = fl.LoRALinear(20, 12, r=3, alpha=3)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_B[2, 1] = float("inf")
    w0 = layer.weight.detach().clone()
    with on_path(path):
        with pytest.raises(ValueError, match="non-finite"):
            layer.merge(safe=True)
    assert torch.equal(layer.weight, w0) and not layer.merged


def test_fp16_merge_overflow_is_refused_in_safe_mode():
    layer = fl.LoRALinear(16, 16, r=2, alpha=2, dtype=torch.float16)
    with torch.no_grad():
        layer.lora_A.fill_(300.0)
        layer.lora_B.fill_(300.0)
    for path in ("triton", "torch"):
        with on_path(path), pytest.raises(ValueError, match="non-finite"):
            layer.merge(safe=True)


def test_layer_constructor_and_disable():
    layer = fl.LoRALinear(30, 20, r=4, alpha=8, dropout=0.1)
    assert layer.scaling == 2.0 and layer.weight.shape == (20, 30) and layer.lora_A.shape == (4, 30)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 30)
    layer.disabled = True
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    rs = fl.LoRALinear(30, 20, r=4, alpha=8, use_rslora=True)
    assert rs.scaling == pytest.approx(4.0)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda x, w, b, a, bb: (x[:, :-1], w, b, a, bb), ValueError, "in_features"),
        (lambda x, w, b, a, bb: (x, w, b[:-1], a, bb), ValueError, "bias"),
        (lambda x, w, b, a, bb: (x, w, b, a[:, :-1], bb), ValueError, "lora_A"),
        (lambda x, w, b, a, bb: (x, w, b, a, bb[:-1]), ValueError, "lora_B"),
        (lambda x, w, b, a, bb: (x, w, b, a[:0], bb[:, :0]), ValueError, "rank"),
        (lambda x, w, b, a, bb: (x.double(), w, b, a, bb), TypeError, "x must be"),
        (lambda x, w, b, a, bb: (x.half(), w, b, a, bb), TypeError, "must match"),
        (lambda x, w, b, a, bb: (x.long(), w, b, a, bb), TypeError, "x must be"),
        (lambda x, w, b, a, bb: (x, w, b, a.to("meta"), bb), ValueError, "one device"),
        (lambda x, w, b, a, bb: (x, w[None], b, a, bb), ValueError, "weight must be 2-D"),
    ],
    ids=[
        "x-last-dim",
        "bias-shape",
        "A-shape",
        "B-shape",
        "rank-0",
        "x-float64",
        "x-dtype-mismatch",
        "x-int",
        "mixed-devices",
        "weight-3d",
    ],
)
def test_bad_input(make, error, match):
    args = make(*(t.detach() if t is not None else None for t in _inputs(7, 20, 12, 3, torch.float32)))
    with pytest.raises(error, match=match):
        fl.lora_linear(*args, 1.0)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_dropout(p):
    x, w, b, a, bb = _inputs(7, 20, 12, 3, torch.float32)
    with pytest.raises(ValueError, match="dropout"):
        fl.lora_linear(x, w, b, a, bb, 1.0, dropout_p=p)
    with pytest.raises(ValueError, match="dropout"):
        fl.LoRALinear(20, 12, r=2, dropout=p)


def test_bad_rank_in_layer():
    with pytest.raises(ValueError, match="rank"):
        fl.LoRALinear.from_module(nn.Linear(4, 4), r=0)
    with pytest.raises(TypeError, match="nn.Linear"):
        fl.LoRALinear.from_module(nn.Conv2d(3, 3, 1), r=2)


@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
def test_autotuner_hooks_take_keyword_launches(tma):
    """The GPU launch goes through triton.autotune with keyword arguments only: the prune hook must find M and N
    among the keywords (Triton hands it the positional ones as named_args), and the TMA pre-hook must re-shape the
    descriptors from the config it is given. Forward and dX have autotuners (and tables) of their own."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if tma:
        tuner = klinear._gemm_tma_kernel_for(9, torch.bfloat16, "fwd")
        dx_tuner = klinear._gemm_tma_kernel_for(9, torch.bfloat16, "dx")
    else:
        tuner = klinear._gemm_kernel_for(9, torch.bfloat16, False, "fwd")
        dx_tuner = klinear._gemm_kernel_for(9, torch.bfloat16, False, "dx")
    assert dx_tuner is not tuner and dx_tuner.reset_to_zero == ["da_ptr"] and not tuner.reset_to_zero
    tuner.nargs = {}  # what Triton's Autotuner.run sets for a launch with no positional arguments
    # sm_90's tiles are all at least 128 wide in N: a 37 x 51 problem keeps only the smallest one
    assert tuner.prune_configs({"M": 37, "N": 51, "K": 75, "R": 5}) == [tuner.configs[-1]]
    assert tuner.prune_configs({"M": 8192, "N": 4096, "K": 4096, "R": 16}) == tuner.configs
    if not tma:
        half = tuner.prune_configs({"M": 64, "N": 4096, "K": 4096, "R": 16})
        assert half and all(c.kwargs["BLOCK_M"] <= 64 for c in half) and len(half) < len(tuner.configs)
        return
    assert [c.num_stages for c in tuner.configs] != [c.num_stages for c in dx_tuner.configs] or len(
        tuner.configs
    ) != len(dx_tuner.configs)
    assert {c.num_stages for c in tuner.configs} <= {3, 4, 5} and {c.kwargs["BLOCK_K"] for c in tuner.configs} == {
        64,
        128,
    }
    t2 = torch.randn(64, 64)
    for config in tuner.configs + dx_tuner.configs:
        descs = {k: TensorDescriptor.from_tensor(t2, [16, 16]) for k in ("a_desc", "b_desc", "p_desc", "q_desc")}
        descs.update(c_desc=TensorDescriptor.from_tensor(t2, [16, 16]), x_desc=None, cs_desc=None)
        descs["bias_desc"] = TensorDescriptor.from_tensor(torch.randn(64), [16])
        config.pre_hook({**descs, "B_NK": True, "Q_NR": True, "BLOCK_R": 16, **config.kwargs})
        bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        bnp = bn // 2 if config.kwargs["EPILOGUE_SUBTILE"] else bn
        shapes = [list(descs[k].block_shape) for k in ("a_desc", "b_desc", "p_desc", "q_desc", "c_desc", "bias_desc")]
        assert shapes == [[bm, bk], [bn, bk], [bm, 16], [bn, 16], [bm, bnp], [bnp]]


@pytest.mark.parametrize("M", [9, 2048])  # 2048 rows: the backward folds dA into the dS pass (configs.SPLIT_FREE_M)
def test_kernels_read_the_seed_from_memory(M):
    """A CUDA graph repeats its launches' arguments verbatim, so the kernels take the dropout seed from memory: a
    seed tensor rewritten in place between two calls (as a replayed graph's randint rewrites it) changes the mask,
    in forward and backward, to exactly the mask of the new value."""
    K, N, r, p = 24, 17, 3, 0.5
    x, w, _, a, bb = (t.detach() for t in _inputs(M, K, N, r, torch.float32, lora_dtype=torch.float32))
    dy = torch.randn(M, N)
    seed = torch.tensor(1234)

    def step(seed):
        y, s = klinear.lora_linear_fwd(x, w, None, a, bb, 0.5, p, seed)
        dx, da, db, _ = klinear.lora_linear_bwd(dy, x, s, w, a, bb, 0.5, p, seed)
        return y, dx, da, db

    first = step(seed)
    seed.fill_(98765)
    second = step(seed)
    for name, u, v, ref in zip(("Y", "dX", "dA", "dB"), first, second, step(98765), strict=True):
        assert not torch.equal(u, v), f"{name}: the kernels kept the first seed"
        assert torch.equal(v, ref), f"{name}: a seed read from memory differs from the same seed passed as an int"


def test_seeds_use_all_64_bits():
    """draw_seed draws over the whole int64 range, and the kernels' mask depends on the seed's high 32 bits: a
    million steps of 31-bit seeds would repeat about a thousand masks."""
    seeds = torch.stack([draw_seed(torch.empty(0)) for _ in range(64)])
    assert seeds.dtype == torch.int64 and (seeds.abs() >= 2**32).float().mean() > 0.9
    assert (seeds < 0).any() and (seeds > 0).any()
    low = int(seeds[0]) & 0xFFFFFFFF
    first = klinear.dropout_mask(low, 37, 75, 0.5, "cpu")
    assert not torch.equal(first, klinear.dropout_mask(low + 2**40, 37, 75, 0.5, "cpu"))
    assert torch.equal(first, klinear.dropout_mask(low, 37, 75, 0.5, "cpu"))
