"""DeepSpeed ZeRO-3 on CPU (DeepSpeed's CPU accelerator, gloo, 2 processes): apply_lora and from_peft on a model
whose weights ZeRO-3 partitioned at construction (``deepspeed.zero.Init``: each weight's ``shape`` is ``[0]``, the
real one ``ds_shape``), a few engine steps equal to one process, merging under a gather, and saving gathered.
A from_peft model stays PEFT's, with fastlora's op computing its layers from parameters of submodules the op never
calls: ZeRO-3 must gather those for the layer (fastlora registers them as the layer's external parameters).

One spawn runs every case; the tests check its results. As in test_distributed.py, each rank trains on its half
of every batch with a mean loss, so ZeRO's averaged gradient is the full batch's, which one process computes.
"""

from __future__ import annotations

import faulthandler
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from helpers import assert_close, spawn_gloo_workers
from lora_cases import lora_params

import fastlora

deepspeed = pytest.importorskip("deepspeed")
peft = pytest.importorskip("peft")

WORLD = 2
STEPS = 3
HALF_BATCH = 2
LR = 0.05
KINDS = ("lora", "dora")
CONFIG = {
    "train_micro_batch_size_per_gpu": HALF_BATCH,
    "gradient_accumulation_steps": 1,
    # persistence threshold 0: even these tiny tensors are partitioned at rest (DeepSpeed keeps tensors under 1e5
    # elements whole by default), so every gather is exercised
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "gradient_clipping": 0.0,  # DeepSpeed clips to norm 1.0 unless told otherwise; the single process does not
    "zero_allow_untested_optimizer": True,  # a plain torch SGD, the one the single process uses
    "zero_force_ds_cpu_optimizer": False,
}
pytestmark = pytest.mark.slow


def _plain_base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 11), nn.GELU(), nn.Linear(11, 7, bias=False))


def _partitioned_base():
    """The same model built under zero.Init: its weights are partitioned as they are made, then set to the plain
    model's values (rank 0 writes them inside a gather)."""
    with deepspeed.zero.Init(config_dict_or_path=CONFIG):
        model = nn.Sequential(nn.Linear(13, 11), nn.GELU(), nn.Linear(11, 7, bias=False))
    plain = dict(_plain_base().named_parameters())
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0), torch.no_grad():
        for name, p in params.items():
            p.copy_(plain[name])
    return model


def _randomise(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if "lora_" in n):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return model


def _adapt(base, kind):
    return _randomise(fastlora.apply_lora(base, ["0", "2"], r=4, alpha=8, use_dora=kind == "dora"))


def _batches():
    data = []
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(100 + step)
        data.append(
            (
                torch.randn(WORLD * HALF_BATCH, 5, 13, generator=gen),
                torch.randn(WORLD * HALF_BATCH, 5, 7, generator=gen),
            )
        )
    return data


def _test_input():
    return torch.randn(3, 5, 13, generator=torch.Generator().manual_seed(999))


def _engine(model):
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(trainable, lr=LR), config=CONFIG)
    return engine


def _train(engine, rank):
    """STEPS engine steps on this rank's half of each batch; returns the engine."""
    for x, target in _batches():
        rows = slice(rank * HALF_BATCH, (rank + 1) * HALF_BATCH)
        loss = nn.functional.mse_loss(engine(x[rows]), target[rows])
        engine.backward(loss)
        engine.step()
    return engine


def _zero3_case(kind, rank, out_path, results):
    model = _partitioned_base()
    weight = model[0].weight
    results[kind, "partitioned"] = (tuple(weight.shape), tuple(weight.ds_shape))
    model = _adapt(model, kind)
    results[kind, "adapter shapes"] = {n: tuple(p.shape) for n, p in lora_params(model).items()}
    engine = _train(_engine(model), rank)
    results[kind, "adapter partitioned"] = all(p.numel() == 0 for p in lora_params(model).values())
    results[kind, "trained"] = {k: v.clone() for k, v in fastlora.lora_state_dict(model).items()}  # gathered
    fastlora.save_adapter(model, f"{out_path}.{kind}.rank{rank}")  # every rank gathers; rank 0 writes
    x = _test_input()
    with torch.no_grad():
        results[kind, "output"] = engine(x)
        for layer in (model[0], model[2]):
            layer.merge()  # gathers W, A and B; rank 0's merged W is partitioned again
        results[kind, "merged output"] = engine(x)
    fastlora.merge_and_unload(model)
    results[kind, "unloaded types"] = [type(model[i]).__name__ for i in (0, 2)]
    with torch.no_grad():
        results[kind, "unloaded output"] = model(x)


