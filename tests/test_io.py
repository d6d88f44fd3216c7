"""Adapter files: PEFT's format, round trips, atomic saves, and damaged, truncated or foreign files that must be
refused with a clear error while the model stays exactly as it was."""

from __future__ import annotations

import json
import os
import pickle
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import assert_unchanged, copy_model, llama, logits, randomise_lora, snapshot, token_ids

import fastlora as fl
import fastlora.io as flio
from fastlora.model import lora_layers

TARGETS = ["q_proj", "v_proj", "down_proj"]
PATTERNS = {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 16}}


@pytest.fixture(autouse=True)
def torch_path():
    with fl.use_backend("torch"):
        yield


@pytest.fixture
def saved(tmp_path):
    """(base model, trained LoRA model, adapter folder)."""
    base = llama()
    model = fl.apply_lora(copy_model(base), TARGETS, r=4, alpha=8, **PATTERNS)
    randomise_lora(model)
    folder = tmp_path / "adapter"
    fl.save_adapter(model, folder)
    return base, model, folder


def layer_settings(model):
    return {name: (layer.r, layer.lora_alpha, layer.use_rslora) for name, layer in lora_layers(model)}


def test_save_writes_peft_format(saved):
    _, model, folder = saved
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none" and config["fan_in_fan_out"] is False
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)
    assert config["target_modules"] == sorted(TARGETS)
    assert config["rank_pattern"] == {rf"model\.layers\.{i}\.mlp\.down_proj": 2 for i in range(2)}
    assert config["alpha_pattern"] == {rf"model\.layers\.{i}\.self_attn\.v_proj": 16 for i in range(2)}
    assert "use_rslora" not in config and "use_dora" not in config
    tensors = load_file(folder / "adapter_model.safetensors")
    expected = {
        f"base_model.model.{name}.lora_{ab}.weight": getattr(layer, f"lora_{ab}")
        for name, layer in lora_layers(model)
        for ab in "AB"
    }
    assert tensors.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(tensors[key], value), key


def test_lora_state_dict_is_detached_and_not_copied():
    model = fl.apply_lora(llama(), ["q_proj"], r=4)
    state = fl.lora_state_dict(model)
    layer = model.model.layers[0].self_attn.q_proj
    a = state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert len(state) == 4 and not a.requires_grad and a.data_ptr() == layer.lora_A.data_ptr()


def test_round_trip_into_a_fresh_model(saved):
    base, model, folder = saved
    fresh = copy_model(base)
    assert fl.load_adapter(fresh, folder) is fresh
    assert layer_settings(fresh) == layer_settings(model)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    ids = token_ids()
    assert torch.equal(logits(fresh, ids), logits(model, ids))


def test_load_into_existing_layers_takes_the_files_alpha(saved):
    base, model, folder = saved
    target = fl.apply_lora(copy_model(base), TARGETS, r=4, alpha=1, rank_pattern={"down_proj": 2})
    layers_before = {name: id(layer) for name, layer in lora_layers(target)}
    fl.load_adapter(target, folder)
    assert {name: id(layer) for name, layer in lora_layers(target)} == layers_before
    assert layer_settings(target) == layer_settings(model)
    ids = token_ids()
    assert torch.equal(logits(target, ids), logits(model, ids))


def test_rslora_round_trip(tmp_path):
    base = llama()
    model = fl.apply_lora(copy_model(base), ["k_proj"], r=4, alpha=3, use_rslora=True)
    randomise_lora(model)
    fl.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_rslora"] is True
    fresh = fl.load_adapter(copy_model(base), tmp_path)
    ids = token_ids()
    assert torch.equal(logits(fresh, ids), logits(model, ids))


