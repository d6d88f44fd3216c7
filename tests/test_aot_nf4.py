"""The 4-bit kernels compile ahead of time for sm_80 and sm_90 (no GPU needed): they fit shared memory, do not
spill, run their products on tensor cores (wgmma on sm_90, however small M is) and the dequantization has no FMA."""

import json
import os
import subprocess
import sys

import pytest
from aot_nf4_cases import aot_cases
from fastlora.kernels.configs import SHARED_MEMORY_LIMIT

HERE = os.path.dirname(os.path.abspath(__file__))
CASE_IDS = [f"{case['id']}-sm{case['major']}0" for case in aot_cases()]


@pytest.fixture(scope="module")
def compiled():
    """Compile every case in one subprocess without the interpreter (the kernels must be real JIT functions)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(HERE, "aot_nf4_cases.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {row["id"]: row for row in rows}


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_nf4_config_compiles_without_spills(compiled, case_id):
    row = compiled.get(case_id)
    assert row is not None, f"{case_id} was not compiled"
    assert "error" not in row, row.get("error")
    assert row["shared"] <= SHARED_MEMORY_LIMIT[row["major"]], f"{row['shared']} bytes of shared memory"
    assert row["stack"] == 0 and row["local"] == 0, f"spills: stack {row['stack']} B, local {row['local']} B"
    if row["expects_mma"]:
        assert row["wgmma"] if row["major"] >= 9 else row["mma"], "no tensor-core instruction in the PTX"
    if row["dequant"]:
        assert not row["fma"], "the dequantization contracts a product and a sum into an FMA"
