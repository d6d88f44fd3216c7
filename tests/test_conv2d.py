"""LoRA Conv2d: the Triton kernels (under the interpreter) and the torch path against the float64 reference.

bfloat16 runs under the interpreter with float32 dot operands (configs.dot_dtype: the interpreter cannot multiply
bfloat16), so the interpreter checks bf16 loads, stores and rounding; bf16 tensor-core code is checked by the
ahead-of-time compile (tests/test_aot_compile.py: wgmma in the sm_90 PTX) and on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from fastlora.kernels import conv2d as kconv
from helpers import DTYPE_IDS, assert_close
from lora_cases import PATHS, on_path

import fastlora as fl
from fastlora.ops import conv2d as conv_op
from fastlora.ops.backend import draw_seed, dropout_keep
from fastlora.reference import conv2d_delta_weight, lora_conv2d_ref

# id: (C, O, kernel, stride, padding, dilation, groups, r). Nb=2, H=9, W=7 throughout.
CASES = {
    "k3-s1-p1-r3": (5, 6, (3, 3), 1, 1, 1, 1, 3),
    "k3-s2-p1-r8": (5, 6, (3, 3), 2, 1, 1, 1, 8),
    "k3-same-r1": (5, 6, (3, 3), 1, "same", 1, 1, 1),
    "k2x4-same-asym-r3": (5, 6, (2, 4), 1, "same", 1, 1, 3),
    "k3-d2-p2-r3": (5, 6, (3, 3), 1, 2, 2, 1, 3),
    "k3x1-s(2,1)-p(1,0)-r3": (5, 6, (3, 1), (2, 1), (1, 0), 1, 1, 3),
    "k1-valid-r3": (5, 6, (1, 1), 1, "valid", 1, 1, 3),
    "k3-g2-r5": (6, 4, (3, 3), 1, 1, 1, 2, 5),
    "C19-O37-k3-s2-r3": (19, 37, (3, 3), 2, 1, 1, 1, 3),
}
NB, H, W = 2, 9, 7


def make_case(case, dtype, channels_last, bias=True, bias_grad=False):
    """Fresh random tensors for a case; the LoRA term is of the same order as the base convolution."""
    c, o, k, stride, padding, dilation, groups, r = CASES[case]
    x = torch.randn(NB, c, H, W, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fan = (c // groups) * k[0] * k[1]
    weight = (torch.randn(o, c // groups, *k) / fan**0.5).to(dtype)
    b = torch.randn(o, dtype=dtype).requires_grad_(bias_grad) if bias else None
    lora_A = (torch.randn(r, c, *k) / (c * k[0] * k[1]) ** 0.5).to(dtype).requires_grad_()
    lora_B = (torch.randn(o, r, 1, 1) / r**0.5).to(dtype).requires_grad_()
    x.requires_grad_()
    conv = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    return x, weight, b, lora_A, lora_B, conv


def reference(x, weight, bias, lora_A, lora_B, scaling, conv, dy, mask=None):
    """float64 output and gradients of the reference (dbias only when bias requires grad)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, lora_A, lora_B)]
    b64 = None
    if bias is not None:
        b64 = bias.detach().double().requires_grad_(bias.requires_grad)
    m64 = None if mask is None else mask.double()
    y = lora_conv2d_ref(leaves[0], weight.double(), b64, leaves[1], leaves[2], scaling, mask=m64, **conv)
    y.backward(dy.double())
    grads = [t.grad for t in leaves]
    return y, grads, (b64.grad if b64 is not None and b64.requires_grad else None)


def run_and_compare(path, x, weight, bias, lora_A, lora_B, conv, dtype, scaling=0.75, dropout_p=0.0):
    mask = None
    if dropout_p > 0:
        torch.manual_seed(1234)
        seed = int(draw_seed(torch.empty(0)))
        if path == "torch":
            keep = dropout_keep(seed, x.shape, dropout_p, x.device)
            mask = keep.float() / (1.0 - dropout_p)
        else:
            mask = kconv.conv2d_dropout_mask(x.shape, dropout_p, seed, x.device)
        torch.manual_seed(1234)
    with on_path(path):
        y = fl.lora_conv2d(x, weight, bias, lora_A, lora_B, scaling, dropout_p=dropout_p, **conv)
        dy = torch.randn(y.shape, dtype=dtype)
        y.backward(dy)
    y_ref, (dx_ref, da_ref, db_ref), dbias_ref = reference(x, weight, bias, lora_A, lora_B, scaling, conv, dy, mask)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    assert_close(x.grad, dx_ref, dtype, "dX")
    assert_close(lora_A.grad, da_ref, dtype, "dA")
    assert_close(lora_B.grad, db_ref, dtype, "dB")
    if dbias_ref is not None:
        assert_close(bias.grad, dbias_ref, dtype, "dbias")
    assert weight.grad is None
    return y, mask


