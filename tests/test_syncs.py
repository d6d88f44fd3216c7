"""No device-to-host synchronisation in any op's forward or backward.

Every op that reads a tensor's value back to the host, or that sizes its output by the data, makes the host wait
for the device: ``aten._local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``), ``aten.is_nonzero``,
``aten.equal``, the data-dependent shapes (``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave``
without its output size, indexing with a boolean mask), and ``Tensor.tolist`` / ``Tensor.numpy``
(which copy to the host without dispatching on a CPU tensor, so they are wrapped in Python for the duration).
A TorchDispatchMode records them while an op runs on the interpreter path, and on the torch path (which a GPU
takes for float32 conv2d, or when the torch backend is forced).

The dropout seed is the one value the ops may read: it is drawn from torch's CPU generator, so on a GPU its
``.item()`` reads host memory and waits for nothing. Here every tensor is on the CPU, so the mode tells a host
tensor from a "device" one by where it came from: the result of a generator draw that takes no tensor input
(``torch.randint`` of the seed) is a host tensor, and so is whatever is computed from host tensors only; every
other tensor, the op's inputs and everything derived from or allocated beside them, stands for device memory.
Reads of host tensors are not counted. The Triton interpreter copies kernel arguments to numpy by design; its
kernel calls are not part of the op's host code and are not recorded.
"""

from __future__ import annotations

import contextlib
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastlora as fl

aten = torch.ops.aten

SYNCING = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.masked_select.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}
# Indexing with a boolean mask sizes its result (or its scatter) by the mask's count: a sync on the device.
MASK_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# Generator draws that take no tensor input: their results are host values (the dropout seed).
HOST_DRAWS = {"randint", "random", "rand", "randn", "randperm"}


def _has_mask_index(args) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])


