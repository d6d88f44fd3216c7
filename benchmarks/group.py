"""Sibling groups: the LoRA projections that read one input, grouped into one op against the same layers unfused,
PEFT, the PEFT-style reference and the bare frozen projections.

Blocks at Llama-3-8B's shapes (hidden 4096, 32 heads, 8 key-value heads, MLP 14336), r=16, alpha=32, M = 8192
tokens on a GPU:

- attention: q_proj (4096 -> 4096), k_proj and v_proj (4096 -> 1024) on one x;
- mlp: gate_proj and up_proj (4096 -> 14336) on one x;
- llama layer (CPU only): one whole Llama decoder layer (its seven projections adapted; q/k/v and gate/up grouped),
  the figure behind "a Llama block at or below the unfused time" on the torch path.

On CPU the same blocks at small shapes (hidden 256, MLP 704, 512 tokens), float32, torch path. Each provider is a
module whose forward calls its projections one by one on one x, as the model's code does, and returns their outputs;
forward+backward is backward of sum(y_i * g_i). Accuracy gate: in float32 with dropout off, every output and every
LoRA gradient against PEFT's layers evaluated in float64; a provider passes within the float32 tolerance (at the
run's dtype: its tolerance, or twice the PEFT-style reference's error). Rows carry the ratio of the grouped layers to
the unfused ones ("ratio_to_unfused") besides the harness's ratios.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from fastlora.benchmarks.harness import Settings, peak_memory, ratio, time_fns

import fastlora
from fastlora._tolerance import TOLERANCE, rel_err
from fastlora.reference import PeftStyleLinear
from fastlora.validate import dtype_id

RANK, ALPHA = 16, 32
GPU = dict(hidden=4096, heads=32, kv_heads=8, intermediate=14336, tokens=8192)
CPU = dict(hidden=256, heads=8, kv_heads=2, intermediate=704, tokens=512)
BLOCKS = ("attention", "mlp")
PROVIDERS = ("base", "peft_style", "peft", "fastlora_unfused", "fastlora")
FB = "forward+backward"


class Block(nn.Module):
    """Sibling projections on one input, called one by one."""

    def __init__(self, widths: dict[str, int], hidden: int):
        super().__init__()
        for name, n in widths.items():
            setattr(self, name, nn.Linear(hidden, n, bias=False))
        self.names = tuple(widths)

    def forward(self, x):
        return [getattr(self, name)(x) for name in self.names]


def block_widths(block: str, dims: dict) -> dict[str, int]:
    h, kv = dims["hidden"], dims["hidden"] * dims["kv_heads"] // dims["heads"]
    if block == "attention":
        return {"q_proj": h, "k_proj": kv, "v_proj": kv}
    return {"gate_proj": dims["intermediate"], "up_proj": dims["intermediate"]}


def _llama_layer(dims: dict, device, dtype):
    """A one-layer Llama (the decoder layer the figure is about, a small vocabulary around it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=dims["hidden"], intermediate_size=dims["intermediate"],
                      num_hidden_layers=1, num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"],
                      max_position_embeddings=dims["tokens"])  # fmt: skip
    with torch.device(device):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).requires_grad_(False)


def _lora_params(module) -> list[torch.Tensor]:
    return [p for n, p in module.named_parameters() if "lora_" in n]


def _key(name: str) -> str:
    """A LoRA tensor's name without PEFT's wrapper and adapter name (fastlora's layers' names)."""
    return name.removeprefix("base_model.model.").replace(".default.weight", "").replace(".default", "")


def providers(base: nn.Module, names, dropout: float) -> dict[str, nn.Module]:
    """Each provider around a copy of ``base`` (its frozen weights shared by value), LoRA on ``names``."""
    from peft import LoraConfig, inject_adapter_in_model

    out = {"base": base}
    peft = copy.deepcopy(base)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=list(names)),
                            peft)  # fmt: skip
    peft.to(next(base.parameters()).dtype)
    gen = torch.Generator().manual_seed(1)
    values = {}
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.05).to(p.device, p.dtype))
                values[_key(n)] = p
    style = copy.deepcopy(base)
    for name, module in list(style.named_modules()):
        if name.rpartition(".")[2] in names and isinstance(module, nn.Linear):
            style.set_submodule(name, PeftStyleLinear(module, RANK, ALPHA, dropout))
    out["peft_style"] = style
    out["peft"] = peft
    for provider, fuse in (("fastlora_unfused", False), ("fastlora", True)):
        model = fastlora.apply_lora(copy.deepcopy(base), list(names), r=RANK, alpha=ALPHA, dropout=dropout, fuse=fuse)
        out[provider] = model
    with torch.no_grad():
        for provider in ("peft_style", "fastlora_unfused", "fastlora"):
            for n, p in out[provider].named_parameters():
                if "lora_" in n:
                    p.copy_(values[n].reshape(p.shape))
    for model in out.values():
        model.requires_grad_(False)
        for p in _lora_params(model):
            p.requires_grad_(True)
    return out


