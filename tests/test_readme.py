"""Every python block of README.md runs as pasted, each on its own in a fresh namespace, and the README's set-up
commands are the ones CI runs.

On CPU a fresh interpreter (no TRITON_INTERPRET) takes the torch path, so the blocks run under
``use_backend("torch")`` here. The distributed block is examples/fsdp_lora.py verbatim, which runs under torchrun
with 2 CPU processes (gloo, 127.0.0.1 only).
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from safetensors.torch import load_file

import fastlora as fl
from fastlora.model import lora_layers
from fastlora.peft import converted_layers

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FSDP_MARK = "# examples/fsdp_lora.py, run as: torchrun"


def _python_blocks() -> list[tuple[str, str]]:
    """(id, code) of every ```python block, the id from its section heading and its place in it."""
    blocks, section, count = [], "top", {}
    for heading, code in re.findall(r"^(#{2,3} [^\n]+)$|^```python\n(.*?)^```", README, flags=re.S | re.M):
        if heading:
            section = re.sub(r"\W+", "-", heading.lstrip("# ").lower()).strip("-")
            continue
        count[section] = count.get(section, 0) + 1
        blocks.append((f"{section}-{count[section]}", code))
    return blocks


BLOCKS = _python_blocks()
RUNNABLE = [(block_id, code) for block_id, code in BLOCKS if not code.startswith(FSDP_MARK)]


def _grads_reach_only_the_adapters(ns, tmp_path):
    for layer in (ns["model"][0], ns["model"][2]):
        assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
        assert layer.weight.grad is None


def _layers_block(ns, tmp_path):
    assert ns["y"].shape == (4, 10, 48) and ns["e"].shape == (4, 10, 64) and ns["c"].shape == (2, 32, 8, 8)
    assert all(torch.isfinite(ns[k]).all() for k in ("y", "e", "c"))


def _training_block(ns, tmp_path):
    assert all(p.grad is None for n, p in ns["model"].named_parameters() if "lora_" not in n)
    assert ns["reference_logits"].shape == (4, 16, 32)


def _save_load_block(ns, tmp_path):
    assert sorted(os.listdir(tmp_path / "my-adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = {n: layer.lora_A for n, layer in lora_layers(ns["model"])}
    loaded = {n: layer.lora_A for n, layer in lora_layers(ns["fresh"])}
    assert sorted(saved) == sorted(loaded) and all(torch.equal(saved[n], loaded[n]) for n in saved)


def _from_peft_block(ns, tmp_path):
    assert len(converted_layers(ns["peft_model"])) == 2 * 7
    assert len(load_file(tmp_path / "peft-adapter" / "adapter_model.safetensors")) == 2 * 2 * 7


def _named_adapters_block(ns, tmp_path):
    model = ns["model"]
    assert ns["ref_logits"].shape == (4, 16, 32)
    for name, layer in lora_layers(model):
        assert layer.active_adapter == "policy" and layer.lora_A.grad is not None, name
        assert all(p.grad is None and not p.requires_grad for p in layer.lora_adapters["reference"].parameters())
    for name in ("policy", "reference"):
        assert len(load_file(tmp_path / "adapters" / name / "adapter_model.safetensors")) == 2 * 2 * 2


def _trainer_from_peft_block(ns, tmp_path):
    assert ns["trainer"].state.global_step == 2
    assert len(load_file(tmp_path / "out" / "final" / "adapter_model.safetensors")) == 2 * 2 * 2
    assert not (tmp_path / "out" / "final" / "model.safetensors").exists()


def _adapter_trainer_block(ns, tmp_path):
    assert ns["trainer"].state.global_step == 2
    for step in (1, 2):
        saved = load_file(tmp_path / "out" / f"checkpoint-{step}" / "adapter_model.safetensors")
        assert len(saved) == 2 * 2 * 2 + 1 and "base_model.model.lm_head.weight" in saved


def _dora_block(ns, tmp_path):
    dora, base = ns["dora"], ns["base"]
    assert ns["y"].shape == (4, 10, 48) and dora.use_dora and not dora.merged
    assert torch.equal(dora.lora_magnitude_vector, torch.linalg.vector_norm(base.weight, dim=1).detach())
    assert torch.allclose(ns["y"], base(ns["x"]), atol=1e-5)  # lora_B is zero: the layer starts as the base
    for layer in (ns["model"][0], ns["model"][2]):
        assert layer.lora_bias.grad is not None and layer.lora_B.grad is not None and layer.weight.grad is None
    assert load_file(tmp_path / "bias-adapter" / "adapter_model.safetensors").keys() == {
        f"base_model.model.{i}.lora_{key}" for i in (0, 2) for key in ("A.weight", "B.weight", "B.bias")
    }


def _merge_block(ns, tmp_path):
    assert not lora_layers(ns["merged"]) and type(ns["merged"].model.layers[0].self_attn.q_proj) is torch.nn.Linear


def _groups_block(ns, tmp_path):
    from fastlora.grouping import groups_of

    names = [g.names for g in groups_of(ns["model"])]
    assert names == [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")] * 2
    assert all(layer.lora_A.grad is not None for _, layer in lora_layers(ns["model"]))


def _moe_block(ns, tmp_path):
    import json

    from fastlora.experts import has_adapters

    merged = ns["merged_moe"]
    experts = merged.model.layers[0].mlp.experts
    assert type(experts).__name__ == "Qwen3MoeExperts" and not has_adapters(merged) and not lora_layers(merged)
    assert experts.config._experts_implementation == "grouped_mm"
    config = json.loads((tmp_path / "moe-adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]


def _qlora_block(ns, tmp_path):
    import bitsandbytes as bnb

    model = ns["merged_4bit"]
    assert not lora_layers(model) and all(type(model[i]) is bnb.nn.Linear4bit for i in (0, 2))
    assert model[0].weight.quant_state.quant_type == "nf4" and model[0].weight.dtype == torch.uint8


# What each block must leave behind, found by a line only that block has (each must match exactly one block).
CHECKS = {
    "c = fl.lora_conv2d(": _layers_block,
    "reference_logits = model(ids).logits": _training_block,
    'fl.load_adapter(fresh, "my-adapter")': _save_load_block,
    "fl.from_peft(peft_model)": _from_peft_block,
    'fl.save_adapter(model, "adapters")': _named_adapters_block,
    'trainer.save_model("out/final")': _trainer_from_peft_block,
    "fl.adapter_trainer(transformers.Trainer)(": _adapter_trainer_block,
    "merged = fl.merge_and_unload(model)": _merge_block,
    "merged_4bit = fl.merge_and_unload(model)": _qlora_block,
    "merged_moe = fl.merge_and_unload(model)": _moe_block,
    "dora = fl.LoRALinear.from_module(": _dora_block,
    "compiled(torch.randn(32, 64))": _grads_reach_only_the_adapters,
    "checkpoint(model, x, use_reentrant=False)": _grads_reach_only_the_adapters,
    "assert groups_of(unfused) == []": _groups_block,
}


def test_every_block_is_run_and_checked():
    """Every opening fence is bash or python (a ```py block would escape the tests); each python block is either
    run by test_block_runs_as_pasted or is the fsdp example run under torchrun; every check finds its block."""
    fences = re.findall(r"^```(\S*)\n.*?^```", README, flags=re.S | re.M)  # the opening fence's language
    assert set(fences) <= {"bash", "python"}, fences
    assert len(BLOCKS) == fences.count("python") == 15
    assert len(RUNNABLE) == len(BLOCKS) - 1
    for needle in CHECKS:
        assert sum(needle in code for _, code in RUNNABLE) == 1, needle


@pytest.mark.parametrize("code", [code for _, code in RUNNABLE], ids=[block_id for block_id, _ in RUNNABLE])
def test_block_runs_as_pasted(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    torch._dynamo.reset()
    try:
        with fl.use_backend("torch"):
            exec(compile(code, "README.md", "exec"), namespace)
    finally:
        torch._dynamo.reset()
    for needle, check in CHECKS.items():
        if needle in code:
            check(namespace, tmp_path)


def test_distributed_snippet_is_the_example():
    example = (ROOT / "examples" / "fsdp_lora.py").read_text().split('"""', 2)[2].strip()
    (block,) = [code for _, code in BLOCKS if code.startswith(FSDP_MARK)]
    assert block.split("\n", 1)[1].strip() == example, "the README's fsdp snippet and examples/fsdp_lora.py differ"


@pytest.mark.slow
def test_fsdp_example_runs_under_torchrun(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2"]
    cmd += ["--master-addr=127.0.0.1", f"--master-port={port}", str(ROOT / "examples" / "fsdp_lora.py")]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    adapter = load_file(tmp_path / "adapter.safetensors")
    shapes = {name: tuple(t.shape) for name, t in adapter.items()}
    assert shapes == {"0.lora_A": (8, 64), "0.lora_B": (64, 8), "2.lora_A": (8, 64), "2.lora_B": (8, 8)}
    assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in adapter.values())


def test_ci_runs_exactly_the_readme_set_up_commands():
    setup = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    (commands,) = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    lines = commands.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert any(c.strip() == line or c.strip().startswith(line + " ||") for c in ci), f"CI does not run {line!r}"