def _case_layouts():
    """Every case in one memory format (alternating), the first case in both: the kernels take any strides."""
    names = list(CASES)
    out = [(name, "channels_last" if i % 2 else "nchw") for i, name in enumerate(names)]
    return out + [(names[0], "channels_last")]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case,layout", _case_layouts())
def test_conv_options_fp32(case, layout, path):
    idx = list(CASES).index(case)
    bias, bias_grad = idx % 3 != 2, idx % 3 == 1
    args = make_case(case, torch.float32, layout == "channels_last", bias=bias, bias_grad=bias_grad)
    y, _ = run_and_compare(path, *args, torch.float32)
    expected = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=expected)
    assert args[0].grad.is_contiguous(memory_format=expected)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_half_precision(dtype, layout, path):
    args = make_case("k3-s2-p1-r8", dtype, layout == "channels_last", bias_grad=True)
    run_and_compare(path, *args, dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["k3-s1-p1-r3", "k3-s2-p1-r8"])
def test_dropout_mask_forward_and_backward(case, path):
    """The mask drawn for the forward is the one the backward regenerates, whatever the layout and tiling."""
    p = 0.3
    args = make_case(case, torch.float32, channels_last=case.startswith("k3-s2"))
    y, mask = run_and_compare(path, *args, torch.float32, dropout_p=p)
    dropped = (mask == 0).float().mean().item()
    assert 0.15 < dropped < 0.45, f"dropped fraction {dropped} for p={p}"
    assert torch.all((mask == 0) | torch.isclose(mask, torch.tensor(1 / (1 - p))))
    # The mask matters: the same call without dropout differs.
    x, weight, bias, lora_A, lora_B, conv = args
    with on_path(path):
        y0 = fl.lora_conv2d(x, weight, bias, lora_A, lora_B, 0.75, **conv)
    assert (y0 - y).abs().max() > 1e-3


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch-conv-plus-lora-kernel"])
@pytest.mark.parametrize("case", ["k3-g2-r5", "k2x4-same-asym-r3", "C19-O37-k3-s2-r3"])
def test_both_kernel_paths(case, fused):
    """The kernels' two ways to Y and to dX (one fused GEMM, or torch's convolution plus the LoRA term added in
    place) agree with the reference; the public call picks between them by timing once per shape on the GPU."""
    x, weight, bias, lora_A, lora_B, conv = make_case(case, torch.float32, channels_last=fused)
    geometry = conv_op.check_conv2d(
        x, weight, bias, lora_A, lora_B, 0.5, conv["stride"], conv["padding"], conv["dilation"], conv["groups"], 0.0
    )  # (stride, pads, dilation, groups) normalised
    with torch.no_grad():
        y, s = kconv.lora_conv2d_fwd(x, weight, bias, lora_A, lora_B, 0.5, *geometry, 0.0, 0, fused)
        dy = torch.randn(y.shape)
        dx, *_ = kconv.lora_conv2d_bwd(dy, x, s, weight, lora_A, lora_B, 0.5, *geometry, 0.0, 0, True, False, fused)
    y_ref, (dx_ref, _, _), _ = reference(x, weight, bias, lora_A, lora_B, 0.5, conv, dy)
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(dx, dx_ref, torch.float32, "dX")
    layout = torch.channels_last if fused else torch.contiguous_format
    assert y.is_contiguous(memory_format=layout) and dx.is_contiguous(memory_format=layout)


def test_dropout_off_in_eval_and_seeds_differ():
    x, weight, bias, lora_A, lora_B, conv = make_case("k3-s1-p1-r3", torch.float32, False)
    with torch.no_grad():
        y_eval = fl.lora_conv2d(x, weight, bias, lora_A, lora_B, 0.5, dropout_p=0.5, training=False, **conv)
        ref = lora_conv2d_ref(x.double(), weight.double(), bias.double(), lora_A.double(), lora_B.double(), 0.5, **conv)
        assert_close(y_eval, ref, torch.float32, "eval output")
        m1 = kconv.conv2d_dropout_mask(x.shape, 0.5, 1, x.device)
        m2 = kconv.conv2d_dropout_mask(x.shape, 0.5, 2, x.device)
        assert not torch.equal(m1, m2)


