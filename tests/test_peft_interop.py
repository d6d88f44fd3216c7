"""Interoperability with the real peft package: from_peft keeps PEFT's numbers and parameters, and adapter files
move both ways (PEFT loads what fastlora saves and fastlora loads what PEFT saves) with equal outputs."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
from helpers import assert_close
from tiny_models import (
    assert_unchanged,
    convnet,
    copy_model,
    gpt2,
    llama,
    logits,
    randomise_lora,
    snapshot,
    token_ids,
)

import fastlora as fl
from fastlora.model import lora_layers
from fastlora.peft import converted_layers

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

F32 = torch.float32
MODELS = {
    "llama": (llama, ["q_proj", "v_proj", "up_proj"]),
    "gpt2": (gpt2, ["c_attn", "c_fc", "c_proj"]),
}


@pytest.fixture(autouse=True)
def torch_path():
    with fl.use_backend("torch"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        yield


def peft_model(base, targets, **kwargs):
    config = LoraConfig(r=kwargs.pop("r", 4), lora_alpha=kwargs.pop("lora_alpha", 8), target_modules=targets, **kwargs)
    model = get_peft_model(copy_model(base), config)
    randomise_lora(model)
    return model


def adapter_grads(model) -> dict[str, torch.Tensor]:
    """The gradient of every trainable parameter, by name (a converted model keeps PEFT's names)."""
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(model, peft_model, dtype=F32):
    ours, theirs = adapter_grads(model), adapter_grads(peft_model)
    assert ours.keys() == theirs.keys() and ours
    for name in theirs:
        assert ours[name] is not None, name
        assert_close(ours[name], theirs[name], dtype, name)


def peft_layer_names(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize(
    "arch, options",
    [
        ("llama", {}),
        ("llama", {"use_rslora": True}),
        ("gpt2", {}),
        ("llama", {"use_dora": True}),
        ("gpt2", {"use_dora": True}),
        ("llama", {"lora_bias": True}),
    ],
    ids=["llama", "llama-rslora", "gpt2", "llama-dora", "gpt2-dora", "llama-lora-bias"],
)
def test_from_peft_gives_peft_outputs_and_gradients(arch, options, op_calls):
    build, targets = MODELS[arch]
    pm = peft_model(build(), targets, **options)
    converted = fl.from_peft(copy_model(pm))
    assert {n for n, _ in converted_layers(converted)} == peft_layer_names(pm)
    assert all(isinstance(m, peft.tuners.lora.Linear) for _, m in converted_layers(converted))

    ids = token_ids()
    out_peft = logits(pm, ids)
    out_fl = logits(converted, ids)
    op = "lora_linear_dora" if options.get("use_dora") else "lora_linear"
    assert op_calls[op] == len(converted_layers(converted))
    assert_close(out_fl, out_peft, F32, f"{arch} logits")
    (out_peft.square().mean()).backward()
    (out_fl.square().mean()).backward()
    assert_same_grads(converted, pm)


def test_from_peft_keeps_every_module_and_parameter_object_so_the_optimizer_still_works():
    pm = peft_model(llama(), ["q_proj", "v_proj"])
    modules = dict(pm.named_modules())
    params = dict(pm.named_parameters())
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    a = q.lora_A["default"].weight
    optimizer = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    assert fl.from_peft(pm) is pm
    assert dict(pm.named_modules()) == modules and dict(pm.named_parameters()) == params
    assert type(q).__name__ == "FastLinear" and isinstance(q, peft.tuners.lora.Linear)
    before = a.detach().clone()
    ids = token_ids()
    pm(ids, labels=ids).loss.backward()
    optimizer.step()
    assert not torch.equal(a, before)


@pytest.mark.parametrize(
    "arch, options",
    [("llama", {}), ("gpt2", {}), ("llama", {"use_dora": True}), ("gpt2", {"lora_bias": True})],
    ids=["llama", "gpt2", "llama-dora", "gpt2-lora-bias"],
)
def test_peft_loads_fastlora_adapter(arch, options, tmp_path):
    build, targets = MODELS[arch]
    base = build()
    rank_pattern = {targets[0]: 2}
    model = fl.apply_lora(
        copy_model(base), targets, r=4, alpha=8, rank_pattern=rank_pattern, alpha_pattern={targets[1]: 3}, **options
    )
    randomise_lora(model)
    fl.save_adapter(model, tmp_path)
    loaded = PeftModel.from_pretrained(copy_model(base), tmp_path).eval()
    peft_layers = {
        n: m for n, m in loaded.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert set(peft_layers) == {n for n, _ in lora_layers(model)}
    for name, layer in lora_layers(model):
        assert (peft_layers[name].r["default"], peft_layers[name].scaling["default"]) == (layer.r, layer.scaling)
    ids = token_ids()
    assert_close(logits(loaded, ids), logits(model, ids), F32, f"{arch}: PEFT on fastlora's adapter")


@pytest.mark.parametrize(
    "arch, options",
    [
        ("llama", {}),
        ("llama", {"use_rslora": True, "lora_dropout": 0.1}),
        ("llama", {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {r"layers\.1\.mlp\.up_proj": 5}}),
        ("gpt2", {}),
        ("llama", {"use_dora": True, "lora_dropout": 0.1}),
        ("llama", {"lora_bias": True}),
    ],
    ids=["llama", "llama-rslora-dropout", "llama-patterns", "gpt2", "llama-dora", "llama-lora-bias"],
)
def test_fastlora_loads_peft_adapter(arch, options, tmp_path):
    build, targets = MODELS[arch]
    base = build()
    pm = peft_model(base, targets, **options).eval()
    pm.save_pretrained(tmp_path)
    model = fl.load_adapter(copy_model(base), tmp_path)
    assert {n for n, _ in lora_layers(model)} == {
        n for n, m in pm.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    if "lora_dropout" in options:
        assert all(layer.lora_dropout == 0.1 for _, layer in lora_layers(model))
    model.eval()
    ids = token_ids()
    assert_close(logits(model, ids), logits(pm, ids), F32, f"{arch}: fastlora on PEFT's adapter")


def test_fastlora_loads_an_older_peft_config(tmp_path):
    """Configs from older PEFT releases lack the newer fields; their absence means the defaults."""
    base = llama()
    pm = peft_model(base, ["q_proj", "v_proj"]).eval()
    pm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    old = {k: config[k] for k in ("peft_type", "r", "lora_alpha", "target_modules", "lora_dropout", "bias")}
    old.update(task_type="CAUSAL_LM", base_model_name_or_path="some/model", inference_mode=True, enable_lora=None)
    (tmp_path / "adapter_config.json").write_text(json.dumps(old))
    model = fl.load_adapter(copy_model(base), tmp_path)
    ids = token_ids()
    assert_close(logits(model, ids), logits(pm, ids), F32, "older config")


# ----------------------------------------------------------------------------------------------------------
# Embedding and Conv2d (layers merged in from their own branches)
# ----------------------------------------------------------------------------------------------------------


def test_embedding_interop_both_ways(tmp_path, op_calls):
    base = llama()
    pm = peft_model(base, ["embed_tokens", "q_proj"]).eval()
    ids = token_ids()
    converted = fl.from_peft(copy_model(pm))
    assert type(converted.base_model.model.model.embed_tokens).__name__ == "FastEmbedding"
    assert_close(logits(converted, ids), logits(pm, ids), F32, "from_peft with embedding")
    assert op_calls["lora_embedding"] == 1 and op_calls["lora_linear"] == 2
    pm.save_pretrained(tmp_path / "peft")
    model = fl.load_adapter(copy_model(base), tmp_path / "peft")
    assert_close(logits(model, ids), logits(pm, ids), F32, "fastlora on PEFT's embedding adapter")
    fl.save_adapter(model, tmp_path / "fl")
    loaded = PeftModel.from_pretrained(copy_model(base), tmp_path / "fl").eval()
    assert_close(logits(loaded, ids), logits(pm, ids), F32, "PEFT on fastlora's embedding adapter")


def test_conv_net_interop_both_ways(tmp_path, op_calls):
    base = convnet()
    pm = peft_model(base, ["conv1", "conv2", "head"]).eval()
    x = torch.randn(2, 3, 8, 8)
    converted = fl.from_peft(copy_model(pm))
    assert {n for n, _ in converted_layers(converted.base_model.model)} == {"conv1", "conv2", "head"}
    out_fl, out_peft = converted(x), pm(x)
    assert op_calls["lora_conv2d"] == 2
    assert_close(out_fl, out_peft, F32, "from_peft conv net")
    out_fl.square().sum().backward()
    out_peft.square().sum().backward()
    assert_same_grads(converted, pm)
    pm.save_pretrained(tmp_path / "peft")
    model = fl.load_adapter(copy_model(base), tmp_path / "peft")
    assert_close(model(x), pm(x), F32, "fastlora on PEFT's conv adapter")
    fl.save_adapter(model, tmp_path / "fl")
    loaded = PeftModel.from_pretrained(copy_model(base), tmp_path / "fl").eval()
    assert_close(loaded(x), pm(x), F32, "PEFT on fastlora's conv adapter")


class GroupedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.head = nn.Linear(6 * 5 * 5, 3)

    def forward(self, x):
        return self.head(self.conv(x).flatten(1))


def test_grouped_conv_has_peft_shapes_and_math_both_ways(tmp_path, op_calls):
    """PEFT's lora_B on a grouped conv is a grouped 1x1 conv, [O, r/groups, 1, 1]: apply_lora makes the same shape,
    computes PEFT's output and gradients, and adapters move both ways; from_peft runs it with fastlora's op."""
    base = GroupedConvNet().eval()
    pm = peft_model(base, ["conv"], r=4)
    assert tuple(pm.base_model.model.conv.lora_B["default"].weight.shape) == (6, 2, 1, 1)
    x = torch.randn(2, 4, 5, 5)
    model = fl.apply_lora(copy_model(base), ["conv"], r=4, alpha=8)
    assert tuple(model.conv.lora_B.shape) == (6, 2, 1, 1)
    with torch.no_grad():
        model.conv.lora_A.copy_(pm.base_model.model.conv.lora_A["default"].weight)
        model.conv.lora_B.copy_(pm.base_model.model.conv.lora_B["default"].weight)
    out, ref = model(x), pm(x)
    assert_close(out, ref, F32, "grouped conv: apply_lora vs PEFT")
    out.square().sum().backward()
    ref.square().sum().backward()
    assert_close(model.conv.lora_B.grad, pm.base_model.model.conv.lora_B["default"].weight.grad, F32, "dB")
    assert_close(model.conv.lora_A.grad, pm.base_model.model.conv.lora_A["default"].weight.grad, F32, "dA")
    converted = fl.from_peft(copy_model(pm))
    assert_close(converted(x), ref, F32, "grouped conv: from_peft vs PEFT")
    assert op_calls["lora_conv2d"] == 1
    fl.save_adapter(model, tmp_path / "fl")
    loaded = PeftModel.from_pretrained(copy_model(base), tmp_path / "fl")
    assert_close(loaded(x), ref, F32, "PEFT on fastlora's grouped conv adapter")
    pm.save_pretrained(tmp_path / "peft")
    assert_close(fl.load_adapter(copy_model(base), tmp_path / "peft")(x), ref, F32, "fastlora on PEFT's")


def test_grouped_conv_rank_not_a_multiple_of_groups_is_refused():
    model = GroupedConvNet()
    before = snapshot(model)
    with pytest.raises(ValueError, match="multiple of its groups"):
        fl.apply_lora(model, ["conv"], r=3)
    assert_unchanged(model, before)
