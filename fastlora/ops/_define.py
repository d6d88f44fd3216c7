"""One definition per op, two entry points derived from it.

An op is written once as a signature string plus three functions that take the call's arguments as one
named tuple ``a`` (``a.x``, ``a.weight``, ...):

- ``forward(a, triton) -> tuple of outputs``;
- ``backward(a, saved_outputs, grads, needs, triton) -> one gradient (or None) per differentiable input``,
  where ``grads`` holds the gradients of the differentiable outputs and ``needs`` says which input gradients
  autograd asks for;
- ``fake(a) -> tuple of outputs`` with the right shapes, dtypes and layouts (for torch.compile's tracing);

and ``path(a) -> bool``: whether the call runs the Triton kernels, decided once in forward and handed to
backward (the two paths draw different dropout masks).

From that :class:`Op` builds

- eager: a ``torch.autograd.Function`` whose forward and backward call the two functions directly (no
  dispatcher round trip: this is the host-cost hot path), applied through autograd's C entry point outside
  functorch transforms (``Function.apply``'s Python wrapper only binds defaults and dispatches to functorch);
- compiled: the custom ops ``fastlora::<name>`` and ``fastlora::<name>_backward`` with their fakes and
  ``register_autograd``, which ``torch.compile(fullgraph=True)`` treats as opaque calls.

Adding an argument (a weight scale, a magnitude vector) means adding it to the signature string and reading
``a.<name>`` where it is used. Types are those of torch's schema language. A dropout seed is a ``Tensor? seed``
from ``backend.draw_seed`` (a 0-d int64 tensor, None without dropout), saved for backward like the other tensors;
the kernels read it from memory (so a CUDA graph replay draws afresh), the torch path turns its CPU seed into an
int (``backend.host_seed``).

``a.plan`` is one more field, outside the signature: whatever the caller passed as ``op(*args, plan=...)`` (an
object of the op's own, such as what it has recorded for this call signature), handed to forward and backward on
the eager path; None on the compiled path and when not given.
"""

from __future__ import annotations

import operator
from collections import namedtuple
from collections.abc import Callable

import torch

from fastlora.kernels.geometry import memory_format

__all__ = ["Op", "grad_layout"]

_TENSOR_TYPES = ("Tensor", "Tensor?")


def grad_layout(t: torch.Tensor) -> torch.memory_format:
    """The memory format of a gradient for t: t's own for a 4-D tensor (NCHW or channels_last), else contiguous."""
    return memory_format(t) if t.dim() == 4 else torch.contiguous_format


_new_tuple = tuple.__new__  # a named tuple from a tuple of its values, without its Python __new__


def _gather(indices: tuple[int, ...]) -> Callable[[tuple], tuple]:
    """A function of a sequence: the tuple of its items at ``indices`` (itemgetter, always a tuple)."""
    if len(indices) == 1:
        (i,) = indices
        return lambda seq: (seq[i],)
    return operator.itemgetter(*indices) if indices else lambda seq: ()


def _parse(signature: str) -> list[tuple[str, str]]:
    params = []
    for item in signature.split(","):
        type_, name = item.split()
        params.append((name, type_))
    return params


