"""One dispatch for every choice between kernels: per shape key, the faster of the candidate paths, found once.

The choices it makes: linear's fused GEMM against "cuBLAS plus an r-wide update" (forward and dX), conv2d's
fused implicit GEMM against "cuDNN plus the LoRA kernel" (forward and dX), the 4-bit layer's fused dequantizing
GEMM against "dequantize into the workspace, then the fused LoRA GEMM" (forward and backward, at the row counts
where both are possible), and a sibling group's GEMMs (kernels/group.py) against one GEMM per member (forward) or
cuBLAS plus the members' r-wide updates (forward and dX). A caller names its candidates in a dict, the default
first (or names it), and gets back the name to run:

- **Where nothing can be timed, the default, by rule.** Off CUDA, under the interpreter, and for a key first met
  inside a CUDA graph capture (timing synchronises, which a capture forbids), the default runs untimed. A
  candidate set of one (the rule left one path: nf4 above its row bound) is no choice at all.
- **Otherwise measured once.** The first call for a key on a device times every candidate side by side (CUDA
  events, a warm-up run that also autotunes, then the median of a few runs) and keeps the fastest. Every later
  call is a dictionary lookup: no synchronisation.
- **Persistent, keyed by what the timing depends on.** Decisions are kept per environment, the device's name
  and compute capability with the fastlora, Triton and torch versions, in one JSON file
  ($XDG_CACHE_HOME/fastlora/dispatch.json, else ~/.cache/fastlora/dispatch.json; $FASTLORA_CACHE_DIR overrides
  the folder): a later process on the same setup times nothing, and an upgrade measures again.
- **Bounded.** At most MAX_KEYS decisions per environment and MAX_ENVIRONMENTS environments in the file, and
  MAX_KEYS answers in memory, the oldest dropped first: variable batch shapes cannot grow it without limit.
- **The same on every rank.** When a torch.distributed process group is initialised, a decision is agreed
  through the group's key-value store (the one its ranks rendezvoused with): each rank decides as above, then
  offers its decision with an atomic compare-and-set, and the first decision offered for a key is every rank's,
  so every rank runs the same kernels and rounds identically. A store operation involves no other rank, so
  ranks that meet different shapes, or meet them in another order, never wait for each other, unlike a
  broadcast, which every rank would have to reach for every key in one order. A default taken inside a capture
  is offered too: the captured graph runs it for good, so the group adopts it for that key.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import statistics
import threading
from collections.abc import Callable

import torch
import triton
from fastlora.kernels.configs import INTERPRET

__all__ = [
    "shape_key",
    "choose",
    "decisions",
    "decisions_file",
    "Dispatcher",
    "cache_path",
    "group_store",
    "MAX_KEYS",
    "MAX_ENVIRONMENTS",
]

REPEATS = 5
MAX_KEYS = 1024
MAX_ENVIRONMENTS = 8
STORE_PREFIX = "fastlora/dispatch/"


def cache_path() -> str:
    """The JSON file holding the decisions of every environment this user's processes have measured."""
    folder = os.environ.get("FASTLORA_CACHE_DIR")
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "fastlora")
    return os.path.join(folder, "dispatch.json")


def _field(value) -> str:
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    return str(value)


def shape_key(kind: str, *, M: int, N: int, K: int, R: int, dtype: torch.dtype, dropout: bool, **extra) -> str:
    """The decision key: the choice's kind ("fwd", "dx", "conv_fwd", ...), its GEMM sizes (M to the next power of
    two), dtype, whether dropout masks the LoRA term, then any further fields that change the timing (a conv's
    geometry and layout, a 4-bit format), in the order given, sequences joined by "x"."""
    m_bucket = 1 << max(0, int(M) - 1).bit_length()
    key = f"{kind}:M{m_bucket}:N{N}:K{K}:r{R}:{str(dtype).removeprefix('torch.')}:drop{int(bool(dropout))}"
    return key + "".join(f":{name}{_field(value)}" for name, value in extra.items())


def device_name(device: torch.device) -> str:
    """The device's cache name: its marketing name and compute capability (one name per GPU model)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} sm_{major}{minor}"


def versions() -> str:
    """The software a timing depends on besides the device: fastlora's, Triton's and torch's versions (torch's
    names its CUDA build, and so cuBLAS and cuDNN). fastlora's is its installed distribution's."""
    try:
        fastlora_version = importlib.metadata.version("fastlora")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        fastlora_version = "unknown"
    return f"fastlora {fastlora_version}, triton {triton.__version__}, torch {torch.__version__}"


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


def measurable(device) -> bool:
    """Whether paths can be timed on device: compiled kernels on a CUDA device."""
    device = device if isinstance(device, torch.device) else torch.device(device)
    return device.type == "cuda" and not INTERPRET


def group_store():
    """The key-value store of the default torch.distributed process group, or None when no group is initialised
    (or torch.distributed is not built)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.distributed_c10d._get_default_store()


def _bounded_put(table: dict, key, value, maxsize: int) -> None:
    """table[key] = value as the newest entry, dropping the oldest while the table is over maxsize."""
    table.pop(key, None)
    table[key] = value
    while len(table) > maxsize:
        del table[next(iter(table))]


