"""Plain-PyTorch LoRA over a bitsandbytes 4-bit (NF4/FP4) base weight: the specification of the QLoRA layer.

The frozen W [N, K] is stored as bitsandbytes packs it (``Params4bit`` data and its ``QuantState``); its value is
what bitsandbytes' own dequantization gives, and the layer is then plain LoRA on that W:

    W = dequantize_4bit(packed, quant_state)            (quant_state.dtype), then cast to x's dtype
    Y = x W^T + bias + s * ((m * x) A^T) B^T

bitsandbytes 0.50's CPU kernel disagrees with its own quantizer and its other backends when a block spans two
rows (K a multiple of 64 but not of the block size: it reads the wrong absmax). On CPU this module then calls
bitsandbytes' portable implementation (its default backend, which bitsandbytes itself uses on CPU for odd K).
One more difference, of sign only: for FP4 code 8 that CPU kernel gives -0.0, the code table (and the portable
implementation, and fastlora's kernels) +0.0.
Needs bitsandbytes (``pip install fastlora[qlora]``).
"""

from __future__ import annotations

import torch

from fastlora.reference import lora_linear_ref

__all__ = ["dequantize_4bit_ref", "absmax_ref", "lora_linear_4bit_ref"]


def absmax_ref(quant_state) -> torch.Tensor:
    """The float32 block scales: quant_state.absmax, or its nested (double-quantized) decoding plus the offset."""
    import bitsandbytes.functional as bnbf

    if not quant_state.nested:
        return quant_state.absmax.float()
    absmax = bnbf.dequantize_blockwise(quant_state.absmax, quant_state.state2)
    absmax += quant_state.offset
    return absmax.float()


def dequantize_4bit_ref(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """W [N, K] in quant_state.dtype, as bitsandbytes dequantizes it (see the module docstring for the CPU)."""
    import bitsandbytes.functional as bnbf

    if packed.device.type == "cpu" and quant_state.shape[-1] % quant_state.blocksize != 0:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

        portable = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # without torch.compile
        flat = packed.view(torch.uint8).reshape(-1)
        code = quant_state.code.to(torch.float32)
        shape, dtype = quant_state.shape, quant_state.dtype
        return portable(flat, absmax_ref(quant_state), code, quant_state.blocksize, shape, dtype)
    return bnbf.dequantize_4bit(packed, quant_state)


def lora_linear_4bit_ref(x, packed, quant_state, bias, lora_A, lora_B, scaling, mask=None):
    """Y = x W^T + bias + s * ((mask * x) A^T) B^T with W = dequantize_4bit(packed, quant_state) in x's dtype.

    x [..., K], packed: the Params4bit data, quant_state: its QuantState (shape [N, K]), bias [N] or None,
    lora_A [r, K], lora_B [N, r], mask like x or None."""
    weight = dequantize_4bit_ref(packed, quant_state).to(x.dtype)
    return lora_linear_ref(x, weight, bias, lora_A, lora_B, scaling, mask)
