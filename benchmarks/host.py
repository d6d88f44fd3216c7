"""Host (CPU-side) cost per call of every op, side by side with PEFT's LoRA layers and the bare frozen module.

``python -m benchmarks.host`` (or ``fastlora bench --host``): median microseconds per call of a training forward
and of forward+backward, on tiny tensors whose compute is negligible, so what is timed is the Python, autograd and
launch work each call does on the host. The providers of one op are timed in alternating batches, so that load
from other processes on a shared machine falls on all of them alike: read the ratios.

Without a GPU, fastlora's Triton path runs against a stand-in Triton driver (``stand_in_gpu``): its target is
sm_90 (GPUTarget("cuda", 90, 32)), so every kernel compiles for real on the CPU with the wheel's ptxas, and its
launcher is Triton's own CUDA launcher whose final launch function (the driver's C function on a GPU) is a
C-like callable that does nothing (``DriverLaunch``: no ``__code__``, no ``__closure__``, wrapped for
tensor-descriptor kernels exactly as the installed Triton wraps the real one). fastlora takes its GPU branches
there: dropout seeds drawn on the tensors' device, index checks queued as device-side asserts. The torch
providers (base, PEFT, fastlora's torch path) run on the CPU in float32, their fastest dtype at these shapes (a
tiny float32 matmul costs a few microseconds, the nearest stand-in for a GPU's asynchronous launch; a bfloat16
one costs real compute). What the stand-in timing includes and leaves out:

- included: fastlora's validation, autocast handling, autograd.Function and layer code, allocation of outputs and
  workspaces (on the CPU allocator, not the CUDA caching allocator), grid and config arithmetic, the autotuner's
  lookup, Triton's binder (specialisation, cache key), tensor descriptor (TMA) construction and expansion, scratch
  allocation, the launcher's Python part, and the torch ops fastlora runs between launches (memsets, casts, seed
  draws, asserts) at CPU cost for tiny tensors;
- left out: the driver's C launch function (argument unpacking, ``cuLaunchKernelEx``), CUDA stream and device
  queries (the stand-in answers them with constants), and device-to-host synchronisation.

Autotuning under the stand-in times nothing (the kernels cannot run): its benchmarker reports the same time for
every config, so the autotuner keeps the first config left after pruning, deterministically, and only that one
is compiled. Measured dispatch (conv2d's fused kernel against torch's convolution plus the LoRA kernel) sees a
tie too, and takes the path a tie gives (for conv2d: the split path). The first call of each op (compilation)
is warm-up and never timed.

With CUDA available the same command times the real thing: the same tiny shapes, calls queued back to back and
one synchronisation per batch, so the figure is the host cost whenever the host is the bottleneck.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

# ----------------------------------------------------------------------------------------------------------
# The stand-in driver
# ----------------------------------------------------------------------------------------------------------

# What an H100/H200 reports: the shared memory and thread limits Triton checks kernels against at load time.
SM90_PROPERTIES = {
    "max_shared_mem": 232448,
    "max_num_regs": 65536,
    "multiprocessor_count": 132,
    "warpSize": 32,
    "sm_clock_rate": 1980000,
    "mem_clock_rate": 2619000,
    "mem_bus_width": 5120,
}
MAX_THREADS_PER_BLOCK = 1024


class DriverLaunch:
    """The stand-in for the driver's launch function (the C function ``launch`` of the module Triton's CUDA
    launcher compiles, or of the driver's utils from Triton 3.7 on): a callable object with neither
    ``__code__`` nor ``__closure__``, as a builtin has neither, so that code inspecting Python functions meets
    here what it meets on a GPU. It launches nothing: each call counts one launch and hands its arguments (in
    this Triton's protocol) to ``sink`` when one is set."""

    __slots__ = ("launches", "sink")

    def __init__(self):
        self.launches = 0
        self.sink = None

    def __call__(self, *args):
        self.launches += 1
        if self.sink is not None:
            self.sink(args)


DRIVER_LAUNCH = DriverLaunch()


class _StandInUtils:
    """The driver utilities Triton calls when it loads a kernel and builds TMA descriptors, answered on the host."""

    def get_device_properties(self, device):
        return dict(SM90_PROPERTIES)

    def load_binary(self, name, kernel, shared, device):
        """(module, function, registers, spills, max threads): no module is loaded, the handles are zero."""
        return 0, 0, 0, 0, MAX_THREADS_PER_BLOCK

    def fill_tma_descriptor(self, ptr, swizzle, elem_size, elem_type, block_size, shape, strides, padding):
        """The host-side tensor map is 128 opaque bytes; the stand-in makes a buffer of that size."""
        return bytearray(128)

    def fill_tma_descriptor_tiled(self, *args):
        """Triton >= 3.7's name for fill_tma_descriptor (tiled, as opposed to im2col, tensor maps)."""
        return self.fill_tma_descriptor(*args)

    def cuOccupancyMaxActiveClusters(self, *args):
        return 1

    def set_printf_fifo_size(self, size):
        return None

    launch = DRIVER_LAUNCH  # Triton >= 3.7's launch function (3.6 compiles one per kernel)

    def build_signature_metadata(self, kernel_signature):
        """Triton >= 3.7: the kernel's flat argument types, which the C launch function reads arguments by."""
        return tuple(kernel_signature)


class _KernelArg:
    """Triton >= 3.7's argument annotation (a C type of the driver's utils module): kept as given."""

    __slots__ = ("nested_tuple", "type")

    def __init__(self, nested_tuple, type):
        self.nested_tuple, self.type = nested_tuple, type


@contextlib.contextmanager
def _launcher_module_stand_in():
    """What Triton's CUDA launcher builds in C, for the block: Triton 3.6 compiles a module (linked to libcuda) per
    kernel argument list and keeps its ``launch``, here DRIVER_LAUNCH; later releases take the launch function
    from the driver's utils (``_StandInUtils.launch``) and annotate the arguments with the utils module's types,
    here plain objects."""
    from triton.backends.nvidia import driver as nvidia_driver

    stand_ins = {}
    if hasattr(nvidia_driver, "compile_module_from_src"):
        stand_ins["compile_module_from_src"] = lambda *args, **kwargs: SimpleNamespace(launch=DRIVER_LAUNCH)
        stand_ins["library_dirs"] = lambda: []  # where libcuda is: nothing links here
    if getattr(nvidia_driver, "PyKernelArg", 0) is None:  # the utils module that sets these was never built
        stand_ins.update(PyKernelArg=_KernelArg, ARG_CONSTEXPR=0, ARG_KERNEL=1, ARG_TUPLE=2)
    originals = {name: getattr(nvidia_driver, name) for name in stand_ins}
    for name, value in stand_ins.items():
        setattr(nvidia_driver, name, value)
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(nvidia_driver, name, value)


def _launcher_class():
    """Triton's own CUDA launcher with the stand-in launch function: everything Triton does on the host for a
    launch (scratch allocation, the tensor-descriptor expansion wrapped around the launch function exactly as
    this Triton wraps it) runs as on a GPU, up to the driver call."""
    from triton.backends.nvidia.driver import CudaLauncher

    class StandInLauncher(CudaLauncher):
        def __init__(self, src, metadata):
            with _launcher_module_stand_in():
                super().__init__(src, metadata)

    return StandInLauncher


def _same_time_for_every_config(kernel_call, quantiles=None, **kwargs):
    """The stand-in benchmarker: nothing runs, every config ties, and the autotuner keeps the first one."""
    return [0.0, 0.0, 0.0] if quantiles is not None else 0.0


def _make_driver():
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StandInDriver(DriverBase):
        """An sm_90 device 0 with a null stream, whose launcher does not launch."""

        target = GPUTarget("cuda", 90, 32)

        def __init__(self):
            super().__init__()
            self.utils = _StandInUtils()
            self.launcher_cls = _launcher_class()

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            from triton.backends.nvidia.driver import ty_to_cpp

            return ty_to_cpp(ty)

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            return None

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=None):
            return (9, 0)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cpu

        def get_benchmarker(self):
            return _same_time_for_every_config

        def get_empty_cache_for_benchmark(self):
            return torch.empty(0, dtype=torch.int32)

        def clear_cache(self, cache):
            return None

        def allocate_default_profile_scratch(self, size, align, stream):
            return torch.empty(size, dtype=torch.int8)

    return StandInDriver()


