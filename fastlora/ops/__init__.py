"""The LoRA ops, one module per layer kind: validation, torch path, autograd Function and compiled custom op,
each op defined once (see ``fastlora.ops._define``). ``backend`` picks the path; ``merge`` folds an adapter
into its base weight.
"""

from fastlora.ops.backend import active_path, get_backend, use_backend
from fastlora.ops.conv2d import lora_conv2d
from fastlora.ops.dora import lora_linear_dora
from fastlora.ops.embedding import lora_embedding
from fastlora.ops.linear import lora_linear
from fastlora.ops.merge import merge_delta_
from fastlora.ops.moe import lora_experts

__all__ = [
    "lora_linear",
    "lora_linear_dora",
    "lora_embedding",
    "lora_conv2d",
    "lora_experts",
    "merge_delta_",
    "use_backend",
    "get_backend",
    "active_path",
]
