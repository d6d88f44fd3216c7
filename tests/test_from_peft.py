"""After from_peft the model is still a whole PEFT model: PEFT's own methods give what they give without it, the
layers fastlora converts compute PEFT's numbers with fastlora's ops, and what stays PEFT's (variants, other layer
types, modules_to_save, biases, several adapters) keeps working and is never lost by an fl.* call."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
from helpers import assert_close
from safetensors.torch import load_file
from test_peft_interop import assert_same_grads, peft_layer_names, peft_model
from tiny_models import assert_unchanged, copy_model, llama, logits, randomise_lora, snapshot, token_ids

import fastlora as fl
from fastlora.peft import converted_layers

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402

F32 = torch.float32


@pytest.fixture(autouse=True)
def torch_path():
    with fl.use_backend("torch"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", message=".*keeps PEFT's forward.*")
        yield


def converted_twin(pm):
    """A copy of ``pm`` converted by from_peft (``pm`` stays PEFT's, the reference)."""
    return fl.from_peft(copy_model(pm))


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def assert_same_files(folder, reference):
    ours, theirs = saved_tensors(folder), saved_tensors(reference)
    assert ours.keys() == theirs.keys() and ours
    for key in theirs:
        assert_close(ours[key], theirs[key], F32, key)
    assert config_of(folder) == config_of(reference)


def config_of(folder) -> dict:
    """The adapter config, its target_modules sorted (PEFT writes a set in whatever order it iterates)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    if isinstance(config["target_modules"], list):
        config["target_modules"] = sorted(config["target_modules"])
    return config


def sgd_steps(model, ids, steps=2):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()


# ----------------------------------------------------------------------------------------------------------
# PEFT's own methods
# ----------------------------------------------------------------------------------------------------------


def test_save_pretrained_and_state_dict_after_from_peft_are_peft_s(tmp_path):
    pm = peft_model(llama(), "all-linear")
    converted = converted_twin(pm)
    assert len(converted_layers(converted)) == 14
    pm.save_pretrained(tmp_path / "peft")
    converted.save_pretrained(tmp_path / "converted")
    assert len(saved_tensors(tmp_path / "converted")) == 28
    assert_same_files(tmp_path / "converted", tmp_path / "peft")
    fl.save_adapter(converted, tmp_path / "fl")
    assert_same_files(tmp_path / "fl", tmp_path / "peft")
    ours, theirs = fl.lora_state_dict(converted), get_peft_model_state_dict(pm)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("method", ["merge_and_unload", "unload"])
def test_merge_and_unload_and_unload_after_from_peft_are_peft_s(method):
    base = llama()
    pm = peft_model(base, ["q_proj", "k_proj", "down_proj"])
    converted = converted_twin(pm)
    ids = token_ids()
    unmerged = logits(converted, ids)
    ours, theirs = getattr(converted, method)(), getattr(pm, method)()
    assert not converted_layers(ours) and not peft_layer_names(ours)
    assert type(ours.model.layers[0].self_attn.q_proj) is nn.Linear
    assert_close(logits(ours, ids), logits(theirs, ids), F32, f"{method}: converted vs PEFT")
    if method == "merge_and_unload":
        assert_close(logits(ours, ids), unmerged, F32, "merged vs unmerged")
    else:
        assert torch.equal(logits(ours, ids), logits(base, ids))


def test_fl_calls_on_a_peft_model_run_peft_s_methods(tmp_path):
    base = llama()
    pm = peft_model(base, ["q_proj", "v_proj"])
    converted = converted_twin(pm)
    ids = token_ids()
    with pm.disable_adapter():
        peft_base = logits(pm, ids)
    with fl.disable_adapter(converted):
        assert torch.equal(logits(converted, ids), peft_base)
    assert_close(logits(converted, ids), logits(pm, ids), F32, "enabled again")
    assert fl.print_trainable_parameters(converted, print_fn=None) == pm.get_nb_trainable_parameters()
    merged = fl.merge_and_unload(copy_model(converted))
    assert_close(logits(merged, ids), logits(pm, ids), F32, "fl.merge_and_unload")
    assert torch.equal(logits(fl.unload(copy_model(converted)), ids), logits(base, ids))
    fl.save_adapter(converted, tmp_path / "a")
    other = converted_twin(peft_model(base, ["q_proj", "v_proj"]))
    fl.load_adapter(other, tmp_path / "a")
    assert_close(logits(other, ids), logits(pm, ids), F32, "fl.load_adapter into a PEFT model")


def test_fl_calls_refuse_the_model_inside_a_peft_model():
    pm = converted_twin(peft_model(llama(), ["q_proj"]))
    inner = pm.base_model.model
    before = snapshot(inner)
    for call in (fl.merge_and_unload, fl.unload, fl.lora_state_dict, fl.print_trainable_parameters):
        with pytest.raises(ValueError, match="not the PeftModel that owns them; pass the PeftModel"):
            call(inner)
    with pytest.raises(ValueError, match="pass the PeftModel"), fl.disable_adapter(inner):
        pass
    with pytest.raises(ValueError, match="pass the PeftModel"):
        fl.apply_lora(inner, ["k_proj"])
    assert_unchanged(inner, before)


def test_named_adapters_under_peft_s_set_add_and_delete_adapter(op_calls):
    """Two adapters on different modules: the active one runs fastlora's op, switching and deleting are PEFT's, and
    outputs equal PEFT's under each adapter; a layer added by add_adapter converts on the next from_peft."""
    pm = peft_model(llama(), ["q_proj", "v_proj"])
    pm.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "up_proj"]))
    randomise_lora(pm)
    converted = fl.from_peft(copy_model(pm))
    assert len(converted_layers(converted)) == 6
    ids = token_ids()
    for name in ("other", "default", "other"):
        pm.set_adapter(name)
        converted.set_adapter(name)
        assert_close(logits(converted, ids), logits(pm, ids), F32, f"adapter {name}")
    assert op_calls["lora_linear"] == 2 * 4 + 4  # "other" is on 4 layers, "default" on 4
    converted.delete_adapter("default")
    pm.delete_adapter("default")
    assert_close(logits(converted, ids), logits(pm, ids), F32, "after delete_adapter")
    converted.add_adapter("third", LoraConfig(r=2, target_modules=["gate_proj"]))
    assert len(converted_layers(fl.from_peft(converted))) == 8  # PEFT keeps q_proj's emptied layers


