"""The one benchmark harness: timing, memory, saved-for-backward bytes, accuracy gate, result rows.

Setups (linear.py, embedding.py, conv2d.py, llama.py) only describe what to build; everything measured is
measured here, the same way for every provider, in one run:

- Timing on CUDA: ``triton.testing.do_bench`` (CUDA events around each call, warm-up first, the L2 cache
  cleared before every call), median with the 20th and 80th percentiles. On CPU: ``time.perf_counter``
  around each call after warm-up, the same statistics.
- Inputs rotate over several buffers (enough to be twice the L2 cache on CUDA), drawn at random, never zero.
- Modes: "forward" (a training forward, graph recorded), "backward" (over graphs built beforehand, one per
  buffer, kept with ``retain_graph``), "forward+backward".
- Peak memory (CUDA): ``torch.cuda.max_memory_allocated`` over one call, less what was allocated before it.
- Saved for backward: every tensor autograd packs during one forward (``saved_tensors_hooks``), counted once
  per storage; ``saved_bytes`` leaves out the parameters and x itself, ``saved_bytes_total`` does not.
- Accuracy: ``fastlora.validate.check_case`` on each LoRA provider; a provider whose check fails in this run
  gets no ratios or speedups ("refused" says why).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastlora.validate import check_case

MODES = ("forward", "backward", "forward+backward")
QUANTILES = (0.5, 0.2, 0.8)


# ----------------------------------------------------------------------------------------------------------
# Settings and progress
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """How long to time each measurement (milliseconds of warm-up and of repetitions)."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 5
    max_reps: int = 1000

    def as_dict(self) -> dict:
        return {"warmup_ms": self.warmup_ms, "rep_ms": self.rep_ms, "min_reps": self.min_reps}


class Progress:
    """Timestamped progress lines on stderr: [HH:MM:SS +elapsed] [i/n] message."""

    def __init__(self, total: int = 0, stream=None, quiet: bool = False):
        self.start, self.total, self.done = time.monotonic(), total, 0
        self.stream, self.quiet = stream or sys.stderr, quiet

    def __call__(self, message: str, step: bool = False):
        if step:
            self.done += 1
        if self.quiet:
            return
        elapsed = time.monotonic() - self.start
        count = f"[{self.done}/{self.total}] " if self.total else ""
        print(
            f"[{time.strftime('%H:%M:%S', time.gmtime())} +{elapsed:6.1f}s] {count}{message}",
            file=self.stream,
            flush=True,
        )


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    median_ms: float
    q20_ms: float
    q80_ms: float
    reps: int | None


def _quantile(sorted_values, q):
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_fn(fn: Callable[[], object], device: torch.device, settings: Settings, reset=()) -> Timing:
    """Median and 20th/80th percentile time of fn() in milliseconds; ``reset`` tensors get .grad = None first."""
    reset = list(reset)
    if device.type == "cuda":
        import triton.testing

        med, q20, q80 = triton.testing.do_bench(
            fn, warmup=settings.warmup_ms, rep=settings.rep_ms, grad_to_none=reset or None, quantiles=list(QUANTILES)
        )
        return Timing(med, q20, q80, None)
    deadline = time.perf_counter() + settings.warmup_ms / 1e3
    while True:
        fn()
        if time.perf_counter() >= deadline:
            break
    samples: list[float] = []
    deadline = time.perf_counter() + settings.rep_ms / 1e3
    while len(samples) < settings.min_reps or (time.perf_counter() < deadline and len(samples) < settings.max_reps):
        for t in reset:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), len(samples))


def time_fns(fns: dict[str, Callable[[], object]], device: torch.device, settings: Settings, reset=()) -> dict:
    """{name: Timing} of several functions compared with each other. On CUDA each is timed by time_fn. On CPU the
    calls are interleaved (one call of each in turn, warm-up first, until the repetition time is spent), so that a
    load that comes and goes on a shared machine weighs on every function alike."""
    if device.type == "cuda":
        return {name: time_fn(fn, device, settings, reset) for name, fn in fns.items()}
    reset = list(reset)
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    deadline = time.perf_counter() + (settings.warmup_ms + settings.rep_ms * len(fns)) / 1e3
    while min(len(v) for v in samples.values()) < settings.min_reps or (
        time.perf_counter() < deadline and min(len(v) for v in samples.values()) < settings.max_reps
    ):
        for name, fn in fns.items():
            for t in reset:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, values in samples.items():
        values = sorted(values[1:] if len(values) > settings.min_reps else values)  # the first round warms up
        out[name] = Timing(statistics.median(values), _quantile(values, 0.2), _quantile(values, 0.8), len(values))
    return out


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes allocated at the peak of one fn() call beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return int(peak)