@pytest.mark.parametrize(
    "option, suffix", [("use_dora", "lora_magnitude_vector"), ("lora_bias", "lora_B.bias")], ids=["dora", "lora-bias"]
)
def test_option_round_trip_in_peft_format(tmp_path, option, suffix):
    base = llama()
    model = fl.apply_lora(copy_model(base), ["k_proj", "up_proj"], r=4, alpha=3, **{option: True})
    randomise_lora(model)
    fl.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())[option] is True
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors.keys() == fl.lora_state_dict(model).keys()
    for name, layer in lora_layers(model):
        extra = layer.lora_magnitude_vector if option == "use_dora" else layer.lora_bias
        assert torch.equal(tensors[f"base_model.model.{name}.{suffix}"], extra), name
    fresh = fl.load_adapter(copy_model(base), tmp_path)
    assert all(layer.extra_options()[option] for _, layer in lora_layers(fresh))
    ids = token_ids()
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    into_plain = fl.apply_lora(copy_model(base), ["k_proj", "up_proj"], r=4, alpha=3)
    with pytest.raises(ValueError, match=f"{option!r}: True.*whose layer has"):  # a plain layer lacks the option
        fl.load_adapter(into_plain, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config[option] = False
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{option}=False"):
        fl.load_adapter(copy_model(base), tmp_path)


def test_save_refuses_a_model_without_lora(tmp_path):
    with pytest.raises(ValueError, match="no fastlora LoRA layers"):
        fl.save_adapter(llama(), tmp_path)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------
# Interrupted saves
# ----------------------------------------------------------------------------------------------------------


def folder_bytes(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def retrained(model):
    randomise_lora(model)
    return model


def test_save_interrupted_while_writing_keeps_the_previous_files(saved, monkeypatch):
    _, model, folder = saved
    before = folder_bytes(folder)
    real_fsync = os.fsync

    def crash(fd):
        real_fsync(fd)
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="simulated crash"):
        fl.save_adapter(retrained(model), folder)
    monkeypatch.undo()
    assert folder_bytes(folder) == before


def test_save_interrupted_before_renaming_keeps_the_previous_files(saved, monkeypatch):
    _, model, folder = saved
    before = folder_bytes(folder)

    def crash(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        fl.save_adapter(retrained(model), folder)
    monkeypatch.undo()
    assert folder_bytes(folder) == before
    fl.load_adapter(llama(), folder)


def test_save_interrupted_between_the_two_files_is_detected(saved, monkeypatch):
    base, model, folder = saved
    for _, layer in lora_layers(model):
        layer.lora_alpha = 5
    real_replace, calls = os.replace, []

    def crash_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated crash between files")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_second)
    with pytest.raises(OSError, match="simulated crash"):
        fl.save_adapter(model, folder)
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = copy_model(base)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="disagrees with the values recorded"):
        fl.load_adapter(fresh, folder)
    assert_unchanged(fresh, before)


# ----------------------------------------------------------------------------------------------------------
# Damaged, truncated, tampered and foreign files
# ----------------------------------------------------------------------------------------------------------

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def edit_config(folder, **changes):
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))


def rewrite_weights(folder, edit, keep_metadata=False):
    """Rewrites the tensors through ``edit``; without the fastlora record unless keep_metadata (as PEFT writes)."""
    from safetensors import safe_open

    with safe_open(folder / WEIGHTS, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS, metadata=metadata if keep_metadata else {"format": "pt"})


