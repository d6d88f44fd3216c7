"""`fastlora bench --quick` on CPU: the result file's fields, the saved-for-backward bytes against what the math
says, the printed table, the refusal to report a speedup for an op that failed its check, and the report."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import fastlora  # noqa: F401
from fastlora.cli import _benchmarks, main

harness, report, suite = _benchmarks()  # benchmarks/ of this checkout

M, K, N, R = 48, 96, 80, 8
SHAPE = f"linear:{M}x{K}x{N}x{R}"
FAST = ["--quick", "--shape", SHAPE, "-q"]


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run.json"
    with pytest.MonkeyPatch.context():
        code = main(["bench", *FAST, "--out", str(out)])
    return code, json.loads(out.read_text())


def _rows(doc, **match):
    return [r for r in doc["results"] if all(r[k] == v for k, v in match.items())]


def test_result_file_is_stamped_with_the_conditions(linear_run):
    code, doc = linear_run
    assert code == 0
    env = doc["environment"]
    for key in ("device", "driver", "cuda", "torch", "triton", "python", "fastlora", "commit", "dirty", "time_utc"):
        assert key in env
    assert env["torch"] == torch.__version__ and env["device"]["type"] == "cpu"
    assert env["time_utc"].endswith("Z")
    assert doc["mode"].startswith("cpu (torch path")
    assert doc["settings"]["quick"] is True
    assert doc["fastlora_path"]["linear"] == "torch"


def test_every_provider_mode_and_dropout_is_measured(linear_run):
    _, doc = linear_run
    providers = ["base", "peft_style", "fastlora"] + (["peft"] if doc["environment"]["peft"] else [])
    for p in (0.0, 0.1):
        for mode in harness.MODES:
            rows = {r["provider"]: r for r in _rows(doc, dropout=p, mode=mode)}
            assert sorted(rows) == sorted(providers)
            for r in rows.values():
                assert r["error"] is None
                assert r["shape"] == {"M": M, "K": K, "N": N, "r": R, "bias": 1, "dora": 0, "lbias": 0}
                assert 0 < r["q20_ms"] <= r["median_ms"] <= r["q80_ms"]
                assert r["reps"] >= 3 and r["rotation"] == 2
                assert r["tflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e9))
                assert r["peak_memory_bytes"] is None  # CUDA only
            fl, base, ps = rows["fastlora"], rows["base"], rows["peft_style"]
            assert fl["ratio_to_base"] == pytest.approx(fl["median_ms"] / base["median_ms"])
            assert fl["ratio_to_peft_style"] == pytest.approx(fl["median_ms"] / ps["median_ms"])
            assert fl["speedup_vs_peft_style"] == pytest.approx(ps["median_ms"] / fl["median_ms"])
            assert fl["refused"] is None and fl["accuracy_ok"] is True
            assert set(fl["rel_err"]) == ({"y", "dx", "dA", "dB", "mask"} if p else {"y", "dx", "dA", "dB"})
            assert base["rel_err"] is None
            lora_flops = 2 * M * R * (K + N) if mode == "forward" else 4 * M * R * (K + N)
            if mode == "forward+backward":
                lora_flops = 6 * M * R * (K + N)
            assert fl["flops"] - base["flops"] == lora_flops


def test_saved_for_backward_bytes_follow_the_math(linear_run):
    _, doc = linear_run
    es = 4  # fp32 on CPU
    params = N * K + R * K + N * R  # W, A, B (the bias is not needed for backward)
    for p in (0.0, 0.1):
        rows = {r["provider"]: r for r in _rows(doc, dropout=p, mode="forward")}
        # fastlora: beyond x and the parameters, exactly S [M, r], and with dropout the int64 seed (8 bytes).
        seed = 8 if p > 0 else 0
        assert rows["fastlora"]["saved_bytes"] == M * R * es + seed
        want = [[[M, R], "float32"]] + ([[[], "int64"]] if p > 0 else [])
        assert sorted(rows["fastlora"]["saved_tensors"]) == sorted(want)
        assert rows["fastlora"]["saved_bytes_total"] == es * (M * K + params + M * R) + seed
        assert rows["base"]["saved_bytes"] == 0
        ps = rows["peft_style"]
        if p == 0:
            assert ps["saved_bytes"] == M * R * es
        else:
            # PEFT-style also keeps the dropped copy of x and the mask (bool on CUDA, x's dtype on CPU).
            listing = sorted((tuple(s), d) for s, d in ps["saved_tensors"])
            mask_dtype = "bool" if ((M, K), "bool") in listing else "float32"
            assert listing == sorted([((M, R), "float32"), ((M, K), "float32"), ((M, K), mask_dtype)])
            mask_es = 1 if mask_dtype == "bool" else es
            assert ps["saved_bytes"] == M * R * es + M * K * es + M * K * mask_es
            if "peft" in rows:
                assert rows["peft"]["saved_bytes"] == ps["saved_bytes"]


def test_the_printed_table(tmp_path, capsys):
    code = main(["bench", *FAST, "--dropout", "0.1", "--mode", "forward+backward", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and f"wrote {files[0]}" in out
    doc = json.loads(files[0].read_text())
    assert {r["mode"] for r in doc["results"]} == {"forward+backward"}
    assert {r["dropout"] for r in doc["results"]} == {0.1}
    lines = [line for line in out.splitlines() if line.startswith("| linear")]
    assert len(lines) == 1
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    fl = _rows(doc, provider="fastlora")[0]
    assert cells[:5] == ["linear", f"M{M}-K{K}-N{N}-r{R}", "fp32", "0.1", "forward+backward"]
    assert cells[8] == f"{fl['median_ms']:.3f}"
    assert cells[10] == f"{fl['speedup_vs_peft_style']:.2f}x"
    assert cells[11].endswith(f"→ {M * R * 4 / 2**20:.2f}")
    assert cells[-1] == "ok"
    assert "torch path" in out


def test_no_speedup_for_an_op_that_failed_its_check(monkeypatch, tmp_path, capsys):
    import fastlora.layers

    real = fastlora.layers.lora_linear

    def off_by_a_bit(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True, **options):
        return real(x, weight, bias, lora_A, lora_B, scaling * 1.01, dropout_p, training, **options)

    monkeypatch.setattr(fastlora.layers, "lora_linear", off_by_a_bit)
    out = tmp_path / "r.json"
    code = main(["bench", *FAST, "--dropout", "0", "--mode", "forward", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 1
    doc = json.loads(out.read_text())
    fl = _rows(doc, provider="fastlora")[0]
    assert fl["accuracy_ok"] is False and "accuracy check failed" in fl["refused"]
    assert fl["ratio_to_base"] is None and fl["ratio_to_peft_style"] is None and fl["speedup_vs_peft_style"] is None
    assert fl["median_ms"] > 0  # the time is still recorded, the claim is not
    assert _rows(doc, provider="peft_style")[0]["ratio_to_base"] is not None
    assert "refused" in text and "REFUSED (accuracy)" in text


def test_end_to_end_llama_step(tmp_path):
    out = tmp_path / "llama.json"
    assert main(["bench", "--quick", "--layer", "llama", "-q", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["provider"]: r for r in doc["results"]}
    assert {"peft_style", "fastlora"} <= set(rows)
    for r in rows.values():
        assert r["mode"] == "train step" and r["accuracy_ok"] is True
        assert r["tokens_per_s"] == pytest.approx(r["shape"]["batch"] * r["shape"]["seq"] / (r["median_ms"] / 1e3))
        assert r["shape"]["rank"] == 16
    assert rows["fastlora"]["speedup_vs_peft_style"] == pytest.approx(
        rows["peft_style"]["median_ms"] / rows["fastlora"]["median_ms"]
    )


def test_cpu_timing_statistics_and_rotation():
    calls = []
    t = harness.time_fn(
        lambda: calls.append(1), torch.device("cpu"), harness.Settings(warmup_ms=1, rep_ms=5, min_reps=7)
    )
    assert t.reps >= 7 and len(calls) >= t.reps + 1
    assert 0 <= t.q20_ms <= t.median_ms <= t.q80_ms
    cycle = harness.Cycle("abc")
    assert [cycle() for _ in range(5)] == list("abcab")
    assert harness.rotation_count(10**9, torch.device("cpu")) == 2


def test_saved_bytes_counts_each_storage_once():
    x = torch.randn(10, 20, requires_grad=True)
    w = torch.randn(20, 30, requires_grad=True)
    extra, total, listing = harness.saved_bytes(lambda: (x @ w).exp(), exclude=[x, w])
    assert extra == 10 * 30 * 4 and listing == [((10, 30), "float32")]  # exp saves its output
    assert total == (10 * 20 + 20 * 30 + 10 * 30) * 4


def test_report_table_plots_and_readme(linear_run, tmp_path):
    _, doc = linear_run
    cpu = dict(doc, _file=str(tmp_path / "cpu.json"))
    gpu = json.loads(json.dumps(doc))
    gpu["environment"]["device"] = {"type": "cuda", "name": "NVIDIA H200", "capability": "9.0"}
    gpu["environment"]["time_utc"] = "2099-01-01T00:00:00Z"
    gpu["_file"] = str(tmp_path / "gpu.json")
    table = report.markdown_table(cpu)
    assert table.count("| linear |") == 6 and "torch" in table
    pngs = report.plots(cpu, tmp_path / "plots")
    assert [p.name for p in pngs] == ["linear_time.png", "linear_saved_bytes.png"]
    assert all(p.stat().st_size > 0 for p in pngs)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.README_START}\nold\n{report.README_END}\n\ntail\n")
    assert report.update_readme(readme, [cpu]) is True
    text = readme.read_text()
    assert "No GPU result file yet" in text and "old" not in text and text.endswith("tail\n")
    assert report.update_readme(readme, [cpu, gpu]) is True
    text = readme.read_text()
    assert "NVIDIA H200 (sm_90)" in text and "gpu.json" in text and "| linear |" in text
    assert report.update_readme(readme, [cpu, gpu]) is False
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="no <!-- fastlora-bench-results:start -->"):
        report.update_readme(readme, [gpu])


def _drawn(monkeypatch):
    """{png name: (title, {provider: bar heights})} of every figure report.plots saves."""
    import matplotlib.figure

    drawn, real = {}, matplotlib.figure.Figure.savefig

    def record(fig, path, **kwargs):
        ax = fig.axes[0]
        drawn[Path(path).name] = (ax.get_title(), {c.get_label(): [b.get_height() for b in c] for c in ax.containers})
        return real(fig, path, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    return drawn


def test_plots_of_a_cpu_run_say_so_and_draw_the_saved_bytes(linear_run, tmp_path, monkeypatch):
    _, doc = linear_run
    drawn = _drawn(monkeypatch)
    report.plots(doc, tmp_path / "cpu")
    assert sorted(drawn) == ["linear_saved_bytes.png", "linear_time.png"]
    assert all(title.endswith("(CPU, torch path, not a speed claim)") for title, _ in drawn.values())
    _, bars = drawn["linear_saved_bytes.png"]  # one bar group per dropout: p=0, then p=0.1
    s_mib = M * R * 4 / report.MIB  # fp32 S [M, r]
    seed_mib = 8 / report.MIB  # with dropout, the int64 seed
    assert bars["fastlora"] == [pytest.approx(s_mib), pytest.approx(s_mib + seed_mib)] and bars["base"] == [0.0, 0.0]
    assert bars["peft_style"][0] == pytest.approx(s_mib) and bars["peft_style"][1] > s_mib + M * K * 4 / report.MIB
    gpu = json.loads(json.dumps(doc))
    gpu["environment"]["device"] = {"type": "cuda", "name": "NVIDIA H200", "capability": "9.0"}
    drawn.clear()
    report.plots(gpu, tmp_path / "gpu")
    assert all(title.endswith("— NVIDIA H200") for title, _ in drawn.values()) and len(drawn) == 2


def test_plots_without_matplotlib_exit_non_zero_with_a_hint(linear_run, tmp_path, monkeypatch, capsys):
    _, doc = linear_run
    (tmp_path / "run.json").write_text(json.dumps(doc))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert report.main([str(tmp_path / "run.json"), "--plots", str(tmp_path / "plots")]) == 1
    err = capsys.readouterr().err
    assert "--plots needs matplotlib" in err and 'pip install -e ".[bench]"' in err
    assert not (tmp_path / "plots").exists()


def test_readme_has_the_results_block():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert text.count(report.README_START) == 1 and text.count(report.README_END) == 1
    assert text.index(report.README_START) < text.index(report.README_END)


def test_result_files_are_strict_json(tmp_path):
    doc = {"environment": {"device": {"type": "cpu", "name": "x"}, "time_utc": "2026-01-01T00:00:00Z"},
           "results": [{"rel_err": {"mask": math.inf, "y": math.nan}}]}  # fmt: skip
    path = suite.write(doc, tmp_path)
    assert path.name == "20260101T000000Z-x.json"
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard {c}"))["results"][0][
        "rel_err"
    ] == {"mask": "inf", "y": "nan"}


def test_a_case_that_cannot_run_is_skipped_with_its_reason(monkeypatch, tmp_path, capsys):
    def no_transformers(*args, **kwargs):
        raise ImportError("No module named 'transformers'")

    monkeypatch.setattr(suite.llama, "build_model", no_transformers)
    out = tmp_path / "r.json"
    args = ["bench", "--quick", "--layer", "llama,linear", "--shape", SHAPE, "--mode", "forward", "--dropout", "0"]
    assert main([*args, "-q", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["skipped"] == ["llama step fp32 p=0: ImportError: No module named 'transformers'"]
    assert {r["layer"] for r in doc["results"]} == {"linear"}
    assert "1 cases skipped" in capsys.readouterr().out


def test_time_budget_starts_no_new_case(tmp_path):
    out = tmp_path / "r.json"
    assert main(["bench", *FAST, "--mode", "forward", "--budget", "0", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["results"] == [] and len(doc["skipped"]) == 2
    assert all(s.endswith("time budget of 0s spent") for s in doc["skipped"])


def test_ceilings_and_roofline_placement():
    ceil = harness.measure_ceilings(
        torch.device("cpu"), [torch.float32], harness.Settings(1, 5, 3), harness.Progress(quiet=True), size=64
    )
    assert ceil["matmul_size"] == 64 and ceil["matmul_tflops"]["fp32"] > 0 and ceil["copy_gbps"] > 0
    fake = {"matmul_tflops": {"bf16": 800.0}, "copy_gbps": 4000.0}
    # 2*8192*4096*4096 flops, 3 x 64 MiB moved: compute-bound, 0.687 ms at the roofline
    flops, nbytes = 2 * 8192 * 4096 * 4096, 3 * 2**26
    place = harness.roofline(flops, nbytes, 1.0, fake, "bf16")
    assert place["bound"] == "compute"
    assert place["roofline_ms"] == pytest.approx(flops / 800e12 * 1e3)
    assert place["fraction_of_roofline"] == pytest.approx(place["roofline_ms"] / 1.0)
    assert place["intensity_flop_per_byte"] == pytest.approx(flops / nbytes)
    assert harness.roofline(1e6, 1e9, 1.0, fake, "bf16")["bound"] == "memory"
    assert harness.roofline(1e6, 1e9, 1.0, fake, "fp16") is None  # no ceiling measured for that dtype
