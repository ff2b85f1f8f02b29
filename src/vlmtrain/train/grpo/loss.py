"""The GRPO objective from per-token log-probabilities: clipped importance ratios, the k3 KL to a reference, and the
loss reductions of GRPO, Dr. GRPO, DAPO and GSPO.

Shapes: `b` completions (G per prompt, groups contiguous), `t` completion tokens (right-padded).

    grpo_loss(logps [b, t], old_logps [b, t] | None, ref_logps [b, t] | None, advantages [b], mask [b, t], ...)
        -> GRPOLossOutput(loss [], metrics {name: tensor []})

Formulas (those of TRL 1.16 `GRPOTrainer._compute_loss` with `delta=None`, `use_bias_correction_kl=False`, no
entropy mask, no vLLM importance correction; same operation order, so float32 results agree to rounding):

    log_ratio = logps - old_logps                                       # [b, t]; old = logps.detach() if None
    token level (grpo, dr_grpo, dapo):  w = exp(log_ratio)              # [b, t]
    sequence level (gspo):              w = exp(sum(log_ratio * mask) / max(n, 1))   # [b, 1], n tokens per row
    per_token = -min(w * A, clamp(w, 1 - epsilon, 1 + epsilon_high) * A) + beta * kl
    kl        = exp(ref - logps) - (ref - logps) - 1                    # k3 estimator, [b, t]

    grpo, gspo: mean over rows of (sum_t per_token * mask / max(n, 1))           (sequence mean, then batch mean)
    dr_grpo:    sum(per_token * mask) / (b * max_completion_length)               (constant normaliser)
    dapo:       sum(per_token * mask) / num_items                                 (token mean)

`gspo` is TRL's `loss_type="grpo"` with `importance_sampling_level="sequence"` (the GSPO paper's setup).
`num_sequences`, when given, replaces the row count `b` of the grpo / gspo mean and of dr_grpo's normaliser: dynamic
sampling passes the completions it kept (dropped ones have an all-zero mask), so the loss equals the loss of the
kept rows alone.
`num_items` is the number of completion tokens the whole optimizer step normalises by, per process: under gradient
accumulation over k micro-batches pass the accumulated batch's tokens (each micro-batch then adds its share of one
token mean); under data parallelism pass the global count divided by the world size (DDP averages gradients).
TRL divides the grpo/dr_grpo reductions by the accumulation steps instead; with one micro-batch per step (as here)
the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES: tuple[str, ...] = ("grpo", "dr_grpo", "dapo", "gspo")


@dataclass
class GRPOLossOutput:
    """`loss` carries the graph; `metrics` are detached scalars under TRL's metric names (`kl` only when beta > 0,
    `entropy` only when entropies were given)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def importance_weights(log_ratio: torch.Tensor, mask: torch.Tensor, sequence_level: bool) -> torch.Tensor:
    """`exp` of the per-token log-ratio `[b, t]`, or of its masked mean per row `[b, 1]` (GSPO)."""
    if not sequence_level:
        return torch.exp(log_ratio)
    mean = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return torch.exp(mean).unsqueeze(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) by the k3 estimator (Schulman): `exp(r) - r - 1`, `r = ref - logps`,
    `[b, t]`; non-negative and unbiased for tokens sampled from the policy."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def reduce_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int | None,
                num_items: float | torch.Tensor | None, num_sequences: float | None = None) -> torch.Tensor:
    """The loss-type reduction of `per_token` `[b, t]` (or `[b, 1]` broadcast over `mask`) to a scalar."""
    masked = per_token * mask
    b = per_token.size(0) if num_sequences is None else max(float(num_sequences), 1.0)
    if loss_type in ("grpo", "gspo"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / b
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo needs max_completion_length (its constant normaliser)")
        return masked.sum() / (b * max_completion_length)
    if loss_type == "dapo":
        n = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=masked.dtype)
        return masked.sum() / n.clamp(min=1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token mean of `x` `[b, t]` over `mask`; a `[b, 1]` (sequence-level) `x` is averaged over rows instead."""
    if x.shape[1] == 1:
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def clip_metrics(w: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon: float,
                 epsilon_high: float) -> dict[str, torch.Tensor]:
    """Fractions of tokens (sequences under GSPO) whose ratio the clip holds: below `1 - epsilon` with a negative
    advantage (low), above `1 + epsilon_high` with a positive one (high), either (region)."""
    low = (w < 1 - epsilon) & (advantages < 0)
    high = (w > 1 + epsilon_high) & (advantages > 0)
    return {"clip_ratio/low_mean": masked_mean(low.float(), mask),
            "clip_ratio/high_mean": masked_mean(high.float(), mask),
            "clip_ratio/region_mean": masked_mean((low | high).float(), mask)}


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str = "dapo", epsilon: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.0, max_completion_length: int | None = None,
              num_items: float | torch.Tensor | None = None, num_sequences: float | None = None,
              entropies: torch.Tensor | None = None) -> GRPOLossOutput:
    """The GRPO loss of one micro-batch (formulas in the module docstring).

    logps `[b, t]` (differentiable), old_logps `[b, t]` (the sampling policy's, detached; None when the batch is
    used once, i.e. num_iterations == 1), ref_logps `[b, t]` (needed when beta > 0), advantages `[b]`, mask `[b, t]`
    (1 on completion tokens that count; 0 on padding and on masked truncated completions), entropies `[b, t]`
    (optional, only logged). `epsilon_high` defaults to `epsilon` (DAPO's clip-higher sets it above).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (the reference model's per-token log-probs)")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # [b, 1]
    old = logps.detach() if old_logps is None else old_logps
    w = importance_weights(logps - old, mask, sequence_level=loss_type == "gspo")
    clipped = torch.clamp(w, 1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(w * adv, clipped * adv)
    metrics: dict[str, torch.Tensor] = {}
    if beta != 0.0:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask)
    loss = reduce_loss(per_token, mask, loss_type, max_completion_length, num_items, num_sequences)
    if entropies is not None:
        metrics["entropy"] = masked_mean(entropies.detach(), mask)
    metrics.update(clip_metrics(w.detach(), adv, mask, epsilon, epsilon_high))
    return GRPOLossOutput(loss=loss, metrics=metrics)


def mask_truncated(mask: torch.Tensor, completion_ids: list[list[int]],
                   stop_ids: set[int] | list[int]) -> torch.Tensor:
    """`mask` `[b, t]` with the rows of truncated completions zeroed: those whose last token is not a stop token
    (end of turn / EOS) or padding, i.e. that ran into `max_completion_length` (`mask_truncated_completions`; DAPO:
    a cut-off answer should neither be rewarded nor punished for its ending)."""
    stop = set(stop_ids)
    cut = torch.tensor([bool(ids) and ids[-1] not in stop for ids in completion_ids], device=mask.device)
    return mask * (~cut).unsqueeze(1).to(mask.dtype)
