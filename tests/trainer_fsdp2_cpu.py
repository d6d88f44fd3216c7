"""Run by tests/test_trainer_distributed.py under torchrun, in one launch: examples/trainer_lora.py's Trainer with
PEFT's layers (the reference, DDP as accelerate runs on CPU), then with fastlora's layers through accelerate's FSDP2
code.

accelerate turns FSDP on for accelerator distributed types only (on CPU processes it wraps the model in DDP). For
the second run this script builds the example's Trainer and then gives accelerate the state it sets on GPUs for the
same TrainingArguments: distributed type FSDP, in the accelerator's state and in the process state it mirrors it to
(every later ``AcceleratorState()`` copies the process state back over its own), and the FSDP2 plugin made from the
example's ``fsdp_config``. Training then goes through accelerate's FSDP2 preparation (fully_shard on every
LlamaDecoderLayer and on the model) and the Trainer's FSDP paths, saving included (``save_model`` gathers the full
state dict through accelerate and PEFT writes the adapter from it); the script prints how many modules fully_shard
wrapped.
"""

import sys
from pathlib import Path

from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import trainer_lora  # noqa: E402

trainer_lora.train_and_save(trainer_lora.build_trainer(use_peft=True))  # peft-out

trainer = trainer_lora.build_trainer(output_dir="fsdp2-out")
trainer.accelerator.state.distributed_type = DistributedType.FSDP
PartialState().distributed_type = DistributedType.FSDP  # what AcceleratorState.__init__ mirrors there on GPUs
trainer.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
trainer.is_fsdp_enabled = True
trainer_lora.train_and_save(trainer)
if trainer.is_world_process_zero():
    sharded = sum(isinstance(m, FSDPModule) for m in trainer.model_wrapped.modules())
    state = trainer.accelerator.state
    print(
        f"fully_shard wrapped {sharded} modules; after saving accelerate's state says {state.distributed_type}, "
        f"FSDP version {state.fsdp_plugin.fsdp_version}"
    )
