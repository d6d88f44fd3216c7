"""Tiny models built from configs with random weights (no downloads), and helpers the model-level tests share."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import fastlora
import fastlora.layers

VOCAB = 61


def _llama(vocab: int, hidden: int, intermediate: int) -> nn.Module:
    """A 2-layer Llama (4 heads, 2 key-value heads) with random weights, in training mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def llama(vocab: int = VOCAB) -> nn.Module:
    return _llama(vocab, hidden=32, intermediate=40).eval()


def qwen2(vocab: int = VOCAB) -> nn.Module:
    """A 2-layer Qwen2 (biases on q, k and v; 4 heads, 2 key-value heads) with random weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return Qwen2ForCausalLM(cfg).eval()


def mistral(vocab: int = VOCAB) -> nn.Module:
    """A 2-layer Mistral (sliding-window attention; 4 heads, 2 key-value heads) with random weights."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        sliding_window=4)  # fmt: skip
    return MistralForCausalLM(cfg).eval()


def bart(vocab: int = VOCAB) -> nn.Module:
    """A 1+1-layer BART (encoder-decoder: the decoder's cross-attention reads the encoder's states in k and v)."""
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=vocab, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=32,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)  # fmt: skip
    return BartForConditionalGeneration(cfg).eval()


def llama_4bit(quant_type: str = "nf4", nested: bool = True, vocab: int = VOCAB) -> nn.Module:
    """A tiny Llama whose linear layers (all but lm_head) are bitsandbytes Linear4bit, quantized on the CPU. Every
    dimension is a multiple of 64 (bitsandbytes' CPU kernels want whole blocks per row)."""
    return quantize_4bit(_llama(vocab, hidden=64, intermediate=128), quant_type, nested)


def quantize_4bit(
    model: nn.Module, quant_type: str = "nf4", nested: bool = True, skip=("lm_head",), quant_storage=torch.uint8
) -> nn.Module:
    """Replaces each nn.Linear of ``model`` (but those named in ``skip``) by a bitsandbytes Linear4bit holding its
    weight quantized (compute dtype float32, packed bytes stored as ``quant_storage``), in place; returns the
    model, marked as loaded in 4 bits."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.rpartition(".")[2] in skip:
            continue
        q = bnb.nn.Linear4bit(
            module.in_features, module.out_features, bias=module.bias is not None, compute_dtype=torch.float32,
            compress_statistics=nested, quant_type=quant_type, quant_storage=quant_storage,
        )  # fmt: skip
        q.weight = bnb.nn.Params4bit(
            module.weight.data.clone(), requires_grad=False, compress_statistics=nested, quant_type=quant_type,
            quant_storage=quant_storage,
        )  # fmt: skip
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
        # no bf16 CPU inference kernel: in eval mode it would repack the weight and compute in bf16
        q.support_avx512bf16_for_cpu = False
        model.set_submodule(name, q.to(module.weight.device))  # the move quantizes
    model.is_loaded_in_4bit = True  # as transformers marks a model it loads in 4 bits (PEFT reads it)
    return model


def gpt2(vocab: int = VOCAB) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=24, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


class ConvNet(nn.Module):
    """A small conv net: two Conv2d (one strided and padded), a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        h = self.act(self.conv2(self.act(self.conv1(x))))
        return self.head(h.flatten(1))


def convnet() -> nn.Module:
    return ConvNet().eval()


def token_ids(batch: int = 2, seq: int = 7, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def randomise_lora(model: nn.Module):
    """Draws every adapter tensor fresh (a new adapter starts with B or A at zero and would check nothing)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave alone: module types and identities, parameter values, flags, state."""
    modules = {name: (type(m), id(m)) for name, m in model.named_modules()}
    params = {
        name: (id(p), p.detach().clone(), p.requires_grad) for name, p in model.named_parameters(remove_duplicate=False)
    }
    layer_state = {
        name: (m.r, m.lora_alpha, m.use_rslora, m.lora_dropout, m.merged, m.disabled)
        for name, m in model.named_modules()
        if isinstance(m, fastlora.LoRALayer)
    }
    return {"modules": modules, "params": params, "layers": layer_state}


def assert_unchanged(model: nn.Module, before: dict):
    after = snapshot(model)
    assert after["modules"] == before["modules"], "the module tree changed"
    assert after["layers"] == before["layers"], "a LoRA layer's settings changed"
    assert after["params"].keys() == before["params"].keys(), "the parameter names changed"
    for name, (pid, value, flag) in before["params"].items():
        pid2, value2, flag2 = after["params"][name]
        assert pid2 == pid, f"{name} was replaced by another Parameter"
        assert flag2 == flag, f"{name}.requires_grad changed"
        same = value2.shape == value.shape and bool((value2 == value).logical_or(value2.isnan() & value.isnan()).all())
        assert same, f"{name} changed value"


def copy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def float64_reference(base: nn.Module, lora_model: nn.Module) -> nn.Module:
    """A float64 copy of ``base`` with each adapted module's weight replaced by W + s * delta, computed in float64
    (DoRA: c * (W + s * delta) with c = g / ||W + s * delta|| per output row; lora_bias: bias + s * lora_bias)."""
    from fastlora.reference import conv2d_delta_weight, embedding_delta_weight, linear_delta_weight

    ref = copy.deepcopy(base).double()
    with torch.no_grad():
        for name, layer in lora_model.named_modules():
            if not isinstance(layer, fastlora.LoRALayer):
                continue
            a, b, s = layer.lora_A.double(), layer.lora_B.double(), layer.scaling
            target = ref.get_submodule(name)
            kind = type(layer).__name__
            if kind == "LoRAEmbedding":
                target.weight += embedding_delta_weight(a, b, s)
            elif kind == "LoRAConv2d":
                target.weight += conv2d_delta_weight(a, b, s)
            else:
                w = target.weight.t() if layer.fan_in_fan_out else target.weight
                w += linear_delta_weight(a, b, s)
                if layer.lora_magnitude_vector is not None:
                    w *= (layer.lora_magnitude_vector.double() / torch.linalg.vector_norm(w, dim=1))[:, None]
                if layer.lora_bias is not None:
                    lb = layer.lora_bias.double() * s
                    if target.bias is None:
                        target.bias = nn.Parameter(lb)
                    else:
                        target.bias += lb
    return ref
