"""Block-size, warp and stage choices per GPU generation, and the facts about the device the launchers need.

Every config listed here ships: the test suite compiles each one ahead of time for sm_80 and sm_90 and
checks that it fits shared memory, uses the tensor-core instructions it should (wgmma on sm_90) and does
not spill. Keep the lists short: each entry costs autotuning time on the user's first call.

Naming in every kernel file (embedding.py, conv2d.py, merge.py, linear.py):

- ``i_<dim>``: index vectors (``i_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)``, ``i_v`` vocabulary rows);
- ``m_<dim>``: masks (``m_m = i_m < M``);
- ``p_<tensor>``: pointer blocks (``p_x = x_ptr + ...``); ``<tensor>_ptr``: the pointer arguments;
- ``b_<tensor>``: loaded blocks (``b_x = tl.load(p_x, ...)``); ``acc`` the fp32 accumulator;
- ``stride_<tensor><dim>``: strides (``stride_xm``, ``stride_wk``);
- ``BLOCK_<DIM>``: tile sizes (compile-time); ``pid_<dim>``: program ids.
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


def check_dtype(t: torch.Tensor) -> None:
    """TypeError unless t has a dtype the kernels take (float16, bfloat16, float32)."""
    if t.dtype not in TL_DTYPES:
        raise TypeError(f"fastlora kernels take float16, bfloat16 or float32, got {t.dtype}")


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


@functools.cache
def _device_props(index: int):
    return torch.cuda.get_device_properties(index)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on the device (4 under the interpreter, so persistent loops take several tiles)."""
    if INTERPRET or device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_props(index).multi_processor_count


def num_programs_target(device: torch.device) -> int:
    """How many programs a skinny pass should launch to fill the device."""
    return num_sms(device) * PROGRAMS_PER_SM


def capability(device: torch.device) -> int:
    """Major compute capability (0 under the interpreter or off CUDA)."""
    if INTERPRET or device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_props(index).major


# ----------------------------------------------------------------------------------------------------------
# Main GEMM (Y = x W^T + s * S B^T, dX = dY W + m * (dS A)): BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages
# ----------------------------------------------------------------------------------------------------------

_GEMM_16BIT = {
    9: [(128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 128, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4)],
    8: [(128, 256, 32, 8, 8, 3), (128, 128, 32, 8, 4, 4), (64, 128, 32, 8, 4, 4), (128, 64, 32, 8, 4, 4)],
}
_GEMM_32BIT = {
    9: [(64, 64, 32, 8, 4, 3)],
    8: [(128, 64, 32, 8, 8, 3), (64, 64, 32, 8, 4, 3)],
}
# With the dropout mask on the LoRA term (backward dX), the mask's hash words and the LoRA term live beside the
# accumulator: the pointer kernel's tiles keep at most this many accumulator elements per thread, or registers spill.
MASKED_ACC_PER_THREAD = 64
# float32 with the mask: the FMA product (and TF32's) holds its operand tiles in registers beside it, so one small
# tile with half-depth K steps (64x64x32 spills 8 bytes on sm_80).
_GEMM_32BIT_MASKED = [(64, 64, 16, 8, 4, 3)]
# Under the interpreter: small tiles so that odd test shapes cross several tiles and every mask is exercised.
GEMM_INTERPRET = (32, 32, 16, 2, 4, 1)


def gemm_config_tuples(major: int, dtype: torch.dtype, masked: bool = False):
    if masked and dtype == torch.float32:
        return _GEMM_32BIT_MASKED
    table = _GEMM_32BIT if dtype == torch.float32 else _GEMM_16BIT
    tuples = table[9 if major >= 9 else 8]
    if masked:
        tuples = [c for c in tuples if c[0] * c[1] // (32 * c[4]) <= MASKED_ACC_PER_THREAD]
    return tuples


def gemm_tiles_as_configs(tuples):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages) tuples as autotune configs."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}, num_warps=w, num_stages=s)
        for bm, bn, bk, g, w, s in tuples
    ]


def gemm_configs(major: int, dtype: torch.dtype, masked: bool = False):
    return gemm_tiles_as_configs(gemm_config_tuples(major, dtype, masked))


