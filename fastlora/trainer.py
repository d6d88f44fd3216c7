"""Hugging Face ``Trainer`` (and its subclasses, such as TRL's ``SFTTrainer``) for models that ``apply_lora`` adapted.

The Trainer treats a model as an adapter model only when it is a PEFT ``PeftModel``; anything else it saves whole
(``model.safetensors``) and resumes from a whole-model file, and it refuses a quantized model with no PEFT adapter
("purely quantized"). ``adapter_trainer(Trainer)`` returns a subclass that, for a model with fastlora adapters:

- saves with ``fl.save_adapter`` (``save_model`` and every checkpoint: every adapter in PEFT's layout, with its
  modules_to_save copies and trained biases; the tokenizer and training arguments as the Trainer saves them);
- resumes (and loads the best model) with ``fl.load_adapter``, adapter by adapter;
- accepts a quantized base model: the check the Trainer makes at construction reads transformers' flag for
  attached adapters, which is raised for the length of the constructor.

A ``PeftModel`` (with or without ``from_peft``) needs none of this: the plain Trainer serves it.

    trainer = fl.adapter_trainer(transformers.Trainer)(model=model, args=args, train_dataset=data)
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from fastlora.io import load_adapter, save_adapter
from fastlora.layers import DEFAULT_ADAPTER
from fastlora.model import adapter_names, lora_layers

__all__ = ["AdapterTrainerMixin", "adapter_trainer"]

_PEFT_FLAG = "_hf_peft_config_loaded"


def _has_adapters(model: nn.Module) -> bool:
    return bool(lora_layers(model))


class AdapterTrainerMixin:
    """Put before a Trainer class (``class MyTrainer(AdapterTrainerMixin, SFTTrainer)``); see the module docstring."""

    def __init__(self, model=None, *args, **kwargs):
        raise_flag = isinstance(model, nn.Module) and _has_adapters(model) and not getattr(model, _PEFT_FLAG, False)
        if raise_flag:
            model.__dict__[_PEFT_FLAG] = True
        try:
            super().__init__(model, *args, **kwargs)
        finally:
            if raise_flag:
                model.__dict__.pop(_PEFT_FLAG, None)

    def _adapter_model(self):
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        return model if _has_adapters(model) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._adapter_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        save_adapter(model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        return None

    def _load_adapters(self, folder: str, model: nn.Module):
        for name in adapter_names(model):
            load_adapter(model, folder if name == DEFAULT_ADAPTER else os.path.join(folder, name), adapter_name=name)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = model if model is not None else self._adapter_model()
        if target is None or not _has_adapters(target):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_adapters(resume_from_checkpoint, target)
        return None

    def _load_best_model(self) -> None:
        model = self._adapter_model()
        if model is None:
            return super()._load_best_model()
        self._load_adapters(self.state.best_model_checkpoint, model)
        return None


_CLASSES: dict[type, type] = {}


def adapter_trainer(trainer_class: type) -> type:
    """The subclass of ``trainer_class`` (``transformers.Trainer`` or a subclass of it) that saves, checkpoints and
    resumes fastlora adapters and trains them over a quantized base (see the module docstring)."""
    if not isinstance(trainer_class, type):
        raise TypeError(f"adapter_trainer expects a Trainer class, got {type(trainer_class).__name__}")
    if issubclass(trainer_class, AdapterTrainerMixin):
        return trainer_class
    from transformers import Trainer

    if not issubclass(trainer_class, Trainer):
        raise TypeError(f"adapter_trainer expects transformers.Trainer or a subclass, got {trainer_class.__name__}")
    if trainer_class not in _CLASSES:
        namespace = {"__module__": __name__, "__doc__": f"{trainer_class.__name__} with fastlora adapter files."}
        _CLASSES[trainer_class] = type(
            f"Adapter{trainer_class.__name__}", (AdapterTrainerMixin, trainer_class), namespace
        )
    return _CLASSES[trainer_class]
