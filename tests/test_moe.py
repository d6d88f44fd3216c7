"""LoRA on MoE experts at the model level: tiny Qwen3-MoE, Mixtral and gpt-oss models against PEFT's
``target_parameters`` (from_peft, apply_lora, adapter files both ways, merge and unload), the experts
implementation's dispatch, refusals, and an allocation watch showing that no tensor of one expert's out x in
elements is formed in forward or backward."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import assert_close
from moe_models import FAMILIES, TARGETS, build, experts_modules
from tiny_models import assert_unchanged, randomise_lora, snapshot, token_ids
from torch._library.custom_ops import OPDEFS
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import fastlora as fl
from fastlora.experts import LoRAExperts, peft_wrapper_class

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

F32 = torch.float32
BACKENDS = ("torch", "triton")


@pytest.fixture(autouse=True)
def quiet_and_torch_path():
    """The torch path unless a test picks one (the kernels' own tests under the interpreter are test_moe_op's; the
    tests here that take ``backend`` run the model on the kernels too)."""
    with warnings.catch_warnings(), fl.use_backend("torch"):
        warnings.filterwarnings("ignore", message=".*(RoPE|rope|is_gradient_checkpointing|checksum).*")
        # PEFT checks rank_pattern keys against module names only, while it matches them against parameter names
        warnings.filterwarnings("ignore", message=".*rank_pattern keys did not match any targeted module.*")
        yield


def peft_moe(base, r=4, alpha=8, targets=TARGETS, **kwargs):
    """PEFT's target_parameters LoRA on a copy of ``base``, every adapter tensor drawn at random."""
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=[], target_parameters=targets, **kwargs)
    )
    randomise_lora(model)
    return model


def user_model(model):
    """The user's model inside a PEFT model (the module tree PEFT's keys are relative to)."""
    return model.base_model.model if isinstance(model, peft.PeftModel) else model


def lora_grads(model) -> dict[str, torch.Tensor]:
    """Every adapter gradient under PEFT's key (the adapter name left out), for fastlora's and PEFT's wrappers."""
    out = {}
    for name, p in user_model(model).named_parameters():
        if "lora_" in name:
            key = name.replace(".default.weight", ".weight")
            out[key if key.endswith(".weight") else key + ".weight"] = p.grad
    return out


def loss_and_grads(model, ids):
    for p in model.parameters():
        p.grad = None
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), lora_grads(model)


def assert_same_run(model, ref, ids, what=""):
    logits, grads = loss_and_grads(model, ids)
    ref_logits, ref_grads = loss_and_grads(ref, ids)
    assert_close(logits, ref_logits, F32, f"{what} logits")
    assert grads.keys() == ref_grads.keys() and grads
    for key, g in grads.items():
        assert g is not None, f"{key} got no gradient"
        assert_close(g, ref_grads[key], F32, f"{what} {key}")
    for experts in experts_modules(model):
        for name, p in experts.named_parameters():
            assert p.grad is None, f"the frozen {name} got a gradient"