class SyncCounter(TorchDispatchMode):
    """Records every syncing op applied to a device tensor (anything not derived from host draws alone)."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self._host: dict[int, weakref.ref] = {}
        self._in_kernel = 0

    def _is_host(self, t: torch.Tensor) -> bool:
        ref = self._host.get(t.untyped_storage().data_ptr())
        return ref is not None and ref() is not None

    def _mark_host(self, t: torch.Tensor):
        self._host[t.untyped_storage().data_ptr()] = weakref.ref(t)

    def record(self, what: str, tensors):
        if not self._in_kernel and any(not self._is_host(t) for t in tensors):
            self.syncs.append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if func in SYNCING or (func in MASK_INDEXING and _has_mask_index(args)):
            self.record(str(func), inputs)
        out = func(*args, **kwargs)
        if self._in_kernel:
            return out
        outputs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        drawn = func.overloadpacket.__name__.rstrip("_") in HOST_DRAWS and not inputs
        if drawn or (inputs and all(self._is_host(t) for t in inputs)):
            for o in outputs:
                self._mark_host(o)
        return out


@contextlib.contextmanager
def counting_syncs(monkeypatch):
    """A SyncCounter active for the block, with Tensor.tolist/numpy recorded and interpreter kernels left out."""
    from triton.runtime import interpreter

    counter = SyncCounter()

    def reading(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            counter.record(f"Tensor.{name}", [self])
            return real(self, *args, **kwargs)

        return read

    real_grid_call = interpreter.GridExecutor.__call__

    def kernel_call(self, *args, **kwargs):
        counter._in_kernel += 1
        try:
            return real_grid_call(self, *args, **kwargs)
        finally:
            counter._in_kernel -= 1

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "tolist", reading("tolist"))
        m.setattr(torch.Tensor, "numpy", reading("numpy"))
        m.setattr(interpreter.GridExecutor, "__call__", kernel_call)
        with counter:
            yield counter


# ----------------------------------------------------------------------------------------------------------
# The counter itself: it must see each kind of read, and must not count the seed
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "read",
    [
        lambda t: t.sum().item(),
        lambda t: bool(t.max() > 0),
        lambda t: torch.stack(torch.aminmax(t)).tolist(),
        lambda t: t[t > 0],
        lambda t: torch.equal(t, t),
        lambda t: t.numpy(),
    ],
    ids=["item", "bool", "tolist", "mask-index", "equal", "numpy"],
)
def test_counter_sees_device_reads(read, monkeypatch):
    t = torch.randn(7, 5)
    with counting_syncs(monkeypatch) as counter:
        read(t)
    assert counter.syncs, "the counter missed a read of a device tensor"


def test_counter_ignores_host_seed(monkeypatch):
    t = torch.randn(7, 5)
    with counting_syncs(monkeypatch) as counter:
        seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
        int(seed.item()) + int(seed)
        t.mul(2.0)
    assert counter.syncs == []


# ----------------------------------------------------------------------------------------------------------
# Every op, forward and backward
# ----------------------------------------------------------------------------------------------------------


def _linear(p):
    x = torch.randn(9, 13, requires_grad=True)
    w, b = torch.randn(11, 13), torch.randn(11)
    a = torch.randn(3, 13, requires_grad=True)
    bb = torch.randn(11, 3, requires_grad=True)
    return lambda: fl.lora_linear(x, w, b, a, bb, 0.5, dropout_p=p, training=True)


def _embedding(p):
    idx = torch.randint(0, 17, (9,))
    w = torch.randn(17, 10)
    a = torch.randn(3, 17, requires_grad=True)
    b = torch.randn(10, 3, requires_grad=True)
    return lambda: fl.lora_embedding(idx, w, a, b, 0.5, padding_idx=2)


def _conv2d(p):
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    w, b = torch.randn(4, 3, 3, 3), torch.randn(4)
    a = torch.randn(2, 3, 3, 3, requires_grad=True)
    bb = torch.randn(4, 2, 1, 1, requires_grad=True)
    return lambda: fl.lora_conv2d(x, w, b, a, bb, 0.5, padding=1, dropout_p=p, training=True)


@contextlib.contextmanager
def indices_on_device(monkeypatch):
    """The embedding range checks as they run on a GPU. CPU indices are host memory: the torch path reads their
    min and max and the interpreter reads its flag directly, neither of which waits for a device, so both raise
    a ValueError before returning. On a device they queue a device-side assert instead; here CPU tensors are
    declared device memory so that the counter sees that code path."""
    from fastlora.kernels import embedding as kembedding

    from fastlora import checks

    with monkeypatch.context() as m:
        m.setattr(checks, "host_memory", lambda t: False)
        m.setattr(kembedding, "_host_memory", lambda t: False)
        try:
            yield
        finally:  # a flagged index leaves its flag cleared (on a GPU the assert ends the context): set it again
            for flag in kembedding._FLAGS.values():
                flag.fill_(1)


CASES = [
    pytest.param(_linear, 0.0, id="linear-p0"),
    pytest.param(_linear, 0.3, id="linear-p0.3"),
    pytest.param(_embedding, 0.0, id="embedding"),
    pytest.param(_conv2d, 0.0, id="conv2d-p0"),
    pytest.param(_conv2d, 0.3, id="conv2d-p0.3"),
]


BACKENDS = ["triton", "torch"]  # "triton" is the interpreter here (TRITON_INTERPRET=1, tests/conftest.py)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make, p", CASES)
def test_forward_has_no_syncs(make, p, backend, monkeypatch):
    call = make(p)
    with indices_on_device(monkeypatch), fl.use_backend(backend), counting_syncs(monkeypatch) as counter:
        y = call()
        path = fl.active_path(y.device)
    assert path == ("triton-interpreter" if backend == "triton" else "torch") and y.grad_fn is not None
    assert counter.syncs == [], f"forward synchronises with the device: {counter.syncs}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make, p", CASES)
def test_backward_has_no_syncs(make, p, backend, monkeypatch):
    call = make(p)
    dy = None
    with indices_on_device(monkeypatch), fl.use_backend(backend), counting_syncs(monkeypatch) as counter:
        y = call()  # counted too, so that the seed the forward drew is known as a host value in backward
        dy = torch.randn(y.shape)
        counter.syncs.clear()
        y.backward(dy)
    assert counter.syncs == [], f"backward synchronises with the device: {counter.syncs}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_bad_index_on_device_path_asserts(backend, monkeypatch):
    """The device code path of the range check raises (here at once: an assert on a CPU tensor is evaluated when
    queued), never a silent wrong answer; the host path's ValueError is tested in tests/test_embedding.py."""
    idx = torch.tensor([0, 3, 17, 5])
    w, a, b = torch.randn(17, 10), torch.randn(3, 17, requires_grad=True), torch.randn(10, 3, requires_grad=True)
    with indices_on_device(monkeypatch), fl.use_backend(backend):
        with pytest.raises(RuntimeError, match=r"embedding indices must be in \[0, 17\)"):
            fl.lora_embedding(idx, w, a, b, 0.5)
