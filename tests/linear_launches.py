"""Count every device launch a piece of host code makes: Triton kernels (under the interpreter) and torch ops
(memsets, casts, sums...), for the launch budgets of the fused layers.

Views, allocations and metadata ops launch nothing and are not counted; the interpreter's own copies of kernel
arguments are not counted either (they are how it emulates a launch)."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction

_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "lift_fresh",
              "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "is_same_size"}  # fmt: skip


def _launches(func) -> bool:
    if func.__name__.split(".")[0] in _NO_LAUNCH:
        return False
    # a view returns an alias of an input that it does not write: no kernel runs
    returns = func._schema.returns
    return not (returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns))


class LaunchCounter(TorchDispatchMode):
    """with LaunchCounter() as n: ...; then n.kernels (Triton kernel names), n.torch_ops (aten op names), n.total."""

    def __init__(self):
        super().__init__()
        self.kernels: list[str] = []
        self.torch_ops: list[str] = []
        self._in_kernel = 0

    @property
    def total(self) -> int:
        return len(self.kernels) + len(self.torch_ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._in_kernel and _launches(func):
            self.torch_ops.append(func.__name__)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        counter = self
        self._run = run = InterpretedFunction.run

        def counted(fn_self, *args, **kwargs):
            counter.kernels.append(fn_self.fn.__name__)
            counter._in_kernel += 1
            try:
                return run(fn_self, *args, **kwargs)
            finally:
                counter._in_kernel -= 1

        InterpretedFunction.run = counted
        return super().__enter__()

    def __exit__(self, *exc):
        InterpretedFunction.run = self._run
        return super().__exit__(*exc)
