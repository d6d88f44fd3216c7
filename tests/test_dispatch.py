"""The measured dispatch's decision logic on CPU, with injected timings: the faster path wins, every shape key
is timed once per device, decisions persist in the JSON cache across processes and are listed."""

import json

import pytest
import torch
from fastlora.kernels import dispatch


class FakeTimer:
    """Made-up milliseconds per candidate name; records what was timed."""

    def __init__(self, ms):
        self.ms = ms
        self.timed = []

    def __call__(self, fn):
        name = fn()
        self.timed.append(name)
        return self.ms[name]


def _candidates():
    return {"fused": lambda: "fused", "cublas+update": lambda: "cublas+update"}


def _key(**kw):
    shape = dict(M=8192, N=4096, K=4096, R=16, dtype=torch.bfloat16, dropout=False)
    return dispatch.shape_key("fwd", **{**shape, **kw})


@pytest.mark.parametrize("ms, winner", [({"fused": 1.0, "cublas+update": 1.2}, "fused"),
                                        ({"fused": 1.3, "cublas+update": 1.1}, "cublas+update")])  # fmt: skip
def test_faster_path_wins_and_is_timed_once(tmp_path, ms, winner):
    timer = FakeTimer(ms)
    d = dispatch.Dispatcher(path=str(tmp_path / "d.json"), timer=timer, name_of=lambda dev: "GPU-A sm_90")
    assert d.choose(_key(), _candidates(), "cuda:0") == winner
    assert sorted(timer.timed) == ["cublas+update", "fused"]
    for _ in range(3):  # later calls: a lookup, no timing (and so no device synchronisation)
        assert d.choose(_key(), _candidates(), "cuda:0") == winner
    assert len(timer.timed) == 2
    # another shape key is timed on its own
    d.choose(_key(M=100), _candidates(), "cuda:0")
    assert len(timer.timed) == 4


def test_graph_capture_takes_fused_untimed_and_decides_later(tmp_path):
    """Timing synchronises, which a CUDA graph capture forbids: a key first met while capturing gets the fused
    path with no timing and no decision, and the first call outside a capture measures as usual."""
    timer = FakeTimer({"fused": 1.5, "cublas+update": 1.0})
    capturing = [True]
    d = dispatch.Dispatcher(path=str(tmp_path / "d.json"), timer=timer, name_of=lambda dev: "GPU-A sm_90",
                            capturing=lambda: capturing[0])  # fmt: skip
    assert d.choose(_key(), _candidates(), "cuda:0") == "fused"
    assert timer.timed == [] and d.decisions() == []
    capturing[0] = False
    assert d.choose(_key(), _candidates(), "cuda:0") == "cublas+update"
    assert sorted(timer.timed) == ["cublas+update", "fused"]
    capturing[0] = True  # a known key is a lookup, captured or not
    assert d.choose(_key(), _candidates(), "cuda:0") == "cublas+update"


def test_decisions_persist_per_device_and_are_listed(tmp_path):
    path = str(tmp_path / "sub" / "dispatch.json")
    first = dispatch.Dispatcher(path=path, timer=FakeTimer({"fused": 2.0, "cublas+update": 1.0}),
                                name_of=lambda dev: "GPU-A sm_90")  # fmt: skip
    assert first.choose(_key(), _candidates(), "cuda:0") == "cublas+update"
    on_disk = json.load(open(path))
    assert on_disk["GPU-A sm_90"][_key()]["choice"] == "cublas+update"
    # a new process on the same device reads the file and times nothing
    timer = FakeTimer({"fused": 1.0, "cublas+update": 9.0})
    second = dispatch.Dispatcher(path=path, timer=timer, name_of=lambda dev: "GPU-A sm_90")
    assert second.choose(_key(), _candidates(), "cuda:0") == "cublas+update" and timer.timed == []
    # another device decides for itself, and both are listed
    other = dispatch.Dispatcher(path=path, timer=timer, name_of=lambda dev: "GPU-B sm_80")
    assert other.choose(_key(), _candidates(), "cuda:1") == "fused"
    listed = other.decisions()
    assert [(row["device"], row["choice"]) for row in listed] == [("GPU-A sm_90", "cublas+update"),
                                                                  ("GPU-B sm_80", "fused")]  # fmt: skip
    assert listed[1]["ms"] == {"fused": 1.0, "cublas+update": 9.0} and listed[1]["key"] == _key()


def test_cache_folder_follows_xdg_and_a_broken_file_is_ignored(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTLORA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert dispatch.cache_path() == str(tmp_path / "fastlora" / "dispatch.json")
    (tmp_path / "fastlora").mkdir()
    (tmp_path / "fastlora" / "dispatch.json").write_text("{not json")
    d = dispatch.Dispatcher(timer=FakeTimer({"fused": 1.0, "cublas+update": 2.0}), name_of=lambda dev: "G")
    assert d.choose(_key(), _candidates(), "cuda:0") == "fused"
    assert json.load(open(dispatch.cache_path()))["G"][_key()]["choice"] == "fused"


def test_shape_key_buckets_rows_and_names_everything():
    assert _key(M=5000) == _key(M=8192) != _key(M=8193)
    assert _key() != _key(dropout=True) != _key(dtype=torch.float16)
    assert _key().startswith("fwd:M8192:N4096:K4096:r16:bfloat16")
    with pytest.raises(ValueError, match="candidate"):
        dispatch.Dispatcher(timer=FakeTimer({}), name_of=lambda dev: "G").choose(_key(), {}, "cuda:0")
