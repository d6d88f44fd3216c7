"""End to end: one LoRA fine-tuning step (forward with loss, backward, AdamW step) of a Llama-style model built
from a transformers ``LlamaConfig`` with random weights, LoRA (r=16) on every linear layer of the decoder.

Providers: the PEFT-style reference, PEFT itself (``target_modules="all-linear"``) and fastlora, all with the
same base weights and the same LoRA weights. Reported: step time, tokens/s, peak memory.

Accuracy gate: with dropout off (eval mode), the loss and every LoRA gradient of each provider in the run's
dtype are compared with the PEFT-style model evaluated in float32; a provider passes when its error is within
the dtype's tolerance or at most twice the PEFT-style reference's own error.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from fastlora.benchmarks.harness import Cycle, Settings, peak_memory, ratio, synchronize, time_fn
from fastlora.benchmarks.providers import ALPHA_PER_RANK

import fastlora
from fastlora._tolerance import TOLERANCE, rel_err
from fastlora.reference import PeftStyleLinear
from fastlora.validate import dtype_id

GPU_CONFIG = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=4096,
)  # fmt: skip
CPU_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=512, max_position_embeddings=128,
)  # fmt: skip
RANK = 16


def _targets(model) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, module) of every nn.Linear inside the decoder layers (not the output head)."""
    out = []
    for parent in model.model.layers.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                out.append((parent, name, child))
    return out


class _Swap:
    """Wraps every target Linear with a LoRA module and puts the originals back on exit."""

    def __init__(self, model, provider: str, dropout: float):
        self.model, self.provider, self.dropout = model, provider, dropout

    def __enter__(self):
        targets = _targets(self.model)
        self.originals = [(p, n, m) for p, n, m in targets]
        self.peft_model = None
        if self.provider == "peft":
            from peft import LoraConfig, inject_adapter_in_model

            config = LoraConfig(r=RANK, lora_alpha=ALPHA_PER_RANK * RANK, lora_dropout=self.dropout,
                                target_modules="all-linear")  # fmt: skip
            inject_adapter_in_model(config, self.model)
            self.layers = [getattr(p, n) for p, n, _ in targets]
            self.factors = [(m.lora_A["default"].weight, m.lora_B["default"].weight) for m in self.layers]
        else:
            self.layers, self.factors = [], []
            for parent, name, lin in targets:
                if self.provider == "peft_style":
                    layer = PeftStyleLinear(lin, RANK, ALPHA_PER_RANK * RANK, self.dropout)
                else:
                    layer = fastlora.LoRALinear.from_module(
                        lin, r=RANK, alpha=ALPHA_PER_RANK * RANK, dropout=self.dropout
                    )
                setattr(parent, name, layer)
                self.layers.append(layer)
                self.factors.append((layer.lora_A, layer.lora_B))
        for layer in self.layers:
            layer.to(dtype=next(self.model.parameters()).dtype)
        return self

    def set_factors(self, values):
        with torch.no_grad():
            for (a, b), (va, vb) in zip(self.factors, values, strict=True):
                a.copy_(va)
                b.copy_(vb)

    def params(self):
        return [t for pair in self.factors for t in pair]

    def __exit__(self, *exc):
        for parent, name, lin in self.originals:
            setattr(parent, name, lin)
        if self.peft_model is None and hasattr(self.model, "peft_config"):
            del self.model.peft_config  # left by inject_adapter_in_model; the next injection starts clean
        return False


def build_model(device, dtype, quick_cpu: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**(GPU_CONFIG if device.type == "cuda" else CPU_CONFIG), attn_implementation="sdpa")
    with torch.device(device):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    model.to(dtype).requires_grad_(False)
    return model, cfg