# Hopper persistent TMA GEMM (16-bit inputs): BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages, EPILOGUE_SUBTILE.
# The forward (Y) and the backward dX GEMM are tuned apart, each under its own autotune key. The dropout mask (with
# dropout) or the dA side product (without) lives in dX's epilogue, one column half at a time with EPILOGUE_SUBTILE,
# so dX keeps the large tiles with dropout on. Shared memory: stages * (BLOCK_M + BLOCK_N) * BLOCK_K * 2 bytes plus
# the epilogue's tiles.
_GEMM_TMA_FWD = [
    (128, 256, 64, 8, 8, 3, True),
    (128, 128, 64, 8, 8, 4, True),
    (128, 128, 128, 8, 8, 3, True),
    (128, 128, 64, 8, 4, 5, True),
]
_GEMM_TMA_DX = [
    (128, 128, 64, 8, 8, 3, True),
    (128, 128, 64, 8, 8, 4, True),
    (128, 128, 64, 8, 8, 5, True),
]
GEMM_TMA_DIRECTIONS = ("fwd", "dx")
# Under the interpreter: tiles small enough that odd test shapes cross several tiles and both epilogue halves.
GEMM_TMA_INTERPRET = (32, 32, 16, 2, 4, 1, True)
# The TMA GEMM applies the LoRA term in its epilogue as one rank tile: ranks above this take the pointer kernel.
GEMM_TMA_MAX_RANK = 64


def gemm_tma_config_tuples(direction: str):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages, EPILOGUE_SUBTILE) of the Hopper GEMM, "fwd" or "dx"."""
    if direction not in GEMM_TMA_DIRECTIONS:
        raise ValueError(f"GEMM direction must be one of {GEMM_TMA_DIRECTIONS}, got {direction!r}")
    return _GEMM_TMA_FWD if direction == "fwd" else _GEMM_TMA_DX


def gemm_tma_configs(direction: str, pre_hook=None):
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g, "EPILOGUE_SUBTILE": sub},
            num_warps=w,
            num_stages=s,
            pre_hook=pre_hook,
        )
        for bm, bn, bk, g, w, s, sub in gemm_tma_config_tuples(direction)
    ]


# ----------------------------------------------------------------------------------------------------------
# Skinny passes (S = (m x) A^T, dS = s dY B, dA = dS^T (m x), dB = s dY^T S): BLOCK_M, BLOCK_K, warps, stages
# ----------------------------------------------------------------------------------------------------------

# One config per generation, chosen by rule: these passes are memory-bound, and they are not autotuned because the
# fused dS/dB pass accumulates dB with atomics, which every tuning rerun would add again. The fused dS/dB pass ("side")
# takes taller row blocks: its dB atomics number (M / BLOCK_M) * N * r.
SKINNY = {9: [(64, 128, 4, 3)], 8: [(64, 64, 4, 3)]}
SKINNY_SIDE = {9: (128, 64, 8, 3), 8: (128, 32, 8, 3)}
SKINNY_INTERPRET = (16, 32, 4, 1)
# From this many rows on, the rank-r passes fill the GPU with row blocks alone: no split reduction, no partial
# buffers, sums or casts; every output is written in its final dtype by the kernel that computes it.
SPLIT_FREE_M = 2048
# Sibling groups (kernels/group.py, q/k/v or gate/up on one input) run their own kernels from this many rows on; below,
# each member runs its own op, whose rank-r passes split across the GPU where the group's do not. The group's GEMMs
# take gemm_configs' tiles and its dS/dB pass the skinny side table above.
GROUP_MIN_ROWS = SPLIT_FREE_M
# The group's S pass draws every member's mask on the one x tile they share: a narrower K step than SKINNY's keeps
# three or four members' masks within registers. BLOCK_M, BLOCK_K, warps, stages.
GROUP_SKINNY = {9: (64, 64, 4, 3), 8: (64, 64, 4, 3)}


# The group's dX GEMM holds a mask or the x tile of the dA shares beside its accumulator: linear's masked tiles, and
# for float32 (an FMA product that keeps its operand tiles in registers) one tile on 8 warps (on 4 it spills on sm_80).
GROUP_DX_32BIT = [(64, 64, 16, 8, 8, 3)]


def group_skinny_config(major: int):
    return GROUP_SKINNY[9 if major >= 9 else 8]


def group_dx_config_tuples(major: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages) of the group's dX GEMM."""
    return GROUP_DX_32BIT if dtype == torch.float32 else gemm_config_tuples(major, dtype, masked=True)


