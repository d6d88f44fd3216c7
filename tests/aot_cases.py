"""Ahead-of-time compile cases: the tables tests/aot.py compiles and tests/test_aot_compile.py checks.

One table per kernel file: every config the launchers can pick, specialised as a launch at a representative
shape (what Triton's JIT would specialise: unit strides and sizes equal to 1 as constants, 16-divisible pointers,
strides and sizes marked so). A case is {"id", "major", "kernel", "signature", "constexprs", "divisible",
"num_warps", "num_stages", "expects_mma"}; see tests/aot.py.
"""

from __future__ import annotations

import aot_dora_cases
import aot_group_cases
import aot_linear_cases
import aot_moe_cases
import aot_nf4_cases
import torch
import triton.language as tl
from fastlora.kernels import conv2d as kconv
from fastlora.kernels import embedding as kemb
from fastlora.kernels import merge as kmerge
from fastlora.kernels.configs import (
    CONV_SKINNY_KINDS,
    MERGE_CONFIG,
    conv_dgrad_config_tuples,
    conv_gemm_config_tuples,
    conv_skinny_config,
    embedding_shipped_configs,
)

# ----------------------------------------------------------------------------------------------------------
# Merge
# ----------------------------------------------------------------------------------------------------------


def merge_cases():
    """The shipped merge config for each weight dtype, both passes (check only, write)."""
    cases = []
    bn, bk, warps = MERGE_CONFIG
    for major in (8, 9):
        for t in ("fp16", "bf16", "fp32"):
            for check in (False, True):
                cases.append(
                    {
                        "id": f"merge-{t}-{'check' if check else 'write'}-{bn}x{bk}-w{warps}",
                        "major": major,
                        "kernel": kmerge._merge_kernel,
                        "signature": {
                            "w_ptr": f"*{t}",
                            "a_ptr": "*fp32",
                            "b_ptr": "*fp32",
                            "flag_ptr": "*i32",
                            **dict.fromkeys(["N", "K", "R", "stride_wn", "stride_ar", "stride_bn"], "i32"),
                            "coeff": "fp32",
                            "limit": "fp32",
                        },
                        "constexprs": {
                            "stride_wk": 1,
                            "stride_ak": 1,
                            "stride_br": 1,
                            "CHECK_ONLY": check,
                            "BLOCK_N": bn,
                            "BLOCK_K": bk,
                            "BLOCK_R": 16,
                        },
                        "divisible": ["w_ptr", "a_ptr", "b_ptr", "flag_ptr", "N", "K", "stride_wn", "stride_ar"],
                        "num_warps": warps,
                        "num_stages": 1,
                    }
                )
    return cases


# ----------------------------------------------------------------------------------------------------------
# Embedding
# ----------------------------------------------------------------------------------------------------------
# Argument values of a representative call (the target shape: V=128256, D=4096, 8192 tokens, contiguous tensors).
# Triton specialises integers equal to 1 as constants and marks multiples of 16 as such; embedding_cases does too,
# so tests/aot.py builds the very kernels a GPU run builds for this shape.
_EMB_SIZES = {"M": 8192, "D": 4096, "V": 128256, "COLS_PER_PROGRAM": 1024, "ROWS_PER_PROGRAM": 256}
_EMB_SIZES.update(stride_wv=4096, stride_wd=1, stride_ym=4096, stride_yd=1, stride_dym=4096, stride_dyd=1)
_EMB_SIZES.update(stride_ar=128256, stride_av=1, stride_br=1, stride_dar=128256, stride_dav=1)
_EMB_SIZES.update(N_PARTS=16, padding_idx=-1)
# Pointers whose type does not follow the table's dtype: indices, the index flag, and the float32 partial sums
# and workspaces.
_EMB_POINTERS = {"idx_ptr": "*i64", "sorted_ptr": "*i64", "perm_ptr": "*i64", "head_ptr": "*i64", "flag_ptr": "*i32"}
_EMB_POINTERS.update(ds_ptr="*fp32", db_ptr="*fp32", ds_part_ptr="*fp32", part_ptr="*fp32", ws_ptr="*fp32")


