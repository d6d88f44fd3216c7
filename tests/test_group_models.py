"""Sibling groups in whole models: tiny Llama, Qwen2 and Mistral (from config, "all-linear") give with grouping the
outputs and every LoRA gradient of the unfused layers and of PEFT, on the torch path and under the interpreter; a
cross-attention model (BART) is unchanged by grouping; merged, disabled, deep-copied, inference-mode, compiled and
checkpointed models and in-place changes between the members' calls give what the unfused model gives."""

import copy

import pytest
import tiny_models as tm
import torch
import torch.nn as nn
from helpers import assert_close
from lora_cases import PATHS, on_path
from torch.utils.checkpoint import checkpoint

import fastlora as fl
import fastlora.grouping as grouping
from fastlora.grouping import SiblingGroup, groups_of
from fastlora.layers import GROUP_ATTR

F32 = torch.float32
MODELS = [pytest.param(make, id=make.__name__) for make in (tm.llama, tm.qwen2, tm.mistral)]
R, ALPHA = 4, 8


@pytest.fixture
def group_calls(monkeypatch):
    """The member count of each group op call made through the layers."""
    calls = []
    op = grouping.lora_linear_group

    def counted(x, members, *args, **kwargs):
        calls.append(len(members))
        return op(x, members, *args, **kwargs)

    monkeypatch.setattr(grouping, "lora_linear_group", counted)
    return calls


def _peft(base, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules="all-linear")
    model = get_peft_model(copy.deepcopy(base), config)
    tm.randomise_lora(model)
    return model


def _key(name: str) -> str:
    """A LoRA tensor's name as fastlora's layers have it (PEFT's without its wrapper prefix and adapter name)."""
    name = name.removeprefix("_orig_mod.").removeprefix("base_model.model.")
    return name.replace(".default.weight", "").replace(".default", "")