def skinny_config_tuples(major: int):
    return SKINNY[9 if major >= 9 else 8]


def rank_block(r: int, max_block: int | None = 64) -> int:
    """Rank tile, the one rule for every kernel's BLOCK_R: the padded rank (at least 16, the tensor-core minimum),
    at most max_block (a larger rank is walked in max_block-wide chunks); max_block=None for kernels that take the
    whole rank in one tile."""
    block = max(16, triton.next_power_of_2(r))
    return block if max_block is None else min(max_block, block)


# ----------------------------------------------------------------------------------------------------------
# Merge (W += c * B A, kernels/merge.py): BLOCK_N, BLOCK_K, warps. A one-off, memory-bound pass over W.
# ----------------------------------------------------------------------------------------------------------

MERGE_CONFIG = (64, 64, 4)
MERGE_INTERPRET = (16, 32, 4)


def skinny_side_config(major: int):
    return SKINNY_SIDE[9 if major >= 9 else 8]


# The r-wide in-place update Y = c * (Y + s * mask(P Q)) + bias after cuBLAS (the dispatch's alternative to the
# fused GEMM): memory-bound, one config. BLOCK_M, BLOCK_N, warps, stages.
LORA_UPDATE = (64, 128, 4, 2)
LORA_UPDATE_INTERPRET = (16, 32, 4, 1)


# ----------------------------------------------------------------------------------------------------------
# Embedding (Y = W[idx] + s * A[:, idx]^T B^T, and its backward): memory-bound gathers and skinny rank-r dots.
# Chosen by rule, not autotuned: each entry is the one config a (GPU generation, dtype width, rank tile) uses.
# ----------------------------------------------------------------------------------------------------------

# Keyed by (dtype width in bits, rank tile). Register use grows with the rank tile (the gathered [BLOCK_M, BLOCK_R]
# rows and their 64-bit addresses), so the column tile shrinks as it grows; every entry compiles without spilling.
# Forward tile [BLOCK_M tokens, BLOCK_D columns]: BLOCK_M, BLOCK_D, warps, stages.
_EMBEDDING_FWD = {
    (16, 16): (64, 128, 8, 2),
    (16, 32): (64, 64, 4, 2),
    (16, 64): (64, 64, 4, 2),
    (32, 16): (64, 128, 8, 2),
    (32, 32): (64, 64, 4, 2),
    (32, 64): (64, 64, 4, 2),
}
# Backward pass over dY: per program a strip of BLOCK_D columns walked BLOCK_M rows at a time, with its
# [BLOCK_D, BLOCK_R] share of dB in registers: BLOCK_M, BLOCK_D, warps, stages.
_EMBEDDING_BWD_DY = {
    (16, 16): (32, 256, 8, 3),
    (16, 32): (32, 128, 8, 3),
    (16, 64): (32, 128, 8, 3),
    (32, 16): (32, 256, 8, 3),
    (32, 32): (32, 128, 8, 3),
    (32, 64): (32, 128, 8, 3),
}
# Deterministic dA pass over the rank-r partials, keyed by rank tile: BLOCK_M tokens, warps. It sums runs of equal
# indices (a run longer than BLOCK_M is walked block by block, so BLOCK_M stays as large as registers allow).
_EMBEDDING_BWD_SEGMENT = {16: (64, 8), 32: (64, 4), 64: (64, 8)}
# Elementwise passes, BLOCK_M elements and warps: the deterministic dB reduction over the row-strip partials, and
# the finish of the atomic backward (the fp32 workspace written into dA's and dB's dtypes).
_EMBEDDING_BWD_REDUCE = (1024, 4)
_EMBEDDING_BWD_FINISH = (1024, 4)
# Under the interpreter: tiles small enough that odd test shapes cross several of them in every dimension.
_EMBEDDING_INTERPRET = {
    "fwd": {"BLOCK_M": 16, "BLOCK_D": 16, "num_warps": 4, "num_stages": 1},
    "bwd_dy": {"BLOCK_M": 16, "BLOCK_D": 16, "num_warps": 4, "num_stages": 1},
    "bwd_segment": {"BLOCK_M": 16, "num_warps": 4},
    "bwd_reduce": {"BLOCK_M": 64, "num_warps": 4},
    "bwd_finish": {"BLOCK_M": 64, "num_warps": 4},
}
EMBEDDING_KINDS = tuple(_EMBEDDING_INTERPRET)
EMBEDDING_RANK_BLOCKS = (16, 32, 64)


