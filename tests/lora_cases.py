"""Small models built from each fastlora layer type, shared by the compile, checkpointing, determinism and
distributed tests. Every LoRA factor is drawn random (PEFT starts B or A at zero, which would hide half the
gradients), and only the LoRA factors train.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
import torch.nn as nn

import fastlora

LAYER_KINDS = ("linear", "embedding", "conv2d")

# Kinds whose layer takes a dropout on the LoRA branch.
DROPOUT_KINDS = ("linear", "conv2d")

# The linear layer with PEFT's options: DoRA (use_dora=True) and a bias on lora_B (lora_bias=True).
OPTION_KINDS = ("linear-dora", "linear-bias")
_OPTIONS = {"linear": {}, "linear-dora": {"use_dora": True}, "linear-bias": {"lora_bias": True}}
# The adapter tensors every case trains.
ADAPTER_SUFFIXES = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_bias")


def kind_param(kind: str):
    """A pytest param for a layer kind."""
    return pytest.param(kind, id=kind)


def kind_params(kinds=LAYER_KINDS):
    return [kind_param(k) for k in kinds]


PATHS = (pytest.param("torch", id="torch"), pytest.param("triton", id="interp"))


@contextlib.contextmanager
def on_path(path: str):
    """Run the block on the torch path ("torch") or the Triton kernels under the interpreter ("triton")."""
    with fastlora.use_backend(path):
        yield


def _randomise(model: nn.Module, gen: torch.Generator):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(ADAPTER_SUFFIXES):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


def build_model(kind: str, dropout: float = 0.0, seed: int = 0, dtype=torch.float32) -> nn.Module:
    """A two-layer model around ``kind``; base weights and LoRA factors all drawn from ``seed``."""
    torch.manual_seed(seed)
    if kind in _OPTIONS:
        opts = _OPTIONS[kind]
        model = nn.Sequential(
            fastlora.LoRALinear.from_module(nn.Linear(13, 11), r=5, alpha=10, dropout=dropout, **opts),
            nn.GELU(),
            fastlora.LoRALinear.from_module(nn.Linear(11, 7, bias=False), r=3, alpha=6, dropout=dropout, **opts),
        )
    elif kind == "embedding":
        model = nn.Sequential(
            fastlora.LoRAEmbedding.from_module(nn.Embedding(29, 11, padding_idx=0), r=4, alpha=8),
            nn.GELU(),
            fastlora.LoRALinear.from_module(nn.Linear(11, 7), r=3, alpha=6, dropout=dropout),
        )
    elif kind == "conv2d":
        model = nn.Sequential(
            fastlora.LoRAConv2d.from_module(nn.Conv2d(3, 6, 3, padding=1), r=4, alpha=8, dropout=dropout),
            nn.GELU(),
            fastlora.LoRAConv2d.from_module(nn.Conv2d(6, 5, 3, stride=2), r=3, alpha=6, dropout=dropout),
        )
    else:
        raise ValueError(f"unknown layer kind {kind!r}")
    model = model.to(dtype)
    _randomise(model, torch.Generator().manual_seed(seed + 1))
    return model


def make_input(kind: str, seed: int = 0, batch: int = 3, dtype=torch.float32) -> torch.Tensor:
    """A fresh random input for ``build_model(kind)`` (float inputs require grad; token ids do not)."""
    gen = torch.Generator().manual_seed(seed)
    if kind in _OPTIONS:
        return torch.randn(batch, 5, 13, generator=gen, dtype=dtype).requires_grad_()
    if kind == "embedding":
        return torch.randint(0, 29, (batch, 5), generator=gen)
    if kind == "conv2d":
        return torch.randn(batch, 3, 9, 9, generator=gen, dtype=dtype).requires_grad_()
    raise ValueError(f"unknown layer kind {kind!r}")


def loss_weights(out: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Fixed random weights g for the loss sum(out * g), so every output element carries its own gradient."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)


def lora_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith(ADAPTER_SUFFIXES)}


def forward_backward(model: nn.Module, x: torch.Tensor, g: torch.Tensor | None = None, step=None):
    """Run forward and backward of sum(model(x) * g); return (output, {name: grad}) with x's grad as "x".

    ``step`` replaces the plain ``model(x)`` call (e.g. a checkpointed or compiled call).
    """
    model.zero_grad(set_to_none=True)
    if x.grad is not None:
        x.grad = None
    out = (step or model)(x)
    g = loss_weights(out) if g is None else g
    (out * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in lora_params(model).items()}
    if x.is_floating_point():
        grads["x"] = x.grad.clone()
    for n, p in model.named_parameters():
        if not n.endswith(ADAPTER_SUFFIXES):
            assert p.grad is None, f"frozen base parameter {n} received a gradient"
    return out.detach().clone(), grads


@contextlib.contextmanager
def count_kernel_work():
    """Counts, inside the block, the Triton kernel launches and the atomic operations they execute (interpreter
    mode): {"launches": {kernel name: count}, "atomics": {kernel name: count}}."""
    from triton.runtime import interpreter

    counts = {"launches": Counter(), "atomics": Counter()}
    running = []
    run, rmw, cas = (
        interpreter.InterpretedFunction.run,
        interpreter.InterpreterBuilder.create_atomic_rmw,
        interpreter.InterpreterBuilder.create_atomic_cas,
    )

    def counting_run(self, *args, **kwargs):
        counts["launches"][self.fn.__name__] += 1
        running.append(self.fn.__name__)
        try:
            return run(self, *args, **kwargs)
        finally:
            running.pop()

    def counting(original):
        def atomic(self, *args, **kwargs):
            counts["atomics"][running[-1] if running else "?"] += 1
            return original(self, *args, **kwargs)

        return atomic

    interpreter.InterpretedFunction.run = counting_run
    interpreter.InterpreterBuilder.create_atomic_rmw = counting(rmw)
    interpreter.InterpreterBuilder.create_atomic_cas = counting(cas)
    try:
        yield counts
    finally:
        interpreter.InterpretedFunction.run = run
        interpreter.InterpreterBuilder.create_atomic_rmw = rmw
        interpreter.InterpreterBuilder.create_atomic_cas = cas
