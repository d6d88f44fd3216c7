"""Parameters split across processes: FSDP2's ``DTensor`` and DeepSpeed ZeRO-3's partitioned ``Parameter``.

Under FSDP2 (``fully_shard``) a parameter becomes a ``DTensor`` whose ``shape`` is the full one and whose local
tensor holds this rank's rows; ``full_tensor()`` gathers it (every rank must call it). Under ZeRO-3 a parameter
keeps its object but its data is emptied: ``shape`` is ``[0]``, the real shape is ``ds_shape``, and
``deepspeed.zero.GatheredParameters`` gathers it for a block (again on every rank). fastlora's layers read shapes
through ``full_shape``, gather through ``full_tensor`` and ``gathered``, and write files from the main process only.

Every function that gathers is a collective: all ranks call it, on the same parameters, in the same order.
"""

from __future__ import annotations

import contextlib
import sys

import torch

__all__ = ["dtensor_class", "is_dtensor", "is_zero3", "is_sharded", "full_shape", "full_tensor", "full_tensors",
           "gathered", "zero3_read_by", "fsdp_modules", "fsdp_parameters_moving", "in_process_group",
           "is_main_process"]  # fmt: skip


def dtensor_class() -> type | None:
    """``torch.distributed.tensor.DTensor`` once something imported it (FSDP2 does), else None."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_dtensor(t) -> bool:
    """An FSDP2-sharded tensor (``torch.distributed.tensor.DTensor``)."""
    dtensor = dtensor_class()
    return dtensor is not None and isinstance(t, dtensor)


def is_zero3(t) -> bool:
    """A DeepSpeed ZeRO-3 parameter (it carries ``ds_id`` and ``ds_shape``; its own data may be empty)."""
    return isinstance(t, torch.Tensor) and hasattr(t, "ds_id") and hasattr(t, "ds_shape")


def is_sharded(t) -> bool:
    return is_dtensor(t) or is_zero3(t)


def full_shape(t: torch.Tensor) -> torch.Size:
    """The shape of the whole tensor: ``ds_shape`` for a ZeRO-3 parameter, ``shape`` otherwise (a DTensor's shape
    already is the global one)."""
    return torch.Size(t.ds_shape) if is_zero3(t) else t.shape


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, detached: gathered (a copy) when sharded, ``t`` itself otherwise. A collective for a
    sharded tensor."""
    if is_dtensor(t):
        return t.detach().full_tensor()
    if is_zero3(t):
        with gathered([t]):
            return t.detach().clone()
    return t.detach()


def full_tensors(tensors) -> list[torch.Tensor]:
    """``full_tensor`` of each tensor, the ZeRO-3 parameters among them gathered in one block. A collective when any
    tensor is sharded: every rank calls it with the same tensors in the same order."""
    tensors = list(tensors)
    with gathered(t for t in tensors if is_zero3(t)):
        return [t.detach().clone() if is_zero3(t) else full_tensor(t) for t in tensors]


@contextlib.contextmanager
def gathered(tensors, modify: bool = False):
    """Inside the block every ZeRO-3 parameter among ``tensors`` holds its full data (``GatheredParameters``).

    With ``modify=True`` what rank 0 writes into them is kept (broadcast, then partitioned again on exit); every
    rank must compute the same change. Other tensors are left as they are; an FSDP2 ``DTensor`` is refused (gather
    it with ``full_tensor``, or unshard its module). A collective when any tensor is a ZeRO-3 parameter.
    """
    tensors = [t for t in tensors if t is not None]
    for t in tensors:
        if is_dtensor(t):
            raise ValueError(
                "this operation needs the full tensor, and this one is sharded by FSDP2 (a DTensor): run it on a "
                "model that is not sharded, or use fl.unload / fl.merge_and_unload, which gather the layers first"
            )
    zero3 = [t for t in tensors if is_zero3(t)]
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0 if modify else None):
        yield


def zero3_read_by(module: torch.nn.Module, params) -> None:
    """Under DeepSpeed ZeRO-3, has ``module``'s forward and backward see ``params`` (parameters of its submodules
    that its forward reads without calling those submodules) whole.

    ZeRO-3 gathers a module's own parameters in hooks around its forward and backward; each of ``params`` becomes
    an external parameter of ``module`` (``deepspeed.zero.register_external_parameter``, DeepSpeed's way for a
    module that uses parameters it does not own), so those hooks gather it too, and partition it again after. One
    that is not gathered at this call (the first one after it was registered) is gathered now, as DeepSpeed's own
    discovery of such parameters does inside an engine's forward. ``params`` must all be ZeRO-3 parameters.
    """
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    for p in params:
        deepspeed.zero.register_external_parameter(module, p)  # keyed by the parameter: registering again is free
    missing = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if missing:
        missing[0].all_gather(param_list=missing)


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that FSDP2's ``fully_shard`` was applied to."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    module_class = getattr(fsdp, "FSDPModule", None) or getattr(
        sys.modules.get("torch.distributed._composable.fsdp"), "FSDPModule", None
    )
    return [m for m in model.modules() if isinstance(m, module_class)] if module_class is not None else []


def _fsdp_places(modules) -> dict[int, object]:
    """Where FSDP2 writes each parameter the FSDP2 ``modules`` manage (the ``module`` and ``param_name`` of its
    ``ParamModuleInfo``), by the id of the sharded Parameter. These are torch's private structures (as in torch 2.13,
    where this is tested); a torch that keeps them otherwise gets a NotImplementedError, not a wrong binding."""
    places = {}
    try:
        for module in modules:
            state = module._get_fsdp_state()
            groups = getattr(state, "_fsdp_param_groups", None) or [state._fsdp_param_group]
            for group in filter(None, groups):
                for record in group.fsdp_params:
                    info = record._module_info
                    places[id(record.sharded_param)] = info
                    if not isinstance(info.param_name, str) or not isinstance(info.module, torch.nn.Module):
                        raise AttributeError("ParamModuleInfo has no module and param_name")
    except AttributeError as err:
        raise NotImplementedError(
            f"this torch's FSDP2 records its parameters differently ({err}), so fastlora cannot move an adapter's "
            "parameters inside a sharded model: switch adapters before fully_shard"
        ) from err
    return places


@contextlib.contextmanager
def fsdp_parameters_moving(model: torch.nn.Module):
    """Inside the block, Parameters of a model sharded by FSDP2 may move between its modules (``set_adapter`` swaps
    an adapter's Parameters into a layer and the active one out of it); on exit FSDP2 writes each one to where it
    now is. A no-op for a model without FSDP2 modules.

    FSDP2 keeps, for each parameter it manages, the module and attribute it writes the gathered tensor to before a
    forward and the sharded one back to after it; a Parameter moved elsewhere would be written back over the
    parameter now in its old place. The block first reshards every FSDP2 module (so the Parameters in the modules
    are the sharded ones FSDP2 tracks, which the move carries with their optimizer state), and on exit points each
    record at its Parameter's new module and name.
    """
    modules = fsdp_modules(model)
    if not modules:
        yield
        return
    for module in modules:
        module.reshard()
    places = _fsdp_places(modules)
    try:
        yield
    finally:  # also after a failed move: every Parameter is written back to where it is
        for module in model.modules():
            for name, p in module._parameters.items():
                info = places.get(id(p))
                if info is not None:
                    info.module, info.param_name = module, name


def in_process_group() -> bool:
    """Whether torch.distributed's default process group is set up (several processes may share the work)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True in a single process, and on rank 0 of the default process group when torch.distributed is set up."""
    return not in_process_group() or torch.distributed.get_rank() == 0
