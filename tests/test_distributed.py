"""DDP and FSDP2 on CPU (gloo, 2 processes on 127.0.0.1): a few training steps give the adapter weights that one
process gets on the same data, and the adapter of the sharded model is saved as full tensors, once, by rank 0.

Under FSDP2 alone: QLoRA (bitsandbytes 4-bit bases, nf4 nested and fp4, packed bytes stored as uint8 and as
bfloat16) and DoRA, built by apply_lora. After fully_shard no full base weight is left on either rank (the module
apply_lora keeps for unload holds none), fl.save_adapter writes PEFT's format from rank 0 only, and fl.unload
gathers the weights and gives back the original modules with the original bytes. Two named adapters switched with
set_adapter on the sharded model, each trained, both saved in PEFT's layout. A PEFT model after from_peft, its
layers computing with fastlora's op on whole parameters (or with PEFT's forward where FSDP2 shards a module inside
the layer), saved gathered.

One spawn runs every distributed case (starting processes is the expensive part); the tests below check its
results. Each rank trains on its half of every batch with a mean loss, so the gradient averaged over the two
ranks is the full batch's gradient, which the single process computes directly. The torch path runs
throughout: the point here is the wrapping, not the kernels.
"""

from __future__ import annotations

import faulthandler
import gc
import importlib.util
import os
import warnings
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from helpers import assert_close, spawn_gloo_workers
from lora_cases import LAYER_KINDS, build_model, kind_param, lora_params, make_input
from tiny_models import quantize_4bit

import fastlora
from fastlora.layers import BASE_MODULE_ATTR

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # torch < 2.6
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import DTensor

WORLD = 2
STEPS = 3
HALF_BATCH = 2
# The models apply_lora builds and FSDP2 alone trains: DoRA, and QLoRA as (quant type, nested, storage dtype).
QLORA = {
    "nf4-nested-uint8": ("nf4", True, torch.uint8),
    "nf4-nested-bf16": ("nf4", True, torch.bfloat16),
    "fp4-uint8": ("fp4", False, torch.uint8),
    "fp4-bf16": ("fp4", False, torch.bfloat16),
}
SHARDED_KINDS = ("dora", *QLORA) if importlib.util.find_spec("bitsandbytes") else ("dora",)
# SGD step per model: the conv model's outputs (and so its gradients) are far larger than the others', and so are
# those of plain LoRA on the DoRA model's base (named adapters, PEFT's layers), whose random factors go unnormalised
LR = {"linear": 0.1, "embedding": 0.1, "conv2d": 0.002, **dict.fromkeys(SHARDED_KINDS, 0.1), "plain": 0.002}
pytestmark = pytest.mark.slow


def _base_model(kind):
    """The plain model a sharded-only kind adapts (4-bit bases hold whole 64-element blocks per row)."""
    torch.manual_seed(0)
    if kind == "dora":
        return nn.Sequential(nn.Linear(13, 11), nn.GELU(), nn.Linear(11, 7, bias=False))
    quant_type, nested, storage = QLORA[kind]
    plain = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64, bias=False))
    return quantize_4bit(plain, quant_type, nested, skip=(), quant_storage=storage)


