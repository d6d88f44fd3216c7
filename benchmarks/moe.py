"""LoRA on MoE experts: one experts block of a Qwen3-MoE model (the model's own experts module, random weights and a
fixed random routing), forward and forward+backward, with LoRA on both expert weights (``gate_up_proj`` and
``down_proj``, PEFT's ``target_parameters``).

Providers, on the same weights, routing, inputs and adapter:

- ``base``: the experts module alone through transformers' ``grouped_mm`` implementation (no LoRA);
- ``peft``: PEFT's ``target_parameters`` LoRA (its ParamWrappers form W + s B A per call) over ``grouped_mm``;
- ``fastlora``: ``fl.apply_lora(..., target_parameters=...)``: the grouped LoRA GEMMs (fastlora.ops.moe).

Shapes: on CUDA the Qwen3-30B-A3B-like block (E=128 experts, hidden 2048, expert intermediate 768, 4096 tokens,
top-8, r=16, bf16); on CPU a small block (E=8, hidden 256, intermediate 512, 512 tokens, top-2, r=16, fp32).
Accuracy gate: output and every gradient (hidden states, lora_A, lora_B) against PEFT's block evaluated in float64;
a provider passes within the dtype's tolerance or at most twice PEFT's own error.

Run alone: ``python -m fastlora.benchmarks.moe [--out FILE] [--experts E --hidden H --inter I --tokens T --top-k K
--rank R --dtype fp32|bf16|fp16]``; or as part of ``fastlora bench`` (``--layer moe``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
from fastlora.benchmarks.harness import Progress, Settings, peak_memory, ratio, saved_bytes, synchronize, time_fn

import fastlora
from fastlora._tolerance import TOLERANCE, rel_err
from fastlora.validate import dtype_id

TARGETS = ["experts.gate_up_proj", "experts.down_proj"]
MODES = ("forward", "forward+backward")


@dataclass(frozen=True)
class BlockShape:
    experts: int
    hidden: int
    inter: int
    tokens: int
    top_k: int
    rank: int

    @property
    def label(self) -> str:
        return f"E{self.experts}-h{self.hidden}-i{self.inter}-t{self.tokens}-k{self.top_k}-r{self.rank}"

    def as_dict(self) -> dict:
        return dict(self.__dict__)


GPU_SHAPE = BlockShape(experts=128, hidden=2048, inter=768, tokens=4096, top_k=8, rank=16)
CPU_SHAPE = BlockShape(experts=8, hidden=256, inter=512, tokens=512, top_k=2, rank=16)


class Block(nn.Module):
    """The experts module of one MoE layer, called with a fixed routing (the router is not what is measured)."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts

    def forward(self, hidden, top_k_index, top_k_weights):
        return self.experts(hidden, top_k_index, top_k_weights)


def build_experts(shape: BlockShape, device, dtype, implementation: str = "grouped_mm") -> nn.Module:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=shape.hidden, moe_intermediate_size=shape.inter, num_experts=shape.experts,
                         num_experts_per_tok=shape.top_k, experts_implementation=implementation)  # fmt: skip
    experts = Qwen3MoeExperts(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return experts.to(device=device, dtype=dtype).requires_grad_(False)


def routing(shape: BlockShape, device, seed: int = 1):
    """(top_k_index [T, k], top_k_weights [T, k]) from random router logits: softmax, top-k, renormalised."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape.tokens, shape.experts, generator=gen)
    weights, index = torch.topk(logits.softmax(-1), shape.top_k, dim=-1)
    return index.to(device), (weights / weights.sum(-1, keepdim=True)).to(device)


def _adapters(block: nn.Module) -> dict[str, nn.Parameter]:
    """{wrapper name + ".lora_A" / ".lora_B": Parameter} of fastlora's LoRAExperts and PEFT's ParamWrappers."""
    out = {}
    for name, m in block.named_modules():
        if hasattr(m, "parameter_name") and hasattr(m, "lora_A"):
            for attr in ("lora_A", "lora_B"):
                t = getattr(m, attr)
                out[f"{name}.{attr}"] = t if isinstance(t, nn.Parameter) else t["default"].weight
    return out


def _adapter_values(block: nn.Module, seed: int = 2) -> dict[str, torch.Tensor]:
    """Random lora_A / lora_B for every adapter tensor of a block (B non-zero: nothing is computed on zeros)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * (0.02 if k.endswith("lora_B") else v.shape[-1] ** -0.5)
            for k, v in _adapters(block).items()}  # fmt: skip


