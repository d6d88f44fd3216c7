"""Ahead-of-time compile cases of kernels/group.py: every shipped config, as the JIT specialises it for contiguous,
16-byte aligned tensors, three members (q/k/v) of rank 16 (one rank tile each) and four for the worst case of
the rank passes' static member loops (tests/aot.py builds them, tests/test_aot_group.py checks them):

- the forward GEMM over the concatenated N at every tile of linear's table (gemm_config_tuples, which the group's
  GEMMs take), each dtype and precision, biases on every member;
- the dX GEMM at its tiles (configs.group_dx_config_tuples: its epilogue always holds a mask or an x tile beside the
  accumulator), with every member's dropout and with every member's dA share;
- the S pass (the group's skinny tile) and the dS/dB/dA pass (the skinny side tile), without dropout and with every
  member's.
"""

from __future__ import annotations

import torch
from aot_linear_cases import SHORT, _case, _sig
from fastlora.kernels import configs
from fastlora.kernels import group as kgroup
from fastlora.kernels.configs import TL_DTYPES, rank_block

RANK = 16
SLOTS = range(kgroup.MAX_MEMBERS)


def _names(pattern: str) -> str:
    return " ".join(pattern.format(i=i) for i in SLOTS)


def _gemm_cases(major, dtype, precision, num=3):
    t = SHORT[dtype]
    tag = "-tf32" if precision == "tf32" else ""
    mma = precision == "tf32" or dtype != torch.float32
    cases = []
    flags = {"NUM": num, "DOT_DTYPE": TL_DTYPES[dtype], "PRECISION": precision, "BLOCK_R": RANK}
    for bm, bn, bk, g, w, st in configs.gemm_config_tuples(major, dtype, masked=False):
        sig = _sig(
            (f"*{t}", f"x_ptr s_ptr {_names('w{i}_ptr')} {_names('b{i}_ptr')} {_names('bias{i}_ptr')} "
                      f"{_names('y{i}_ptr')}"),
            ("fp32", _names("scale{i}")),
            ("i32", f"M K {_names('N{i}')} {_names('R{i}')} SOFF1 SOFF2 SOFF3 M_BUCKET N_SUM stride_xm stride_sm "
                    f"{_names('stride_w{i}n')} {_names('stride_b{i}n')} {_names('stride_y{i}m')}"),
        )  # fmt: skip
        unit = {"stride_xk": 1, "stride_sr": 1, **{f"stride_w{i}k": 1 for i in SLOTS}}
        unit.update({f"stride_b{i}r": 1 for i in SLOTS})
        divisible = (
            f"x_ptr s_ptr {_names('w{i}_ptr')} {_names('b{i}_ptr')} {_names('bias{i}_ptr')} {_names('y{i}_ptr')} "
            f"K {_names('N{i}')} {_names('R{i}')} SOFF1 SOFF2 SOFF3 N_SUM stride_xm stride_sm "
            f"{_names('stride_w{i}n')} {_names('stride_b{i}n')} {_names('stride_y{i}m')}"
        )
        cases.append(_case(
            f"group_gemm-fwd-{t}{tag}-{bm}x{bn}x{bk}-w{w}s{st}", major, kgroup._group_gemm_kernel, sig,
            {**flags, **unit, "BIAS": (1 << num) - 1, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g},
            divisible, w, st, mma,
        ))  # fmt: skip
    for dropout in (True, False):
        for bm, bn, bk, g, w, st in configs.group_dx_config_tuples(major, dtype):
            sig = _sig(
                (f"*{t}", f"{_names('dy{i}_ptr')} {_names('w{i}_ptr')} {_names('a{i}_ptr')} ds_ptr x_ptr dx_ptr"),
                ("*fp32", "da_ptr"),
                ("*i64", "seed_ptr"),
                ("fp32", _names("inv_keep{i}")),
                ("i32", f"M K {_names('R{i}')} OFF1 OFF2 OFF3 {_names('N{i}')} M_BUCKET N_SUM "
                        f"{_names('stride_dy{i}m')} {_names('stride_w{i}n')} {_names('stride_a{i}r')} stride_dsm "
                        f"stride_xm stride_dar stride_dxm {_names('p_thresh{i}')} {_names('seed_idx{i}')}"),
            )  # fmt: skip
            unit = {"stride_dsr": 1, "stride_xk": 1, **{f"stride_w{i}k": 1 for i in SLOTS}}
            divisible = (
                f"{_names('dy{i}_ptr')} {_names('w{i}_ptr')} {_names('a{i}_ptr')} ds_ptr x_ptr dx_ptr da_ptr seed_ptr "
                f"K {_names('R{i}')} OFF1 OFF2 OFF3 {_names('N{i}')} N_SUM {_names('stride_dy{i}m')} "
                f"{_names('stride_w{i}n')} {_names('stride_a{i}r')} stride_xm stride_dar stride_dxm"
            )
            every = (1 << num) - 1
            cases.append(_case(
                f"group_gemm-dx-{t}{tag}-{bm}x{bn}x{bk}-w{w}s{st}{'-dropout' if dropout else '-da'}", major,
                kgroup._group_dx_kernel, sig,
                {**flags, **unit, "DROPOUT": every if dropout else 0,
                 "DA": 0 if dropout else every, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g},
                divisible, w, st, mma,
            ))  # fmt: skip
    return cases


