"""fastlora.kernels in an editable install of a source checkout (imported first by fastlora/__init__.py)."""


def attach() -> None:
    """Make ``fastlora.kernels`` importable from an editable install of a source checkout.

    The checkout keeps the Triton code in a top-level ``kernels/`` folder with no ``__init__.py``, so that from the
    checkout root (``python -m pytest``, ``python -c ...``) it never shadows another distribution's top-level
    ``kernels`` module (Hugging Face's, which transformers imports): a folder without one is only a namespace
    portion, which a real package anywhere on ``sys.path`` takes precedence over. A wheel installs the folder as
    ``fastlora/kernels``, found like any subpackage. setuptools' editable finder, though, resolves a mapped package
    only through its ``__init__.py``; there the folder beside this package is attached as a namespace package."""
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    name = "fastlora.kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "kernels"
    if not (folder / "linear.py").is_file():  # not a source checkout: the import that needs it raises
        return
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    module = importlib.util.module_from_spec(spec)
    module.__doc__ = "Triton device code for fastlora and its launchers, one op per file."
    sys.modules[name] = module
    sys.modules["fastlora"].kernels = module


attach()
