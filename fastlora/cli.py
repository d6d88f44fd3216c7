"""The ``fastlora`` command: ``info``, ``validate`` and ``bench``.

- ``fastlora info``: device, compute capability, versions, and which path each layer takes.
- ``fastlora validate``: every op (each layer, forward and backward, each dtype the device supports, dropout
  on and off) on a grid of shapes plus ``--shape`` ones, against a float64 reference; a table of relative
  errors and tolerances; exit status 1 on any failure. Without CUDA it runs the Triton kernels under the
  interpreter at small shapes: TRITON_INTERPRET=1 must be set before the kernels are imported, so when it is
  not, the command re-runs itself in a subprocess with it set.
- ``fastlora bench``: the benchmark suite (installed as fastlora.benchmarks; ``--quick`` for a few minutes);
  prints the table and writes the JSON result file to ``--out`` or ./fastlora-results/.

Bad arguments (unknown layer, malformed shape, unsupported dtype) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastlora
from fastlora._env import environment
from fastlora.ops import backend
from fastlora.validate import (
    LAYERS,
    OPS,
    check_case,
    default_grid,
    dtype_id,
    parse_dtype,
    parse_shape,
    supported_dtypes,
)

EXIT_FAILED, EXIT_USAGE = 1, 2
MASK_LEGEND = (
    "mask: the dropout mask the op drew, read back from its dX; rel_err is |keep rate - (1 - p)|, tol a 6-sigma "
    "bound, and a mask value other than 0 or 1/(1-p) fails"
)
# Where ``fastlora bench`` writes its result file when --out is not given (relative to the current directory).
DEFAULT_RESULTS = "fastlora-results"


class UsageError(Exception):
    """A bad argument: reported as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------------
# Argument helpers
# ----------------------------------------------------------------------------------------------------------


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"unknown device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available")
    if device.type not in ("cuda", "cpu"):
        raise UsageError(f"fastlora runs on cuda or cpu, got device {name!r}")
    return device


def _layers(names, allowed=LAYERS) -> tuple[str, ...]:
    out = []
    for name in names or ():
        for part in name.split(","):
            part = part.strip().lower()
            if part not in allowed:
                raise UsageError(f"unknown layer {part!r}; expected one of {', '.join(allowed)}")
            out.append(part)
    return tuple(dict.fromkeys(out))


def _dtypes(names, device) -> tuple[torch.dtype, ...]:
    out = []
    for name in names or ():
        for part in name.split(","):
            try:
                dtype = parse_dtype(part)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            if dtype not in supported_dtypes(device):
                raise UsageError(f"{dtype_id(dtype)} is not supported on {_device_name(device)}")
            out.append(dtype)
    return tuple(dict.fromkeys(out))


def _shapes(texts, layers) -> list:
    out = []
    only = layers[0] if len(layers) == 1 else None
    for text in texts or ():
        try:
            out.append(parse_shape(text, only if ":" not in text else None))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return out


def _floats(texts, name, lo=0.0, hi=1.0) -> tuple[float, ...]:
    out = []
    for text in texts or ():
        for part in text.split(","):
            try:
                v = float(part)
            except ValueError:
                raise UsageError(f"--{name} takes numbers, got {part!r}") from None
            if not lo <= v < hi:
                raise UsageError(f"--{name} must be in [{lo:g}, {hi:g}), got {v:g}")
            out.append(v)
    return tuple(out)


def _ints(texts, name) -> tuple[int, ...]:
    out = []
    for text in texts or ():
        for part in text.split(","):
            if not part.strip().isdigit() or int(part) < 1:
                raise UsageError(f"--{name} takes positive integers, got {part!r}")
            out.append(int(part))
    return tuple(out)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            f"{torch.cuda.get_device_name(device)} (sm_{''.join(map(str, torch.cuda.get_device_capability(device)))})"
        )
    return "CPU"


def _print_table(header, rows, out=None):
    out = out or sys.stdout
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header).rstrip(), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in rows:
        print(fmt.format(*map(str, r)).rstrip(), file=out)


# ----------------------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------------------


