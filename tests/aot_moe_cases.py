"""Ahead-of-time compile cases of kernels/moe.py (tests/aot_cases.py's "moe" table; tests/test_aot_moe.py checks
them): every shipped config, specialised as the JIT would specialise a launch on the Qwen3-30B-A3B-like expert
block (E=128 experts, hidden 2048, expert intermediate 768 so gate_up N=1536, 4096 tokens x top-8 = 32768 rows,
r=16, contiguous tensors): integers equal to 1 become constants, multiples of 16 are marked so, pointers are
16-byte aligned.

- the grouped GEMM, every tile for fp16, bf16 and fp32 (IEEE and TF32) on sm_80 and sm_90: forward (gate_up with
  the LoRA term and the expert bias), dX (down_proj's backward: W_e not transposed, A_e in the epilogue) and the
  product without an adapter;
- the rank-r passes: S = x A_e^T and dS = s dY B_e (B's interleaved columns), dB_e = s dY_e^T S_e and
  dA_e = dS_e^T x_e, for 16-bit and float32 inputs.
"""

from __future__ import annotations

import torch
from fastlora.kernels import configs
from fastlora.kernels import moe as kmoe
from fastlora.kernels.configs import TL_DTYPES, rank_block

ROWS, HIDDEN, INTER, EXPERTS, RANK = 32768, 2048, 768, 128, 16
SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _case(case_id, major, kernel, values: dict, constexprs: dict, pointers: dict, floats, warps, stages, mma):
    """Signature and specialisation from a launch's integer values (1 -> constant, 16-divisible marked)."""
    signature, divisible, consts = {}, [], dict(constexprs)
    for name in kernel.arg_names:
        if name in consts:
            continue
        if name in pointers:
            signature[name] = pointers[name]
            divisible.append(name)
        elif name in floats:
            signature[name] = "fp32"
        elif values[name] == 1:
            consts[name] = 1
        else:
            signature[name] = "i32"
            if values[name] % 16 == 0:
                divisible.append(name)
    return {
        "id": case_id, "major": major, "kernel": kernel, "signature": signature, "constexprs": consts,
        "divisible": divisible, "num_warps": warps, "num_stages": stages, "expects_mma": mma,
    }  # fmt: skip


def _gemm_cases(major, dtype, precision):
    t = SHORT[dtype]
    mma = dtype != torch.float32 or precision == "tf32"
    n_up, r_e = 2 * INTER, RANK * EXPERTS
    # (name, K, N, b strides (expert, k, n), q strides, has bias, has LoRA)
    variants = [
        ("fwd", HIDDEN, n_up, (n_up * HIDDEN, 1, HIDDEN), (1, EXPERTS, r_e), True, True),
        ("dx", HIDDEN, INTER, (HIDDEN * INTER, INTER, 1), (RANK * INTER, INTER, 1), False, True),
        ("plain", HIDDEN, n_up, (n_up * HIDDEN, 1, HIDDEN), (0, 0, 0), True, False),
    ]
    cases = []
    for name, k, n, (be, bk, bn), (qe, qr, qn), has_bias, has_lora in variants:
        values = dict(S=ROWS, N=n, K=k, R=RANK if has_lora else 0, E=EXPERTS, S_BUCKET=ROWS, stride_am=k,
                      stride_ak=1, stride_be=be, stride_bk=bk, stride_bn=bn, stride_pm=RANK, stride_pr=1,
                      stride_qe=qe, stride_qr=qr, stride_qn=qn, stride_biase=n, stride_biasn=1, stride_cm=n,
                      stride_cn=1)  # fmt: skip
        if not has_lora:
            values.update(stride_pm=0, stride_pr=0)
        for bm, bn_, bk_, g, w, st in configs.moe_gemm_config_tuples(major, dtype):
            constexprs = dict(HAS_BIAS=has_bias, HAS_LORA=has_lora, DOT_DTYPE=TL_DTYPES[dtype], PRECISION=precision,
                              BLOCK_R=rank_block(RANK), BLOCK_E=EXPERTS, BLOCK_M=bm, BLOCK_N=bn_, BLOCK_K=bk_,
                              GROUP_M=g)  # fmt: skip
            pointers = {p: f"*{t}" for p in ("a_ptr", "b_ptr", "p_ptr", "q_ptr", "bias_ptr", "c_ptr")}
            pointers["offs_ptr"] = "*i64"
            tag = "-tf32" if precision == "tf32" else ""
            cases.append(_case(f"moe-gemm-{name}-{t}{tag}-{bm}x{bn_}x{bk_}-w{w}s{st}", major, kmoe._moe_gemm_kernel,
                               values, constexprs, pointers, ("lora_scale",), w, st, mma))  # fmt: skip
    return cases


