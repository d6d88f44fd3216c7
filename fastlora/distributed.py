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

__all__ = ["is_dtensor", "is_zero3", "is_sharded", "full_shape", "full_tensor", "gathered", "is_main_process"]


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


def is_main_process() -> bool:
    """True in a single process, and on rank 0 of the default process group when torch.distributed is set up."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
