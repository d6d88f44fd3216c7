"""CUDA graphs and torch.compile on a GPU: fastlora layers captured as a graph give eager's outputs and gradients.

``python -m fastlora.benchmarks.graphs_check OUT_DIR`` writes ``graphs_check.json`` there with

- ``host_bound``: a stack of LoRA linear layers at M=512, K=N=4096 (bf16, r=16), forward+backward per step, eager
  fastlora against eager PEFT, median us per step (the host cost shows wherever it exceeds the GPU's work);
- ``cuda_graph``: the same model's forward+backward captured with ``torch.cuda.graph`` and replayed, outputs and
  gradients against eager (max difference relative to the largest value), and the replay time per step;
- ``compiled``: ``torch.compile(mode="reduce-overhead")`` of the model (linear, embedding and conv2d layers),
  outputs and gradients against eager, the number of graph breaks and of inductor's cudagraph skips;
- ``dropout_capture``: one layer's forward+backward with dropout 0.1 captured with ``torch.cuda.graph`` and
  replayed three times: the seed each replay drew (read off the tensor the captured ``draw_seed`` wrote) differs
  between replays, so do the outputs, and each replay's output and gradients equal an eager call given the same
  seed (``masks_differ``, ``seeds``, ``output_rel_diff``, ``grad_rel_diff``, ``equal``);
- ``compiled_dropout``: ``torch.compile(mode="reduce-overhead")`` of a dropout layer with
  ``cudagraph_or_error`` on (a cudagraph skip is an error): outputs differ between steps, inductor's
  ``cudagraph_skips`` counter stays 0;
- ``checkpoint``: a dropout layer under ``torch.utils.checkpoint`` gives the gradients of the plain call drawn
  from the same RNG state (the recomputed forward draws the forward's seed, so backward regenerates its mask).

Each section records its own error instead of stopping the others. Needs CUDA.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
from fastlora.benchmarks.providers import peft_layer

import fastlora

M, K, LAYERS, RANK = 512, 4096, 4, 16
DTYPE = torch.bfloat16
TOL = 2e-2  # bf16: differences relative to the largest magnitude (atomics reorder the float32 sums)


def _stack(provider: str, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        base = nn.Linear(K, K, bias=False, device="cuda", dtype=DTYPE).requires_grad_(False)
        if provider == "peft":
            layer = peft_layer(base, RANK, 2 * RANK, dropout)
        else:
            layer = fastlora.LoRALinear.from_module(base, r=RANK, alpha=2 * RANK, dropout=dropout)
        with torch.no_grad():
            for p in layer.parameters():
                if p.requires_grad:
                    p.normal_(std=0.02)
        layers.append(layer)
    return nn.Sequential(*layers).cuda()


def _step(model, x, dy):
    for p in model.parameters():
        p.grad = None
    y = model(x)
    y.backward(dy)
    return y


def _time(fn, steps=20, batches=7) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - start) / steps * 1e6)
    return statistics.median(out)


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def host_bound() -> dict:
    x = torch.randn(M, K, device="cuda", dtype=DTYPE, requires_grad=True)
    dy = torch.randn(M, K, device="cuda", dtype=DTYPE)
    out = {"shape": f"M={M} K=N={K} r={RANK} x{LAYERS} layers, bf16, forward+backward"}
    for provider in ("peft", "fastlora"):
        model = _stack(provider)
        out[f"{provider}_us_per_step"] = _time(lambda m=model: _step(m, x, dy))
    out["fastlora_over_peft"] = out["fastlora_us_per_step"] / out["peft_us_per_step"]
    return out


def cuda_graph(dropout: float = 0.0) -> dict:
    model = _stack("fastlora", dropout)
    x = torch.randn(M, K, device="cuda", dtype=DTYPE, requires_grad=True)
    dy = torch.randn(M, K, device="cuda", dtype=DTYPE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compilation, autotuning, dispatch timing) off the capture
        for _ in range(3):
            _step(model, x, dy)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    for p in model.parameters():
        p.grad = None
    with torch.cuda.graph(graph):
        y_static = model(x)
        y_static.backward(dy)
    graph.replay()
    torch.cuda.synchronize()
    replay_y, replay_g = y_static.detach().clone(), _grads(model)
    result = {}
    if dropout == 0:
        eager_y = _step(model, x, dy).detach()
        eager_g = _grads(model)
        result["output_rel_diff"] = _rel(replay_y, eager_y)
        result["grad_rel_diff"] = max(_rel(a, b) for a, b in zip(replay_g, eager_g, strict=True))
        result["equal"] = result["output_rel_diff"] <= TOL and result["grad_rel_diff"] <= TOL
        result["replay_us_per_step"] = _time(graph.replay)
    else:
        graph.replay()
        torch.cuda.synchronize()
        result["masks_differ"] = not torch.equal(y_static, replay_y)
    return result


def _dropout_layer(dropout: float = 0.1):
    torch.manual_seed(0)
    base = nn.Linear(K, K, device="cuda", dtype=DTYPE).requires_grad_(False)
    layer = fastlora.LoRALinear.from_module(base, r=RANK, alpha=2 * RANK, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.02)
    return layer


def _eager_with_seed(layer, x, dy, seed: int):
    """The layer's output and (dX, dA, dB) for a given dropout seed, through the op itself."""
    from fastlora.ops.linear import LINEAR

    x = x.detach().requires_grad_()
    for p in (layer.lora_A, layer.lora_B):
        p.grad = None
    seed_t = torch.tensor(seed, dtype=torch.int64, device="cuda")
    y = LINEAR(
        x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, None, layer.scaling, layer.lora_dropout, seed_t
    )[0]
    y.backward(dy)
    return y.detach().clone(), [x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]


