"""Dropout's generator, one for every op: a counter-based hash of (seed, row, column), drawn in-kernel and
regenerated in backward, never stored.

The seed is mixed into one 32-bit word k0 = mix32(seed_lo + seed_hi * G) (G the golden ratio), so the whole
64-bit seed counts; each row gets a key (one 32-bit mix, amortised over a tile's columns), and each pair of
columns one add, one xor-shift and two multiplies, whose products' top halves are the two elements' 16-bit
uniforms u; the element is kept where u >= t, t = min(round(p * 65536), 65535). The exact keep probability is
therefore 1 - t / 65536 (within 2^-17 of 1 - p), and kept values are scaled by 1 / (1 - p). About 2.5
instructions per element where a quarter of a 10-round philox call plus a float conversion took about 35.

Every op draws its mask here: linear and the 4-bit layer on x [M, K], conv2d on its input viewed as [Nb*H*W, C]
(pixels as rows, channels as columns), so one mask-recovery helper (``dropout_mask``) serves them all.

The seed reaches a kernel as the address of one int64 that it loads (``dropout_seed``; the host side is
``launch.seed_pointer``, and ``dropout_args`` gives a launch all its dropout arguments), not as a launch argument,
so a CUDA graph replay that redraws the seed on the device draws a fresh mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastlora.kernels.launch import plans_for, seed_pointer
from fastlora.kernels.tiles import tile_offsets

__all__ = [
    "dropout_words",
    "dropout_keep",
    "dropout_keep_t",
    "dropout_keep_factor",
    "dropout_seed",
    "dropout_threshold",
    "dropout_args",
    "dropout_mask",
]


@triton.jit
def _mix32(h):
    """A 32-bit integer hash with full avalanche (the lowbias32 finalizer: xor-shift, multiply, twice)."""
    h ^= h >> 16
    h *= 0x7FEB352D
    h ^= h >> 15
    h *= 0x846CA68B
    return h ^ (h >> 16)


@triton.jit
def dropout_words(seed, rows, cols):
    """Dropout's random words [len(rows), len(cols)]: the top half of each is the element's 16-bit uniform u.
    cols: an even number of consecutive columns from an even one (every tile's columns are).

    The seed is mixed into one 32-bit word k0 = mix32(seed_lo + seed_hi * G) (G the golden ratio) before it meets
    a row, so neighbouring seeds share no rows; each row gets a key key(row) = mix32(row ^ k0) (a vector per tile,
    amortised over its columns); each pair of columns (2j, 2j + 1) one word t = key * C1 + j * (G * C1),
    t ^= t >> 15, and the pair's two uniforms are the top halves of t * C2 (column 2j) and t * C2 * 0x10001
    (column 2j + 1). Per pair: one multiply-add, one xor-shift, two multiplies."""
    BLOCK: tl.constexpr = cols.shape[0]
    seed64 = tl.zeros((1,), dtype=tl.int64) + seed  # a tensor even where the JIT specialised seed to a constant
    seed_lo = (seed64 & 0xFFFFFFFF).to(tl.uint32)
    seed_hi = ((seed64 >> 32) & 0xFFFFFFFF).to(tl.uint32)
    k0 = _mix32(seed_lo + seed_hi * 0x9E3779B9)
    key = _mix32(rows.to(tl.uint32) ^ k0) * 0x7FEB352D  # [BM], times C1
    pair, _ = tl.split(tl.reshape(cols, (BLOCK // 2, 2)))  # the even column of each pair
    t = key[:, None] + ((pair >> 1).to(tl.uint32) * 0xCFC6B285)[None, :]  # 0xCFC6B285 = G * C1 mod 2^32
    t ^= t >> 15
    # interleaved: column 2j's word, then column 2j + 1's (0x2AF7A68B = C2 * 0x10001 mod 2^32)
    return tl.reshape(tl.join(t * 0x846CA68B, t * 0x2AF7A68B), (rows.shape[0], BLOCK))


@triton.jit
def dropout_keep(seed, rows, cols, threshold):
    """Keep-mask [len(rows), len(cols)]: kept where the element's 16-bit uniform u >= threshold (dropout_words)."""
    return dropout_words(seed, rows, cols) >= (threshold.to(tl.uint32) << 16)  # top half >= t, for t < 65536


@triton.jit
def dropout_keep_t(seed, rows, cols, threshold):
    """dropout_keep's mask transposed, [len(cols), len(rows)], drawn in that orientation (the same words as
    dropout_words, written per element: column c's word is t * C2 for even c, t * C2 * 0x10001 for odd c, with
    t the word of its pair) rather than transposed in registers; any columns."""
    seed64 = tl.zeros((1,), dtype=tl.int64) + seed
    seed_lo = (seed64 & 0xFFFFFFFF).to(tl.uint32)
    seed_hi = ((seed64 >> 32) & 0xFFFFFFFF).to(tl.uint32)
    k0 = _mix32(seed_lo + seed_hi * 0x9E3779B9)
    key = _mix32(rows.to(tl.uint32) ^ k0) * 0x7FEB352D  # [BM], times C1
    c = cols.to(tl.uint32)
    t = key[None, :] + ((c >> 1) * 0xCFC6B285)[:, None]  # [BK, BM]
    t ^= t >> 15
    mult = tl.where((c & 1) == 0, 0x846CA68B, 0x2AF7A68B).to(tl.uint32)
    return t * mult[:, None] >= (threshold.to(tl.uint32) << 16)


@triton.jit
def dropout_keep_factor(seed, rows, cols, threshold):
    """The keep-mask as float32 1.0 / 0.0, with no comparison: f = 2^23 + u exactly (u as the low mantissa bits of
    2^23), so f - (2^23 + t - 1) = u - t + 1 is an integer, >= 1 where kept and <= 0 where dropped; clamped to
    [0, 1]."""
    f = ((dropout_words(seed, rows, cols) >> 16) | 0x4B000000).to(tl.float32, bitcast=True)
    return tl.clamp(f - (8388607.0 + threshold.to(tl.float32)), 0.0, 1.0)


@triton.jit
def dropout_seed(seed_ptr, ON: tl.constexpr):
    """The dropout seed, one int64 read from seed_ptr, when ON; else 0 (seed_ptr is then a placeholder, never read).
    Read from memory rather than passed by value, so that a CUDA graph replay, which repeats launch arguments,
    draws the mask of the seed the step wrote there."""
    if ON:
        return tl.load(seed_ptr)
    else:
        return 0


def dropout_threshold(p: float) -> int:
    """The 16-bit threshold t for dropout probability p: keep where u >= t, so P(keep) = 1 - t / 65536 (t at most
    65535: p within 2^-17 of 1 keeps 1 / 65536)."""
    return min(int(round(float(p) * 65536)), 65535)


def dropout_args(dropout_p: float, seed, like: torch.Tensor) -> dict:
    """A dropout kernel's launch arguments on like's device: seed_ptr (seed_pointer: a one-element int64 tensor
    passes, an int is copied there; without dropout like, never read), p_thresh (dropout_threshold), inv_keep =
    1 / (1 - p) and the HAS_DROPOUT flag."""
    if dropout_p <= 0:
        return {"seed_ptr": like, "p_thresh": 0, "inv_keep": 1.0, "HAS_DROPOUT": False}
    if seed is None:
        raise ValueError(f"dropout_p={dropout_p} needs a seed (an int or a one-element int64 tensor), got None")
    return {
        "seed_ptr": seed_pointer(seed, like),
        "p_thresh": dropout_threshold(dropout_p),
        "inv_keep": 1.0 / (1.0 - dropout_p),
        "HAS_DROPOUT": True,
    }


@triton.jit
def _dropout_mask_kernel(
    out_ptr, M, K, stride_om, stride_ok, seed_ptr, p_thresh, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):
    """out[M, K] = the keep-mask the LoRA kernels draw for (seed, p): for tests and `fastlora validate`."""
    seed = dropout_seed(seed_ptr, True)
    i_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    i_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed, i_m, i_k, p_thresh)
    p_o = out_ptr + tile_offsets(i_m, i_k, stride_om, stride_ok)
    tl.store(p_o, keep.to(tl.int8), mask=(i_m < M)[:, None] & (i_k < K)[None, :])


def dropout_mask(seed, M: int, K: int, p: float, device) -> torch.Tensor:
    """The bool keep-mask [M, K] the kernels draw for (seed, p); m = keep / (1 - p). P(keep) is exactly
    1 - dropout_threshold(p) / 65536."""
    out = torch.empty((M, K), device=device, dtype=torch.int8)
    bm, bk = 32, 128
    plans_for(_dropout_mask_kernel).launch(
        None,
        (triton.cdiv(M, bm), triton.cdiv(K, bk), 1),
        out_ptr=out,
        M=M,
        K=K,
        stride_om=out.stride(0),
        stride_ok=out.stride(1),
        seed_ptr=seed_pointer(seed, out),
        p_thresh=dropout_threshold(p),
        BLOCK_M=bm,
        BLOCK_K=bk,
    )
    return out.bool()