def _fastlora(base, peft_model, fuse=True, dropout=0.0):
    """apply_lora on a copy of ``base`` with the adapter values of ``peft_model``."""
    model = fl.apply_lora(copy.deepcopy(base), "all-linear", r=R, alpha=ALPHA, dropout=dropout, fuse=fuse)
    values = {_key(n): p for n, p in peft_model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(values[name])
    return model


def _run(model, ids, path="torch", seed=5):
    """Logits and every LoRA gradient (fastlora's names) of sum(logits * g)."""
    model.zero_grad(set_to_none=True)
    with on_path(path):
        torch.manual_seed(seed)
        out = model(ids).logits
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out * g).sum().backward()
    grads = {_key(n): p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        assert p.requires_grad or p.grad is None, f"frozen {n} received a gradient"
    return out.detach(), grads


def _assert_same(a, b, what):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert_close(out_a, out_b, F32, f"{what}: logits")
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():
        assert g is not None and grads_b[name] is not None, f"{what}: {name} got no gradient"
        assert g.abs().sum() > 0, f"{what}: {name}'s gradient is zero: the comparison would prove nothing"
        assert_close(g, grads_b[name], F32, f"{what}: {name}")


def _expected_groups(model):
    return [(type(g.parent).__name__, g.names) for g in groups_of(model)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("make", MODELS)
def test_grouped_equals_unfused_and_peft(make, path, group_calls):
    base = make().train()
    peft_model = _peft(base)
    grouped, unfused = _fastlora(base, peft_model), _fastlora(base, peft_model, fuse=False)
    attention, mlp = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")
    assert [g.names for g in groups_of(grouped)] == [attention, mlp] * 2
    assert groups_of(unfused) == []
    ids = tm.token_ids()
    got = _run(grouped, ids, path)
    assert group_calls == [3, 2, 3, 2], "the groups did not compute"
    _assert_same(got, _run(unfused, ids, path), "grouped vs unfused")
    _assert_same(got, _run(peft_model, ids), "grouped vs PEFT")


@pytest.mark.parametrize("path", PATHS)
def test_dropout_grouped_equals_unfused(path, group_calls):
    """Each member keeps its own mask: drawn in the members' call order, the seeds are the unfused layers' own."""
    base = tm.llama().train()
    peft_model = _peft(base, dropout=0.25)
    grouped = _fastlora(base, peft_model, dropout=0.25)
    unfused = _fastlora(base, peft_model, fuse=False, dropout=0.25)
    ids = tm.token_ids()
    got = _run(grouped, ids, path)
    assert group_calls == [3, 2, 3, 2]
    _assert_same(got, _run(unfused, ids, path), "grouped vs unfused, dropout 0.25")
    assert not torch.equal(got[0], _run(grouped, ids, path, seed=6)[0]), "another seed drew the same masks"


def test_from_peft_groups_equal_peft(group_calls):
    base = tm.qwen2().train()
    peft_model = _peft(base)
    converted = fl.from_peft(copy.deepcopy(peft_model))
    assert len(groups_of(converted)) == 4
    assert groups_of(fl.from_peft(copy.deepcopy(peft_model), fuse=False)) == []
    ids = tm.token_ids()
    _assert_same(_run(converted, ids), _run(peft_model, ids), "from_peft grouped vs PEFT")
    assert group_calls == [3, 2, 3, 2]
    assert converted.state_dict().keys() == peft_model.state_dict().keys()


@pytest.mark.parametrize("traced", [True, False], ids=["traced", "by-name"])
def test_cross_attention_model_unchanged(traced, monkeypatch):
    """BART's decoder cross-attention gives q the decoder's states and k, v the encoder's. The traced forward finds
    that (k and v grouped, q apart); grouped by name instead, q's group call misses its siblings, which compute
    alone: either way the outputs, gradients and generated tokens are the unfused model's."""
    if not traced:
        monkeypatch.setattr(grouping, "_dummy_inputs", lambda model: None)
    base = tm.bart().train()
    peft_model = _peft(base)
    grouped, unfused = _fastlora(base, peft_model), _fastlora(base, peft_model, fuse=False)
    names = [(g.parent is grouped.model.decoder.layers[0].encoder_attn, g.names) for g in groups_of(grouped)]
    cross = (True, ("k_proj", "v_proj") if traced else ("q_proj", "k_proj", "v_proj"))
    assert cross in names and len(names) == 3
    ids = tm.token_ids()

    def run(model):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # BART's own dropout
        out = model(input_ids=ids, decoder_input_ids=ids.flip(1)).logits
        out.pow(2).sum().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    _assert_same(run(grouped), run(unfused), "BART grouped vs unfused")
    grouped.eval()
    unfused.eval()
    with torch.no_grad():
        generated = grouped.generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(generated, unfused.generate(ids, max_new_tokens=4, do_sample=False))


def test_modules_state_dict_and_saved_adapter_unchanged(tmp_path):
    from peft import PeftModel

    base = tm.llama()
    peft_model = _peft(base)
    grouped, unfused = _fastlora(base, peft_model), _fastlora(base, peft_model, fuse=False)
    assert [(n, type(m)) for n, m in grouped.named_modules()] == [(n, type(m)) for n, m in unfused.named_modules()]
    assert grouped.state_dict().keys() == unfused.state_dict().keys()
    assert [n for n, _ in grouped.named_parameters()] == [n for n, _ in unfused.named_parameters()]
    fl.save_adapter(grouped, tmp_path / "grouped")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "grouped")
    ids = tm.token_ids()
    with torch.no_grad():
        assert_close(grouped(ids).logits, loaded(ids).logits.double(), F32, "saved adapter loaded in PEFT")


def test_merged_disabled_idle_and_inference_mode(group_calls):
    base = tm.llama()
    peft_model = _peft(base)
    grouped, unfused = _fastlora(base, peft_model), _fastlora(base, peft_model, fuse=False)
    ids = tm.token_ids()

    def logits(model):
        with torch.no_grad():
            return model(ids).logits

    assert_close(logits(grouped), logits(unfused).double(), F32, "no_grad")
    assert group_calls == [3, 2, 3, 2]
    for model in (grouped, unfused):  # a merged member takes no part; its siblings still group
        model.model.layers[0].self_attn.k_proj.merge()
    assert_close(logits(grouped), logits(unfused).double(), F32, "k_proj merged")
    assert group_calls[4:] == [2, 2, 3, 2]
    with fl.disable_adapter(grouped), fl.disable_adapter(unfused):
        assert_close(logits(grouped), logits(unfused).double(), F32, "disabled")
    assert group_calls[8:] == []
    with torch.inference_mode():  # inference tensors carry no version counter: each member computes alone
        assert_close(grouped(ids).logits, unfused(ids).logits.double(), F32, "inference_mode")
    assert group_calls[8:] == []
    fl.merge_and_unload(grouped)
    fl.merge_and_unload(unfused)
    assert groups_of(grouped) == []
    assert_close(logits(grouped), logits(unfused).double(), F32, "merged and unloaded")


def test_deepcopy_regroups_the_copy():
    grouped = fl.apply_lora(tm.llama(), "all-linear", r=R, alpha=ALPHA)
    tm.randomise_lora(grouped)
    twin = copy.deepcopy(grouped)
    for g in groups_of(twin):
        assert all(m is g.parent._modules[n] for n, m in zip(g.names, g.members(), strict=True))
        assert not any(g.parent is h.parent for h in groups_of(grouped))
    alone = copy.deepcopy(grouped.model.layers[0].self_attn.q_proj)
    assert alone.__dict__.get(GROUP_ATTR) is None
    ids = tm.token_ids()
    with torch.no_grad():
        assert_close(twin(ids).logits, grouped(ids).logits.double(), F32, "deep copy")


class _Block(nn.Module):
    """Three siblings on one input, with something happening between the calls."""

    def __init__(self, between):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(12, 8), nn.Linear(12, 4), nn.Linear(12, 4)
        self.between = between

    def forward(self, x):
        h = x * 1.0
        q = self.q_proj(h)
        h = self.between(self, h)
        return torch.cat([q, self.k_proj(h), self.v_proj(h)], -1)


def _in_place(block, h):
    h.mul_(2)
    return h


def _new_adapter(block, h):
    with torch.no_grad():
        block.k_proj.lora_B.mul_(2)
    return h


def _same_tensor_new_object(block, h):
    return h.view_as(h)


@pytest.mark.parametrize("between", [_in_place, _new_adapter, _same_tensor_new_object], ids=lambda f: f.__name__[1:])
def test_changes_between_the_calls_fall_back(between, group_calls):
    """An in-place change of x, a change of a member's adapter, or another tensor object between the leader's call
    and a sibling's: the sibling computes its own op. Named q/k/v, the block has no traced forward: grouped by
    name."""
    torch.manual_seed(0)
    grouped = fl.apply_lora(_Block(between), ["q_proj", "k_proj", "v_proj"], r=3, alpha=6)
    assert [g.names for g in groups_of(grouped)] == [("q_proj", "k_proj", "v_proj")]
    tm.randomise_lora(grouped)
    unfused = copy.deepcopy(grouped)
    grouping.detach_groups(unfused)
    x = torch.randn(5, 12)
    with torch.no_grad():
        out = grouped(x)
        assert group_calls == [3]
        ref = unfused(x)
    assert_close(out, ref.double(), F32, between.__name__)


def test_generic_siblings_found_by_the_traced_forward():
    """Siblings with names in no table are grouped when the traced forward shows they read one tensor."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Module()
            self.mix.left, self.mix.right, self.mix.other = nn.Linear(6, 5), nn.Linear(6, 3), nn.Linear(6, 4)

        @property
        def dummy_inputs(self):
            return {"x": torch.randn(2, 6)}

        def forward(self, x):
            return torch.cat([self.mix.right(x), self.mix.left(x), self.mix.other(x * 2)], -1)

    model = fl.apply_lora(Model(), "all-linear", r=2, alpha=4)
    assert [g.names for g in groups_of(model)] == [("right", "left")]  # the order of the calls


def test_fuse_must_be_a_bool():
    with pytest.raises(TypeError, match="fuse must be a bool"):
        fl.apply_lora(tm.llama(), "all-linear", fuse="yes")
    with pytest.raises(TypeError, match="fuse must be a bool"):
        fl.from_peft(_peft(tm.llama()), fuse=1)


@pytest.mark.parametrize("path", PATHS)
def test_compiled_fullgraph_without_breaks(path, group_calls):
    base = tm.llama().train()
    model = _fastlora(base, _peft(base), dropout=0.1)
    ids = tm.token_ids()
    torch._dynamo.reset()
    with on_path(path):
        explanation = torch._dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1 and group_calls == [3, 2, 3, 2]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = _run(compiled, ids, path)
    assert all(g._round is None for g in groups_of(model)), "a compiled call left outputs behind"
    _assert_same(got, _run(model, ids, path), "compiled vs eager")
    torch._dynamo.reset()


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_checkpointing_equal(use_reentrant, group_calls):
    base = tm.llama().train()
    model = _fastlora(base, _peft(base), dropout=0.2)
    ids = tm.token_ids()
    plain = _run(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    _assert_same(_run(model, ids), plain, "checkpointed vs plain")
    assert group_calls == [3, 2, 3, 2] * 3  # the plain run, the checkpointed run and its recomputation


def test_checkpointed_block_with_torch_checkpoint():
    """torch.utils.checkpoint around one block of siblings (the recomputation groups as the forward did)."""
    torch.manual_seed(0)
    model = fl.apply_lora(_Block(lambda block, h: h), ["q_proj", "k_proj", "v_proj"], r=3, alpha=6, dropout=0.3)
    tm.randomise_lora(model)
    model.train()
    x = torch.randn(5, 12, requires_grad=True)
    torch.manual_seed(2)
    model(x).pow(2).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    checkpoint(model, x, use_reentrant=False).pow(2).sum().backward()
    for name, g in plain.items():
        assert_close(dict(model.named_parameters())[name].grad, g.double(), F32, name)


def test_group_repr_and_members():
    model = fl.apply_lora(tm.llama(), "all-linear", r=R, alpha=ALPHA)
    group = groups_of(model)[0]
    assert isinstance(group, SiblingGroup) and repr(group) == "SiblingGroup(q_proj, k_proj, v_proj)"
    attention = model.model.layers[0].self_attn
    assert group.members() == [attention.q_proj, attention.k_proj, attention.v_proj]
    fl.unload(model)
    assert group.members() == []
