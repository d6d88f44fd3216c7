"""Triton helpers shared by the kernel files: tile ordering for GEMM-shaped launches.

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
