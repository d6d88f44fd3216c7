"""QLoRA at the model level: fastlora layers over bitsandbytes Linear4bit, against PEFT's bnb LoRA layer (outputs,
gradients, adapter files both ways, merging), apply_lora / from_peft / unload / merge_and_unload, and 8-bit refused."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from helpers import assert_close
from test_peft_interop import adapter_grads, assert_same_grads
from tiny_models import copy_model, llama_4bit, logits, quantize_4bit, randomise_lora, token_ids

import fastlora as fl
from fastlora.model import lora_layers
from fastlora.peft import converted_layers
from fastlora.reference_4bit import dequantize_4bit_ref

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

F32 = torch.float32
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
QUANTS = [("nf4", True), ("fp4", False)]
QUANT_IDS = ["nf4-nested", "fp4"]
MERGE_WARNING = ".*4-bit weight quantizes.*"


@pytest.fixture(autouse=True)
def torch_path():
    with fl.use_backend("torch"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=MERGE_WARNING)
        yield


def peft_4bit(base, targets=TARGETS, **kwargs):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kwargs)
    model = get_peft_model(copy_model(base), config)
    randomise_lora(model)
    return model


def linear4bit_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.mark.parametrize("quant_type,nested", QUANTS, ids=QUANT_IDS)
def test_from_peft_gives_peft_outputs_and_gradients(quant_type, nested, op_calls):
    pm = peft_4bit(llama_4bit(quant_type, nested))
    assert sum(type(m).__name__ == "Linear4bit" and "bnb" in type(m).__module__ for m in pm.modules()) == 8
    converted = fl.from_peft(copy_model(pm))
    assert len(converted_layers(converted)) == 8
    ids = token_ids()
    out_peft, out_fl = logits(pm, ids), logits(converted, ids)
    assert op_calls["lora_linear_4bit"] == 8
    assert_close(out_fl, out_peft, F32, "logits")
    out_peft.square().mean().backward()
    out_fl.square().mean().backward()
    assert_same_grads(converted, pm)
    assert len(adapter_grads(converted)) == 16


def test_from_peft_keeps_the_modules_and_unload_gives_the_base_layer_back():
    pm = peft_4bit(llama_4bit())
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    base, w = q.base_layer, q.base_layer.weight
    fl.from_peft(pm)
    assert pm.base_model.model.model.layers[0].self_attn.q_proj is q and type(q).__name__ == "FastLinear4bit"
    unloaded = fl.unload(pm)
    assert unloaded.model.layers[0].self_attn.q_proj is base and base.weight is w


def test_apply_lora_all_linear_shares_the_packed_weight_and_unload_gives_it_back():
    model = llama_4bit()
    before = linear4bit_modules(model)
    packed = {n: (m.weight, m.weight.data.clone()) for n, m in before.items()}
    ids = token_ids()
    base_out = logits(model, ids)
    fl.apply_lora(model, "all-linear", r=4, alpha=8, dropout=0.1)
    layers = dict(lora_layers(model))
    assert set(layers) == set(before) and all(isinstance(m, fl.LoRALinear4bit) for m in layers.values())
    assert not isinstance(model.lm_head, fl.LoRALayer)
    for name, layer in layers.items():
        assert layer.weight is packed[name][0] and layer.lora_A.dtype == F32 and layer.lora_B.dtype == F32
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.lora_{ab}" for n in layers for ab in "AB"
    }
    model.eval()
    assert_close(logits(model, ids), base_out, F32, "a fresh adapter leaves the model as it was")
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    fl.unload(model)
    assert linear4bit_modules(model) == before
    for name, module in before.items():
        assert module.weight is packed[name][0] and torch.equal(module.weight.data, packed[name][1])


def _one_4bit_layer(storage):
    model = quantize_4bit(nn.Sequential(nn.Linear(64, 128)), skip=(), quant_storage=storage)
    fl.apply_lora(model, ["0"], r=4, alpha=8)
    randomise_lora(model)
    return model[0]


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16"])
def test_the_layer_keeps_its_quant_state_when_the_weight_is_a_plain_parameter(storage):
    """FSDP2 puts a plain Parameter in place of the Params4bit (no quant_state on it): the layer's own copy serves,
    and outputs and gradients stay the same."""
    layer = _one_4bit_layer(storage)
    x = torch.randn(5, 64, requires_grad=True)
    layer(x).square().sum().backward()
    expected = {"y": layer(x).detach(), "x": x.grad, "A": layer.lora_A.grad, "B": layer.lora_B.grad}
    layer.zero_grad(set_to_none=True)
    x.grad = None
    state = layer.quant_state
    layer.weight = nn.Parameter(layer.weight.data, requires_grad=False)
    assert layer.quant_state is state
    y = layer(x)
    y.square().sum().backward()
    got = {"y": y.detach(), "x": x.grad, "A": layer.lora_A.grad, "B": layer.lora_B.grad}
    for key, ref in expected.items():
        assert torch.equal(got[key], ref), key
    assert layer.weight.grad is None


def test_packed_bytes_cast_to_another_dtype_are_refused():
    """A cast of a float-stored packed weight (what FSDP2's mixed precision would do) scrambles the 4-bit codes."""
    layer = _one_4bit_layer(torch.bfloat16)
    layer.weight = nn.Parameter(layer.weight.data.to(torch.float16), requires_grad=False)
    with pytest.raises(ValueError, match="reached forward as torch.float16, but bitsandbytes stores it as torch.bf"):
        layer(torch.randn(5, 64))


@pytest.mark.parametrize("quant_type,nested", QUANTS, ids=QUANT_IDS)
def test_merge_and_unload_requantizes_as_peft_does(quant_type, nested, tmp_path):
    base = llama_4bit(quant_type, nested)
    pm = peft_4bit(base)
    pm.save_pretrained(tmp_path)
    model = fl.load_adapter(copy_model(base), tmp_path)
    expected = {}
    for name, layer in lora_layers(model):
        w = dequantize_4bit_ref(layer.weight.data, layer.quant_state)
        expected[name] = w + (layer.lora_B @ layer.lora_A) * layer.scaling
    with pytest.warns(UserWarning, match=MERGE_WARNING):
        merged_fl = fl.merge_and_unload(model)
    merged_peft = pm.merge_and_unload()
    fl_mods, peft_mods = linear4bit_modules(merged_fl), linear4bit_modules(merged_peft)
    assert fl_mods.keys() == peft_mods.keys() and len(fl_mods) == 14
    for name, module in fl_mods.items():
        state = module.weight.quant_state
        assert (state.quant_type, state.blocksize, state.nested) == (quant_type, 64, nested)
        assert torch.equal(module.weight.data, peft_mods[name].weight.data), name
        if name in expected:  # the merged codes are bitsandbytes' quantization of deq(W) + s B A
            requant = bnb.functional.quantize_4bit(
                expected[name], blocksize=64, quant_type=quant_type, compress_statistics=nested
            )
            assert torch.equal(module.weight.data, requant[0]), name
    ids = token_ids()
    assert_close(logits(merged_fl, ids), logits(merged_peft, ids), F32, "merged: fastlora vs PEFT")


def test_adapters_move_both_ways_with_peft(tmp_path):
    base = llama_4bit()
    model = fl.apply_lora(copy_model(base), TARGETS, r=4, alpha=8)
    randomise_lora(model)
    fl.save_adapter(model, tmp_path / "fl")
    loaded = PeftModel.from_pretrained(copy_model(base), tmp_path / "fl")
    ids = token_ids()
    assert_close(logits(loaded, ids), logits(model, ids), F32, "PEFT on fastlora's 4-bit adapter")

    pm = peft_4bit(base, lora_dropout=0.1)
    pm.save_pretrained(tmp_path / "peft")
    mine = fl.load_adapter(copy_model(base), tmp_path / "peft")
    assert all(isinstance(layer, fl.LoRALinear4bit) and layer.lora_dropout == 0.1 for _, layer in lora_layers(mine))
    mine.eval()
    assert_close(logits(mine, ids), logits(pm.eval(), ids), F32, "fastlora on PEFT's 4-bit adapter")


def test_disable_adapter_gives_the_base_model():
    base = llama_4bit()
    model = fl.apply_lora(copy_model(base), TARGETS, r=4, alpha=8)
    randomise_lora(model)
    ids = token_ids()
    with fl.disable_adapter(model):
        assert_close(logits(model, ids), logits(base, ids), F32, "disabled")


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_layer_computes_in_the_compute_dtype_and_returns_the_input_dtype(compute_dtype):
    lin = quantize_4bit(nn.Sequential(nn.Linear(75, 51)))[0]
    lin.compute_dtype = compute_dtype
    layer = fl.LoRALinear4bit.from_module(lin, r=5, alpha=7)
    randomise_lora(layer)
    x = torch.randn(3, 37, 75, requires_grad=True)
    y = layer(x)
    assert y.dtype == F32
    w = dequantize_4bit_ref(lin.weight.data, lin.weight.quant_state).to(compute_dtype)
    xc, a, b = x.to(compute_dtype), layer.lora_A.to(compute_dtype), layer.lora_B.to(compute_dtype)
    ref = (xc.double() @ w.double().t() + lin.bias.to(compute_dtype).double()
           + (xc.double() @ a.double().t()) @ b.double().t() * layer.scaling)  # fmt: skip
    assert_close(y, ref, compute_dtype, "Y")


def test_refuses_8bit_layers_by_name():
    model = nn.Sequential(nn.Linear(64, 64), bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False))
    for target in (["1"], "all-linear"):
        with pytest.raises(ValueError, match="Linear8bitLt"):
            fl.apply_lora(copy_model(model), target)


def test_refuses_an_unquantized_linear4bit():
    lin = bnb.nn.Linear4bit(64, 32)  # not moved to a device: bitsandbytes has not quantized it
    with pytest.raises(ValueError, match="not quantized yet"):
        fl.apply_lora(nn.Sequential(lin), ["0"])


def test_example_trains_saves_reloads_in_peft_and_merges():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "qlora.py"
    spec = importlib.util.spec_from_file_location("qlora_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.run(steps=12)
    assert result["last_loss"] < 0.5 * result["first_loss"]
    assert result["peft_vs_trained"] < 1e-5 and result["merged_vs_peft_merged"] < 1e-5
