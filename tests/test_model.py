"""Model-level API: apply_lora target matching, merge_and_unload, unload, disable_adapter, the summary line, and
bad input that must leave the model exactly as it was. Tiny transformers models from configs, random weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import assert_close
from tiny_models import (
    assert_unchanged,
    convnet,
    copy_model,
    float64_reference,
    gpt2,
    llama,
    logits,
    randomise_lora,
    snapshot,
    token_ids,
)

import fastlora as fl
from fastlora.model import lora_layers
from fastlora.reference import lora_linear_ref

F32 = torch.float32
LLAMA_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def torch_path(request):
    """Model-level tests run the torch path for speed; test_interpreter_* run whatever path the build selects."""
    if request.function.__name__.startswith("test_interpreter"):
        yield
        return
    with fl.use_backend("torch"):
        yield


def adapted(model) -> set[str]:
    return {name for name, _ in lora_layers(model)}


def llama_names(layers, projs) -> set[str]:
    group = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
    return {f"model.layers.{i}.{group.get(p, 'mlp')}.{p}" for i in layers for p in projs}


# ----------------------------------------------------------------------------------------------------------
# apply_lora
# ----------------------------------------------------------------------------------------------------------


def test_apply_lora_shares_base_tensors_and_freezes_the_rest():
    base = llama()
    model = copy_model(base)
    originals = {n: model.get_submodule(n).weight for n in llama_names(range(2), ("q_proj", "v_proj"))}
    out = fl.apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    assert out is model
    assert adapted(model) == set(originals)
    for name, weight in originals.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, fl.LoRALinear) and layer.weight is weight and layer.scaling == 2.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{ab}" for n in originals for ab in ("lora_A", "lora_B")}
    ids = token_ids()
    assert_close(logits(model, ids), logits(base, ids), F32, "fresh adapter output")


@pytest.mark.parametrize(
    "target, exclude, expected",
    [
        (["self_attn.q_proj"], None, llama_names(range(2), ["q_proj"])),
        (["model.layers.0.mlp.up_proj"], None, llama_names([0], ["up_proj"])),
        (r"model\.layers\.1\..*_proj", None, llama_names([1], LLAMA_PROJ)),
        ("all-linear", None, llama_names(range(2), LLAMA_PROJ)),
        ("all-linear", ["down_proj"], llama_names(range(2), LLAMA_PROJ[:-1])),
        ("all-linear", r".*layers\.0\..*", llama_names([1], LLAMA_PROJ)),
    ],
    ids=["suffix", "full-name", "regex", "all-linear", "exclude-list", "exclude-regex"],
)
def test_target_matching_follows_peft(target, exclude, expected):
    model = llama()
    fl.apply_lora(model, target, r=2, exclude_modules=exclude)
    assert adapted(model) == expected
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, fl.LoRALayer)


def test_list_entries_that_match_nothing_are_named_in_a_warning():
    model = llama()
    with pytest.warns(UserWarning, match=r"target_modules entries \['vproj', 'k_prj'\] match no module") as caught:
        fl.apply_lora(model, ["q_proj", "vproj", "k_prj"], r=2)
    assert len(caught) == 1 and "q_proj" not in str(caught[0].message).split("]")[0]
    assert adapted(model) == llama_names(range(2), ["q_proj"])


def test_a_bare_string_is_a_full_match_regex_and_the_error_says_so():
    with pytest.raises(ValueError, match="Strings are full-match regular expressions") as err:
        fl.apply_lora(llama(), "q_proj", r=2)
    assert "pass a list: ['q_proj']" in str(err.value)


def test_all_linear_on_gpt2_wraps_conv1d_and_matches_float64_reference():
    base = gpt2()
    model = fl.apply_lora(copy_model(base), "all-linear", r=3, alpha=5)
    expected = {
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert adapted(model) == expected
    assert all(layer.fan_in_fan_out for _, layer in lora_layers(model))
    randomise_lora(model)
    ids = token_ids()
    assert_close(logits(model, ids), logits(float64_reference(base, model), ids), F32, "gpt2 logits")


def test_rank_and_alpha_patterns():
    model = llama()
    fl.apply_lora(
        model,
        "all-linear",
        r=4,
        alpha=8,
        rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 3},
        alpha_pattern={"v_proj": 32},
    )
    for name, layer in lora_layers(model):
        r = 2 if name.endswith("down_proj") else 3 if name == "model.layers.1.self_attn.q_proj" else 4
        alpha = 32 if name.endswith("v_proj") else 8
        assert (layer.r, layer.lora_alpha, layer.lora_A.shape[0], layer.lora_B.shape[1]) == (r, alpha, r, r), name
        assert layer.scaling == alpha / r


OPTIONS = [{}, {"use_rslora": True}, {"use_dora": True}, {"lora_bias": True}]
OPTION_IDS = ["alpha-over-r", "rslora", "dora", "lora-bias"]


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_lora_model_matches_float64_reference(options):
    base = llama()
    model = fl.apply_lora(copy_model(base), ["q_proj", "k_proj", "down_proj"], r=4, alpha=6, **options)
    randomise_lora(model)
    ids = token_ids()
    assert_close(logits(model, ids), logits(float64_reference(base, model), ids), F32, "llama logits")


@pytest.mark.parametrize("options", OPTIONS[::2] + OPTIONS[3:], ids=OPTION_IDS[::2] + OPTION_IDS[3:])
def test_gradients_reach_only_the_adapters(options):
    model = fl.apply_lora(llama(), ["q_proj", "up_proj"], r=4, **options)
    extra = {"use_dora": "lora_magnitude_vector", "lora_bias": "lora_bias"}
    assert all(any(n.endswith(extra[k]) and p.requires_grad for n, p in model.named_parameters()) for k in options)
    randomise_lora(model)
    ids = token_ids()
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"{name} got a gradient"


# ----------------------------------------------------------------------------------------------------------
# merge_and_unload, unload, disable_adapter, summary
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", OPTIONS[::2] + OPTIONS[3:], ids=OPTION_IDS[::2] + OPTION_IDS[3:])
def test_merge_and_unload_equals_unmerged_output(options):
    base = llama()
    model = copy_model(base)
    originals = {n: model.get_submodule(n) for n in llama_names(range(2), LLAMA_PROJ)}
    fl.apply_lora(model, "all-linear", r=4, alpha=8, **options)
    randomise_lora(model)
    ids = token_ids()
    unmerged = logits(model, ids)
    ref = logits(float64_reference(base, model), ids)
    assert fl.merge_and_unload(model) is model
    assert not lora_layers(model)
    for name, module in originals.items():
        got = model.get_submodule(name)
        if options.get("lora_bias"):  # llama's projections have no bias: a plain Linear with one takes their place
            assert type(got) is nn.Linear and got.weight is module.weight and got.bias is not None, name
        else:
            assert got is module, f"{name} is not the original module"
    merged = logits(model, ids)
    assert_close(merged, unmerged, F32, "merged vs unmerged logits")
    assert_close(merged, ref, F32, "merged vs float64 reference")


def test_unload_restores_the_original_modules_and_output():
    base = llama()
    model = copy_model(base)
    originals = {n: model.get_submodule(n) for n in llama_names(range(2), ("q_proj", "v_proj"))}
    fl.apply_lora(model, ["q_proj", "v_proj"], r=4)
    randomise_lora(model)
    next(layer for _, layer in lora_layers(model)).merge()
    ids = token_ids()
    fl.unload(model)
    assert not lora_layers(model)
    for name, module in originals.items():
        assert model.get_submodule(name) is module
    assert_close(logits(model, ids), logits(base, ids), F32, "unloaded logits")


def test_the_module_kept_for_unload_holds_no_tensor_until_unload():
    """apply_lora keeps each original module for unload without the tensors the layer took over (so a sharded or
    replaced weight leaves no copy behind); unload gives the same Parameter objects back to the same module."""
    model = llama()
    q = model.model.layers[0].self_attn.q_proj
    weight = q.weight
    fl.apply_lora(model, ["q_proj"], r=4)
    assert q.weight is None and model.model.layers[0].self_attn.q_proj.weight is weight
    fl.unload(model)
    assert model.model.layers[0].self_attn.q_proj is q and q.weight is weight


def test_disable_adapter_gives_the_base_model_and_restores_flags():
    base = llama()
    model = fl.apply_lora(copy_model(base), "all-linear", r=4)
    randomise_lora(model)
    first = lora_layers(model)[0][1]
    first.disabled = True
    ids = token_ids()
    adapted_out = logits(model, ids)
    with fl.disable_adapter(model) as m:
        assert m is model
        assert torch.equal(logits(model, ids), logits(base, ids))
    assert first.disabled and not any(layer.disabled for _, layer in lora_layers(model)[1:])
    assert torch.equal(logits(model, ids), adapted_out)


def test_disable_adapter_on_merged_layers():
    base = llama()
    model = fl.apply_lora(copy_model(base), ["q_proj", "gate_proj"], r=4)
    randomise_lora(model)
    for _, layer in lora_layers(model):
        layer.merge()
    ids = token_ids()
    with fl.disable_adapter(model):
        assert_close(logits(model, ids), logits(base, ids), F32, "disabled after merge")


def test_print_trainable_parameters():
    model = fl.apply_lora(llama(), ["q_proj", "down_proj"], r=4)
    lines = []
    count = fl.print_trainable_parameters(model, print_fn=lines.append)
    expected = 2 * (4 * (32 + 32) + 4 * (40 + 32))
    assert count.trainable == expected
    assert count.total == sum(p.numel() for p in model.parameters())
    assert lines == [str(count)]
    assert lines[0].startswith(f"trainable params: {expected:,d} || all params: {count.total:,d} || trainable%: ")


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
def test_merge_and_unload_rebuilds_plain_modules_for_layers_built_directly(fan_in_fan_out):
    model = nn.Sequential(fl.LoRALinear(7, 5, r=2, alpha=3, fan_in_fan_out=fan_in_fan_out), nn.Tanh())
    randomise_lora(model)
    x = torch.randn(4, 7)
    unmerged = model(x)
    weight, bias = model[0].weight, model[0].bias
    fl.merge_and_unload(model)
    assert type(model[0]).__name__ == ("Conv1D" if fan_in_fan_out else "Linear")
    assert model[0].weight is weight and model[0].bias is bias
    assert_close(model(x), unmerged, F32, "rebuilt module")


@pytest.mark.parametrize("fn", ["merge_and_unload", "unload"])
def test_functions_need_lora_layers(fn):
    model = llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="no fastlora LoRA layers"):
        getattr(fl, fn)(model)
    with pytest.raises(ValueError, match="no fastlora LoRA layers"), fl.disable_adapter(model):
        pass
    assert_unchanged(model, before)


def test_merge_with_nan_adapter_changes_nothing():
    model = fl.apply_lora(llama(), ["q_proj", "v_proj"], r=4)
    randomise_lora(model)
    with torch.no_grad():
        lora_layers(model)[-1][1].lora_B[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or Inf"):
        fl.merge_and_unload(model)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------------------------
# Bad input: a clear error and the model exactly as it was
# ----------------------------------------------------------------------------------------------------------

BAD_APPLY = [
    ({"target_modules": ["nope"]}, ValueError, "matches no module"),
    ({"target_modules": "q_proj"}, ValueError, "matches no module"),
    ({"target_modules": ["self_attn"]}, ValueError, "LlamaAttention is not one of"),
    ({"target_modules": ["q_proj"]}, ValueError, "already is a fastlora LoRA layer"),
    ({"target_modules": ["v_proj"], "exclude_modules": ["v_proj"]}, ValueError, "matches no module"),
    ({"target_modules": 5}, TypeError, "target_modules must be"),
    ({"target_modules": []}, ValueError, "at least one module"),
    ({"target_modules": "(unclosed"}, ValueError, "not a valid regular expression"),
    ({"target_modules": ["v_proj"], "r": 0}, ValueError, "r must be an int"),
    ({"target_modules": ["v_proj"], "r": 2.0}, ValueError, "r must be an int"),
    ({"target_modules": ["v_proj"], "alpha": "8"}, TypeError, "alpha must be a finite number"),
    ({"target_modules": ["v_proj"], "dropout": 1.0}, ValueError, "dropout must be"),
    ({"target_modules": ["v_proj"], "use_rslora": "yes"}, TypeError, "use_rslora must be a bool"),
    ({"target_modules": ["v_proj"], "use_dora": 1}, TypeError, "use_dora must be a bool"),
    ({"target_modules": ["v_proj"], "use_dora": True, "lora_bias": True}, ValueError, "cannot be combined"),
    ({"target_modules": ["embed_tokens", "v_proj"], "use_dora": True}, ValueError, "does not support use_dora=True"),
    ({"target_modules": ["v_proj"], "rank_pattern": {"nomatch": 2}}, ValueError, "matches none of the adapted"),
    ({"target_modules": ["v_proj"], "rank_pattern": {"v_proj": 0}}, ValueError, "must be an int"),
    ({"target_modules": ["v_proj"], "alpha_pattern": {"v_proj": "x"}}, TypeError, "finite number"),
    ({"target_modules": ["v_proj"], "rank_pattern": ["v_proj"]}, TypeError, "must be a dict"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_APPLY, ids=[f"bad{i}" for i in range(len(BAD_APPLY))])
def test_bad_apply_lora_input_leaves_model_unchanged(kwargs, error, message):
    model = fl.apply_lora(llama(), ["q_proj"], r=4)
    randomise_lora(model)
    before = snapshot(model)
    with pytest.raises(error, match=message):
        fl.apply_lora(model, **kwargs)
    assert_unchanged(model, before)


def test_failure_while_building_restores_everything(monkeypatch):
    model = llama()
    before = snapshot(model)
    calls = []
    real = fl.LoRALinear.from_module.__func__

    def failing(cls, module, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure")
        return real(cls, module, **kwargs)

    monkeypatch.setattr(fl.LoRALinear, "from_module", classmethod(failing))
    with pytest.raises(RuntimeError, match="simulated failure"):
        fl.apply_lora(model, "all-linear", r=4)
    assert_unchanged(model, before)


class QuantisedLikeLinear(nn.Linear):
    """A Linear subclass with its own forward, like bitsandbytes' Linear4bit."""

    def forward(self, x):
        return super().forward(x) * 2


