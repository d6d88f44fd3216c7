"""Hugging Face Trainer and TRL's SFTTrainer with fastlora: save_model and checkpoints write a PEFT adapter holding
every trained tensor, and resuming from a checkpoint continues the loss curve and ends with the same adapter.

Tiny models from configs, datasets built in memory, a few CPU steps each (no downloads)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from helpers import assert_close
from safetensors.torch import load_file
from tiny_models import VOCAB, llama, llama_4bit

import fastlora as fl
from fastlora.peft import converted_layers

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

F32 = torch.float32
STEPS, SAVE_EVERY = 4, 2


@pytest.fixture(autouse=True)
def torch_path():
    with fl.use_backend("torch"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*keeps PEFT's forward.*")
        yield


class TokenRows(torch.utils.data.Dataset):
    """Random token rows, drawn once, as a causal-LM dataset (labels are the inputs)."""

    def __init__(self, rows=8, seq=8, vocab=VOCAB):
        self.ids = torch.randint(0, vocab, (rows, seq))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(out, **kwargs):
    settings = dict(
        output_dir=str(out), max_steps=STEPS, save_steps=SAVE_EVERY, save_strategy="steps", logging_steps=1,
        per_device_train_batch_size=2, learning_rate=2e-2, lr_scheduler_type="constant", report_to=[],
        use_cpu=True, seed=7, dataloader_num_workers=0,
    )  # fmt: skip
    return transformers.TrainingArguments(**{**settings, **kwargs})


def losses(trainer) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in trainer.state.log_history if "loss" in row}


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def trained_tensors(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_resume_continues(make_trainer, tmp_path, expected_keys: int, adapter_folder: str = ""):
    """Trains STEPS steps, then trains a fresh copy from the middle checkpoint: the losses after it and the final
    adapter equal the uninterrupted run's; every checkpoint and save_model hold a PEFT adapter with every trained
    tensor."""
    first = make_trainer(tmp_path / "run")
    first.train()
    first.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "run" / f"checkpoint-{SAVE_EVERY}", tmp_path / "final"):
        folder = folder / adapter_folder
        saved = adapter_tensors(folder)
        assert len(saved) == expected_keys, sorted(saved)
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
        assert not (folder / "model.safetensors").exists()
    end = trained_tensors(first.model)
    assert len(end) == expected_keys

    second = make_trainer(tmp_path / "run")
    second.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{SAVE_EVERY}"))
    want, got = losses(first), losses(second)  # the resumed log starts with the checkpoint's history
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"loss at step {step}"
    resumed = trained_tensors(second.model)
    assert resumed.keys() == end.keys()
    for name in end:
        assert_close(resumed[name], end[name], F32, name)
    return first


def peft_llama(config: LoraConfig, seed: int = 3):
    torch.manual_seed(seed)
    model = get_peft_model(llama().train(), config)
    return fl.from_peft(model)


def test_trainer_saves_checkpoints_and_resumes_a_from_peft_model(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    data = TokenRows()

    def make(out):
        model = peft_llama(config)
        assert len(converted_layers(model)) == 4
        return transformers.Trainer(model=model, args=training_args(out), train_dataset=data)

    trainer = assert_resume_continues(make, tmp_path, expected_keys=2 * 4 + 1)
    reloaded = PeftModel.from_pretrained(llama_like(trainer.model), tmp_path / "final")
    ids = data.ids[:2]
    assert_close(reloaded(ids).logits, trainer.model(ids).logits, F32, "PEFT reload of save_model")


def llama_like(peft_model):
    """A fresh copy of the base model under ``peft_model`` (its base weights, no adapter)."""
    return copy.deepcopy(peft_model).unload()


def tiny_tokenizer():
    """A word-level tokenizer over VOCAB made-up words, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def sft_setup():
    """(trl, a text dataset of made-up words, a function of the output folder giving the SFTConfig)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(2, VOCAB, (7,), generator=g)) for _ in range(8)]

    def args(out):
        return trl.SFTConfig(
            output_dir=str(out), max_steps=STEPS, save_steps=SAVE_EVERY, logging_steps=1, per_device_train_batch_size=2,
            learning_rate=2e-2, lr_scheduler_type="constant", report_to=[], use_cpu=True, seed=7, max_length=16,
        )  # fmt: skip

    return trl, datasets.Dataset.from_dict({"text": texts}), args


def test_sft_trainer_with_a_peft_config_then_from_peft_saves_and_resumes(tmp_path):
    trl, data, sft_args = sft_setup()
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")

    def make(out):
        torch.manual_seed(5)
        trainer = trl.SFTTrainer(
            model=llama().train(), args=sft_args(out), train_dataset=data, processing_class=tiny_tokenizer(),
            peft_config=config,
        )  # fmt: skip
        fl.from_peft(trainer.model)
        assert len(converted_layers(trainer.model)) == 14
        return trainer

    assert_resume_continues(make, tmp_path, expected_keys=2 * 14)


def test_trainer_trains_a_4bit_from_peft_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(3)
    base = llama_4bit()
    model = fl.from_peft(get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])))
    start = trained_tensors(model)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenRows())
    trainer.train()
    assert all(not torch.equal(p, start[n]) for n, p in trained_tensors(model).items())
    assert len(adapter_tensors(tmp_path / f"checkpoint-{STEPS}")) == 2 * 4


# ----------------------------------------------------------------------------------------------------------
# apply_lora models, through fl.adapter_trainer
# ----------------------------------------------------------------------------------------------------------


def lora_llama(seed: int = 3, **kwargs):
    torch.manual_seed(seed)
    settings = {"target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8} if "config" not in kwargs else {}
    settings.update((k, v) for k, v in kwargs.items() if v is not None)
    return fl.apply_lora(llama().train(), **settings)


def test_plain_trainer_on_an_apply_lora_model_saves_the_whole_model(tmp_path):
    """What adapter_trainer is for: the plain Trainer does not know fastlora's adapters and writes the whole
    model, which is not an adapter folder."""
    trainer = transformers.Trainer(
        model=lora_llama(), args=training_args(tmp_path, max_steps=1), train_dataset=TokenRows()
    )
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "model.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        fl.load_adapter(llama(), tmp_path / "final")


def test_adapter_trainer_saves_checkpoints_and_resumes_an_apply_lora_model(tmp_path):
    data = TokenRows()
    trainer_class = fl.adapter_trainer(transformers.Trainer)
    assert fl.adapter_trainer(trainer_class) is trainer_class and issubclass(trainer_class, transformers.Trainer)

    def make(out):
        model = lora_llama(modules_to_save=["lm_head"])
        return trainer_class(model=model, args=training_args(out), train_dataset=data)

    trainer = assert_resume_continues(make, tmp_path, expected_keys=2 * 4 + 1)
    reloaded = PeftModel.from_pretrained(llama_base_of(trainer.model), tmp_path / "final")
    ids = data.ids[:2]
    assert_close(reloaded(ids).logits, trainer.model(ids).logits, F32, "PEFT reload of save_model")


def llama_base_of(model):
    """The base model under a fastlora model (a copy, adapters removed)."""
    return fl.unload(copy.deepcopy(model))


def test_adapter_trainer_checkpoints_and_resumes_named_adapters(tmp_path):
    """Two adapters: the active one trains, both are saved in PEFT's layout and restored on resume."""
    data = TokenRows()

    def make(out):
        model = lora_llama(adapter_name="policy")
        fl.add_adapter(model, "reference", ["v_proj", "up_proj"], r=2, lora_alpha=4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_adapters.reference" in name:
                    p.normal_()
        return fl.adapter_trainer(transformers.Trainer)(model=model, args=training_args(out), train_dataset=data)

    trainer = assert_resume_continues(make, tmp_path, expected_keys=2 * 4, adapter_folder="policy")
    checkpoint = tmp_path / "run" / f"checkpoint-{SAVE_EVERY}"
    assert sorted(p.name for p in checkpoint.iterdir() if p.is_dir()) == ["policy", "reference"]
    assert len(adapter_tensors(checkpoint / "reference")) == 2 * 4
    reference = {k: v for k, v in fl.lora_state_dict(trainer.model, "reference").items()}
    assert all(torch.equal(reference[k], v) for k, v in adapter_tensors(tmp_path / "final" / "reference").items())


def test_adapter_sft_trainer_on_an_apply_lora_model(tmp_path):
    trl, data, sft_args = sft_setup()

    def make(out):
        model = lora_llama(target_modules=None, config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        return fl.adapter_trainer(trl.SFTTrainer)(
            model=model, args=sft_args(out), train_dataset=data, processing_class=tiny_tokenizer()
        )

    assert_resume_continues(make, tmp_path, expected_keys=2 * 14)


def test_adapter_trainer_trains_an_apply_lora_4bit_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer

    torch.manual_seed(3)
    model = llama_4bit()
    # what from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True)) sets
    model.hf_quantizer = AutoHfQuantizer.from_config(BitsAndBytesConfig(load_in_4bit=True))
    model.is_quantized = True
    fl.apply_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    with pytest.raises(ValueError, match="purely quantized"):
        transformers.Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenRows())
    start = trained_tensors(model)
    trainer = fl.adapter_trainer(transformers.Trainer)(
        model=model, args=training_args(tmp_path), train_dataset=TokenRows()
    )
    assert not hasattr(model, "_hf_peft_config_loaded") or not model._hf_peft_config_loaded
    trainer.train()
    assert all(not torch.equal(p, start[n]) for n, p in trained_tensors(model).items())
    assert len(adapter_tensors(tmp_path / f"checkpoint-{STEPS}")) == 2 * 4
