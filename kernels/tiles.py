"""Triton helpers every kernel file shares: the tile order of GEMM-shaped launches and the int64 offsets of a tile.

What else kernels share has a module of its own, imported the same way (``from fastlora.kernels.<module> import``):
dropout's hash, seed load and launch arguments are kernels/dropout.py's, launch plans kernels/launch.py's, the
choice between kernels kernels/dispatch.py's, configs and dtype facts kernels/configs.py's, and convolution
geometry (host side) kernels/geometry.py's.

Naming in every kernel file: ``i_`` index vectors, ``m_`` masks, ``p_`` pointers, ``b_`` loaded blocks,
``stride_<tensor><dim>`` strides, ``BLOCK_<DIM>`` tile sizes (see kernels/configs.py).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of tile ``tile_id`` in grouped order: GROUP_M row blocks share each column block of the
    right operand while it sits in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def tile_offsets(i_a, i_b, stride_a, stride_b):
    """Offsets [len(i_a), len(i_b)] of elements (a, b) in a tensor with these strides, in int64 (exact past 2^31)."""
    return i_a.to(tl.int64)[:, None] * stride_a + i_b.to(tl.int64)[None, :] * stride_b
