"""Proof that kernels compute their memory offsets in 64 bits, read from the compiled Triton IR.

Three steps, usable on any kernel module:

1. ``capture_launches``: run a launcher under the Triton interpreter and record every kernel launch with its
   real arguments (the kernel, each argument's type or value, num_warps and num_stages).
2. ``compile_ttir``: compile each recorded launch ahead of time for sm_90 in a subprocess without the
   interpreter (``triton.compile`` with a ``GPUTarget``; no GPU needed) and return its TTIR. Integer arguments
   are compiled as i32, as Triton specialises them for values below 2^31, and never as the constant 1.
3. ``offsets_32bit``: walk back from every ``tt.addptr`` offset through the integer arithmetic that feeds it
   and report each 32-bit multiply of two run-time values (index * stride, row * K, pid * stride, ...): those
   are the products that can pass 2^31. A multiply by a compile-time constant (pid * BLOCK_M, k * BLOCK_K)
   stays within the tensor's dimensions and is allowed.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

_DTYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}
_OPTIONS = ("num_warps", "num_stages")


# ----------------------------------------------------------------------------------------------------------
# 1. Capture launches under the interpreter
# ----------------------------------------------------------------------------------------------------------


def _describe(value):
    if isinstance(value, torch.Tensor):
        return {"kind": "tensor", "dtype": _DTYPES[value.dtype]}
    if hasattr(value, "base") and hasattr(value, "block_shape"):  # a host-side TensorDescriptor
        return {"kind": "desc", "dtype": _DTYPES[value.base.dtype], "block": list(value.block_shape)}
    if isinstance(value, bool):
        return {"kind": "bool", "value": value}
    if isinstance(value, int):
        return {"kind": "int", "value": value}
    if isinstance(value, float):
        return {"kind": "float", "value": value}
    if value is None:
        return {"kind": "none"}
    import triton.language as tl

    if isinstance(value, tl.dtype):  # a compile-time dtype switch (e.g. the dot's operand dtype)
        return {"kind": "tl_dtype", "value": value.name}
    if isinstance(value, str):
        return {"kind": "str", "value": value}
    return {"kind": "other", "value": repr(value)}


@contextlib.contextmanager
def capture_launches():
    """Record every Triton kernel launch made inside the block (interpreter mode) as a JSON-ready dict."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        fn = self.fn
        options = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
        params = inspect.signature(fn).parameters
        call = {k: v for k, v in kwargs.items() if k in params}
        bound = inspect.signature(fn).bind_partial(*args, **call)
        launches.append(
            {
                "module": fn.__module__,
                "name": fn.__name__,
                "args": {name: _describe(value) for name, value in bound.arguments.items()},
                "options": options,
            }
        )
        return original(self, *args, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def distinct(launches):
    """One launch per kernel and compile-time specialisation."""
    seen, unique = set(), []
    for launch in launches:
        key = json.dumps(launch, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            unique.append(launch)
    return unique


# ----------------------------------------------------------------------------------------------------------
# 2. Compile ahead of time for sm_90, without the interpreter, in a subprocess
# ----------------------------------------------------------------------------------------------------------


def compile_ttir(launches, extra_path=(), arch=90):
    """TTIR text of each launch, compiled for sm_{arch}; runs in a fresh process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, extra_path), env.get("PYTHONPATH", "")])
    payload = json.dumps({"launches": launches, "arch": arch})
    run = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        input=payload,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if run.returncode != 0:
        raise RuntimeError(f"ahead-of-time compilation failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout)


def _constexpr_value(spec):
    if spec["kind"] == "tl_dtype":
        import triton.language as tl

        return tl.dtype(spec["value"])
    return spec.get("value")


def _signature_and_constants(jit_fn, args):
    signature, constexprs = {}, {}
    for param in jit_fn.params:
        spec = args.get(param.name)
        if spec is None:
            if param.default is inspect.Parameter.empty:
                raise ValueError(f"{jit_fn.__name__}: no value recorded for parameter {param.name}")
            value = param.default
            spec = _describe(value.value if hasattr(value, "value") else value)
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = _constexpr_value(spec)
        elif spec["kind"] == "tensor":
            signature[param.name] = "*" + spec["dtype"]
        elif spec["kind"] == "desc":
            signature[param.name] = f"tensordesc<{spec['dtype']}{spec['block']}>"
        elif spec["kind"] == "int":
            signature[param.name] = "i32" if -(2**31) <= spec["value"] < 2**31 else "i64"
        elif spec["kind"] == "bool":
            signature[param.name] = "i1"
        elif spec["kind"] == "float":
            signature[param.name] = "fp32"
        elif spec["kind"] == "none":
            signature[param.name] = "constexpr"
            constexprs[param.name] = None
        else:
            raise ValueError(f"{jit_fn.__name__}: cannot compile parameter {param.name} = {spec['value']}")
    return signature, constexprs


def _compile_main():
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    request = json.loads(sys.stdin.read())
    target = GPUTarget("cuda", request["arch"], 32)
    out = []
    for launch in request["launches"]:
        fn = getattr(importlib.import_module(launch["module"]), launch["name"])
        while not isinstance(fn, JITFunction):  # autotune / heuristics wrappers
            fn = fn.fn
        signature, constexprs = _signature_and_constants(fn, launch["args"])
        kernel = triton.compile(ASTSource(fn, signature, constexprs), target=target, options=launch["options"])
        out.append({"name": launch["name"], "ttir": kernel.asm["ttir"]})
    json.dump(out, sys.stdout)


# ----------------------------------------------------------------------------------------------------------
# 3. Find 32-bit products of run-time values on the way to an address
# ----------------------------------------------------------------------------------------------------------

_VALUE = re.compile(r"%[\w.$-]+")
_NOT_ADDRESS = ("tt.load", "arith.cmpi", "arith.cmpf", "tt.dot", "tt.descriptor_load")
_RUNTIME_SOURCES = ("tt.get_program_id", "tt.get_num_programs", "tt.load", "tt.descriptor_load")
_FLOAT = re.compile(r"(?:^|[<x\s])(f16|bf16|f32|f64|f8\w*)\b")
_I32 = re.compile(r"(?:tensor<(?:\d+x)*)?i32>?")


def _strip_loc(line: str) -> str:
    i = line.find(" loc(")
    return line[:i] if i >= 0 else line


def _base(name: str) -> str:
    return name.split("#")[0]


def _parse(ttir: str):
    """SSA graph of a TTIR function: {value: (op, operands, text)}, the runtime leaves, and block arguments."""
    defs, leaves, stack = {}, set(), []
    for raw in ttir.splitlines():
        if raw.strip().startswith("tt.func"):
            leaves.update(re.findall(r"(%[\w.$-]+): (?:i32|i64|i1) ", raw))
        line = _strip_loc(raw.strip())
        if line.startswith("}"):
            if stack:
                stack.pop()
            line = line[1:].strip().lstrip(")").strip()
            if not line.endswith("{"):
                continue
        lhs, _, rhs = (
            line.partition(" = ") if re.match(r"^%[\w.$-]+(:\d+)?( *, *%[\w.$-]+)* = ", line) else ("", "", line)
        )
        results = [_base(r.split(":")[0]) for r in _VALUE.findall(lhs)]
        op = rhs.split(" ", 1)[0].strip('"')
        operands = [_base(v) for v in _VALUE.findall(rhs)]
        if op == "scf.for":
            # scf.for %iv = %lb to %ub step %st iter_args(%a = %init, ...) -> (...)
            m = re.match(r"scf\.for (%[\w.$-]+) = (.*?) to (.*?) step (%[\w.$-]+)", rhs)
            induction = m.group(1)
            bounds = [_base(v) for v in _VALUE.findall(m.group(2) + " " + m.group(3) + " " + m.group(4))]
            defs[induction] = ("scf.for.iv", bounds, rhs)
            leaves.add(induction)
            iter_args = (
                re.findall(r"(%[\w.$-]+) = (%[\w.$-]+)", rhs.split("iter_args", 1)[1]) if "iter_args" in rhs else []
            )
            for arg, init in iter_args:
                defs[arg] = ("scf.for.iter_arg", [_base(init)], rhs)
            for r in results:
                defs[r] = ("scf.for", [_base(i) for _, i in iter_args], rhs)
            stack.append(("scf.for", [a for a, _ in iter_args], results))
            continue
        if op == "scf.yield" and stack:
            kind, carried, outs = stack[-1]
            for target in (*carried, *outs):
                if target in defs:
                    defs[target] = (defs[target][0], defs[target][1] + operands, defs[target][2])
            continue
        for r in results:
            defs[r] = (op, operands, rhs)
        if line.endswith("{"):
            stack.append((op, [], results))
    return defs, leaves


def _is_constant(name, defs, leaves, memo):
    if name in memo:
        return memo[name]
    memo[name] = False  # cycles (loop-carried values) are run-time
    if name in leaves or name not in defs:
        return False
    op, operands, _ = defs[name]
    if op in _RUNTIME_SOURCES or op.startswith("scf."):
        result = False
    elif op in ("arith.constant", "tt.make_range"):
        result = True
    else:
        result = all(_is_constant(o, defs, leaves, memo) for o in operands)
    memo[name] = result
    return result


def offsets_32bit(ttir: str) -> list[str]:
    """The 32-bit multiplies of two run-time values that feed a pointer offset (empty: all offsets are safe)."""
    defs, leaves = _parse(ttir)
    memo, seen, found = {}, set(), []
    work = [operands[1] for op, operands, _ in defs.values() if op == "tt.addptr" and len(operands) > 1]
    while work:
        name = work.pop()
        if name in seen or name not in defs:
            continue
        seen.add(name)
        op, operands, text = defs[name]
        result_type = text.rsplit(" : ", 1)[-1].rsplit("->", 1)[-1].strip()
        if op in _NOT_ADDRESS or _FLOAT.search(result_type):
            continue
        if op == "arith.muli" and _I32.fullmatch(result_type):
            if not any(_is_constant(o, defs, leaves, memo) for o in operands):
                found.append(f"{name} = {text}")
        work.extend(operands)
    return found


if __name__ == "__main__":
    _compile_main()
