"""apply_lora in PEFT's vocabulary: lora_alpha, lora_dropout, a LoraConfig, adapter_name, modules_to_save, bias, and
named adapters (add_adapter / set_adapter / delete_adapter) with PEFT's semantics, outputs and folder layout."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from helpers import assert_close
from safetensors.torch import load_file
from tiny_models import assert_unchanged, copy_model, llama, logits, randomise_lora, snapshot, token_ids

import fastlora as fl
import fastlora.layers as fl_layers
from fastlora.model import lora_layers

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

F32 = torch.float32
POLICY = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
TARGETS = ["q_proj", "v_proj"]
REFERENCE = LoraConfig(r=2, lora_alpha=6, target_modules=["v_proj", "up_proj"])


@pytest.fixture(autouse=True)
def torch_path():
    with fl.use_backend("torch"):
        yield


@pytest.fixture
def linear_calls(monkeypatch):
    """How many LoRALinear forwards ran fastlora's op (an idle layer runs its base op only); a sibling group's op
    counts once per member it computes."""
    import fastlora.grouping as grouping

    calls = []
    op, group_op = fl_layers.lora_linear, grouping.lora_linear_group

    def counted(*args, **kwargs):
        calls.append(1)
        return op(*args, **kwargs)

    def counted_group(x, members, *args, **kwargs):
        calls.extend([1] * len(members))
        return group_op(x, members, *args, **kwargs)

    monkeypatch.setattr(fl_layers, "lora_linear", counted)
    monkeypatch.setattr(grouping, "lora_linear_group", counted_group)
    return calls


# ----------------------------------------------------------------------------------------------------------
# PEFT's argument names and LoraConfig
# ----------------------------------------------------------------------------------------------------------


def test_peft_argument_names_and_a_lora_config_give_the_same_model():
    base = llama()
    ids = token_ids()
    config = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=TARGETS)
    models = [
        fl.apply_lora(copy_model(base), TARGETS, r=4, alpha=16, dropout=0.1),
        fl.apply_lora(copy_model(base), TARGETS, r=4, lora_alpha=16, lora_dropout=0.1),
        fl.apply_lora(copy_model(base), config),
        fl.apply_lora(copy_model(base), config=config),
    ]
    for model in models:
        randomise_lora(model)
        model.load_state_dict(models[0].state_dict())
        layers = lora_layers(model)
        assert len(layers) == 4
        assert all((m.r, m.lora_alpha, m.lora_dropout) == (4, 16, 0.1) for _, m in layers)
        assert torch.equal(logits(model.eval(), ids), logits(models[0].eval(), ids))
    # a single-adapter model keeps its state_dict keys
    assert {k for k in models[0].state_dict() if "lora" in k} == {
        f"model.layers.{i}.self_attn.{p}.lora_{ab}" for i in (0, 1) for p in ("q_proj", "v_proj") for ab in "AB"
    }


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"alpha": 8, "lora_alpha": 16}, TypeError, "name one setting"),
        ({"dropout": 0.1, "lora_dropout": 0.2}, TypeError, "name one setting"),
        ({"config": LoraConfig(target_modules=["q_proj"]), "r": 4}, TypeError, "not both"),
        ({"config": LoraConfig(target_modules=["q_proj"], init_lora_weights="mica")}, ValueError, "MiCA|mica"),
        ({"config": LoraConfig(target_modules=["q_proj"], layers_to_transform=[0])}, ValueError, "layers_to_transform"),
        ({"config": LoraConfig(target_modules=["q_proj"], init_lora_weights="gaussian")}, ValueError, "init_lora"),
        ({"bias": "some"}, ValueError, "bias must be one of"),
        ({"adapter_name": "a.b"}, ValueError, "adapter_name"),
        ({"modules_to_save": ["nothing_here"]}, ValueError, "match no module"),
        ({"modules_to_save": ["q_proj"]}, ValueError, "target_modules also selects"),
    ],
    ids=["alpha-twice", "dropout-twice", "config-and-kwargs", "mica", "layers-to-transform", "gaussian-init",
         "bias-mode", "adapter-name", "modules-to-save-missing", "modules-to-save-targeted"],
)  # fmt: skip
def test_apply_lora_refuses_what_it_cannot_honour(kwargs, error, match):
    model = llama()
    before = snapshot(model)
    target = {} if "config" in kwargs else {"target_modules": ["q_proj"]}
    with pytest.raises(error, match=match):
        fl.apply_lora(model, **target, **kwargs)
    assert_unchanged(model, before)


def test_a_mica_adapter_saved_by_peft_is_refused(tmp_path):
    pm = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="mica"))
    pm.save_pretrained(tmp_path)
    model = llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="mica"):
        fl.load_adapter(model, tmp_path)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------------------------
# Named adapters against PEFT
# ----------------------------------------------------------------------------------------------------------


def two_adapter_models(tmp_path):
    """(PEFT model, fastlora model) with the adapters "policy" and "reference", equal tensors, "policy" active."""
    base = llama()
    pm = get_peft_model(copy_model(base), POLICY, adapter_name="policy")
    pm.add_adapter("reference", REFERENCE)
    randomise_lora(pm)
    pm.save_pretrained(tmp_path / "peft")
    model = fl.apply_lora(copy_model(base), POLICY, adapter_name="policy")
    fl.add_adapter(model, "reference", REFERENCE)
    fl.load_adapter(model, tmp_path / "peft" / "policy", adapter_name="policy")
    fl.load_adapter(model, tmp_path / "peft" / "reference", adapter_name="reference")
    return base, pm, model


def test_two_named_adapters_equal_peft_under_each(tmp_path, linear_calls):
    base, pm, model = two_adapter_models(tmp_path)
    q = model.model.layers[0].self_attn.q_proj
    v = model.model.layers[0].self_attn.v_proj
    assert v.adapters() == ["policy", "reference"] and q.adapters() == ["policy"]
    ids = token_ids()
    for name, active_layers in (("policy", 4), ("reference", 4), ("policy", 4)):
        pm.set_adapter(name)
        fl.set_adapter(model, name)
        linear_calls.clear()
        assert_close(logits(model, ids), logits(pm, ids), F32, f"adapter {name}")
        assert len(linear_calls) == active_layers  # layers without the active adapter run their base op only
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {
            f"{n}.{a}" for n, layer in lora_layers(model) if not layer.idle for a in ("lora_A", "lora_B")
        }
    assert q.idle is False and v.active_adapter == "policy" and v.lora_A.shape == (4, 32)
    with fl.disable_adapter(model), pm.disable_adapter():
        assert torch.equal(logits(model, ids), logits(base, ids))


def test_named_adapters_save_in_peft_s_layout_and_load_in_peft(tmp_path):
    base, pm, model = two_adapter_models(tmp_path)
    fl.save_adapter(model, tmp_path / "fl")
    assert sorted(p.name for p in (tmp_path / "fl").iterdir()) == ["policy", "reference"]
    for name in ("policy", "reference"):
        ours = load_file(tmp_path / "fl" / name / "adapter_model.safetensors")
        theirs = load_file(tmp_path / "peft" / name / "adapter_model.safetensors")
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    loaded = PeftModel.from_pretrained(copy_model(base), tmp_path / "fl" / "policy", adapter_name="policy")
    loaded.load_adapter(tmp_path / "fl" / "reference", adapter_name="reference")
    ids = token_ids()
    for name in ("reference", "policy"):
        loaded.set_adapter(name)
        fl.set_adapter(model, name)
        assert_close(logits(loaded, ids), logits(model, ids), F32, f"PEFT loads {name}")


def test_delete_adapter_as_peft_does(tmp_path):
    _, pm, model = two_adapter_models(tmp_path)
    with pytest.warns(UserWarning, match="'reference' is the active adapter now"):
        fl.delete_adapter(model, "policy")
    pm.set_adapter("reference")  # PeftModel.delete_adapter of its active adapter fails (KeyError), so switch first
    pm.delete_adapter("policy")
    ids = token_ids()
    assert_close(logits(model, ids), logits(pm, ids), F32, "after deleting the active adapter")
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert {k for k in model.state_dict() if "lora" in k} == {
        f"model.layers.{i}.{p}.lora_{ab}" for i in (0, 1) for p in ("self_attn.v_proj", "mlp.up_proj") for ab in "AB"
    }
    with pytest.raises(ValueError, match="only adapter"):
        fl.delete_adapter(model, "reference")
    with pytest.raises(ValueError, match="no adapter named 'policy'"):
        fl.set_adapter(model, "policy")


def test_the_dpo_pattern_reference_logits_under_one_adapter_a_step_on_the_other(tmp_path):
    """DPO with a frozen reference adapter: reference log-probs under "reference" (no graph), the loss and the
    optimizer step under "policy"; only the policy's tensors move."""
    _, _, model = two_adapter_models(tmp_path)
    model.train()
    fl.set_adapter(model, "policy")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    reference_before = {k: v.clone() for k, v in fl.lora_state_dict(model, "reference").items()}
    policy_before = {k: v.clone() for k, v in fl.lora_state_dict(model, "policy").items()}
    chosen, rejected = token_ids(), token_ids()

    def logp(ids):
        out = model(ids).logits[:, :-1].log_softmax(-1)
        return out.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)

    for _ in range(2):
        fl.set_adapter(model, "reference")
        with torch.no_grad():
            ref_chosen, ref_rejected = logp(chosen), logp(rejected)
        fl.set_adapter(model, "policy")
        margin = (logp(chosen) - ref_chosen) - (logp(rejected) - ref_rejected)
        loss = -torch.nn.functional.logsigmoid(0.1 * margin).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for k, v in fl.lora_state_dict(model, "reference").items():
        assert torch.equal(v, reference_before[k]), k
    moved = [k for k, v in fl.lora_state_dict(model, "policy").items() if not torch.equal(v, policy_before[k])]
    assert len(moved) == len(policy_before) == 8