def _peft_model(base, kind):
    """A PEFT model over ``base`` with every adapter tensor drawn random (the same in every process)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=kind == "dora")
    return _randomise(get_peft_model(base, config))


def _from_peft_case(kind, rank, out_path, results):
    """A PEFT model over partitioned weights, from_peft, then ZeRO-3 engine steps: the converted layers stay PEFT's
    layers and compute with fastlora's op (their base layer and lora_A never run), the result equals PEFT's in one
    process; the adapter is gathered by fl.lora_state_dict and saved by rank 0."""
    from peft.tuners.lora import LoraLayer
    from transformers.integrations import HfDeepSpeedConfig

    # transformers' ZeRO-3 flag, which its from_pretrained sets under a ZeRO-3 config: PEFT then gathers the
    # partitioned weight to compute DoRA's initial magnitude (while the object lives)
    zero3_flag = HfDeepSpeedConfig(CONFIG)
    model = _peft_model(_partitioned_base(), kind)
    del zero3_flag
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a layer left to PEFT (a shape mismatch) warns
        fastlora.from_peft(model)
    converted = fastlora.peft.converted_layers(model)
    submodule_calls = []
    for _, layer in converted:
        for child in (layer.base_layer, *layer.lora_A.values()):
            child.register_forward_hook(lambda *_: submodule_calls.append(1))
    engine = _engine(model)
    with torch.no_grad():
        # one converted layer called by itself: ZeRO-3's hooks around it run, but not the model's forward, where
        # DeepSpeed's own discovery of parameters read outside their module would gather them too
        first_layer = model.base_model.model[0](_test_input())
    _train(engine, rank)
    found = {
        "first layer": first_layer,
        "converted": [(name, isinstance(layer, LoraLayer)) for name, layer in converted],
        "submodule calls": len(submodule_calls),
        "trained": fastlora.lora_state_dict(model),  # every rank gathers
    }
    fastlora.save_adapter(model, f"{out_path}.from_peft-{kind}.rank{rank}")
    with torch.no_grad():
        found["output"] = engine(_test_input())
    engine.empty_partition_cache()  # an inference forward may leave the parameters gathered
    found["partitioned before merge"] = all(p.numel() == 0 for p in model.parameters())
    merged = fastlora.merge_and_unload(model)  # each layer merged under a gather, then PEFT's unload
    found["merged types"] = [type(m).__name__ for m in merged]
    with torch.no_grad():
        found["merged output"] = engine(_test_input())  # the engine's hooks gather the merged, partitioned weights
    results["from_peft", kind] = found


def _worker(rank, store_path, out_path):
    faulthandler.enable()
    os.environ.update(GLOO_SOCKET_IFNAME="lo", DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    deepspeed.init_distributed(dist_backend="gloo")  # takes the process group set up above
    results = {}
    try:
        with fastlora.use_backend("torch"):
            for kind in KINDS:
                _zero3_case(kind, rank, out_path, results)
                dist.barrier()
                _from_peft_case(kind, rank, out_path, results)
                dist.barrier()
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zero3")
    out_path = str(folder / "results.pt")
    spawn_gloo_workers(_worker, folder, out_path, nprocs=WORLD)
    return torch.load(out_path, weights_only=False), out_path


def _train_one_process(model):
    with fastlora.use_backend("torch"):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
        for x, target in _batches():
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), target).backward()
            opt.step()
    return model


def _single_process(kind):
    return _train_one_process(_adapt(_plain_base(), kind))


@pytest.mark.parametrize("kind", KINDS)
def test_zero3_training_matches_one_process(kind, zero3_run):
    results, _ = zero3_run
    assert results[kind, "partitioned"] == ((0,), (11, 13)), "zero.Init did not partition the base weight"
    reference = _single_process(kind)
    initial = fastlora.lora_state_dict(_adapt(_plain_base(), kind))
    expected = fastlora.lora_state_dict(reference)
    assert results[kind, "adapter shapes"] == {n: tuple(p.shape) for n, p in lora_params(reference).items()}
    assert results[kind, "adapter partitioned"], "deepspeed.initialize left the adapter unpartitioned"
    got = results[kind, "trained"]
    assert got.keys() == expected.keys()
    for name, ref in expected.items():
        assert not torch.equal(ref, initial[name]), f"{name} did not train: the comparison would prove nothing"
        assert_close(got[name], ref, torch.float32, name)


@pytest.mark.parametrize("kind", KINDS)
def test_zero3_merge_and_unload_gather(kind, zero3_run):
    """merge() under ZeRO-3 gathers and changes the partitioned weight: the engine's output stays the adapter's;
    merge_and_unload gives plain modules with the whole merged weights."""
    results, _ = zero3_run
    reference = _single_process(kind)
    x = _test_input()
    with fastlora.use_backend("torch"), torch.no_grad():
        expected = reference(x)
    assert_close(results[kind, "output"], expected, torch.float32, "engine output")
    assert_close(results[kind, "merged output"], expected, torch.float32, "engine output after merge()")
    assert results[kind, "unloaded types"] == ["Linear", "Linear"]
    assert_close(results[kind, "unloaded output"], expected, torch.float32, "output after merge_and_unload")


@pytest.mark.parametrize("kind", KINDS)
def test_zero3_adapter_saved_gathered_by_rank0_loads_in_peft(kind, zero3_run):
    from peft import PeftModel

    _, out_path = zero3_run
    assert not os.path.exists(f"{out_path}.{kind}.rank1"), "rank 1 wrote an adapter too"
    loaded = PeftModel.from_pretrained(_plain_base(), f"{out_path}.{kind}.rank0")
    trained = _single_process(kind)
    x = _test_input()
    with fastlora.use_backend("torch"), torch.no_grad():
        assert_close(loaded(x), trained(x), torch.float32, "PEFT's output with the saved adapter")


@pytest.mark.parametrize("kind", KINDS)
def test_zero3_from_peft_trains_with_fastlora_op_as_peft(kind, zero3_run):
    """from_peft on a PEFT model over partitioned weights reads the real shapes (no layer left to PEFT); under the
    engine the layers compute with fastlora's op (ZeRO-3 gathers the parameters it reads, which belong to
    submodules it never calls), and three steps give what PEFT's own layers give in one process. Rank 0 saves the
    gathered adapter; fl.merge_and_unload merges each layer under a gather (PEFT's own merge, reading the empty
    partitions, leaves the weights unchanged for LoRA and raises for DoRA)."""
    from peft import PeftModel

    results, out_path = zero3_run
    found = results["from_peft", kind]
    assert found["converted"] == [("base_model.model.0", True), ("base_model.model.2", True)]
    assert found["submodule calls"] == 0, "PEFT's forward ran (it calls base_layer and lora_A), not fastlora's op"
    initial = _peft_model(_plain_base(), kind)
    initial_state = fastlora.lora_state_dict(initial)
    reference = _train_one_process(_peft_model(_plain_base(), kind))
    expected = fastlora.lora_state_dict(reference)
    assert found["trained"].keys() == expected.keys()
    for name, ref in expected.items():
        assert not torch.equal(ref, initial_state[name]), f"{name} did not train: the comparison would prove nothing"
        assert_close(found["trained"][name], ref, torch.float32, name)
    x = _test_input()
    with torch.no_grad():
        assert_close(found["first layer"], initial.base_model.model[0](x), torch.float32, "a layer called alone")
        expected_out = reference(x)
    assert_close(found["output"], expected_out, torch.float32, "engine output")
    assert found["partitioned before merge"] and found["merged types"] == ["Linear", "GELU", "Linear"]
    assert_close(found["merged output"], expected_out, torch.float32, "engine output after merge_and_unload")
    assert not os.path.exists(f"{out_path}.from_peft-{kind}.rank1"), "rank 1 wrote an adapter too"
    loaded = PeftModel.from_pretrained(_plain_base(), f"{out_path}.from_peft-{kind}.rank0")
    with torch.no_grad():
        assert_close(loaded(x), expected_out, torch.float32, "PEFT's output with the adapter rank 0 saved")
