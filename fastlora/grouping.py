"""Sibling groups: LoRA layers of one block that read the same input (attention's q/k/v, the MLP's gate/up) computed
by one group op (``fastlora.ops.group``), with no change to the model's code, modules, parameters or state_dict.

Finding the groups (``attach_groups``, called by ``apply_lora`` and ``from_peft`` unless ``fuse=False``): among the
adapted linear layers, children of one parent. With a traced forward (a Hugging Face model's ``dummy_inputs``, run
once under ``torch.no_grad`` in eval mode) the siblings that received the very same tensor on every call form a group,
whatever their names (cross-attention's q, which reads the decoder's states, stays apart from k and v, which read the
encoder's); without one, siblings named as a known set (``SIBLING_NAMES``, the names PEFT's model tables target)
do. A group has at most ``MAX_MEMBERS`` members, in the order the model calls them.

At run time the members are still called one by one by the model's own code. The first member called (the leader)
computes every eligible member's output with one group op and returns its own; each other member, when called,
takes its output from that round only if it receives the same tensor object, unchanged since (its version counter;
under ``torch.compile`` the traced data pointer, which Dynamo compares with the tensor's version), and its own
adapter is unchanged (the same Parameters at the same versions, scaling, dropout, grad mode and autocast). Otherwise
it computes its own op, as without grouping: outputs and gradients are the same either way. A member that is
merged, disabled, idle, DoRA, not in the same dtype or device, holds sharded parameters (FSDP2 sharding the
siblings apart, DeepSpeed ZeRO-3) or reads another in_features does not take part. Inference tensors
(``torch.inference_mode``) have no version counter: there each member computes alone.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from fastlora.distributed import is_sharded
from fastlora.layers import GROUP_ATTR
from fastlora.ops.backend import autocast_enabled, get_backend
from fastlora.ops.group import MAX_MEMBERS, group_runs, lora_linear_group

__all__ = ["SiblingGroup", "sibling_groups", "attach_groups", "detach_groups", "groups_of", "SIBLING_NAMES"]

# Sibling projections that read one input in the common architectures (Llama-style, BERT-style, T5, Meta's original
# Llama and Mixtral's experts, DeepSeek's MLA): the name-based rule when no traced forward is available.
SIBLING_NAMES = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("q", "k", "v"),
    ("wq", "wk", "wv"),
    ("w1", "w3"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
)

_PLAIN = (torch.Tensor, nn.Parameter)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _stamp(x: torch.Tensor):
    """What must be equal for a tensor to be unchanged since: its version counter; under torch.compile its data
    pointer (Dynamo answers data_ptr comparisons from the traced tensor and its version, and refuses to trace one
    it cannot prove equal)."""
    return x.data_ptr() if _compiling() else x._version


def _member_key(member):
    """What an output computed for this member's adapter depends on besides x (eager only)."""
    if _compiling():
        return None
    tensors = (member.weight, member.bias, member.lora_A, member.lora_B, member.lora_bias)
    state = tuple((id(t), t._version) if t is not None else None for t in tensors)
    autocast = autocast_enabled(member.weight.device.type)
    return (state, member.scaling, member.dropout_p, torch.is_grad_enabled(), autocast, get_backend())


def _fits(x: torch.Tensor, member) -> bool:
    """Whether a member can be computed from x in the group: whole, plain tensors (not an FSDP2 DTensor, not a
    ZeRO-3 parameter, which its own module's hooks gather and release), x's in_features, device and dtype (or
    autocast)."""
    tensors = [t for t in member[:5] if t is not None]
    if any(type(t) not in _PLAIN or is_sharded(t) for t in tensors):
        return False
    w = member.weight
    if w.dim() != 2 or w.shape[1] != x.shape[-1] or w.device != x.device:
        return False
    return w.dtype == x.dtype or autocast_enabled(x.device.type)


