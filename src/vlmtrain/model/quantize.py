"""QLoRA's 4-bit base: the LLM's Linear layers (all but the LM head) as bitsandbytes NF4 with double quantisation,
QLoRA's defaults (Dettmers et al. 2023) and what `vlmtrain plan` counts (`NF4_BYTES_PER_PARAM`).

bitsandbytes quantises on CPU and CUDA alike (its CPU backend since 0.46), so the same code path runs in the tests
here and on a 24 GB GPU. Adapters go on top through PEFT, which wraps `bnb.nn.Linear4bit` in its own
`lora.bnb.Linear4bit`. The stage's output model is full precision: `dequantize_` turns each 4-bit layer back into
an `nn.Linear` holding the dequantised weights — the base the adapters were trained against — before the adapters
are merged, so the merged model equals the trained (quantised base + adapters) model up to float rounding.

One bitsandbytes path is switched off, on purpose. On a CPU with AVX512-BF16 (bitsandbytes 0.50.2,
`nn.Linear4bit.forward`), a layer that runs in eval mode on an input without grad rewrites its own weight, in
place, into a CPU-tiled layout (`functional._convert_weight_packed_for_cpu`: nibbles regrouped in 32-row blocks,
absmax de-nested and rounded to bf16) and from then on, in train mode too, computes through a fused kernel
(`gemv_4bit` → `gemm_4bit_forward` from the `kernels` package, else `gemv_4bit_inference_cpu_nf4_bf16`) that rounds
input, scales and output to bf16 whatever `compute_dtype` says. Measured on one 128→64 layer: 5.6e-3 from
`dequantize_4bit(W) @ x` per layer (logits of a tiny model 1.04 apart), and `dequantize_4bit` of the rewritten
weight is 0.18 off the real one, since it does not know the layout: the merged export would not be the trained
model. An eval pass before training is enough to trigger it. With `support_avx512bf16_for_cpu = False` every
forward (train or eval, any CPU, CUDA unchanged) is `linear(x, dequantize_4bit(W).to(compute_dtype))`, exactly
what `dequantize_` and the merge assume.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmtrain.errors import ConfigError


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency; kept for trimmed installs
        raise ConfigError("lora.quantize: 4-bit QLoRA needs bitsandbytes (pip install bitsandbytes)") from e
    return bnb


def quantize_targets(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name under `model.llm`, layer) of what QLoRA quantises: every `nn.Linear` of the LLM except the LM head.
    Parameters outside linear layers (embeddings, norms, fused 3-D expert tensors) keep their precision."""
    head = model.llm.get_output_embeddings()
    return [(n, m) for n, m in model.llm.named_modules() if type(m) is nn.Linear and m is not head]


def quantize_llm_(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every `nn.Linear` of `model.llm` except the LM head by an NF4 `Linear4bit` (frozen) computing in
    `compute_dtype`; returns the number of layers quantised."""
    bnb = _bnb()
    targets = quantize_targets(model)
    for name, lin in targets:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        q = q.to(lin.weight.device)  # bitsandbytes quantises on the move to a real device
        q.support_avx512bf16_for_cpu = False  # keep the dequantise-then-linear forward (module docstring)
        parent, _, child = name.rpartition(".")
        setattr(model.llm.get_submodule(parent) if parent else model.llm, child, q)
    return len(targets)


def dequantize_(model: nn.Module) -> int:
    """Every 4-bit layer (also as a LoRA layer's base) → `nn.Linear` with its dequantised weights; returns the
    number of layers converted."""
    bnb = _bnb()
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    for name, q in found:
        if getattr(q.weight.quant_state, "packing_format_for_cpu", False):
            # a layer not made by quantize_llm_ that ran bitsandbytes' AVX512-BF16 path (module docstring): undo
            # the CPU tiling first, as bitsandbytes itself does before saving or moving the layer
            q.weight.data, q.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
                q.weight.data, q.weight.quant_state)
        w = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=w.device)
        lin.weight = nn.Parameter(w, requires_grad=False)
        if q.bias is not None:
            lin.bias = nn.Parameter(q.bias.data.float(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    return len(found)
