"""Launch plans: a kernel call resolved once per call signature, then launched straight into the compiled kernel.

One way to launch. Every launcher in kernels/ launches through ``plans_for(kernel).launch(key, grid, **kwargs)``, never
``kernel[grid](...)``, whose per-call work a plan does once per call signature. Under the stand-in sm_90 driver
(benchmarks/host.py) one launch of the merge kernel costs 36-54 us of host time through ``kernel[grid]`` and 7-8 us
through its plan (three runs on a loaded 2-core machine); the plan falls back to ``kernel[grid]`` by itself wherever a
direct launch is not safe (the interpreter, a profiler's launch hooks, a kernel that is no JITFunction). The linear op's
hot path adds one optimisation on top, and only there: ``Replays`` records the two to four launches of a whole launcher
call and replays them (22 us against 126 us for the plans alone per forward, benchmarks/NOTES.md), which pays where
calls are many and small; a replay needs a launcher with no host or torch work between its launches; the other launchers
(mostly one or two launches per call, some with torch work between them) are not replayed.

``kernel[grid](**kwargs)`` costs the host, on every call, Triton's binder (specialisation of each argument and the
cache key), the autotuner's key and dictionaries, the grid function and the launch-metadata hooks. A
``LaunchPlans`` object does that work on the first call for a key and records the outcome (the autotuned config,
the grid, the compiled kernel and its launcher); later calls with the same key pass the arguments to the
compiled kernel's launcher directly, as torch inductor's generated launchers do. The current device is part of
every key (a compiled kernel is loaded per device).

Two ways to key: ``static=(names)`` with a caller's key that determines those arguments and the grid, or
``dynamic=(names)`` with ``key=None``: then every integer argument not named dynamic (sizes, strides, flags) is
part of the key by value, and the grid must be a function of those; the dynamic ones (a seed) and every pointer,
float and descriptor are guarded as below.

The caller's key must determine the grid and every argument it lists in ``static`` (shapes, strides, dtypes,
device, flags). Everything else (pointers, seeds, scalars and compile-time flags not listed as static) is
re-checked on each call by a guard that mirrors what Triton specialises on (16-byte alignment of pointers,
integers equal to 1, divisible by 16 or past 32 bits, constexpr values), so a call whose specialisation differs
gets its own plan and never a kernel compiled for other arguments.

The direct path needs a JITFunction, or an Autotuner over one, on a Triton whose launch returns a CompiledKernel
with ``run``, ``function`` and ``packed_metadata`` (3.x). Everywhere else (the interpreter, heuristics wrappers,
launch hooks installed by a profiler) every call takes ``kernel[grid](...)``.
"""

from __future__ import annotations

import inspect
import operator
import threading
from collections.abc import Callable, Hashable
from typing import Any

import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

try:
    from triton import knobs as _knobs
except ImportError:  # Triton before 3.4: no launch hooks to respect
    _knobs = None

__all__ = [
    "LaunchPlans",
    "LaunchPlan",
    "plans_for",
    "launch_hooks",
    "recording",
    "not_replayable",
    "Replay",
    "Replays",
    "ReplaySlot",
    "make_room",
    "signature",
    "seed_pointer",
]

_I32 = range(-(2**31), 2**31)


def seed_pointer(seed, like):
    """The dropout seed as every dropout kernel takes it: the address of one int64 that the kernel loads.

    ``seed`` is a one-element int64 tensor on ``like``'s device (what ``fastlora.ops.backend.draw_seed`` draws: on
    CUDA it is drawn on the device, so a CUDA graph replay draws a fresh one), which passes as it is; a Python int
    (tests, ``fastlora validate``) is copied to the device; None (no dropout) gives ``like``, an address the kernels
    never read."""
    if seed is None:
        return like
    if type(seed) is int:
        return torch.tensor(seed, dtype=torch.int64, device=like.device)
    if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != like.device:
        raise ValueError(
            f"a dropout seed must be one int64 on {like.device}, got {seed.dtype} of shape {tuple(seed.shape)} "
            f"on {seed.device}"
        )
    return seed


