"""Every shipped kernel config compiles ahead of time for sm_80 and sm_90 (no GPU needed): it fits shared
memory, does not spill, and its matrix products run on tensor cores (wgmma on sm_90). The cases are the tables of
tests/aot_cases.py. Slow (a few hundred ptxas runs in one subprocess, allowed 900 s)."""

import json
import os
import subprocess
import sys

import pytest
from aot_cases import TABLES
from fastlora.kernels.configs import SHARED_MEMORY_LIMIT

HERE = os.path.dirname(os.path.abspath(__file__))
COMPILE_TIMEOUT = 900
# The compile subprocess may use all of COMPILE_TIMEOUT; each test allows that plus the time to start it.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(COMPILE_TIMEOUT + 300)]


# Tables with a compile test of their own (small enough to run alone, or with checks of their own): dora in
# tests/test_aot_dora.py, nf4 in tests/test_aot_nf4.py, moe in tests/test_aot_moe.py, group in tests/test_aot_group.py.
OWN_TESTS = ("dora", "nf4", "moe", "group")
HERE_TABLES = [name for name in TABLES if name not in OWN_TESTS]


def case_ids(tables):
    return [f"{case['id']}-sm{case['major']}0" for name in tables for case in TABLES[name]()]


def compile_tables(tables):
    """Compile the tables' cases in one subprocess without the interpreter (the kernels must be real JIT functions);
    {case id: row}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "aot.py"), *tables],
        capture_output=True,
        text=True,
        env=env,
        timeout=COMPILE_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {row["id"]: row for row in rows}


def check_row(compiled, case_id):
    """The case compiled, fits shared memory, does not spill, and uses the matrix instructions it should; its row."""
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
    return row


@pytest.fixture(scope="module")
def compiled():
    return compile_tables(HERE_TABLES)


@pytest.mark.parametrize("case_id", case_ids(HERE_TABLES))
def test_config_compiles_without_spills(compiled, case_id):
    check_row(compiled, case_id)
