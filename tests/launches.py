"""Count what a call launches on the device: Triton kernels, plus the torch ops that run device work.

    with count_launches() as launched:
        y = fastlora.lora_embedding(idx, weight, lora_A, lora_B, 0.5)
    assert launched.total <= 2, launched

``launched.triton`` lists the Triton kernels in launch order (by function name), ``launched.torch`` the aten
ops that launch device work on a GPU (fills, memsets, copies, casts, reductions, arithmetic, sorts, ...) and
``launched.syncs`` the aten ops that bring a device value to the host (``_local_scalar_dense`` behind
``.item()`` / ``.tolist()``, ``nonzero``); ``total`` is the number of launches. Views, allocations
(``torch.empty``) and metadata queries launch nothing and are not counted.

It works under the Triton interpreter, where the launch counts of a GPU run are read off on CPU tensors, and
with compiled kernels (``JITFunction.run``, and compiled kernels launched directly through
``CompiledKernel[grid]``). The torch ops the interpreter makes to move a kernel's arguments in and out are not
counted. The test suite's ``poison_empty`` fixture turns ``torch.empty`` into an allocation plus a NaN fill;
tests that count launches restore the real ``torch.empty`` first (``unpoisoned_empty``).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops (overload packets) that allocate without writing, or only read metadata: no device work.
_NO_LAUNCH = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "empty_permuted",
    "lift_fresh",
    "is_same_size",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "dim",
    "size",
    "stride",
    "is_contiguous",
    "is_non_overlapping_and_dense",
    "record_stream",
}
# aten ops that wait for the device and copy a value to the host.
_SYNCS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal"}


@dataclasses.dataclass
class Launches:
    triton: list[str] = dataclasses.field(default_factory=list)
    torch: list[str] = dataclasses.field(default_factory=list)
    syncs: list[str] = dataclasses.field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.triton) + len(self.torch)


def _is_view(func) -> bool:
    """An op whose every result aliases an input without writing it (view, t, slice, expand, ...)."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class _TorchLaunches(TorchDispatchMode):
    def __init__(self, record: Launches, paused: list[bool]):
        super().__init__()
        self.record, self.paused = record, paused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused[0]:
            name = func.overloadpacket.__name__
            if name in _SYNCS:
                self.record.syncs.append(name)
            if name not in _NO_LAUNCH and name != "_local_scalar_dense" and not _is_view(func):
                self.record.torch.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_launches():
    """Record every device launch made inside the block (see the module docstring)."""
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    record, paused = Launches(), [False]
    originals = {
        (InterpretedFunction, "run"): InterpretedFunction.run,
        (JITFunction, "run"): JITFunction.run,
        (CompiledKernel, "__getitem__"): CompiledKernel.__getitem__,
    }

    def wrap_run(original):
        def run(self, *args, **kwargs):
            record.triton.append(self.fn.__name__ if hasattr(self, "fn") else self.__name__)
            was, paused[0] = paused[0], True  # the interpreter's own copies are not launches
            try:
                return original(self, *args, **kwargs)
            finally:
                paused[0] = was

        return run

    def getitem(self, grid):
        runner = originals[(CompiledKernel, "__getitem__")](self, grid)

        def launch(*args, **kwargs):
            record.triton.append(self.name)
            return runner(*args, **kwargs)

        return launch

    InterpretedFunction.run = wrap_run(originals[(InterpretedFunction, "run")])
    JITFunction.run = wrap_run(originals[(JITFunction, "run")])
    CompiledKernel.__getitem__ = getitem
    try:
        with _TorchLaunches(record, paused):
            yield record
    finally:
        for (owner, attr), original in originals.items():
            setattr(owner, attr, original)


def unpoisoned_empty(monkeypatch):
    """Give back torch.empty / torch.empty_like without the test suite's NaN fill (which is a launch)."""
    import conftest

    monkeypatch.setattr(torch, "empty", conftest._real_empty)
    monkeypatch.setattr(torch, "empty_like", conftest._real_empty_like)


@contextlib.contextmanager
def count_torch_launches():
    """Record the torch ops that launch device work inside the block (``launched.torch``, ``launched.syncs``), for
    code whose Triton launches are counted elsewhere (the stand-in driver's launch function)."""
    record = Launches()
    with _TorchLaunches(record, [False]):
        yield record
