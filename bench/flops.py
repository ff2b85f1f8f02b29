"""FLOPs of one VLM training step, split into vision tower / connector / LM, and what a measured rate achieves.

Counting uses `torch.utils.flop_counter.FlopCounterMode` (torch's own counter: matmuls, convolutions and attention,
forward and backward, attributed to the module that ran them; elementwise ops, norms and softmax are not counted,
as usual for MFU). Attention is counted without a causal discount. "llm" is everything outside the vision tower and the
connector: the decoder, the LM head and the loss (TRL's fused LM head calls the head's weight directly, outside the
`lm_head` module, so it is only reachable as "the rest").

Two numbers matter and are kept apart:
- *useful* FLOPs: the model's forward+backward on each sample alone, unpadded (the MFU convention: padding,
  recomputation and other waste are not work). Both sides of a comparison get the same useful FLOPs per sample, so
  their achieved GFLOP/s differ exactly as their samples/s do.
- *executed* FLOPs of one real padded step of each side: what the hardware was asked to do, waste included.
"""

from __future__ import annotations

from typing import Callable

import torch

# Dense bf16 peak of one H100 SXM (NVIDIA datasheet, without sparsity): the MFU denominator when CUDA is present.
H100_BF16_DENSE_FLOPS = 989e12


def _attention_fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # Q·Kᵀ and P·V over the query heads (a grouped-query key/value is shared by several of them), no causal discount.
    b, h, s_q, d = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v


def _attention_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q: twice the forward matmuls.
    return 2 * _attention_fwd(query_shape, key_shape, value_shape)


def _addmm_inplace(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    m, k = a_shape
    return 2 * m * k * b_shape[1]


def _missing_formulas() -> dict:
    """Ops torch's counter does not know and would silently count as 0 FLOPs: on CPU, SDPA runs
    `_scaled_dot_product_flash_attention_for_cpu(_backward)` (only the CUDA kernels are registered), and TRL's fused
    LM head accumulates its backward GEMMs with the in-place `addmm_` (only `addmm` is registered)."""
    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: _attention_fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_bwd,
            aten.addmm_: _addmm_inplace}


def step_flops(fn: Callable[[], None], root: torch.nn.Module, parts: dict[str, torch.nn.Module]) -> dict[str, int]:
    """Run `fn` (a forward+backward) once under the counter; FLOPs per part of `root` plus "llm" (the rest) and
    "total". `parts` maps a label (vision, connector) to a submodule of `root`."""
    from torch.utils.flop_counter import FlopCounterMode

    names = {mod: name for name, mod in root.named_modules()}
    prefix = type(root).__name__
    with FlopCounterMode(display=False, depth=None, custom_mapping=_missing_formulas()) as counter:
        fn()
    counts = counter.get_flop_counts()
    total = int(counter.get_total_flops())
    out = {label: int(sum(counts.get(f"{prefix}.{names[mod]}", {}).values())) for label, mod in parts.items()}
    out["llm"] = total - sum(out.values())
    out["total"] = total
    return out


def mean_flops(per_item: list[dict[str, int]]) -> dict[str, float]:
    keys = per_item[0].keys()
    return {k: sum(d[k] for d in per_item) / len(per_item) for k in keys}


def length_model(points: list[tuple[int, float]]) -> dict:
    """FLOPs of one sample as a function of its length, a + b·len + c·len²: exact for one image per sample (matmuls
    grow linearly with length, attention quadratically, the vision tower not at all). Fitted through the points;
    `max_rel_error` says how exactly it reproduces them (more than 3 points make that a check)."""
    import numpy as np

    lens, fl = np.array([p[0] for p in points], dtype=float), np.array([p[1] for p in points], dtype=float)
    c, b, a = np.polyfit(lens, fl, 2)
    err = float(np.max(np.abs((a + b * lens + c * lens**2) - fl) / fl))
    return {"a": float(a), "b": float(b), "c": float(c), "max_rel_error": err}


def flops_at(model: dict, length: float) -> float:
    return model["a"] + model["b"] * length + model["c"] * length**2


def achieved(flops_per_s: float) -> dict[str, float | None]:
    """GFLOP/s reached; MFU against the H100 bf16 dense peak only when CUDA is present (on a CPU that ratio would
    mean nothing)."""
    return {"gflops_per_s": flops_per_s / 1e9,
            "mfu_h100_bf16": flops_per_s / H100_BF16_DENSE_FLOPS if torch.cuda.is_available() else None}


def shares(flops: dict[str, float]) -> dict[str, float]:
    """Each part's share of the total (vision/connector/llm)."""
    return {k: v / flops["total"] for k, v in flops.items() if k != "total"}