def dropout_capture() -> dict:
    from fastlora.ops import linear as ops_linear

    layer = _dropout_layer()
    x = torch.randn(M, K, device="cuda", dtype=DTYPE, requires_grad=True)
    dy = torch.randn(M, K, device="cuda", dtype=DTYPE)
    params = (x, layer.lora_A, layer.lora_B)

    def step():
        for p in params:
            p.grad = None
        y = layer(x)
        y.backward(dy)
        return y

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    seeds, draw = [], ops_linear.draw_seed
    ops_linear.draw_seed = lambda t: seeds.append(draw(t)) or seeds[-1]
    try:
        graph = torch.cuda.CUDAGraph()
        for p in params:
            p.grad = None
        with torch.cuda.graph(graph):
            y_static = step()
    finally:
        ops_linear.draw_seed = draw
    replays = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        replays.append((int(seeds[0]), y_static.detach().clone(), [p.grad.detach().clone() for p in params]))
    out = {"seeds": [r[0] for r in replays]}
    out["masks_differ"] = len(set(out["seeds"])) == 3 and not torch.equal(replays[0][1], replays[1][1])
    y_diff, g_diff = 0.0, 0.0
    for seed, y, grads in replays:
        want_y, want_g = _eager_with_seed(layer, x, dy, seed)
        y_diff = max(y_diff, _rel(y, want_y))
        g_diff = max(g_diff, *(_rel(a, b) for a, b in zip(grads, want_g, strict=True)))
    out.update(output_rel_diff=y_diff, grad_rel_diff=g_diff, equal=y_diff <= TOL and g_diff <= TOL)
    return out


def compiled_dropout() -> dict:
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    layer = _dropout_layer()
    x = torch.randn(M, K, device="cuda", dtype=DTYPE, requires_grad=True)
    counters.clear()
    with inductor_config.patch({"triton.cudagraph_or_error": True}):
        fn = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
        outs = []
        for _ in range(4):  # warm-up, record, then replays
            torch.compiler.cudagraph_mark_step_begin()
            y = fn(x)
            y.float().square().mean().backward()
            outs.append(y.detach().clone())
    return {
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
        "masks_differ": not torch.equal(outs[-1], outs[-2]) and not torch.equal(outs[-2], outs[-3]),
    }