def _randomise(model):
    """Every adapter tensor of ``model`` (fastlora's or PEFT's, every adapter) drawn random."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if "lora_" in n):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return model


def _build(kind):
    """The model of ``kind``: fastlora layers around every base layer, every adapter tensor drawn random."""
    if kind not in SHARDED_KINDS:
        return build_model(kind)
    return _randomise(fastlora.apply_lora(_base_model(kind), ["0", "2"], r=4, alpha=8, use_dora=kind == "dora"))


def _two_adapters():
    """An apply_lora model holding two named adapters: "default" and "b" (with its own rank and alpha)."""
    model = fastlora.apply_lora(_base_model("dora"), ["0", "2"], r=4, alpha=8)
    return _randomise(fastlora.add_adapter(model, "b", ["0", "2"], r=2, alpha=4))


def _peft_model():
    """A PEFT LoRA model (PEFT's own layers) over the DoRA case's base."""
    from peft import LoraConfig, get_peft_model

    return _randomise(get_peft_model(_base_model("dora"), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"])))


def _input(kind, seed, batch):
    if kind not in SHARDED_KINDS:
        return make_input(kind, seed=seed, batch=batch)
    features = 13 if kind == "dora" else 64
    return torch.randn(batch, 3, features, generator=torch.Generator().manual_seed(seed))


def _batches(kind, steps=STEPS):
    """The training data: per step a full batch of inputs and regression targets, the same in every process."""
    model = _build(kind)
    data = []
    for step in range(steps):
        x = _input(kind, seed=100 + step, batch=WORLD * HALF_BATCH).detach()
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


def _shard(model):
    for layer in model:
        if any(p.requires_grad for p in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)


def _bytes(t):
    """A tensor's raw bytes (a 4-bit weight's packed codes in any storage dtype), as a plain uint8 copy."""
    return t.detach().contiguous().view(torch.uint8).clone()


def _sharded_case(kind, rank, out_path, results):
    """FSDP2 training of an apply_lora model, then what no rank may keep, the rank-0 save, and the gathered unload."""
    model = _build(kind)
    x = _input(kind, seed=999, batch=3)
    with fastlora.disable_adapter(model), torch.no_grad():
        base_out = model(x)
    layers = {i: model[i] for i in (0, 2)}
    kept = {i: layer.__dict__[BASE_MODULE_ATTR] for i, layer in layers.items()}
    weights = {i: _bytes(layer.weight) for i, layer in layers.items()}
    states = {i: getattr(layer, "quant_state", None) for i, layer in layers.items()}
    originals = [weakref.ref(layer.weight) for layer in layers.values()]
    _shard(model)
    gc.collect()
    results[kind, "no-full-weight"] = {
        "original weights alive": sum(ref() is not None for ref in originals),
        "kept modules holding a tensor": sum(any(t is not None for t in m._parameters.values()) for m in kept.values()),
        "weights not sharded": sum(not isinstance(model[i].weight, DTensor) for i in layers),
        "local rows": [model[i].weight.to_local().shape[0] for i in layers],
        "full rows": [model[i].weight.shape[0] for i in layers],
    }
    _train(model, _batches(kind), LR[kind], rank, WORLD)
    results[kind, "fsdp"] = {n: _full(p).detach().clone() for n, p in lora_params(model).items()}
    # every rank saves (gathering the adapter), each to its own folder: only rank 0's may be written
    fastlora.save_adapter(model, f"{out_path}.{kind}.rank{rank}")
    fastlora.unload(model)
    with torch.no_grad():
        unloaded_out = model(x)
    results[kind, "unload"] = {
        "same modules": all(model[i] is kept[i] for i in layers),
        "same bytes": all(torch.equal(_bytes(model[i].weight), weights[i]) for i in layers),
        "same quant states": all(getattr(model[i].weight, "quant_state", None) is states[i] for i in layers),
        "base output": base_out,
        "output": unloaded_out,
    }


def _merge_case(kind, rank, results):
    """FSDP2 training, then merge_and_unload on both ranks: plain modules (the original ones) with whole merged
    weights, computing what the trained adapter computed."""
    model = _build(kind)
    kept = [model[i].__dict__[BASE_MODULE_ATTR] for i in (0, 2)]
    _shard(model)
    _train(model, _batches(kind), LR[kind], rank, WORLD)
    x = _input(kind, seed=999, batch=3)
    with torch.no_grad():
        trained_out = model(x)
        fastlora.merge_and_unload(model)
        results[kind, "merge_and_unload"] = {
            "same modules": [model[0] is kept[0], model[2] is kept[1]],
            "whole plain weights": [type(model[i].weight) is nn.Parameter for i in (0, 2)],
            "trained output": trained_out,
            "output": model(x),
        }


def _named_adapter_steps(model, rank=0, world=1):
    """Steps on "default", set_adapter("b"), steps on "b", set_adapter("default"): the outputs along the way."""
    batches, x, out = _batches("dora"), _input("dora", seed=999, batch=3), {}
    for adapter, trains in (("default", True), ("b", True), ("default", False)):
        fastlora.set_adapter(model, adapter)
        with torch.no_grad():
            out[f"{adapter} before"] = model(x)
        if trains:
            _train(model, batches, LR["plain"], rank, world)
            with torch.no_grad():
                out[adapter] = model(x)
    return out


def _named_adapters_case(rank, out_path, results):
    """Two named adapters under FSDP2: switching, training each, and both saved by rank 0 in PEFT's layout."""
    model = _two_adapters()
    _shard(model)
    found = _named_adapter_steps(model, rank, WORLD)
    found["adapters"] = {name: fastlora.lora_state_dict(model, name) for name in ("default", "b")}
    fastlora.save_adapter(model, f"{out_path}.named.rank{rank}")
    for fn, call in (
        ("add_adapter", lambda: fastlora.add_adapter(model, "c", ["0"], r=2)),
        ("delete_adapter", lambda: fastlora.delete_adapter(model, "b")),
    ):
        try:
            call()
            found[fn] = "no error"
        except ValueError as err:
            found[fn] = str(err)
    results["named"] = found


