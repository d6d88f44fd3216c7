"""Fine-tune a small Llama-style model with fastlora, save the adapter, reload it, merge it, and check agreement.

The model is built from a transformers ``LlamaConfig`` with random weights (nothing is downloaded). The task is
synthetic: every next token is the current token plus one (mod the vocabulary), which the frozen random model
cannot do and the adapter learns. Runs on CPU in seconds, or on a GPU with ``--device cuda``.

    python examples/finetune.py [--steps 40] [--device cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastlora as fl


def batch(vocab: int, size: int, length: int, device) -> torch.Tensor:
    start = torch.randint(0, vocab, (size, 1), device=device)
    return (start + torch.arange(length, device=device)) % vocab


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--out",
        default=None,
        help="adapter folder to keep (default: a temporary one, removed at the end)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,  # wider than the default, so the frozen random head can make confident predictions
    )
    model = LlamaForCausalLM(config).to(device)
    base_state = copy.deepcopy(model.state_dict())

    fl.apply_lora(model, "all-linear", r=8, alpha=16, dropout=0.05)
    fl.print_trainable_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    model.train()
    losses = []
    for step in range(args.steps):
        ids = batch(config.vocab_size, 16, 16, device)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"loss fell from {first:.3f} to {last:.3f}")
    if not last < 0.5 * first:
        raise SystemExit("the loss did not fall by half; something is wrong")

    if args.out:
        round_trip(model, config, base_state, args.out, device)
    else:
        with tempfile.TemporaryDirectory(prefix="fastlora-") as folder:  # removed when the check is done
            round_trip(model, config, base_state, os.path.join(folder, "adapter"), device)


def round_trip(model, config, base_state, out: str, device):
    """Save the adapter to ``out``, load it into a fresh copy of the base model, merge it, and compare outputs."""
    fl.save_adapter(model, out)
    print(f"saved {sorted(os.listdir(out))} to {out}")

    fresh = LlamaForCausalLM(config).to(device)
    fresh.load_state_dict(base_state)
    fl.load_adapter(fresh, out)
    model.eval()
    fresh.eval()
    ids = batch(config.vocab_size, 4, 16, device)
    with torch.no_grad():
        trained = model(ids).logits
        reloaded = fresh(ids).logits
        merged = fl.merge_and_unload(fresh)(ids).logits
    for name, value in (("reloaded", reloaded), ("merged", merged)):
        rel = ((value - trained).norm() / trained.norm()).item()
        print(f"{name} vs trained: relative difference {rel:.2e}")
        if not rel < 1e-5:
            raise SystemExit(f"the {name} model disagrees with the trained one")
    accuracy = (merged[:, :-1].argmax(-1) == ids[:, 1:]).float().mean().item()
    print(f"merged model predicts the next token with accuracy {accuracy:.2f}")


if __name__ == "__main__":
    main()