class Dispatcher:
    """Decisions per (environment, key): answered from memory, the JSON file, the process group's store, or a
    measurement, in that order.

    Injectable, so that the decision logic runs on CPU in the tests: timer(fn) -> milliseconds, name_of(device) ->
    str, capturing() -> bool, measurable(device) -> bool, store() -> a torch.distributed Store or None, and
    versions() -> str."""

    def __init__(
        self,
        path: str | None = None,
        timer=cuda_timer,
        name_of=device_name,
        capturing=stream_capturing,
        measurable=measurable,
        store=group_store,
        versions=versions,
    ):
        self.path = path
        self.timer = timer
        self.name_of = name_of
        self.capturing = capturing
        self.measurable = measurable
        self.store = store
        self.versions = versions
        self._lock = threading.Lock()
        self._decisions: dict[str, dict[str, dict]] | None = None
        self._answers: dict[tuple, str] = {}
        self._environments: dict[object, str] = {}

    def _file(self) -> str:
        return self.path if self.path is not None else cache_path()

    def _read(self) -> dict:
        try:
            with open(self._file()) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {env: keys for env, keys in data.items() if isinstance(keys, dict)}

    def _load(self) -> dict:
        if self._decisions is None:
            self._decisions = self._read()
        return self._decisions

    def _record(self, env: str, key: str, entry: dict) -> None:
        """Keep a measured decision in memory and in the file (merged with what other processes wrote there since
        it was read), both bounded."""
        decisions = self._load()
        for other_env, keys in self._read().items():  # another process's decisions since the file was read
            for other_key, other_entry in keys.items():
                decisions.setdefault(other_env, {}).setdefault(other_key, other_entry)
        keys = decisions.pop(env, {})
        _bounded_put(keys, key, entry, MAX_KEYS)
        _bounded_put(decisions, env, keys, MAX_ENVIRONMENTS)
        for other in decisions.values():
            while len(other) > MAX_KEYS:
                del other[next(iter(other))]
        path = self._file()
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(decisions, f, indent=1)
            os.replace(tmp, path)
        except OSError:  # a read-only home keeps the decisions in memory only
            pass

    def _environment(self, device) -> str:
        env = self._environments.get(device)
        if env is None:
            env = self._environments[device] = f"{self.name_of(device)}; {self.versions()}"
        return env

    def choose(self, key: str, candidates: dict[str, Callable[[], object]], device, default: str | None = None) -> str:
        """The name of the candidate to run for key on device (see the module docstring). candidates maps names to
        functions that run each path once and leave no trace the caller relies on; default (the first candidate
        when None) is what runs where nothing can be timed."""
        if not candidates:
            raise ValueError("dispatch needs at least one candidate path")
        if default is None:
            default = next(iter(candidates))
        elif default not in candidates:
            raise ValueError(f"the default path {default!r} is not among the candidates {list(candidates)}")
        if len(candidates) == 1 or not self.measurable(device):
            return default
        store = self.store()
        env = self._environment(device)
        answer_key = (store is not None, env, key)
        answer = self._answers.get(answer_key)
        if answer is not None and answer in candidates:
            return answer
        choice = self._group_choice(store, key, candidates)
        recorded = choice is not None
        if choice is None:
            with self._lock:
                known = self._load().get(env, {}).get(key)
            if known is not None and known.get("choice") in candidates:
                choice, recorded = known["choice"], True
            elif self.capturing():  # a CUDA graph capture cannot time (it forbids syncs): the default, unmeasured
                choice, recorded = default, False
            else:
                timings = {name: float(self.timer(fn)) for name, fn in candidates.items()}
                choice, recorded = min(timings, key=timings.get), True
                with self._lock:
                    self._record(env, key, {"choice": choice, "ms": timings})
            if store is not None:
                choice, recorded = self._agree(store, key, choice, candidates), True
        if recorded:
            with self._lock:
                _bounded_put(self._answers, answer_key, choice, MAX_KEYS)
        return choice

    @staticmethod
    def _group_choice(store, key: str, candidates) -> str | None:
        """The choice the process group agreed on for key, or None (no group, or no rank has offered one)."""
        if store is None:
            return None
        name = STORE_PREFIX + key
        try:
            if not store.check([name]):
                return None
            choice = store.get(name).decode()
        except Exception:  # a store that went away (the group is being torn down): decide locally
            return None
        return choice if choice in candidates else None

    @staticmethod
    def _agree(store, key: str, choice: str, candidates) -> str:
        """Offer choice to the group for key; the first offer made by any rank is the answer."""
        try:
            agreed = store.compare_set(STORE_PREFIX + key, "", choice).decode()
        except Exception:  # a store that went away: this rank's own decision
            return choice
        return agreed if agreed in candidates else choice

    def decisions(self) -> list[dict]:
        """Every measured decision known to this process (made here or read from the cache file), sorted: the
        device's name, the software versions it was measured with, the key, the choice and each candidate's ms."""
        with self._lock:
            data = self._load()
            return [
                {
                    "device": env.partition("; ")[0],
                    "versions": env.partition("; ")[2],
                    "key": key,
                    "choice": entry["choice"],
                    "ms": dict(entry.get("ms", {})),
                }
                for env in sorted(data)
                for key, entry in sorted(data[env].items())
                if isinstance(entry, dict) and "choice" in entry
            ]


_default = Dispatcher()


def choose(key: str, candidates: dict[str, Callable[[], object]], device, default: str | None = None) -> str:
    """The process-wide dispatcher's choice for key on device (see Dispatcher.choose)."""
    return _default.choose(key, candidates, device, default)


def decisions() -> list[dict]:
    """The process-wide dispatcher's decisions, for `fastlora info`."""
    return _default.decisions()


def decisions_file() -> str:
    """The file the process-wide dispatcher reads and writes its decisions in."""
    return _default._file()
