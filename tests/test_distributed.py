"""DDP and FSDP2 on CPU (gloo, 2 processes on 127.0.0.1): a few training steps give the adapter weights that one
process gets on the same data, and the adapter of the sharded model is saved as full tensors, once, by rank 0.

One spawn runs every distributed case (starting processes is the expensive part); the tests below check its
results. Each rank trains on its half of every batch with a mean loss, so the gradient averaged over the two
ranks is the full batch's gradient, which the single process computes directly. The torch path runs
throughout: the point here is the wrapping, not the kernels.
"""

from __future__ import annotations

import faulthandler
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from helpers import assert_close
from lora_cases import LAYER_KINDS, build_model, kind_param, lora_params, make_input

import fastlora

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    from torch.distributed._composable.fsdp import fully_shard

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import DTensor

WORLD = 2
STEPS = 3
HALF_BATCH = 2
# SGD step per layer kind: the conv model's outputs (and so its gradients) are far larger than the others'
LR = {"linear": 0.1, "embedding": 0.1, "conv2d": 0.002}
pytestmark = pytest.mark.slow


def _batches(kind, steps=STEPS):
    """The training data: per step a full batch of inputs and regression targets, the same in every process."""
    model = build_model(kind)
    data = []
    for step in range(steps):
        x = make_input(kind, seed=100 + step, batch=WORLD * HALF_BATCH).detach()
        with torch.no_grad():
            target = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(200 + step))
        data.append((x, target))
    return data


def _train(model, batches, lr, rank=0, world=1):
    """SGD on each batch's slice for this rank, mean-squared-error loss (a mean, so DDP's average is exact)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=lr)
    for x, target in batches:
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x[rows]), target[rows])
        loss.backward()
        opt.step()
    return model


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _worker(rank, store_path, out_path, kinds):
    faulthandler.enable()  # a native abort prints where each thread was
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    # FSDP2 warns when a wrapped module returns a view: an in-place op on it would skip the backward all-gather.
    # fastlora layers return fresh tensors, as nn.Linear does, so here the warning is an error.
    warnings.filterwarnings("error", message=".*returned a view tensor")
    # a file store: no port to race for with other tests, and no store server for rank 0 to take down first
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    results = {}
    try:
        with fastlora.use_backend("torch"):
            for kind in kinds:
                batches = _batches(kind)

                ddp = nn.parallel.DistributedDataParallel(build_model(kind))
                _train(ddp, batches, LR[kind], rank, WORLD)
                results[kind, "ddp"] = {n: p.detach().clone() for n, p in lora_params(ddp.module).items()}

                model = build_model(kind)
                for layer in model:
                    if any(p.requires_grad for p in layer.parameters()):
                        fully_shard(layer)
                fully_shard(model)
                _train(model, batches, LR[kind], rank, WORLD)
                shards = lora_params(model)
                results[kind, "fsdp-sharded"] = all(isinstance(p, DTensor) for p in shards.values())
                full = {n: _full(p).detach().clone() for n, p in shards.items()}  # a collective: every rank calls it
                results[kind, "fsdp"] = full
                if rank == 0:
                    from safetensors.torch import save_file

                    save_file({n: t.contiguous() for n, t in full.items()}, f"{out_path}.{kind}.safetensors")
                state = fastlora.lora_state_dict(model)
                results[kind, "lora_state_dict"] = {
                    k: (type(v).__name__, v.detach().clone() if not isinstance(v, DTensor) else None)
                    for k, v in state.items()
                }
                dist.barrier()
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()  # both ranks done before either tears its process group down
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    """Run every available layer kind under DDP and FSDP2 in one 2-process spawn; return (results, path)."""
    kinds = list(LAYER_KINDS)
    folder = tmp_path_factory.mktemp("dist")
    out_path = str(folder / "results.pt")
    # Two CI runs of the whole suite (of several) lost a worker to SIGABRT ("terminate called without an active
    # exception", no Python error) while every run of this file alone passed: such an abort gets one more spawn.
    # A Python error in a worker, or a wrong result, fails at once.
    for attempt in (1, 2):
        try:
            mp.spawn(_worker, args=(str(folder / f"store{attempt}"), out_path, kinds), nprocs=WORLD, join=True)
            break
        except mp.ProcessExitedException as err:
            if err.signal_name != "SIGABRT" or attempt == 2:
                raise
            warnings.warn(f"a distributed worker aborted natively ({err}); spawning once more", stacklevel=1)
    return torch.load(out_path, weights_only=False), out_path


def _single_process(kind):
    with fastlora.use_backend("torch"):
        return _train(build_model(kind), _batches(kind), LR[kind])


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind", [kind_param(k) for k in LAYER_KINDS])
def test_distributed_training_matches_one_process(kind, wrapper, distributed_run):
    results, _ = distributed_run
    reference = {n: p.detach() for n, p in lora_params(_single_process(kind)).items()}
    initial = {n: p.detach() for n, p in lora_params(build_model(kind)).items()}
    got = results[kind, wrapper]
    assert got.keys() == reference.keys()
    for name, ref in reference.items():
        assert got[name].shape == ref.shape, f"{name}: {tuple(got[name].shape)} is not the full shape"
        assert not torch.equal(ref, initial[name]), f"{name} did not train: the comparison would prove nothing"
        assert_close(got[name], ref, torch.float32, f"{wrapper} {name}")
    if wrapper == "fsdp":
        assert results[kind, "fsdp-sharded"], "fully_shard left the LoRA parameters unsharded"


@pytest.mark.parametrize("kind", [kind_param(k) for k in LAYER_KINDS])
def test_fsdp_adapter_saved_by_rank0_loads_back(kind, distributed_run):
    from safetensors.torch import load_file

    _, out_path = distributed_run
    saved = load_file(f"{out_path}.{kind}.safetensors")
    trained = _single_process(kind)
    fresh = build_model(kind)
    missing, unexpected = fresh.load_state_dict(saved, strict=False)
    assert not unexpected and all(not k.endswith(("lora_A", "lora_B")) for k in missing)
    x = make_input(kind, seed=999)
    with fastlora.use_backend("torch"), torch.no_grad():
        assert_close(fresh(x), trained(x), torch.float32, "output after loading the saved adapter")


@pytest.mark.parametrize("kind", [kind_param(k) for k in LAYER_KINDS])
def test_fsdp_lora_state_dict_holds_full_tensors(kind, distributed_run):
    results, _ = distributed_run
    state = results[kind, "lora_state_dict"]
    full = results[kind, "fsdp"]
    assert state, "lora_state_dict of the sharded model is empty"
    assert len(state) == len(full), f"{len(state)} tensors in lora_state_dict, the model has {len(full)} LoRA factors"
    for key, (type_name, value) in state.items():
        assert value is not None, f"{key} is a {type_name}: a sharded tensor, not the full one"
        assert any(value.shape == t.shape and torch.equal(value, t) for t in full.values()), (
            f"{key} {tuple(value.shape)} equals none of the gathered full LoRA factors"
        )
