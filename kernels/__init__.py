"""Triton device code for fastlora and its launchers, one op per file (installed as ``fastlora.kernels``)."""