# ----------------------------------------------------------------------------------------------------------
# from_peft and apply_lora against PEFT
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "backend"), [*[(f, "torch") for f in FAMILIES], ("gpt_oss", "triton")]
)  # the kernels on gpt-oss: transposed weights, biases, its own gate
def test_from_peft_matches_peft_with_one_step(family, backend):
    """Outputs, every LoRA gradient and one optimizer step equal PEFT's; the ParamWrappers and Parameters stay.
    SGD: Adam's first step is lr * sign(g) for every element, which turns a rounding-level difference in a gradient
    element near zero into a whole step."""
    base = build(family)
    model, ref = peft_moe(base), None
    ref = copy.deepcopy(model)
    ids = token_ids(vocab=64)
    wrappers = {n: m for n, m in model.named_modules() if type(m).__name__ == "ParamWrapper"}
    params = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.05)
    fl.from_peft(model)
    assert {n: m for n, m in model.named_modules() if type(m).__name__ == "ParamWrapper"} == wrappers
    assert all(type(m) is peft_wrapper_class() for m in wrappers.values())
    assert all(p is params[n] for n, p in model.named_parameters())
    for experts in experts_modules(model):
        assert experts.config._experts_implementation == "fastlora+grouped_mm"
    with fl.use_backend(backend):
        assert_same_run(model, ref, ids, "step 0")
        opt.step()
        ref_opt.step()
        assert_same_run(model, ref, ids, "step 1")


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_lora_matches_peft(family):
    """PEFT's shapes, keys and initialisation; with PEFT's factors copied in, PEFT's outputs and gradients."""
    base = build(family)
    ref = peft_moe(base)
    with torch.no_grad():
        model = fl.apply_lora(copy.deepcopy(base), target_parameters=TARGETS, r=4, alpha=8)
        ids = token_ids(vocab=64)
        assert_close(model(ids).logits, base(ids).logits, F32, "fresh adapter")  # lora_B starts at zero
    ours, theirs = fl.lora_state_dict(model), peft.get_peft_model_state_dict(ref)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    fresh = [m for m in model.modules() if isinstance(m, LoRAExperts)]
    assert fresh and all(bool(m.lora_A.abs().sum() > 0) and not m.lora_B.any() for m in fresh)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    with torch.no_grad():
        for key, t in ours.items():
            t.copy_(theirs[key])
    assert_same_run(model, ref, ids)


def test_two_apply_lora_calls_nest_as_peft():
    """A second call adds the other expert weight around the first wrapper; a weight already adapted is refused."""
    base = build("qwen3_moe")
    model = fl.apply_lora(copy.deepcopy(base), target_parameters=["mlp.experts.down_proj"], r=4, alpha=8)
    fl.apply_lora(model, target_parameters=["gate_up_proj"], r=4, alpha=8)
    experts = model.model.layers[0].mlp.experts
    assert experts.parameter_name == "gate_up_proj" and experts.base_layer.parameter_name == "down_proj"
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        fl.apply_lora(model, target_parameters=["gate_up_proj"], r=4, alpha=8)


# ----------------------------------------------------------------------------------------------------------
# Adapter files both ways, merge and unload
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ("qwen3_moe", "gpt_oss"))
def test_adapters_move_both_ways(family, tmp_path):
    base = build(family)
    ids = token_ids(vocab=64)
    ours = fl.apply_lora(copy.deepcopy(base), target_parameters=TARGETS, r=4, alpha=8, rank_pattern={"down_proj": 2})
    randomise_lora(ours)
    fl.save_adapter(ours, tmp_path / "fl")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fl")
    with torch.no_grad():
        assert_close(loaded(ids).logits, ours(ids).logits, F32, "PEFT loading fastlora's file")
    assert loaded.peft_config["default"].rank_pattern  # down_proj's rank 2 went through the pattern

    theirs = peft_moe(base)
    theirs.save_pretrained(tmp_path / "peft")
    again = fl.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        assert_close(again(ids).logits, theirs(ids).logits, F32, "fastlora loading PEFT's file")
    keys = fl.lora_state_dict(again).keys()
    assert keys == peft.get_peft_model_state_dict(theirs).keys()
    randomise_lora(again)
    fl.load_adapter(again, tmp_path / "peft")  # into the wrappers it has now
    with torch.no_grad():
        assert_close(again(ids).logits, theirs(ids).logits, F32, "loaded into existing wrappers")
    with pytest.raises(ValueError, match="shape"):  # the ranks must fit
        fl.load_adapter(fl.apply_lora(copy.deepcopy(base), target_parameters=TARGETS, r=3), tmp_path / "peft")


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_equals_peft_merge_and_unload_restores(family):
    base = build(family, implementation="eager")
    ids = token_ids(vocab=64)
    ref = peft_moe(base)
    model = copy.deepcopy(ref)
    fl.from_peft(model)
    with torch.no_grad():
        expected = ref(ids).logits
        merged_ref = ref.merge_and_unload()
        merged = fl.merge_and_unload(model)  # a PEFT model: PEFT's merge_and_unload, the experts' config restored
        assert_close(merged(ids).logits, expected, F32, "merged model")
    for ours, theirs in zip(experts_modules(merged), experts_modules(merged_ref), strict=True):
        assert type(ours).__name__.endswith("Experts") and ours.config._experts_implementation == "eager"
        for name in ("gate_up_proj", "down_proj"):
            assert_close(getattr(ours, name), getattr(theirs, name), F32, name, factor=0.1)


