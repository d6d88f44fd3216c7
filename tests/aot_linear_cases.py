"""Ahead-of-time compile cases of kernels/linear.py: every shipped config, as the JIT would specialise it for
contiguous, 16-byte aligned tensors and r = 16 (tests/aot.py builds them; tests/test_aot_linear.py checks the
persistent GEMM's loop structure and dropout's instruction cost).

- the pointer GEMM, every tile for each dtype and precision, sm_80 and sm_90, forward (bias) and dX (dropout);
- the persistent TMA GEMM on sm_90 for 16-bit dtypes: every forward tile (bias, and with DoRA's column scale)
  and every dX tile as the backward runs it: without dropout with the dA share, with dropout without it (the
  dS/dB pass takes dA then);
- the rank-r passes: S with dropout, dS with the atomic dB side output, without and with the dA share under
  dropout; and the r-wide update.
"""

from __future__ import annotations

import torch
from fastlora.kernels import configs
from fastlora.kernels import linear as klinear
from fastlora.kernels.configs import TL_DTYPES

RANK = 16
SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _sig(*types) -> dict:
    """("*fp16", "a_ptr b_ptr"), ("i32", "M N") -> {"a_ptr": "*fp16", "b_ptr": "*fp16", "M": "i32", "N": "i32"} (pairs,
    not a dict: one type may come twice, e.g. the float32 build's operands and its float32 buffers)."""
    return {name: ty for ty, names in types for name in names.split()}


def _case(case_id, major, kernel, signature, constexprs, divisible, warps, stages, expects_mma=True, **extra):
    return {
        "id": case_id, "major": major, "kernel": kernel, "signature": signature, "constexprs": constexprs,
        "divisible": divisible.split(), "num_warps": warps, "num_stages": stages, "expects_mma": expects_mma,
        **extra,
    }  # fmt: skip


def _pointer_gemm_cases(major, dtype, precision):
    t = SHORT[dtype]
    tag = "-tf32" if precision == "tf32" else ""
    mma = precision == "tf32" or dtype != torch.float32
    cases = []
    for fwd in (True, False):
        flags = {"HAS_BIAS": fwd, "HAS_COL_SCALE": False, "HAS_DROPOUT": not fwd, "HAS_DA": False,
                 "DOT_DTYPE": TL_DTYPES[dtype], "PRECISION": precision, "BLOCK_R": RANK, "stride_pr": 1,
                 "stride_qr": 1, "stride_xn": 1, "stride_dan": 1}  # fmt: skip
        b_strided, b_unit = ("stride_bn", "stride_bk") if fwd else ("stride_bk", "stride_bn")
        for bm, bn, bk, g, w, st in configs.gemm_config_tuples(major, dtype, masked=not fwd):
            name = f"{'fwd' if fwd else 'dx'}-{t}{tag}-{bm}x{bn}x{bk}-w{w}s{st}"
            sig = _sig(
                (f"*{t}", "a_ptr b_ptr p_ptr q_ptr bias_ptr x_ptr c_ptr"),
                ("*fp32", "cs_ptr da_ptr"),
                ("fp32", "lora_scale"),
                ("*i64", "seed_ptr"),
                ("i32", f"M N K R M_BUCKET stride_am stride_pm stride_qn stride_xm stride_dar stride_cm p_thresh "
                 f"{b_strided}"),
            )  # fmt: skip
            cases.append(_case(
                f"gemm-{name}", major, klinear._lora_gemm_kernel, sig,
                {**flags, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g, "stride_ak": 1, b_unit: 1,
                 "stride_cn": 1},
                f"a_ptr b_ptr p_ptr q_ptr bias_ptr cs_ptr x_ptr da_ptr c_ptr seed_ptr N K stride_am {b_strided} "
                "stride_pm stride_qn stride_xm stride_dar stride_cm", w, st, mma,
            ))  # fmt: skip
    return cases


def tma_gemm_cases(dtypes=(torch.float16, torch.bfloat16)):
    """The persistent TMA GEMM on sm_90: forward tiles (bias; bias and column scale) and dX tiles (dA share, with
    and without dropout). Each case carries "direction" and "dropout" for the loop and instruction-count checks."""
    cases = []
    for dtype in dtypes:
        t = SHORT[dtype]
        for direction in configs.GEMM_TMA_DIRECTIONS:
            fwd = direction == "fwd"
            variants = (
                ((True, False, False), (True, True, False)) if fwd else ((False, False, True), (False, False, False))
            )
            for bm, bn, bk, g, w, st, sub in configs.gemm_tma_config_tuples(direction):
                bnp = bn // 2 if sub else bn
                for has_bias, has_cs, dropout in variants:
                    tag = (
                        ("-bias" if has_bias else "")
                        + ("-colscale" if has_cs else "")
                        + ("-dropout" if dropout else "")
                    )
                    name = f"gemm_tma-{direction}-{t}-{bm}x{bn}x{bk}-w{w}s{st}{'-sub' if sub else ''}{tag}"
                    sig = _sig(("*fp32", "da_ptr"), ("fp32", "lora_scale"), ("*i64", "seed_ptr"),
                               ("i32", "M N K R M_BUCKET stride_dar p_thresh"))  # fmt: skip
                    sig["a_desc"] = f"tensordesc<{t}[{bm}, {bk}]>"
                    sig["b_desc"] = f"tensordesc<{t}[{bn}, {bk}]>" if fwd else f"tensordesc<{t}[{bk}, {bn}]>"
                    sig["p_desc"] = f"tensordesc<{t}[{bm}, {RANK}]>"
                    sig["q_desc"] = f"tensordesc<{t}[{bn}, {RANK}]>" if fwd else f"tensordesc<{t}[{RANK}, {bn}]>"
                    sig["c_desc"] = f"tensordesc<{t}[{bm}, {bnp}]>"
                    constexprs = {
                        "B_NK": fwd, "Q_NR": fwd, "HAS_BIAS": has_bias, "HAS_COL_SCALE": has_cs,
                        "HAS_DROPOUT": dropout, "HAS_DA": not fwd and not dropout, "DOT_DTYPE": TL_DTYPES[dtype],
                        "PRECISION": "ieee", "BLOCK_R": RANK, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                        "GROUP_M": g, "EPILOGUE_SUBTILE": sub, "NUM_SMS": 132, "stride_dan": 1,
                    }  # fmt: skip
                    optional = (
                        ("bias_desc", has_bias, f"tensordesc<{t}[{bnp}]>"),
                        ("cs_desc", has_cs, f"tensordesc<fp32[{bnp}]>"),
                        ("x_desc", not (fwd or dropout), f"tensordesc<{t}[{bm}, {bnp}]>"),
                    )
                    for name_, on, ty in optional:
                        if on:
                            sig[name_] = ty
                        else:
                            constexprs[name_] = None
                    cases.append(_case(
                        name, 9, klinear._lora_gemm_tma_kernel, sig, constexprs, "da_ptr seed_ptr N K stride_dar", w,
                        st, direction=direction, dropout=dropout, persistent=True,
                    ))  # fmt: skip
    return cases


