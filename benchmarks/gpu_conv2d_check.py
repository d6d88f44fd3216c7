"""One short device check of the conv2d kernels on a CUDA GPU: correctness of both kernel paths against the
float64 reference, then the issue's timing targets. Prints one JSON line per result.

    python -m fastlora.benchmarks.gpu_conv2d_check            # on a GPU (TRITON_INTERPRET unset)
    TRITON_INTERPRET=1 python -m fastlora.benchmarks.gpu_conv2d_check --dry-run   # CPU: tiny shapes

Targets (issue 3; bf16, channels_last, batch 32, C = O = 256, 3x3, stride 1, padding 1, r = 8): forward <= 1.15x
the bare cuDNN convolution; forward+backward >= 1.25x faster than the PEFT-style reference.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn as nn
import triton
from fastlora.kernels import conv2d as kconv
from fastlora.kernels import dispatch

import fastlora as fl
from fastlora.reference import PeftStyleConv2d, lora_conv2d_ref

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check_paths(device, dtype, channels_last, nb, c, o, hw, r):
    """Both forward and both dX paths of the kernels against the float64 reference; returns the worst error."""
    x = torch.randn(nb, c, hw, hw, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(o, c, 3, 3, device=device) / (9 * c) ** 0.5).to(dtype)
    bias = torch.randn(o, device=device, dtype=dtype)
    lora_A = (torch.randn(r, c, 3, 3, device=device) / (9 * c) ** 0.5).to(dtype)
    lora_B = (torch.randn(o, r, 1, 1, device=device) / r**0.5).to(dtype)
    geometry = ((1, 1), (1, 1, 1, 1), (1, 1), 1)
    x64 = x.double().requires_grad_()
    a64, b64 = lora_A.double().requires_grad_(), lora_B.double().requires_grad_()
    y_ref = lora_conv2d_ref(x64, weight.double(), bias.double(), a64, b64, 0.5, padding=1)
    dy = torch.randn_like(y_ref).to(dtype)
    y_ref.backward(dy.double())
    worst = {}
    for fused in (True, False):
        with torch.no_grad():
            y, s = kconv.lora_conv2d_fwd(x, weight, bias, lora_A, lora_B, 0.5, *geometry, 0.0, 0, fused)
            dx, da, db, _ = kconv.lora_conv2d_bwd(
                dy, x, s, weight, lora_A, lora_B, 0.5, *geometry, 0.0, 0, True, False, fused
            )
        errs = {"y": rel_err(y, y_ref), "dx": rel_err(dx, x64.grad), "dA": rel_err(da, a64.grad),
                "dB": rel_err(db, b64.grad)}  # fmt: skip
        worst["fused" if fused else "split"] = errs
    return worst


def bench(fn, dry_run):
    if dry_run:
        fn()
        return float("nan")
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def timing(device, dtype, nb, c, hw, r, dry_run):
    """Bare cuDNN conv, fastlora and the PEFT-style reference: forward, and forward+backward, in ms."""
    conv = nn.Conv2d(c, c, 3, padding=1, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    conv.requires_grad_(False)
    peft = PeftStyleConv2d(conv, r=r, alpha=2 * r)
    layer = fl.LoRAConv2d.from_module(conv, r=r, alpha=2 * r)
    with torch.no_grad():
        peft.lora_B.normal_()
        layer.lora_A.copy_(peft.lora_A)
        layer.lora_B.copy_(peft.lora_B)
    x = torch.randn(nb, c, hw, hw, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    xg = x.detach().requires_grad_()
    dy = torch.randn(nb, c, hw, hw, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)

    def fwd_bwd(module):
        def run():
            xg.grad = None
            module(xg).backward(dy)

        return run

    with torch.no_grad():
        fwd = {"cudnn": bench(lambda: conv(x), dry_run), "fastlora": bench(lambda: layer(x), dry_run),
               "peft": bench(lambda: peft(x), dry_run)}  # fmt: skip
    both = {"cudnn": bench(fwd_bwd(conv), dry_run), "fastlora": bench(fwd_bwd(layer), dry_run),
            "peft": bench(fwd_bwd(peft), dry_run)}  # fmt: skip
    return {
        "forward_ms": fwd,
        "fwd_bwd_ms": both,
        "forward_vs_cudnn": fwd["fastlora"] / fwd["cudnn"],
        "fwd_bwd_speedup_vs_peft": both["peft"] / both["fastlora"],
        "chosen": [[d["key"], d["choice"]] for d in dispatch.decisions() if d["key"].startswith("conv_")],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    stamp = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    if device == "cuda":
        stamp["gpu"] = torch.cuda.get_device_name()
    print(json.dumps({"conditions": stamp}), flush=True)
    torch.manual_seed(0)
    small = (2, 24, 40, 9, 8) if args.dry_run else (4, 64, 96, 17, 8)
    for dtype in (torch.bfloat16, torch.float16):
        for channels_last in (True, False):
            errs = check_paths(device, dtype, channels_last, *small)
            ok = all(e <= TOL[dtype] for path in errs.values() for e in path.values())
            print(json.dumps({"check": str(dtype), "channels_last": channels_last, "ok": ok, "errors": errs}))
    shapes = [(2, 16, 9)] if args.dry_run else [(32, 256, 56), (32, 256, 28)]
    with fl.use_backend("auto"):
        for nb, c, hw in shapes:
            res = timing(device, torch.bfloat16, nb, c, hw, 8, args.dry_run)
            print(json.dumps({"shape": [nb, c, hw, hw], "r": 8, "dtype": "bf16", **res}), flush=True)


if __name__ == "__main__":
    main()