def test_unload_and_disable_give_the_base_model():
    base = build("gpt_oss", implementation="batched_mm")
    ids = token_ids(vocab=64)
    model = fl.apply_lora(copy.deepcopy(base), target_parameters=TARGETS, r=4, alpha=8)
    randomise_lora(model)
    with torch.no_grad():
        expected = base(ids).logits
        with_lora = model(ids).logits
        assert (with_lora - expected).abs().max() > 1e-3
        with fl.disable_adapter(model):
            assert_close(model(ids).logits, expected, F32, "disabled")
        assert_close(model(ids).logits, with_lora, F32, "enabled again")
        fl.unload(model)
        assert_close(model(ids).logits, expected, F32, "unloaded")
    for experts in experts_modules(model):
        assert experts.config._experts_implementation == "batched_mm"
    assert not any(isinstance(m, LoRAExperts) for m in model.modules())
    for (name, p), q in zip(model.named_parameters(), base.parameters(), strict=True):
        assert torch.equal(p, q), f"unload changed {name}"


@pytest.mark.parametrize("implementation", ("eager", "batched_mm", "grouped_mm"))
def test_any_previous_implementation(implementation):
    """fastlora's result does not depend on the implementation the config selected, which comes back on unload and
    serves the layers without an adapter meanwhile."""
    base = build("mixtral", implementation=implementation)
    ids = token_ids(vocab=64)
    ref = peft_moe(base, targets=["model.layers.1.mlp.experts.down_proj"])
    model = copy.deepcopy(ref)
    fl.from_peft(model)
    with torch.no_grad():
        assert_close(model(ids).logits, ref(ids).logits, F32, implementation)
        assert model.base_model.model.config._experts_implementation == f"fastlora+{implementation}"
        fl.unload(model)
    assert model.base_model.model.config._experts_implementation == implementation


def test_peft_methods_after_from_peft(tmp_path):
    """PEFT's own calls on a converted model give what they give without from_peft."""
    base = build("qwen3_moe")
    ids = token_ids(vocab=64)
    ref = peft_moe(base)
    model = copy.deepcopy(ref)
    fl.from_peft(model)
    model.save_pretrained(tmp_path / "a")
    ref.save_pretrained(tmp_path / "b")
    a = peft.utils.load_peft_weights(str(tmp_path / "a"))
    b = peft.utils.load_peft_weights(str(tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ours, theirs = fl.lora_state_dict(model), peft.get_peft_model_state_dict(ref)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        with model.disable_adapter(), ref.disable_adapter():
            assert_close(model(ids).logits, ref(ids).logits, F32, "PEFT's disable_adapter")
        with fl.disable_adapter(model):
            assert_close(model(ids).logits, base(ids).logits, F32, "fastlora's disable_adapter")
        fl.save_adapter(model, tmp_path / "fl")
        randomise_lora(model)
        fl.load_adapter(model, tmp_path / "fl")  # into PEFT's own wrappers
        assert_close(model(ids).logits, ref(ids).logits, F32, "loaded back")
        assert_close(model.unload()(ids).logits, base(ids).logits, F32, "PEFT's unload")


# ----------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_parameters": ["mlp.experts.gate_proj"]}, r"\['mlp.experts.gate_proj'\] match no parameter"),
        ({"target_parameters": ["mlp.gate.weight"]}, "not a transformers experts module"),
        ({"target_parameters": "mlp.experts.down_proj"}, "must be a list"),
        ({"target_parameters": TARGETS, "dropout": 0.1}, "lora_dropout != 0"),
        ({"target_parameters": TARGETS, "use_dora": True}, "use_dora=True"),
        ({"target_parameters": TARGETS, "rank_pattern": {"q_proj": 2}}, "matches none"),
        ({}, "target_modules is required .*, or target_parameters"),
    ],
)
def test_refusals_leave_the_model_alone(kwargs, match):
    model = build("qwen3_moe")
    before = snapshot(model)
    implementation = model.config._experts_implementation
    with pytest.raises((ValueError, TypeError), match=match):
        fl.apply_lora(model, r=4, **kwargs)
    assert_unchanged(model, before)
    assert model.config._experts_implementation == implementation


