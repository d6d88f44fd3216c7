"""kernels/group.py's kernels compiled ahead of time for sm_80 and sm_90 at their shipped tiles (no GPU needed): they
fit shared memory, do not spill, and their products run on tensor cores (wgmma on sm_90) for 16-bit inputs and TF32.
The cases are tests/aot_group_cases.py; the checks are test_aot_compile's."""

import pytest
from test_aot_compile import COMPILE_TIMEOUT, case_ids, check_row, compile_tables

pytestmark = [pytest.mark.slow, pytest.mark.timeout(COMPILE_TIMEOUT + 300)]
TABLES = ("group",)


@pytest.fixture(scope="module")
def compiled():
    return compile_tables(TABLES)


@pytest.mark.parametrize("case_id", case_ids(TABLES))
def test_group_config_compiles_without_spills(compiled, case_id):
    check_row(compiled, case_id)