def rotation_count(bytes_per_set: int, device: torch.device, cap: int = 8) -> int:
    """How many input buffers to rotate over: together at least twice the L2 cache (2 on CPU), at most ``cap``."""
    if device.type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(2, min(cap, math.ceil(2 * l2 / max(bytes_per_set, 1))))


class Cycle:
    """Cycles through a list: each call returns the next item."""

    def __init__(self, items):
        self.items, self.i = list(items), -1

    def __call__(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


# ----------------------------------------------------------------------------------------------------------
# Saved-for-backward bytes
# ----------------------------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return id(t)


def saved_bytes(forward: Callable[[], object], exclude=()) -> tuple[int, int, list[tuple]]:
    """Bytes autograd saves for backward during forward(), each storage counted once.

    Returns (bytes beyond the storages of ``exclude``, bytes in all, [(shape, dtype) of the tensors beyond]).
    """
    packed: list[torch.Tensor] = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    excluded = {_storage_key(t) for t in exclude if t is not None}
    sizes: dict = {}
    extra: dict = {}
    for t in packed:
        key = _storage_key(t)
        nbytes = t.numel() * t.element_size()
        sizes[key] = max(sizes.get(key, 0), nbytes)
        if key not in excluded:
            extra[key] = max(extra.get(key, (0, None, None)), (nbytes, tuple(t.shape), str(t.dtype)))
    del out
    listing = [(shape, dtype.replace("torch.", "")) for _, shape, dtype in extra.values()]
    return sum(v[0] for v in extra.values()), sum(sizes.values()), listing


# ----------------------------------------------------------------------------------------------------------
# Providers and cases
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Provider:
    """One implementation of a layer: a module taking x, and (for LoRA providers) its A and B parameters."""

    name: str
    module: torch.nn.Module
    lora_A: torch.nn.Parameter | None = None
    lora_B: torch.nn.Parameter | None = None
    path: str = ""
    modes: tuple[str, ...] | None = None  # the modes it can run (None: all)

    @property
    def is_lora(self) -> bool:
        return self.lora_A is not None

    @torch.no_grad()
    def set_lora(self, a: torch.Tensor, b: torch.Tensor):
        self.lora_A.copy_(a.reshape(self.lora_A.shape))
        self.lora_B.copy_(b.reshape(self.lora_B.shape))

    def params(self) -> list[torch.Tensor]:
        return [p for p in (self.lora_A, self.lora_B) if p is not None]


def module_runner(provider: Provider):
    """A ``fastlora.validate`` runner over a provider's module: forward and backward once."""

    def run(x, a, b, dy):
        provider.set_lora(a, b)
        for p in provider.params():
            p.grad = None
        x = x.detach().clone().requires_grad_(x.is_floating_point())
        y = provider.module(x)
        y.backward(dy)
        grads = {"dA": provider.lora_A.grad, "dB": provider.lora_B.grad}
        grads = {k: (g.reshape(a.shape if k == "dA" else b.shape) if g is not None else None) for k, g in grads.items()}
        return {"y": y.detach(), "dx": x.grad if x.is_floating_point() else None, **grads}

    return run


@dataclass
class Case:
    """One benchmark configuration of a layer; the setup fills in how to build and count it."""

    layer: str
    shape: object  # fastlora.validate.Shape
    dtype: torch.dtype
    dropout: float
    modes: tuple[str, ...] = MODES
    providers: tuple[str, ...] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        from fastlora.validate import dtype_id

        shape = self.shape.label if self.shape is not None else "step"
        return f"{self.layer} {shape} {dtype_id(self.dtype)} p={self.dropout:g}"


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def roofline(flops: float, nbytes: float, median_ms: float, ceilings: dict | None, dtype_key: str) -> dict | None:
    """Where a measurement sits against the measured ceilings: intensity, bound, fraction of the roofline time."""
    peak = (ceilings or {}).get("matmul_tflops", {}).get(dtype_key)
    bw = (ceilings or {}).get("copy_gbps")
    if not peak or not bw or not median_ms or not nbytes:
        return None
    t_compute = flops / (peak * 1e12) * 1e3
    t_memory = nbytes / (bw * 1e9) * 1e3
    return {
        "intensity_flop_per_byte": flops / nbytes,
        "bound": "compute" if t_compute >= t_memory else "memory",
        "roofline_ms": max(t_compute, t_memory),
        "fraction_of_roofline": max(t_compute, t_memory) / median_ms,
    }


def measure_case(case: Case, setup, device: torch.device, settings: Settings, ceilings: dict | None,
                 progress: Progress, seed: int = 0, base_cache: dict | None = None) -> list[dict]:  # fmt: skip
    """Measure every provider of one case in every mode; returns result rows (see the module docstring)."""
    from fastlora.validate import OPS, dtype_id

    op = OPS[case.layer]
    t = setup.inputs(case, device, seed)
    providers = setup.providers_for(case, t, device)
    if case.providers is not None:
        providers = [p for p in providers if p.name in case.providers or p.name == "base"]
    x0, dy0 = t["x"], t["dy"]
    per_set = x0.numel() * x0.element_size() + dy0.numel() * dy0.element_size()
    count = rotation_count(per_set, device)
    sets = [(x0, dy0)] + [op.activations(case.shape, case.dtype, device, seed + 100 + i) for i in range(count - 1)]
    xs = [x.detach().requires_grad_(x.is_floating_point()) for x, _ in sets]
    dys = [dy for _, dy in sets]

    rows = []
    for prov in providers:
        row_base = {
            "layer": case.layer,
            "shape": case.shape.as_dict(),
            "shape_label": case.shape.label,
            "dtype": dtype_id(case.dtype),
            "dropout": case.dropout,
            "provider": prov.name,
            "path": prov.path,
            "rotation": count,
        }
        acc = {"rel_err": None, "accuracy_ok": None, "accuracy_note": None}
        if prov.is_lora:
            try:
                checks = check_case(op, case.shape, case.dtype, device, case.dropout, module_runner(prov), seed, t)
                acc["rel_err"] = {c["tensor"]: c["rel_err"] for c in checks}
                acc["accuracy_ok"] = all(c["ok"] for c in checks)
                bad = [
                    f"{c['tensor']} {c['rel_err']:.2e} > {c['tol']:.1e} {c['note']}".strip()
                    for c in checks
                    if not c["ok"]
                ]
                acc["accuracy_note"] = "; ".join(bad) or None
            except Exception as exc:  # a provider that crashes is reported, not fatal to the run
                acc.update(accuracy_ok=False, accuracy_note=f"{type(exc).__name__}: {exc}")
            prov.set_lora(t["lora_A"], t["lora_B"])
        try:
            extra, total, listing = saved_bytes(lambda p=prov: p.module(xs[0]), [xs[0], *prov.module.parameters()])
            saved = {"saved_bytes": extra, "saved_bytes_total": total, "saved_tensors": listing}
        except Exception as exc:
            saved = {"saved_bytes": None, "saved_bytes_total": None, "saved_tensors": f"{type(exc).__name__}: {exc}"}
        for mode in case.modes:
            if prov.modes is not None and mode not in prov.modes:
                continue
            row = {**row_base, "mode": mode, **acc, **saved}
            # The bare layer does not depend on the rank or the dropout: measured once per shape and mode.
            key = (case.layer, tuple(d for d in case.shape.dims if d[0] != "r"), case.dtype, mode)
            cached = base_cache.get(key) if base_cache is not None and prov.name == "base" else None
            if cached is not None:
                row.update(cached, error=None, reused=True)
            else:
                progress(f"{case.label} {prov.name} {mode}")
                try:
                    row.update(_measure_mode(prov, mode, xs, dys, device, settings))
                except Exception as exc:
                    row.update(median_ms=None, error=f"{type(exc).__name__}: {exc}")
                if base_cache is not None and prov.name == "base" and row.get("median_ms"):
                    base_cache[key] = {
                        k: row[k] for k in ("median_ms", "q20_ms", "q80_ms", "reps", "peak_memory_bytes")
                    }
            flops = setup.flops(case, mode, prov.is_lora)
            nbytes = setup.bytes_moved(case, mode, prov.is_lora)
            med = row.get("median_ms")
            row.update(
                flops=flops,
                bytes=nbytes,
                tflops=flops / (med * 1e9) if med else None,
                gbps=nbytes / (med * 1e6) if med else None,
                roofline=roofline(flops, nbytes, med, ceilings, row["dtype"]) if med else None,
            )
            rows.append(row)
        for p in prov.params():
            p.grad = None
    add_ratios(rows)
    return rows


def _measure_mode(prov: Provider, mode: str, xs, dys, device, settings) -> dict:
    nxt = Cycle(range(len(xs)))
    reset = [x for x in xs if x.is_floating_point()] + prov.params()
    if mode == "forward":

        def fn():
            return prov.module(xs[nxt()])

        single = lambda: prov.module(xs[0])  # noqa: E731
    elif mode == "backward":
        outs = [prov.module(x) for x in xs]

        def fn():
            i = nxt()
            outs[i].backward(dys[i], retain_graph=True)

        def single():
            outs[0].backward(dys[0], retain_graph=True)

    elif mode == "forward+backward":

        def fn():
            i = nxt()
            prov.module(xs[i]).backward(dys[i])

        def single():
            prov.module(xs[0]).backward(dys[0])

    else:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    timing = time_fn(fn, device, settings, reset)
    for r in reset:
        r.grad = None
    mem = peak_memory(single, device)
    for r in reset:
        r.grad = None
    return {"median_ms": timing.median_ms, "q20_ms": timing.q20_ms, "q80_ms": timing.q80_ms, "reps": timing.reps,
            "peak_memory_bytes": mem, "error": None}  # fmt: skip


def add_ratios(rows: list[dict]):
    """Ratios to the bare layer and to the PEFT-style reference, within one case and mode; refused where the
    provider (or the PEFT-style reference it is compared with) failed its accuracy check in this run."""
    by_mode: dict = {}
    for r in rows:
        by_mode.setdefault(r["mode"], {})[r["provider"]] = r
    for group in by_mode.values():
        base, ref = group.get("base"), group.get("peft_style")
        for r in group.values():
            r.setdefault("refused", None)
            if r["accuracy_ok"] is False:
                r["refused"] = f"accuracy check failed in this run: {r['accuracy_note']}"
            elif ref is not None and ref["accuracy_ok"] is False and r is not ref:
                r["refused"] = "the PEFT-style reference failed its accuracy check in this run"
            ok = r["refused"] is None and r.get("median_ms")
            r["ratio_to_base"] = ratio(r["median_ms"], base and base.get("median_ms")) if ok else None
            r["ratio_to_peft_style"] = ratio(r["median_ms"], ref and ref.get("median_ms")) if ok else None
            r["speedup_vs_peft_style"] = ratio(1.0, r["ratio_to_peft_style"])


# ----------------------------------------------------------------------------------------------------------
# Ceilings
# ----------------------------------------------------------------------------------------------------------


def measure_ceilings(
    device: torch.device, dtypes, settings: Settings, progress: Progress, size: int | None = None
) -> dict:
    """The two ceilings, measured once: a large square matmul per dtype (TFLOP/s) and a large copy (GB/s)."""
    n = size or (8192 if device.type == "cuda" else 512)
    from fastlora.validate import dtype_id

    out = {"matmul_size": n, "matmul_tflops": {}}
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype in dtypes:
        progress(f"ceiling: {n}x{n}x{n} matmul {dtype_id(dtype)}")
        a = torch.randn(n, n, generator=gen, device=device).to(dtype)
        b = torch.randn(n, n, generator=gen, device=device).to(dtype)
        timing = time_fn(lambda a=a, b=b: a @ b, device, settings)
        out["matmul_tflops"][dtype_id(dtype)] = 2 * n**3 / (timing.median_ms * 1e9)
        del a, b
    nbytes = 2**30 if device.type == "cuda" else 2**26
    progress(f"ceiling: copy of {nbytes / 2**20:.0f} MiB")
    src = torch.randn(nbytes // 4, generator=gen, device=device)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, settings)
    out["copy_bytes"] = nbytes
    out["copy_gbps"] = 2 * nbytes / (timing.median_ms * 1e6)  # read + write
    return out
