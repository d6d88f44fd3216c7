"""The README's "Compile, checkpointing and distributed training" snippets run as written.

The compile and checkpointing blocks run here in one namespace, in order; the distributed block is
examples/fsdp_lora.py verbatim, which runs under torchrun with 2 CPU processes (gloo, 127.0.0.1 only).
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

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Compile, checkpointing and distributed training"


def _section_blocks():
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_compile_and_checkpoint_snippets_run():
    blocks = _section_blocks()
    assert len(blocks) == 3, "expected the compile, checkpointing and distributed snippets"
    namespace = {}
    torch._dynamo.reset()
    try:
        for block in blocks[:2]:
            exec(compile(block, "README.md", "exec"), namespace)
    finally:
        torch._dynamo.reset()
    model = namespace["model"]
    for layer in (model[0], model[2]):
        assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
        assert layer.weight.grad is None


def test_distributed_snippet_is_the_example():
    example = (ROOT / "examples" / "fsdp_lora.py").read_text().split('"""', 2)[2].strip()
    block = _section_blocks()[2].split("\n", 1)[1].strip()
    assert block == example, "the README's distributed snippet and examples/fsdp_lora.py differ"


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


def test_training_script_snippets_run(tmp_path, monkeypatch):
    """The "Using fastlora in a training script" blocks, in order, in one namespace (real PEFT and transformers)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using fastlora in a training script", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 4, "expected the apply, save/load, from_peft and merge snippets"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    import fastlora

    with fastlora.use_backend("torch"):
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").exists()
    ids = namespace["ids"]
    namespace["merged"].eval(), namespace["fresh"].eval()  # LoRA dropout off: the two must then agree
    with torch.no_grad():
        torch.testing.assert_close(
            namespace["merged"](ids).logits, namespace["fresh"](ids).logits, rtol=1e-4, atol=1e-4
        )