def build_providers(shape: BlockShape, device, dtype, names=("base", "peft", "fastlora")):
    """{name: block} with one set of weights; the LoRA blocks hold the same adapter (PEFT's keys)."""
    experts = build_experts(shape, device, dtype)
    out = {"base": Block(experts)} if "base" in names else {}
    alpha = 2 * shape.rank
    values = None
    if "fastlora" in names:
        block = fastlora.apply_lora(Block(copy.deepcopy(experts)), target_parameters=TARGETS, r=shape.rank,
                                    alpha=alpha)  # fmt: skip
        values = _adapter_values(block)
        _load(block, values)
        out["fastlora"] = block
    if "peft" in names:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            return out
        block = Block(copy.deepcopy(experts))
        config = LoraConfig(r=shape.rank, lora_alpha=alpha, target_modules=[], target_parameters=TARGETS)
        inject_adapter_in_model(config, block)
        block.to(device=device, dtype=dtype)
        _load(block, values if values is not None else _adapter_values(block))
        out["peft"] = block
    return out


@torch.no_grad()
def _load(block: nn.Module, values: dict):
    for key, p in _adapters(block).items():
        p.copy_(values[key])


def _run(block, hidden, index, weights, dy):
    """Output and gradients (hidden states, then every adapter tensor in the order of its name)."""
    adapters = _adapters(block)
    for p in adapters.values():
        p.grad = None
    h = hidden.detach().requires_grad_()
    y = block(h, index, weights)
    y.backward(dy)
    return y.detach(), [h.grad] + [adapters[k].grad for k in sorted(adapters)]


def _accuracy(shape, dtype, blocks, hidden, index, weights, dy) -> dict[str, float]:
    """Each LoRA provider's worst relative error (output and every gradient) against PEFT's block in float64 on the
    same device (transformers' eager experts loop: grouped_mm has no float64)."""
    device = hidden.device
    reference = build_providers(shape, device, torch.float64, names=("peft",)).get("peft")
    if reference is None:
        return {}
    reference.experts.get_base_layer().config._experts_implementation_internal = "eager"
    _load(reference, {k: t.detach().double() for k, t in _adapters(blocks["fastlora"]).items()})
    ref_y, ref_grads = _run(reference, hidden.double(), index, weights.double(), dy.double())
    del reference
    errors = {}
    for name in ("peft", "fastlora"):
        if name in blocks:
            y, grads = _run(blocks[name], hidden, index, weights, dy)
            errs = [rel_err(y, ref_y)] + [rel_err(g, r) for g, r in zip(grads, ref_grads, strict=True)]
            errors[name] = max(errs)
    return errors


def measure(device, dtype, settings: Settings, progress, providers=None, shape: BlockShape | None = None,
            rounds: int | None = None) -> list[dict]:  # fmt: skip
    """Rows for the experts block, one per provider and mode. Each mode is timed in ``rounds`` rounds (3 on CPU,
    1 on CUDA), every provider once per round, and a row reports the median of its rounds' medians: on a CPU shared
    with other jobs the load drifts, and interleaving spreads the drift over the providers."""
    device = torch.device(device)
    shape = shape or (GPU_SHAPE if device.type == "cuda" else CPU_SHAPE)
    rounds = rounds or (1 if device.type == "cuda" else 3)
    names = [n for n in ("base", "peft", "fastlora") if providers is None or n in providers or n == "base"]
    blocks = build_providers(shape, device, dtype, names)
    gen = torch.Generator().manual_seed(3)
    index, weights = routing(shape, device)
    weights = weights.to(dtype)
    sets = [(torch.randn(shape.tokens, shape.hidden, generator=gen).to(device, dtype),
             torch.randn(shape.tokens, shape.hidden, generator=gen).to(device, dtype)) for _ in range(2)]  # fmt: skip
    errors = {}
    if "fastlora" in blocks:
        errors = _accuracy(shape, dtype, blocks, sets[0][0], index, weights, sets[0][1])
    base_rows = {}
    for name, block in blocks.items():
        lora = name != "base"
        err = errors.get(name)
        ok = True if not lora else err is not None and err <= max(TOLERANCE[dtype], 2 * errors.get("peft", 0.0))
        row = {
            "layer": "moe", "shape": shape.as_dict(), "shape_label": shape.label, "dtype": dtype_id(dtype),
            "dropout": 0.0, "provider": name, "threads": torch.get_num_threads(),
            "path": fastlora.active_path(device) if name == "fastlora" else "torch",
            "rel_err": {"y+grads vs float64 PEFT": err} if lora else None, "accuracy_ok": ok if lora else None,
            "accuracy_note": None if ok else f"error {err} vs PEFT's {errors.get('peft')}",
        }  # fmt: skip
        x0 = sets[0][0].detach().requires_grad_()
        try:
            extra, total, listing = saved_bytes(lambda b=block, x=x0: b(x, index, weights),
                                                [x0, index, weights, *block.parameters()])  # fmt: skip
            row.update(saved_bytes=extra, saved_bytes_total=total, saved_tensors=listing)
        except Exception as exc:
            row.update(saved_bytes=None, saved_tensors=f"{type(exc).__name__}: {exc}")
        base_rows[name] = row
    rows = []
    for mode in MODES:
        medians = {name: [] for name in blocks}
        failed = {}
        for i in range(rounds):
            for name, block in blocks.items():
                if name in failed:
                    continue
                progress(f"moe {shape.label} {dtype_id(dtype)} {name} {mode} (round {i + 1}/{rounds})")
                try:
                    fn, _, reset = _step(block, sets, index, weights, mode)
                    medians[name].append(time_fn(fn, device, settings, reset).median_ms)
                except Exception as exc:  # a provider that crashes is reported, not fatal to the run
                    failed[name] = f"{type(exc).__name__}: {exc}"
        for name, block in blocks.items():
            row = {**base_rows[name], "mode": mode, "error": failed.get(name), "round_medians_ms": medians[name]}
            if name not in failed:
                row["median_ms"] = statistics.median(medians[name])
                row["q20_ms"], row["q80_ms"] = min(medians[name]), max(medians[name])
                synchronize(device)
                row["peak_memory_bytes"] = peak_memory(_step(block, sets, index, weights, mode)[1], device)
            else:
                row["median_ms"] = None
            rows.append(row)
    _ratios(rows)
    return rows