def cmd_info(args) -> int:
    device = _device(args.device)
    env = environment(device)
    dev = env["device"]
    print(
        f"fastlora {env['fastlora']} (commit {(env['commit'] or 'unknown')[:12]}{', modified' if env['dirty'] else ''})"
    )
    versions = [f"python {env['python']}", f"torch {env['torch']}", f"triton {env['triton'] or 'not installed'}"]
    versions += [f"peft {env['peft'] or 'not installed'}", f"transformers {env['transformers'] or 'not installed'}"]
    print("versions: " + ", ".join(versions))
    if dev["type"] == "cuda":
        gib = dev["memory_bytes"] / 2**30
        print(f"device: {device} {dev['name']}, compute capability {dev['capability']}, {dev['multiprocessors']} SMs")
        print(f"memory: {gib:.0f} GiB; driver {env['driver'] or 'unknown'}, CUDA {env['cuda']}")
    else:
        print(f"device: cpu ({dev['name']}, {dev['threads']} threads); no CUDA device")
    print(f"TRITON_INTERPRET: {os.environ.get('TRITON_INTERPRET', 'unset')}; backend setting: {fastlora.get_backend()}")
    print(f"dtypes: {', '.join(dtype_id(d) for d in supported_dtypes(device))}")
    rows = []
    try:
        path = backend.active_path(device)
    except RuntimeError as exc:
        path = f"unavailable: {exc}"
    for layer in LAYERS:
        rows.append((layer, f"fastlora.lora_{layer}", path))
    _print_table(("layer", "function", f"path on {device}"), rows)
    _print_decisions()
    return 0


def _print_decisions() -> None:
    """The measured dispatch decisions (kernels/dispatch.py): this process's and those cached on disk."""
    if not backend.HAS_TRITON:
        return
    from fastlora.kernels import dispatch

    found = dispatch.decisions()
    print(f"dispatch decisions ({dispatch.decisions_file()}): {len(found) or 'none yet'}")
    if found:
        rows = []
        for d in found:
            ms = ", ".join(f"{name} {t:.3f}" for name, t in sorted(d["ms"].items()))
            rows.append((d["device"], d["versions"], d["key"], d["choice"], ms or "-"))
        _print_table(("device", "measured with", "key", "choice", "ms per candidate"), rows)


# ----------------------------------------------------------------------------------------------------------
# validate
# ----------------------------------------------------------------------------------------------------------


def _needs_interpreter(device: torch.device) -> bool:
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1" and not backend.INTERPRET


def _rerun_with_interpreter(argv) -> int:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    print("fastlora validate: no CUDA device; re-running under the Triton interpreter (TRITON_INTERPRET=1)",
          file=sys.stderr, flush=True)  # fmt: skip
    return subprocess.call([sys.executable, "-m", "fastlora.cli", *argv], env=env)


