"""`fastlora info` and `fastlora validate` on CPU: the table, the exit status, bad arguments, the re-run under
the interpreter, and that a wrong op is caught."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastlora
from fastlora import reference
from fastlora.cli import MASK_LEGEND, main
from fastlora.validate import OPS, check_case, default_grid, parse_shape

SMALL = ["--layer", "linear", "--only-shapes", "--shape", "linear:37x75x51x5"]


def _table_rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.startswith("linear ")]


def test_validate_prints_every_tensor_and_passes(capsys):
    code = main(["validate", *SMALL, "--dtype", "fp32,bf16", "-q"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = _table_rows(out)
    # 2 dtypes x 2 dropouts x (y, dx, dA, dB) + 2 mask rows
    assert len(rows) == 2 * 2 * 4 + 2, out
    seen = {(r[2], r[3], r[5]) for r in rows}
    for dtype in ("fp32", "bf16"):
        for p in ("0", "0.1"):
            for tensor in ("y", "dx", "dA", "dB"):
                assert (dtype, p, tensor) in seen
        assert (dtype, "0.1", "mask") in seen
    for r in rows:
        assert r[8] == "pass"
        assert float(r[6]) <= float(r[7])
        assert r[4] == ("forward" if r[5] == "y" else "backward")
    assert "4 of 4 cases passed" in out
    assert out.count(MASK_LEGEND) == 1, "the mask rows are explained under the table"
    assert f"path: {fastlora.active_path('cpu')}" in out


def test_validate_grid_plus_user_shape(capsys):
    code = main(["validate", "--layer", "linear", "--shape", "20x33x70x3", "--dtype", "fp32", "--dropout", "0", "-q"])
    out = capsys.readouterr().out
    assert code == 0, out
    labels = {r[1] for r in _table_rows(out)}
    assert labels == {s.label for s in default_grid("linear", torch.device("cpu"))} | {"M20-K33-N70-r3"}


def _wrong_dropout_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True):
    """Drops elements but forgets to rescale the kept ones by 1/(1-p)."""
    mask = F.dropout(torch.ones_like(x), dropout_p) * (1 - dropout_p) if dropout_p > 0 else None
    return reference.lora_linear_ref(x, weight, bias, lora_A, lora_B, scaling, mask)


def _wrong_scaling_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True):
    return reference.lora_linear_ref(x, weight, bias, lora_A, lora_B, scaling * 1.01)


@pytest.mark.parametrize("wrong", [_wrong_dropout_linear, _wrong_scaling_linear], ids=["unscaled-mask", "scaling"])
def test_validate_fails_on_a_wrong_op(monkeypatch, capsys, wrong):
    monkeypatch.setattr(fastlora, "lora_linear", wrong)
    code = main(["validate", *SMALL, "--dtype", "fp32", "-q"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED" in out and "FAIL" in {r[8] for r in _table_rows(out)}


def test_mask_recovery_reads_the_mask_the_op_drew():
    shape = parse_shape("linear:40x64x48x4")
    p = 0.25
    drawn = {}

    def run(x, a, b, dy):
        x = x.detach().requires_grad_(True)
        a, b = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
        mask = (torch.rand(x.shape) >= p).double().to(x.dtype) / (1 - p)
        drawn["mask"] = mask
        y = reference.lora_linear_ref(x, t["weight"], t["bias"], a, b, t["scaling"], mask)
        y.backward(dy)
        return {"y": y.detach(), "dx": x.grad, "dA": a.grad, "dB": b.grad}

    t = OPS["linear"].make(shape, torch.float32, torch.device("cpu"), seed=5)
    rows = check_case(OPS["linear"], shape, torch.float32, "cpu", p, run=run, seed=9, t=t)
    assert all(r["ok"] for r in rows), rows
    assert {r["tensor"] for r in rows} == {"y", "dx", "dA", "dB", "mask"}


def test_mask_recovery_on_dora_in_bf16():
    """DoRA's dX carries a (c - 1) dY W term beside the LoRA one: where the bf16 rounding of dX can move the ratio
    the mask is read from by 5%, the element is read but not judged, and the case passes (it failed here before)."""
    shape = parse_shape("linear:M=37,K=75,N=51,r=5,dora=1")
    rows = check_case(OPS["linear"], shape, torch.bfloat16, "cpu", 0.1, seed=1013)  # the seed `validate` gave it
    assert all(r["ok"] for r in rows), rows


def test_validate_error_in_op_is_a_failed_row(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(fastlora, "lora_linear", broken)
    code = main(["validate", *SMALL, "--dtype", "fp32", "--dropout", "0", "-q"])
    out = capsys.readouterr().out
    assert code == 1
    assert "RuntimeError: kernel exploded" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["validate", "--layer", "lstm"], "unknown layer 'lstm'"),
        (["validate", "--layer", "linear", "--shape", "37x75x51"], "needs 4 numbers"),
        (["validate", "--layer", "linear", "--shape", "37xfoo"], "malformed shape"),
        (["validate", "--shape", "linear:M=3,K=4,N=5"], "missing r"),
        (["validate", "--shape", "linear:M=3,K=4,N=5,r=0"], "must be at least 1"),
        (["validate", "--shape", "rnn:3x4x5x6"], "unknown layer 'rnn'"),
        (["validate", "--dtype", "float64"], "unknown dtype 'float64'"),
        (["validate", "--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (["validate", "--layer", "linear", "--dtype", "fp32", "--only-shapes"], "--only-shapes needs --shape"),
        (["validate", "--shape", "linear"], "shape 'linear' is missing its dimensions; expected linear:MxKxNxr"),
        (["validate", "--layer", "linear", "--shape", "linear"], "shape 'linear' is missing its dimensions"),
        (["validate", "--shape", "conv2d:"], "shape 'conv2d:' is missing its dimensions; expected conv2d:"),
        (["validate", "--shape", "37x75x51x5"], "does not name its layer"),
        (["validate", "--layer", "embedding", "--dropout", "0.1"], "select no case (embedding has no dropout)"),
        (["bench", "--layer", "llama", "--shape", "linear:8x16x16x4"], "is for linear, which is not among the layers"),
        (["validate", "--device", "cuda:0"], "no CUDA device")
        if not torch.cuda.is_available()
        else (["validate", "--device", "tpu"], "unknown device"),
        (["bench", "--layer", "lstm"], "unknown layer 'lstm'"),
        (["bench", "--mode", "sideways"], "unknown mode 'sideways'"),
        (["bench", "--provider", "unsloth"], "unknown provider 'unsloth'"),
        (["bench", "--rank", "0"], "--rank takes positive integers"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unsupported_dtype_on_the_device(monkeypatch, capsys):
    import fastlora.cli as cli

    monkeypatch.setattr(cli, "supported_dtypes", lambda device: (torch.float16, torch.float32))
    assert main(["validate", "--layer", "linear", "--dtype", "bf16"]) == 2
    assert "bf16 is not supported on CPU" in capsys.readouterr().err


def test_info_lists_device_versions_and_paths(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "triton" in out
    assert "device: cpu" in out
    rows = {
        line.split()[0]: line.split()[1:]
        for line in out.splitlines()
        if line.split()[:1] in (["linear"], ["embedding"], ["conv2d"])
    }
    assert rows["linear"] == ["fastlora.lora_linear", fastlora.active_path("cpu")]
    for layer in ("embedding", "conv2d"):
        assert rows[layer] == [f"fastlora.lora_{layer}", fastlora.active_path("cpu")]


def test_info_lists_dispatch_decisions(monkeypatch, tmp_path, capsys):
    from fastlora.kernels import dispatch

    measured = dispatch.Dispatcher(
        path=str(tmp_path / "dispatch.json"), timer=lambda fn: fn(), name_of=str, measurable=lambda device: True,
        versions=lambda: "v1", store=lambda: None,
    )  # fmt: skip
    key = dispatch.shape_key("fwd", M=37, N=51, K=75, R=5, dtype=torch.float32, dropout=False)
    assert measured.choose(key, {"fused": lambda: 2.5, "cublas_update": lambda: 1.25}, torch.device("cpu")) == (
        "cublas_update"
    )
    monkeypatch.setattr(dispatch, "_default", measured)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"dispatch decisions ({tmp_path / 'dispatch.json'}): 1" in out
    row = next(line.split() for line in out.splitlines() if key in line)
    assert row[:4] == ["cpu", "v1", key, "cublas_update"] and " ".join(row[4:]) == "cublas_update 1.250, fused 2.500"


def _env_without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def test_console_validate_reruns_under_the_interpreter():
    cmd = [sys.executable, "-m", "fastlora.cli", "validate", *SMALL[:3], "--shape", "linear:20x33x70x3", "--dtype",
           "fp32", "--dropout", "0", "-q"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env_without_interpreter(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "re-running under the Triton interpreter" in proc.stderr
    assert "1 of 1 cases passed" in proc.stdout


def test_console_bad_argument_has_no_traceback():
    cmd = [sys.executable, "-m", "fastlora.cli", "validate", "--shape", "linear:1x2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env_without_interpreter(), timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "needs 4 numbers" in proc.stderr
