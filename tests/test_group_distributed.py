"""Sibling groups under DDP and FSDP2 on CPU (gloo, 2 processes): a few training steps give the adapter weights one
process gets, with the siblings in one FSDP unit (the group computes them together) and with each sibling sharded
on its own (the group must leave members whose parameters are still sharded to their own calls). One spawn runs
every case; the torch path throughout (the wrapping is the point, not the kernels)."""

from __future__ import annotations

import faulthandler
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from helpers import assert_close, spawn_gloo_workers

import fastlora
import fastlora.grouping as grouping

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    from torch.distributed._composable.fsdp import fully_shard

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import DTensor

WORLD, STEPS, HALF_BATCH = 2, 3, 3
WRAPPERS = ("ddp", "fsdp-block", "fsdp-separate")
pytestmark = pytest.mark.slow


class Block(nn.Module):
    """q/k/v on x, then gate/up on their concatenation: two groups by name."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(12, 8), nn.Linear(12, 4), nn.Linear(12, 4)
        self.gate_proj, self.up_proj = nn.Linear(16, 10), nn.Linear(16, 10, bias=False)

    def forward(self, x):
        h = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)
        return self.gate_proj(h) * torch.sigmoid(self.up_proj(h))


def build():
    torch.manual_seed(0)
    model = fastlora.apply_lora(nn.Sequential(Block()), ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], r=3,
                                alpha=6, dropout=0.0)  # fmt: skip
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def batches():
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(WORLD * HALF_BATCH, 12, generator=gen), torch.randn(WORLD * HALF_BATCH, 10, generator=gen))
            for _ in range(STEPS)]  # fmt: skip


def train(model, rank=0, world=1):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for x, target in batches():
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x[rows]), target[rows]).backward()
        opt.step()
    return model


def adapters(model):
    return {n.removeprefix("module."): (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters() if "lora_" in n}  # fmt: skip


def _worker(rank, store_path, out_path):
    faulthandler.enable()
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    results = {}
    calls = []
    op = grouping.lora_linear_group
    grouping.lora_linear_group = lambda x, members, *a, **k: (calls.append(len(members)), op(x, members, *a, **k))[1]
    try:
        with fastlora.use_backend("torch"):
            for wrapper in WRAPPERS:
                calls.clear()
                model = build()
                if wrapper == "ddp":
                    model = nn.parallel.DistributedDataParallel(model)
                else:
                    block = model[0]
                    units = [block] if wrapper == "fsdp-block" else [m for m in block.children()]
                    for unit in units:
                        fully_shard(unit)
                    fully_shard(model)
                train(model, rank, WORLD)
                results[wrapper] = adapters(model)  # a collective under FSDP2: every rank calls it
                results[wrapper, "calls"] = list(calls)
                dist.barrier()
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("group-dist")
    out_path = str(folder / "results.pt")
    spawn_gloo_workers(_worker, folder, out_path, nprocs=WORLD)
    return torch.load(out_path, weights_only=False)


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_training_matches_one_process(distributed_run, wrapper):
    with fastlora.use_backend("torch"):
        reference = adapters(train(build()))
    initial = adapters(build())
    got = distributed_run[wrapper]
    assert got.keys() == reference.keys()
    for name, ref in reference.items():
        assert not torch.equal(ref, initial[name]), f"{name} did not train: the comparison would prove nothing"
        assert_close(got[name], ref, torch.float32, f"{wrapper} {name}")


def test_groups_compute_where_the_members_are_whole(distributed_run):
    """DDP and one FSDP unit for the block: every step's q/k/v and gate/up as groups. Each sibling its own unit: no
    group call (the leader's siblings are still sharded when it runs, and each gets its input through FSDP's own
    hook)."""
    assert distributed_run["ddp", "calls"] == [3, 2] * STEPS
    assert distributed_run["fsdp-block", "calls"] == [3, 2] * STEPS
    assert distributed_run["fsdp-separate", "calls"] == []