def _from_peft_case(rank, out_path, results):
    """A PEFT model after from_peft under FSDP2: fully_shard on the second LoRA layer and on the model, and on the
    first layer's base layer alone (as a wrapping policy that picks large Linears does). The second layer computes
    with fastlora's op (its base layer and lora_A never run); the first one's parameters are still sharded when it
    runs, so it takes PEFT's forward, with a warning. Both train as PEFT does in one process."""
    model = fastlora.from_peft(_peft_model())
    layers = model.base_model.model
    calls = {0: [], 2: []}
    for i in calls:
        for child in (layers[i].base_layer, *layers[i].lora_A.values()):
            child.register_forward_hook(lambda *_, i=i: calls[i].append(1))
    fully_shard(layers[0].base_layer)
    fully_shard(layers[2])
    fully_shard(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, _batches("dora"), LR["plain"], rank, WORLD)
    found = {
        "submodule calls": {i: len(c) for i, c in calls.items()},
        "warnings": [str(w.message) for w in caught],
        "adapter": fastlora.lora_state_dict(model),  # every rank gathers
    }
    fastlora.save_adapter(model, f"{out_path}.from_peft.rank{rank}")
    try:
        fastlora.merge_and_unload(model)
        found["merge_and_unload"] = "no error"
    except ValueError as err:
        found["merge_and_unload"] = str(err)
    results["from_peft"] = found


# (quant storage, FSDP2 param_dtype): FSDP2 casts float parameters to param_dtype, never integer ones
MIXED_PRECISION = {
    "uint8-storage-bf16-params": (torch.uint8, torch.bfloat16),
    "bf16-storage-bf16-params": (torch.bfloat16, torch.bfloat16),
    "bf16-storage-fp16-params": (torch.bfloat16, torch.float16),
}


def _mixed_precision_case(name):
    """A forward and backward of a QLoRA layer under an FSDP2 mixed precision policy: "ok", or the error's text."""
    storage, param_dtype = MIXED_PRECISION[name]
    model = quantize_4bit(nn.Sequential(nn.Linear(64, 128)), skip=(), quant_storage=storage)
    fastlora.apply_lora(model, ["0"], r=4, alpha=8)
    fully_shard(model[0], mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype))
    fully_shard(model)
    try:
        y = model(torch.randn(3, 64))
        y.float().square().mean().backward()
    except ValueError as err:
        return str(err)
    grads = [p.grad.full_tensor() for p in lora_params(model).values()]
    return "ok" if all(torch.isfinite(t).all() for t in (y, *grads)) else "non-finite"


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
                _shard(model)
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
            for kind in SHARDED_KINDS:
                _sharded_case(kind, rank, out_path, results)
                dist.barrier()
            _merge_case("dora", rank, results)
            _named_adapters_case(rank, out_path, results)
            _from_peft_case(rank, out_path, results)
            if "nf4-nested-uint8" in SHARDED_KINDS:
                for name in MIXED_PRECISION:
                    results[name] = _mixed_precision_case(name)
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
    spawn_gloo_workers(_worker, folder, out_path, kinds, nprocs=WORLD)
    return torch.load(out_path, weights_only=False), out_path


