"""The launch layer's shape, read from the source of kernels/ and fastlora/ops/ (no kernel runs): every kernel
launches one way (kernels/launch.py's plans), one module times paths (kernels/dispatch.py), one module draws
dropout masks (kernels/dropout.py), the kernel files import each other one way, and no module imports another's
private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNELS = sorted((ROOT / "kernels").glob("*.py"))
OPS = sorted((ROOT / "fastlora" / "ops").glob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _ids(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("path", [p for p in KERNELS if p.name != "launch.py"], ids=_ids)
def test_kernels_launch_through_plans(path):
    """No ``kernel[grid](...)`` outside launch.py (whose plans fall back to it where a direct launch is unsafe)."""
    calls = [
        f"line {node.lineno}: {ast.unparse(node.func)}(...)"
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Subscript)
        and "kernel" in ast.unparse(node.func.value)
    ]
    assert not calls, f"launch through plans_for(kernel).launch(key, grid, **kwargs): {calls}"


@pytest.mark.parametrize("path", [p for p in KERNELS + OPS if p.name != "dispatch.py"], ids=_ids)
def test_only_the_dispatch_times_paths_and_only_dropout_draws_masks(path):
    """Timing (do_bench, CUDA events) lives in kernels/dispatch.py; random draws in kernels (tl.rand, tl.randint,
    Philox) only in kernels/dropout.py's counter hash, which has none."""
    source = path.read_text()
    for word in ("do_bench", "Event(", "elapsed_time", "tl.rand(", "tl.randint(", "tl.randn(", "tl.philox("):
        assert word not in source, f"{word} in {path.name}"


@pytest.mark.parametrize("path", KERNELS + OPS, ids=_ids)
def test_imports_one_way_and_no_private_names(path):
    """The kernel files import each other as fastlora.kernels.<module> (no relative imports), and nothing imports
    a name starting with an underscore from another fastlora module."""
    for node in ast.walk(_tree(path)):
        if not isinstance(node, ast.ImportFrom):
            continue
        assert node.level == 0, f"line {node.lineno}: relative import in {path.name}"
        if (node.module or "").startswith("fastlora"):
            private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
            assert not private, f"line {node.lineno}: {path.name} imports private {private} from {node.module}"