def cmd_validate(args, argv) -> int:
    device = _device(args.device)
    layers = _layers(args.layer) or LAYERS
    dtypes = _dtypes(args.dtype, device) or supported_dtypes(device)
    if args.only_shapes and not args.shape:
        raise UsageError("--only-shapes needs --shape: it checks only the shapes given with --shape")
    user_shapes = _shapes(args.shape, layers)
    for s in user_shapes:
        if s.layer not in layers:
            raise UsageError(
                f"shape {s.label} is for {s.layer}, which is not among the layers checked ({', '.join(layers)})"
            )
    dropouts = _floats(args.dropout, "dropout")
    if _needs_interpreter(device) and not args.no_interpreter:
        return _rerun_with_interpreter(argv)

    cases = []
    for layer in layers:
        shapes = ([] if args.only_shapes else default_grid(layer, device)) + [
            s for s in user_shapes if s.layer == layer
        ]
        ps = dropouts or ((0.0, 0.1) if OPS[layer].has_dropout else (0.0,))
        ps = tuple(p for p in ps if p == 0.0 or OPS[layer].has_dropout)
        cases += [(layer, s, dt, p) for s in shapes for dt in dtypes for p in ps]
    if not cases:
        no_dropout = [layer for layer in layers if not OPS[layer].has_dropout]
        why = f" ({', '.join(no_dropout)} has no dropout)" if dropouts and no_dropout else ""
        raise UsageError(f"the filters select no case{why}")
    print(f"fastlora validate on {_device_name(device)}; path: {backend.active_path(device)}; "
          f"{len(cases)} cases against a float64 reference", flush=True)  # fmt: skip
    if backend.active_path(device) == "torch":
        print("note: the torch path is checked here, not the Triton kernels (no Triton, or not selected)")
    rows, failed, start = [], 0, time.monotonic()
    for i, (layer, shape, dtype, p) in enumerate(cases):
        t0 = time.monotonic()
        try:
            checks = check_case(OPS[layer], shape, dtype, device, p, seed=1000 + i)
        except Exception as exc:  # a crashing op is a failed check, reported in the table
            checks = [{"tensor": "-", "rel_err": math.nan, "tol": math.nan, "ok": False,
                       "note": f"{type(exc).__name__}: {exc}".splitlines()[0][:160]}]  # fmt: skip
        ok = all(c["ok"] for c in checks)
        failed += not ok
        if not args.quiet:
            print(f"  [{i + 1}/{len(cases)}] {layer} {shape.label} {dtype_id(dtype)} p={p:g}: "
                  f"{'ok' if ok else 'FAIL'} ({time.monotonic() - t0:.1f}s)", file=sys.stderr, flush=True)  # fmt: skip
        for c in checks:
            err = c["rel_err"]
            rows.append((
                layer, shape.label, dtype_id(dtype), f"{p:g}", "forward" if c["tensor"] == "y" else "backward",
                c["tensor"], f"{err:.2e}" if isinstance(err, float) else err,
                f"{c['tol']:.1e}" if isinstance(c["tol"], float) else c["tol"],
                "pass" if c["ok"] else "FAIL", c["note"],
            ))  # fmt: skip
    _print_table(("layer", "shape", "dtype", "dropout", "step", "tensor", "rel_err", "tol", "result", "note"), rows)
    print("rel_err: ||out - ref|| / ||ref|| against the float64 reference; tol: the dtype's tolerance")
    if any(row[5] == "mask" for row in rows):
        print(MASK_LEGEND)
    summary = f"{len(cases) - failed} of {len(cases)} cases passed in {time.monotonic() - start:.1f}s"
    print(summary if not failed else f"FAILED: {summary}")
    return EXIT_FAILED if failed else 0


# ----------------------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------------------


def _benchmarks():
    """The benchmark suite, installed with fastlora as fastlora.benchmarks."""
    from fastlora.benchmarks import harness, report, suite

    return harness, report, suite


