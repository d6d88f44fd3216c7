"""Ahead-of-time compile cases for kernels/nf4.py (sm_80 and sm_90, no GPU needed): tests/aot_cases.py's "nf4"
table. Each case carries the options the launchers pass (no floating-point contraction), and "dequant" marks the
cases whose PTX must hold no FMA (the dequantization must not contract the nested absmax's product and sum).
"""

from __future__ import annotations

import torch
from fastlora.kernels import configs, nf4
from fastlora.kernels.configs import TL_DTYPES

_T = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _sig(types: dict) -> dict:
    return {name: ty for ty, names in types.items() for name in names.split()}


def _quant_sig(nested: bool) -> dict:
    return {"packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "code_ptr": "*fp32",
            "absmax2_ptr": "*fp32", "code2_ptr": "*fp32", "offset_ptr": "*fp32"}  # fmt: skip


def _quant_meta(nested: bool, blocksize: int, w_dtype: torch.dtype) -> dict:
    return {"BLOCKSIZE": blocksize, "BLOCKSIZE2": 256, "NESTED": nested, "W_DTYPE": TL_DTYPES[w_dtype],
            "EMULATE_BF16": False}  # fmt: skip


def aot_cases():
    """Dequantization (each dtype, plain and nested absmax, every block size for bf16 nested), and the fused
    small-M GEMMs (forward with bias and dropout, dX with dropout; nested NF4; the shipped tile per generation;
    BLOCK_M 16 and 64 for bf16)."""
    cases = []
    quant_ptrs = "packed_ptr absmax_ptr code_ptr absmax2_ptr code2_ptr offset_ptr"
    for major in (8, 9):
        for dtype in _T:
            for nested in (False, True):
                for blocksize in (64, 128, 256) if (dtype == torch.bfloat16 and nested) else (64,):
                    cases.append({
                        "id": f"dequant-{_T[dtype]}-{'nested' if nested else 'plain'}-b{blocksize}", "major": major,
                        "kernel": nf4._nf4_dequant_kernel,
                        "signature": {**_quant_sig(nested), "out_ptr": f"*{_T[dtype]}", "numel": "i32"},
                        "constexprs": {**_quant_meta(nested, blocksize, dtype), "BLOCK": configs.NF4_DEQUANT_BLOCK},
                        "divisible": f"{quant_ptrs} out_ptr numel".split(), "num_warps": configs.NF4_DEQUANT_WARPS,
                        "num_stages": 1, "expects_mma": False, "dequant": True,
                    })  # fmt: skip
        gemms = ((torch.bfloat16, "ieee", 16), (torch.bfloat16, "ieee", 64), (torch.float16, "ieee", 64),
                 (torch.float32, "tf32", 64))  # fmt: skip
        for dtype, precision, bm in gemms:
            t = _T[dtype]
            meta = {**_quant_meta(True, 64, dtype), "HAS_DROPOUT": True, "DOT_DTYPE": TL_DTYPES[dtype],
                    "PRECISION": precision, "BLOCK_M": bm, "BLOCK_R": 16}  # fmt: skip
            bn, bk, warps, stages = configs.NF4_FUSED_FWD[major]
            sig = _sig({f"*{t}": "x_ptr a_ptr b_ptr bias_ptr y_ptr s_ptr", "fp32": "scaling inv_keep",
                        "*i64": "seed_ptr",
                        "i32": "M N K R stride_xm stride_ar stride_bn stride_ym stride_sm p_thresh"})  # fmt: skip
            cases.append({
                "id": f"fused_fwd-{t}-{precision}-{bm}x{bn}x{bk}-w{warps}s{stages}", "major": major,
                "kernel": nf4._nf4_lora_fwd_kernel, "signature": {**sig, **_quant_sig(True)},
                "constexprs": {**meta, "HAS_BIAS": True, "BLOCK_N": bn, "BLOCK_K": bk, "stride_xk": 1,
                               "stride_ak": 1, "stride_br": 1, "stride_yn": 1, "stride_sr": 1},
                "divisible": f"{quant_ptrs} x_ptr a_ptr b_ptr bias_ptr y_ptr s_ptr seed_ptr K stride_xm stride_ar "
                "stride_ym stride_sm".split(),
                "num_warps": warps, "num_stages": stages, "expects_mma": True,
            })  # fmt: skip
            bk, bn, warps, stages = configs.NF4_FUSED_DX[major]
            sig = _sig({f"*{t}": "dy_ptr a_ptr b_ptr dx_ptr", "fp32": "scaling inv_keep",
                        "*i64": "seed_ptr",
                        "i32": "M N K R stride_dym stride_ar stride_bn stride_dxm p_thresh"})  # fmt: skip
            cases.append({
                "id": f"fused_dx-{t}-{precision}-{bm}x{bn}x{bk}-w{warps}s{stages}", "major": major,
                "kernel": nf4._nf4_lora_dx_kernel, "signature": {**sig, **_quant_sig(True)},
                "constexprs": {**meta, "BLOCK_N": bn, "BLOCK_K": bk, "stride_dyn": 1, "stride_ak": 1,
                               "stride_br": 1, "stride_dxk": 1},
                "divisible": f"{quant_ptrs} dy_ptr a_ptr b_ptr dx_ptr seed_ptr N K stride_dym stride_ar "
                "stride_dxm".split(),
                "num_warps": warps, "num_stages": stages, "expects_mma": True,
            })  # fmt: skip
    return [{**case, "options": nf4.KERNEL_OPTIONS} for case in cases]
