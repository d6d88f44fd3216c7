"""fastlora: fused Triton kernels for LoRA fine-tuning, behind drop-in PyTorch layers."""

from fastlora import _kernels_path  # noqa: F401 (first: attaches fastlora.kernels in editable installs)
from fastlora.io import load_adapter, lora_state_dict, save_adapter
from fastlora.layers import LoRAConv2d, LoRAEmbedding, LoRALayer, LoRALinear, LoRALinear4bit
from fastlora.model import (
    ModulesToSave,
    add_adapter,
    apply_lora,
    delete_adapter,
    disable_adapter,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    unload,
)
from fastlora.ops import (
    active_path,
    get_backend,
    lora_conv2d,
    lora_embedding,
    lora_linear,
    lora_linear_dora,
    use_backend,
)
from fastlora.ops.group import GroupMember, lora_linear_group
from fastlora.ops.linear4bit import lora_linear_4bit
from fastlora.peft import from_peft
from fastlora.reference import lora_scaling
from fastlora.trainer import AdapterTrainerMixin, adapter_trainer

__version__ = "0.1.0"

__all__ = [
    "lora_linear",
    "lora_linear_group",
    "GroupMember",
    "lora_linear_dora",
    "lora_embedding",
    "LoRALayer",
    "LoRALinear",
    "lora_linear_4bit",
    "LoRALinear4bit",
    "LoRAEmbedding",
    "lora_conv2d",
    "LoRAConv2d",
    "lora_scaling",
    "use_backend",
    "get_backend",
    "active_path",
    # model-level API
    "apply_lora",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "ModulesToSave",
    "merge_and_unload",
    "unload",
    "disable_adapter",
    "print_trainable_parameters",
    "lora_state_dict",
    "save_adapter",
    "load_adapter",
    "from_peft",
    "adapter_trainer",
    "AdapterTrainerMixin",
]