def _interpreting() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


@contextlib.contextmanager
def stand_in_driver():
    """Triton's active driver is the stand-in for the block: kernels compile for sm_90 and launch nothing, and
    ``triton.testing.do_bench`` (which fastlora's measured dispatch calls) reports the same time for everything."""
    import triton.testing
    from triton.runtime.driver import driver

    previous = driver._active  # the real default cannot be created on a machine without a GPU, so no reset_active
    previous_bench = triton.testing.do_bench
    driver.set_active(_make_driver())
    triton.testing.do_bench = _same_time_for_every_config
    try:
        yield
    finally:
        driver._active = previous
        triton.testing.do_bench = previous_bench


def _fastlora_modules():
    return [m for name, m in list(sys.modules.items()) if name == "fastlora" or name.startswith("fastlora.")]


@contextlib.contextmanager
def _replaced_everywhere(original: Callable, replacement: Callable):
    """``original`` replaced by ``replacement`` under every name any fastlora module holds it by."""
    patched = []
    for module in _fastlora_modules():
        for name, value in list(vars(module).items()):
            if value is original:
                setattr(module, name, replacement)
                patched.append((module, name))
    try:
        yield
    finally:
        for module, name in patched:
            setattr(module, name, original)


@contextlib.contextmanager
def stand_in_gpu():
    """fastlora's Triton path for CPU tensors, compiled for sm_90 and launched into the stand-in driver.

    Besides the driver, four facts fastlora asks about the device are answered as an H100/H200 would for CPU
    tensors: the path (``active_path``: "triton" unless the torch backend is forced, so dropout seeds are drawn on
    the tensors' device as on a GPU), the compute capability (9), the number of SMs (132) and whether a tensor is
    host memory (no: index checks queue device-side asserts, as on a GPU). Nothing else in fastlora changes, so
    the timed work is the GPU path's."""
    from fastlora.kernels import configs
    from fastlora.kernels import embedding as kernels_embedding

    import fastlora
    from fastlora import checks

    if _interpreting():
        raise RuntimeError("fastlora's kernels are interpreted in this process: run without TRITON_INTERPRET=1")
    active_path, get_backend = fastlora.active_path, fastlora.get_backend
    capability, num_sms = configs.capability, configs.num_sms

    def stand_in_path(device):
        if torch.device(device).type == "cpu" and get_backend() != "torch":
            return "triton"
        return active_path(device)

    def stand_in_capability(device):
        return 9 if device.type == "cpu" else capability(device)

    def stand_in_num_sms(device):
        return SM90_PROPERTIES["multiprocessor_count"] if device.type == "cpu" else num_sms(device)

    with contextlib.ExitStack() as stack:
        stack.enter_context(stand_in_driver())
        stack.enter_context(_replaced_everywhere(active_path, stand_in_path))
        stack.enter_context(_replaced_everywhere(capability, stand_in_capability))
        stack.enter_context(_replaced_everywhere(num_sms, stand_in_num_sms))
        for host_memory in (checks.host_memory, kernels_embedding._host_memory):  # device memory: no host reads
            stack.enter_context(_replaced_everywhere(host_memory, lambda t: False))
        yield


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------