def _lora_values(model, device, dtype, seed=0):
    """Random (A, B) for every target (B non-zero too, so nothing is computed on zeros)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    values = []
    for _, _, lin in _targets(model):
        k, n = lin.in_features, lin.out_features
        a = torch.randn(RANK, k, generator=gen, device=device).mul_(k**-0.5).to(dtype)
        b = torch.randn(n, RANK, generator=gen, device=device).mul_(0.02).to(dtype)
        values.append((a, b))
    return values


def _loss_and_grads(model, swap, ids):
    for p in swap.params():
        p.grad = None
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in swap.params()])
    return loss.detach().float(), grads


def _train_step(model, opt, batches):
    """One fine-tuning step (loss, backward, AdamW update) on the next batch of the rotation."""
    nxt = Cycle(batches)

    def step():
        ids = nxt()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(
    device, dtype, dropout: float, settings: Settings, progress, providers=None, batch=None, seq=None
) -> list[dict]:
    """Rows for the end-to-end step, one per provider."""
    model, cfg = build_model(device, dtype, device.type != "cuda")
    batch = batch or 2
    seq = seq or (2048 if device.type == "cuda" else 64)
    gen = torch.Generator(device=device).manual_seed(1)
    batches = [torch.randint(1, cfg.vocab_size, (batch, seq), generator=gen, device=device) for _ in range(3)]
    values = _lora_values(model, device, dtype)
    names = ["peft_style", "peft", "fastlora"]
    try:
        import peft  # noqa: F401
    except ImportError:
        names.remove("peft")
    if providers is not None:
        names = [n for n in names if n in providers or n == "peft_style"]

    # Accuracy: eval mode (dropout off); the float32 PEFT-style model is the reference.
    model.eval()
    model.float()
    with _Swap(model, "peft_style", dropout) as swap:
        swap.set_factors([(a.float(), b.float()) for a, b in values])
        ref_loss, ref_grads = _loss_and_grads(model, swap, batches[0])
    model.to(dtype)
    checks = {}
    for name in names:
        with _Swap(model, name, dropout) as swap:
            swap.set_factors(values)
            loss, grads = _loss_and_grads(model, swap, batches[0])
            checks[name] = max(rel_err(loss, ref_loss), rel_err(grads, ref_grads))
    model.train()

    # A step takes long: time enough of them for a median (do_bench counts repetitions from milliseconds).
    step_settings = Settings(max(settings.warmup_ms, 300.0), max(settings.rep_ms, 1500.0), settings.min_reps)
    if device.type != "cuda":
        step_settings = settings
    config = {"batch": batch, "seq": seq, "rank": RANK, **(GPU_CONFIG if device.type == "cuda" else CPU_CONFIG)}
    rows = []
    for name in names:
        with _Swap(model, name, dropout) as swap:
            swap.set_factors(values)
            opt = torch.optim.AdamW(swap.params(), lr=1e-4)
            step = _train_step(model, opt, batches)
            progress(f"llama step {dtype_id(dtype)} p={dropout:g} {name}")
            err = checks[name]
            ok = err <= max(TOLERANCE[dtype], 2 * checks["peft_style"])
            row = {
                "layer": "llama",
                "shape": config,
                "shape_label": f"L{cfg.num_hidden_layers}-h{cfg.hidden_size}-b{batch}-s{seq}-r{RANK}",
                "dtype": dtype_id(dtype),
                "dropout": dropout,
                "provider": name,
                "path": fastlora.active_path(device) if name == "fastlora" else "torch",
                "mode": "train step",
                "rel_err": {"loss+grads vs fp32": err},
                "accuracy_ok": ok,
                "accuracy_note": None if ok else f"error {err:.2e} vs PEFT-style's {checks['peft_style']:.2e}",
                "error": None,
            }
            try:
                timing = time_fn(step, device, step_settings)
                row.update(median_ms=timing.median_ms, q20_ms=timing.q20_ms, q80_ms=timing.q80_ms, reps=timing.reps)
                row["tokens_per_s"] = batch * seq / (timing.median_ms / 1e3)
                synchronize(device)
                row["peak_memory_bytes"] = peak_memory(step, device)
            except Exception as exc:
                row.update(median_ms=None, error=f"{type(exc).__name__}: {exc}")
            del opt
            rows.append(row)
    ref = next((r for r in rows if r["provider"] == "peft_style"), None)
    for r in rows:
        r["refused"] = None if r["accuracy_ok"] else f"accuracy check failed in this run: {r['accuracy_note']}"
        usable = r["refused"] is None and r.get("median_ms")
        r["ratio_to_base"] = None
        r["ratio_to_peft_style"] = ratio(r.get("median_ms"), ref and ref.get("median_ms")) if usable else None
        r["speedup_vs_peft_style"] = ratio(1.0, r["ratio_to_peft_style"])
    del model
    return rows