def _step(block, sets, index, weights, mode):
    xs = [x.detach().requires_grad_() for x, _ in sets]
    reset = xs + list(_adapters(block).values())
    state = {"i": 0}

    def fn():
        state["i"] = (state["i"] + 1) % len(xs)
        y = block(xs[state["i"]], index, weights)
        if mode == "forward+backward":
            y.backward(sets[state["i"]][1])
        return y

    def single():
        y = block(xs[0], index, weights)
        if mode == "forward+backward":
            y.backward(sets[0][1])
        return y

    return fn, single, reset


def _ratios(rows):
    for mode in MODES:
        group = {r["provider"]: r for r in rows if r["mode"] == mode}
        base, peft = group.get("base"), group.get("peft")
        for r in group.values():
            r["refused"] = None if r["accuracy_ok"] is not False else f"accuracy check failed: {r['accuracy_note']}"
            ok = r["refused"] is None and r.get("median_ms")
            r["ratio_to_base"] = ratio(r["median_ms"], base and base.get("median_ms")) if ok else None
            r["ratio_to_peft"] = ratio(r["median_ms"], peft and peft.get("median_ms")) if ok else None
            r["ratio_to_peft_style"] = None
            r["speedup_vs_peft_style"] = None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None)
    for name in ("experts", "hidden", "inter", "tokens", "top-k", "rank"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before measuring (CPU)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds per mode (default 3 on CPU, 1 on CUDA)")
    parser.add_argument("--warmup-ms", type=float, default=None)
    parser.add_argument("--rep-ms", type=float, default=None)
    parser.add_argument("--out", default=None, help="result file (.json) or folder (a stamped file name)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    default = GPU_SHAPE if device.type == "cuda" else CPU_SHAPE
    shape = BlockShape(**{k: getattr(args, k) or getattr(default, k) for k in default.__dict__})
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = dtypes[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    settings = Settings()
    if args.warmup_ms is not None:
        settings.warmup_ms = args.warmup_ms
    if args.rep_ms is not None:
        settings.rep_ms = args.rep_ms
    from fastlora._env import environment

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(device, dtype, settings, Progress(), shape=shape, rounds=args.rounds)
    mode = "cuda" if device.type == "cuda" else "cpu (torch path, small shapes; the Triton kernels are not timed)"
    doc = {"schema": 1, "environment": environment(device), "mode": mode, "command": " ".join(sys.argv),
           "fastlora_path": {"moe": fastlora.active_path(device)},
           "settings": {**settings.as_dict(), "threads": torch.get_num_threads()}, "ceilings": None,
           "results": rows, "skipped": []}  # fmt: skip
    for r in rows:
        err = (r.get("rel_err") or {}).get("y+grads vs float64 PEFT")
        cells = [f"{r['provider']:9s}", f"{r['mode']:17s}", f"{r.get('median_ms') or float('nan'):9.3f} ms"]
        cells += [
            f"x base {r.get('ratio_to_base') or float('nan'):.2f}",
            f"x peft {r.get('ratio_to_peft') or float('nan'):.2f}",
        ]
        cells += [f"saved {r.get('saved_bytes') or 0:,d} B", f"err {err}"]
        print("  ".join(cells))
    if args.out:
        from fastlora.benchmarks.suite import write

        print(f"wrote {write(doc, args.out)}")
    return 0 if all(r.get("refused") is None and r.get("error") is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