def test_several_active_adapters_run_peft_s_forward(op_calls):
    pm = peft_model(llama(), ["q_proj"])
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    randomise_lora(pm)
    pm.base_model.set_adapter(["default", "other"])
    converted = fl.from_peft(copy_model(pm))
    ids = token_ids()
    assert_close(logits(converted, ids), logits(pm, ids), F32, "two active adapters")
    assert op_calls["lora_linear"] == 0


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_from_peft_dora_trains_step_for_step_as_under_peft(p, op_calls):
    """A converted PEFT DoRA model takes the same optimizer steps as PEFT's (dropout 0.1: eval-mode forward, so the
    no-dropout form; training with a mask is compared layer by layer in test_dora.py)."""
    pm = peft_model(llama(), ["q_proj", "v_proj", "up_proj"], use_dora=True, lora_dropout=p)
    converted = converted_twin(pm)
    start = {n: q.detach().clone() for n, q in converted.named_parameters() if q.requires_grad}
    ids = token_ids()
    for model in (pm, converted):
        model.train(p == 0)
        optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            model(ids, labels=ids).loss.backward()
            optimizer.step()
    assert op_calls["lora_linear_dora"] == 3 * 6
    theirs = dict(pm.named_parameters())
    assert len(start) == 3 * 6
    for name, q in converted.named_parameters():
        if name in start:
            assert not torch.equal(q, start[name]), f"{name} did not train"
            assert_close(q, theirs[name], F32, f"{name} after 3 steps")


def test_dora_on_an_embedding_runs_peft_s_forward(op_calls):
    pm = peft_model(llama(), ["embed_tokens", "q_proj"], use_dora=True)
    converted = converted_twin(pm)
    ids = token_ids()
    assert_close(logits(converted, ids), logits(pm, ids), F32, "DoRA embedding")
    assert op_calls["lora_embedding"] == 0 and op_calls["lora_linear_dora"] == 2


def test_from_peft_keeps_a_merged_layer_merged():
    pm = peft_model(llama(), ["q_proj", "o_proj"])
    ids = token_ids()
    adapted_out = logits(pm, ids)
    pm.merge_adapter()
    converted = converted_twin(pm)
    assert all(m.merged for _, m in converted_layers(converted)) and len(converted_layers(converted)) == 4
    assert_close(logits(converted, ids), adapted_out, F32, "converted merged model")
    # PEFT's unload keeps merged weights merged; fl.unload of a PEFT model is PEFT's
    assert torch.equal(logits(fl.unload(converted), ids), logits(pm.unload(), ids))


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