@pytest.mark.parametrize("path", PATHS)
def test_saved_tensors_are_x_and_S_only(path):
    """Beyond x (an alias) and the parameters, backward keeps at most M*r elements and the dropout seed: S and one
    int64, never a mask or a copy."""
    x, weight, bias, lora_A, lora_B, conv = make_case("k3-s2-p1-r8", torch.float32, True)
    known = {t.untyped_storage().data_ptr() for t in (x, weight, bias, lora_A, lora_B)}
    extra = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in known:
            extra.append(t.numel())
        return t

    with on_path(path), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fl.lora_conv2d(x, weight, bias, lora_A, lora_B, 0.5, dropout_p=0.25, **conv)
    m, r = y.shape[0] * y.shape[2] * y.shape[3], lora_A.shape[0]
    assert sum(extra) <= m * r + 1, f"saved {extra} elements beyond x and the parameters; at most M*r + 1 = {m * r + 1}"
    y.sum().backward()
    assert weight.grad is None and x.grad is not None


@pytest.mark.parametrize("path", PATHS)
def test_trainable_base_weight_warns_and_gets_its_gradient(path):
    x, weight, bias, lora_A, lora_B, conv = make_case("k3-s2-p1-r8", torch.float32, False)
    weight.requires_grad_()
    with on_path(path), pytest.warns(UserWarning, match="dW is formed"):
        y = fl.lora_conv2d(x, weight, bias, lora_A, lora_B, 0.5, **conv)
        dy = torch.randn_like(y)
        y.backward(dy)
    w64 = weight.detach().double().requires_grad_()
    ref = lora_conv2d_ref(x.detach().double(), w64, bias.double(), lora_A.detach().double(), lora_B.detach().double(),
                          0.5, **conv)  # fmt: skip
    ref.backward(dy.double())
    assert_close(weight.grad, w64.grad, torch.float32, "dW")


def test_custom_op_under_compile():
    """The fastlora::lora_conv2d op and its autograd registration, traced with fullgraph=True."""
    x, weight, bias, lora_A, lora_B, conv = make_case("k3-same-r1", torch.float32, True)

    def f(x, a, b):
        return fl.lora_conv2d(x, weight, bias, a, b, 0.5, **conv)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    y = compiled(x, lora_A, lora_B)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, (dx_ref, da_ref, db_ref), _ = reference(x, weight, bias, lora_A, lora_B, 0.5, conv, dy)
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(x.grad, dx_ref, torch.float32, "dX")
    assert_close(lora_A.grad, da_ref, torch.float32, "dA")
    assert_close(lora_B.grad, db_ref, torch.float32, "dB")


def test_custom_op_opcheck():
    x, weight, bias, lora_A, lora_B, _ = make_case("k3-s2-p1-r8", torch.float32, True)
    args = (x, weight, bias, lora_A, lora_B, 0.5, [2, 2], [1, 1, 1, 1], [1, 1], 1, 0.0, None)
    with fl.use_backend("torch"):
        torch.library.opcheck(
            torch.ops.fastlora.lora_conv2d.default, args, test_utils=("test_schema", "test_faketensor")
        )


# ----------------------------------------------------------------------------------------------------------
# Layer: from_module, merge, unmerge
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_layer_merge_equivalence(channels_last):
    conv = nn.Conv2d(5, 6, (3, 2), stride=2, padding=1, dilation=(1, 2))
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
    w0 = conv.weight.detach().clone()
    layer = fl.LoRAConv2d.from_module(conv, r=3, alpha=6)
    assert layer.weight is conv.weight and layer.bias is conv.bias
    assert layer.lora_A.shape == (3, 5, 3, 2) and layer.lora_B.shape == (6, 3, 1, 1)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    nn.init.normal_(layer.lora_B)
    layer.eval()
    x = torch.randn(NB, 5, H, W)
    with torch.no_grad():
        y_lora = layer(x)
        layer.merge()
        assert layer.merged
        delta = conv2d_delta_weight(layer.lora_A.double(), layer.lora_B.double(), layer.scaling)
        assert_close(layer.weight, w0.double() + delta, torch.float32, "merged W")
        y_merged = layer(x)
        layer.unmerge()
    assert_close(y_merged, y_lora, torch.float32, "merged output")
    assert_close(layer.weight, w0, torch.float32, "unmerged W")
    assert layer.weight.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_layer_constructor_matches_functional():
    layer = fl.LoRAConv2d(5, 6, 3, stride=1, padding="same", r=4, alpha=8, dropout=0.1)
    nn.init.normal_(layer.lora_B)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    x = torch.randn(NB, 5, H, W)
    layer.eval()
    with torch.no_grad():
        ref = lora_conv2d_ref(x.double(), layer.weight.double(), layer.bias.double(), layer.lora_A.double(),
                              layer.lora_B.double(), 2.0, padding="same")  # fmt: skip
        assert_close(layer(x), ref, torch.float32, "layer output")