def _guard_value(v) -> Hashable:
    """What Triton's specialisation of a runtime argument depends on, cheaply: alignment for tensors, 1 / 16 / width
    for integers, the type for floats and bools (constexprs are guarded by value by the caller)."""
    t = type(v)
    if t is int:
        return (v == 1, v % 16 == 0, v in _I32)
    if t is float or t is bool or v is None:
        return t
    data_ptr = getattr(v, "data_ptr", None)
    if data_ptr is not None:
        return (data_ptr() % 16 == 0, v.dtype)
    base = getattr(v, "base", None)
    if base is not None and hasattr(v, "block_shape"):  # a host tensor descriptor
        return (base.data_ptr() % 16 == 0, base.dtype, tuple(v.block_shape))
    return v


def launch_hooks() -> bool:
    """Whether a profiler has installed launch hooks (a plain function, or in 3.6 a non-empty HookChain): then
    every call takes the normal path, so the hooks see each launch with its metadata."""
    if _knobs is None:
        return False
    hook = _knobs.runtime.launch_enter_hook
    return bool(getattr(hook, "calls", hook))


class LaunchPlan:
    """One resolved launch: the compiled kernel's launcher and handles, the grid, the arguments in order."""

    __slots__ = ("run", "function", "metadata", "grid", "names", "fixed", "pre_hook", "device", "compiled", "direct")

    def __init__(self, direct: bool, **fields):
        self.direct = direct
        for name in self.__slots__[:-1]:
            setattr(self, name, fields.get(name))


_NORMAL = LaunchPlan(direct=False)


