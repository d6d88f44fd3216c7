"""fastlora: fused Triton kernels for LoRA fine-tuning, behind drop-in PyTorch layers."""

from fastlora.functional import active_path, get_backend, lora_conv2d, lora_linear, use_backend
from fastlora.layers import LoRAConv2d, LoRALayer, LoRALinear
from fastlora.reference import lora_scaling

__version__ = "0.1.0"

__all__ = [
    "lora_linear",
    "LoRALayer",
    "LoRALinear",
    "lora_conv2d",
    "LoRAConv2d",
    "lora_scaling",
    "use_backend",
    "get_backend",
    "active_path",
]
