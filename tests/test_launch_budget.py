"""The launch budget where users meet it: through the layers, with autograd, at M = 8192 rows on sm_90.

A subprocess runs the layers' Triton path against the stand-in sm_90 driver (benchmarks/host.py: the kernels
compile for real and launch into a C-like launch function that counts), with the compiled kernels, not the
interpreter. Every device launch is counted: the driver launches of the Triton kernels, and each torch op that
launches device work on a GPU (memsets, casts, seed draws, asserts). Warm calls are counted (the third and later
calls of a signature replay their recorded launches). The dispatch times nothing on the stand-in's CPU tensors and
takes its defaults, the fused paths (linear's fused GEMM, conv2d's fused implicit GEMM). Sibling groups (q/k/v,
gate/up) are counted over their members' calls on one x, as the model's code makes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json, sys, torch
import torch.nn as nn
sys.path.insert(0, "tests")
from launches import count_torch_launches
from fastlora.benchmarks import host
import fastlora as fl

torch.manual_seed(0)
M = 8192
dt = torch.bfloat16
out = {}


def count(fn):
    before = host.DRIVER_LAUNCH.launches
    with count_torch_launches() as ops:
        result = fn()
    return result, {"triton": host.DRIVER_LAUNCH.launches - before, "torch": ops.torch, "syncs": ops.syncs}


def trained(layer):
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_()
    return layer.train()


with host.stand_in_gpu():
    for name, p in (("linear", 0.0), ("linear dropout", 0.1)):
        layer = trained(fl.LoRALinear.from_module(nn.Linear(128, 96, dtype=dt).requires_grad_(False), r=16,
                                                  alpha=32, dropout=p))
        x = torch.randn(M, 128, dtype=dt, requires_grad=True)
        g = torch.randn(M, 96, dtype=dt)
        for _ in range(3):  # compile, record, replay
            layer(x).backward(g)
            x.grad = None
            layer.zero_grad(set_to_none=True)
        y, fwd = count(lambda: layer(x))
        _, bwd = count(lambda: y.backward(g))
        out[name] = {"forward": fwd, "backward": bwd}

    layer = trained(fl.LoRAEmbedding.from_module(nn.Embedding(512, 96, dtype=dt).requires_grad_(False), r=16,
                                                 alpha=32))
    idx = torch.randint(0, 512, (M,))
    for _ in range(3):
        layer(idx)
    _, fwd = count(lambda: layer(idx))
    out["embedding"] = {"forward": fwd}

    layer = trained(fl.LoRAConv2d.from_module(nn.Conv2d(16, 24, 3, padding=1, dtype=dt).requires_grad_(False),
                                              r=8, alpha=16))
    x = torch.randn(8, 16, 32, 32, dtype=dt, requires_grad=True)  # M = 8 * 32 * 32 = 8192
    g = torch.randn(8, 24, 32, 32, dtype=dt)
    for _ in range(3):
        layer(x).backward(g)
        x.grad = None
        layer.zero_grad(set_to_none=True)
    y, fwd = count(lambda: layer(x))
    _, bwd = count(lambda: y.backward(g))
    out["conv2d"] = {"forward": fwd, "backward": bwd}

    # sibling groups at Llama-8B's proportions (q as wide as x, k and v a quarter under GQA; gate and up 1.5x),
    # grouped by name: the members called one by one on one x, as the model's code calls them
    blocks = {"q/k/v": {"q_proj": 128, "k_proj": 32, "v_proj": 32}, "gate/up": {"gate_proj": 192, "up_proj": 192}}
    for name, widths, p in (("q/k/v", blocks["q/k/v"], 0.0), ("gate/up", blocks["gate/up"], 0.0),
                            ("q/k/v dropout", blocks["q/k/v"], 0.1)):
        block = nn.Module()
        for child, n in widths.items():
            setattr(block, child, nn.Linear(128, n, bias=False, dtype=dt))
        fl.apply_lora(block, list(widths), r=16, alpha=32, dropout=p)
        trained(block)
        members = [getattr(block, child) for child in widths]
        x = torch.randn(M, 128, dtype=dt, requires_grad=True)
        gs = [torch.randn(M, n, dtype=dt) for n in widths.values()]
        for _ in range(3):
            torch.autograd.backward([m(x) for m in members], gs)
            x.grad = None
            block.zero_grad(set_to_none=True)
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            ys, fwd = count(lambda: [m(x) for m in members])
        _, bwd = count(lambda: torch.autograd.backward(ys, gs))
        x_saved = sum(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in packed)
        out[name] = {"forward": fwd, "backward": bwd, "x_saved": x_saved}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def launched():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _total(counted) -> int:
    return counted["triton"] + len(counted["torch"])


@pytest.mark.parametrize(
    "layer, direction, budget",
    [
        ("linear", "forward", 2),  # the S pass, the GEMM
        ("linear", "backward", 4),  # memset of the float32 dA/dB buffer, the dS/dB pass, the dX GEMM, one cast
        ("linear dropout", "forward", 3),  # the seed draw, the S pass, the GEMM
        ("linear dropout", "backward", 4),
        ("embedding", "forward", 2),  # the kernel, the device-side assert of its index flag
        ("q/k/v", "forward", 2),  # the S pass over x for all three, one GEMM over the concatenated N
        ("q/k/v", "backward", 4),  # memset of the float32 dA/dB workspace, the dS/dB pass, the dX GEMM, one cast
        ("gate/up", "forward", 2),
        ("gate/up", "backward", 4),
        ("q/k/v dropout", "forward", 3),  # one seed draw for the three masks, the S pass, the GEMM
        ("q/k/v dropout", "backward", 4),
    ],
)
def test_layer_launch_budget(launched, layer, direction, budget):
    counted = launched[layer][direction]
    assert _total(counted) <= budget, counted
    assert counted["syncs"] == [], counted


@pytest.mark.parametrize("group", ["q/k/v", "gate/up", "q/k/v dropout"])
def test_group_saves_x_once(launched, group):
    """The group's one autograd node saves x once (unfused, each member saves it)."""
    assert launched[group]["x_saved"] == 1, launched[group]


def test_conv2d_makes_no_weight_copy_per_call(launched):
    """conv2d reads its weights in channels_last: the copies are made once per weight version (the frozen
    weight once, the adapter once per optimiser step), never per call."""
    for direction in ("forward", "backward"):
        counted = launched["conv2d"][direction]
        assert "clone" not in counted["torch"], counted  # a layout copy (contiguous(memory_format=...)) is a clone
        assert counted["syncs"] == [], counted