# ----------------------------------------------------------------------------------------------------------
# modules_to_save and bias
# ----------------------------------------------------------------------------------------------------------


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.fc = nn.Linear(12, 12)
        self.fc2 = nn.Linear(12, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, ids):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc(self.emb(ids))))))


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_modules_to_save_and_bias_train_save_and_load_as_peft(bias, tmp_path):
    base = Small()
    ids = torch.randint(0, 20, (3, 7))
    model = fl.apply_lora(copy_model(base), ["emb", "fc"], r=4, lora_alpha=8, modules_to_save=["head"], bias=bias)
    assert isinstance(model.head, fl.ModulesToSave) and model.head.original_module is not model.head.copies["default"]
    assert model.head.weight is model.head.copies["default"].weight and model.head.out_features == 5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"emb.lora_A", "emb.lora_B", "fc.lora_A", "fc.lora_B", "head.copies.default.weight",
                "head.copies.default.bias"}  # fmt: skip
    expected |= {"all": {"fc.bias", "fc2.bias"}, "lora_only": {"fc.bias"}, "none": set()}[bias]
    assert trainable == expected
    randomise_lora(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(ids).square().mean().backward()
    optimizer.step()
    assert not torch.equal(model.head.copies["default"].weight, model.head.original_module.weight)
    out = model(ids)

    fl.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {"base_model.model.head.weight", "base_model.model.head.bias"} <= saved.keys()
    assert ("base_model.model.fc.base_layer.bias" in saved) == (bias != "none")
    assert ("base_model.model.fc2.bias" in saved) == (bias == "all")
    peft_loaded = PeftModel.from_pretrained(copy_model(base), tmp_path)
    if bias == "all":  # PEFT loads biases into the modules it adapts or saves, not into fc2: copy it for the check
        peft_loaded.base_model.model.fc2.bias.data.copy_(saved["base_model.model.fc2.bias"])
    assert_close(peft_loaded(ids), out, F32, "PEFT loads fastlora's adapter")
    ours = fl.load_adapter(copy_model(base), tmp_path)
    assert_close(ours(ids), out, F32, "fastlora loads its adapter")
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == expected

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fl.disable_adapter(model):
            disabled = model(ids)
    assert any("trains biases" in str(w.message) for w in caught) == (bias != "none")
    reference = copy_model(base)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("bias") and name.split(".")[0] in ({"fc", "fc2"} if bias == "all" else {"fc"}):
                p.copy_(model.get_parameter(name))
    if bias != "none":
        assert not torch.equal(reference.fc.bias, base.fc.bias)
    assert torch.equal(disabled, reference(ids))
    trained_head = model.head.copies["default"]
    unloaded = fl.unload(model)  # PEFT's rule: the LoRA terms go, the trained head copy (and trained biases) stay
    assert unloaded.head is trained_head and type(unloaded.fc) is nn.Linear
    reference.head = trained_head
    assert torch.equal(unloaded(ids), reference(ids))


def test_save_refuses_when_a_trained_tensor_belongs_to_no_adapter(tmp_path):
    """No fastlora path writes an adapter that lacks a tensor the model trains: a parameter unfrozen by hand is
    neither an adapter tensor, a modules_to_save copy nor a bias the bias mode saves, so saving refuses."""
    model = fl.apply_lora(llama(), ["q_proj"], r=4)
    model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"model\.norm\.weight train .* Nothing was written"):
        fl.save_adapter(model, tmp_path / "fl")
    assert not (tmp_path / "fl").exists()
    pm = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    pm.base_model.model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"model\.norm\.weight train"):
        fl.save_adapter(fl.from_peft(pm), tmp_path / "peft")
    pm.base_model.model.model.norm.weight.requires_grad_(False)
    fl.save_adapter(pm, tmp_path / "peft")
    fl.save_adapter(fl.apply_lora(llama(), ["q_proj"], r=4, bias="all"), tmp_path / "bias")


def test_merge_and_unload_merges_the_active_adapter_and_keeps_its_modules_to_save_copy(tmp_path):
    _, pm, model = two_adapter_models(tmp_path)
    fl.set_adapter(model, "reference")
    pm.set_adapter("reference")
    ids = token_ids()
    merged = fl.merge_and_unload(model)
    assert not lora_layers(merged) and type(merged.model.layers[0].mlp.up_proj) is nn.Linear
    assert_close(logits(merged, ids), logits(pm.merge_and_unload(), ids), F32, "merged under 'reference'")
    small = fl.apply_lora(Small(), ["fc"], r=2, modules_to_save=["head"])
    randomise_lora(small)
    with torch.no_grad():
        small.head.copies["default"].weight.add_(1.0)
    x = torch.randint(0, 20, (2, 5))
    out = small(x)
    copy = small.head.copies["default"]
    merged_small = fl.merge_and_unload(small)
    assert merged_small.head is copy
    assert_close(merged_small(x), out, F32, "merged with modules_to_save")