def time_interleaved(fns: dict, device: torch.device, calls: int = 50, batches: int = 15) -> dict:
    """Per name, the median over ``batches`` of the wall time of ``calls`` back-to-back calls of its function, per
    call, in microseconds. ``fns`` maps a name to (fn, context): the function and a factory of the context its
    calls run in (the stand-in driver, a forced backend), entered around each batch, outside the timed region.

    The batches alternate between the names (one batch of each, then the next round), so a change of load on a
    shared machine falls on every name alike and the ratios between them hold. On CUDA each batch ends with one
    synchronisation, so queued calls cost the host time they took to queue."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn, context in fns.values():
        with context():
            for _ in range(3):
                fn()
            sync()
    per_call: dict = {name: [] for name in fns}
    for _ in range(batches):
        for name, (fn, context) in fns.items():
            with context():
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                sync()
                per_call[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(times) for name, times in per_call.items()}


# ----------------------------------------------------------------------------------------------------------
# Cases: one tiny layer per op, each built for every provider
# ----------------------------------------------------------------------------------------------------------

RANK, ALPHA = 8, 16
DTYPE = torch.bfloat16
# On the CPU the torch providers run at their fastest dtype for these tiny shapes: a float32 matmul of a few
# thousand elements costs a few microseconds (the nearest stand-in for a GPU's asynchronous launch), where a
# bfloat16 one costs real compute that fastlora's stand-in kernels never pay.
CPU_TORCH_DTYPE = torch.float32


def provider_dtype(provider: str, device: torch.device) -> torch.dtype:
    """The dtype a provider is timed in: DTYPE on a GPU and for fastlora's stand-in kernels, CPU_TORCH_DTYPE for
    the torch providers on the CPU."""
    return DTYPE if device.type == "cuda" or provider == "fastlora" else CPU_TORCH_DTYPE


@dataclass
class Case:
    name: str
    make_base: Callable[[torch.device, torch.dtype], nn.Module]
    make_input: Callable[[torch.device, torch.dtype], torch.Tensor]
    fastlora_cls: str
    dropout: float = 0.0


def _linear(device, dtype):
    return nn.Linear(64, 48, bias=True, device=device, dtype=dtype)


def _embedding(device, dtype):
    return nn.Embedding(96, 64, device=device, dtype=dtype)


def _conv2d(device, dtype):
    return nn.Conv2d(8, 16, 3, padding=1, bias=True, device=device, dtype=dtype)


def _rows(device, dtype):
    return torch.randn(16, 64, device=device, dtype=dtype)


CASES = [
    Case("linear", _linear, _rows, "LoRALinear"),
    Case("linear dropout=0.1", _linear, _rows, "LoRALinear", 0.1),
    Case("embedding", _embedding, lambda d, dtype: torch.randint(0, 96, (16,), device=d), "LoRAEmbedding"),
    Case("conv2d", _conv2d, lambda d, dtype: torch.randn(2, 8, 6, 6, device=d, dtype=dtype), "LoRAConv2d"),
]

PROVIDERS = ("base", "peft", "fastlora_torch", "fastlora")


def _layer(case: Case, provider: str, device, dtype) -> nn.Module:
    from fastlora.benchmarks.providers import peft_layer

    import fastlora

    torch.manual_seed(0)
    base = case.make_base(device, dtype).requires_grad_(False)
    if provider == "base":
        return base
    if provider == "peft":
        return peft_layer(base, RANK, ALPHA, case.dropout)
    kwargs = {} if case.fastlora_cls == "LoRAEmbedding" else {"dropout": case.dropout}
    layer = getattr(fastlora, case.fastlora_cls).from_module(base, r=RANK, alpha=ALPHA, **kwargs)
    with torch.no_grad():  # a trained adapter: B nonzero, as after the first optimiser step
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_()
    return layer


def _calls(layer: nn.Module, x: torch.Tensor):
    """(forward, forward+backward) closures; the second is None when nothing needs a gradient (a frozen embedding)."""
    y = layer(x)
    grad_out = torch.randn(y.shape, dtype=y.dtype, device=y.device)

    def forward():
        return layer(x)

    def forward_backward():
        layer(x).backward(grad_out)

    return forward, (forward_backward if y.requires_grad else None)


def _context(provider: str, device: torch.device) -> Callable:
    """A factory of the context a provider's calls run in."""
    import fastlora

    if provider == "fastlora_torch":
        return lambda: fastlora.use_backend("torch")
    if provider == "fastlora" and device.type == "cpu":
        return stand_in_gpu
    return contextlib.nullcontext


