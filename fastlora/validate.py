"""Accuracy checks of fastlora's ops against a float64 evaluation of ``fastlora.reference``.

``fastlora validate`` and the benchmarks' correctness gate both run through :func:`check_case`. A case is
one op at one shape, dtype and dropout probability; the check runs the forward and the backward once with
fresh random inputs (never zeros) and compares Y and every gradient (dX, dA, dB) with the reference, using
the tolerance table of ``fastlora._tolerance``.

Dropout: the op draws its mask from a seed and never stores it, so the check recovers the mask the op drew.
For every op here the LoRA branch is linear in its (masked) input, so

    dX = dX_base + m * g,   g = d(LoRA branch)/d(its input), evaluated in float64 without the mask.

A probe call with the same seed (hence the same mask) and positive lora_A, lora_B and dY makes g positive and
large against dX_base, so m = (dX - dX_base) / g is read off cleanly and snapped to {0, 1/(1-p)}. The real
call is then compared with the reference evaluated with that mask; the mask itself must take only those two
values and keep a fraction 1-p of the elements (within six standard deviations).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastlora import reference
from fastlora._tolerance import DTYPE_IDS, TOLERANCE, rel_err
from fastlora.kernels.geometry import output_size

# Also LAYERS and OPS, read from the layer-kind registry (see __getattr__ below).
__all__ = [
    "Case",
    "LinearCase",
    "Linear4bitCase",
    "EmbeddingCase",
    "Conv2dCase",
    "Shape",
    "parse_shape",
    "parse_dtype",
    "supported_dtypes",
    "functional_runner",
    "check_case",
    "default_grid",
]

_DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}

# The dropout probability the checks use when dropout is on.
CHECK_DROPOUT = 0.1
# The scaling the checks pass (not a power of two, so a dropped or doubled factor shows).
CHECK_SCALING = 1.7


def parse_dtype(name: str) -> torch.dtype:
    """'bf16' / 'bfloat16' / 'fp16' / 'float16' / 'half' / 'fp32' / 'float32' -> the torch dtype."""
    key = name.strip().lower().replace("torch.", "")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected one of bf16, fp16, fp32")
    return _DTYPE_NAMES[key]


def supported_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """The float dtypes fastlora runs on this device (bfloat16 needs compute capability 8.0 on CUDA)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return (torch.bfloat16, torch.float16, torch.float32)
        return (torch.float16, torch.float32)
    return (torch.bfloat16, torch.float16, torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One problem size of a layer; ``dims`` lists every dimension, optional ones with their defaults filled in."""

    layer: str
    dims: tuple[tuple[str, int], ...]

    def __getitem__(self, key: str) -> int:
        return dict(self.dims)[key]

    @property
    def label(self) -> str:
        spec = _cases()[self.layer]
        parts = [f"{k}{v}" for k, v in self.dims if k in spec.required or spec.optional.get(k) != v]
        return "-".join(parts)

    def as_dict(self) -> dict:
        return dict(self.dims)


def _make_shape(layer: str, values: dict) -> Shape:
    spec = _cases()[layer]
    missing = [k for k in spec.required if k not in values]
    unknown = [k for k in values if k not in spec.required and k not in spec.optional]
    if unknown:
        raise ValueError(f"{layer} shapes have no dimension {', '.join(unknown)}; expected {spec.shape_help}")
    if missing:
        raise ValueError(f"{layer} shape is missing {', '.join(missing)}; expected {spec.shape_help}")
    full = {k: values[k] for k in spec.required}
    full.update({k: values.get(k, default) for k, default in spec.optional.items()})
    spec.check_dims(full)
    return Shape(layer, tuple(full.items()))


def parse_shape(text: str, layer: str | None = None) -> Shape:
    """Parse 'linear:37x75x51x5', 'linear:M=37,K=75,N=51,r=5' or, with ``layer`` given, '37x75x51x5'.

    Raises ValueError with the expected format on anything else.
    """
    body = text.strip()
    if ":" in body:
        name, body = body.split(":", 1)
        name = name.strip().lower()
        if name not in _cases():
            raise ValueError(f"unknown layer {name!r} in shape {text!r}; expected one of {', '.join(_cases())}")
        if layer is not None and name != layer:
            raise ValueError(f"shape {text!r} is for {name}, not {layer}")
        layer = name
    if body.strip().lower() in _cases() or (layer is not None and not body.strip()):
        named = layer if layer is not None and not body.strip() else body.strip().lower()
        raise ValueError(f"shape {text!r} is missing its dimensions; expected {_cases()[named].shape_help}")
    if layer is None:
        raise ValueError(f"shape {text!r} does not name its layer; write it as LAYER:DIMS, e.g. linear:37x75x51x5")
    spec = _cases()[layer]
    values: dict[str, int] = {}
    if "=" in body:
        for item in body.split(","):
            m = re.fullmatch(r"\s*(\w+)\s*=\s*(-?\d+)\s*", item)
            if not m:
                raise ValueError(f"malformed shape {text!r}: {item!r} is not KEY=INT; expected {spec.shape_help}")
            values[m.group(1)] = int(m.group(2))
    else:
        items = [s for s in re.split(r"[x,\s]+", body.strip()) if s]
        if not items or not all(re.fullmatch(r"\d+", s) for s in items):
            raise ValueError(f"malformed shape {text!r}; expected {spec.shape_help}")
        if len(items) != len(spec.required):
            raise ValueError(f"{layer} shape {text!r} needs {len(spec.required)} numbers; expected {spec.shape_help}")
        values = dict(zip(spec.required, map(int, items), strict=True))
    return _make_shape(layer, values)


# ----------------------------------------------------------------------------------------------------------
# Ops: inputs, float64 reference, the fastlora call, flop and byte counts
# ----------------------------------------------------------------------------------------------------------


def _randn(shape, gen, device, scale=1.0):
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(scale)


def _positive(shape, gen, device, scale=1.0):
    return torch.rand(shape, generator=gen, device=device, dtype=torch.float32).add_(0.5).mul_(scale)


class Case:
    """What the checks and the benchmarks need to know about one layer type."""

    name: str
    required: tuple[str, ...]
    optional: dict[str, int]
    shape_help: str
    has_dropout: bool
    grads: tuple[str, ...]

    def check_dims(self, d: dict):
        for k, v in d.items():
            if k in self.required and v < 1:
                raise ValueError(f"{self.name} dimension {k} must be at least 1, got {v}")

    def make(self, shape: Shape, dtype, device, seed: int) -> dict:
        """Random inputs (never zeros) rounded to dtype: x (or idx), weight, bias, lora_A, lora_B, dy, scaling."""
        raise NotImplementedError

    def activations(self, shape: Shape, dtype, device, seed: int) -> tuple:
        """A fresh random (x or idx, dy) pair, as ``make`` draws them."""
        raise NotImplementedError

    def probe(self, shape: Shape, dtype, device, seed: int) -> tuple:
        """Positive (lora_A, lora_B, dy) for recovering a dropout mask."""
        raise NotImplementedError

    def base(self, t: dict, x):
        raise NotImplementedError

    def lora(self, t: dict, x_lora):
        raise NotImplementedError

    def reference(self, t: dict, x, mask=None):
        raise NotImplementedError

    def call(self, t: dict, x, lora_A, lora_B, dropout_p: float):
        raise NotImplementedError


class LinearCase(Case):
    """The linear op; with ``dora=1`` DoRA (a random magnitude g), with ``lbias=1`` PEFT's lora_bias."""

    name = "linear"
    required = ("M", "K", "N", "r")
    optional = {"bias": 1, "dora": 0, "lbias": 0}
    shape_help = "linear:MxKxNxr or linear:M=..,K=..,N=..,r=..[,bias=0|1][,dora=0|1 or lbias=0|1]"
    has_dropout = True
    grads = ("dx", "dA", "dB")

    def check_dims(self, d):
        super().check_dims(d)
        if d.get("dora") and d.get("lbias"):  # subclasses (linear4bit) may take neither option
            raise ValueError("linear shapes take dora=1 or lbias=1, not both (PEFT refuses the pair)")

    def make(self, shape, dtype, device, seed):
        M, K, N, r = (shape[k] for k in self.required)
        gen = torch.Generator(device=device).manual_seed(seed)
        t = {
            "weight": _randn((N, K), gen, device, 1 / math.sqrt(K)),
            "bias": _randn((N,), gen, device, 0.5) if shape["bias"] else None,
            "lora_A": _randn((r, K), gen, device, 1 / math.sqrt(K)),
            "lora_B": _randn((N, r), gen, device, 1 / math.sqrt(r)),
        }
        options = shape.as_dict()
        t["magnitude"] = _positive((N,), gen, device) if options.get("dora") else None
        t["lora_bias"] = _randn((N,), gen, device) if options.get("lbias") else None
        t = {k: (v.to(dtype) if v is not None else None) for k, v in t.items()}
        t["x"], t["dy"] = self.activations(shape, dtype, device, seed + 2)
        t["scaling"] = CHECK_SCALING
        return t

    def activations(self, shape, dtype, device, seed):
        gen = torch.Generator(device=device).manual_seed(seed)
        x = _randn((shape["M"], shape["K"]), gen, device).to(dtype)
        return x, _randn((shape["M"], shape["N"]), gen, device).to(dtype)

    def probe(self, shape, dtype, device, seed):
        M, K, N, r = (shape[k] for k in self.required)
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        a = _positive((r, K), gen, device, 1 / r)
        b = _positive((N, r), gen, device)
        dy = _positive((M, N), gen, device, 1 / N)
        return a.to(dtype), b.to(dtype), dy.to(dtype)

    def base(self, t, x):
        return F.linear(x, t["weight"], t["bias"])

    def lora(self, t, x_lora):
        """The part of Y that sees the dropped input (DoRA with dropout: (c - 1) x_d W^T + c s S B^T)."""
        lora = t["scaling"] * F.linear(F.linear(x_lora, t["lora_A"]), t["lora_B"])
        if t["magnitude"] is None:
            return lora
        c = t["magnitude"] / reference.dora_weight_norm_ref(t["weight"], t["lora_A"], t["lora_B"], t["scaling"])
        return (c - 1) * F.linear(x_lora, t["weight"]) + c * lora

    def reference(self, t, x, mask=None):
        w, b, a, bb, s = t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["scaling"]
        if t["magnitude"] is not None:
            return reference.dora_linear_ref(x, w, b, a, bb, t["magnitude"], s, mask)
        if t["lora_bias"] is not None:
            return reference.lora_linear_bias_ref(x, w, b, a, bb, t["lora_bias"], s, mask)
        return reference.lora_linear_ref(x, w, b, a, bb, s, mask)

    def call(self, t, x, lora_A, lora_B, dropout_p):
        import fastlora
        from fastlora.ops.dora import lora_linear_dora

        if t["magnitude"] is not None:
            return lora_linear_dora(
                x, t["weight"], t["bias"], lora_A, lora_B, t["magnitude"], t["scaling"], dropout_p, True
            )
        return fastlora.lora_linear(
            x, t["weight"], t["bias"], lora_A, lora_B, t["scaling"], dropout_p, True, lora_bias=t["lora_bias"]
        )


class Linear4bitCase(LinearCase):
    """LinearCase over a bitsandbytes 4-bit W: the weight is quantized (NF4, or FP4 with fp4=1; double quantized
    with nested=1; blocks of ``block``), and the reference uses bitsandbytes' own dequantization of it."""

    name = "linear4bit"
    optional = {"bias": 1, "fp4": 0, "nested": 1, "block": 64}
    shape_help = "linear4bit:MxKxNxr or linear4bit:M=..,K=..,N=..,r=..[,bias=0|1,fp4=0|1,nested=0|1,block=64|128|256]"

    def check_dims(self, d):
        super().check_dims(d)
        for k in ("bias", "fp4", "nested"):
            if d[k] not in (0, 1):
                raise ValueError(f"linear4bit option {k} must be 0 or 1, got {d[k]}")
        if d["block"] not in (64, 128, 256):
            raise ValueError(f"linear4bit block must be 64, 128 or 256, got {d['block']}")

    def make(self, shape, dtype, device, seed):
        import bitsandbytes.functional as bnbf

        from fastlora.reference_4bit import dequantize_4bit_ref

        t = super().make(shape, dtype, device, seed)
        t["packed"], t["quant_state"] = bnbf.quantize_4bit(
            t["weight"], blocksize=shape["block"], quant_type="fp4" if shape["fp4"] else "nf4",
            compress_statistics=bool(shape["nested"]),
        )  # fmt: skip
        t["weight"] = dequantize_4bit_ref(t["packed"], t["quant_state"])  # what the reference multiplies by
        return t

    def call(self, t, x, lora_A, lora_B, dropout_p):
        from fastlora.ops.linear4bit import lora_linear_4bit

        return lora_linear_4bit(x, t["packed"], t["quant_state"], t["bias"], lora_A, lora_B, t["scaling"], dropout_p)


class EmbeddingCase(Case):
    name = "embedding"
    required = ("M", "V", "D", "r")
    optional = {"pad": -1}
    shape_help = "embedding:MxVxDxr or embedding:M=..,V=..,D=..,r=..[,pad=INDEX]"
    has_dropout = False
    grads = ("dA", "dB")

    def check_dims(self, d):
        super().check_dims(d)
        if not -1 <= d["pad"] < d["V"]:
            raise ValueError(f"embedding pad must be -1 (none) or an index below V={d['V']}, got {d['pad']}")

    def make(self, shape, dtype, device, seed):
        M, V, D, r = (shape[k] for k in self.required)
        gen = torch.Generator(device=device).manual_seed(seed)
        t = {
            "weight": _randn((V, D), gen, device).to(dtype),
            "lora_A": _randn((r, V), gen, device).to(dtype),
            "lora_B": _randn((D, r), gen, device, 1 / math.sqrt(r)).to(dtype),
            "scaling": CHECK_SCALING,
            "padding_idx": shape["pad"] if shape["pad"] >= 0 else None,
        }
        t["x"], t["dy"] = self.activations(shape, dtype, device, seed + 2)
        return t

    def activations(self, shape, dtype, device, seed):
        """idx [M] with repeats (and every 7th the padding index when there is one), dy [M, D]."""
        gen = torch.Generator(device=device).manual_seed(seed)
        idx = torch.randint(0, shape["V"], (shape["M"],), generator=gen, device=device)
        if shape["pad"] >= 0 and shape["M"] > 1:
            idx[::7] = shape["pad"]
        return idx, _randn((shape["M"], shape["D"]), gen, device).to(dtype)

    def base(self, t, x):
        return F.embedding(x, t["weight"], t["padding_idx"])

    def lora(self, t, x_lora):
        raise TypeError("embedding has no dropout, so no LoRA-branch input gradient")

    def reference(self, t, x, mask=None):
        return reference.lora_embedding_ref(x, t["weight"], t["lora_A"], t["lora_B"], t["scaling"], t["padding_idx"])

    def call(self, t, x, lora_A, lora_B, dropout_p):
        import fastlora

        return fastlora.lora_embedding(x, t["weight"], lora_A, lora_B, t["scaling"], padding_idx=t["padding_idx"])


class Conv2dCase(Case):
    name = "conv2d"
    required = ("N", "C", "H", "W", "O", "k", "r")
    optional = {"stride": 1, "pad": -1, "dil": 1, "bias": 1, "cl": 0}
    shape_help = (
        "conv2d:NxCxHxWxOxkxr or conv2d:N=..,C=..,H=..,W=..,O=..,k=..,r=..[,stride=..,pad=..,dil=..,bias=0|1,cl=0|1] "
        "(pad -1: same-size padding k//2*dil; cl=1: channels_last)"
    )
    has_dropout = True
    grads = ("dx", "dA", "dB")

    def check_dims(self, d):
        super().check_dims(d)
        for k in ("stride", "dil"):
            if d[k] < 1:
                raise ValueError(f"conv2d {k} must be at least 1, got {d[k]}")
        if d["pad"] < -1:
            raise ValueError(f"conv2d pad must be >= 0 (or -1 for k//2*dil), got {d['pad']}")
        pad = self.padding(d)
        for side in ("H", "W"):
            if d[side] + 2 * pad - d["dil"] * (d["k"] - 1) < 1:
                raise ValueError(f"conv2d {side}={d[side]} is too small for k={d['k']}, pad={pad}, dil={d['dil']}")

    @staticmethod
    def padding(d) -> int:
        return d["pad"] if d["pad"] >= 0 else d["k"] // 2 * d["dil"]

    def out_hw(self, shape):
        d, pad = shape.as_dict(), self.padding(shape.as_dict())
        return output_size(d["H"], d["W"], (d["k"], d["k"]), (d["stride"],) * 2, (pad,) * 4, (d["dil"],) * 2)

    def _fmt(self, shape, t):
        return t.contiguous(memory_format=torch.channels_last) if shape["cl"] else t

    def make(self, shape, dtype, device, seed):
        Nb, C, H, W, O, k, r = (shape[key] for key in self.required)
        fan_in = C * k * k
        gen = torch.Generator(device=device).manual_seed(seed)
        t = {
            "weight": self._fmt(shape, _randn((O, C, k, k), gen, device, 1 / math.sqrt(fan_in))),
            "bias": _randn((O,), gen, device, 0.5) if shape["bias"] else None,
            "lora_A": _randn((r, C, k, k), gen, device, 1 / math.sqrt(fan_in)),
            "lora_B": _randn((O, r, 1, 1), gen, device, 1 / math.sqrt(r)),
        }
        t = {key: (v.to(dtype) if v is not None else None) for key, v in t.items()}
        t["x"], t["dy"] = self.activations(shape, dtype, device, seed + 2)
        t.update(
            scaling=CHECK_SCALING, stride=shape["stride"], padding=self.padding(shape.as_dict()), dilation=shape["dil"]
        )
        return t

    def activations(self, shape, dtype, device, seed):
        ho, wo = self.out_hw(shape)
        gen = torch.Generator(device=device).manual_seed(seed)
        x = self._fmt(shape, _randn((shape["N"], shape["C"], shape["H"], shape["W"]), gen, device).to(dtype))
        return x, self._fmt(shape, _randn((shape["N"], shape["O"], ho, wo), gen, device).to(dtype))

    def probe(self, shape, dtype, device, seed):
        Nb, C, H, W, O, k, r = (shape[key] for key in self.required)
        ho, wo = self.out_hw(shape)
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        a = _positive((r, C, k, k), gen, device, 1 / (r * k * k))
        b = _positive((O, r, 1, 1), gen, device)
        dy = self._fmt(shape, _positive((Nb, O, ho, wo), gen, device, 1 / O))
        return a.to(dtype), b.to(dtype), dy.to(dtype)

    def base(self, t, x):
        return F.conv2d(x, t["weight"], t["bias"], t["stride"], t["padding"], t["dilation"])

    def lora(self, t, x_lora):
        down = F.conv2d(x_lora, t["lora_A"], None, t["stride"], t["padding"], t["dilation"])
        return t["scaling"] * F.conv2d(down, t["lora_B"])

    def reference(self, t, x, mask=None):
        return reference.lora_conv2d_ref(
            x, t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["scaling"], t["stride"], t["padding"],
            t["dilation"], 1, mask,
        )  # fmt: skip

    def call(self, t, x, lora_A, lora_B, dropout_p):
        import fastlora

        return fastlora.lora_conv2d(
            x, t["weight"], t["bias"], lora_A, lora_B, t["scaling"], stride=t["stride"], padding=t["padding"],
            dilation=t["dilation"], groups=1, dropout_p=dropout_p, training=True,
        )  # fmt: skip


def _cases() -> dict[str, Case]:
    """{kind name: its case}, for every registered layer kind that has one (read from fastlora.kinds)."""
    from fastlora.kinds import kinds

    return {kind.name: kind.validate_case for kind in kinds() if kind.validate_case is not None}


def __getattr__(name: str):
    # OPS ({layer: case}) and LAYERS (their names) come from the layer-kind registry, which imports this module
    if name == "OPS":
        return _cases()
    if name == "LAYERS":
        return tuple(_cases())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_grid(layer: str, device: torch.device) -> list[Shape]:
    """The shapes ``fastlora validate`` checks: small odd ones under the interpreter, real ones on a GPU."""
    if device.type == "cuda":
        grid = {
            "linear": [
                "777x1000x3000x5",
                "M=2048,K=4096,N=4096,r=16",
                "M=2048,K=4096,N=4096,r=16,dora=1",
                "M=777,K=1000,N=3000,r=5,lbias=1",
            ],
            "linear4bit": ["M=16,K=4096,N=4096,r=16", "M=777,K=1000,N=3000,r=5,fp4=1,nested=0"],
            "embedding": ["M=4099,V=32000,D=1024,r=16,pad=0"],
            "conv2d": ["N=8,C=64,H=28,W=28,O=64,k=3,r=8,cl=1", "N=4,C=96,H=17,W=15,O=80,k=3,r=5,stride=2,bias=0"],
        }[layer]
    else:
        grid = {
            "linear": [
                "37x75x51x5",
                "M=20,K=33,N=70,r=16,bias=0",
                "M=37,K=75,N=51,r=5,dora=1",
                "M=20,K=33,N=70,r=16,bias=0,lbias=1",
            ],
            "linear4bit": ["37x75x51x5", "M=20,K=64,N=70,r=16,bias=0,fp4=1,nested=0,block=128"],
            "embedding": ["M=45,V=61,D=37,r=5,pad=3"],
            "conv2d": ["2x5x9x7x6x3x3", "N=2,C=4,H=8,W=8,O=5,k=3,r=4,stride=2,pad=1,bias=0,cl=1"],
        }[layer]
    return [parse_shape(s, layer) for s in grid]


# ----------------------------------------------------------------------------------------------------------
# Running a case
# ----------------------------------------------------------------------------------------------------------

# run(x, lora_A, lora_B, dy) -> {"y": Y, "dx": dX or None, "dA": dA, "dB": dB}, forward and backward once.
Runner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], dict]