def embedding_cases():
    """Compile cases for tests/aot.py: every (kind, target, dtype, rank tile) config the launchers can pick,
    specialised as a launch at the representative shape above; the pass over dY in both its modes (atomic and
    deterministic partials). The rank-r products (fwd, bwd_dy) must run on tensor cores."""
    kernels = {
        "fwd": kemb._emb_fwd_kernel,
        "bwd_dy": kemb._emb_bwd_dy_kernel,
        "bwd_segment": kemb._emb_bwd_segment_kernel,
        "bwd_reduce": kemb._emb_bwd_reduce_kernel,
        "bwd_finish": kemb._emb_bwd_finish_kernel,
    }
    types = {
        torch.float16: ("fp16", tl.float16),
        torch.bfloat16: ("bf16", tl.bfloat16),
        torch.float32: ("fp32", tl.float32),
    }
    cases = []
    launches = [
        (kind, major, dtype, r_block, cfg, atomic)
        for kind, major, dtype, r_block, cfg in embedding_shipped_configs()
        for atomic in ((False, True) if kind == "bwd_dy" else (None,))
    ]
    for kind, major, dtype, r_block, cfg, atomic in launches:
        kernel = kernels[kind]
        t, tl_dtype = types[dtype]
        constexprs = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        constexprs.update(BLOCK_R=r_block, RANK_CHUNKS=1, DOT_DTYPE=tl_dtype, ATOMIC=atomic)
        constexprs["INPUT_PRECISION"] = "tf32" if dtype == torch.float32 else "ieee"
        sizes = {**_EMB_SIZES, "R": r_block, "stride_bd": r_block, "N_ELEM": 4096 * r_block}
        sizes.update(N_A=r_block * _EMB_SIZES["V"], N_B=4096 * r_block)
        signature, divisible = {}, []
        for name in kernel.arg_names:
            if name in constexprs:
                continue
            if sizes.get(name) == 1:
                constexprs[name] = 1
            elif name.endswith("_ptr"):
                signature[name] = _EMB_POINTERS.get(name, f"*{t}")
                divisible.append(name)
            elif name == "scaling":
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
                if sizes[name] % 16 == 0:
                    divisible.append(name)
        cases.append(
            {
                "id": f"emb-{kind}{'' if atomic is None else ('-atomic' if atomic else '-parts')}-{t}-R{r_block}",
                "major": major,
                "kernel": kernel,
                "signature": signature,
                "constexprs": {k: v for k, v in constexprs.items() if k in kernel.arg_names},
                "divisible": divisible,
                "num_warps": cfg["num_warps"],
                "num_stages": cfg.get("num_stages", 1),
                "expects_mma": kind in ("fwd", "bwd_dy"),
            }
        )
    return cases


# ----------------------------------------------------------------------------------------------------------
# Conv2d
# ----------------------------------------------------------------------------------------------------------
# The specialisation a real launch gets for the benchmark layer (3x3, stride 1, padding 1, C = O = 256): unit
# strides become constants, the other strides, the channel counts, M and the pointers are multiples of 16.
_CONV_GEOMETRY = {"KH": 3, "KW": 3, "STRIDE_H": 1, "STRIDE_W": 1, "PAD_H": 1, "PAD_W": 1, "DIL_H": 1, "DIL_W": 1}
_CONV_STRIDES = {"x": "nchw", "w": "ohwc", "b": "o", "y": "nhwc", "dy": "nhwc", "a": "rhwc"}
_CONV_DIVISIBLE = {"M", "C", "O", "Cg", "Og", "P"} | {
    f"stride_{t}{d}" for t, dims in _CONV_STRIDES.items() for d in dims
}
# Per kernel: float32 pointer args, float scalar args, and the unit-stride args per memory format of x.
_CONV_KERNELS = {
    "fwd": (
        kconv._conv_fwd_kernel,
        set(),
        {"scaling"},
        {
            "channels_last": {"stride_xc", "stride_wc", "stride_yc", "stride_br"},
            "nchw": {"stride_xw", "stride_wc", "stride_yw", "stride_br"},
        },
    ),
    "dgrad": (
        kconv._conv_dgrad_kernel,
        {"ds_ptr"},
        set(),
        {
            "channels_last": {"stride_dyc", "stride_wc", "stride_ac", "stride_xc"},
            "nchw": {"stride_dyw", "stride_wc", "stride_ac", "stride_xw"},
        },
    ),
    "up": (kconv._conv_up_kernel, set(), {"scaling"}, {"channels_last": {"stride_yc", "stride_br"}}),
    "down": (kconv._conv_down_kernel, set(), {"inv_keep"}, {"channels_last": {"stride_xc", "stride_ac"}}),
    "ds_db": (
        kconv._conv_ds_db_kernel,
        {"ds_ptr", "db_part_ptr"},
        {"scaling"},
        {"channels_last": {"stride_dyc", "stride_br"}},
    ),
    "da": (kconv._conv_da_kernel, {"ds_ptr", "da_part_ptr"}, {"inv_keep"}, {"channels_last": {"stride_xc"}}),
    "dx": (kconv._conv_dx_kernel, {"ds_ptr"}, {"inv_keep"}, {"channels_last": {"stride_xc", "stride_ac"}}),
}