class Op:
    """An op defined once; ``op(*args)`` runs it eagerly or, inside torch.compile, as its custom op."""

    def __init__(
        self,
        name: str,
        signature: str,
        *,
        outputs: tuple[str, ...],
        differentiable: tuple[str, ...],
        forward: Callable,
        backward: Callable,
        fake: Callable,
        path: Callable,
        differentiable_outputs: tuple[str, ...] | None = None,
        saved_outputs: tuple[str, ...] = (),
        saved_when_trained: tuple[str, ...] = (),
        materialize_grads: bool = True,
    ):
        params = _parse(signature)
        names = [n for n, _ in params]
        types = dict(params)
        self.name = name
        self.Args = namedtuple(f"{name}_args", [*names, "plan"], defaults=(None,))
        self._forward, self._backward, self._fake, self._path = forward, backward, fake, path
        self._n = len(names)
        self._diff = tuple(names.index(n) for n in differentiable)
        self._lists = tuple(i for i, n in enumerate(names) if types[n].endswith("[]"))
        self._lazy = frozenset(names.index(n) for n in saved_when_trained)
        self._outputs = outputs
        diff_out = outputs[:1] if differentiable_outputs is None else differentiable_outputs
        self._diff_out = tuple(outputs.index(n) for n in diff_out)
        self._nondiff_out = tuple(j for j in range(len(outputs)) if j not in self._diff_out)
        self._saved_out = tuple(outputs.index(n) for n in saved_outputs)
        self._tensors = tuple(i for i, n in enumerate(names) if types[n] in _TENSOR_TYPES)
        self._consts = tuple(i for i in range(self._n) if i not in self._tensors)
        self._materialize = materialize_grads
        self.function = self._eager_function()
        self._register(signature, names, types)

    # ------------------------------------------------------------------------------------------------------
    # calling
    # ------------------------------------------------------------------------------------------------------

    def __call__(self, *args, plan=None):
        """The op's outputs (a tuple when it has several). ``plan`` reaches forward and backward as ``a.plan`` on
        the eager path; the compiled path ignores it."""
        if torch.compiler.is_compiling():
            return getattr(torch.ops.fastlora, self.name)(*args)
        if torch._C._are_functorch_transforms_active():  # Function.apply's own path (it refuses, see its message)
            return self.function.apply(*args, plan)
        return self._apply(*args, plan)

    def _args(self, values):
        """Args from a custom op's values (lists back to tuples)."""
        values = list(values)
        for i in self._lists:
            values[i] = tuple(values[i])
        return self.Args(*values)

    # ------------------------------------------------------------------------------------------------------
    # eager
    # ------------------------------------------------------------------------------------------------------

    def _eager_function(self):
        """The autograd Function; its forward takes the op's arguments and then the plan.

        What forward keeps for backward: the tensor arguments (a bias that needs no gradient as None) and the
        saved outputs through save_for_backward, the other arguments (the plan last) on ctx. Backward puts them
        back in argument order with one precomputed gather."""
        op = self
        Args, forward, backward, path = op.Args, op._forward, op._backward, op._path
        n, diff, diff_out = op._n, op._diff, op._diff_out
        tensors = _gather(op._tensors)
        consts = _gather((*op._consts, n))
        saved_out, nondiff_out = _gather(op._saved_out), _gather(op._nondiff_out)
        lazy = tuple((k, i) for k, i in enumerate(op._tensors) if i in op._lazy)
        n_tensors = len(op._tensors)
        n_saved = n_tensors + len(op._saved_out)
        # argument i's place in saved_tensors + consts
        place = {i: k for k, i in enumerate(op._tensors)} | {i: n_saved + k for k, i in enumerate((*op._consts, n))}
        in_order = _gather(tuple(place[i] for i in range(n + 1)))
        needed, grads_of = _gather(diff), _gather(diff_out)
        single_grad = len(diff_out) == 1
        # without materialized gradients an output that took no part in the loss hands backward None, not zeros
        optional_grads = single_grad or not op._materialize
        no_grads = (None,) * (n + 1)

        class Function(torch.autograd.Function):
            # said outright: autograd looks it up at every backward, and a miss costs an AttributeError
            boxed_grads_call = False

            @staticmethod
            def forward(ctx, *args):
                a = _new_tuple(Args, args)
                triton = path(a)
                outs = forward(a, triton)
                keep = tensors(args)
                if lazy:
                    needs = ctx.needs_input_grad
                    keep = list(keep)
                    for k, i in lazy:
                        if not needs[i]:
                            keep[k] = None
                ctx.save_for_backward(*keep, *saved_out(outs))
                ctx.consts, ctx.triton = consts(args), triton
                if optional_grads:  # no zeros for outputs without a gradient (S): a memset per output saved
                    ctx.set_materialize_grads(False)
                if nondiff_out:
                    ctx.mark_non_differentiable(*nondiff_out(outs))
                # a view as output would forbid in-place ops on it, which the plain modules' outputs allow
                outs = tuple([o.detach() if o._base is not None else o for o in outs])
                return outs if len(outs) > 1 else outs[0]

            @staticmethod
            def backward(ctx, *grads):
                if optional_grads and (  # no output took part in the loss
                    grads[diff_out[0]] is None if single_grad else all(grads[j] is None for j in diff_out)
                ):
                    return no_grads
                saved = ctx.saved_tensors
                a = _new_tuple(Args, in_order(saved + ctx.consts))
                needs = needed(ctx.needs_input_grad)
                got = backward(a, saved[n_tensors:], list(grads_of(grads)), needs, ctx.triton)
                result = [None] * (n + 1)
                for k, i in enumerate(diff):
                    if needs[k]:
                        result[i] = got[k]
                return tuple(result)

        Function.__name__ = Function.__qualname__ = "".join(p.title() for p in self.name.split("_")) + "Function"
        # autograd's C entry point, as Function.apply calls it outside functorch transforms
        self._apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, Function)
        return Function

    # ------------------------------------------------------------------------------------------------------
    # compiled
    # ------------------------------------------------------------------------------------------------------

    def _register(self, signature: str, names: list[str], types: dict):
        op = self
        n_out = len(self._outputs)
        out_schema = "Tensor" if n_out == 1 else "(" + ", ".join(["Tensor"] * n_out) + ")"
        tensors, consts, lazy = self._tensors, self._consts, self._lazy

        def forward_impl(*args):
            a = op._args(args)
            outs = op._forward(a, op._path(a))
            return outs if n_out > 1 else outs[0]

        def forward_fake(*args):
            outs = op._fake(op._args(args))
            return outs if n_out > 1 else outs[0]

        forward_op = torch.library.custom_op(
            f"fastlora::{self.name}", forward_impl, mutates_args=(), schema=f"({signature}) -> {out_schema}"
        )
        forward_op.register_fake(forward_fake)

        grads_sig = [f"Tensor grad_{self._outputs[j]}" for j in self._diff_out]
        saved_sig = [f"Tensor? {names[i]}" for i in tensors] + [
            f"Tensor? saved_{self._outputs[j]}" for j in self._saved_out
        ]
        consts_sig = [f"{types[names[i]]} {names[i]}" for i in consts]
        backward_sig = ", ".join([*grads_sig, *saved_sig, *consts_sig, "bool[] needs", "bool triton"])
        n_grads, n_tensors, n_saved = len(grads_sig), len(tensors), len(self._saved_out)

        def _unpack(args):
            grads = args[:n_grads]
            saved = args[n_grads : n_grads + n_tensors]
            outs = args[n_grads + n_tensors : n_grads + n_tensors + n_saved]
            rest = args[n_grads + n_tensors + n_saved :]
            values = [None] * op._n
            for k, i in enumerate(tensors):
                values[i] = saved[k]
            for k, i in enumerate(consts):
                values[i] = rest[k]
            return grads, op._args(values), outs, tuple(rest[-2]), rest[-1]

        def backward_impl(*args):
            grads, a, outs, needs, triton = _unpack(args)
            got = op._backward(a, outs, grads, needs, triton)
            result, seen = [], set()
            for k, i in enumerate(op._diff):
                ref = a[i]
                if needs[k] and got[k] is not None and ref is not None:
                    g = got[k].contiguous(memory_format=grad_layout(ref))
                    # a custom op's outputs may not alias each other and must match their fakes (own storage, offset
                    # 0), while the kernels may return views of one float32 buffer: those are copied (r-wide tensors)
                    storage = g.untyped_storage()._cdata
                    result.append(g.clone() if storage in seen or g.storage_offset() else g)
                    seen.add(storage)
                else:
                    result.append(grads[0].new_empty(0))
            return result

        def backward_fake(*args):
            grads, a, _, needs, _ = _unpack(args)
            result = []
            for k, i in enumerate(op._diff):
                ref = a[i]
                if needs[k] and ref is not None:
                    fmt = grad_layout(ref)
                    result.append(torch.empty(ref.shape, dtype=ref.dtype, device=ref.device, memory_format=fmt))
                else:
                    result.append(grads[0].new_empty(0))
            return result

        backward_op = torch.library.custom_op(
            f"fastlora::{self.name}_backward", backward_impl, mutates_args=(), schema=f"({backward_sig}) -> Tensor[]"
        )
        backward_op.register_fake(backward_fake)

        def setup_context(ctx, inputs, output):
            a = op._args(inputs)
            outs = output if n_out > 1 else (output,)
            needs = ctx.needs_input_grad
            ctx.save_for_backward(
                *[None if i in lazy and not needs[i] else inputs[i] for i in tensors],
                *[outs[j] for j in op._saved_out],
            )
            ctx.consts = [inputs[i] for i in consts]
            ctx.triton = op._path(a)

        def backward(ctx, *grads):
            needs = [ctx.needs_input_grad[i] for i in op._diff]
            got = getattr(torch.ops.fastlora, f"{op.name}_backward")(
                *[grads[j] for j in op._diff_out], *ctx.saved_tensors, *ctx.consts, needs, ctx.triton
            )
            result = [None] * op._n
            for k, i in enumerate(op._diff):
                result[i] = got[k] if needs[k] else None
            return tuple(result)

        forward_op.register_autograd(backward, setup_context=setup_context)
