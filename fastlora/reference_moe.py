"""Plain-PyTorch LoRA on MoE experts, written for clarity: the specification of fastlora.ops.moe and kernels/moe.py.

The layout is PEFT's ``target_parameters`` layout (``peft.tuners.lora.ParamWrapper``), so adapters move freely:
for a 3-D expert weight of E experts mapping ``in`` features to ``out`` features,

- lora_A [r E, in], expert-major: A_e = lora_A.view(E, r, in)[e];
- lora_B [out, r E], interleaved: B_e = lora_B.view(out, r, E)[:, :, e];
- the weight is W [E, out, in] (``x W_e^T``, as Qwen3-MoE and Mixtral store it) or, for models whose experts are
  ``is_transposed`` (gpt-oss), W [E, in, out] (``x W_e``).

Rows are sorted by expert and ``offsets`` [E] holds where each expert's rows end (the cumulative row counts, as
transformers' grouped experts path computes them): expert e owns rows [offsets[e - 1], offsets[e]).
"""

from __future__ import annotations

import torch

__all__ = ["expert_factors", "lora_experts_ref", "experts_delta_weight"]


def expert_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, num_experts: int):
    """(A [E, r, in], B [E, out, r]): every expert's factors as views of PEFT's layout."""
    a = lora_A.reshape(num_experts, -1, lora_A.shape[-1])
    b = lora_B.reshape(lora_B.shape[0], -1, num_experts).permute(2, 0, 1)
    return a, b


def lora_experts_ref(x, weight, bias, lora_A, lora_B, scaling, offsets, transposed=False):
    """Y_e = X_e W_e^T + bias_e + s (X_e A_e^T) B_e^T for the rows X_e of each expert (W_e^T read as W_e when
    ``transposed``); lora_A and lora_B None: no LoRA term.

    x [S, in] sorted by expert, weight [E, out, in] or [E, in, out], bias [E, out] or None, offsets [E]."""
    num_experts = weight.shape[0]
    ends = [int(v) for v in offsets.tolist()]
    starts = [0] + ends[:-1]
    if lora_A is not None:
        a, b = expert_factors(lora_A, lora_B, num_experts)
    parts = []
    for e, (start, end) in enumerate(zip(starts, ends, strict=True)):
        xe = x[start:end]
        w = weight[e] if transposed else weight[e].t()
        ye = xe @ w
        if bias is not None:
            ye = ye + bias[e]
        if lora_A is not None:
            ye = ye + scaling * ((xe @ a[e].t()) @ b[e].t())
        parts.append(ye)
    return torch.cat(parts)


def experts_delta_weight(lora_A, lora_B, scaling, num_experts: int, transposed: bool = False):
    """The merged change to the expert weight: s B_e A_e per expert, [E, out, in] (or [E, in, out] when
    ``transposed``). Formed here for merging and for tests; the ops never form it."""
    a, b = expert_factors(lora_A, lora_B, num_experts)
    delta = scaling * (b @ a)
    return delta.transpose(1, 2) if transposed else delta