def _conv_case(kind, major, t, tl_dtype, layout, meta, num_warps, num_stages):
    """One compile case: the kernel of `kind` specialised as a launch on the benchmark layer in `layout`."""
    fn, fp32_ptrs, float_args, unit_strides = _CONV_KERNELS[kind]
    flags = {"HAS_BIAS": True, "HAS_DROPOUT": True}
    constexprs = {**meta, "DOT_DTYPE": tl_dtype, "INPUT_PRECISION": "ieee", "BLOCK_R": 16}
    signature, divisible = {}, []
    for name in fn.arg_names:
        if name in constexprs:
            continue
        if name in _CONV_GEOMETRY or name in flags or name in unit_strides[layout]:
            constexprs[name] = _CONV_GEOMETRY.get(name, flags.get(name, 1))
        elif name.endswith("_ptr"):  # the dropout seed is the address of one int64 the kernel loads
            signature[name] = "*i64" if name == "seed_ptr" else "*fp32" if name in fp32_ptrs else f"*{t}"
            divisible.append(name)
        elif name in float_args:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in _CONV_DIVISIBLE:
                divisible.append(name)
    tile = "x".join(str(meta[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in meta)
    group = f"-g{meta['GROUP_M']}" if "GROUP_M" in meta else ""
    return {
        "id": f"conv-{kind}-{t}-{layout}-{tile}{group}-w{num_warps}s{num_stages}",
        "major": major,
        "kernel": fn,
        "signature": signature,
        "constexprs": constexprs,
        "divisible": divisible,
        "num_warps": num_warps,
        "num_stages": num_stages,
        "expects_mma": t != "fp32",
    }


def conv2d_cases():
    """Compile cases for tests/aot.py: every shipped config of every conv kernel for sm_80 and sm_90. Both memory
    formats of x for the two big GEMMs (forward, dX) in fp16 and fp32; the 16-bit products must run on tensor
    cores."""
    cases = []
    for major in (8, 9):
        for dtype, t, tl_dtype in (
            (torch.float16, "fp16", tl.float16),
            (torch.bfloat16, "bf16", tl.bfloat16),
            (torch.float32, "fp32", tl.float32),
        ):
            layouts = ("channels_last", "nchw") if t != "bf16" else ("channels_last",)
            for kind, tuples in (("fwd", conv_gemm_config_tuples), ("dgrad", conv_dgrad_config_tuples)):
                for bm, bn, bk, g, w, s in tuples(major, dtype):
                    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}
                    cases += [_conv_case(kind, major, t, tl_dtype, layout, meta, w, s) for layout in layouts]
            for kind in CONV_SKINNY_KINDS:
                bm, bk, w, s = conv_skinny_config(major, kind, dtype)
                meta = {"BLOCK_M": bm, "BLOCK_K": bk}
                cases.append(_conv_case(kind, major, t, tl_dtype, "channels_last", meta, w, s))
    return cases


# name -> cases, the names tests/aot.py takes on its command line (linear's table is tests/aot_linear_cases.py).
TABLES = {
    "linear": aot_linear_cases.aot_cases,
    "merge": merge_cases,
    "embedding": embedding_cases,
    "conv2d": conv2d_cases,
    "dora": aot_dora_cases.dora_cases,
    "nf4": aot_nf4_cases.aot_cases,
    "moe": aot_moe_cases.aot_cases,
    "group": aot_group_cases.aot_cases,
}
