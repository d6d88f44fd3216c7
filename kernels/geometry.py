"""Convolution geometry, written once: argument normalisation, output size, memory format and the input gradient.

Plain Python and torch (no Triton), so the torch path, the Triton launchers, validate and the benchmarks all
import it, with or without Triton installed. ``pads`` is always (top, bottom, left, right): 'same' with an even
dilated kernel extent pads one more at the bottom/right, as torch does.
"""

from __future__ import annotations

import torch

__all__ = ["int_pair", "conv2d_pads", "output_size", "memory_format", "input_grad"]


def int_pair(name: str, value, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair; ValueError naming the argument otherwise."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair)
    ):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def conv2d_pads(padding, kernel_size, stride, dilation) -> tuple[int, int, int, int]:
    """Normalise padding (int, pair, 'same' or 'valid') to (top, bottom, left, right)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        if tuple(stride) != (1, 1):
            raise ValueError(f"padding='same' needs stride 1 (as in torch), got stride {tuple(stride)}")
        pads = []
        for k, d in zip(kernel_size, dilation, strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = int_pair("padding", padding, 0)
    return (ph, ph, pw, pw)


def output_size(h: int, w: int, kernel_size, stride, pads, dilation) -> tuple[int, int]:
    """(Ho, Wo) of a convolution of an h x w input; pads = (top, bottom, left, right)."""
    kh, kw = kernel_size
    ho = (h + pads[0] + pads[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + pads[2] + pads[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is laid out that way (and not also plain contiguous), else contiguous: the layout a
    convolution's output and input gradient take."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def input_grad(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, pads, dilation, groups: int):
    """conv_transpose(dY, W): the gradient of conv(x, W) with respect to x, by torch (cuDNN on the GPU), in x's
    memory format. Asymmetric pads are the symmetric top/left pads on an input extended at the bottom/right, then
    cut back to x's size."""
    nb, c, h, w = x.shape
    extra_h, extra_w = pads[1] - pads[0], pads[3] - pads[2]
    shape = [nb, c, h + extra_h, w + extra_w]
    ref = x if extra_h == 0 and extra_w == 0 else x.new_empty(()).expand(shape)
    dx = torch.ops.aten.convolution_backward(
        dy, ref, weight, None, list(stride), [pads[0], pads[2]], list(dilation), False, [0, 0], groups,
        [True, False, False],
    )[0]  # fmt: skip
    if extra_h or extra_w:
        dx = dx[:, :, :h, :w]
    return dx.contiguous(memory_format=memory_format(x))
