"""Every argument check, written once: rank, alpha, dropout, scaling, tensors, embedding indices, and the warning
for a base weight that is not frozen. The ops, the layers, apply_lora and load_adapter all call these, so one
value is accepted or refused the same way everywhere.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

__all__ = [
    "FLOAT_DTYPES",
    "INDEX_DTYPES",
    "dtype_name",
    "check_rank",
    "check_alpha",
    "check_dropout",
    "check_scaling",
    "check_tensor",
    "check_same_dtype",
    "check_same_device",
    "check_lora_factors",
    "check_padding_idx",
    "check_indices",
    "check_embedding_indices",
    "host_memory",
    "cached_check",
    "warn_trainable_base",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
# The debug switch of the embedding range checks (kernels/embedding.py reads the same variable).
SYNC_CHECKS = os.environ.get("FASTLORA_SYNC_CHECKS", "0") == "1"


_MISS = object()


def cached_check(check):
    """``check`` (a validation of an op's arguments that returns normalised values) remembered per call signature:
    tensors by shape, dtype and device, everything else by type and value. A known signature costs a dictionary
    lookup; a call whose arguments cannot be hashed (a list) is checked in full every time. Only checks whose
    outcome depends on nothing else may be wrapped."""
    memo: dict = {}

    def checked(*args):
        try:
            key = tuple([(a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else (type(a), a) for a in args])
            known = memo.get(key, _MISS)
        except TypeError:
            return check(*args)
        if known is not _MISS:
            return known
        result = check(*args)
        if len(memo) < 4096:
            memo[key] = result
        return result

    checked.__wrapped__ = check
    checked.__doc__ = check.__doc__
    return checked


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_rank(r, name: str = "LoRA rank r"):
    """A LoRA rank: an int >= 1 (ValueError otherwise)."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{name} must be an int >= 1, got {r!r}")


def check_alpha(alpha, name: str = "alpha"):
    """A LoRA alpha: a finite number > 0 (TypeError for a non-number, ValueError for the rest)."""
    if not _is_number(alpha):
        raise TypeError(f"{name} must be a finite number > 0, got {alpha!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {alpha!r}")


def check_dropout(p, name: str = "dropout_p"):
    """A dropout probability: a number in [0, 1) (ValueError otherwise)."""
    if not _is_number(p) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {p!r}")


def check_scaling(scaling):
    """The LoRA scaling s passed to an op: a Python number (a tensor would force a device sync per call)."""
    if not _is_number(scaling):
        raise TypeError(f"scaling must be a Python float, got {type(scaling).__name__}")


def check_tensor(name: str, t, *, ndim: int | None = None, floating: bool = True):
    """t is a tensor (of float16/bfloat16/float32 when ``floating``) with ``ndim`` dimensions when given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {dtype_name(t.dtype)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_same_dtype(name: str, t: torch.Tensor, weight: torch.Tensor):
    """t has the base weight's dtype (the ops compute in one dtype; autocast casts before this check matters)."""
    if t.dtype != weight.dtype:
        raise TypeError(f"{name} is {dtype_name(t.dtype)} but weight is {dtype_name(weight.dtype)}; they must match")


def check_same_device(**tensors):
    """Every tensor given (None skipped) is on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_lora_factors(lora_A, lora_B, in_features: int, out_features: int, scaling, *, ndim: int = 2):
    """A [r, in_features] and B [out_features, r] (conv: ndim 4, A [r, C, kh, kw] and B [O, r, 1, 1]), r >= 1."""
    check_tensor("lora_A", lora_A, ndim=ndim)
    check_tensor("lora_B", lora_B, ndim=ndim)
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"LoRA rank must be at least 1, got lora_A of shape {tuple(lora_A.shape)}")
    if lora_A.numel() // r != in_features:
        raise ValueError(f"lora_A must have shape [r, {in_features}], got {tuple(lora_A.shape)}")
    if lora_B.shape[0] != out_features or lora_B.numel() != out_features * r:
        raise ValueError(f"lora_B must have shape [{out_features}, {r}] to match lora_A, got {tuple(lora_B.shape)}")
    check_scaling(scaling)


def check_padding_idx(padding_idx, num_embeddings: int) -> int | None:
    """None or an index in [-V, V); returned as None or its value in [0, V)."""
    if padding_idx is None:
        return None
    if not isinstance(padding_idx, int) or isinstance(padding_idx, bool):
        raise TypeError(f"padding_idx must be None or an int, got {type(padding_idx).__name__}")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx must be in [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
    return padding_idx % num_embeddings


def check_indices(idx):
    """idx is an int32/int64 tensor (its range is checked where the values are read, see check_embedding_indices)."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx must be a torch.Tensor of indices, got {type(idx).__name__}")
    if idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"idx must be an int32 or int64 tensor of indices, got {dtype_name(idx.dtype)}")


def host_memory(t: torch.Tensor) -> bool:
    """Whether t lives in host memory, where reading its values waits for no device (a CPU tensor)."""
    return t.device.type == "cpu"


def check_embedding_indices(idx: torch.Tensor, num_embeddings: int) -> None:
    """Every index must be in [0, num_embeddings), checked without a device-to-host sync.

    CPU indices are host memory: min and max are read and a bad index raises ValueError here, before any output
    exists. Indices on a device are checked by a device-side assert queued after the comparison
    (``torch._assert_async``), as torch's own embedding does: the error surfaces as a RuntimeError ("device-side
    assert triggered") at the next call that waits for the device. With the debug switch
    ``FASTLORA_SYNC_CHECKS=1`` (read at import; the attribute SYNC_CHECKS) device indices are read back too and
    raise the ValueError here, at the cost of one sync per call."""
    if idx.numel() == 0:
        return
    if not host_memory(idx) and not SYNC_CHECKS:
        in_range = ((idx >= 0) & (idx < num_embeddings)).all()
        torch._assert_async(in_range, f"idx: embedding indices must be in [0, {num_embeddings})")
        return
    lo, hi = torch.stack(torch.aminmax(idx.reshape(-1))).tolist()
    if lo < 0 or hi >= num_embeddings:
        raise ValueError(
            f"idx: embedding indices must be in [0, {num_embeddings}) for num_embeddings={num_embeddings}, "
            f"got indices from {lo} to {hi}"
        )


def warn_trainable_base(what: str = "weight", gradient: str = "dW"):
    """The warning for a base tensor that requires grad: its full gradient is formed, which LoRA avoids."""
    warnings.warn(
        f"fastlora: the base {what} requires grad, so its full gradient {gradient} is formed; LoRA normally keeps "
        "it frozen (weight.requires_grad_(False))",
        stacklevel=4,
    )