def _skinny_cases(major, dtype):
    t = SHORT[dtype]
    cases = []
    # the S pass (dropout on x); the dS/dB pass, without and with the dA share from x under dropout
    tuples = [(c, False, False) for c in configs.skinny_config_tuples(major)]
    tuples += [(configs.skinny_side_config(major), True, False), (configs.skinny_side_config(major), True, True)]
    for (bm, bk, w, st), side, da in tuples:
        meta = {"DOT_DTYPE": TL_DTYPES[dtype], "PRECISION": "ieee", "HAS_DROPOUT": not side, "HAS_DA": da,
                "DA_DROPOUT": da, "BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_R": RANK}  # fmt: skip
        sig = _sig(
            (f"*{t}", "x_ptr bt_ptr t_ptr out_ptr x2_ptr"),
            ("*fp32", "side_ptr da_ptr"),
            ("fp32", "scale side_scale da_scale"),
            ("*i64", "seed_ptr"),
            ("i32", "M K R K_PER_SPLIT K2 stride_xm stride_bk stride_tm stride_os stride_om stride_sk stride_x2m "
             "stride_dar p_thresh"),
        )  # fmt: skip
        cases.append(_case(
            f"down{'-side' if side else ''}{'-da' if da else ''}-{t}-{bm}x{bk}-w{w}s{st}", major,
            klinear._lora_down_kernel, sig,
            {**meta, "HAS_SIDE": side, "stride_xk": 1, "stride_br": 1, "stride_tr": 1, "stride_or": 1,
             "stride_sr": 1, "stride_x2k": 1, "stride_dak": 1},
            "x_ptr bt_ptr t_ptr out_ptr side_ptr x2_ptr da_ptr seed_ptr K K_PER_SPLIT K2 stride_xm stride_bk stride_tm "
            "stride_os stride_om stride_sk stride_x2m stride_dar", w, st,
        ))  # fmt: skip
        if side:
            continue
        sig = _sig((f"*{t}", "t_ptr x_ptr"), ("*fp32", "out_ptr"), ("fp32", "scale"), ("*i64", "seed_ptr"),
                   ("i32", "M K R M_PER_SPLIT stride_tm stride_xm stride_os stride_or p_thresh"))  # fmt: skip
        meta = {k: v for k, v in meta.items() if k not in ("HAS_DA", "DA_DROPOUT")}
        cases.append(_case(
            f"up_t-{t}-{bm}x{bk}-w{w}s{st}", major, klinear._lora_up_t_kernel, sig,
            {**meta, "stride_tr": 1, "stride_xk": 1, "stride_ok": 1},
            "t_ptr x_ptr out_ptr seed_ptr K M_PER_SPLIT stride_tm stride_xm stride_os stride_or", w, st,
        ))  # fmt: skip
    bm, bn, w, st = configs.LORA_UPDATE
    sig = _sig((f"*{t}", "y_ptr p_ptr q_ptr bias_ptr"), ("*fp32", "cs_ptr"), ("fp32", "lora_scale"),
               ("*i64", "seed_ptr"), ("i32", "M N R stride_ym stride_pm stride_qr p_thresh"))  # fmt: skip
    cases.append(_case(
        f"update-{t}-{bm}x{bn}-w{w}s{st}", major, klinear._lora_update_kernel, sig,
        {"HAS_BIAS": True, "HAS_COL_SCALE": True, "HAS_DROPOUT": True, "DOT_DTYPE": TL_DTYPES[dtype],
         "PRECISION": "ieee", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_R": RANK, "stride_yn": 1, "stride_pr": 1,
         "stride_qn": 1},
        "y_ptr p_ptr q_ptr bias_ptr cs_ptr seed_ptr N stride_ym stride_pm stride_qr", w, st,
    ))  # fmt: skip
    return cases


def aot_cases():
    """Every linear compile case for tests/aot.py (sm_80 and sm_90)."""
    cases = []
    precisions = ((torch.float16, "ieee"), (torch.bfloat16, "ieee"), (torch.float32, "ieee"), (torch.float32, "tf32"))
    for major in (8, 9):
        for dtype, precision in precisions:
            cases += _pointer_gemm_cases(major, dtype, precision)
        for dtype in (torch.float16, torch.bfloat16):  # the rank-r passes are memory-bound: 16-bit builds
            cases += _skinny_cases(major, dtype)
    return cases + tma_gemm_cases()
