"""Ahead-of-time compile cases for kernels/dora.py: the norm's pass over W and the backward's pass over dY, at the
shipped tiles of kernels/configs.py (DORA_NORM, DORA_BWD), for each input dtype on sm_80 and sm_90, specialised as
a launch at the GPU target shape would be (M=8192, K=N=4096, r=16, contiguous tensors, float32 adapters)."""

from __future__ import annotations

from fastlora.kernels import dora as kdora
from fastlora.kernels.configs import DORA_BWD, DORA_NORM, rank_block

RANK = 16
_TYPES = ("fp16", "bf16", "fp32")


def _dot_dtype(t):
    import triton.language as tl

    return {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}[t]


def _norm_case(major, t, need_wsq):
    bn, bk, warps, stages = DORA_NORM
    return {
        "id": f"dora-norm-{t}-{'wsq' if need_wsq else 'cached'}-{bn}x{bk}-w{warps}s{stages}",
        "major": major,
        "kernel": kdora._dora_norm_kernel,
        "signature": {
            "w_ptr": f"*{t}",
            "a_ptr": f"*{t}",
            "wa_ptr": "*fp32",
            "wsq_ptr": "*fp32",
            **dict.fromkeys(["N", "K", "R", "stride_wn", "stride_ar", "stride_wan"], "i32"),
        },
        "constexprs": {
            "stride_wk": 1,
            "stride_ak": 1,
            "stride_war": 1,
            "NEED_WSQ": need_wsq,
            "DOT_DTYPE": _dot_dtype(t),
            "PRECISION": "ieee",
            "BLOCK_N": bn,
            "BLOCK_K": bk,
            "BLOCK_R": rank_block(RANK),
        },
        "divisible": ["w_ptr", "a_ptr", "wa_ptr", "wsq_ptr", "N", "K", "R", "stride_wn", "stride_ar", "stride_wan"],
        "num_warps": warps,
        "num_stages": stages,
        "expects_mma": t != "fp32",
    }


def _bwd_case(major, t, recover, need_dbias):
    bm, bn, bk, warps = DORA_BWD
    rank = RANK if recover else 1
    sizes = ["M", "N", "K", "M_PER_SPLIT"] + (["R"] if recover else [])
    strides = ["stride_dym", "stride_srcm", "stride_om", "stride_xm", "stride_wn", "stride_sm", "stride_bn"]
    signature = {
        **{p: f"*{t}" for p in ("dy_ptr", "src_ptr", "bias_ptr", "out_ptr", "x_ptr", "w_ptr", "s_ptr")},
        **{p: "*fp32" for p in ("g_ptr", "n_ptr", "dg_ptr", "dbias_ptr")},
        "b_ptr": "*fp32" if recover else f"*{t}",
        **dict.fromkeys(sizes + strides, "i32"),
        "scaling": "fp32",
        "shift": "fp32",
    }
    unit = ["stride_dyn", "stride_srcn", "stride_on", "stride_xk", "stride_wk", "stride_sr", "stride_br"]
    constexprs = {
        **dict.fromkeys(unit, 1),
        **({} if recover else {"R": 1}),
        "RECOVER": recover,
        "HAS_BIAS": recover,
        "NEED_DBIAS": need_dbias,
        "DOT_DTYPE": _dot_dtype(t),
        "PRECISION": "ieee",
        "BLOCK_M": bm,
        "BLOCK_N": bn,
        "BLOCK_K": bk,
        "BLOCK_R": rank_block(rank),
    }
    pointers = [p for p, ty in signature.items() if ty.startswith("*")]
    return {
        "id": f"dora-bwd-{t}-{'recover' if recover else 'yq'}{'-dbias' if need_dbias else ''}-{bm}x{bn}x{bk}-w{warps}",
        "major": major,
        "kernel": kdora._dora_bwd_kernel,
        "signature": signature,
        "constexprs": constexprs,
        "divisible": pointers + sizes + strides,
        "num_warps": warps,
        "num_stages": 1,
        "expects_mma": False,  # a memory-bound pass; its one product is the rare zero-magnitude recompute
    }


def dora_cases():
    """Both DoRA kernels at their shipped tiles: every input dtype, each compile-time branch the launchers take."""
    cases = []
    for major in (8, 9):
        for t in _TYPES:
            cases += [_norm_case(major, t, need_wsq) for need_wsq in (True, False)]
            cases += [_bwd_case(major, t, True, need_dbias) for need_dbias in (False, True)]
            cases.append(_bwd_case(major, t, False, True))
    return cases
