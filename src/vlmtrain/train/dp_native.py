"""DP-SGD for native transformers VLMs: which families' trainable parts give per-sample gradients, and how the
connector's per-image rows become per-record rows.

Opacus' `GradSampleModule` takes dim 0 of each hooked layer's input as the sample. In the LM that holds (LoRA
layers see `[b, s, d]`), but a native connector sees images, tiles or patches concatenated over the batch:

- Qwen2-VL / Qwen2.5-VL / Qwen3-VL merger: `ln_q` (an RMSNorm, no registered sampler → Opacus' functorch sampler)
  sees `[Σ patches, d]`, its MLP (registered Linear sampler) `[Σ merged tokens, 4d]`;
- Gemma 3 projector (RMSNorm + the bare `mm_input_projection_weight` matmul; one functorch sampler over the whole
  module, since it holds a parameter directly): `[images, patches, d]`;
- Idefics3 / SmolVLM connector (pixel shuffle + Linear): `[tiles, tokens, 4d]`; LLaVA-1.5 MLP: `[images, ...]`.

Each row feeds only its own image's tokens, and each image belongs to one record, so a record's gradient is the
sum of its rows' gradients (the loss is Σ_i loss_i). The rows of a layer are proportional to the image tokens they
become (patches = 4 × merged tokens; one Gemma image = `mm_tokens_per_image` tokens; one Idefics3 tile =
`image_seq_len` tokens) and come in batch order, so record i owns the next `rows × tokens_i / Σ tokens` rows.
Summing rows by record is an `index_add`; it is written here because Opacus has no notion of several layer rows
per sample. `tests/test_native_dp.py` checks the result against gradients computed one record at a time.

LLaVA-NeXT / OneVision are refused when the connector trains: `image_newline` is a bare parameter used outside any
layer (Opacus hooks layers) and their unpadding drops a varying share of each tile's features, so rows are not
proportional to tokens. Their LoRA-only DP stages work.
"""

from __future__ import annotations

import torch

from vlmtrain.errors import VlmtrainError

# Families whose connector rows were checked against one-record-at-a-time gradients (tests/test_native_dp.py).
CONNECTOR_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "idefics3", "smolvlm", "llava")


def native_dp_refusals(stage, model) -> list[str]:
    """One line per reason this native model cannot train the stage under DP-SGD (empty when it can)."""
    if stage.privacy is None or not stage.train.connector:
        return []
    bare = [n for n, p in model.connector.named_parameters() if p.requires_grad and "." not in n]
    if bare:
        return [f"privacy: {model.model_type}'s connector parameter `{bare[0]}` is a bare parameter that Opacus "
                "cannot give per-sample gradients for; train connector: false (LoRA only) under DP-SGD"]
    if model.model_type not in CONNECTOR_FAMILIES:
        return [f"privacy: per-sample connector gradients are verified for {', '.join(CONNECTOR_FAMILIES)}, not "
                f"{model.model_type}; train connector: false (LoRA only) under DP-SGD"]
    return []


def image_tokens_per_record(batch: dict, image_token_id: int) -> torch.Tensor:
    """`[b]`: image tokens in each record's `input_ids`."""
    return (batch["input_ids"] == image_token_id).sum(dim=1)


def rows_to_records(rows: int, tokens: torch.Tensor, where: str) -> torch.Tensor:
    """`[rows]`: the record each of a layer's `rows` input rows belongs to, from `tokens` `[b]` (module doc)."""
    total = int(tokens.sum())
    share = tokens * rows
    if total == 0 or bool((share % total).any()):
        raise VlmtrainError(f"privacy: {where} has {rows} input rows for {total} image tokens "
                            f"({tokens.tolist()} per record); its rows cannot be assigned to records, so "
                            "per-record gradients are not available (train connector: false under DP-SGD)")
    return torch.repeat_interleave(torch.arange(len(tokens), device=tokens.device), share // total)


def fold_connector_grad_samples(model, batch: dict) -> None:
    """Turn each trainable connector parameter's `grad_sample` `[rows, *shape]` into `[b, *shape]` (sum of each
    record's rows; zeros for records without images, or for every record when the batch had no image)."""
    b = batch["input_ids"].shape[0]
    tokens = image_tokens_per_record(batch, model.image_token_id)
    for name, p in model.connector.named_parameters():
        if not p.requires_grad:
            continue
        rows = getattr(p, "grad_sample", None)
        if rows is None:  # no image in the batch: the connector did not run
            p.grad_sample = torch.zeros((b, *p.shape), dtype=p.dtype, device=p.device)
            continue
        if isinstance(rows, list):
            raise VlmtrainError("privacy: per-sample gradients were accumulated over several backward passes")
        index = rows_to_records(rows.shape[0], tokens.to(rows.device), f"connector.{name}")
        p.grad_sample = rows.new_zeros((b, *p.shape)).index_add_(0, index, rows)
