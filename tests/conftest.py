"""Test set-up: Triton kernels run under the interpreter on CPU, and unwritten outputs show up as NaN."""

import atexit
import os
import shutil
import tempfile
from collections import Counter

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton-decorated kernels
# A fresh inductor cache per run: a graph cached by an earlier build of the custom ops must never be reused.
# It is removed when the run's process exits (each xdist worker has its own).
INDUCTOR_CACHE_DIR = tempfile.mkdtemp(prefix="fastlora-inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = INDUCTOR_CACHE_DIR
atexit.register(shutil.rmtree, INDUCTOR_CACHE_DIR, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

_real_empty, _real_empty_like = torch.empty, torch.empty_like


def _nan_filled(t):
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled float tensors, so an output a kernel fails to write fails the test."""
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _nan_filled(_real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _nan_filled(_real_empty_like(*a, **k)))
    yield


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Each test draws fresh random inputs, reproducibly: the seed comes from the test's id."""
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))
    yield


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls of each fastlora op that a converted PEFT layer makes (so a test sees fastlora's op ran,
    not PEFT's forward). A sibling group's op counts one "lora_linear" per member it computes (and one
    "lora_linear_group")."""
    import fastlora.grouping as grouping
    import fastlora.kinds as kinds

    calls = Counter()
    for name in ("lora_linear", "lora_linear_dora", "lora_embedding", "lora_conv2d", "lora_linear_4bit"):
        op = getattr(kinds, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            calls[_name] += 1
            return _op(*args, **kwargs)

        monkeypatch.setattr(kinds, name, counted)
    group_op = grouping.lora_linear_group

    def counted_group(x, members, *args, **kwargs):
        calls["lora_linear_group"] += 1
        calls["lora_linear"] += len(members)
        return group_op(x, members, *args, **kwargs)

    monkeypatch.setattr(grouping, "lora_linear_group", counted_group)
    return calls
