"""Training objectives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmtrain.data.chat import IGNORE


def next_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of supervised tokens.

    logits `[b, s, v]`, labels `[b, s]` (IGNORE where unsupervised). Returning the *sum* lets the caller divide by
    the supervised-token count of the whole accumulated (and all-reduced) batch, not average per micro-batch.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    loss_sum = F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=IGNORE, reduction="sum")
    return loss_sum, (shift_labels != IGNORE).sum()


def prediction_mask(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose logits predict a supervised next token: `mask [b, s]` (True at t when labels[t+1] is
    supervised) and the targets `[n]` in the same (row-major) order."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask, labels[:, 1:][mask[:, :-1]]


def selected_token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of selected logits `[n, v]` against targets `[n]` (fp32)."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")
