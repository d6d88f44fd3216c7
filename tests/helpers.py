"""Shared test helpers: the tolerance table, the error measure, an assert that explains itself, the bytes a call
saves for backward, and the 2-process gloo spawn of the distributed tests."""

from __future__ import annotations

import warnings

import torch
import torch.multiprocessing as mp

from fastlora._tolerance import DTYPE_IDS, TOLERANCE, rel_err

__all__ = ["TOLERANCE", "DTYPE_IDS", "rel_err", "assert_close", "saved_bytes"]


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str = "output", factor: float = 1.0):
    """out matches the float64 ref within the dtype's tolerance; NaN never passes; the message shows where."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    nan_out, nan_ref = torch.isnan(out.detach()), torch.isnan(ref.detach())
    if not torch.equal(nan_out, nan_ref):
        where = (nan_out != nan_ref).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: NaN pattern differs from the reference at {where}")
    if nan_ref.any():
        out, ref = out[~nan_ref], ref[~nan_ref]
    err = rel_err(out, ref)
    tol = TOLERANCE[dtype] * factor
    if not err <= tol:
        diff = (out.detach().double() - ref.detach().double()).abs().flatten()
        worst = diff.topk(min(5, diff.numel())).indices
        lines = ", ".join(
            f"[{i}] {out.flatten()[i].item():.6g} vs {ref.flatten()[i].item():.6g}" for i in worst.tolist()
        )
        raise AssertionError(
            f"{name}: relative error {err:.3e} > tolerance {tol:.1e} ({DTYPE_IDS[dtype]}); worst: {lines}"
        )


def saved_bytes(fn, *exclude) -> int:
    """Bytes autograd saves for backward while fn() runs, beyond the storages of ``exclude`` (the inputs and the
    parameters: aliases of them cost nothing), each storage once: the benchmarks' measure
    (fastlora.benchmarks.harness.saved_bytes). fn's output must require grad, so that a graph was recorded."""
    from fastlora.benchmarks.harness import saved_bytes as measure

    outs = []
    extra, _, _ = measure(lambda: outs.append(fn()), exclude)
    assert outs[0].requires_grad, "the call recorded no autograd graph"
    return extra


def spawn_gloo_workers(worker, folder, *args, nprocs: int = 2):
    """torch.multiprocessing.spawn of ``worker(rank, store_path, *args)`` (a file store for the gloo group in
    ``folder``: no port to race for).

    Two CI runs of the whole suite (of several) lost a worker to SIGABRT ("terminate called without an active
    exception", no Python error) while every run of the distributed tests alone passed: such an abort gets one more
    spawn, with a fresh store. A Python error in a worker, or a wrong result, fails at once.
    """
    for attempt in (1, 2):
        try:
            mp.spawn(worker, args=(str(folder / f"store{attempt}"), *args), nprocs=nprocs, join=True)
            return
        except mp.ProcessExitedException as err:
            if err.signal_name != "SIGABRT" or attempt == 2:
                raise
            warnings.warn(f"a distributed worker aborted natively ({err}); spawning once more", stacklevel=2)
