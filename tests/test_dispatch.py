"""The one dispatch (kernels/dispatch.py) on CPU, with its timer, capture check, device and process group injected:
the faster path wins and is timed once per key; nothing is timed where nothing can be (off CUDA, inside a capture,
a single candidate); decisions persist per environment (device and versions), bounded; every rank of a group gets
the first decision offered; and conv2d and the 4-bit layer choose through it."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fastlora.kernels import dispatch

GPU = "GPU-A sm_90"


class FakeTimer:
    """Made-up milliseconds per candidate name; records what was timed (candidates return their names)."""

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


def _dispatcher(tmp_path, ms=None, *, name=GPU, versions="fastlora 1, triton 1, torch 1", **kw):
    """A dispatcher that can time on any device (a CPU stands in for the GPU), with made-up timings."""
    kw.setdefault("timer", FakeTimer(ms or {"fused": 1.0, "cublas+update": 2.0}))
    kw.setdefault("store", lambda: None)
    kw.setdefault("path", str(tmp_path / "dispatch.json"))
    return dispatch.Dispatcher(name_of=lambda dev: name, measurable=lambda dev: True, versions=lambda: versions, **kw)


@pytest.mark.parametrize("ms, winner", [({"fused": 1.0, "cublas+update": 1.2}, "fused"),
                                        ({"fused": 1.3, "cublas+update": 1.1}, "cublas+update")])  # fmt: skip
def test_faster_path_wins_and_is_timed_once(tmp_path, ms, winner):
    d = _dispatcher(tmp_path, ms)
    assert d.choose(_key(), _candidates(), "cuda:0") == winner
    assert sorted(d.timer.timed) == ["cublas+update", "fused"]
    for _ in range(3):  # later calls: a lookup, no timing (and so no device synchronisation)
        assert d.choose(_key(), _candidates(), "cuda:0") == winner
    assert len(d.timer.timed) == 2
    # another shape key is timed on its own
    d.choose(_key(M=100), _candidates(), "cuda:0")
    assert len(d.timer.timed) == 4


def test_nothing_is_timed_off_cuda_or_for_a_single_candidate(tmp_path):
    """Off CUDA (the CPU path, the interpreter) the default runs by rule; a candidate set of one is no choice."""
    d = dispatch.Dispatcher(path=str(tmp_path / "d.json"), timer=FakeTimer({"fused": 9.0, "split": 1.0}))
    cands = {"fused": lambda: "fused", "split": lambda: "split"}
    assert d.choose(_key(), cands, torch.device("cpu")) == "fused"
    assert d.choose(_key(), cands, torch.device("cpu"), default="split") == "split"
    assert not d.measurable(torch.device("cpu")) and d.measurable(torch.device("cuda", 0)) is not dispatch.INTERPRET
    d = _dispatcher(tmp_path, {"fused": 1.0, "split": 2.0})
    assert d.choose(_key(), {"split": lambda: "split"}, "cuda:0") == "split"
    assert d.timer.timed == [] and d.decisions() == []
    with pytest.raises(ValueError, match="candidate"):
        d.choose(_key(), {}, "cuda:0")
    with pytest.raises(ValueError, match="default path 'other'"):
        d.choose(_key(), cands, "cuda:0", default="other")


def test_graph_capture_takes_the_default_untimed_and_decides_later(tmp_path):
    """Timing synchronises, which a CUDA graph capture forbids: a key first met while capturing gets the default
    path with no timing and no decision, and the first call outside a capture measures as usual."""
    capturing = [True]
    d = _dispatcher(tmp_path, {"fused": 1.5, "cublas+update": 1.0}, capturing=lambda: capturing[0])
    assert d.choose(_key(), _candidates(), "cuda:0") == "fused"
    assert d.choose(_key(), _candidates(), "cuda:0", default="cublas+update") == "cublas+update"
    assert d.timer.timed == [] and d.decisions() == []
    capturing[0] = False
    assert d.choose(_key(), _candidates(), "cuda:0") == "cublas+update"
    assert sorted(d.timer.timed) == ["cublas+update", "fused"]
    capturing[0] = True  # a known key is a lookup, captured or not
    assert d.choose(_key(), _candidates(), "cuda:0") == "cublas+update"


def test_decisions_persist_per_environment_and_are_listed(tmp_path):
    path = str(tmp_path / "sub" / "dispatch.json")
    first = _dispatcher(tmp_path, {"fused": 2.0, "cublas+update": 1.0}, path=path)
    assert first.choose(_key(), _candidates(), "cuda:0") == "cublas+update"
    env = f"{GPU}; fastlora 1, triton 1, torch 1"
    assert json.load(open(path))[env][_key()]["choice"] == "cublas+update"
    # a new process on the same device and versions reads the file and times nothing
    second = _dispatcher(tmp_path, {"fused": 1.0, "cublas+update": 9.0}, path=path)
    assert second.choose(_key(), _candidates(), "cuda:0") == "cublas+update" and second.timer.timed == []
    # another device, or another Triton (or fastlora, or torch) on the same device, decides for itself
    other = _dispatcher(tmp_path, {"fused": 1.0, "cublas+update": 9.0}, path=path, name="GPU-B sm_80")
    assert other.choose(_key(), _candidates(), "cuda:1") == "fused"
    upgraded = _dispatcher(tmp_path, {"fused": 1.0, "cublas+update": 9.0}, path=path,
                           versions="fastlora 1, triton 2, torch 1")  # fmt: skip
    assert upgraded.choose(_key(), _candidates(), "cuda:0") == "fused" and len(upgraded.timer.timed) == 2
    listed = upgraded.decisions()  # the file as merged by every writer
    assert [(row["device"], row["versions"], row["choice"]) for row in listed] == [
        (GPU, "fastlora 1, triton 1, torch 1", "cublas+update"),
        (GPU, "fastlora 1, triton 2, torch 1", "fused"),
        ("GPU-B sm_80", "fastlora 1, triton 1, torch 1", "fused"),
    ]
    assert listed[1]["ms"] == {"fused": 1.0, "cublas+update": 9.0} and listed[1]["key"] == _key()


def test_the_default_environment_names_the_versions():
    import triton

    import fastlora

    assert (
        dispatch.versions()
        == f"fastlora {fastlora.__version__}, triton {triton.__version__}, torch {torch.__version__}"
    )


def test_memory_and_file_are_bounded(tmp_path, monkeypatch):
    """Variable batch shapes cannot grow the decisions without limit: the oldest go first, in memory and on disk,
    and the file keeps at most MAX_ENVIRONMENTS environments."""
    monkeypatch.setattr(dispatch, "MAX_KEYS", 4)
    monkeypatch.setattr(dispatch, "MAX_ENVIRONMENTS", 2)
    d = _dispatcher(tmp_path)
    for m in range(1, 8):
        d.choose(_key(M=2**m), _candidates(), "cuda:0")
    assert len(d._answers) == 4
    keys = [row["key"] for row in d.decisions()]
    assert sorted(keys) == sorted(_key(M=2**m) for m in range(4, 8))
    for version in range(3):
        _dispatcher(tmp_path, versions=f"v{version}").choose(_key(), _candidates(), "cuda:0")
    on_disk = json.load(open(tmp_path / "dispatch.json"))
    assert len(on_disk) == 2 and all(len(keys) <= 4 for keys in on_disk.values())
    assert sorted(on_disk) == [f"{GPU}; v1", f"{GPU}; v2"]


def test_cache_folder_follows_xdg_and_a_broken_file_is_ignored(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTLORA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert dispatch.cache_path() == str(tmp_path / "fastlora" / "dispatch.json")
    (tmp_path / "fastlora").mkdir()
    (tmp_path / "fastlora" / "dispatch.json").write_text("{not json")
    d = _dispatcher(tmp_path, path=None, name="G", versions="v")
    assert d.choose(_key(), _candidates(), "cuda:0") == "fused"
    assert json.load(open(dispatch.cache_path()))["G; v"][_key()]["choice"] == "fused"


def test_shape_key_buckets_rows_and_names_everything():
    assert _key(M=5000) == _key(M=8192) != _key(M=8193)
    assert _key() != _key(dropout=True) != _key(dtype=torch.float16)
    assert _key().startswith("fwd:M8192:N4096:K4096:r16:bfloat16:drop0")
    conv = dispatch.shape_key("conv_fwd", M=600, N=6, K=45, R=3, dtype=torch.float16, dropout=False, k=(3, 3), g=1)
    assert conv == "conv_fwd:M1024:N6:K45:r3:float16:drop0:k3x3:g1"


# ----------------------------------------------------------------------------------------------------------
# The same on every rank
# ----------------------------------------------------------------------------------------------------------


def test_ranks_agree_through_the_group_store(tmp_path):
    """Two ranks (two dispatchers sharing one store) whose own timings disagree run the same path: the first
    decision offered; a rank that meets a key the other never meets decides alone, without waiting."""
    store = dist.HashStore()
    rank0 = _dispatcher(tmp_path, {"fused": 1.0, "cublas+update": 2.0}, store=lambda: store, path=str(tmp_path / "0"))
    rank1 = _dispatcher(tmp_path, {"fused": 2.0, "cublas+update": 1.0}, store=lambda: store, path=str(tmp_path / "1"))
    assert rank1.choose(_key(), _candidates(), "cuda:0") == "cublas+update"  # rank 1 offers first
    assert rank0.choose(_key(), _candidates(), "cuda:0") == "cublas+update"
    assert rank0.timer.timed == []  # the group's answer needs no timing
    assert rank0.choose(_key(M=64), _candidates(), "cuda:0") == "fused"  # a key only rank 0 meets
    assert rank1.choose(_key(M=64), _candidates(), "cuda:0") == "fused"
    # each rank's own measurements stay in its file; the group's answer is in memory, for the group's lifetime
    assert [row["choice"] for row in rank1.decisions()] == ["cublas+update"]


def test_a_default_taken_inside_a_capture_is_the_groups(tmp_path):
    """A rank that captures a graph before timing a key runs the default for good: the group adopts it, so a rank
    that later measures the other path faster still runs the captured rank's."""
    store = dist.HashStore()
    capturing = dict(rank0=True, rank1=False)
    rank0 = _dispatcher(tmp_path, store=lambda: store, capturing=lambda: capturing["rank0"], path=str(tmp_path / "0"))
    rank1 = _dispatcher(tmp_path, {"fused": 2.0, "cublas+update": 1.0}, store=lambda: store, path=str(tmp_path / "1"))
    assert rank0.choose(_key(), _candidates(), "cuda:0") == "fused"
    assert rank1.choose(_key(), _candidates(), "cuda:0") == "fused"
    assert rank1.timer.timed == [] and rank0.decisions() == []


