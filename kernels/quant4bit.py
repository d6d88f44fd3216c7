"""The packed 4-bit weight as plain tensors: what the 4-bit kernels (kernels/nf4.py) and the op
(fastlora/ops/linear4bit.py) pass around. Plain Python and torch (no Triton), so the torch path imports it too."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Quant4bit"]


class Quant4bit(NamedTuple):
    """A packed 4-bit W [N, K] as plain tensors. packed: uint8 view (N*K+1)//2 bytes; absmax: float32, or uint8
    with the nested absmax2 (float32), code2 (float32 [256]), offset (float32 scalar tensor), blocksize2."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: tuple[int, int]
    dtype: torch.dtype
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    blocksize2: int = 256
    quant_type: str = "nf4"  # which table code holds; the kernels read the table, not this name

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None