def test_not_an_expert_weight():
    model = build("gpt_oss")
    with pytest.raises(ValueError, match="gate_up_proj_bias: it is not an expert weight"):
        fl.apply_lora(model, target_parameters=["experts.gate_up_proj_bias"])


# ----------------------------------------------------------------------------------------------------------
# No out x in tensor
# ----------------------------------------------------------------------------------------------------------


class AllocationWatch(TorchDispatchMode):
    """The element count of every floating tensor an op allocates (an output on a storage none of its inputs has;
    views are not allocations). fastlora's custom ops (the compiled path's entry points) are run as their Python
    implementations with the watch pushed again, so what they allocate inside is recorded too (``inside`` counts
    those allocations)."""

    def __init__(self):
        super().__init__()
        self.sizes = []
        self.inside = 0
        self._depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastlora":
            impl = OPDEFS[func.name()]._init_fn
            self._depth += 1
            try:
                with self:
                    out = impl(*args, **kwargs)
            finally:
                self._depth -= 1
        else:
            out = func(*args, **kwargs)
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        storages = {t.untyped_storage().data_ptr() for t in inputs}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.untyped_storage().data_ptr() not in storages:
                self.sizes.append((func.__name__, t.numel()))
                self.inside += self._depth > 0
        return out


def _experts_call(model):
    """The outer experts wrapper of layer 0 and routed inputs for it: 3 tokens, top-2."""
    layer = user_model(model).model.layers[0]
    hidden = torch.randn(3, layer.mlp.experts.get_base_layer().gate_up_proj.shape[-1], requires_grad=True)
    _, weights, index = layer.mlp.gate(hidden)
    return layer.mlp.experts, hidden, index, weights.detach()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_expert_sized_tensor_is_allocated(backend):
    """Hidden 64, intermediate 96: one expert's down_proj has 6144 elements, above every routed activation
    (6 rows x 192), adapter (192 x 16) and gradient the block may form; PEFT's path forms W + s B A (checked too)."""
    base = build("qwen3_moe", hidden=64, intermediate=96)
    limit = 64 * 96
    model = fl.apply_lora(copy.deepcopy(base), target_parameters=TARGETS, r=4, alpha=8)
    randomise_lora(model)
    experts, hidden, index, weights = _experts_call(model)
    with fl.use_backend(backend), AllocationWatch() as watch:
        experts(hidden, index, weights).square().sum().backward()
    big = [(name, n) for name, n in watch.sizes if n >= limit]
    assert not big, big
    assert hidden.grad is not None and all(p.grad is not None for p in (experts.lora_A, experts.base_layer.lora_B))

    ref = peft_moe(base)
    experts, hidden, index, weights = _experts_call(ref)
    with AllocationWatch() as watch:
        experts(hidden, index, weights).square().sum().backward()
    assert any(n >= limit for _, n in watch.sizes), "the watch saw PEFT's W + s B A"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_expert_sized_tensor_inside_the_custom_ops(backend):
    """The compiled path's entry points (torch.ops.fastlora.lora_experts and its backward), watched inside."""
    from fastlora.kernels.moe import max_row_tiles  # noqa: F401  (the kernels exist for the triton backend)

    E, K, N, r, rows = 4, 64, 96, 4, 6
    x = torch.randn(rows, K, requires_grad=True)
    weight = torch.randn(E, N, K)
    lora_A = torch.randn(r * E, K, requires_grad=True)
    lora_B = torch.randn(N, r * E, requires_grad=True)
    offsets = torch.tensor([2, 2, 5, 6])
    with fl.use_backend(backend), AllocationWatch() as watch:
        y = torch.ops.fastlora.lora_experts(x, weight, None, lora_A, lora_B, offsets, 0.5, False)[0]
        y.square().sum().backward()
    assert watch.inside > 0, "nothing was recorded inside the custom ops"
    big = [(name, n) for name, n in watch.sizes if n >= N * K]
    assert not big, big
    assert x.grad is not None and lora_A.grad is not None and lora_B.grad is not None