def test_a_quantised_like_base_keeps_peft_s_forward_with_a_warning():
    pm = peft_model(TwoLayers(), ["quant", "plain"])
    x = torch.randn(3, 12)
    before = pm(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fl.from_peft(pm)
    messages = [str(w.message) for w in caught if "from_peft" in str(w.message)]
    assert len(messages) == 1 and "quant keeps PEFT's forward" in messages[0] and "QuantisedLikeLinear" in messages[0]
    assert {n for n, _ in converted_layers(pm.base_model.model)} == {"plain"}
    assert torch.equal(pm(x), before)


def test_from_peft_refuses_a_model_without_peft_layers():
    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        fl.from_peft(llama())


# ----------------------------------------------------------------------------------------------------------
# A model mixing everything, and MultiheadAttention
# ----------------------------------------------------------------------------------------------------------


class Mixed(nn.Module):
    """An embedding and a linear fastlora converts, a Conv1d that stays PEFT's, a linear with a bias that only
    bias="all" trains, and a head for modules_to_save."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.conv = nn.Conv1d(12, 12, 3, padding=1)
        self.fc = nn.Linear(12, 12)
        self.fc2 = nn.Linear(12, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, ids, labels=None):
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        out = self.head(torch.relu(self.fc2(torch.relu(self.fc(h)))))
        return MixedOutput(out, out.square().mean() if labels is not None else None)


class MixedOutput(dict):
    def __init__(self, logits, loss):
        super().__init__(logits=logits, loss=loss)
        self.logits, self.loss = logits, loss


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_mixed_model_through_from_peft_step_save_reload_disable_unload(bias, tmp_path, op_calls):
    base = Mixed().eval()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "conv", "fc"], modules_to_save=["head"], bias=bias)
    pm = get_peft_model(copy_model(base), config)
    randomise_lora(pm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = converted_twin(pm)
    assert any("conv keeps PEFT's forward" in str(w.message) for w in caught)
    assert {n for n, _ in converted_layers(converted.base_model.model)} == {"emb", "fc"}
    ids = torch.randint(0, 20, (3, 7))
    sgd_steps(pm, ids)
    sgd_steps(converted, ids)
    assert op_calls["lora_embedding"] == 2 and op_calls["lora_linear"] == 2
    trained = dict(pm.named_parameters())
    for name, p in converted.named_parameters():
        assert_close(p, trained[name], F32, f"{name} after 2 steps")
    assert_close(logits(converted, ids), logits(pm, ids), F32, "after training")

    pm.save_pretrained(tmp_path / "peft")
    fl.save_adapter(converted, tmp_path / "fl")
    assert_same_files(tmp_path / "fl", tmp_path / "peft")
    keys = saved_tensors(tmp_path / "fl").keys()
    assert {"base_model.model.head.weight", "base_model.model.fc.base_layer.bias"} <= keys
    assert ("base_model.model.fc2.bias" in keys) == (bias == "all")
    reloaded = PeftModel.from_pretrained(copy_model(base), tmp_path / "fl")
    if bias == "all":  # PEFT reloads the biases of modules it leaves plain only into a base model that has them
        reloaded.base_model.model.fc2.bias.data.copy_(saved_tensors(tmp_path / "fl")["base_model.model.fc2.bias"])
    assert_close(logits(reloaded, ids), logits(pm, ids), F32, "PEFT reload of the converted model's save")

    with pm.disable_adapter():
        peft_off = logits(pm, ids)
    with fl.disable_adapter(converted):  # the trained biases stay on (PEFT's rule), equal to PEFT's within rounding
        assert_close(logits(converted, ids), peft_off, F32, "disabled")
    assert_close(logits(fl.unload(converted), ids), logits(pm.unload(), ids), F32, "unload")


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.mha(x, x, x, need_weights=False)[0])


def test_multihead_attention_stays_peft_s_and_so_does_what_is_inside_it(op_calls):
    pm = peft_model(Attention(), ["mha", "fc"])
    converted = converted_twin(pm)
    assert {n for n, _ in converted_layers(converted.base_model.model)} == {"fc"}
    x = torch.randn(2, 5, 8)
    out = converted(x)
    assert_close(out, pm(x), F32, "MHA model")
    assert op_calls["lora_linear"] == 1
    out.square().mean().backward()
    pm(x).square().mean().backward()
    assert_same_grads(converted, pm)