def _single_process(kind):
    with fastlora.use_backend("torch"):
        return _train(_build(kind), _batches(kind), LR[kind])


CASES = [("ddp", k) for k in LAYER_KINDS] + [("fsdp", k) for k in (*LAYER_KINDS, *SHARDED_KINDS)]


@pytest.mark.parametrize("wrapper,kind", [pytest.param(w, k, id=f"{w}-{k}") for w, k in CASES])
def test_distributed_training_matches_one_process(kind, wrapper, distributed_run):
    results, _ = distributed_run
    reference = {n: p.detach() for n, p in lora_params(_single_process(kind)).items()}
    initial = {n: p.detach() for n, p in lora_params(_build(kind)).items()}
    got = results[kind, wrapper]
    assert got.keys() == reference.keys()
    for name, ref in reference.items():
        assert got[name].shape == ref.shape, f"{name}: {tuple(got[name].shape)} is not the full shape"
        assert not torch.equal(ref, initial[name]), f"{name} did not train: the comparison would prove nothing"
        assert_close(got[name], ref, torch.float32, f"{wrapper} {name}")
    if wrapper == "fsdp" and kind in LAYER_KINDS:
        assert results[kind, "fsdp-sharded"], "fully_shard left the LoRA parameters unsharded"


@pytest.mark.parametrize("kind", SHARDED_KINDS)
def test_fsdp_leaves_no_full_base_weight(kind, distributed_run):
    results, _ = distributed_run
    found = results[kind, "no-full-weight"]
    assert found["original weights alive"] == 0, "a full base weight outlived fully_shard"
    assert found["kept modules holding a tensor"] == 0, "a module kept for unload still holds a base tensor"
    assert found["weights not sharded"] == 0
    assert all(2 * local <= full + 1 for local, full in zip(found["local rows"], found["full rows"], strict=True))


@pytest.mark.parametrize("kind", SHARDED_KINDS)
def test_fsdp_adapter_saved_by_rank0_loads_in_peft(kind, distributed_run):
    """fl.save_adapter, called on both ranks, writes once (rank 0); PEFT loads it onto the base model and computes
    what the one-process model trained on the same data computes."""
    from peft import PeftModel

    _, out_path = distributed_run
    assert not os.path.exists(f"{out_path}.{kind}.rank1"), "rank 1 wrote an adapter too"
    trained = _single_process(kind)
    loaded = PeftModel.from_pretrained(_base_model(kind), f"{out_path}.{kind}.rank0")
    x = _input(kind, seed=999, batch=3)
    with fastlora.use_backend("torch"), torch.no_grad():
        assert_close(loaded(x), trained(x), torch.float32, "PEFT's output with the adapter rank 0 saved")


@pytest.mark.parametrize("kind", SHARDED_KINDS)
def test_fsdp_unload_gives_back_the_original_modules_and_bytes(kind, distributed_run):
    results, _ = distributed_run
    found = results[kind, "unload"]
    assert found["same modules"] and found["same bytes"] and found["same quant states"]
    assert_close(found["output"], found["base output"], torch.float32, "the unloaded model's output")


def test_fsdp_merge_and_unload_gathers_and_merges(distributed_run):
    results, _ = distributed_run
    found = results["dora", "merge_and_unload"]
    assert found["same modules"] == [True, True] and found["whole plain weights"] == [True, True]
    assert_close(found["output"], found["trained output"], torch.float32, "the merged model's output")


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


@pytest.mark.skipif("nf4-nested-uint8" not in SHARDED_KINDS, reason="needs bitsandbytes")
def test_fsdp_mixed_precision_keeps_4bit_codes_or_refuses(distributed_run):
    """uint8 storage is never cast, a bf16 storage under bf16 params is not cast: both train. A bf16 storage cast to
    float16 would scramble the codes: forward refuses it with a sentence."""
    results, _ = distributed_run
    assert results["uint8-storage-bf16-params"] == "ok"
    assert results["bf16-storage-bf16-params"] == "ok"
    refused = results["bf16-storage-fp16-params"]
    assert "reached forward as torch.float16" in refused and "bnb_4bit_quant_storage" in refused, refused