def truncate(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def truncate_header(folder):
    (folder / WEIGHTS).write_bytes(b"\x10\x00\x00")


def flip_a_byte(folder):
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[-5] ^= 0x40
    (folder / WEIGHTS).write_bytes(bytes(data))


def swap_tensors(folder):
    def edit(t):
        t[f"{Q0}.lora_A.weight"], t[f"{Q0}.lora_B.weight"] = (
            t[f"{Q0}.lora_B.weight"].t().contiguous(),
            t[f"{Q0}.lora_A.weight"].t().contiguous(),
        )

    rewrite_weights(folder, edit, keep_metadata=True)


def config_alpha_edited(folder):
    edit_config(folder, lora_alpha=80)


def config_not_json(folder):
    (folder / CONFIG).write_text('{"peft_type": "LORA", "r": ')


def config_other_method(folder):
    edit_config(folder, peft_type="IA3")


def config_dora(folder):
    edit_config(folder, use_dora=True)


def config_modules_to_save(folder):
    edit_config(folder, modules_to_save=["lm_head"])


def config_bad_rank(folder):
    edit_config(folder, r=0)


def config_bad_regex(folder):
    edit_config(folder, rank_pattern={"(down": 2})


def config_bad_dropout(folder):
    edit_config(folder, lora_dropout=1.5)


def peft_style_rank_mismatch(folder):
    rewrite_weights(folder, lambda t: None)
    edit_config(folder, r=3)


def peft_style_nan(folder):
    def edit(t):
        t[f"{Q0}.lora_B.weight"][0, 0] = float("nan")

    rewrite_weights(folder, edit)


def peft_style_unknown_key(folder):
    def edit(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.ones(2, 2)

    rewrite_weights(folder, edit)


def peft_style_missing_module(folder):
    def edit(t):
        t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = t.pop(f"{Q0}.lora_A.weight")
        t["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = t.pop(f"{Q0}.lora_B.weight")

    rewrite_weights(folder, edit)


def peft_style_module_dropped(folder):
    rewrite_weights(folder, lambda t: [t.pop(f"{Q0}.lora_{ab}.weight") for ab in "AB"])


def peft_style_missing_b(folder):
    rewrite_weights(folder, lambda t: t.pop(f"{Q0}.lora_B.weight"))


def peft_style_integer_tensor(folder):
    def edit(t):
        t[f"{Q0}.lora_A.weight"] = t[f"{Q0}.lora_A.weight"].to(torch.int32)

    rewrite_weights(folder, edit)


def peft_style_other_model(folder):
    def edit(t):
        t[f"{Q0}.lora_A.weight"] = torch.randn(4, 48)

    rewrite_weights(folder, edit)


def peft_style_unsupported_module(folder):
    def edit(t):
        t["base_model.model.model.norm.lora_A.weight"] = torch.randn(4, 32)
        t["base_model.model.model.norm.lora_B.weight"] = torch.randn(32, 4)

    rewrite_weights(folder, edit)


def peft_style_embedding_keys_on_linear(folder):
    def edit(t):
        t[f"{Q0}.lora_embedding_A"] = t.pop(f"{Q0}.lora_A.weight")
        t[f"{Q0}.lora_embedding_B"] = t.pop(f"{Q0}.lora_B.weight")

    rewrite_weights(folder, edit)


def weights_missing(folder):
    os.unlink(folder / WEIGHTS)


def config_missing(folder):
    os.unlink(folder / CONFIG)


BAD_FILES = [
    (truncate, ValueError, "truncated"),
    (truncate_header, ValueError, "truncated"),
    (flip_a_byte, ValueError, "fails its checksum"),
    (swap_tensors, ValueError, "fails its checksum"),
    (config_alpha_edited, ValueError, "disagrees with the values recorded"),
    (config_not_json, ValueError, "not valid JSON"),
    (config_other_method, ValueError, "'IA3' adapter; fastlora loads only LoRA"),
    (config_dora, ValueError, "use_dora"),
    (config_modules_to_save, ValueError, "modules_to_save"),
    (config_bad_rank, ValueError, "r must be an int"),
    (config_bad_dropout, ValueError, "lora_dropout must be a float in"),
    (config_bad_regex, ValueError, "rank_pattern key '\\(down' is not a valid regular expression"),
    (peft_style_rank_mismatch, ValueError, r"lora_A.weight has shape \(4, 32\), but .* gives .* rank r=3"),
    (peft_style_nan, ValueError, "lora_B.weight holds NaN or Inf"),
    (peft_style_unknown_key, ValueError, "lora_C.weight' is not a LoRA tensor"),
    (peft_style_missing_module, ValueError, "names module 'model.layers.7.self_attn.q_proj'"),
    (peft_style_missing_b, ValueError, "no lora_B tensor"),
    (peft_style_module_dropped, ValueError, r"targets \['model.layers.0.self_attn.q_proj'\], but .* has no tensors"),
    (peft_style_integer_tensor, TypeError, "expected a floating point tensor"),
    (peft_style_other_model, ValueError, r"has shape \(4, 48\), the model needs \(4, 32\)"),
    (peft_style_unsupported_module, ValueError, "cannot put LoRA on model.norm"),
    (peft_style_embedding_keys_on_linear, ValueError, "lora_embedding_A, lora_embedding_B tensors, which do not fit"),
    (weights_missing, FileNotFoundError, "adapter_model.safetensors is missing"),
    (config_missing, FileNotFoundError, "adapter_config.json is missing"),
]


@pytest.mark.parametrize("into", ["plain-model", "adapted-model"])
@pytest.mark.parametrize("damage, error, message", BAD_FILES, ids=[d.__name__ for d, _, _ in BAD_FILES])
def test_bad_adapter_file_is_refused_and_model_untouched(saved, damage, error, message, into):
    base, _, folder = saved
    damage(folder)
    target = copy_model(base)
    if into == "adapted-model":
        fl.apply_lora(target, TARGETS, r=4, alpha=8, **PATTERNS)
        randomise_lora(target)
    before = snapshot(target)
    with pytest.raises(error, match=message):
        fl.load_adapter(target, folder)
    assert_unchanged(target, before)


def test_pickled_adapter_is_never_unpickled(saved, monkeypatch):
    base, _, folder = saved
    os.unlink(folder / WEIGHTS)
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling was attempted")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    target = copy_model(base)
    before = snapshot(target)
    with pytest.raises(ValueError, match="never unpickles"):
        fl.load_adapter(target, folder)
    assert_unchanged(target, before)


def test_missing_folder_and_bad_arguments(tmp_path):
    model = llama()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fl.load_adapter(model, tmp_path / "nowhere")
    with pytest.raises(TypeError, match="must be a path"):
        fl.load_adapter(model, 3)
    with pytest.raises(TypeError, match="must be a path"):
        fl.save_adapter(model, None)


def test_load_into_merged_layers_is_refused(saved):
    base, _, folder = saved
    target = fl.apply_lora(copy_model(base), TARGETS, r=4, **PATTERNS)
    lora_layers(target)[0][1].merge()
    before = snapshot(target)
    with pytest.raises(ValueError, match="is merged"):
        fl.load_adapter(target, folder)
    assert_unchanged(target, before)


def test_checksum_covers_every_tensor_byte(saved):
    _, model, folder = saved
    tensors = load_file(folder / WEIGHTS)
    digest = flio._digest(tensors)
    key = f"{Q0}.lora_B.weight"
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[-1] = torch.nextafter(tensors[key].view(-1)[-1], torch.tensor(1e9))
    assert flio._digest(tensors) != digest


@pytest.mark.parametrize("name", [WEIGHTS, "adapter_config.json"])
def test_load_accepts_the_path_of_one_of_the_two_files(saved, name):
    base, model, folder = saved
    fresh = fl.load_adapter(copy_model(base), folder / name)
    ids = token_ids()
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), rtol=0, atol=0)


def test_load_from_another_file_asks_for_the_folder(tmp_path):
    other = tmp_path / "weights.safetensors"
    save_file({"x": torch.randn(3)}, other)
    with pytest.raises(ValueError, match="is a file; pass the folder that holds adapter_model.safetensors"):
        fl.load_adapter(llama(), other)


def test_saved_files_get_the_umask_permissions(tmp_path):
    model = fl.apply_lora(llama(), TARGETS, r=4)
    for umask in (0o022, 0o077):
        old = os.umask(umask)
        try:
            fl.save_adapter(model, tmp_path / f"adapter-{umask:o}")
        finally:
            os.umask(old)
        for name in (WEIGHTS, "adapter_config.json"):
            assert (tmp_path / f"adapter-{umask:o}" / name).stat().st_mode & 0o777 == 0o666 & ~umask, (umask, name)


def test_a_file_without_its_checksum_loads_with_a_warning(saved, tmp_path):
    base, model, folder = saved
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    save_file(load_file(folder / WEIGHTS), stripped / WEIGHTS)  # re-saved: fastlora's metadata is gone
    (stripped / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    with pytest.warns(UserWarning, match="no checksum found in .*stripped.*integrity is not checked"):
        fresh = fl.load_adapter(copy_model(base), stripped)
    ids = token_ids()
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fl.load_adapter(copy_model(base), folder)  # the checksummed original: no warning