class LaunchPlans:
    """The launch plans of one kernel, keyed by the caller's call signature.

    ``plans.launch(key, grid, **kwargs)`` launches ``kernel`` (a JITFunction or an Autotuner over one) with the
    keyword arguments; ``grid`` is a tuple or a function of the arguments (with the autotuned config), as for
    ``kernel[grid]``, and must be determined by ``key``. ``static`` names arguments that ``key`` determines too, so
    that the per-call guard can skip them. ``direct=False`` keeps every call on ``kernel[grid](...)``.
    """

    def __init__(
        self, kernel, static: tuple[str, ...] = (), direct: bool = True, dynamic: tuple[str, ...] | None = None
    ):
        self.kernel = kernel
        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        self._jit = fn if isinstance(fn, JITFunction) and direct else None
        self._static = frozenset(static)
        self._dynamic = None if dynamic is None else frozenset(dynamic)
        self._constexprs = frozenset(p.name for p in fn.params if p.is_constexpr) if self._jit else frozenset()
        self._plans: dict[Hashable, LaunchPlan] = {}
        self._guards: dict[tuple, Callable[[dict], tuple]] = {}
        self.direct_launches = 0
        self.normal_launches = 0

    def _guard(self, kwargs: dict) -> tuple:
        constexprs = self._constexprs
        dynamic = self._dynamic
        if dynamic is not None:  # the key is every argument: integers by value unless dynamic, the rest guarded
            names = tuple(kwargs)
            guard = self._guards.get(names)
            if guard is None:
                guard = self._guards[names] = self._make_guard(kwargs)
            return guard(kwargs)
        static = self._static
        return tuple((v if name in constexprs else _guard_value(v)) for name, v in kwargs.items() if name not in static)

    def _make_guard(self, kwargs: dict) -> Callable[[dict], tuple]:
        """The guard of one argument list (names in call order), generated once: integers that are not dynamic
        and constexprs by value, everything else through _guard_value. A name whose value is an integer on the
        first call is keyed by value on every call."""
        constexprs, dynamic = self._constexprs, self._dynamic
        items = []
        for name, v in kwargs.items():
            by_value = name in constexprs or (type(v) is int and name not in dynamic)
            items.append(f"kw[{name!r}]" if by_value else f"g(kw[{name!r}])")
        return eval(f"lambda kw, g=g: ({', '.join(items)},)", {"g": _guard_value})  # noqa: S307

    def launch(self, key: Hashable, grid, **kwargs: Any):
        if self._jit is None:
            self.normal_launches += 1
            return self.kernel[grid](**kwargs)
        full_key = (key, driver.active.get_current_device(), self._guard(kwargs))
        plan = self._plans.get(full_key)
        rec = _local.recording
        if rec is not None:
            rec.add(self, plan, kwargs)
        if plan is None:
            self.normal_launches += 1
            compiled = self.kernel[grid](**kwargs)
            plan = self._plans[full_key] = self._resolve(compiled, grid, kwargs)
            if rec is not None:
                rec.resolved(plan)
            return compiled
        if not plan.direct or launch_hooks():
            self.normal_launches += 1
            return self.kernel[grid](**kwargs)
        self.direct_launches += 1
        if plan.pre_hook is not None:
            plan.pre_hook({**kwargs, **plan.fixed})
        g0, g1, g2 = plan.grid
        stream = driver.active.get_current_stream(plan.device)
        plan.run(
            g0, g1, g2, stream, plan.function, plan.metadata, None, None, None, *plan.names({**plan.fixed, **kwargs})
        )
        return None

    def _resolve(self, compiled, grid, kwargs: dict) -> LaunchPlan:
        """The plan for the call just launched, or the normal path where it cannot be launched directly."""
        if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            return _NORMAL  # the interpreter (None), or a Triton whose launch returns something else
        jit = self._jit
        fixed, pre_hook = {}, None
        if isinstance(self.kernel, Autotuner):
            config = self.kernel.best_config
            fixed.update({k: v for k, v in config.all_kwargs().items() if k in jit.arg_names})
            pre_hook = config.pre_hook
        for param in jit.params:  # defaults the caller left out
            if param.name not in kwargs and param.name not in fixed and param.default is not inspect.Parameter.empty:
                fixed[param.name] = param.default
        full = {**kwargs, **fixed}
        missing = [n for n in jit.arg_names if n not in full]
        if missing:
            return _NORMAL
        resolved = grid(full) if callable(grid) else grid
        resolved = (tuple(resolved) + (1, 1))[:3]
        return LaunchPlan(
            direct=True,
            run=compiled.run,
            function=compiled.function,
            metadata=compiled.packed_metadata,
            grid=resolved,
            names=operator.itemgetter(*jit.arg_names) if len(jit.arg_names) > 1 else _one(jit.arg_names[0]),
            fixed=fixed,
            pre_hook=pre_hook,
            device=driver.active.get_current_device(),
            compiled=compiled,
        )

    def plan_for(self, key: Hashable, **kwargs) -> LaunchPlan | None:
        """The recorded plan for a call (None before its first launch): for tests and diagnostics."""
        return self._plans.get((key, driver.active.get_current_device(), self._guard(kwargs)))


def _one(name: str) -> Callable[[dict], tuple]:
    return lambda d: (d[name],)


_BY_KERNEL: dict[int, tuple[object, LaunchPlans]] = {}


def plans_for(kernel, dynamic: tuple[str, ...] = ()) -> LaunchPlans:
    """The launch plans of ``kernel`` keyed by every argument (``LaunchPlans(kernel, dynamic=dynamic)``), one per
    kernel object. Launchers look their kernel up by its module name on each call, so a kernel replaced by a
    wrapper (a launch counter in the tests, a profiler's) gets plans of its own, or the normal path."""
    entry = _BY_KERNEL.get(id(kernel))
    if entry is None or entry[0] is not kernel:
        entry = _BY_KERNEL[id(kernel)] = (kernel, LaunchPlans(kernel, dynamic=dynamic))
    return entry[1]


# ----------------------------------------------------------------------------------------------------------
# Recorded launch sequences: a whole op call replayed with new tensors
# ----------------------------------------------------------------------------------------------------------
#
# A launcher (lora_linear_fwd, ...) makes several launches per call, each costing its own argument dictionary,
# guard and descriptor construction even through a plan. For a call signature it has seen, ``recording()`` collects
# the launches of one call; ``Replay`` turns them into a function of the call's tensors (matched by data pointer)
# that makes the same launches straight into the compiled kernels, with the TMA descriptors of
# operands whose pointer it has seen before (the frozen W, the adapters) built once instead of per call. A launcher
# that does anything between its launches other than allocate the tensors it hands in (a torch op, a reduction of
# split partials) calls ``not_replayable()`` while recording, and no replay is made.