class WithOddModules(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = QuantisedLikeLinear(6, 6)
        self.attn = nn.MultiheadAttention(6, 2)
        self.emb = nn.Embedding(10, 6, max_norm=1.0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.fine = nn.Linear(6, 6)


@pytest.mark.parametrize(
    "target, message",
    [
        (["quant"], "QuantisedLikeLinear is not one of"),
        (["attn.out_proj"], "MultiheadAttention reads its projection weights"),
        (["emb"], "max_norm"),
        (["conv"], "padding_mode='reflect'"),
    ],
    ids=["overridden-forward", "mha-out-proj", "embedding-max-norm", "conv-reflect"],
)
def test_unsupported_modules_are_refused(target, message):
    model = WithOddModules()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        fl.apply_lora(model, target, r=2)
    assert_unchanged(model, before)


def test_all_linear_skips_what_it_cannot_wrap_and_plain_head_rule():
    model = WithOddModules()
    fl.apply_lora(model, "all-linear", r=2)
    assert adapted(model) == {"fine"}
    seq = nn.Sequential()
    seq.add_module("body", nn.Linear(5, 7))
    seq.add_module("lm_head", nn.Linear(7, 3))
    fl.apply_lora(seq, "all-linear", r=2)
    assert adapted(seq) == {"body"}


def test_model_argument_type():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fl.apply_lora("model", ["q_proj"])


# ----------------------------------------------------------------------------------------------------------
# Embedding and Conv2d (layers merged in from their own branches)
# ----------------------------------------------------------------------------------------------------------


def test_embedding_target_matches_reference_and_merges():
    base = llama()
    model = fl.apply_lora(copy_model(base), ["embed_tokens", "q_proj"], r=4, alpha=8)
    assert type(model.model.embed_tokens).__name__ == "LoRAEmbedding"
    randomise_lora(model)
    ids = token_ids()
    out = logits(model, ids)
    assert_close(out, logits(float64_reference(base, model), ids), F32, "logits with embedding LoRA")
    fl.merge_and_unload(model)
    assert type(model.model.embed_tokens) is nn.Embedding
    assert_close(logits(model, ids), out, F32, "merged")


def test_merging_a_tied_embedding_unties_it():
    base = gpt2()
    model = fl.apply_lora(copy_model(base), ["wte", "c_attn"], r=4)
    randomise_lora(model)
    ids = token_ids()
    out = logits(model, ids)
    with pytest.warns(UserWarning, match="tied weights"):
        fl.merge_and_unload(model)
    assert torch.equal(model.lm_head.weight, base.lm_head.weight)
    assert_close(logits(model, ids), out, F32, "merged tied gpt2")


def test_conv_net_matches_reference_merges_and_unloads():
    base = convnet()
    model = fl.apply_lora(copy_model(base), ["conv1", "conv2"], r=3, alpha=6)
    assert adapted(model) == {"conv1", "conv2"}
    randomise_lora(model)
    x = torch.randn(2, 3, 8, 8)
    out = model(x)
    assert_close(out, float64_reference(base, model)(x.double()), F32, "conv net")
    with fl.disable_adapter(model):
        assert torch.equal(model(x), base(x))
    fl.merge_and_unload(model)
    assert type(model.conv1) is nn.Conv2d
    assert_close(model(x), out, F32, "merged conv net")


# ----------------------------------------------------------------------------------------------------------
# One tiny model through the path the build selects (the Triton interpreter once the kernels are in)
# ----------------------------------------------------------------------------------------------------------


def test_interpreter_path_tiny_mlp():
    base = nn.Sequential(nn.Linear(13, 11), nn.GELU(), nn.Linear(11, 7))
    model = fl.apply_lora(copy_model(base), ["0", "2"], r=3, alpha=5)
    randomise_lora(model)
    layers = [model[0], model[2]]
    leaves = [
        (layer.lora_A.detach().double().requires_grad_(), layer.lora_B.detach().double().requires_grad_())
        for layer in layers
    ]

    def reference(x):
        for i, (layer, (a, b)) in enumerate(zip(layers, leaves, strict=True)):
            x = lora_linear_ref(x, layer.weight.double(), layer.bias.double(), a, b, layer.scaling)
            x = torch.nn.functional.gelu(x) if i == 0 else x
        return x

    x = torch.randn(5, 13)
    x64 = x.double().requires_grad_(True)
    x = x.requires_grad_(True)
    out, out64 = model(x), reference(x64)
    assert_close(out, out64, F32, "tiny mlp output")
    dy = torch.randn_like(out)
    out.backward(dy)
    out64.backward(dy.double())
    assert_close(x.grad, x64.grad, F32, "dX")
    for layer, (a, b) in zip(layers, leaves, strict=True):
        assert_close(layer.lora_A.grad, a.grad, F32, "dA")
        assert_close(layer.lora_B.grad, b.grad, F32, "dB")
        assert layer.weight.grad is None and layer.bias.grad is None
