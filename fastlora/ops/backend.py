"""Which path a call takes, and the small helpers every op shares (autocast, dropout seeds and masks).

Paths: CUDA tensors run the Triton kernels in ``fastlora.kernels``; CPU tensors run a torch path with the same
math and the same saved-tensor profile; with ``TRITON_INTERPRET=1`` set before fastlora is imported, CPU tensors
run the Triton kernels under the interpreter (that is how the test suite reaches them). ``use_backend("torch")``
forces the torch path for a block of code.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

try:
    from fastlora.kernels.configs import INTERPRET

    HAS_TRITON = True
except ImportError:  # no Triton on this platform: the torch path serves every call
    INTERPRET = False
    HAS_TRITON = False

__all__ = [
    "BACKENDS",
    "get_backend",
    "use_backend",
    "active_path",
    "use_triton",
    "autocast_enabled",
    "autocast_dtype_for",
    "autocast_inputs",
    "no_autocast",
    "draw_seed",
    "host_seed",
    "dropout_keep",
    "as_rows",
]

BACKENDS = ("auto", "triton", "torch")
_backend = os.environ.get("FASTLORA_BACKEND", "auto")


def get_backend() -> str:
    """The backend setting: "auto" (CUDA -> Triton, CPU -> torch), "triton" or "torch"."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend for the calls made inside the block: "auto", "triton" or "torch"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def active_path(device: torch.device | str) -> str:
    """Which path a call on this device takes now: "triton", "triton-interpreter" or "torch"."""
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must be a torch.device or a string such as 'cuda:0', got {device!r}") from err
    except TypeError as err:
        raise TypeError(f"device must be a torch.device or a string, got {type(device).__name__}") from err
    if device.type == "meta":  # shape inference only: the torch path's ops all have meta kernels
        return "torch"
    if _backend == "torch" or not HAS_TRITON:
        if _backend == "triton":
            raise RuntimeError("the triton backend was requested but Triton is not installed")
        return "torch"
    if device.type == "cuda":
        return "triton-interpreter" if INTERPRET else "triton"
    if INTERPRET:
        return "triton-interpreter"
    if _backend == "triton":
        raise RuntimeError("the triton backend on CPU tensors needs TRITON_INTERPRET=1 set before importing fastlora")
    return "torch"


def use_triton(t: torch.Tensor) -> bool:
    """Whether a call on t's device runs the Triton kernels (natively or under the interpreter)."""
    device = t.device
    if _backend == "auto" and HAS_TRITON and device.type == "cuda":  # the common case, decided without a call
        return True
    return active_path(device) != "torch"


def autocast_enabled(device_type: str) -> bool:
    """Whether torch.autocast is on for this device type (never on a device without autocast, such as meta)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


# One call that answers "is autocast on for any device": torch's own modules (nn.RNN) ask it so.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def autocast_dtype_for(x) -> torch.dtype | None:
    """The dtype torch.autocast casts a call on x to, or None when autocast is off for x's device (or x is no
    tensor)."""
    if not _any_autocast() or not isinstance(x, torch.Tensor):
        return None
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if autocast_enabled(device_type) else None


def autocast_inputs(x, *tensors):
    """Cast x and the frozen base tensors to the autocast dtype when autocast is on for x's device."""
    device_type = x.device.type
    if not autocast_enabled(device_type):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, *tensors))


def no_autocast(device_type: str):
    """Autocast off around an op that has cast its own inputs; a device without autocast (meta) needs nothing."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


SEED_RANGE = (-(2**63), 2**63 - 1)  # torch.randint's bounds (high exclusive): nearly every int64


def draw_seed(x: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """A dropout seed for a call on x: one int64 (over the full 64-bit range) in a 0-d tensor, never read on the
    host by the kernels; with ``count``, that many seeds in one tensor [count], drawn at once (one launch).

    When the call runs the Triton kernels on a device (compiled, or interpreted on CUDA tensors, as a compiled
    graph traced with fake CUDA tensors sees it), the seed is drawn on x's device (on CUDA by torch's CUDA
    generator) and the kernels load it from there: no host sync, and a CUDA graph that captured the step draws a
    fresh seed at every replay (torch's generator advances its offset per replay, as for its own dropout).
    Elsewhere it comes from torch's default CPU generator (the torch path seeds a ``torch.Generator`` with it; the
    interpreter's kernels on CPU tensors read it from host memory). Either way ``torch.manual_seed`` fixes it,
    and a checkpointed forward, whose recomputation restores the RNG states of its inputs' devices, draws the
    same seed again: the mask backward regenerates is the forward's. The torch path on CUDA seeds its generator
    from the host, so a CUDA graph would replay one mask: capturing that is refused with a clear error."""
    shape = () if count is None else (count,)
    path = active_path(x.device)
    if path == "triton" or (path == "triton-interpreter" and x.device.type == "cuda"):
        return torch.randint(*SEED_RANGE, shape, dtype=torch.int64, device=x.device)
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "fastlora's torch path cannot draw dropout masks inside a CUDA graph: the graph would replay one mask at "
            "every step. Use the Triton kernels (the default on CUDA), capture with dropout 0 (or in eval mode), or "
            "run the step without graph capture."
        )
    return torch.randint(*SEED_RANGE, shape, dtype=torch.int64)


def host_seed(seed) -> int:
    """The torch path's seed as an int: a seed tensor from draw_seed for a torch-path call lives on the CPU (no
    sync); an int passes."""
    return seed if type(seed) is int else int(seed)


def dropout_keep(seed, shape, p: float, device) -> torch.Tensor:
    """The torch path's dropout keep-mask for a seed: a pure function of (seed, shape, p)."""
    if torch.device(device).type == "meta" or math.prod(shape) == 0:  # nothing to draw (meta: no generator)
        return torch.empty(shape, dtype=torch.bool, device=device)
    gen = torch.Generator(device=device).manual_seed(host_seed(seed))
    return torch.rand(shape, generator=gen, device=device) >= p


def dropout_scale(seed, x: torch.Tensor, p: float) -> torch.Tensor:
    """The torch path's dropout multiplier for x: the keep-mask as x's dtype, times 1/(1-p).

    The same values as ``dropout_keep(...).to(x.dtype) / (1 - p)``, formed in place in the one float32 buffer the
    uniform draw fills (no bool mask, no cast copy): the mask is drawn twice per step (forward and backward)."""
    if torch.device(x.device).type == "meta" or x.numel() == 0:  # nothing to draw (and no seed read on the host)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    gen = torch.Generator(device=x.device).manual_seed(host_seed(seed))
    scale = torch.rand(x.shape, generator=gen, device=x.device).ge_(p).mul_(1.0 / (1.0 - p))
    return scale if x.dtype == torch.float32 else scale.to(x.dtype)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., C] as [prod(...), C] (t itself when 2-D); unlike reshape(-1, C) this also works when C is 0."""
    if t.dim() == 2:
        return t
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