def test_layer_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="padding_mode"):
        fl.LoRAConv2d.from_module(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        fl.LoRAConv2d.from_module(nn.Linear(4, 4))
    grouped = fl.LoRAConv2d.from_module(nn.Conv2d(4, 6, 3, groups=2), r=2)
    w0 = grouped.weight.detach().clone()
    with pytest.raises(ValueError, match="grouped convolution"):
        grouped.merge()
    assert not grouped.merged and torch.equal(grouped.weight, w0)


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


def _good():
    x = torch.randn(2, 5, 9, 7)
    return {
        "x": x,
        "weight": torch.randn(6, 5, 3, 3),
        "bias": torch.randn(6),
        "lora_A": torch.randn(3, 5, 3, 3),
        "lora_B": torch.randn(6, 3, 1, 1),
        "scaling": 0.5,
    }


BAD = {
    "x-3d": (ValueError, {"x": torch.randn(5, 9, 7)}, {}),
    "x-int": (TypeError, {"x": torch.ones(2, 5, 9, 7, dtype=torch.int32)}, {}),
    "x-channels": (ValueError, {"x": torch.randn(2, 4, 9, 7)}, {}),
    "x-dtype-vs-weight": (TypeError, {"x": torch.randn(2, 5, 9, 7, dtype=torch.float16)}, {}),
    "A-channels": (ValueError, {"lora_A": torch.randn(3, 4, 3, 3)}, {}),
    "A-kernel": (ValueError, {"lora_A": torch.randn(3, 5, 1, 1)}, {}),
    "B-2d": (ValueError, {"lora_B": torch.randn(6, 3)}, {}),
    "B-rank": (ValueError, {"lora_B": torch.randn(6, 4, 1, 1)}, {}),
    "bias-size": (ValueError, {"bias": torch.randn(5)}, {}),
    "A-device": (ValueError, {"lora_A": torch.randn(3, 5, 3, 3, device="meta")}, {}),
    "scaling-tensor": (TypeError, {"scaling": torch.tensor(0.5)}, {}),
    "padding-str": (ValueError, {}, {"padding": "full"}),
    "padding-negative": (ValueError, {}, {"padding": -1}),
    "same-strided": (ValueError, {}, {"padding": "same", "stride": 2}),
    "stride-zero": (ValueError, {}, {"stride": 0}),
    "groups-indivisible": (ValueError, {}, {"groups": 2}),
    "too-small": (ValueError, {"x": torch.randn(2, 5, 2, 7)}, {}),
    "dropout-one": (ValueError, {}, {"dropout_p": 1.0}),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises(name):
    exc, tensors, options = BAD[name]
    kwargs = {**_good(), **tensors}
    with pytest.raises(exc) as info:
        fl.lora_conv2d(**kwargs, **options)
    assert len(str(info.value)) > 20


def test_adapter_updated_in_place_is_read_afresh():
    """The kernels read the weights in channels_last through a copy kept per weight version: an optimiser step
    (an in-place update of lora_A) is seen by the next call, and the frozen weight's copy is made once."""
    x, weight, bias, lora_A, lora_B, conv = make_case("k3-s1-p1-r3", torch.float32, channels_last=True)
    with fl.use_backend("triton"):
        first = fl.lora_conv2d(x, weight, bias, lora_A, lora_B, 0.5, **conv)
        with torch.no_grad():
            lora_A.add_(torch.randn_like(lora_A))
        y = fl.lora_conv2d(x, weight, bias, lora_A, lora_B, 0.5, **conv)
        assert kconv.channels_last(weight) is kconv.channels_last(weight)
    ref = lora_conv2d_ref(x.double(), weight.double(), bias.double(), lora_A.double(), lora_B.double(), 0.5, **conv)
    assert_close(y, ref, torch.float32)
    assert not torch.allclose(first, y)
