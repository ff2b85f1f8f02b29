"""Pad encoded samples into a batch; images are concatenated in slot order (the VLM's batch contract)."""

from __future__ import annotations

import torch

from vlmtrain.data.chat import IGNORE


def collate(samples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """samples: {"input_ids": [s_i], "labels": [s_i], "pixel_values": [n_i, c, h, w] | None} → right-padded batch.

    Returns input_ids/labels/attention_mask `[b, s_max]` and pixel_values `[sum n_i, c, h, w]` (absent if none).
    """
    s_max = max(len(x["input_ids"]) for x in samples)
    b = len(samples)
    input_ids = torch.full((b, s_max), pad_token_id, dtype=torch.long)
    labels = torch.full((b, s_max), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((b, s_max), dtype=torch.long)
    for i, x in enumerate(samples):
        n = len(x["input_ids"])
        input_ids[i, :n] = torch.as_tensor(x["input_ids"])
        labels[i, :n] = torch.as_tensor(x["labels"])
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    pix = [x["pixel_values"] for x in samples if x.get("pixel_values") is not None]
    if pix:
        batch["pixel_values"] = torch.cat(pix)
    return batch
