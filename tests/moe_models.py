"""Tiny MoE models built from configs with random weights (no downloads), for the LoRA-on-experts tests.

Three families whose experts differ in what fastlora must honour: Qwen3-MoE ([E, out, in] weights, SiLU gate),
Mixtral (the same layout, its own router) and gpt-oss (transposed [E, in, out] weights, biases, an interleaved and
clamped gate in its own ``_apply_gate``). Sizes are multiples of 8, so that transformers' grouped_mm path (16-byte
aligned strides on CPU) serves as the previous implementation too.
"""

from __future__ import annotations

import torch
import torch.nn as nn

VOCAB = 64
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss")


def _common(hidden: int, top_k: int) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=top_k)  # fmt: skip


def build(family: str, hidden: int = 32, intermediate: int = 24, experts: int = 4, top_k: int = 2,
          implementation: str | None = None) -> nn.Module:  # fmt: skip
    """A 2-layer model of ``family`` with random weights (expert biases too), in eval mode."""
    common = _common(hidden, top_k)
    if implementation is not None:
        common["experts_implementation"] = implementation
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        cfg = Qwen3MoeConfig(**common, intermediate_size=2 * intermediate, moe_intermediate_size=intermediate,
                             num_experts=experts)  # fmt: skip
        model = Qwen3MoeForCausalLM(cfg)
    elif family == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        model = MixtralForCausalLM(MixtralConfig(**common, intermediate_size=intermediate, num_local_experts=experts))
    elif family == "gpt_oss":
        from transformers import GptOssConfig, GptOssForCausalLM

        cfg = GptOssConfig(**common, intermediate_size=intermediate, num_local_experts=experts, head_dim=8,
                           layer_types=["sliding_attention", "full_attention"],
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # fmt: skip
        model = GptOssForCausalLM(cfg)
    else:
        raise ValueError(f"unknown family {family!r}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or "router" in name or name.endswith("gate.weight"):
                p.normal_(0.0, 0.2)  # routers, expert weights and biases: random, never zero
    return model.eval()


def experts_modules(model: nn.Module) -> list[nn.Module]:
    """The transformers experts modules of a model (under any wrappers)."""
    from fastlora.experts import is_experts_module

    return [m for m in model.modules() if is_experts_module(m)]
