"""Ahead-of-time compilation of shipped kernel configs for a GPU target, with no GPU.

Run as a script (without TRITON_INTERPRET) by tests/test_aot_compile.py: ``python tests/aot.py embedding conv2d``
compiles every case of the named tables of tests/aot_cases.py (``TABLES``), each for the GPU generation it names
(sm_80 or sm_90), and prints one JSON line per case with what the tests check: shared memory, spills, registers
and the matrix instructions in the PTX.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _resource_usage(cubin: bytes) -> dict:
    """REG / STACK / LOCAL / SHARED of the kernel, read from the cubin with the wheel's cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out)}


def compile_case(case: dict, major: int) -> dict:
    """case: {"kernel": jit fn, "signature": {arg: type}, "constexprs": {arg: value}, "divisible": [args], "num_warps",
    "num_stages", "id"}, optionally "options": compile options the launcher adds. Pointer and stride arguments named
    in "divisible" get the 16-divisibility the JIT would infer for aligned tensors."""
    fn = case["kernel"]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in case.get("divisible", [])}
    signature = dict(case["signature"])
    for name in case["constexprs"]:
        signature[name] = "constexpr"
    src = ASTSource(fn=fn, signature=signature, constexprs=case["constexprs"], attrs=attrs)
    options = {"num_warps": case.get("num_warps", 4), "num_stages": case.get("num_stages", 3)}
    options.update(case.get("options", {}))
    compiled = triton.compile(src, target=GPUTarget("cuda", major * 10, 32), options=options)
    ptx = compiled.asm["ptx"]
    usage = _resource_usage(compiled.asm["cubin"])
    return {
        "id": f"{case['id']}-sm{major}0",
        "major": major,
        "shared": compiled.metadata.shared,
        "regs": usage.get("reg", -1),
        "stack": usage.get("stack", -1),
        "local": usage.get("local", -1),
        "wgmma": "wgmma.mma_async" in ptx,
        "mma": "mma.sync" in ptx,
        "expects_mma": case.get("expects_mma", False),
        "fma": "fma.rn.f32" in ptx,
    }


def main(tables):
    from aot_cases import TABLES

    for name in tables:
        for case in TABLES[name]():
            major = case["major"]
            try:
                row = compile_case(case, major)
            except Exception as e:  # reported per case, so one failure does not hide the rest
                row = {"id": f"{case['id']}-sm{major}0", "major": major, "error": f"{type(e).__name__}: {e}"[:2000]}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