class _Recording:
    def __init__(self):
        self.launches: list[tuple[LaunchPlan | None, dict]] = []
        self.replayable = True

    def add(self, plans: LaunchPlans, plan, kwargs: dict):
        self.launches.append([plan, dict(kwargs)])
        if plans._jit is None:
            self.replayable = False

    def resolved(self, plan):
        self.launches[-1][0] = plan


class _Local(threading.local):
    recording: _Recording | None = None  # per thread: another thread's launches (DataParallel) are not this call's


_local = _Local()


class recording:
    """``with recording() as rec:`` collects the launches this thread makes inside the block (``rec.launches``)."""

    def __enter__(self) -> _Recording:
        if _local.recording is not None:
            raise RuntimeError("launch recordings do not nest")
        _local.recording = _Recording()
        return _local.recording

    def __exit__(self, *exc):
        _local.recording = None


def not_replayable():
    """Called by a launcher whose call does host or torch work between its launches: the recording is void."""
    if _local.recording is not None:
        _local.recording.replayable = False


def _raw_launcher(launcher):
    """(launch, expands) for a Triton 3.6 CUDA launcher: the driver's launch function, which takes 3.6's argument
    order (grid, stream, function, flags, scratch, metadata, hooks, then the kernel's arguments), and whether
    tensor descriptors reach it expanded (as the replay expands them itself, with a cache); None where the
    launcher has another form (another backend, a later Triton's protocol, a wrapper this code does not know).

    3.6 hands the driver's C function over as it is for a kernel without tensor descriptors, and wraps it in a
    closure that expands them otherwise: the C function is taken from that closure's cells, and nothing is read
    that a C function lacks."""
    try:
        from triton.backends.nvidia.driver import _BASE_ARGS_FORMAT_LEN, CudaLauncher
    except ImportError:
        return None
    if _BASE_ARGS_FORMAT_LEN != 13 or not isinstance(launcher, CudaLauncher):  # 3.6's 13 leading arguments
        return None
    launch = getattr(launcher, "launch", None)
    code = getattr(launch, "__code__", None)
    if code is None:  # the driver's C function itself: no descriptors to expand
        return (launch, False) if callable(launch) else None
    closure = getattr(launch, "__closure__", None)
    if not closure or getattr(launch, "__name__", None) != "inner":
        return None
    cells = dict(zip(code.co_freevars, closure, strict=True))
    if set(cells) != {"launcher", "tensordesc_indices", "tensordesc_meta"}:
        return None
    return cells["launcher"].cell_contents, True


def make_room(entries: dict, size: int) -> None:
    """Room for one more entry in ``entries``, a bounded cache of at most ``size`` entries: the oldest go first.
    Safe when threads (DataParallel replicas) insert at once: the keys are copied in one step, a pop may miss."""
    if len(entries) >= size:
        for key in list(entries)[: len(entries) - size + 1]:
            entries.pop(key, None)


def _descriptor_maker(desc):
    """A function of a tensor: a host tensor descriptor like ``desc`` (every field this Triton's class has) with
    that tensor as its base."""
    cls, fields = type(desc), dict(vars(desc))

    def make(t):
        d = object.__new__(cls)
        vars(d).update(fields)
        d.base = t
        return d

    return make


# Expanded descriptors kept per descriptor argument of a replayed launch (the oldest goes first). Layers of one
# shape share a replay, so up to this many layers' frozen operands (and, as the allocator hands the same addresses
# back step after step, their activations) stay expanded; an entry is a 128-byte tensor map and a short list.
DESCRIPTORS_KEPT = 128


