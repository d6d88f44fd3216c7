"""A new layer kind takes an op module, a layer class and one registry record (plus a kernel file for the GPU path):
a toy kind defined here, with nothing else changed, goes through apply_lora, lora_state_dict, save_adapter /
load_adapter, merge_and_unload and torch.compile.

The toy base module scales its input elementwise: y = x * w, w [D]. Its LoRA adapts the scale vector viewed as a
1 x D matrix: y = x * (w + s * (B A)[0]), A [r, D], B [1, r]; merging is W [1, D] += s * B A.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import assert_close

import fastlora
from fastlora.kinds import LayerKind, kind_for_module, register_kind, unregister_kind
from fastlora.layers import LoRALayer
from fastlora.ops._define import Op

# ----------------------------------------------------------------------------------------------------------
# The base module
# ----------------------------------------------------------------------------------------------------------


class Scale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        return x * self.weight


# ----------------------------------------------------------------------------------------------------------
# 1. The op module (torch path only: a kernel file would add a Triton path behind `path`)
# ----------------------------------------------------------------------------------------------------------


def _scale_forward(a, triton):
    return (a.x * (a.weight + a.scaling * (a.lora_B @ a.lora_A)[0]),)


def _scale_backward(a, saved, grads, needs, triton):
    (dy,) = grads
    g = (dy * a.x).reshape(-1, a.x.shape[-1]).sum(0)  # d loss / d (effective scale) [D]
    dx = dy * (a.weight + a.scaling * (a.lora_B @ a.lora_A)[0])
    da = a.scaling * a.lora_B.t() @ g[None]  # [r, D]
    db = a.scaling * g[None] @ a.lora_A.t()  # [1, r]
    return dx, (g if needs[1] else None), da, db


TOY_SCALE = Op(
    "toy_lora_scale",
    "Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, float scaling",
    outputs=("y",),
    differentiable=("x", "weight", "lora_A", "lora_B"),
    forward=_scale_forward,
    backward=_scale_backward,
    fake=lambda a: (a.x.new_empty(a.x.shape),),
    path=lambda a: False,
)


# ----------------------------------------------------------------------------------------------------------
# 2. The layer class
# ----------------------------------------------------------------------------------------------------------


class LoRAScale(LoRALayer):
    @classmethod
    def base_type_error(cls, module):
        return None if isinstance(module, Scale) else "Scale"

    @classmethod
    def adapter_shapes(cls, module, r, **options):
        return {"lora_A": (r, module.weight.shape[0]), "lora_B": (1, r)}

    def _init_base(self, module):
        self.weight = module.weight
        self.weight.requires_grad_(False)

    def _merge_views(self):
        return self.weight.view(1, -1), self.lora_A, self.lora_B

    def forward(self, x):
        if self._base_only():
            return x * self.weight
        return TOY_SCALE(x, self.weight, self.lora_A, self.lora_B, self.scaling)


# ----------------------------------------------------------------------------------------------------------
# 3. The registry record
# ----------------------------------------------------------------------------------------------------------


def _rebuild(layer):
    with torch.device("meta"):
        return Scale(layer.weight.shape[0])


TOY_KIND = LayerKind(
    name="toy_scale",
    wraps=lambda module: type(module) is Scale,
    layer_class=LoRAScale,
    base_names="Scale",
    peft_keys={"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"},
    rebuild=_rebuild,
)


@pytest.fixture
def toy_kind():
    register_kind(TOY_KIND)
    yield TOY_KIND
    unregister_kind(TOY_KIND.name)


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(7, 5)
        self.scale = Scale(5)

    def forward(self, x):
        return self.scale(self.proj(x))


def _model(seed):
    torch.manual_seed(seed)
    return ToyModel()


def _randomise(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p))


def _reference(model, x):
    """The toy model in float64, written out: linear LoRA then the scale LoRA."""
    proj, scale = model.proj, model.scale
    w, b = proj.weight.double(), proj.bias.double()
    h = x.double() @ w.t() + b + proj.scaling * (x.double() @ proj.lora_A.double().t()) @ proj.lora_B.double().t()
    return h * (scale.weight.double() + scale.scaling * (scale.lora_B.double() @ scale.lora_A.double())[0])


def test_unregistered_kind_is_not_wrappable():
    assert kind_for_module(Scale(3)) is None
    with pytest.raises(ValueError, match="Scale is not one of"):
        fastlora.apply_lora(ToyModel(), ["scale"], r=2)


def test_toy_kind_trains_saves_loads_and_merges_through_the_registry(toy_kind, tmp_path):
    model = _model(0)
    fastlora.apply_lora(model, ["proj", "scale"], r=3, alpha=6)
    assert isinstance(model.scale, LoRAScale) and model.scale.weight.requires_grad is False
    _randomise(model)
    x = torch.randn(4, 6, 7)

    a64 = model.scale.lora_A.detach().double().requires_grad_()
    b64 = model.scale.lora_B.detach().double().requires_grad_()
    y = model(x)
    y.backward(torch.ones_like(y))
    with torch.no_grad():
        h = model.proj(x).double()
    ref = h * (model.scale.weight.double() + model.scale.scaling * (b64 @ a64)[0])
    ref.backward(torch.ones_like(ref))
    assert_close(y, _reference(model, x), torch.float32, "y")
    assert_close(model.scale.lora_A.grad, a64.grad, torch.float32, "dA")
    assert_close(model.scale.lora_B.grad, b64.grad, torch.float32, "dB")
    assert model.scale.weight.grad is None

    state = fastlora.lora_state_dict(model)
    assert {k for k in state if ".scale." in k} == {
        "base_model.model.scale.lora_A.weight",
        "base_model.model.scale.lora_B.weight",
    }
    fastlora.save_adapter(model, tmp_path)
    fresh = _model(0)
    fastlora.load_adapter(fresh, tmp_path)
    assert isinstance(fresh.scale, LoRAScale)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)

    with torch.no_grad():
        before = model(x)
        fastlora.merge_and_unload(model)
        assert type(model.scale) is Scale and type(model.proj) is nn.Linear
        assert_close(model(x), before.double(), torch.float32, "merged")


def test_toy_op_compiles_without_graph_breaks(toy_kind):
    layer = LoRAScale.from_module(Scale(5), r=2, alpha=4)
    _randomise(layer)
    x = torch.randn(3, 5, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    ref = x_ref * (layer.weight + layer.scaling * (layer.lora_B @ layer.lora_A)[0])
    ref.sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