def checkpoint() -> dict:
    from torch.utils.checkpoint import checkpoint as ckpt

    layer = _dropout_layer()
    x = torch.randn(M, K, device="cuda", dtype=DTYPE, requires_grad=True)
    dy = torch.randn(M, K, device="cuda", dtype=DTYPE)
    results = []
    for wrap in (lambda t: layer(t), lambda t: ckpt(layer, t, use_reentrant=False)):
        for p in (x, layer.lora_A, layer.lora_B):
            p.grad = None
        torch.manual_seed(7)
        torch.cuda.manual_seed(7)
        wrap(x).backward(dy)
        results.append([p.grad.clone() for p in (x, layer.lora_A, layer.lora_B)])
    diff = max(_rel(a, b) for a, b in zip(results[1], results[0], strict=True))
    return {"grad_rel_diff": diff, "equal": diff <= TOL}


def compiled() -> dict:
    import torch._dynamo

    torch.manual_seed(0)
    lin = fastlora.LoRALinear.from_module(nn.Linear(K, K, device="cuda", dtype=DTYPE), r=RANK, alpha=2 * RANK)
    emb = fastlora.LoRAEmbedding.from_module(nn.Embedding(1000, 64, device="cuda", dtype=DTYPE), r=RANK, alpha=RANK)
    conv = fastlora.LoRAConv2d.from_module(nn.Conv2d(16, 32, 3, padding=1, device="cuda", dtype=DTYPE), r=8, alpha=8)
    for layer in (lin, emb, conv):
        with torch.no_grad():
            for p in layer.parameters():
                if p.requires_grad:
                    p.normal_(std=0.02)
    x = torch.randn(M, K, device="cuda", dtype=DTYPE, requires_grad=True)
    idx = torch.randint(0, 1000, (M,), device="cuda")
    img = torch.randn(4, 16, 12, 12, device="cuda", dtype=DTYPE, requires_grad=True)

    def run(lin_fn, emb_fn, conv_fn):
        for layer in (lin, emb, conv):
            for p in layer.parameters():
                p.grad = None
        ys = (lin_fn(x), emb_fn(idx), conv_fn(img))
        sum(y.float().square().mean() for y in ys).backward()
        params = [p for layer in (lin, emb, conv) for p in layer.parameters() if p.requires_grad]
        return [y.detach().clone() for y in ys], [p.grad.clone() for p in params]

    from torch._dynamo.utils import counters

    eager_y, eager_g = run(lin, emb, conv)
    explanation = torch._dynamo.explain(lin)(x)
    counters.clear()
    fns = [torch.compile(m, mode="reduce-overhead", fullgraph=True) for m in (lin, emb, conv)]
    for _ in range(3):  # cudagraph trees record on the second call and replay afterwards
        torch.compiler.cudagraph_mark_step_begin()
        comp_y, comp_g = run(*fns)
    return {
        "graph_breaks": explanation.graph_break_count,
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
        "output_rel_diff": max(_rel(a, b) for a, b in zip(comp_y, eager_y, strict=True)),
        "grad_rel_diff": max(_rel(a, b) for a, b in zip(comp_g, eager_g, strict=True)),
        "equal": max(_rel(a, b) for a, b in zip(comp_y + comp_g, eager_y + eager_g, strict=True)) <= TOL,
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(argv[0] if argv else ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("graphs_check: needs CUDA", file=sys.stderr)
        return 2
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    sections = [
        ("host_bound", host_bound),
        ("cuda_graph", cuda_graph),
        ("dropout_capture", dropout_capture),
        ("checkpoint", checkpoint),
        # the compiled sections last: inductor's first compile on a fresh machine may take most of the stage's time
        ("compiled_dropout", compiled_dropout),
        ("compiled", compiled),
    ]
    status = 0
    for name, fn in sections:
        try:
            result[name] = fn()
        except Exception as exc:  # each section reports its own failure; the others still run
            result[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
            status = 1
        print(name, json.dumps({k: v for k, v in result[name].items() if k != "traceback"}), flush=True)
        (out_dir / "graphs_check.json").write_text(json.dumps(result, indent=2) + "\n")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
