"""torch.compile over models with fastlora layers: one graph, no breaks, eager's outputs and gradients.

The eager path runs ``torch.autograd.Function``s; under ``torch.compile`` the same work runs as the
``fastlora::*`` custom ops. These tests hold the two together, and ``torch.library.opcheck`` checks each
op's schema, fake (meta) implementation and autograd registration.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from helpers import assert_close
from lora_cases import (
    DROPOUT_KINDS,
    LAYER_KINDS,
    OPTION_KINDS,
    PATHS,
    build_model,
    forward_backward,
    kind_params,
    make_input,
    on_path,
)

import fastlora as fl

# aot_eager runs the same AOT-autograd tracing, functionalisation and fake-tensor checks as inductor without
# generating C++; the inductor run below is the full default pipeline, once.
BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _assert_same(out, grads, ref_out, ref_grads, what):
    """Output and every gradient within the float32 tolerance of the eager run (the compiler may fuse and reorder
    the float32 elementwise ops around the fastlora ops)."""
    assert_close(out, ref_out, torch.float32, f"{what}: output")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_close(grads[name], ref_grads[name], torch.float32, f"{what}: grad {name}")


@pytest.mark.parametrize("kind", kind_params(LAYER_KINDS + OPTION_KINDS))
def test_no_graph_breaks(kind):
    dropout = 0.25 if kind in DROPOUT_KINDS + OPTION_KINDS else 0.0
    model = build_model(kind, dropout=dropout)
    explanation = torch._dynamo.explain(model)(make_input(kind))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", kind_params(LAYER_KINDS + OPTION_KINDS))
def test_compiled_matches_eager(kind, path):
    model = build_model(kind)
    compiled = torch.compile(model, backend=BACKEND, fullgraph=True, dynamic=True)
    with on_path(path):
        for batch in (3, 4):  # a second batch size runs the same graph with a new symbolic size
            x = make_input(kind, seed=batch, batch=batch)
            ref_out, ref_grads = forward_backward(model, x)
            out, grads = forward_backward(model, x, step=compiled)
            _assert_same(out, grads, ref_out, ref_grads, f"batch {batch}")


def test_inductor_matches_eager():
    """The default backend end to end: inductor generates code around the opaque fastlora ops."""
    model = build_model("linear")
    compiled = torch.compile(model, fullgraph=True)
    x = make_input("linear")
    with on_path("torch"):
        ref_out, ref_grads = forward_backward(model, x)
        out, grads = forward_backward(model, x, step=compiled)
    _assert_same(out, grads, ref_out, ref_grads, "inductor")


def test_inductor_dropout_is_seeded():
    """Inductor lowers the seed draw to its own RNG, seeded from torch's: the same seed still gives the same
    output and gradients, and another seed another mask."""
    model = build_model("linear", dropout=0.3)
    compiled = torch.compile(model, fullgraph=True)
    x = make_input("linear")
    runs = []
    with on_path("torch"):
        for seed in (11, 11, 12):
            torch.manual_seed(seed)
            runs.append(forward_backward(model, x, step=compiled))
    (out1, grads1), (out2, grads2), (out3, _) = runs
    assert torch.equal(out1, out2) and not torch.equal(out1, out3)
    for name in grads1:
        assert torch.equal(grads1[name], grads2[name]), name


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", kind_params(DROPOUT_KINDS + OPTION_KINDS))
def test_compiled_dropout_is_seeded(kind, path):
    """With dropout, the compiled model draws its masks from torch's RNG: the same seed gives the same output
    and gradients, another seed gives another mask, and (the graph runs torch's own RNG ops) eager agrees."""
    model = build_model(kind, dropout=0.3)
    compiled = torch.compile(model, backend=BACKEND, fullgraph=True)
    x = make_input(kind)
    runs = []
    with on_path(path):
        for seed in (11, 11, 12):
            torch.manual_seed(seed)
            runs.append(forward_backward(model, x, step=compiled))
        torch.manual_seed(11)
        eager = forward_backward(model, x)
    (out1, grads1), (out2, grads2), (out3, _) = runs
    assert torch.equal(out1, out2)
    for name in grads1:
        assert torch.equal(grads1[name], grads2[name]), name
    assert not torch.equal(out1, out3), "another seed drew the same dropout masks"
    no_dropout = forward_backward(build_model(kind, dropout=0.0), x)[0]
    assert not torch.allclose(out1, no_dropout), "dropout had no effect"
    _assert_same(out1, grads1, *eager, "compiled vs eager, same seed")


# ----------------------------------------------------------------------------------------------------------
# torch.library.opcheck on every fastlora op, with the arguments the layers really pass
# ----------------------------------------------------------------------------------------------------------


def _is_fastlora_op(target) -> bool:
    return str(target).startswith("fastlora.")


def _record_op_calls(model, x):
    """Compile ``model`` with a backend that runs the captured graph and records each fastlora op call."""
    calls = []

    class Recorder(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if _is_fastlora_op(target):
                op = target if isinstance(target, torch._ops.OpOverload) else target.default
                calls.append((op, args, kwargs))
            return super().call_function(target, args, kwargs)

    def backend(gm, example_inputs):
        return lambda *args: Recorder(gm).run(*args)

    torch.compile(model, backend=backend, fullgraph=True)(x)
    return calls


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["p0", "p0.2"])
@pytest.mark.parametrize("kind", kind_params())
def test_opcheck_layer_ops(kind, dropout):
    model = build_model(kind, dropout=dropout if kind in DROPOUT_KINDS else 0.0)
    with on_path("torch"):
        calls = _record_op_calls(model, make_input(kind))
        assert calls, "the compiled model called no fastlora op"
        for op, args, kwargs in calls:
            torch.library.opcheck(op, args, kwargs)


def _linear_args(
    m=6, k=5, n=4, r=3, dtype=torch.float32, bias=True, dropout_p=0.0, x_transposed=False, lora_bias=False
):
    x = torch.randn(k, m, dtype=dtype).t() if x_transposed else torch.randn(m, k, dtype=dtype)
    weight = torch.randn(n, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    lora_A = torch.randn(r, k, dtype=dtype, requires_grad=True)
    lora_B = torch.randn(n, r, dtype=dtype, requires_grad=True)
    lb = torch.randn(n, dtype=dtype, requires_grad=True) if lora_bias else None
    seed = torch.tensor(1234) if dropout_p > 0 else None
    return x.requires_grad_(), weight, b, lora_A, lora_B, lb, 0.75, dropout_p, seed


LINEAR_CASES = {
    "plain": {},
    "no-bias": {"bias": False},
    "dropout": {"dropout_p": 0.3},
    "fp16": {"dtype": torch.float16},
    "x-transposed": {"x_transposed": True},
    "M0": {"m": 0},
    "lora-bias": {"lora_bias": True, "dropout_p": 0.3},
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(LINEAR_CASES), ids=list(LINEAR_CASES))
def test_opcheck_linear(case, path):
    args = _linear_args(**LINEAR_CASES[case])
    with on_path(path):
        torch.library.opcheck(torch.ops.fastlora.lora_linear.default, args)
        x, weight, _, lora_A, lora_B, lora_bias, scaling, dropout_p, seed = args
        y, s = torch.ops.fastlora.lora_linear(*args)
        dy = torch.randn_like(y)
        triton_path = fl.active_path(x.device) != "torch"
        # the backward op: grad of y, the saved inputs and S, the non-tensor inputs, which of (dx, dW, dbias, dA, dB,
        # d lora_bias) autograd asks for, and the path the forward took
        lb = lora_bias.detach() if lora_bias is not None else None
        for need_dx, need_dbias in ((True, True), (False, False)):
            saved = (x.detach(), weight, args[2], lora_A.detach(), lora_B.detach(), lb, seed, s.detach())
            needs = [need_dx, False, need_dbias, True, True, lb is not None]
            bwd_args = (dy, *saved, scaling, dropout_p, needs, triton_path)
            torch.library.opcheck(torch.ops.fastlora.lora_linear_backward.default, bwd_args)


# ----------------------------------------------------------------------------------------------------------
# Drop-in behaviour: in-place ops on a layer's output work, as they do on nn.Linear's, eager and compiled
# ----------------------------------------------------------------------------------------------------------


def _in_place_step(model):
    def step(x):
        h = model[0](x)
        h.mul_(1.5).add_(0.25)  # e.g. `hidden += residual` right after a projection
        return model[2](model[1](h))

    return step


def _out_of_place_step(model):
    return lambda x: model[2](model[1](model[0](x) * 1.5 + 0.25))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("kind", kind_params())
def test_in_place_on_layer_output(kind, compiled):
    model = build_model(kind)
    x = make_input(kind)
    step = _in_place_step(model)
    if compiled:
        step = torch.compile(step, backend=BACKEND, fullgraph=True)
    with on_path("torch"):
        ref_out, ref_grads = forward_backward(model, x, step=_out_of_place_step(model))
        out, grads = forward_backward(model, x, step=step)
    _assert_same(out, grads, ref_out, ref_grads, "in-place")


def test_the_inductor_cache_folder_of_a_run_is_removed_when_it_ends():
    """tests/conftest.py gives each test process a fresh inductor cache folder and removes it at exit."""
    code = "import os, conftest; d = os.environ['TORCHINDUCTOR_CACHE_DIR']; open(os.path.join(d, 'x'), 'w'); print(d)"
    tests = Path(__file__).resolve().parent
    run = subprocess.run([sys.executable, "-c", code], cwd=tests, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    folder = Path(run.stdout.strip())
    assert folder.name.startswith("fastlora-inductor-") and not folder.exists()


# ----------------------------------------------------------------------------------------------------------
# CUDA graphs: what torch.compile(mode="reduce-overhead") would capture, traced on fake CUDA tensors
# ----------------------------------------------------------------------------------------------------------


def _fake_cuda_calls():
    """{op: (fn, args)} with fake CUDA tensors as args (no GPU needed: fake tensors only carry metadata)."""
    import copy

    from torch._subclasses.fake_tensor import FakeTensorMode

    quantized = None
    try:
        import bitsandbytes.functional as bnbf

        w4 = (torch.randn(24, 32) / 32**0.5).to(torch.bfloat16)
        quantized = bnbf.quantize_4bit(w4, blocksize=64, quant_type="nf4", compress_statistics=True)
    except ImportError:
        pass
    qs = copy.deepcopy(quantized[1]) if quantized is not None else None  # deep-copied outside the fake mode
    bf16 = torch.bfloat16
    with FakeTensorMode(allow_non_fake_inputs=True):

        def cuda(*shape, dtype=torch.float32):
            return torch.empty(shape, dtype=dtype, device="cuda")

        x, w, bias = cuda(16, 32, dtype=bf16), cuda(24, 32, dtype=bf16), cuda(24, dtype=bf16)
        a, b, g = cuda(4, 32), cuda(24, 4), cuda(24)
        img, wc, ac, bc = (
            cuda(2, 8, 9, 9, dtype=bf16),
            cuda(16, 8, 3, 3, dtype=bf16),
            cuda(4, 8, 3, 3),
            cuda(16, 4, 1, 1),
        )
        idx, table, ae, be = (
            torch.zeros(2, 7, dtype=torch.int64, device="cuda"),
            cuda(50, 24, dtype=bf16),
            cuda(4, 50),
            cuda(24, 4),
        )
        w2, b2 = cuda(8, 32, dtype=bf16), cuda(8, 4)

        def group(x, w, bias, a, b, w2, b2):
            members = [fl.GroupMember(w, bias, a, b, None, 0.5, 0.1), fl.GroupMember(w2, None, a, b2, None, 0.5, 0.1)]
            return fl.lora_linear_group(x, members)

        calls = {
            "linear": (lambda *t: fl.lora_linear(*t, 0.5, dropout_p=0.1), (x, w, bias, a, b)),
            "group": (group, (x, w, bias, a, b, w2, b2)),
            "dora": (lambda *t: fl.lora_linear_dora(*t, 0.5, dropout_p=0.1), (x, w, bias, a, b, g)),
            "conv2d": (lambda *t: fl.lora_conv2d(*t, 0.5, padding=1, dropout_p=0.1), (img, wc, None, ac, bc)),
            "embedding": (lambda *t: fl.lora_embedding(*t, 0.5), (idx, table, ae, be)),
        }
        if qs is not None:
            qs.absmax, qs.code, qs.offset = cuda(*qs.absmax.shape, dtype=torch.uint8), cuda(16), cuda()
            qs.state2.absmax, qs.state2.code = cuda(*qs.state2.absmax.shape), cuda(256)
            packed = cuda(*quantized[0].shape, dtype=quantized[0].dtype)
            calls["linear4bit"] = (
                lambda x, p, a, b: fl.lora_linear_4bit(x, p, qs, None, a, b, 0.5, dropout_p=0.1),
                (x, packed, a, b),
            )
    return calls


@pytest.mark.parametrize("op", ["linear", "dora", "conv2d", "embedding", "linear4bit", "group"])
def test_compiled_graph_on_cuda_is_capture_clean(op, monkeypatch):
    """What inductor's CUDA-graph capture needs from a compiled fastlora call, on fake CUDA tensors: every tensor in
    the graph lives on CUDA (a CPU tensor makes inductor skip the graph), no node that syncs or that inductor
    names incompatible with graphs, and the dropout seed drawn by a CUDA ``randint`` inside the graph (so each
    replay draws a fresh one) and fed to the op; the fastlora ops carry no ``cudagraph_unsafe`` tag."""
    from torch._inductor.utils import get_first_incompatible_cudagraph_node
    from torch.fx.experimental.proxy_tensor import make_fx

    calls = _fake_cuda_calls()
    if op not in calls:
        pytest.skip("bitsandbytes is not installed")
    fn, args = calls[op]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the ops take their compiled (custom op) form
    gm = make_fx(fn, tracing_mode="fake")(*args)
    nodes = list(gm.graph.nodes)
    off_cuda = [n.format_node() for n in nodes if isinstance(v := n.meta.get("val"), torch.Tensor) and not v.is_cuda]
    assert not off_cuda, f"tensors off the GPU in the graph: {off_cuda}"
    assert get_first_incompatible_cudagraph_node(gm) is None
    targets = [n.target for n in nodes if n.op == "call_function"]
    assert torch.ops.aten._local_scalar_dense.default not in targets
    ops = [n for n in nodes if n.op == "call_function" and str(n.target).startswith("fastlora.")]
    assert len(ops) == 1, ops
    seeds = [n for n in nodes if n.target is torch.ops.aten.randint.low]
    if op == "embedding":
        assert not seeds
    else:
        assert len(seeds) == 1 and seeds[0] in ops[0].all_input_nodes and seeds[0].meta["val"].is_cuda
    for name in (ops[0].target._name, ops[0].target._name + "_backward"):
        overload = getattr(torch.ops.fastlora, name.split("::")[1]).default
        assert torch.Tag.cudagraph_unsafe not in overload.tags
