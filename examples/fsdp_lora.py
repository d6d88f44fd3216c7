"""LoRA fine-tuning under FSDP2: run with `torchrun --nproc-per-node 2 examples/fsdp_lora.py`."""

import os

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

import fastlora

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)

model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)).to(device)
model[0] = fastlora.LoRALinear.from_module(model[0], r=8, alpha=16, dropout=0.05)
model[2] = fastlora.LoRALinear.from_module(model[2], r=8, alpha=16)
for layer in (model[0], model[2]):
    fully_shard(layer)  # each layer's frozen weight and LoRA factors are sharded across the ranks
fully_shard(model)

optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
for _ in range(3):
    x = torch.randn(16, 64, device=device)  # each rank's own batch
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()

# Every rank takes part in gathering the full tensors; rank 0 alone writes them.
adapter = {name: p.full_tensor() for name, p in model.named_parameters() if "lora_" in name}
if dist.get_rank() == 0:
    save_file({name: t.cpu().contiguous() for name, t in adapter.items()}, "adapter.safetensors")
dist.barrier()  # no rank tears the group down while another still uses it
dist.destroy_process_group()