class _Round:
    """The outputs the leader computed for the other members: {index: (output, member key)}, for x as it was; and
    the members it served (the leader and those outputs)."""

    __slots__ = ("x", "stamp", "outputs", "served")

    def __init__(self, x, stamp, outputs, served):
        self.x, self.stamp, self.outputs, self.served = x, stamp, outputs, served


class SiblingGroup:
    """Sibling layers ``parent.<name>`` for each name in ``names``, computed together when they receive the same
    input (see the module docstring). Kept in each member's ``__dict__`` under ``GROUP_ATTR`` (not a submodule:
    state_dict keys do not change). A member is a layer with ``group_member()`` (a ``GroupMember`` or None when it
    cannot take part now); a name whose module no longer carries the group (unloaded, replaced) is skipped."""

    def __init__(self, parent: nn.Module, names: Iterable[str]):
        self.parent = parent
        self.names = tuple(names)
        self._round: _Round | None = None

    def members(self) -> list[nn.Module]:
        """The member modules that are in place now."""
        found = []
        for name in self.names:
            module = self.parent._modules.get(name)
            if module is not None and module.__dict__.get(GROUP_ATTR) is self:
                found.append(module)
        return found

    def output(self, module: nn.Module, x) -> torch.Tensor | None:
        """``module``'s output for x from the group, or None when it computes its own op."""
        if type(x) not in _PLAIN or (not _compiling() and x.is_inference()):  # no version counter to check
            return None
        modules = self.members()
        index = next((i for i, m in enumerate(modules) if m is module), None)
        if index is None:
            return None
        pending = self._round
        if pending is not None:
            got = pending.outputs.pop(index, None)
            if got is not None:
                if not pending.outputs:
                    self._round = None
                y, key = got
                if pending.x is x and pending.stamp == _stamp(x):
                    own = module.group_member()
                    if own is not None and key == _member_key(own):
                        return y
                return None
            if index not in pending.served:  # not part of that round (merged, disabled, ...): it runs alone
                return None
            self._round = None  # this member already had its output: a new round
        return self._lead(modules, index, x)

    def _lead(self, modules, index, x):
        if not group_runs(x):  # e.g. few rows on a GPU: each member's own kernels serve better
            return None
        taking = []
        for i, m in enumerate(modules):
            member = m.group_member()
            if member is not None and _fits(x, member):
                taking.append((i, member))
        if len(taking) < 2 or all(i != index for i, _ in taking):
            return None
        outputs = lora_linear_group(x, [member for _, member in taking])
        own = None
        rest = {}
        for (i, member), y in zip(taking, outputs, strict=True):
            if i == index:
                own = y
            else:
                rest[i] = (y, _member_key(member))
        self._round = _Round(x, _stamp(x), rest, frozenset(i for i, _ in taking))
        return own

    def __deepcopy__(self, memo):
        """The copy of a model's group serves the copied members (the copied parent); a copied member alone is not
        grouped. No pending outputs are copied."""
        parent = memo.get(id(self.parent))
        if parent is None:
            return None
        return SiblingGroup(parent, self.names)

    def __getstate__(self):
        return {"parent": self.parent, "names": self.names, "_round": None}

    def __repr__(self) -> str:
        return f"SiblingGroup({', '.join(self.names)})"


# ----------------------------------------------------------------------------------------------------------
# Finding the groups
# ----------------------------------------------------------------------------------------------------------


def _dummy_inputs(model: nn.Module):
    """A Hugging Face model's dummy inputs (its own, or its base model's for a PEFT model), on its device."""
    for candidate in (model, getattr(model, "get_base_model", lambda: None)()):
        inputs = getattr(type(candidate), "dummy_inputs", None) if candidate is not None else None
        if inputs is None:
            continue
        try:
            inputs = candidate.dummy_inputs
            device = next(model.parameters()).device
        except Exception:  # noqa: BLE001 (a property that fails: no traced forward, the names decide)
            return None
        if isinstance(inputs, dict) and all(isinstance(v, torch.Tensor) for v in inputs.values()):
            return {k: v.to(device) for k, v in inputs.items()}
    return None


