"""The checkout root never shadows another distribution's top-level ``kernels`` module.

``python -m pytest`` and ``python -c ...`` put the checkout root first on ``sys.path``. The root's ``kernels/`` folder
(fastlora's Triton code, installed as ``fastlora.kernels``) must stay a folder without ``__init__.py``: a namespace
portion, which a real ``kernels`` package installed anywhere (Hugging Face's, which transformers imports) takes
precedence over."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _from_root(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_kernels_folder_is_not_a_package():
    assert (ROOT / "kernels" / "linear.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py would shadow other 'kernels' modules"


def test_import_kernels_from_the_root_is_not_the_checkout():
    origin = _from_root("import importlib.util; s = importlib.util.find_spec('kernels'); print(s.origin if s else '')")
    own = ROOT / "kernels"
    assert not origin or not Path(origin).resolve().is_relative_to(own), f"'kernels' resolves to {origin}"
    if importlib.util.find_spec("kernels") is not None and importlib.util.find_spec("kernels").origin:
        # another distribution is installed: from the root, `import kernels` is that one
        found = _from_root("import kernels; print(kernels.__file__)")
        assert found and not Path(found).resolve().is_relative_to(own), found


def test_fastlora_kernels_is_the_checkout_folder_or_installed_copy():
    found = _from_root("import fastlora.kernels.linear as m; print(m.__file__)")
    assert Path(found).name == "linear.py" and Path(found).parent.name == "kernels", found
