"""The suite behind ``fastlora bench``: which cases run on a GPU and on CPU, filters, and the result file.

GPU (the issues' targets, bf16 mainly): Linear M in {512, 2048, 8192} x (K, N) in {(4096, 4096),
(4096, 14336), (14336, 4096)} x r in {8, 16, 64} x dropout {0, 0.1}, plus fp16 and fp32 at one shape, and DoRA
at 8192x4096x4096, r=16 (dropout 0 and 0.1; in the quick set, so a time budget keeps it);
Embedding V=128256, D=4096, 8192 tokens, r=16; Conv2d batch 32, C=O=256, 56x56 and 28x28, 3x3, r=8,
channels_last; QLoRA (NF4 Linear4bit, r=16) at M in {16, 512, 4096, 16384} x (K, N) in {(4096, 4096),
(4096, 14336)}; the Llama-style step; sibling groups (q/k/v and gate/up at Llama-8B's shapes, grouped against
unfused and PEFT). CPU: the same layers at small shapes on the torch path (and a whole Llama layer grouped).
"""

from __future__ import annotations

import importlib
import json
import math
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from fastlora.benchmarks import group, llama, moe
from fastlora.benchmarks.harness import MODES, Case, Progress, Settings, measure_case, measure_ceilings

import fastlora
from fastlora._env import environment
from fastlora.kinds import kinds
from fastlora.validate import parse_shape

# {layer kind: its benchmark setup module}, from the layer-kind registry (a kind whose extra is missing has none)
SETUPS = {kind.name: importlib.import_module(kind.bench_setup) for kind in kinds() if kind.bench_setup}
LAYERS = (*SETUPS, "llama", "moe", "group")
PROVIDERS = ("base", "peft_style", "peft", "fastlora")


@dataclass
class Options:
    """What ``fastlora bench`` asked for; empty filters mean everything."""

    device: torch.device
    quick: bool = False
    layers: tuple[str, ...] = ()
    shapes: tuple = ()  # fastlora.validate.Shape; replaces the suite's shapes for that layer
    dtypes: tuple[torch.dtype, ...] = ()
    ranks: tuple[int, ...] = ()
    dropouts: tuple[float, ...] = ()
    modes: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    settings: Settings = field(default_factory=Settings)
    budget_s: float | None = None  # start no new case after this many seconds


def _shapes(layer, texts):
    return [parse_shape(s, layer) for s in texts]


def suite_cases(device: torch.device, quick: bool) -> list[Case]:
    """The suite's cases before filtering; on CUDA the quick ones first, so a time budget keeps the essentials."""
    cases = _cases(device, quick)
    if device.type == "cuda" and not quick:
        first = _cases(device, True)
        keys = {(c.layer, c.shape, c.dtype, c.dropout) for c in first}
        cases = first + [c for c in cases if (c.layer, c.shape, c.dtype, c.dropout) not in keys]
    return cases


