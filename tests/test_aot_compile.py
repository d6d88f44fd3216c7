"""Every shipped kernel config compiles ahead of time for sm_80 and sm_90 (no GPU needed): it fits shared
memory, does not spill, and its matrix products run on tensor cores (wgmma on sm_90)."""

import importlib
import json
import os
import subprocess
import sys

import pytest
from fastlora.kernels.configs import SHARED_MEMORY_LIMIT

MODULES = [
    "aot_linear_cases",
    "fastlora.kernels.merge",
    "fastlora.kernels.embedding",
    "fastlora.kernels.conv2d",
]
HERE = os.path.dirname(os.path.abspath(__file__))


def _case_ids():
    ids = []
    for name in MODULES:
        ids += [f"{case['id']}-sm{case['major']}0" for case in importlib.import_module(name).aot_cases()]
    return ids


@pytest.fixture(scope="module")
def compiled():
    """Compile every case in one subprocess without the interpreter (the kernels must be real JIT functions)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "aot.py"), *MODULES], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {row["id"]: row for row in rows}


@pytest.mark.parametrize("case_id", _case_ids())
def test_config_compiles_without_spills(compiled, case_id):
    row = compiled.get(case_id)
    assert row is not None, f"{case_id} was not compiled"
    assert "error" not in row, row.get("error")
    assert row["shared"] <= SHARED_MEMORY_LIMIT[row["major"]], f"{row['shared']} bytes of shared memory"
    assert row["stack"] == 0 and row["local"] == 0, f"spills: stack {row['stack']} B, local {row['local']} B"
    if row["expects_mma"]:
        if row["major"] >= 9:
            assert row["wgmma"], "no wgmma in the sm_90 PTX"
        else:
            assert row["mma"], "no mma.sync in the sm_80 PTX"