def _pass_cases(major, dtype, num):
    t = SHORT[dtype]
    cases = []
    every = (1 << num) - 1
    bm, bk, w, st = configs.group_skinny_config(major)
    for dropout in (0, every):
        sig = _sig(
            (f"*{t}", f"x_ptr {_names('a{i}_ptr')} s_ptr"),
            ("*i64", "seed_ptr"),
            ("fp32", _names("scale{i}")),
            ("i32", f"M K {_names('R{i}')} OFF1 OFF2 OFF3 stride_xm {_names('stride_a{i}r')} stride_sm "
                    f"{_names('p_thresh{i}')} "
                    f"{_names('seed_idx{i}')}"),
        )  # fmt: skip
        cases.append(_case(
            f"group_down-{t}-n{num}{'-dropout' if dropout else ''}-{bm}x{bk}-w{w}s{st}", major,
            kgroup._group_down_kernel, sig,
            {"NUM": num, "DROPOUT": dropout, "DOT_DTYPE": TL_DTYPES[dtype], "PRECISION": "ieee", "BLOCK_M": bm,
             "BLOCK_K": bk, "BLOCK_R": rank_block(RANK), "stride_xk": 1, "stride_sr": 1},
            f"x_ptr {_names('a{i}_ptr')} s_ptr seed_ptr K {_names('R{i}')} OFF1 OFF2 OFF3 stride_xm "
            f"{_names('stride_a{i}r')} stride_sm", w, st,
        ))  # fmt: skip
    bm, bk, w, st = configs.skinny_side_config(major)
    for dropout in (0, every):
        sig = _sig(
            (f"*{t}", f"{_names('dy{i}_ptr')} {_names('b{i}_ptr')} s_ptr x_ptr ds_ptr"),
            ("*fp32", "db_ptr da_ptr"),
            ("*i64", "seed_ptr"),
            ("fp32", f"{_names('scale{i}')} {_names('inv_keep{i}')}"),
            ("i32", f"M K {_names('R{i}')} OFF1 OFF2 OFF3 {_names('N{i}')} {_names('SOFF{i}')} {_names('DBOFF{i}')} "
                    f"{_names('stride_dy{i}m')} {_names('stride_b{i}n')} stride_sm stride_xm stride_dsm stride_dar "
                    f"{_names('p_thresh{i}')} {_names('seed_idx{i}')}"),
        )  # fmt: skip
        cases.append(_case(
            f"group_ds-{t}-n{num}{'-dropout-da' if dropout else ''}-{bm}x{bk}-w{w}s{st}", major,
            kgroup._group_ds_kernel, sig,
            {"NUM": num, "DROPOUT": dropout, "DA": dropout, "DOT_DTYPE": TL_DTYPES[dtype], "PRECISION": "ieee",
             "BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_R": rank_block(RANK), "stride_xk": 1, "stride_sr": 1,
             "stride_dsr": 1, **{f"stride_b{i}r": 1 for i in SLOTS}},
            f"{_names('dy{i}_ptr')} {_names('b{i}_ptr')} s_ptr x_ptr ds_ptr db_ptr da_ptr seed_ptr K {_names('R{i}')} "
            f"OFF1 OFF2 OFF3 {_names('N{i}')} {_names('SOFF{i}')} {_names('DBOFF{i}')} {_names('stride_dy{i}m')} "
            f"{_names('stride_b{i}n')} stride_sm stride_xm stride_dsm stride_dar", w, st,
        ))  # fmt: skip
    return cases


def aot_cases():
    """Every group compile case for tests/aot.py (sm_80 and sm_90)."""
    cases = []
    precisions = ((torch.float16, "ieee"), (torch.bfloat16, "ieee"), (torch.float32, "ieee"), (torch.float32, "tf32"))
    for major in (8, 9):
        for dtype, precision in precisions:
            cases += _gemm_cases(major, dtype, precision)
        for dtype in (torch.float16, torch.bfloat16):  # the rank-r passes are memory-bound: 16-bit builds
            for num in (3, 4):
                cases += _pass_cases(major, dtype, num)
    return cases
