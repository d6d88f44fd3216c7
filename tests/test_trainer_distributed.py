"""examples/trainer_lora.py under torchrun with 2 CPU processes (gloo): Hugging Face Trainer on a PEFT model after
fl.from_peft gives PEFT's loss at every step (dropout 0), and the Trainer's own save_model writes an adapter PEFT
loads.

Two launches: the example as the README runs it (on CPU processes accelerate enables FSDP for accelerators only, so
it runs DDP), and tests/trainer_fsdp2_cpu.py, which runs the example's Trainer with PEFT's layers (the reference,
DDP) and then with fastlora's through accelerate's FSDP2 code, giving accelerate the FSDP2 state it sets on GPUs for
the same arguments (see that script), which holds through training and saving.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close

import fastlora as fl

peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "trainer_lora.py"
COMMAND = "torchrun --nproc-per-node 2 examples/trainer_lora.py"
pytestmark = pytest.mark.slow


def _example():
    spec = importlib.util.spec_from_file_location("trainer_lora", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torchrun(script, args, cwd):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # as a user runs it: without the suite's TRITON_INTERPRET, the layers take the torch path on CPU
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(GLOO_SOCKET_IFNAME="lo", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2"]
    cmd += ["--master-addr=127.0.0.1", f"--master-port={port}", str(script), *args]
    run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(folder, {"example": stdout, "reference and fsdp2": stdout}) of the two launches; the runs write the
    subfolders fastlora-out, peft-out and fsdp2-out."""
    folder = tmp_path_factory.mktemp("trainer")
    out = {"example": _torchrun(EXAMPLE, [], folder)}
    out["reference and fsdp2"] = _torchrun(ROOT / "tests" / "trainer_fsdp2_cpu.py", [], folder)
    return folder, out


def _losses(folder: Path) -> list[float]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def test_readme_gives_the_command():
    assert COMMAND in (ROOT / "README.md").read_text()


def test_the_runs_are_what_they_claim(runs):
    _, out = runs
    example, second = out["example"], out["reference and fsdp2"]
    assert "2 processes, DistributedType.MULTI_CPU, fastlora LoRA layers" in example, example
    assert "2 processes, DistributedType.MULTI_CPU, PEFT LoRA layers" in second, second
    assert "2 processes, FSDP2, fastlora LoRA layers" in second, second
    wrapped = int(second.split("fully_shard wrapped ")[1].split()[0])
    assert wrapped >= 3, f"fully_shard wrapped {wrapped} modules: expected both decoder layers and the model"
    assert "after saving accelerate's state says DistributedType.FSDP, FSDP version 2" in second, second


@pytest.mark.parametrize("run", ["fastlora", "fsdp2"])
def test_trainer_loss_equals_peft_step_for_step(run, runs):
    folder, _ = runs
    ours, theirs = _losses(folder / f"{run}-out"), _losses(folder / "peft-out")
    assert len(ours) == len(theirs) == 6
    assert ours[-1] < ours[0], f"the loss did not fall ({ours}): the comparison would prove little"
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), 1):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: fastlora's loss {a} vs PEFT's {b}"


@pytest.mark.parametrize("run", ["fastlora", "fsdp2"])
def test_save_model_writes_an_adapter_peft_loads(run, runs):
    """PEFT loads the folder save_model wrote and computes what PEFT's own trained adapter computes."""
    from peft import PeftModel

    folder, _ = runs
    example = _example()
    ours = PeftModel.from_pretrained(example.base_model(), folder / f"{run}-out").eval()
    theirs = PeftModel.from_pretrained(example.base_model(), folder / "peft-out").eval()
    trained_b = [p for n, p in ours.named_parameters() if "lora_B" in n]
    assert trained_b and all(p.abs().sum() > 0 for p in trained_b), "lora_B is still PEFT's zero initialisation"
    ids = torch.stack([row["input_ids"] for row in example.dataset()[:4]])
    with torch.no_grad(), fl.use_backend("torch"):
        assert_close(ours(ids).logits, theirs(ids).logits, torch.float32, "logits with the saved adapters")