def _cases(device: torch.device, quick: bool) -> list[Case]:
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    cases = []
    if device.type == "cuda":
        ms = (8192,) if quick else (512, 2048, 8192)
        kns = ((4096, 4096),) if quick else ((4096, 4096), (4096, 14336), (14336, 4096))
        ranks = (16,) if quick else (8, 16, 64)
        for m in ms:
            for k, n in kns:
                for r in ranks:
                    for p in (0.0, 0.1):
                        cases.append(Case("linear", parse_shape(f"{m}x{k}x{n}x{r}", "linear"), bf16, p))
        for p in (0.0, 0.1):  # DoRA against PEFT's DoRA and against the plain LoRA case of the same shape
            cases.append(Case("linear", parse_shape("M=8192,K=4096,N=4096,r=16,dora=1", "linear"), bf16, p))
        if not quick:
            for dt in (fp16, fp32):
                cases.append(Case("linear", parse_shape("8192x4096x4096x16", "linear"), dt, 0.0))
        cases.append(Case("embedding", parse_shape("8192x128256x4096x16", "embedding"), bf16, 0.0))
        for hw in (56,) if quick else (56, 28):
            for p in (0.0,) if quick else (0.0, 0.1):
                shape = parse_shape(f"N=32,C=256,H={hw},W={hw},O=256,k=3,r=8,cl=1", "conv2d")
                cases.append(Case("conv2d", shape, bf16, p))
        if "linear4bit" in SETUPS:  # QLoRA at r=16: the fused-dequant route (M=16) and the workspace route
            for m in (16, 4096) if quick else (16, 512, 4096, 16384):
                for k, n in ((4096, 4096),) if quick else ((4096, 4096), (4096, 14336)):
                    cases.append(Case("linear4bit", parse_shape(f"{m}x{k}x{n}x16", "linear4bit"), bf16, 0.0))
            if not quick:
                cases.append(Case("linear4bit", parse_shape("4096x4096x4096x16", "linear4bit"), bf16, 0.1))
        cases += [Case("llama", None, bf16, p) for p in ((0.0,) if quick else (0.0, 0.05))]
        cases.append(Case("moe", None, bf16, 0.0))  # the Qwen3-30B-A3B-like experts block (benchmarks/moe.py)
        cases += [Case("group", None, bf16, p) for p in ((0.0,) if quick else (0.0, 0.1))]
    else:
        lin = ("256x512x512x16",) if quick else ("256x512x512x16", "512x1024x1024x16", "512x1024x1024x64")
        if not quick:  # DoRA and its plain LoRA baseline at the shape of the DoRA targets
            lin += ("2048x1024x1024x16", "M=2048,K=1024,N=1024,r=16,dora=1")
        for s in _shapes("linear", lin):
            for p in (0.0, 0.1):
                cases.append(Case("linear", s, fp32, p))
        emb = "M=512,V=4096,D=256,r=16" if quick else "M=2048,V=32000,D=512,r=16"
        cases.append(Case("embedding", parse_shape(emb, "embedding"), fp32, 0.0))
        conv = "N=2,C=32,H=16,W=16,O=32,k=3,r=8" if quick else "N=4,C=64,H=28,W=28,O=64,k=3,r=8"
        for p in (0.0, 0.1):
            cases.append(Case("conv2d", parse_shape(conv, "conv2d"), fp32, p))
        if "linear4bit" in SETUPS:
            for s in _shapes("linear4bit", ("256x512x512x16",) if quick else ("256x512x512x16", "512x1024x1024x16")):
                for p in (0.0, 0.1):
                    cases.append(Case("linear4bit", s, fp32, p))
        cases.append(Case("llama", None, fp32, 0.0))
        cases.append(Case("moe", None, fp32, 0.0))
        cases.append(Case("group", None, fp32, 0.0))
    return cases


def select(cases: list[Case], opts: Options) -> list[Case]:
    """Apply the filters. User shapes replace the suite's shapes of their layer (its dtypes and dropouts kept);
    a dtype the suite does not run for a layer runs that layer's cases in it."""
    for layer in dict.fromkeys(s.layer for s in opts.shapes):
        proto = [c for c in cases if c.layer == layer]
        dtypes = list(dict.fromkeys(c.dtype for c in proto)) or [torch.float32]
        dropouts = list(dict.fromkeys(c.dropout for c in proto)) or [0.0]
        shapes = [s for s in opts.shapes if s.layer == layer]
        cases = [c for c in cases if c.layer != layer] + [
            Case(layer, s, dt, p) for s in shapes for dt in dtypes for p in dropouts
        ]
    for dt in opts.dtypes:
        for layer in dict.fromkeys(c.layer for c in cases):
            mine = [c for c in cases if c.layer == layer]
            if all(c.dtype != dt for c in mine):
                first = mine[0].dtype
                cases += [replace(c, dtype=dt) for c in mine if c.dtype == first]
    out, seen = [], set()
    for c in cases:
        key = (c.layer, c.shape, c.dtype, c.dropout)
        if key in seen:
            continue
        seen.add(key)
        if opts.layers and c.layer not in opts.layers:
            continue
        if opts.dtypes and c.dtype not in opts.dtypes:
            continue
        if opts.ranks and c.shape is not None and c.shape["r"] not in opts.ranks:
            continue
        if opts.dropouts and c.dropout not in opts.dropouts:
            continue
        modes = tuple(m for m in MODES if m in opts.modes) if opts.modes else c.modes
        out.append(replace(c, modes=modes, providers=tuple(opts.providers) if opts.providers else c.providers))
    return out


