"""Ahead-of-time compile of every shipped conv2d config for sm_80 and sm_90 (no GPU needed).

Run as a script with TRITON_INTERPRET=0 (the interpreter replaces @triton.jit functions, which then cannot be
compiled); prints one JSON line per compiled kernel: its shared memory, registers, stack/local bytes (spills)
and which matrix instructions its PTX uses. tests/test_conv2d.py runs it in a subprocess and checks the lines.

The signatures carry the specialisation a real launch gets for the benchmark layer (3x3, stride 1, padding 1,
C = O = 256): unit strides become constants and the other strides and the pointers are known multiples of 16,
as Triton's JIT specialises them. Both memory formats of x are compiled for the two big GEMMs (forward, dX).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
import triton.language as tl
from fastlora.kernels import configs
from fastlora.kernels import conv2d as kconv
from triton.backends.compiler import GPUTarget

NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
DTYPES = {
    "fp16": (torch.float16, tl.float16),
    "bf16": (torch.bfloat16, tl.bfloat16),
    "fp32": (torch.float32, tl.float32),
}
GEOMETRY = {"KH": 3, "KW": 3, "STRIDE_H": 1, "STRIDE_W": 1, "PAD_H": 1, "PAD_W": 1, "DIL_H": 1, "DIL_W": 1}

# Per kernel: fp32 pointer args, float scalar args, and the unit-stride args for x channels_last / NCHW.
KERNELS = {
    "fwd": (
        kconv._conv_fwd_kernel,
        set(),
        {"scaling"},
        {"channels_last": {"sxc", "swc", "syc", "sbr"}, "nchw": {"sxw", "swc", "syw", "sbr"}},
    ),
    "dgrad": (
        kconv._conv_dgrad_kernel,
        {"ds_ptr"},
        set(),
        {"channels_last": {"sdc", "swc", "sac", "sxc"}, "nchw": {"sdw", "swc", "sac", "sxw"}},
    ),
    "up": (kconv._conv_up_kernel, set(), {"scaling"}, {"channels_last": {"syc", "sbr"}}),
    "down": (kconv._conv_down_kernel, set(), {"p", "drop_scale"}, {"channels_last": {"sxc", "sac"}}),
    "ds_db": (kconv._conv_ds_db_kernel, {"ds_ptr", "dbp_ptr"}, {"scaling"}, {"channels_last": {"sdc", "sbr"}}),
    "da": (kconv._conv_da_kernel, {"ds_ptr", "dap_ptr"}, {"p", "drop_scale"}, {"channels_last": {"sxc"}}),
    "dx": (kconv._conv_dx_kernel, {"ds_ptr"}, {"p", "drop_scale"}, {"channels_last": {"sxc", "sac"}}),
}
# Scalars that are multiples of 16 for the benchmark layer (strides other than the unit one, channel counts, M).
DIVISIBLE = {"M", "C", "O", "Cg", "Og", "sxn", "sxh", "sxw", "sxc", "swo", "swh", "sww", "swc", "sbo", "syn", "syh",
             "syw", "syc", "sdn", "sdh", "sdw", "sdc", "sar", "sah", "saw", "sac", "P"}  # fmt: skip


def jobs():
    """Every (kernel, arch, dtype, layout, meta, num_warps, num_stages) the library ships."""
    out = []
    for major in (8, 9):
        for dname, (dtype, _) in DTYPES.items():
            layouts = ("channels_last", "nchw") if dname != "bf16" else ("channels_last",)
            for bm, bn, bk, g, w, s in configs.conv_gemm_config_tuples(major, dtype):
                meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}
                out += [("fwd", major, dname, layout, meta, w, s) for layout in layouts]
            for bm, bn, bk, g, w, s in configs.conv_dgrad_config_tuples(major, dtype):
                meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}
                out += [("dgrad", major, dname, layout, meta, w, s) for layout in layouts]
            for kind in configs.CONV_SKINNY_KINDS:
                bm, bk, w, s = configs.conv_skinny_config(major, kind, dtype)
                out.append((kind, major, dname, "channels_last", {"BLOCK_M": bm, "BLOCK_K": bk}, w, s))
    return out


def compile_one(job):
    kind, major, dname, layout, meta, num_warps, num_stages = job
    fn, fp32_ptrs, float_args, unit_strides = KERNELS[kind]
    torch_dtype, tl_dtype = DTYPES[dname]
    constexprs = {**meta, "DOT_DTYPE": tl_dtype, "INPUT_PRECISION": "ieee", "BLOCK_R": 16}
    flags = {"HAS_BIAS": True, "HAS_DROPOUT": True}
    ones = unit_strides[layout]
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in GEOMETRY or name in flags or name in constexprs or name in ones:
            signature[name] = "constexpr"
            constexprs[name] = GEOMETRY.get(name, flags.get(name, 1 if name in ones else constexprs.get(name)))
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in fp32_ptrs else f"*{dname}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in float_args:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in DIVISIBLE:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    arch = 90 if major == 9 else 80
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps,
                                                                                "num_stages": num_stages})  # fmt: skip
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [os.path.join(NVIDIA_BIN, "cuobjdump"), "--dump-resource-usage", f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    fields = dict(tok.split(":", 1) for line in usage.splitlines() if "REG:" in line for tok in line.split())
    return {
        "kernel": kind, "arch": arch, "dtype": dname, "layout": layout, "meta": meta, "num_warps": num_warps,
        "num_stages": num_stages, "shared": compiled.metadata.shared,
        "shared_limit": configs.SHARED_MEMORY_LIMIT[major],
        "regs": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"]),
        "wgmma": "wgmma.mma_async" in ptx, "mma_sync": "mma.sync" in ptx,
    }  # fmt: skip


def main():
    if configs.INTERPRET:
        sys.exit("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled ahead of time")
    with ProcessPoolExecutor(max_workers=int(os.environ.get("FASTLORA_AOT_WORKERS", "2"))) as pool:
        for result in pool.map(compile_one, jobs()):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