def _outputs(y) -> list[torch.Tensor]:
    return list(y) if isinstance(y, (list, tuple)) else [y.logits if hasattr(y, "logits") else y]


def _run_once(module, x, grads):
    ys = _outputs(module(**x) if isinstance(x, dict) else module(x))
    torch.autograd.backward(ys, grads)
    return ys


def _check(provs, make_input, grads_for, dtype) -> dict:
    """{provider: largest relative error of its outputs and LoRA gradients} against PEFT in float64."""
    ref = copy.deepcopy(provs["peft"]).double().eval()
    x = make_input(torch.float64)
    ys = _outputs(ref(**x) if isinstance(x, dict) else ref(x))
    g = grads_for(ys)
    torch.autograd.backward(ys, g)
    ref_grads = {_key(n): p.grad for n, p in ref.named_parameters() if p.grad is not None}
    errors = {}
    for name, module in provs.items():
        if name == "base":
            continue
        module.eval()
        for p in _lora_params(module):
            p.grad = None
        x = make_input(dtype)
        got = _run_once(module, x, [t.to(dtype) for t in g])
        grads = {_key(n): p.grad for n, p in module.named_parameters() if p.grad is not None}
        errs = [rel_err(a, b) for a, b in zip(got, ys, strict=True)]
        errs += [rel_err(grads[k].reshape(v.shape), v) for k, v in ref_grads.items()]
        errors[name] = max(errs)
        module.train()
        for p in _lora_params(module):
            p.grad = None
    return errors