def run(opts: Options, progress: Progress | None = None, out: Path | None = None) -> dict:
    """Run the selected cases; returns the result document (see README's Benchmarks section).

    With ``out``, the document is written there after every case, so a run cut short keeps what it measured.
    """
    device = opts.device
    cases = select(suite_cases(device, opts.quick), opts)
    progress = progress or Progress()
    progress.total = len(cases)
    doc = {
        "schema": 1,
        "environment": environment(device),
        "mode": "cuda" if device.type == "cuda" else "cpu (torch path, small shapes; the Triton kernels are not timed)",
        "fastlora_path": {layer: fastlora.active_path(device) for layer in SETUPS},
        "settings": {**opts.settings.as_dict(), "quick": opts.quick},
        "ceilings": None,
        "results": [],
        "skipped": [],
    }
    dtypes = sorted({c.dtype for c in cases if c.layer not in ("llama", "group")}, key=str)
    if dtypes and device.type == "cuda":  # on a shared CPU the ceilings say little: no roofline there
        doc["ceilings"] = measure_ceilings(device, dtypes, opts.settings, progress)
    base_cache: dict = {}
    for i, case in enumerate(cases):
        if opts.budget_s is not None and time.monotonic() - progress.start > opts.budget_s:
            doc["skipped"].append(f"{case.label}: time budget of {opts.budget_s:g}s spent")
            progress(f"skipped (time budget of {opts.budget_s:g}s spent): {case.label}", step=True)
            continue
        try:
            if case.layer == "llama":
                rows = llama.measure(device, case.dtype, case.dropout, opts.settings, progress, case.providers)
            elif case.layer == "moe":
                rows = moe.measure(device, case.dtype, opts.settings, progress, case.providers)
            elif case.layer == "group":
                rows = group.measure(device, case.dtype, case.dropout, opts.settings, progress, case.providers)
            else:
                setup = SETUPS[case.layer]
                rows = measure_case(
                    case, setup, device, opts.settings, doc["ceilings"], progress, seed=i, base_cache=base_cache
                )
        except Exception as exc:  # e.g. transformers missing, out of memory: the rest of the run goes on
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            doc["skipped"].append(f"{case.label}: {reason}")
            progress(f"skipped {case.label}: {reason}", step=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        doc["results"] += rows
        progress(f"done {case.label}", step=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if out is not None:
            write(doc, out)
    return doc


def result_filename(doc: dict) -> str:
    env = doc["environment"]
    name = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]["name"] or env["device"]["type"]).strip("-").lower()
    stamp = env["time_utc"].replace(":", "").replace("-", "")
    return f"{stamp}-{name}.json"


def _finite(v):
    """NaN and infinities as strings, so the file is strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def output_path(doc: dict, out: Path) -> Path:
    """``out`` itself when it names a .json file, else a stamped file name inside the folder ``out``."""
    out = Path(out)
    return out if out.suffix == ".json" else out / result_filename(doc)


def write(doc: dict, out: Path) -> Path:
    """Write the document to ``out`` (a .json file, or a folder that gets a stamped file name)."""
    out = output_path(doc, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(doc), indent=1, default=str))
    tmp.replace(out)
    return out
