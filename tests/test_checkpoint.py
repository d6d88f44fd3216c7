"""Activation checkpointing (torch.utils.checkpoint, reentrant and not) gives the gradients of the plain run.

With dropout the recomputed forward must draw the same mask: the layers take their dropout seed from torch's
CPU generator, whose state checkpoint saves and restores around the recomputation.
"""

import pytest
import torch
import torch._dynamo
import torch.nn as nn
from helpers import assert_close
from lora_cases import (
    DROPOUT_KINDS,
    LAYER_KINDS,
    OPTION_KINDS,
    PATHS,
    build_model,
    forward_backward,
    kind_param,
    make_input,
    on_path,
)
from torch.utils.checkpoint import checkpoint

import fastlora

CASES = [
    pytest.param(kind, dropout, id=f"{kind}-p{dropout}", marks=kind_param(kind).marks)
    for kind in LAYER_KINDS + OPTION_KINDS
    for dropout in ((0.0, 0.3) if kind in DROPOUT_KINDS + OPTION_KINDS else (0.0,))
]


def _checkpointed(model, use_reentrant, segments):
    """model(x) with checkpointing: the whole model as one segment, or each layer as its own."""
    parts = [model] if segments == "whole" else list(model)

    def step(x):
        # Reentrant checkpointing returns an output that requires grad only if an input does; token ids never
        # do, so a dummy input that requires grad stands in (the usual workaround; it receives no gradient).
        dummy = torch.ones((), requires_grad=True)
        for part in parts:
            x = checkpoint(lambda t, _d, p=part: p(t), x, dummy, use_reentrant=use_reentrant)
        return x

    return step


SEGMENTS = [
    pytest.param("whole", "torch", id="whole-torch"),
    pytest.param("whole", "triton", id="whole-interp", marks=PATHS[1].marks),
    pytest.param("per-layer", "torch", id="per-layer-torch"),
]


@pytest.mark.parametrize(("segments", "path"), SEGMENTS)
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["nonreentrant", "reentrant"])
@pytest.mark.parametrize(("kind", "dropout"), CASES)
def test_checkpoint_gradients_identical(kind, dropout, use_reentrant, segments, path):
    model = build_model(kind, dropout=dropout)
    x = make_input(kind)
    with on_path(path):
        torch.manual_seed(7)
        ref_out, ref_grads = forward_backward(model, x)
        torch.manual_seed(7)
        out, grads = forward_backward(model, x, step=_checkpointed(model, use_reentrant, segments))
        if dropout > 0:
            torch.manual_seed(8)
            other_out, other_grads = forward_backward(model, x)
            assert not torch.equal(other_out, ref_out), "another seed drew the same dropout mask"
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert torch.equal(grads[name], ref), f"gradient {name} differs under checkpointing"
        assert ref.abs().sum() > 0, f"gradient {name} is zero: the test would not see a wrong mask"
        if dropout > 0 and name.endswith("lora_A"):
            assert not torch.equal(other_grads[name], ref), f"{name}: another mask gave the same gradient"


MASK_CASES = [
    pytest.param(checkpointed, compiler, "torch", id=f"{'checkpointed' if checkpointed else 'plain'}-{compiler}-torch")
    for checkpointed in (False, True)
    for compiler in (None, "aot_eager", "inductor")
] + [
    pytest.param(
        checkpointed,
        None,
        "triton",
        id=f"{'checkpointed' if checkpointed else 'plain'}-None-interp",
        marks=PATHS[1].marks,
    )
    for checkpointed in (False, True)
]


@pytest.mark.parametrize(("checkpointed", "compiler", "path"), MASK_CASES)
def test_gradients_use_the_forward_mask(checkpointed, compiler, path):
    """With dropout, the gradients are those of the mask the forward actually drew, also when checkpointing
    recomputes that forward and when a compiler (inductor has its own RNG) runs it. With K = N = r and
    orthogonal A and B, the forward's output reveals S = (m * x) A^T and m * x, so dA and dB are known exactly."""
    torch.manual_seed(0)
    layer = fastlora.LoRALinear.from_module(nn.Linear(4, 4), r=4, alpha=2, dropout=0.5)
    with torch.no_grad():
        layer.lora_A.copy_(torch.linalg.qr(torch.randn(4, 4))[0])
        layer.lora_B.copy_(torch.linalg.qr(torch.randn(4, 4))[0])
    x, g = torch.randn(64, 4), torch.randn(64, 4)
    step = (lambda t: checkpoint(layer, t, use_reentrant=False)) if checkpointed else layer
    if compiler is not None:
        torch._dynamo.reset()
        step = torch.compile(step, backend=compiler, fullgraph=True)
    with on_path(path):
        torch.manual_seed(1)
        out = step(x)
        (out * g).sum().backward()
    torch._dynamo.reset()
    s = layer.scaling
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    lora_part = out.detach().double() - (x @ layer.weight.t() + layer.bias).double()
    big_s = lora_part @ b / s  # S B^T B = S for orthogonal B
    dropped_x = big_s @ a  # (m x) A^T A = m x for orthogonal A
    keep = dropped_x.abs() > 1e-3 * x.abs().double()
    assert 0 < keep.float().mean() < 1, "dropout drew no mask: the test would prove nothing"
    d_s = s * g.double() @ b
    assert_close(layer.lora_B.grad, s * g.double().t() @ big_s, torch.float32, "lora_B.grad")
    assert_close(layer.lora_A.grad, d_s.t() @ dropped_x, torch.float32, "lora_A.grad")