def functional_runner(op: Case, t: dict, dropout_p: float) -> Runner:
    """A runner over fastlora's functional op for the base tensors in t."""

    def run(x, lora_A, lora_B, dy):
        x = x.detach().clone().requires_grad_(x.is_floating_point())
        a = lora_A.detach().clone().requires_grad_(True)
        b = lora_B.detach().clone().requires_grad_(True)
        y = op.call(t, x, a, b, dropout_p)
        y.backward(dy)
        return {"y": y.detach(), "dx": x.grad if x.is_floating_point() else None, "dA": a.grad, "dB": b.grad}

    return run


def _float64(t: dict) -> dict:
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in t.items()}


def _reference(op: Case, t: dict, mask) -> dict:
    t64 = _float64(t)
    a = t64["lora_A"].detach().requires_grad_(True)
    b = t64["lora_B"].detach().requires_grad_(True)
    x = t64["x"].detach()
    if x.is_floating_point():
        x.requires_grad_(True)
    y = op.reference({**t64, "lora_A": a, "lora_B": b}, x, mask)
    y.backward(t64["dy"])
    return {"y": y.detach(), "dx": x.grad, "dA": a.grad, "dB": b.grad}


_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-9}


def _recover_mask(op: Case, t: dict, shape: Shape, run: Runner, p: float, seed: int):
    """The dropout mask a runner draws for ``seed`` (see the module docstring); returns (mask, rows)."""
    a, b, dy = op.probe(shape, t["x"].dtype, t["x"].device, seed)
    torch.manual_seed(seed)
    out = run(t["x"], a, b, dy)
    t64 = _float64({**t, "lora_A": a, "lora_B": b})
    dy64 = dy.double()
    x64 = t64["x"].detach().requires_grad_(True)
    (g_base,) = torch.autograd.grad(op.base(t64, x64), x64, dy64)
    xl = t64["x"].detach().clone().requires_grad_(True)
    (g_lora,) = torch.autograd.grad(op.lora(t64, xl), xl, dy64)
    keep_value = 1.0 / (1.0 - p)
    if out["dx"] is None or not torch.isfinite(out["dx"]).all():
        return torch.full_like(x64, keep_value).detach(), [("mask", math.nan, 0.0, "dX of the probe is missing or NaN")]
    ratio = (out["dx"].double() - g_base) / g_lora
    live = g_lora.abs() > 1e-3 * g_lora.abs().max()
    keep = (ratio > 0.5 * keep_value) | ~live
    mask = keep.double() * keep_value
    off = torch.minimum(ratio.abs(), (ratio - keep_value).abs()) / keep_value
    # dX is rounded once to its dtype (unit roundoff u): where that rounding can move the ratio by 5% (the base
    # gradient dwarfs the LoRA one there, as DoRA's (c - 1) term can make it), the element is read, not judged
    u = _UNIT_ROUNDOFF[out["dx"].dtype]
    resolvable = 0.05 * keep_value * g_lora.abs() > 8 * u * (g_base.abs() + keep_value * g_lora.abs())
    ambiguous = (off > 0.05) & live & resolvable
    n = int(live.sum())
    rate = keep[live].double().mean().item() if n else 1.0 - p
    err = abs(rate - (1.0 - p))
    tol = 6 * math.sqrt(p * (1 - p) / max(n, 1)) + 1.0 / max(n, 1)
    note = ""
    if ambiguous.any():
        note = f"{int(ambiguous.sum())} of {n} mask values are neither 0 nor 1/(1-p)"
        err = math.inf
    return mask, [("mask", err, tol, note)]


