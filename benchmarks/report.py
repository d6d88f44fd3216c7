"""Markdown tables and PNG plots from benchmark result files, and the README's results section.

    python -m fastlora.benchmarks.report benchmarks/results/*.json                 # tables to stdout
    python -m fastlora.benchmarks.report benchmarks/results/ --plots benchmarks/results/plots
    python -m fastlora.benchmarks.report benchmarks/results/ --readme README.md    # regenerate the results block

The README block lies between the two marker comments below and is written only from result files of
CUDA runs (CPU runs are not the project's speed claims); the newest such file is used.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

README_START = "<!-- fastlora-bench-results:start -->"
README_END = "<!-- fastlora-bench-results:end -->"
PROVIDER_ORDER = ("base", "peft_style", "peft", "fastlora")
MIB = 2**20


def load(paths) -> list[dict]:
    """Result documents from files and folders (folders: every *.json inside), oldest first."""
    files = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    docs = []
    for f in files:
        doc = json.loads(f.read_text())
        doc["_file"] = str(f)
        docs.append(doc)
    return sorted(docs, key=lambda d: d["environment"]["time_utc"])


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _f(v, fmt="{:.3f}", none="–"):
    v = _num(v)
    return none if v is None else fmt.format(v)


def conditions(doc: dict) -> str:
    """One line with everything a number depends on."""
    env = doc["environment"]
    dev = env["device"]
    where = dev["name"] + (f" (sm_{dev['capability'].replace('.', '')})" if dev.get("capability") else "")
    parts = [
        where,
        f"driver {env['driver']}" if env.get("driver") else None,
        f"CUDA {env['cuda']}" if env.get("cuda") else None,
        f"torch {env['torch']}",
        f"triton {env['triton']}" if env.get("triton") else None,
        f"PEFT {env['peft']}" if env.get("peft") else None,
        f"fastlora {env['fastlora']} @ {(env.get('commit') or 'unknown')[:10]}{' (dirty)' if env.get('dirty') else ''}",
        env["time_utc"],
    ]
    timing = "CUDA events (triton do_bench), L2 cleared per call" if dev["type"] == "cuda" else "time.perf_counter"
    return " · ".join(p for p in parts if p) + f" · {doc['mode']} · {timing}, median of repetitions"


def groups(doc: dict) -> list[tuple[tuple, dict]]:
    """Rows grouped by (layer, shape, dtype, dropout, mode) -> {provider: row}, in run order."""
    out: dict = {}
    for r in doc["results"]:
        key = (r["layer"], r["shape_label"], r["dtype"], r["dropout"], r["mode"])
        out.setdefault(key, {})[r["provider"]] = r
    return list(out.items())


def _status(row: dict | None) -> str:
    if row is None:
        return "–"
    if row.get("error"):
        return "error"
    if row.get("refused"):
        return "REFUSED (accuracy)"
    if row.get("accuracy_ok") is False:
        return "FAILED"
    return "ok" if row.get("accuracy_ok") else "–"


def _max_err(row):
    """The largest relative error of the outputs and gradients (the mask row measures a keep rate, not an error)."""
    errs = {k: v for k, v in ((row or {}).get("rel_err") or {}).items() if k != "mask"}
    if not errs:
        return None
    values = [_num(v) for v in errs.values()]
    return math.nan if any(v is None for v in values) else max(values)


def markdown_table(doc: dict) -> str:
    """The result table of one run, with its conditions above it."""
    head = [
        "layer", "shape", "dtype", "p", "mode", "base ms", "PEFT-style ms", "PEFT ms", "fastlora ms",
        "fastlora / base", "speedup vs PEFT-style", "saved MiB PEFT-style → fastlora", "peak MiB PEFT-style → fastlora",
        "fastlora TFLOP/s", "roofline", "fastlora rel err", "check",
    ]  # fmt: skip
    lines = [f"_{conditions(doc)}_", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (layer, shape, dtype, p, mode), provs in groups(doc):
        fl, ps = provs.get("fastlora"), provs.get("peft_style")

        def ms(name, provs=provs):
            return _f((provs.get(name) or {}).get("median_ms"))

        saved = "–"
        if fl and ps and _num(fl.get("saved_bytes")) is not None and _num(ps.get("saved_bytes")) is not None:
            saved = f"{ps['saved_bytes'] / MIB:.2f} → {fl['saved_bytes'] / MIB:.2f}"
        peak = "–"
        if fl and ps and _num(fl.get("peak_memory_bytes")) is not None and _num(ps.get("peak_memory_bytes")):
            peak = f"{ps['peak_memory_bytes'] / MIB:.0f} → {fl['peak_memory_bytes'] / MIB:.0f}"
        roof = (fl or {}).get("roofline") or {}
        roof_s = f"{roof['fraction_of_roofline']:.0%} ({roof['bound']})" if roof else "–"
        speed = _f((fl or {}).get("speedup_vs_peft_style"), "{:.2f}x")
        if fl and fl.get("refused"):
            speed = "refused"
        fl_ms = ms("fastlora")
        if "fastlora_unfused" in provs:  # sibling groups: the same layers unfused
            fl_ms += f" (unfused {ms('fastlora_unfused')})"
        cells = [
            layer, shape, dtype, f"{p:g}", mode, ms("base"), ms("peft_style"), ms("peft"), fl_ms,
            _f((fl or {}).get("ratio_to_base"), "{:.2f}x"), speed, saved, peak,
            _f((fl or {}).get("tflops"), "{:.1f}"), roof_s, _f(_max_err(fl), "{:.1e}", "–" if not fl else "nan"),
            _status(fl),
        ]  # fmt: skip
        if layer == "llama":
            cells[13] = _f((fl or {}).get("tokens_per_s"), "{:.0f} tok/s")
        lines.append("| " + " | ".join(cells) + " |")
    ceil = doc.get("ceilings")
    if ceil:
        mm = ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in ceil["matmul_tflops"].items())
        lines += [
            "",
            f"Ceilings measured in this run: {ceil['matmul_size']}³ matmul {mm}; copy {ceil['copy_gbps']:.0f} GB/s.",
        ]
    return "\n".join(lines)


PLOT_HINT = 'pip install "fastlora[bench]", or in a source checkout pip install -e ".[bench]"'
CPU_NOTE = "CPU, torch path, not a speed claim"


def _bars(ax, items, names, value):
    """Grouped bars: one group per case in ``items``, one bar per provider name; ``value(row, provs)`` or None."""
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        vals = [value(provs.get(name), provs) for _, provs in items]
        ax.bar([i + j * width for i in range(len(items))], [v or 0.0 for v in vals], width, label=name)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(items))])
    ax.set_xticklabels([f"{k[1]}\n{k[2]} p={k[3]:g}" for k, _ in items], rotation=60, ha="right", fontsize=7)
    ax.legend(fontsize=8)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plots(doc: dict, folder: Path) -> list[Path]:
    """PNG bar charts per layer: time relative to the bare layer for each provider, and saved-for-backward bytes.

    Plots of a CPU result file say so in their title: the CPU runs the torch path and its times are no speed claim.
    Raises ImportError when matplotlib is missing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = doc["environment"]["device"]
    where = device["name"] if device["type"] == "cuda" else f"{device['name']} ({CPU_NOTE})"
    written = []
    by_layer: dict = {}
    for key, provs in groups(doc):
        by_layer.setdefault(key[0], []).append((key, provs))
    for layer, all_items in by_layer.items():
        items = [(k, p) for k, p in all_items if k[4] in ("forward+backward", "train step")]
        if items:
            names = [n for n in PROVIDER_ORDER if any(n in p for _, p in items) and n != "base"]
            ref_name = "base" if layer != "llama" and all("base" in p for _, p in items) else "peft_style"

            def ratio(row, provs, ref_name=ref_name):
                ref = provs.get(ref_name)
                if not row or not ref or row.get("refused"):
                    return None
                ok = _num(row.get("median_ms")) and _num(ref.get("median_ms"))
                return row["median_ms"] / ref["median_ms"] if ok else None

            fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(items) + 2), 4.5))
            _bars(ax, items, names, ratio)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_ylabel(f"time / {ref_name} ({items[0][0][4]})")
            ax.set_title(f"{layer}: time — {where}", fontsize=9)
            written.append(_save(plt, fig, folder / f"{layer}_time.png"))
        # Saved bytes do not depend on the mode: one bar group per case, from its first mode that recorded them.
        saved: dict = {}
        for k, p in all_items:
            if any(_num((row or {}).get("saved_bytes")) is not None for row in p.values()):
                saved.setdefault(k[:4], (k, p))
        if saved:
            items = list(saved.values())
            names = [n for n in PROVIDER_ORDER if any(n in p for _, p in items)]

            def mib(row, provs):
                return None if _num((row or {}).get("saved_bytes")) is None else row["saved_bytes"] / MIB

            fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(items) + 2), 4.5))
            _bars(ax, items, names, mib)
            ax.set_ylabel("MiB saved for backward, beyond x and the parameters")
            ax.set_title(f"{layer}: saved for backward — {where}", fontsize=9)
            written.append(_save(plt, fig, folder / f"{layer}_saved_bytes.png"))
    return written


