"""The Hopper GEMM of kernels/linear.py, compiled ahead of time for sm_90 (no GPU needed), for every shipped
config (bf16 builds; fp16 is the same code): one flattened, pipelined loop with no synchronous global load in
it, wgmma, no spills, within shared memory, and dropout's instruction cost in dX.

Run as a script (without TRITON_INTERPRET), this file compiles the cases and prints one JSON line per case."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
# SASS instructions per warp per dX tile with dropout, at most this many times those without it
DROPOUT_SASS_RATIO = 1.3


def loop_nesting(ttgir: str) -> int:
    """The deepest nesting of scf.for regions in a TTGIR module (1: no loop inside another loop)."""
    stack, deepest = [], 0
    for line in ttgir.splitlines():
        text = line.strip()
        if text.startswith("}"):
            if stack:
                stack.pop()
            if text.endswith("{"):  # "} else {"
                stack.append(False)
            continue
        if text.endswith("{"):
            stack.append("scf.for" in text)
            deepest = max(deepest, sum(stack))
    return deepest


def _compile_all():
    import torch
    import triton
    from aot import BIN, compile_case
    from aot_linear_cases import tma_gemm_cases
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for case in tma_gemm_cases((torch.bfloat16,)):
        row = compile_case(case, 9)
        fn = case["kernel"]
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in case["divisible"]}
        signature = {**case["signature"], **{name: "constexpr" for name in case["constexprs"]}}
        src = ASTSource(fn=fn, signature=signature, constexprs=case["constexprs"], attrs=attrs)
        options = {"num_warps": case["num_warps"], "num_stages": case["num_stages"]}
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)  # cached: no second build
        ttgir = compiled.asm["ttgir"]
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            sass = subprocess.run(
                [os.path.join(BIN, "cuobjdump"), "--dump-sass", f.name], capture_output=True, text=True, check=True
            ).stdout
        instructions = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
        row.update(
            direction=case["direction"],
            dropout=case["dropout"],
            config=case["id"].removesuffix("-dropout"),
            for_loops=ttgir.count("scf.for "),
            loop_nesting=loop_nesting(ttgir),
            # tile loads that bypass TMA (the pipeline's job), and scalar loads (the dropout seed, once per program)
            sync_loads=sum(1 for line in ttgir.splitlines() if re.search(r"\btt\.load\b", line) and "tensor<" in line),
            scalar_loads=sum(1 for line in ttgir.splitlines() if re.search(r"\btt\.load\b.*: !tt\.ptr<", line)),
            sass=sum(1 for op in instructions if op != "NOP"),
        )
        print(json.dumps(row), flush=True)


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env, timeout=1800, cwd=HERE
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _ids():
    import torch
    from aot_linear_cases import tma_gemm_cases

    return [case["id"] for case in tma_gemm_cases((torch.bfloat16,))]


def test_every_config_compiled(compiled):
    assert sorted(row["id"].removesuffix("-sm90") for row in compiled) == sorted(_ids())


@pytest.mark.parametrize("case_id", _ids())
def test_persistent_gemm_is_one_flat_pipelined_loop(compiled, case_id):
    row = next(r for r in compiled if r["id"] == f"{case_id}-sm90")
    from fastlora.kernels.configs import SHARED_MEMORY_LIMIT

    assert row["loop_nesting"] == 1, f"{row['for_loops']} scf.for, nested {row['loop_nesting']} deep"
    assert row["sync_loads"] == 0, f"{row['sync_loads']} synchronous tile tt.load in the persistent kernel"
    assert row["scalar_loads"] == int(row["dropout"]), f"{row['scalar_loads']} scalar loads (the seed: 1 with dropout)"
    assert row["wgmma"], "no wgmma in the sm_90 PTX"
    assert row["stack"] == 0 and row["local"] == 0, f"spills: stack {row['stack']} B, local {row['local']} B"
    assert row["shared"] <= SHARED_MEMORY_LIMIT[9], f"{row['shared']} bytes of shared memory"


def test_dropout_costs_dx_at_most_1_3x_the_instructions(compiled):
    """Per dX config (the same large tiles with and without dropout), the static SASS count of the persistent
    kernel (one epilogue per tile: instructions per warp per tile) with dropout over the one without, each as the
    backward runs it: without dropout the epilogue adds the dA share, with dropout it draws the mask (and the dS/dB
    pass takes dA)."""
    dx = [r for r in compiled if r["direction"] == "dx"]
    pairs = {}
    for row in dx:
        pairs.setdefault(row["config"], {})[row["dropout"]] = row["sass"]
    ratios = {config: p[True] / p[False] for config, p in pairs.items()}
    assert len(ratios) == len(dx) // 2 and ratios
    assert max(ratios.values()) <= DROPOUT_SASS_RATIO, ratios


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    _compile_all()
