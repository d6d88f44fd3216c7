"""kernels/dora.py's kernels compiled ahead of time for sm_80 and sm_90 at their shipped tiles (no GPU needed): they
fit shared memory and do not spill (the backward pass's zero-magnitude recompute holds a float32 tile beside its
loads; DORA_BWD's 8 warps keep it under the register limit), and the norm's W A^T runs on tensor cores for 16-bit
weights. The cases are tests/aot_dora_cases.py; the checks are test_aot_compile's. About 30 ptxas runs."""

import pytest
from test_aot_compile import COMPILE_TIMEOUT, case_ids, check_row, compile_tables

pytestmark = [pytest.mark.slow, pytest.mark.timeout(COMPILE_TIMEOUT + 300)]
TABLES = ("dora",)


@pytest.fixture(scope="module")
def compiled():
    return compile_tables(TABLES)


@pytest.mark.parametrize("case_id", case_ids(TABLES))
def test_dora_config_compiles_without_spills(compiled, case_id):
    check_row(compiled, case_id)
