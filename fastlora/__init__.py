"""fastlora: fused Triton kernels for LoRA fine-tuning, behind drop-in PyTorch layers."""


def _attach_kernels() -> None:
    """Make ``fastlora.kernels`` importable from an editable install of a source checkout.

    The checkout keeps the Triton code in a top-level ``kernels/`` folder with no ``__init__.py``, so that from the
    checkout root (``python -m pytest``, ``python -c ...``) it never shadows another distribution's top-level
    ``kernels`` module (Hugging Face's, which transformers imports): a folder without one is only a namespace
    portion, which a real package anywhere on ``sys.path`` takes precedence over. A wheel installs the folder as
    ``fastlora/kernels``, found like any subpackage. setuptools' editable finder, though, resolves a mapped package
    only through its ``__init__.py``; there the folder beside this package is attached as a namespace package."""
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    name = __name__ + ".kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "kernels"
    if not (folder / "linear.py").is_file():  # not a source checkout: the import that needs it raises
        return
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    module = importlib.util.module_from_spec(spec)
    module.__doc__ = "Triton device code for fastlora and its launchers, one op per file."
    sys.modules[name] = module
    sys.modules[__name__].kernels = module


_attach_kernels()

from fastlora.io import load_adapter, lora_state_dict, save_adapter  # noqa: E402 (after the attachment above)
from fastlora.layers import LoRAConv2d, LoRAEmbedding, LoRALayer, LoRALinear, LoRALinear4bit  # noqa: E402 (after the attachment above)
from fastlora.model import (  # noqa: E402
    apply_lora,
    disable_adapter,
    from_peft,
    merge_and_unload,
    print_trainable_parameters,
    unload,
)
from fastlora.ops import (  # noqa: E402
    active_path,
    get_backend,
    lora_conv2d,
    lora_embedding,
    lora_linear,
    lora_linear_dora,
    use_backend,
)
from fastlora.ops.linear4bit import lora_linear_4bit  # noqa: E402 (after the attachment above)
from fastlora.reference import lora_scaling  # noqa: E402 (after the attachment above)

__version__ = "0.1.0"

__all__ = [
    "lora_linear",
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
    "merge_and_unload",
    "unload",
    "disable_adapter",
    "print_trainable_parameters",
    "lora_state_dict",
    "save_adapter",
    "load_adapter",
    "from_peft",
]