def measure(device, dtype, dropout: float, settings: Settings, progress, providers_filter=None) -> list[dict]:
    """Rows for the sibling blocks (and on CPU the Llama layer), one per block, provider and mode."""
    dims = GPU if device.type == "cuda" else CPU
    rows = []
    cases = list(BLOCKS) + ([] if device.type == "cuda" else ["llama layer"])
    for block in cases:
        if block == "llama layer":
            base = _llama_layer(dims, device, dtype)
            names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
            seq = 128
            gen = torch.Generator().manual_seed(2)
            ids = torch.randint(0, 128, (dims["tokens"] // seq, seq), generator=gen).to(device)

            def make_input(dt, ids=ids):
                return {"input_ids": ids}

            shape = {"layers": 1, **dims, "rank": RANK, "seq": seq}
            label = f"L1-h{dims['hidden']}-t{dims['tokens']}-r{RANK}"
        else:
            widths = block_widths(block, dims)
            base = Block(widths, dims["hidden"]).to(device, dtype).requires_grad_(False)
            names = tuple(widths)
            gen = torch.Generator().manual_seed(2)
            x0 = torch.randn(dims["tokens"], dims["hidden"], generator=gen).to(device)

            def make_input(dt, x0=x0):
                return x0.to(dt).requires_grad_()

            shape = {"M": dims["tokens"], "K": dims["hidden"], **widths, "r": RANK}
            outs = "-".join(f"{n.split('_')[0]}{w}" for n, w in widths.items())
            label = f"M{dims['tokens']}-K{dims['hidden']}-{outs}"
        provs = providers(base, names, dropout)
        if providers_filter:  # PEFT stays (the accuracy reference), the unfused layers with fastlora
            unfused = ("fastlora_unfused",) if "fastlora" in providers_filter else ()
            keep = {*providers_filter, *unfused, "base", "peft"}
            provs = {k: v for k, v in provs.items() if k in keep}

        def grads_for(ys):
            gen = torch.Generator().manual_seed(3)
            return [torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device) for y in ys]

        errors = _check(provs, make_input, grads_for, dtype)
        fns, reset = {}, []
        for name, module in provs.items():
            module.train()
            x = make_input(dtype)
            reset += _lora_params(module) + ([x] if isinstance(x, torch.Tensor) else [])
            fns[name, "forward"] = lambda module=module, x=x: module(**x) if isinstance(x, dict) else module(x)
            if _lora_params(module) or isinstance(x, torch.Tensor):  # something to differentiate
                g = [t.to(dtype) for t in grads_for(_outputs(fns[name, "forward"]()))]
                fns[name, FB] = lambda module=module, x=x, g=g: _run_once(module, x, g)
        progress(f"group {block} {dtype_id(dtype)} p={dropout:g}: {len(fns)} timings, interleaved")
        timings = time_fns(fns, device, settings, reset)
        for (name, mode), fn in fns.items():
            err = errors.get(name)
            ok = err is None or err <= max(TOLERANCE[dtype], 2 * errors["peft_style"])
            t = timings[name, mode]
            for p in reset:
                p.grad = None
            rows.append({
                "layer": "group",
                "block": block,
                "shape": shape,
                "shape_label": f"{block} {label}",
                "dtype": dtype_id(dtype),
                "dropout": dropout,
                "provider": name,
                "path": fastlora.active_path(device) if name.startswith("fastlora") else "torch",
                "mode": mode,
                "rel_err": None if err is None else {"outputs+grads vs fp64": err},
                "accuracy_ok": None if err is None else ok,
                "accuracy_note": None if ok else f"error {err:.2e} vs PEFT-style's {errors['peft_style']:.2e}",
                "error": None,
                "median_ms": t.median_ms,
                "q20_ms": t.q20_ms,
                "q80_ms": t.q80_ms,
                "reps": t.reps,
                "peak_memory_bytes": peak_memory(fn, device),
                "threads": torch.get_num_threads() if device.type == "cpu" else None,
            })  # fmt: skip
        del provs
    _ratios(rows)
    return rows


def _ratios(rows: list[dict]) -> None:
    by_case: dict = {}
    for r in rows:
        by_case.setdefault((r["block"], r["mode"]), {})[r["provider"]] = r
    for provs in by_case.values():
        for r in provs.values():
            r["refused"] = None if r["accuracy_ok"] is not False else f"accuracy check failed: {r['accuracy_note']}"
            ok = r["refused"] is None and r.get("median_ms")

            def to(name, r=r, ok=ok, provs=provs):
                return ratio(r.get("median_ms"), (provs.get(name) or {}).get("median_ms")) if ok else None

            r["ratio_to_base"] = to("base")
            r["ratio_to_peft_style"] = to("peft_style")
            r["ratio_to_peft"] = to("peft")
            r["ratio_to_unfused"] = to("fastlora_unfused")
            r["speedup_vs_peft_style"] = ratio(1.0, r["ratio_to_peft_style"])


def table(rows: list[dict]) -> str:
    """Markdown: per block and mode, each provider's ms and its ratio to the unfused fastlora layers and to PEFT."""
    lines = ["| block | dtype | p | mode | provider | ms | / unfused | / PEFT | rel err | check |",
             "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip

    def f(v, fmt):
        return "-" if v is None else fmt.format(v)

    for r in rows:
        err = (r.get("rel_err") or {}).get("outputs+grads vs fp64")
        check = "-" if r["accuracy_ok"] is None else ("ok" if r["accuracy_ok"] else "REFUSED (accuracy)")
        lines.append(
            f"| {r['shape_label']} | {r['dtype']} | {r['dropout']:g} | {r['mode']} | {r['provider']} | "
            f"{f(r.get('median_ms'), '{:.3f}')} | {f(r['ratio_to_unfused'], '{:.2f}')} | "
            f"{f(r['ratio_to_peft'], '{:.2f}')} | {f(err, '{:.1e}')} | {check} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m fastlora.benchmarks.group``: the blocks on this device, a JSON result file and a markdown table."""
    import argparse
    import json
    import sys
    from pathlib import Path

    from fastlora._env import environment

    parser = argparse.ArgumentParser(prog="python -m fastlora.benchmarks.group", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dropout", type=float, action="append", help="dropout probabilities (default: 0)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (a shared machine: 1 keeps timings steady)")
    parser.add_argument("--out", type=Path, help="JSON result file, or a folder to write one into")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        dtype, settings = torch.bfloat16, Settings(25, 200)
    else:
        dtype, settings = torch.float32, Settings(100, 3000, min_reps=15)
    rows = []
    for p in args.dropout or [0.0]:
        rows += measure(device, dtype, p, settings, lambda m: print(m, file=sys.stderr, flush=True))
    doc = {"environment": environment(device), "rows": rows}
    print(table(rows))
    if args.out:
        out = args.out
        if out.suffix != ".json":
            stamp = doc["environment"]["time_utc"].replace(":", "").replace("-", "")
            out = out / f"group-{device.type}-{stamp}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
