"""The 4-bit kernels compile ahead of time for sm_80 and sm_90 (no GPU needed): they fit shared memory, do not
spill, run their products on tensor cores (wgmma on sm_90, however small M is) and the dequantization has no FMA.
The cases are tests/aot_nf4_cases.py (tests/aot_cases.py's "nf4" table); the checks beyond the FMA one are
test_aot_compile's."""

import pytest
from aot_nf4_cases import aot_cases
from test_aot_compile import COMPILE_TIMEOUT, case_ids, check_row, compile_tables

pytestmark = [pytest.mark.slow, pytest.mark.timeout(COMPILE_TIMEOUT + 300)]
TABLES = ("nf4",)
DEQUANT = {f"{case['id']}-sm{case['major']}0" for case in aot_cases() if case.get("dequant")}


@pytest.fixture(scope="module")
def compiled():
    return compile_tables(TABLES)


@pytest.mark.parametrize("case_id", case_ids(TABLES))
def test_nf4_config_compiles_without_spills(compiled, case_id):
    row = check_row(compiled, case_id)
    if case_id in DEQUANT:
        assert not row["fma"], "the dequantization contracts a product and a sum into an FMA"
