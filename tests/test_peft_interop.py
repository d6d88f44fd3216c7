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


def peft_lora_grads(model) -> dict[str, torch.Tensor]:
    """PEFT's adapter gradients under fastlora's parameter names."""
    grads = {}
    for name, p in model.base_model.model.named_parameters():
        if "lora_" in name:
            name = name.replace("lora_B.default.bias", "lora_bias")
            name = name.replace(".default.weight", "").replace(".default", "")
            grads[name.replace("lora_embedding_", "lora_")] = p.grad
    return grads


def fastlora_grads(model) -> dict[str, torch.Tensor]:
    """fastlora's adapter gradients (lora_A, lora_B and a magnitude or lora_bias where the layer has one)."""
    root = model.base_model.model if isinstance(model, PeftModel) else model
    return {
        f"{name}.{attr}": getattr(layer, attr).grad for name, layer in lora_layers(root) for attr in layer.adapter_names
    }


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
def test_from_peft_gives_peft_outputs_and_gradients(arch, options):
    build, targets = MODELS[arch]
    pm = peft_model(build(), targets, **options)
    converted = fl.from_peft(copy_model(pm))
    for _, layer in lora_layers(converted):
        assert layer.use_rslora == options.get("use_rslora", False)
        flags = {"use_dora": options.get("use_dora", False), "lora_bias": options.get("lora_bias", False)}
        assert layer.extra_options() == flags

    assert len(lora_layers(converted)) == len([m for m in pm.modules() if isinstance(m, peft.tuners.lora.LoraLayer)])
    ids = token_ids()
    out_peft, out_fl = logits(pm, ids), logits(converted, ids)
    assert_close(out_fl, out_peft, F32, f"{arch} logits")
    (out_peft.square().mean()).backward()
    (out_fl.square().mean()).backward()
    g_peft, g_fl = peft_lora_grads(pm), fastlora_grads(converted)
    assert g_peft.keys() == g_fl.keys()
    for name in g_peft:
        assert_close(g_fl[name], g_peft[name], F32, name)


def test_from_peft_keeps_the_parameter_objects_so_the_optimizer_still_works():
    pm = peft_model(llama(), ["q_proj", "v_proj"])
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    a, b, w = q.lora_A["default"].weight, q.lora_B["default"].weight, q.base_layer.weight
    optimizer = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    assert fl.from_peft(pm) is pm
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, fl.LoRALinear)
    assert layer.lora_A is a and layer.lora_B is b and layer.weight is w
    before = a.detach().clone()
    ids = token_ids()
    pm(ids, labels=ids).loss.backward()
    optimizer.step()
    assert not torch.equal(layer.lora_A, before)


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


def test_merge_and_disable_match_peft():
    base = llama()
    pm = peft_model(base, ["q_proj", "k_proj", "down_proj"])
    converted = fl.from_peft(copy_model(pm))
    ids = token_ids()
    with pm.disable_adapter():
        peft_base = logits(pm, ids)
    with fl.disable_adapter(converted):
        assert torch.equal(logits(converted, ids), peft_base)
        assert torch.equal(logits(converted, ids), logits(base, ids))
    unmerged = logits(converted, ids)
    merged_fl = fl.merge_and_unload(converted.base_model.model)
    merged_peft = pm.merge_and_unload()
    assert_close(logits(merged_fl, ids), logits(merged_peft, ids), F32, "merged: fastlora vs PEFT")
    assert_close(logits(merged_fl, ids), unmerged, F32, "merged vs unmerged")


