"""Block-size, warp and stage choices per GPU generation, and the facts about the device the launchers need.

Every config listed here ships: the test suite compiles each one ahead of time for sm_80 and sm_90 and
checks that it fits shared memory, uses the tensor-core instructions it should (wgmma on sm_90) and does
not spill. Keep the lists short: each entry costs autotuning time on the user's first call.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton import knobs as _knobs

    INTERPRET = bool(_knobs.runtime.interpret)
except (ImportError, AttributeError):  # older Triton
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# Shared memory per block a kernel may use, by major compute capability (bytes).
SHARED_MEMORY_LIMIT = {8: 166912, 9: 232448}

# Programs the skinny (rank-r) passes aim for, per streaming multiprocessor: enough to hide memory latency.
PROGRAMS_PER_SM = 4


def dot_dtype(dtype: torch.dtype):
    """Operand dtype for tl.dot. The input dtype on a GPU; float32 for bfloat16 under the interpreter, which
    cannot do bfloat16 arithmetic (it multiplies raw bit patterns). Accumulation is float32 either way."""
    if INTERPRET and dtype == torch.bfloat16:
        return tl.float32
    return TL_DTYPES[dtype]


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision for float32 inputs: TF32 only where torch itself allows it for matmuls."""
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=None)
def _device_props(index: int):
    return torch.cuda.get_device_properties(index)


def num_programs_target(device: torch.device) -> int:
    """How many programs a skinny pass should launch to fill the device."""
    if INTERPRET or device.type != "cuda":
        return 4
    return _device_props(device.index if device.index is not None else torch.cuda.current_device()).multi_processor_count * PROGRAMS_PER_SM


def capability(device: torch.device) -> int:
    """Major compute capability (0 under the interpreter or off CUDA)."""
    if INTERPRET or device.type != "cuda":
        return 0
    return torch.cuda.get_device_capability(device)[0]


# ----------------------------------------------------------------------------------------------------------
# Main GEMM (Y = x W^T + s * S B^T, dX = dY W + m * (dS A)): BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages
# ----------------------------------------------------------------------------------------------------------

_GEMM_16BIT = {
    9: [(128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 128, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4)],
    8: [(128, 256, 32, 8, 8, 3), (128, 128, 32, 8, 4, 4), (64, 128, 32, 8, 4, 4), (128, 64, 32, 8, 4, 4)],
}
_GEMM_32BIT = {
    9: [(128, 128, 32, 8, 8, 3), (64, 128, 32, 8, 4, 4)],
    8: [(128, 128, 32, 8, 8, 3), (64, 128, 32, 8, 4, 3)],
}
# Under the interpreter: small tiles so that odd test shapes cross several tiles and every mask is exercised.
GEMM_INTERPRET = (32, 32, 16, 2, 4, 1)


def gemm_config_tuples(major: int, dtype: torch.dtype):
    table = _GEMM_32BIT if dtype == torch.float32 else _GEMM_16BIT
    return table[9 if major >= 9 else 8]


def gemm_configs(major: int, dtype: torch.dtype):
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}, num_warps=w, num_stages=s)
        for bm, bn, bk, g, w, s in gemm_config_tuples(major, dtype)
    ]


# ----------------------------------------------------------------------------------------------------------
# Skinny passes (S = (m x) A^T, dS = s dY B, dA = dS^T (m x), dB = s dY^T S): BLOCK_M, BLOCK_K, warps, stages
# ----------------------------------------------------------------------------------------------------------

SKINNY = {9: [(64, 128, 4, 3), (128, 64, 8, 3)], 8: [(64, 64, 4, 3), (128, 64, 8, 3)]}
SKINNY_INTERPRET = (16, 32, 4, 1)


def skinny_config_tuples(major: int):
    return SKINNY[9 if major >= 9 else 8]


def rank_block(r: int) -> int:
    """Rank tile: the padded rank for r <= 64 (at least 16, the tensor-core minimum), else 64-wide chunks."""
    return min(64, max(16, triton.next_power_of_2(r)))


# ----------------------------------------------------------------------------------------------------------
# Conv2d (kernels/conv2d.py)
# ----------------------------------------------------------------------------------------------------------
# Main implicit GEMM (Y = im2col(x) W^T + s * S B^T): BLOCK_M (output pixels), BLOCK_N (output channels),
# BLOCK_K (input channels per step of one kernel tap), GROUP_M, warps, stages.