def test_fsdp_named_adapters_switch_train_and_save(distributed_run):
    """Two adapters under fully_shard: set_adapter switches which one computes and trains (FSDP2 is told where the
    swapped Parameters went), each trains as in one process, and rank 0 saves both in PEFT's layout ("default" in
    the folder, "b" in its subfolder), which PEFT loads under the same names."""
    from peft import PeftModel

    results, out_path = distributed_run
    found = results["named"]
    reference = _two_adapters()
    expected = _named_adapter_steps(reference)
    for key, value in expected.items():
        assert_close(found[key], value, torch.float32, f"output: {key}")
    initial = _two_adapters()
    for name in ("default", "b"):
        start = fastlora.lora_state_dict(initial, name)
        trained = fastlora.lora_state_dict(reference, name)
        assert found["adapters"][name].keys() == trained.keys()
        for key, value in trained.items():
            assert not torch.equal(value, start[key]), f"{name}: {key} did not train: the comparison proves nothing"
            assert_close(found["adapters"][name][key], value, torch.float32, f"{name}: {key}")
    assert not os.path.exists(f"{out_path}.named.rank1"), "rank 1 wrote an adapter too"
    loaded = PeftModel.from_pretrained(_base_model("dora"), f"{out_path}.named.rank0")
    loaded.load_adapter(f"{out_path}.named.rank0/b", adapter_name="b")
    x = _input("dora", seed=999, batch=3)
    with torch.no_grad():
        assert_close(loaded(x), expected["default before"], torch.float32, "PEFT with the saved 'default'")
        loaded.set_adapter("b")
        assert_close(loaded(x), expected["b"], torch.float32, "PEFT with the saved 'b'")


def test_fsdp_named_adapters_are_added_and_deleted_before_fully_shard(distributed_run):
    """FSDP2 manages exactly the parameters it was given: add_adapter and delete_adapter on the sharded model refuse,
    with a sentence, and change nothing."""
    results, _ = distributed_run
    for fn in ("add_adapter", "delete_adapter"):
        refused = results["named"][fn]
        assert "sharded by FSDP2" in refused and "before fully_shard" in refused, refused


def test_fsdp_from_peft_trains_as_peft(distributed_run):
    """PEFT's layers after from_peft under FSDP2: a layer inside a fully_shard module computes with fastlora's op
    on whole parameters; a layer whose base layer FSDP2 shards on its own runs PEFT's forward, saying so; three
    steps give PEFT's adapter in one process, and rank 0 saves it gathered (fl.save_adapter runs PEFT's
    save_pretrained on whole tensors). fl.merge_and_unload refuses: PEFT's merge works on whole tensors."""
    from peft import PeftModel

    results, out_path = distributed_run
    found = results["from_peft"]
    assert found["submodule calls"] == {0: 2 * STEPS, 2: 0}, found["submodule calls"]
    assert any("runs PEFT's forward" in w and "fully_shard" in w for w in found["warnings"]), found["warnings"]
    start = fastlora.lora_state_dict(_peft_model())
    reference = _train(_peft_model(), _batches("dora"), LR["plain"])
    expected = fastlora.lora_state_dict(reference)
    assert found["adapter"].keys() == expected.keys()
    for key, value in expected.items():
        assert not torch.equal(value, start[key]), f"{key} did not train: the comparison would prove nothing"
        assert_close(found["adapter"][key], value, torch.float32, key)
    assert not os.path.exists(f"{out_path}.from_peft.rank1"), "rank 1 wrote an adapter too"
    assert "sharded by FSDP2" in found["merge_and_unload"], found["merge_and_unload"]
    loaded = PeftModel.from_pretrained(_base_model("dora"), f"{out_path}.from_peft.rank0")
    x = _input("dora", seed=999, batch=3)
    with torch.no_grad():
        assert_close(loaded(x), reference(x), torch.float32, "PEFT's output with the adapter rank 0 saved")