def _traced_inputs(model: nn.Module, layers: dict[str, nn.Module]):
    """{layer name: [(call number, input tensor) of each of its calls]} from one forward of the model on its dummy
    inputs (eval mode, no gradients, every module's training flag restored after), or None when there is none."""
    inputs = _dummy_inputs(model)
    if inputs is None:
        return None
    calls: dict[str, list] = {name: [] for name in layers}
    count = iter(range(1 << 62))

    def record(name, args):
        calls[name].append((next(count), args[0] if args else None))

    handles = [
        layer.register_forward_pre_hook(lambda m, args, name=name: record(name, args)) for name, layer in layers.items()
    ]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(**inputs)
    except Exception:  # noqa: BLE001 (a model whose dummy forward fails: the names decide)
        return None
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
    return calls


def _same_inputs(a: list, b: list) -> bool:
    """Whether two layers' traced calls received the very same tensor, call by call."""
    return len(a) == len(b) > 0 and all(x is y and x is not None for (_, x), (_, y) in zip(a, b, strict=True))


def _chunks(names: list[str]) -> list[list[str]]:
    return [names[i : i + MAX_MEMBERS] for i in range(0, len(names), MAX_MEMBERS) if len(names[i:]) > 1]


def sibling_groups(model: nn.Module, names: Iterable[str]) -> list[tuple[str, list[str]]]:
    """[(parent name, [child names in call order])] of the sibling groups among the modules ``names`` (dotted) of
    ``model``, found with the modules in place now (the traced forward runs them)."""
    layers = {name: model.get_submodule(name) for name in names}
    by_parent: dict[str, list[str]] = {}
    for name in layers:
        parent, _, child = name.rpartition(".")
        by_parent.setdefault(parent, []).append(child)
    by_parent = {p: children for p, children in by_parent.items() if len(children) > 1}
    if not by_parent:
        return []
    traced = _traced_inputs(model, {n: m for n, m in layers.items() if n.rpartition(".")[0] in by_parent})
    groups = []
    for parent, children in by_parent.items():
        if traced is not None:
            full = {c: f"{parent}.{c}" if parent else c for c in children}
            called = sorted((c for c in children if traced[full[c]]), key=lambda c: traced[full[c]][0][0])
            sets: list[list[str]] = []
            for c in called:
                home = next((s for s in sets if _same_inputs(traced[full[s[0]]], traced[full[c]])), None)
                if home is None:
                    sets.append([c])
                else:
                    home.append(c)
        else:
            sets = [[c for c in names if c in children] for names in SIBLING_NAMES]
        for s in sets:
            groups += [(parent, chunk) for chunk in _chunks(s)]
    return groups


def attach_groups(model: nn.Module, groups: list[tuple[str, list[str]]]) -> list[SiblingGroup]:
    """Attaches a SiblingGroup to the layers of each (parent name, [child names]) of ``sibling_groups`` (layers with
    ``group_member()``, in place now). Returns the groups."""
    attached = []
    for parent_name, children in groups:
        parent = model.get_submodule(parent_name)
        group = SiblingGroup(parent, children)
        for child in children:
            parent._modules[child].__dict__[GROUP_ATTR] = group
        attached.append(group)
    return attached


def detach_groups(model: nn.Module) -> None:
    """Every layer of ``model`` computes its own op again."""
    for module in model.modules():
        module.__dict__.pop(GROUP_ATTR, None)


def groups_of(model: nn.Module) -> list[SiblingGroup]:
    """The sibling groups attached to ``model``'s layers, each once, in module order."""
    found = {}
    for module in model.modules():
        group = module.__dict__.get(GROUP_ATTR)
        if group is not None:
            found.setdefault(id(group), group)
    return list(found.values())