def test_benchmark_setup_runs_and_checks_accuracy():
    """benchmarks/moe.py on a tiny block: every provider measured in both modes, fastlora's and PEFT's errors
    against float64 within the tolerance, PEFT saving more for backward than fastlora (its W + s B A)."""
    from fastlora.benchmarks import moe as bench
    from fastlora.benchmarks.harness import Progress, Settings

    shape = bench.BlockShape(experts=4, hidden=32, inter=48, tokens=16, top_k=2, rank=4)
    with fl.use_backend("torch"):  # what a CPU run of the benchmark times
        rows = bench.measure("cpu", F32, Settings(warmup_ms=1, rep_ms=5, min_reps=2), Progress(quiet=True),
                             shape=shape, rounds=1)  # fmt: skip
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, m) for p in ("base", "peft", "fastlora") for m in ("forward", "forward+backward")
    }
    assert all(r["error"] is None and r["median_ms"] > 0 and r["refused"] is None for r in rows), rows
    lora = {r["provider"]: r for r in rows if r["mode"] == "forward" and r["provider"] != "base"}
    assert all(r["accuracy_ok"] and r["rel_err"]["y+grads vs float64 PEFT"] < 1e-5 for r in lora.values())
    assert lora["peft"]["saved_bytes"] > lora["fastlora"]["saved_bytes"]


def _gateless_experts(experts=4, hidden=16, inter=24):
    """An experts module without a gate (``up_proj``, an activation) and with a post-expert norm: the two flags the
    model families above do not have. Its own forward is a plain loop over tokens and experts."""
    from transformers import PretrainedConfig
    from transformers.integrations.moe import use_experts_implementation

    @use_experts_implementation(has_gate=False, has_post_expert_norm=True)
    class GatelessExperts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = config.num_experts
            self.up_proj = torch.nn.Parameter(torch.randn(experts, inter, hidden) * 0.3)
            self.down_proj = torch.nn.Parameter(torch.randn(experts, hidden, inter) * 0.3)
            self.act_fn = torch.nn.GELU()
            self.post_expert_norm = torch.nn.LayerNorm(hidden)

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for t in range(hidden_states.shape[0]):
                for j, e in enumerate(top_k_index[t].tolist()):
                    y = self.down_proj[e] @ self.act_fn(self.up_proj[e] @ hidden_states[t])
                    out[t] = out[t] + top_k_weights[t, j] * self.post_expert_norm(y)
            return out

    config = PretrainedConfig()
    config.num_experts = experts
    holder = torch.nn.Module()
    holder.experts = GatelessExperts(config)
    with torch.no_grad():
        holder.experts.post_expert_norm.weight.normal_()
    return holder.requires_grad_(False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_without_gate_and_with_post_norm(backend):
    """act_fn instead of a gate, the post-expert norm, and a config without a selected implementation (the module's
    own forward serves the unarmed calls and comes back on unload)."""
    holder = _gateless_experts()
    targets = ["experts.up_proj", "experts.down_proj"]
    ref = copy.deepcopy(holder)
    peft.inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6, target_modules=[], target_parameters=targets), ref)
    randomise_lora(ref)
    model = fl.apply_lora(copy.deepcopy(holder), target_parameters=targets, r=3, alpha=6)
    with torch.no_grad():
        for key, t in fl.lora_state_dict(model).items():
            name = key.removeprefix("base_model.model.").replace(".weight", ".default.weight")
            t.copy_(ref.get_parameter(name))
    x = torch.randn(7, 16, requires_grad=True)
    index = torch.stack([torch.randperm(4)[:2] for _ in range(7)])
    weights = torch.rand(7, 2)
    dy = torch.randn(7, 16)
    outs = []
    for m, path in ((model, backend), (ref, "torch")):
        x.grad = None
        with fl.use_backend(path):
            y = m.experts(x, index, weights)
            y.backward(dy)
        grads = {n.replace(".default.weight", ""): p.grad for n, p in m.named_parameters() if "lora_" in n}
        outs.append((y.detach(), x.grad.clone(), grads))
    assert_close(outs[0][0], outs[1][0], F32, "y")
    assert_close(outs[0][1], outs[1][1], F32, "dx")
    assert outs[0][2].keys() == outs[1][2].keys()
    for name, g in outs[0][2].items():
        assert_close(g, outs[1][2][name], F32, name)
    experts = model.experts.get_base_layer()
    assert experts.config._experts_implementation == "fastlora"
    fl.unload(model)
    assert experts.config._experts_implementation is None


