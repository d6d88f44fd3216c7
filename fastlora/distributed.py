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

__all__ = ["is_dtensor", "is_zero3", "is_sharded", "full_shape", "full_tensor", "full_tensors", "gathered",
           "zero3_read_by", "in_process_group", "is_main_process"]  # fmt: skip


def is_dtensor(t) -> bool:
    """An FSDP2-sharded tensor (``torch.distributed.tensor.DTensor``)."""
    tensor_mod = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(tensor_mod, "DTensor", None)
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


def in_process_group() -> bool:
    """Whether torch.distributed's default process group is set up (several processes may share the work)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True in a single process, and on rank 0 of the default process group when torch.distributed is set up."""
    return not in_process_group() or torch.distributed.get_rank() == 0
