"""QLoRA with fastlora: train a LoRA adapter over a 4-bit (NF4) Llama-style model, save it, reload it in PEFT, merge.

The model is built from a transformers ``LlamaConfig`` with random weights (nothing is downloaded); its linear
layers (all but the output head) become bitsandbytes ``Linear4bit``, quantized to NF4 with double quantization, as
``BitsAndBytesConfig(load_in_4bit=True)`` would load them. The task is synthetic: every next token is the current
token plus one (mod the vocabulary). Runs on CPU in seconds.

    python examples/qlora.py [--steps 40] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

import bitsandbytes as bnb
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import fastlora as fl


def batch(vocab: int, size: int, length: int) -> torch.Tensor:
    start = torch.randint(0, vocab, (size, 1))
    return (start + torch.arange(length)) % vocab


def quantize_4bit(model: nn.Module) -> nn.Module:
    """Every nn.Linear but lm_head becomes a Linear4bit (NF4, double quantization, float32 compute)."""
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name == "lm_head":
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4")  # fmt: skip
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4")
        q.support_avx512bf16_for_cpu = False  # bitsandbytes' bf16 CPU inference kernel would blur the checks below
        model.set_submodule(name, q.to("cpu"))  # the move quantizes
    model.is_loaded_in_4bit = True  # what transformers marks on a model it loads in 4 bits (PEFT reads it)
    return model


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def run(steps: int = 40, out: str | None = None) -> dict:
    """Train, save, reload in PEFT and merge; returns the measurements (and raises SystemExit on a failed check)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
    )  # fmt: skip
    model = quantize_4bit(LlamaForCausalLM(config))
    base = copy.deepcopy(model)  # the same 4-bit codes, to reload the adapter into

    fl.apply_lora(model, "all-linear", r=8, alpha=16, dropout=0.05)
    fl.print_trainable_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in range(steps):
        ids = batch(config.vocab_size, 16, 16)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"loss fell from {first:.3f} to {last:.3f}")
    if not last < 0.5 * first:
        raise SystemExit("the loss did not fall by half; something is wrong")

    with tempfile.TemporaryDirectory(prefix="fastlora-") as folder:
        path = out or os.path.join(folder, "adapter")
        fl.save_adapter(model, path)
        from peft import PeftModel

        in_peft = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
        mine = fl.load_adapter(copy.deepcopy(base), path).eval()
    model.eval()
    ids = batch(config.vocab_size, 4, 16)
    with torch.no_grad():
        trained = model(ids).logits
        peft_logits = in_peft(ids).logits
        merged = fl.merge_and_unload(mine)(ids).logits  # dequantize, add s B A, quantize again (with a warning)
        peft_merged = in_peft.merge_and_unload()(ids).logits
    result = {
        "first_loss": first,
        "last_loss": last,
        "peft_vs_trained": relative(peft_logits, trained),
        "merged_vs_peft_merged": relative(merged, peft_merged),
        "merged_vs_trained": relative(merged, trained),
        "merged_accuracy": (merged[:, :-1].argmax(-1) == ids[:, 1:]).float().mean().item(),
    }
    print(f"PEFT on the saved adapter vs trained: relative difference {result['peft_vs_trained']:.2e}")
    print(f"fastlora's merge vs PEFT's merge: relative difference {result['merged_vs_peft_merged']:.2e}")
    print(f"merged vs unmerged (the 4-bit rounding of W + s B A): {result['merged_vs_trained']:.2e}")
    print(f"merged model predicts the next token with accuracy {result['merged_accuracy']:.2f}")
    if not (result["peft_vs_trained"] < 1e-5 and result["merged_vs_peft_merged"] < 1e-5):
        raise SystemExit("PEFT disagrees with fastlora")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=None, help="adapter folder to keep (default: a temporary one)")
    args = parser.parse_args()
    run(args.steps, args.out)


if __name__ == "__main__":
    main()
