"""Measured dispatch: per shape, the faster of the fused GEMM and "cuBLAS plus an r-wide update", found once.

The first CUDA call for a shape key times every candidate path side by side (CUDA events, a warm-up run
then the median of a few runs) and keeps the fastest. Decisions are cached per device in memory and in a
JSON file under the user's cache folder ($XDG_CACHE_HOME/fastlora/dispatch.json, else
~/.cache/fastlora/dispatch.json; $FASTLORA_CACHE_DIR overrides the folder), so a later process skips the
timing. Every later call is a dictionary lookup: no device synchronisation.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
from collections.abc import Callable

import torch

__all__ = ["shape_key", "choose", "decisions", "decisions_file", "Dispatcher", "cache_path"]

REPEATS = 5


def cache_path() -> str:
    """The JSON file holding the decisions of every device this user's processes have measured."""
    folder = os.environ.get("FASTLORA_CACHE_DIR")
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "fastlora")
    return os.path.join(folder, "dispatch.json")


def shape_key(kind: str, *, M: int, N: int, K: int, R: int, dtype: torch.dtype, dropout: bool) -> str:
    """The decision key: the GEMM kind ("fwd" or "dx"), its sizes (M to the next power of two), dtype and
    whether dropout masks the LoRA term."""
    m_bucket = 1 << max(0, int(M) - 1).bit_length()
    return f"{kind}:M{m_bucket}:N{N}:K{K}:r{R}:{str(dtype).removeprefix('torch.')}:drop{int(bool(dropout))}"


def device_name(device: torch.device) -> str:
    """The device's cache name: its marketing name and compute capability (one name per GPU model)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} sm_{major}{minor}"


def cuda_timer(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn on the current stream, after one warm-up run (which also autotunes)."""
    fn()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def stream_capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (a first call for a shape met there is not timed)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class Dispatcher:
    """Decisions per (device, shape key): in memory, backed by one JSON file.

    timer(fn) -> milliseconds, device_name(device) -> str and capturing() -> bool are injectable, so the decision
    logic runs on CPU with made-up timings in the tests."""

    def __init__(self, path: str | None = None, timer=cuda_timer, name_of=device_name, capturing=stream_capturing):
        self.path = path
        self.timer = timer
        self.name_of = name_of
        self.capturing = capturing
        self._lock = threading.Lock()
        self._decisions: dict[str, dict[str, dict]] | None = None
        self._names: dict[object, str] = {}

    def _file(self) -> str:
        return self.path if self.path is not None else cache_path()

    def _load(self) -> dict:
        if self._decisions is None:
            try:
                with open(self._file()) as f:
                    data = json.load(f)
                self._decisions = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._decisions = {}
        return self._decisions

    def _save(self) -> None:
        path = self._file()
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self._decisions, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError:  # a read-only home keeps the decisions in memory only
            pass

    def choose(self, key: str, candidates: dict[str, Callable[[], object]], device) -> str:
        """The name of the fastest candidate for key on device; candidates are timed only when no decision for
        (device, key) exists in memory or on disk. Candidates must leave no trace the caller relies on. Inside a
        CUDA graph capture an unknown key gets the first candidate (the fused path), untimed and not recorded: a
        graph captured before any eager call of its shapes (cudagraph trees warm up eagerly first) keeps that."""
        if not candidates:
            raise ValueError("dispatch needs at least one candidate path")
        dev = self._names.get(device)
        if dev is None:
            dev = self._names[device] = self.name_of(device)
        with self._lock:
            known = self._load().get(dev, {}).get(key)
            if known is not None and known.get("choice") in candidates:
                return known["choice"]
        if self.capturing():  # a CUDA graph capture cannot time (it forbids syncs): the first candidate, undecided
            return next(iter(candidates))
        timings = {name: float(self.timer(fn)) for name, fn in candidates.items()}
        choice = min(timings, key=timings.get)
        with self._lock:
            self._load().setdefault(dev, {})[key] = {"choice": choice, "ms": timings}
            self._save()
        return choice

    def decisions(self) -> list[dict]:
        """Every decision known to this process (measured here or read from the cache file), sorted."""
        with self._lock:
            data = self._load()
            return [
                {"device": dev, "key": key, "choice": entry["choice"], "ms": dict(entry.get("ms", {}))}
                for dev in sorted(data)
                for key, entry in sorted(data[dev].items())
            ]


_default = Dispatcher()


def choose(key: str, candidates: dict[str, Callable[[], object]], device) -> str:
    """The process-wide dispatcher's choice for key on device (see Dispatcher.choose)."""
    return _default.choose(key, candidates, device)


def decisions() -> list[dict]:
    """The process-wide dispatcher's decisions, for `fastlora info`."""
    return _default.decisions()


def decisions_file() -> str:
    """The file the process-wide dispatcher reads and writes its decisions in."""
    return _default._file()