def test_save_after_from_peft_round_trips_through_peft(tmp_path):
    base = gpt2()
    pm = peft_model(base, ["c_attn"])
    converted = fl.from_peft(copy_model(pm))
    fl.save_adapter(converted, tmp_path)
    keys = set(fl.lora_state_dict(converted))
    assert keys == {f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{ab}.weight" for i in range(2) for ab in "AB"}
    loaded = PeftModel.from_pretrained(copy_model(base), tmp_path).eval()
    ids = token_ids()
    assert_close(logits(loaded, ids), logits(pm.eval(), ids), F32, "PEFT -> fastlora -> file -> PEFT")


# ----------------------------------------------------------------------------------------------------------
# What from_peft must not convert
# ----------------------------------------------------------------------------------------------------------


class QuantisedLikeLinear(nn.Linear):
    """A Linear subclass with its own forward, standing in for a quantised layer (bitsandbytes' are such)."""

    def forward(self, x):
        return super().forward(x).round(decimals=2)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = QuantisedLikeLinear(12, 12)
        self.plain = nn.Linear(12, 9)

    def forward(self, x):
        return self.plain(self.quant(x))


def convert_with_warnings(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fl.from_peft(model)
    return [str(w.message) for w in caught if "from_peft" in str(w.message)]


def test_from_peft_leaves_dora_on_an_embedding_alone_with_a_warning():
    pm = peft_model(llama(), ["embed_tokens", "q_proj"], use_dora=True)
    ids = token_ids()
    before = logits(pm, ids)
    messages = convert_with_warnings(pm)
    assert len(messages) == 1
    assert "model.embed_tokens" in messages[0] and "use_dora=True" in messages[0] and "Embedding" in messages[0]
    assert {n for n, _ in lora_layers(pm)} == {f"base_model.model.model.layers.{i}.self_attn.q_proj" for i in (0, 1)}
    assert_close(logits(pm, ids), before, F32, "logits after the partial conversion")


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_from_peft_dora_trains_step_for_step_as_under_peft(p):
    """A converted PEFT DoRA model takes the same optimizer steps as PEFT's (dropout 0.1: eval-mode forward, so the
    no-dropout form; training with a mask is compared layer by layer in test_dora.py)."""
    pm = peft_model(llama(), ["q_proj", "v_proj", "up_proj"], use_dora=True, lora_dropout=p)
    converted = fl.from_peft(copy_model(pm))
    runs_start = {f"{n}.{a}": getattr(layer, a).detach().clone() for n, layer in lora_layers(converted)
                  for a in layer.adapter_names}  # fmt: skip
    ids = token_ids()
    runs = []
    for model in (pm, converted):
        model.train(p == 0)
        params = [q for q in model.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            model(ids, labels=ids).loss.backward()
            optimizer.step()
        runs.append(dict(model.named_parameters()))
    theirs, ours = runs
    peft_names = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
                  "lora_magnitude_vector": "lora_magnitude_vector.default.weight"}  # fmt: skip
    compared = 0
    for name, layer in lora_layers(converted):
        for attr in layer.adapter_names:
            mine = getattr(layer, attr)
            assert mine is ours[f"{name}.{attr}"]
            assert not torch.equal(mine, runs_start[f"{name}.{attr}"]), f"{name}.{attr} did not train"
            assert_close(mine, theirs[f"{name}.{peft_names[attr]}"], F32, f"{name}.{attr} after 3 steps")
            compared += 1
    assert compared == 3 * 6


def test_from_peft_skips_a_quantised_like_base_and_converts_the_rest():
    pm = peft_model(TwoLayers(), ["quant", "plain"])
    x = torch.randn(3, 12)
    before = pm(x)
    messages = convert_with_warnings(pm)
    assert len(messages) == 1 and "quant stays a PEFT layer" in messages[0] and "QuantisedLikeLinear" in messages[0]
    assert {n for n, _ in lora_layers(pm.base_model.model)} == {"plain"}
    assert torch.equal(pm(x), before)


def test_from_peft_refuses_several_adapters():
    pm = peft_model(llama(), ["q_proj"])
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    before = snapshot(pm)
    with pytest.raises(ValueError, match=r"one adapter, this one has \['default', 'other'\]"):
        fl.from_peft(pm)
    assert_unchanged(pm, before)


def test_from_peft_refuses_a_model_without_peft_layers():
    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        fl.from_peft(llama())


# ----------------------------------------------------------------------------------------------------------
# Embedding and Conv2d (layers merged in from their own branches)
# ----------------------------------------------------------------------------------------------------------


def test_embedding_interop_both_ways(tmp_path):
    base = llama()
    pm = peft_model(base, ["embed_tokens", "q_proj"]).eval()
    ids = token_ids()
    converted = fl.from_peft(copy_model(pm))
    assert type(converted.base_model.model.model.embed_tokens).__name__ == "LoRAEmbedding"
    assert_close(logits(converted, ids), logits(pm, ids), F32, "from_peft with embedding")
    pm.save_pretrained(tmp_path / "peft")
    model = fl.load_adapter(copy_model(base), tmp_path / "peft")
    assert_close(logits(model, ids), logits(pm, ids), F32, "fastlora on PEFT's embedding adapter")
    fl.save_adapter(model, tmp_path / "fl")
    loaded = PeftModel.from_pretrained(copy_model(base), tmp_path / "fl").eval()
    assert_close(logits(loaded, ids), logits(pm, ids), F32, "PEFT on fastlora's embedding adapter")


def test_conv_net_interop_both_ways(tmp_path):
    base = convnet()
    pm = peft_model(base, ["conv1", "conv2", "head"]).eval()
    x = torch.randn(2, 3, 8, 8)
    converted = fl.from_peft(copy_model(pm))
    assert {n for n, _ in lora_layers(converted.base_model.model)} == {"conv1", "conv2", "head"}
    out_fl, out_peft = converted(x), pm(x)
    assert_close(out_fl, out_peft, F32, "from_peft conv net")
    out_fl.square().sum().backward()
    out_peft.square().sum().backward()
    g_peft, g_fl = peft_lora_grads(pm), fastlora_grads(converted)
    for name in g_peft:
        assert_close(g_fl[name], g_peft[name], F32, name)
    pm.save_pretrained(tmp_path / "peft")
    model = fl.load_adapter(copy_model(base), tmp_path / "peft")
    assert_close(model(x), pm(x), F32, "fastlora on PEFT's conv adapter")
    fl.save_adapter(model, tmp_path / "fl")
    loaded = PeftModel.from_pretrained(copy_model(base), tmp_path / "fl").eval()
    assert_close(loaded(x), pm(x), F32, "PEFT on fastlora's conv adapter")


def test_from_peft_keeps_a_merged_layer_merged():
    base = llama()
    pm = peft_model(base, ["q_proj", "o_proj"])
    ids = token_ids()
    adapted_out = logits(pm, ids)
    pm.merge_adapter()
    fl.from_peft(pm)
    assert all(layer.merged for _, layer in lora_layers(pm.base_model.model))
    assert_close(logits(pm, ids), adapted_out, F32, "converted merged model")
    fl.unload(pm.base_model.model)
    assert_close(logits(pm, ids), logits(base, ids), F32, "unmerged and unloaded")