def check_case(op: Case, shape: Shape, dtype: torch.dtype, device, dropout_p: float, run: Runner | None = None,
               seed: int = 0, t: dict | None = None) -> list[dict]:  # fmt: skip
    """Check one case; returns rows {"tensor", "rel_err", "tol", "ok", "note"}: y, then dx / dA / dB, then the mask.

    ``run`` defaults to fastlora's functional op; ``t`` to fresh inputs from ``op.make``. NaN never passes.
    """
    device = torch.device(device)
    t = t if t is not None else op.make(shape, dtype, device, seed)
    run = run if run is not None else functional_runner(op, t, dropout_p)
    tol = TOLERANCE[dtype]
    mask, rows = None, []
    if dropout_p > 0:
        mask, mask_rows = _recover_mask(op, t, shape, run, dropout_p, seed)
        rows += [{"tensor": n, "rel_err": e, "tol": tl, "ok": e <= tl, "note": note} for n, e, tl, note in mask_rows]
    torch.manual_seed(seed)
    out = run(t["x"], t["lora_A"], t["lora_B"], t["dy"])
    ref = _reference(op, t, mask)
    checked = []
    for name in ("y", *op.grads):
        got, want = out.get(name), ref[name]
        if got is None:
            checked.append({"tensor": name, "rel_err": math.nan, "tol": tol, "ok": False, "note": "not computed"})
            continue
        note = ""
        if got.shape != want.shape:
            err, note = math.nan, f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        else:
            err = rel_err(got, want)
        checked.append({"tensor": name, "rel_err": err, "tol": tol, "ok": err <= tol, "note": note})
    return checked + rows


def dtype_id(dtype: torch.dtype) -> str:
    return DTYPE_IDS[dtype]