def embedding_config(kind: str, major: int, dtype: torch.dtype, r_block: int) -> dict:
    """Launch parameters of one embedding kernel: meta-parameters plus num_warps (and num_stages for the loops).

    kind is one of EMBEDDING_KINDS; major the compute capability (0: the interpreter's small tiles);
    dtype the dtype of Y / dY (of dA for "bwd_segment" and "bwd_finish", of dB for "bwd_reduce"); r_block the
    rank tile (rank_block(r)). sm_80 and sm_90 share the tables: these kernels are bandwidth-bound.
    """
    if kind not in EMBEDDING_KINDS:
        raise ValueError(f"embedding kernel kind must be one of {EMBEDDING_KINDS}, got {kind!r}")
    if major == 0:
        return dict(_EMBEDDING_INTERPRET[kind])
    key = (32 if dtype == torch.float32 else 16, r_block)
    if kind in ("fwd", "bwd_dy"):
        bm, bd, w, s = (_EMBEDDING_FWD if kind == "fwd" else _EMBEDDING_BWD_DY)[key]
        return {"BLOCK_M": bm, "BLOCK_D": bd, "num_warps": w, "num_stages": s}
    bm, w = {"bwd_reduce": _EMBEDDING_BWD_REDUCE, "bwd_finish": _EMBEDDING_BWD_FINISH}.get(kind) or (
        _EMBEDDING_BWD_SEGMENT[r_block]
    )
    return {"BLOCK_M": bm, "num_warps": w}


def embedding_shipped_configs():
    """Every (kind, major, dtype, r_block, config) the embedding launchers can pick on a GPU, for AOT compile tests.

    The elementwise passes (dB reduction, finish) do not depend on the rank tile.
    """
    out = []
    for major in (8, 9):
        for kind in EMBEDDING_KINDS:
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                for r_block in (16,) if kind in ("bwd_reduce", "bwd_finish") else EMBEDDING_RANK_BLOCKS:
                    out.append((kind, major, dtype, r_block, embedding_config(kind, major, dtype, r_block)))
    return out


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
    return gemm_tiles_as_configs(conv_gemm_config_tuples(major, dtype))


def conv_dgrad_config_tuples(major: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages) for the fused conv dX GEMM on this generation."""
    table = _CONV_DGRAD_32BIT if dtype == torch.float32 else _CONV_DGRAD_16BIT
    return table[9 if major >= 9 else 8]


def conv_dgrad_configs(major: int, dtype: torch.dtype):
    """The fused conv dX GEMM's autotune configs."""
    return gemm_tiles_as_configs(conv_dgrad_config_tuples(major, dtype))