def _expander(desc, meta):
    """(cache, expand): ``expand(t)`` is the launch arguments of ``desc`` with the tensor t as its base (Triton
    3.6's expansion), remembered in ``cache`` per data pointer, where a replay looks first (the replay's
    signature fixes everything else a descriptor holds: shape, strides, dtype, block shape); cache is None where
    nothing may be kept (the base tensor itself is an argument)."""
    from triton.backends.nvidia.driver import make_tensordesc_arg

    make = _descriptor_maker(desc)
    if meta is None:
        return None, lambda t: make_tensordesc_arg(make(t), None)
    cache: dict[int, list] = {}

    def expand(t):
        args = make_tensordesc_arg(make(t), meta)
        make_room(cache, DESCRIPTORS_KEPT)
        cache[t.data_ptr()] = args
        return args

    return cache, expand


class Replay:
    """The launches of one recorded call as a function ``replay(operands)``.

    ``operands`` is a tuple of the call's tensors (None allowed) in a fixed order; every tensor a recorded launch
    took must share its data pointer with exactly one operand (a view such as ``w.t()`` is passed as ``w``, whose
    pointer it has: the launcher only reads the pointer; its strides are in the recorded integers). An operand may
    also be a plain address (an int, as the driver's launcher takes for a pointer argument), standing for a view
    the caller then need not make on a replay, such as a part of a workspace; it cannot be a descriptor's base.
    ``Replay.build`` returns None when the recording cannot be replayed (a normal-path launch, a tensor that is no
    operand, two operands on one pointer, scratch memory, or an autotuning pre-hook not marked ``replay_safe``: one
    whose only effect is on the descriptor arguments, which were recorded after it ran)."""

    def __init__(self, steps):
        self._steps = steps

    @staticmethod
    def build(rec: _Recording, operands: tuple) -> Replay | None:
        """The replay of ``rec`` as a function of ``operands`` (a dropout seed is a tensor operand like the
        others), or None."""
        if not rec.replayable or not rec.launches:
            return None
        by_ptr: dict[int, int] = {}
        addresses = set()
        for i, t in enumerate(operands):
            if t is None:
                continue
            if type(t) is int:
                addresses.add(i)
            ptr = t if type(t) is int else t.data_ptr()
            if ptr in by_ptr:
                return None
            by_ptr[ptr] = i
        steps = []
        for plan, kwargs in rec.launches:
            if plan is None or not plan.direct or plan.compiled is None:
                return None
            try:
                step = _replay_step(plan, {**plan.fixed, **kwargs}, by_ptr, addresses)
            except Exception:  # a launcher or descriptor of a form this code does not know: the normal path
                step = None
            if step is None:
                return None
            steps.append(step)
        return Replay(tuple(steps))

    def __call__(self, operands: tuple):
        stream = driver.active.get_current_stream(self._steps[0][0])
        for _, fn in self._steps:
            fn(operands, stream)


