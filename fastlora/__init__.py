"""fastlora: fused Triton kernels for LoRA fine-tuning, behind drop-in PyTorch layers."""

from fastlora.functional import active_path, get_backend, lora_embedding, lora_linear, use_backend
from fastlora.layers import LoRAEmbedding, LoRALayer, LoRALinear
from fastlora.reference import lora_scaling

__version__ = "0.1.0"

__all__ = [
    "lora_linear",
    "lora_embedding",
    "LoRALayer",
    "LoRALinear",
    "LoRAEmbedding",
    "lora_scaling",
    "use_backend",
    "get_backend",
    "active_path",
]