def measure(device: torch.device, calls: int = 50, batches: int = 15, progress=None) -> list[dict]:
    """One row per (op, provider): median host us per call of forward and forward+backward, the providers of an
    op timed in alternating batches (``time_interleaved``)."""
    rows = []
    for case in CASES:
        forwards, backwards, case_rows = {}, {}, []
        for provider in PROVIDERS:
            context = _context(provider, device)
            dtype = provider_dtype(provider, device)
            with context():
                layer = _layer(case, provider, device, dtype)
                if layer is None:  # PEFT not installed
                    continue
                layer.train()
                x = case.make_input(device, dtype)
                if x.is_floating_point():
                    x.requires_grad_(True)
                forward, forward_backward = _calls(layer, x)
            forwards[provider] = (forward, context)
            if forward_backward is not None:
                backwards[provider] = (forward_backward, context)
            path = "torch"
            if provider == "fastlora":
                path = "triton (stand-in driver, sm_90)" if device.type == "cpu" else "triton"
            case_rows.append({"op": case.name, "provider": provider, "dtype": str(dtype).removeprefix("torch."),
                              "path": path})  # fmt: skip
        forward_us = time_interleaved(forwards, device, calls, batches)
        forward_backward_us = time_interleaved(backwards, device, calls, batches) if backwards else {}
        for row in case_rows:
            row["forward_us"] = forward_us[row["provider"]]
            row["forward_backward_us"] = forward_backward_us.get(row["provider"])
            rows.append(row)
            if progress:
                progress(row)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table: per op, each provider's forward and forward+backward us, and the ratio to PEFT."""
    peft = {r["op"]: r for r in rows if r["provider"] == "peft"}
    lines = [
        "| op | provider | forward us | fwd+bwd us | forward / PEFT | fwd+bwd / PEFT |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]

    def us(v):
        return "-" if v is None else f"{v:.1f}"

    def ratio(v, ref):
        return "-" if v is None or not ref else f"{v / ref:.2f}"

    for r in rows:
        ref = peft.get(r["op"], {})
        fwd, fb = r["forward_us"], r["forward_backward_us"]
        lines.append(
            f"| {r['op']} | {r['provider']} | {us(fwd)} | {us(fb)} | {ratio(fwd, ref.get('forward_us'))} | "
            f"{ratio(fb, ref.get('forward_backward_us'))} |"
        )
    return "\n".join(lines)


def conditions(device: torch.device) -> dict:
    import triton

    import fastlora

    out = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fastlora": fastlora.__version__,
        "dtype": str(DTYPE).replace("torch.", ""),
        "cpu_torch_dtype": None if device.type == "cuda" else str(CPU_TORCH_DTYPE).replace("torch.", ""),
        "rank": RANK,
        "threads": torch.get_num_threads(),
    }
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        out["peft"] = None
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    else:
        out["timing"] = __doc__.split("\n\n")[2] + "\n\n" + __doc__.split("\n\n")[3]
    try:
        import subprocess

        out["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        out["commit"] = None
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", type=Path, help="JSON result file, or a folder to write one into")
    parser.add_argument("--calls", type=int, default=50, help="calls per timed batch")
    parser.add_argument("--batches", type=int, default=15, help="timed batches (the median is reported)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(1)  # tiny tensors: a thread pool only adds wake-up latency to what is timed
    if device.type == "cpu" and _interpreting():
        raise SystemExit("benchmarks.host: unset TRITON_INTERPRET; the stand-in driver times compiled kernels")

    def progress(row):
        fb = row["forward_backward_us"]
        print(f"  {row['op']:<20} {row['provider']:<15} {row['forward_us']:8.1f} {fb or float('nan'):8.1f}",
              file=sys.stderr)  # fmt: skip

    rows = measure(device, args.calls, args.batches, progress)
    cond = conditions(device)
    print(
        f"host us per call, median of {args.batches} batches of {args.calls} calls; {cond['device']}, "
        f"{cond['dtype']}, r={RANK}, torch {cond['torch']}, triton {cond['triton']}, peft {cond['peft']}"
    )
    if device.type == "cpu":
        print(
            f"fastlora rows: the Triton path in {cond['dtype']} against the stand-in sm_90 driver (kernels compiled, "
            f"launched into a C-like launch function that does nothing); base, peft and fastlora_torch rows: torch "
            f"on the CPU in {cond['cpu_torch_dtype']}, their fastest dtype at these shapes."
        )
        print(cond["timing"])
    print(table(rows))
    if args.out:
        if args.out.suffix != ".json":  # a folder, as `fastlora bench --out` takes
            args.out = args.out / f"host-{device.type}-{cond['time'].replace(':', '')}.json"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"conditions": cond, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