def conv_skinny_config(major: int, kind: str, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_K, warps, stages) for one of the conv rank-r passes (CONV_SKINNY_KINDS)."""
    if major == 0:
        return CONV_SKINNY_INTERPRET[kind]
    table = _CONV_SKINNY_32BIT if dtype == torch.float32 else _CONV_SKINNY_16BIT
    return table[9 if major >= 9 else 8][kind]


# ----------------------------------------------------------------------------------------------------------
# 4-bit base weights (kernels/nf4.py): the dequantization pass and the GEMMs that dequantize in their main loop
# ----------------------------------------------------------------------------------------------------------

# Dequantization into the workspace: elements per program, warps.
NF4_DEQUANT_BLOCK, NF4_DEQUANT_WARPS = 1024, 4
# The fused (small-M) GEMMs, per generation: (BLOCK_N or BLOCK_K: the MMA's M side, BLOCK of the reduced dim, warps,
# stages). One stage: the W tile is built in registers from per-element gathers, which the pipeliner would stage in
# shared memory (over the limit at 3 stages). Hopper's forward takes BLOCK_K=32: at 64 the dropout hash beside the
# [128, 64] accumulator spills 8 bytes.
NF4_FUSED_FWD = {9: (128, 32, 8, 1), 8: (64, 64, 4, 1)}
NF4_FUSED_DX = {9: (128, 64, 8, 1), 8: (64, 64, 4, 1)}
NF4_FUSED_INTERPRET = (32, 32, 4, 1)


# ----------------------------------------------------------------------------------------------------------
# DoRA (kernels/dora.py): the norm's pass over W and the backward's pass over dY
# ----------------------------------------------------------------------------------------------------------

# Norm, W A^T and ||W||^2_rows from one pass over W: BLOCK_N, BLOCK_K, warps, stages.
DORA_NORM = (64, 64, 4, 3)
DORA_NORM_INTERPRET = (16, 32, 4, 1)
# Backward, dY' = c dY with dg (and dbias) in one pass over dY: BLOCK_M, BLOCK_N, BLOCK_K, warps. BLOCK_K and the
# accumulator of the zero-magnitude recompute (BLOCK_M x BLOCK_N float32) set the register use: 8 warps keep it
# under the 255-register limit on sm_80 and sm_90 without spilling.
DORA_BWD = (32, 64, 32, 8)
DORA_BWD_INTERPRET = (16, 16, 16, 4)


def dora_norm_config():
    """(BLOCK_N, BLOCK_K, warps, stages) for DoRA's norm pass over W."""
    return DORA_NORM_INTERPRET if INTERPRET else DORA_NORM


def dora_bwd_config():
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps) for DoRA's backward pass over dY."""
    return DORA_BWD_INTERPRET if INTERPRET else DORA_BWD


# ----------------------------------------------------------------------------------------------------------
# MoE experts (kernels/moe.py): the grouped GEMM over tokens sorted by expert, and its rank-r passes
# ----------------------------------------------------------------------------------------------------------

# Grouped GEMM (Y = x W_e^T + s S B_e^T + bias_e, dX = dY W_e + dS A_e): BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps,
# stages, autotuned per (rows bucket, N, K, E). Row tiles never cross an expert boundary, so an expert with few rows
# wastes part of a tall tile: the lists keep a 64-row tile for the small batches of a many-expert model.
_MOE_GEMM_16BIT = {
    9: [(128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4)],
    8: [(128, 128, 32, 8, 4, 4), (64, 128, 32, 8, 4, 4)],
}
# float32 on sm_80: 8 warps (the forward with bias and the LoRA term spills 8 bytes at 4 warps).
_MOE_GEMM_32BIT = {9: [(64, 64, 32, 8, 4, 3)], 8: [(64, 64, 32, 8, 8, 3)]}
# The rank-r passes, chosen by rule (memory-bound): BLOCK_M, BLOCK_C (the reduced or the output feature block),
# warps, stages. "down": S = x A_e^T and dS = s dY B_e (BLOCK_C over the reduced features); "grad": dB_e = s dY_e^T S_e
# and dA_e = dS_e^T x_e, one program per (expert, feature block) walking the expert's rows.
_MOE_SKINNY = {
    9: {"down": (64, 128, 4, 3), "grad": (64, 128, 4, 3)},
    8: {"down": (64, 64, 4, 3), "grad": (64, 64, 4, 3)},
}
MOE_KINDS = ("down", "grad")
# Under the interpreter: tiles small enough that odd test shapes cross several of them (and expert boundaries).
MOE_GEMM_INTERPRET = (16, 16, 16, 2, 4, 1)
MOE_SKINNY_INTERPRET = (16, 16, 4, 1)


def moe_gemm_config_tuples(major: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages) of the grouped GEMM on this generation."""
    table = _MOE_GEMM_32BIT if dtype == torch.float32 else _MOE_GEMM_16BIT
    return table[9 if major >= 9 else 8]


def moe_skinny_config(major: int, kind: str):
    """(BLOCK_M, BLOCK_C, warps, stages) of one of the MoE rank-r passes (MOE_KINDS)."""
    if kind not in MOE_KINDS:
        raise ValueError(f"MoE rank-r pass must be one of {MOE_KINDS}, got {kind!r}")
    if major == 0:
        return MOE_SKINNY_INTERPRET
    return _MOE_SKINNY[9 if major >= 9 else 8][kind]