def test_activation_checkpointing_gives_the_plain_gradients():
    """transformers' gradient checkpointing recomputes each layer in backward: the wrappers arm the experts again."""
    base = build("qwen3_moe")
    model = fl.apply_lora(copy.deepcopy(base), target_parameters=TARGETS, r=4, alpha=8)
    randomise_lora(model)
    ref = copy.deepcopy(model)
    model.train()
    ref.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert_same_run(model, ref, token_ids(vocab=64), "checkpointed")


def test_named_adapters():
    """The expert adapters belong to the adapter apply_lora made: idle (the base experts) and frozen while another
    adapter is active, saved with their own adapter only, gone with delete_adapter."""
    base = build("qwen3_moe")
    ids = token_ids(vocab=64)
    model = fl.apply_lora(copy.deepcopy(base), target_modules=["q_proj"], target_parameters=TARGETS, r=4, alpha=8,
                          adapter_name="policy")  # fmt: skip
    randomise_lora(model)
    fl.add_adapter(model, "reference", target_modules=["q_proj"], r=4, alpha=8)  # lora_B zero: the base model
    experts = [m for m in model.modules() if isinstance(m, LoRAExperts)]
    with torch.no_grad():
        policy = model(ids).logits
        fl.set_adapter(model, "reference")
        assert_close(model(ids).logits, base(ids).logits, F32, "reference adapter")
        assert all(not p.requires_grad for m in experts for p in (m.lora_A, m.lora_B))
        assert not any("experts" in k for k in fl.lora_state_dict(model, "reference"))
        fl.set_adapter(model, "policy")
        assert_close(model(ids).logits, policy, F32, "policy adapter")
        assert all(p.requires_grad for m in experts for p in (m.lora_A, m.lora_B))
        assert sum("experts" in k for k in fl.lora_state_dict(model, "policy")) == 8
        with pytest.warns(UserWarning, match="deleted the active adapter"):
            fl.delete_adapter(model, "policy")
        assert_close(model(ids).logits, base(ids).logits, F32, "policy deleted")
    assert not any(isinstance(m, LoRAExperts) for m in model.modules())
    assert all(e.config._experts_implementation == "grouped_mm" for e in experts_modules(model))


def test_lora_config_with_target_parameters():
    """PEFT's LoraConfig (target_modules=[] and target_parameters) gives apply_lora's adapter."""
    base = build("mixtral")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=TARGETS,
                        rank_pattern={"layers.1.mlp.experts.down_proj": 2})  # fmt: skip
    model = fl.apply_lora(copy.deepcopy(base), config)
    shapes = {k: tuple(v.shape) for k, v in fl.lora_state_dict(model).items()}
    theirs = peft_moe(base, rank_pattern={"layers.1.mlp.experts.down_proj": 2})
    assert shapes == {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items()}
    assert shapes["base_model.model.model.layers.1.mlp.experts.lora_A.weight"] == (2 * 4, 24)