_CONV_GEMM_16BIT = {
    9: [(128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (64, 128, 64, 8, 4, 4)],
    8: [(128, 128, 32, 8, 8, 3), (64, 128, 32, 8, 4, 4), (128, 64, 32, 8, 4, 4)],
}
_CONV_GEMM_32BIT = {
    9: [(128, 128, 32, 8, 8, 3), (64, 64, 32, 8, 4, 3)],
    8: [(128, 64, 32, 8, 8, 3), (64, 64, 32, 8, 4, 3)],
}
# Fused dX GEMM (dX = conv_transpose(dY, W) + conv_transpose(dS, A)): BLOCK_M (input pixels), BLOCK_N (input
# channels), BLOCK_K (output channels per step of one kernel tap), GROUP_M, warps, stages.
_CONV_DGRAD_16BIT = {
    9: [(128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (64, 128, 64, 8, 4, 4)],
    8: [(128, 128, 32, 8, 8, 3), (64, 128, 32, 8, 4, 4)],
}
_CONV_DGRAD_32BIT = {
    9: [(32, 64, 32, 8, 4, 3), (64, 64, 16, 8, 4, 3)],
    8: [(64, 32, 32, 8, 4, 3)],
}
# Under the interpreter (both GEMMs): tiles smaller than the test shapes, so every mask and loop is exercised.
CONV_GEMM_INTERPRET = (32, 16, 16, 2, 4, 1)

# Rank-r passes, one config each: BLOCK_M (pixels), BLOCK_K (channels), warps, stages.
#   down: S = im2col(m * x) A^T;  ds_db: dS = s dY B and dB = s dY^T S (BLOCK_K over output channels);
#   da: dA = dS^T im2col(m * x);  dx: dX += m * conv_transpose(dS, A) (BLOCK_M over input pixels).
#   up: Y += s * S B^T in place (BLOCK_K over output channels), after torch's convolution.
_CONV_SKINNY_16BIT = {
    9: {"down": (128, 64, 4, 3), "ds_db": (128, 64, 4, 3), "da": (128, 64, 4, 3), "dx": (128, 32, 4, 2),
        "up": (128, 64, 4, 2)},
    8: {"down": (128, 32, 4, 3), "ds_db": (128, 32, 4, 3), "da": (64, 32, 4, 3), "dx": (128, 32, 4, 2),
        "up": (128, 64, 4, 2)},
}  # fmt: skip
_CONV_SKINNY_32BIT = {
    9: {"down": (64, 32, 4, 3), "ds_db": (64, 32, 4, 3), "da": (64, 32, 4, 3), "dx": (64, 32, 4, 2),
        "up": (64, 64, 4, 2)},
    8: {"down": (64, 32, 4, 3), "ds_db": (64, 32, 4, 3), "da": (64, 32, 4, 3), "dx": (64, 32, 4, 2),
        "up": (64, 64, 4, 2)},
}  # fmt: skip
CONV_SKINNY_KINDS = ("down", "ds_db", "da", "dx", "up")
CONV_SKINNY_INTERPRET = {kind: (16, 16, 4, 1) for kind in CONV_SKINNY_KINDS}


def conv_gemm_config_tuples(major: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages) for the conv forward GEMM on this generation."""
    table = _CONV_GEMM_32BIT if dtype == torch.float32 else _CONV_GEMM_16BIT
    return table[9 if major >= 9 else 8]


def conv_gemm_configs(major: int, dtype: torch.dtype):
    """The conv forward GEMM's autotune configs."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}, num_warps=w, num_stages=s)
        for bm, bn, bk, g, w, s in conv_gemm_config_tuples(major, dtype)
    ]


def conv_dgrad_config_tuples(major: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages) for the fused conv dX GEMM on this generation."""
    table = _CONV_DGRAD_32BIT if dtype == torch.float32 else _CONV_DGRAD_16BIT
    return table[9 if major >= 9 else 8]


def conv_dgrad_configs(major: int, dtype: torch.dtype):
    """The fused conv dX GEMM's autotune configs."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}, num_warps=w, num_stages=s)
        for bm, bn, bk, g, w, s in conv_dgrad_config_tuples(major, dtype)
    ]


def conv_skinny_config(major: int, kind: str, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_K, warps, stages) for one of the conv rank-r passes (CONV_SKINNY_KINDS)."""
    if major == 0:
        return CONV_SKINNY_INTERPRET[kind]
    table = _CONV_SKINNY_32BIT if dtype == torch.float32 else _CONV_SKINNY_16BIT
    return table[9 if major >= 9 else 8][kind]