def readme_block(docs: list[dict]) -> str:
    """The README results block: the newest CUDA run's table, or a sentence saying there is none yet."""
    gpu = [d for d in docs if d["environment"]["device"]["type"] == "cuda"]
    if not gpu:
        body = "_No GPU result file yet: this block is generated from the newest CUDA run in benchmarks/results/._"
    else:
        doc = gpu[-1]
        body = f"From `{Path(doc['_file']).name}`:\n\n{markdown_table(doc)}"
    return f"{README_START}\n{body}\n{README_END}"


def update_readme(readme: Path, docs: list[dict]) -> bool:
    """Replace the block between the markers; returns whether the file changed. Raises if the markers are missing."""
    readme = Path(readme)
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} block to regenerate")
    new = text[:start] + readme_block(docs) + text[end + len(README_END) :]
    if new != text:
        readme.write_text(new)
    return new != text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastlora.benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="result files or folders of them")
    parser.add_argument("--plots", type=Path, help="folder for the PNG plots (of the newest file)")
    parser.add_argument("--readme", type=Path, help="README to regenerate the results block of")
    args = parser.parse_args(argv)
    try:
        docs = load(args.paths)
    except (OSError, ValueError, KeyError) as exc:
        print(f"report: cannot read the result files: {exc}", file=sys.stderr)
        return 2
    if not docs:
        print("report: no result files found", file=sys.stderr)
        return 2
    for doc in docs:
        print(f"## {Path(doc['_file']).name}\n\n{markdown_table(doc)}\n")
    if args.plots:
        try:
            written = plots(docs[-1], args.plots)
        except ImportError as exc:
            print(f"report: --plots needs matplotlib ({exc}); install it with {PLOT_HINT}", file=sys.stderr)
            return 1
        for path in written:
            print(f"wrote {path}")
    if args.readme:
        try:
            changed = update_readme(args.readme, docs)
        except ValueError as exc:
            print(f"report: {exc}", file=sys.stderr)
            return 2
        print(f"{args.readme}: {'results block regenerated' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