def _skinny_cases(major, dtype):
    t = SHORT[dtype]
    r_e = RANK * EXPERTS
    cases = []
    bm, bc, w, st = configs.moe_skinny_config(major, "down")
    # the S pass over x (V_e = A_e^T) and the dS pass over dY (V_e = B_e, interleaved columns)
    for name, c, (ve, vc, vr) in (("s", HIDDEN, (RANK * HIDDEN, 1, HIDDEN)), ("ds", 2 * INTER, (1, r_e, EXPERTS))):
        values = dict(S=ROWS, C=c, R=RANK, E=EXPERTS, stride_tm=c, stride_tc=1, stride_ve=ve, stride_vc=vc,
                      stride_vr=vr, stride_om=RANK, stride_or=1)  # fmt: skip
        constexprs = dict(DOT_DTYPE=TL_DTYPES[dtype], PRECISION="ieee", BLOCK_M=bm, BLOCK_C=bc,
                          BLOCK_R=rank_block(RANK), BLOCK_E=EXPERTS)  # fmt: skip
        pointers = {"t_ptr": f"*{t}", "v_ptr": f"*{t}", "offs_ptr": "*i64", "out_ptr": f"*{t}"}
        cases.append(_case(f"moe-down-{name}-{t}-{bm}x{bc}-w{w}s{st}", major, kmoe._moe_down_kernel, values,
                           constexprs, pointers, ("scale",), w, st, dtype != torch.float32))  # fmt: skip
    bm, bc, w, st = configs.moe_skinny_config(major, "grad")
    # dB_e = s dY_e^T S_e into B's interleaved columns; dA_e^T = x_e^T dS_e into A's expert-major rows
    for name, c, (oe, oc, orr) in (("db", HIDDEN, (1, r_e, EXPERTS)), ("da", HIDDEN, (RANK * HIDDEN, 1, HIDDEN))):
        values = dict(S=ROWS, C=c, R=RANK, stride_tm=c, stride_tc=1, stride_um=RANK, stride_ur=1, stride_oe=oe,
                      stride_oc=oc, stride_or=orr)  # fmt: skip
        constexprs = dict(DOT_DTYPE=TL_DTYPES[dtype], PRECISION="ieee", BLOCK_M=bm, BLOCK_C=bc,
                          BLOCK_R=rank_block(RANK))  # fmt: skip
        pointers = {"t_ptr": f"*{t}", "u_ptr": f"*{t}", "offs_ptr": "*i64", "out_ptr": f"*{t}"}
        cases.append(_case(f"moe-grad-{name}-{t}-{bm}x{bc}-w{w}s{st}", major, kmoe._moe_grad_kernel, values,
                           constexprs, pointers, ("scale",), w, st, dtype != torch.float32))  # fmt: skip
    return cases


def aot_cases():
    """Every MoE compile case for tests/aot.py (sm_80 and sm_90)."""
    cases = []
    precisions = ((torch.float16, "ieee"), (torch.bfloat16, "ieee"), (torch.float32, "ieee"), (torch.float32, "tf32"))
    for major in (8, 9):
        for dtype, precision in precisions:
            cases += _gemm_cases(major, dtype, precision)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            cases += _skinny_cases(major, dtype)
    return cases
