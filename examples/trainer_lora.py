"""Hugging Face Trainer on several processes with fastlora: a PEFT training script plus one line, fl.from_peft(model).

    torchrun --nproc-per-node 2 examples/trainer_lora.py [--peft] [--out DIR]

The model is a small Llama built from a config with random weights (nothing is downloaded; a real script loads a
checkpoint with from_pretrained) and the task is synthetic (every next token is the current one plus one). With
``--peft`` the same training runs with PEFT's own LoRA layers, for comparison: the losses agree step for step.

The TrainingArguments ask accelerate for FSDP2 (``fsdp_config={"version": 2, ...}``), which it enables on GPUs. On
CPU processes accelerate (up to 1.16 at least) enables FSDP for accelerators only and wraps the model in DDP
instead; the script prints which one ran. from_peft keeps the model a PEFT model (its LoRA layers only compute with
fastlora's op), so the plain Trainer saves it as it saves any PEFT model: ``save_model`` writes the adapter in
PEFT's format from the main process (under FSDP2 from the state dict accelerate gathers).
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import fastlora as fl

VOCAB = 128


def base_model() -> LlamaForCausalLM:
    """A 2-layer Llama with random weights, the same in every process."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def dataset(rows: int = 64, length: int = 16) -> list[dict]:
    start = torch.randint(0, VOCAB, (rows, 1), generator=torch.Generator().manual_seed(1))
    ids = (start + torch.arange(length)) % VOCAB
    return [{"input_ids": row, "labels": row} for row in ids]


def build_trainer(use_peft: bool = False, output_dir: str | None = None) -> Trainer:
    model = get_peft_model(base_model(), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    if not use_peft:
        fl.from_peft(model)  # the one line: PEFT's LoRA layers now compute with fastlora's op
    training = TrainingArguments(
        output_dir=output_dir or ("peft-out" if use_peft else "fastlora-out"),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        fsdp=True,
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
    )
    return Trainer(model=model, args=training, train_dataset=dataset())


def train_and_save(trainer: Trainer):
    if trainer.is_world_process_zero():
        wrapper = "FSDP2" if trainer.is_fsdp_enabled else str(trainer.accelerator.distributed_type)
        layers = "fastlora" if fl.peft.converted_layers(trainer.model) else "PEFT"
        print(f"{trainer.args.world_size} processes, {wrapper}, {layers} LoRA layers")
    trainer.train()
    trainer.save_model()
    trainer.save_state()  # trainer_state.json: the loss of every step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--peft", action="store_true", help="train with PEFT's LoRA layers instead of fastlora's")
    parser.add_argument("--out", default=None, help="output folder (default: peft-out or fastlora-out)")
    args = parser.parse_args()
    train_and_save(build_trainer(args.peft, args.out))


if __name__ == "__main__":
    main()