def cmd_bench(args) -> int:
    harness, report, suite = _benchmarks()
    if args.host:
        from fastlora.benchmarks import host

        return host.main(
            [*(["--device", args.device] if args.device else []), *(["--out", str(args.out)] if args.out else [])]
        )
    device = _device(args.device)
    layers = _layers(args.layer, allowed=suite.LAYERS)
    dtypes = _dtypes(args.dtype, device)
    shapes = _shapes(args.shape, [layer for layer in layers if layer in OPS])
    for s in shapes:
        if layers and s.layer not in layers:
            raise UsageError(
                f"shape {s.label} is for {s.layer}, which is not among the layers benchmarked ({', '.join(layers)})"
            )
    modes = tuple(m.strip() for text in args.mode or () for m in text.split(","))
    for m in modes:
        if m not in harness.MODES:
            raise UsageError(f"unknown mode {m!r}; expected one of {', '.join(harness.MODES)}")
    providers = tuple(p.strip() for text in args.provider or () for p in text.split(","))
    for p in providers:
        if p not in suite.PROVIDERS:
            raise UsageError(f"unknown provider {p!r}; expected one of {', '.join(suite.PROVIDERS)}")
    settings = harness.Settings(warmup_ms=5, rep_ms=20, min_reps=3) if args.quick else harness.Settings()
    if device.type == "cuda":
        settings = harness.Settings(warmup_ms=10, rep_ms=40) if args.quick else harness.Settings(15, 60)
    opts = suite.Options(
        device=device, quick=args.quick, layers=layers or tuple(dict.fromkeys(s.layer for s in shapes)),
        shapes=tuple(shapes), dtypes=dtypes, ranks=_ints(args.rank, "rank"), dropouts=_floats(args.dropout, "dropout"),
        modes=modes, providers=providers, settings=settings, budget_s=args.budget,
    )  # fmt: skip
    if device.type == "cpu":
        print("fastlora bench on CPU: the torch path at small shapes (the Triton kernels are not timed); "
              "figures compare against the PEFT-style reference and PEFT on this CPU", flush=True)  # fmt: skip
    if not suite.select(suite.suite_cases(device, args.quick), opts):
        raise UsageError("the filters select no benchmark case")
    progress = harness.Progress(quiet=args.quiet)
    out = args.out or Path.cwd() / DEFAULT_RESULTS
    with backend.use_backend("torch" if device.type == "cpu" else backend.get_backend()):
        doc = suite.run(opts, progress, out)
    out = suite.write(doc, out)
    print(report.markdown_table(doc))
    if doc["skipped"]:
        print(f"\n{len(doc['skipped'])} cases skipped:\n" + "\n".join(f"- {s}" for s in doc["skipped"]))
    print(f"\nwrote {out}")
    refused = [r for r in doc["results"] if r.get("refused") and r["provider"] == "fastlora"]
    if refused:
        print(f"{len(refused)} fastlora measurements have no speedup reported: their accuracy check failed")
        return EXIT_FAILED
    return 0


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlora", description="fastlora: fused Triton kernels for LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="device, versions and the path each layer takes")
    info.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")

    val = sub.add_parser("validate", help="every op against a float64 reference; non-zero exit on failure")
    val.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    val.add_argument(
        "--layer", action="append", help=f"layers to check ({', '.join(LAYERS)}); repeat or comma-separate"
    )
    val.add_argument("--dtype", action="append", help="dtypes to check (bf16, fp16, fp32); default: all the device has")
    val.add_argument(
        "--shape", action="append", help="extra shape, e.g. linear:37x75x51x5 or linear:M=37,K=75,N=51,r=5"
    )
    val.add_argument("--only-shapes", action="store_true", help="check only the --shape shapes, not the built-in grid")
    val.add_argument("--dropout", action="append", help="dropout probabilities (default: 0 and 0.1)")
    val.add_argument("--no-interpreter", action="store_true", help="on CPU, check the torch path, not the kernels")
    val.add_argument("-q", "--quiet", action="store_true", help="no per-case progress lines")

    bench = sub.add_parser("bench", help="the benchmark suite: speed, memory and accuracy side by side")
    bench.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    bench.add_argument("--quick", action="store_true", help="a few cases with short timings (a few minutes)")
    bench.add_argument(
        "--host", action="store_true", help="host (CPU-side) us per call of every op (benchmarks/host.py)"
    )
    bench.add_argument(
        "--layer",
        action="append",
        help="linear, embedding, conv2d, linear4bit, llama, moe, group; repeat or comma-separate",
    )
    bench.add_argument(
        "--shape", action="append", help="measure this shape instead of the suite's, e.g. linear:8192x4096x4096x16"
    )
    bench.add_argument("--dtype", action="append", help="bf16, fp16, fp32")
    bench.add_argument("--rank", action="append", help="LoRA ranks to keep")
    bench.add_argument("--dropout", action="append", help="dropout probabilities to keep")
    bench.add_argument("--mode", action="append", help="forward, backward, forward+backward")
    bench.add_argument("--provider", action="append", help="base, peft_style, peft, fastlora (base always runs)")
    bench.add_argument("--out", type=Path, help=f"result file (.json) or folder (default: ./{DEFAULT_RESULTS}/)")
    bench.add_argument("--budget", type=float, help="seconds after which no new case starts (the rest is skipped)")
    bench.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv=None) -> int:
    """Entry point of the ``fastlora`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            return cmd_info(args)
        if args.command == "validate":
            return cmd_validate(args, argv)
        return cmd_bench(args)
    except UsageError as exc:
        print(f"fastlora {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"fastlora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