def _replay_step(plan: LaunchPlan, full: dict, by_ptr: dict, addresses: set):
    """(device, fn(operands, stream)) for one recorded launch, or None. ``addresses``: the operands that are
    plain addresses."""
    compiled = plan.compiled
    meta = compiled.metadata
    launcher = compiled.run
    descs = getattr(meta, "tensordesc_meta", None) or None
    scratch = getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0)
    if scratch or (plan.pre_hook is not None and not getattr(plan.pre_hook, "replay_safe", False)):
        return None
    names = plan.names(full)
    if not isinstance(names, tuple):
        names = tuple(names)
    raw = _raw_launcher(launcher)
    if raw is not None and not raw[1] and any(hasattr(v, "block_shape") for v in names):
        raw = None  # a launch function that takes no descriptors, given some: not 3.6's form, the launcher's path
    raw = raw[0] if raw is not None else None
    consts: list = []
    items: list[str] = []
    n_desc = 0
    for v in names:
        base = getattr(v, "base", None) if hasattr(v, "block_shape") else None
        if base is not None:  # a host tensor descriptor
            i = by_ptr.get(base.data_ptr())
            if i is None or i in addresses:
                return None
            if raw is not None:
                cache, expand = _expander(v, descs[n_desc] if descs else None)
                consts += [cache, expand]
                c, e = len(consts) - 2, len(consts) - 1
                if cache is None:
                    items.append(f"*c[{e}](o[{i}])")
                else:  # a cache hit costs no Python call
                    items.append(f"*(c[{c}].get(o[{i}].data_ptr()) or c[{e}](o[{i}]))")
            else:
                consts.append(_descriptor_maker(v))
                items.append(f"c[{len(consts) - 1}](o[{i}])")
            n_desc += 1
            continue
        if hasattr(v, "data_ptr") and hasattr(v, "dtype"):
            i = by_ptr.get(v.data_ptr())
            if i is None:
                return None
            items.append(f"o[{i}]")
            continue
        consts.append(v)
        items.append(f"c[{len(consts) - 1}]")
    g0, g1, g2 = plan.grid
    function, packed = plan.function, plan.metadata
    if raw is not None:  # the driver's own argument order: grid, stream, function, flags, scratch, metadata, hooks
        call = "raw(g0, g1, g2, stream, function, coop, pdl, None, None, packed, None, None, None, {})"
    else:
        call = "run(g0, g1, g2, stream, function, packed, None, None, None, {})"
    src = f"lambda o, stream: {call.format(', '.join(items))}"
    env = dict(
        raw=raw,
        run=launcher,
        g0=g0,
        g1=g1,
        g2=g2,
        function=function,
        packed=packed,
        coop=getattr(meta, "launch_cooperative_grid", False),
        pdl=getattr(meta, "launch_pdl", False),
        c=tuple(consts),
    )
    return plan.device, eval(src, env)  # noqa: S307


def signature(*operands) -> tuple:
    """What a launcher call's launches depend on beyond its values: per tensor operand its shape, strides, dtype,
    device and 16-byte alignment (None for an absent one); other operands (numbers, flags) as they are."""
    return tuple(
        (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15) if isinstance(t, torch.Tensor) else t
        for t in operands
    )


class ReplaySlot:
    """The replay of one launcher call signature, earned over its calls: the first call runs ``call()`` (the
    launcher's normal path, which writes into the operands: it compiles, tunes and measures), the second runs it
    while recording, later calls replay the recording with their own operands (the dropout seed's tensor among
    them, read by the kernels like any other). A call that cannot be replayed (``Replay.build`` returned None)
    takes the normal path for good.

    A caller that keys its own calls (an op that has already computed its call signature for its checks) keeps a
    slot per signature and passes it to the launcher; ``Replays`` keeps them for the other callers."""

    __slots__ = ("calls", "replay")

    def __init__(self):
        self.calls = 0
        self.replay: Replay | None = None

    def __call__(self, operands: tuple, call: Callable[[], Any]):
        replay = self.replay
        if replay is not None:
            replay(operands)
            return None
        if self.calls != 1:  # the first call, or one that could not be replayed
            self.calls = min(self.calls + 1, 2)
            return call()
        self.calls = 2
        with recording() as rec:
            result = call()
        self.replay = Replay.build(rec, operands)
        return result


class Replays:
    """The replay slots of one launcher's calls, per call signature, at most ``maxsize`` of them (the oldest go
    first): variable-length batches cannot grow it without limit.

    ``replays(key, operands, call)`` runs the call through the key's ``ReplaySlot``."""

    def __init__(self, maxsize: int = 256):
        self.maxsize = maxsize
        self._entries: dict = {}

    def __len__(self) -> int:
        return len(self._entries)

    def replays(self) -> dict:
        """{key: Replay} of the keys replayed now: for tests and diagnostics."""
        return {k: v.replay for k, v in self._entries.items() if v.replay is not None}

    def clear(self) -> None:
        self._entries.clear()

    def slot(self, key) -> ReplaySlot:
        """The slot of ``key``, made on its first call (the oldest slot dropped when full)."""
        entries = self._entries
        slot = entries.get(key)
        if slot is None:
            make_room(entries, self.maxsize)
            slot = entries[key] = ReplaySlot()
        return slot

    def __call__(self, key, operands: tuple, call: Callable[[], Any]):
        return self.slot(key)(operands, call)