def _two_ranks(rank, init_file, out_dir):
    """Rank `rank` of a gloo group: the process-wide dispatcher, its timings made up to favour another path on
    each rank, choosing for three keys, one of them met by this rank only."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    favour = ("fused", "cublas+update")[rank]
    d = dispatch._default
    d.path = os.path.join(out_dir, f"dispatch-{rank}.json")
    d.timer = lambda fn: 1.0 if fn() == favour else 2.0
    d.name_of, d.measurable = (lambda dev: GPU), (lambda dev: True)
    dist.barrier()
    if rank == 1:
        dist.barrier()  # rank 0 offers first for the shared keys
    chosen = {str(m): d.choose(_key(M=m), _candidates(), "cuda:0") for m in (64, 128)}
    chosen[f"own{rank}"] = d.choose(_key(M=1000 + 2000 * rank), _candidates(), "cuda:0")  # M buckets 1024, 4096
    if rank == 0:
        dist.barrier()
    everyone = [None, None]
    dist.all_gather_object(everyone, chosen)
    if rank == 0:
        with open(os.path.join(out_dir, "chosen.json"), "w") as f:
            json.dump(everyone, f)
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch and fastlora: about 10 s on 2 cores
@pytest.mark.skipif(sys.platform != "linux" or not dist.is_available(), reason="gloo on Linux")
def test_two_gloo_ranks_take_rank_zeros_decision(tmp_path):
    """Through torch.distributed's default store, as the process-wide dispatcher finds it: rank 0 measures and
    offers first, rank 1, whose timings favour the other path, runs rank 0's; each rank's own key is its own."""
    mp.spawn(_two_ranks, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = json.load(open(tmp_path / "chosen.json"))
    assert rank0 == {"64": "fused", "128": "fused", "own0": "fused"}
    assert rank1 == {"64": "fused", "128": "fused", "own1": "cublas+update"}


# ----------------------------------------------------------------------------------------------------------
# The ops choose through it
# ----------------------------------------------------------------------------------------------------------


class OrderTimer:
    """Made-up milliseconds in the order candidates are timed (the candidates are not run)."""

    def __init__(self, *ms):
        self.ms = list(ms)

    def __call__(self, fn):
        return self.ms.pop(0)


@pytest.fixture
def measured(tmp_path, monkeypatch):
    """The process-wide dispatcher replaced by one that times on the CPU with made-up timings (set .timer)."""
    d = _dispatcher(tmp_path)
    monkeypatch.setattr(dispatch, "_default", d)
    return d


def test_conv2d_chooses_through_the_dispatch(measured, monkeypatch):
    """conv2d's fused-or-split choice for Y and dX is the dispatch's (keyed by sizes, geometry and layout), and the
    path it names is the one that runs."""
    from fastlora.kernels import conv2d as kconv

    ran = []
    for name in ("_y_fused", "_y_split", "_dx_fused", "_dx_split"):
        real = getattr(kconv, name)
        monkeypatch.setattr(kconv, name, lambda *a, _real=real, _name=name: ran.append(_name) or _real(*a))
    x = torch.randn(2, 5, 9, 7).contiguous(memory_format=torch.channels_last)
    weight, lora_A, lora_B = torch.randn(6, 5, 3, 3), torch.randn(3, 5, 3, 3), torch.randn(6, 3, 1, 1)
    geometry = ((1, 1), (1, 1, 1, 1), (1, 1), 1)
    measured.timer = OrderTimer(2.0, 1.0, 1.0, 2.0)  # forward: split faster; dX: fused faster
    y, s = kconv.lora_conv2d_fwd(x, weight, None, lora_A, lora_B, 0.5, *geometry, 0.0, None)
    kconv.lora_conv2d_bwd(torch.randn_like(y), x, s, weight, lora_A, lora_B, 0.5, *geometry, 0.0, None, True, False)
    assert ran == ["_y_split", "_dx_fused"]
    chosen = {row["key"].split(":")[0]: (row["choice"], row["key"]) for row in measured.decisions()}
    assert chosen["conv_fwd"][0] == "split" and chosen["conv_dx"][0] == "fused"
    assert chosen["conv_fwd"][1].endswith(":hw9x7:k3x3:s1x1:p1x1x1x1:d1x1:g1:layoutc")
    assert chosen["conv_dx"][1].endswith(":layoutcc")


def test_nf4_routes_are_chosen_through_the_dispatch(measured, monkeypatch):
    """The 4-bit layer's route, where its rule allows both, is the dispatch's choice; above FUSED_MAX_M rows the
    rule leaves the workspace route alone and nothing is timed."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf
    from fastlora.kernels import nf4

    from fastlora.ops.linear4bit import quant_tensors

    packed, qs = bnbf.quantize_4bit(torch.randn(51, 75) / 75**0.5, blocksize=64, quant_type="nf4")
    q = quant_tensors(packed, qs)
    lora_A, lora_B = torch.randn(5, 75), torch.randn(51, 5)
    nf4.release_workspace()
    measured.timer = OrderTimer(2.0, 1.0)  # fused, workspace: the workspace route is faster
    nf4.lora_linear_4bit_fwd(torch.randn(16, 75), q, None, lora_A, lora_B, 0.5, 0.0, None)
    assert nf4._WORKSPACE, "the dispatch chose the workspace route"
    [row] = measured.decisions()
    assert row["choice"] == "workspace" and row["key"].startswith("nf4_fwd:M16:N51:K75:r5:float32:drop0:qnf4:b64")
    nf4.release_workspace()
    measured.timer = OrderTimer()  # nothing may be timed: one route is no choice
    monkeypatch.setattr(nf4, "FUSED_MAX_M", 8)
    nf4.lora_linear_4bit_fwd(torch.randn(9, 75), q, None, lora_A, lora_B, 0.5, 0.0, None)
    assert nf4._WORKSPACE and len(measured.decisions()) == 1
    nf4.release_workspace()
