"""examples/trainer_lora.py's Trainer through accelerate's FSDP2 code on CPU processes; run by
tests/test_trainer_distributed.py under torchrun.

accelerate turns FSDP on for accelerator distributed types only (on CPU processes it wraps the model in DDP). This
script builds the example's Trainer and then gives its accelerator the state accelerate sets on GPUs for the same
TrainingArguments: distributed type FSDP and the FSDP2 plugin made from the example's ``fsdp_config``. Training
then goes through accelerate's FSDP2 preparation (fully_shard on every LlamaDecoderLayer and on the model) and
the Trainer's FSDP paths; the script prints how many modules fully_shard wrapped.
"""

import sys
from pathlib import Path

from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import trainer_lora  # noqa: E402

trainer = trainer_lora.build_trainer(output_dir="fsdp2-out")
trainer.accelerator.state.distributed_type = DistributedType.FSDP
trainer.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
trainer.is_fsdp_enabled = True
trainer_lora.train_and_save(trainer)
if trainer.is_world_process_zero():
    sharded = sum(isinstance(m, FSDPModule) for m in trainer.model_wrapped.modules())
    print(f"fully_shard wrapped {sharded} modules")
