"""The DPO objective: sequence log-probabilities and the preference losses (sigmoid/cDPO, IPO, hinge).

Shapes: `b` preference pairs, `s` sequence length, `v` vocabulary. A batch is scored as two sequences per pair
(chosen, rejected); the policy and the frozen reference model each give one summed log-probability per sequence.

    sequence_logps(logits [b, s, v], labels [b, s]) -> (logps [b], n_tokens [b])
    dpo_loss(policy_chosen [b], policy_rejected [b], ref_chosen [b], ref_rejected [b], beta, ...) -> DPOOutput

Formulas (identical to TRL 1.16 `DPOTrainer._compute_loss` with `f_divergence_type="reverse_kl"`, `ld_alpha=None`,
`use_weighting=False`; same operation order, so float32 results agree bit for bit in practice):

    chosen_logratio   = policy_chosen   - ref_chosen                   # [b]
    rejected_logratio = policy_rejected - ref_rejected                 # [b]
    delta             = chosen_logratio - rejected_logratio            # [b]

    sigmoid (DPO, Rafailov et al. 2023 eq. 7; conservative DPO / cDPO with label smoothing eps, Mitchell 2023 eq. 3):
        loss = -(1 - eps) * logsigmoid(beta * delta) - eps * logsigmoid(-beta * delta)
        (eps = 0 is plain DPO, computed as exactly -logsigmoid(beta * delta))
    hinge (SLiC):
        loss = relu(1 - beta * delta)
    ipo (Azar et al. 2023 eq. 17, beta is the paper's tau), LENGTH-NORMALISED as TRL does:
        delta_avg = chosen_logratio / max(n_chosen, 1) - rejected_logratio / max(n_rejected, 1)
        loss = (delta_avg - 1 / (2 * beta)) ** 2

    chosen_reward   = beta * chosen_logratio    (detached; NOT length-normalised, also for ipo, as in TRL)
    rejected_reward = beta * rejected_logratio  (detached)

Notes for callers:

- IPO needs the supervised-token counts: pass `chosen_n_tokens` / `rejected_n_tokens` (the `n_tokens` returned by
  `sequence_logps`) together with *summed* log-probs. TRL 1.16 divides each log-ratio by its completion length
  (the IPO authors confirmed the paper's numbers use this form). To get the unnormalised paper formula, pass
  `torch.ones(b)` as both counts. Passing pre-averaged log-probs *and* counts would normalise twice.
- Label smoothing: TRL 1.16's `sigmoid` branch ignores `label_smoothing` (it is only read by `robust`, `exo_pair`,
  `aot*`). vlmtrain keeps the cDPO smoothing on `sigmoid` (the formula TRL's `sigmoid` used before 1.0 and still uses
  in its `aot` branch); with `label_smoothing=0` (the default) the two agree exactly. Smoothing is refused for the
  other loss types, where it has no meaning.
- `losses` are per pair. Under gradient accumulation / data parallelism, normalise by the number of pairs of the
  whole accumulated (and all-reduced) batch: `losses.sum() / total_pairs` (TRL takes a per-micro-batch mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmtrain.data.chat import IGNORE

DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge")

# Supervised positions scored per chunk in `sequence_logps`; bounds the forward temporaries to [chunk, v] in fp32.
_LOGP_CHUNK = 2048


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of the supervised next tokens of each sequence.

    logits `[b, s, v]` (any float dtype), labels `[b, s]` with IGNORE (-100) on unsupervised positions (prompt,
    image slots, padding). Position `t` of `logits` predicts `labels[t + 1]`, exactly as in `next_token_loss_sum`.

    Returns `logps [b]` (float32, or float64 for float64 logits; differentiable w.r.t. `logits`) and
    `n_tokens [b]` (int64, supervised tokens per sequence; 0 for a fully masked row, whose logp is 0).

    Computation: only the supervised positions are gathered (in a VLM most positions are image slots and prompt),
    upcast to fp32 chunk by chunk, and scored as `logit[target] - logsumexp(logits)`. That is the same value as
    `log_softmax(logits.float()).gather(target)` (and as TRL's `selective_log_softmax` and its fused LM head, which
    both use this form in fp32) but it never materialises the `[b, s, v]` fp32 copy nor the `[n, v]` log_softmax
    output; forward temporaries are bounded by `[_LOGP_CHUNK, v]`. Under autograd each fp32 chunk is still saved
    once for the logsumexp backward, i.e. the same as `log_softmax`'s saved output, restricted to supervised rows.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"expected logits [b, s, v] and labels [b, s]; got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    b = logits.shape[0]
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    shift_logits = logits[:, :-1]
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE  # [b, s-1]
    rows, _ = mask.nonzero(as_tuple=True)  # sequence index of every supervised position, [n]
    sel_logits = shift_logits[mask]  # [n, v], native dtype
    sel_labels = shift_labels[mask]  # [n]
    token_logps = []
    for start in range(0, sel_logits.shape[0], _LOGP_CHUNK):
        chunk = sel_logits[start:start + _LOGP_CHUNK].to(compute_dtype)
        target = chunk.gather(-1, sel_labels[start:start + _LOGP_CHUNK].unsqueeze(-1)).squeeze(-1)
        token_logps.append(target - torch.logsumexp(chunk, dim=-1))
    flat = torch.cat(token_logps) if token_logps else sel_logits.new_zeros(0, dtype=compute_dtype)
    logps = torch.zeros(b, dtype=compute_dtype, device=logits.device).index_add(0, rows, flat)
    return logps, mask.sum(dim=1)


@dataclass
class DPOOutput:
    """Per-pair DPO results. `losses` carries the graph; rewards are detached.

    losses `[b]`, chosen_rewards `[b]`, rejected_rewards `[b]`.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        """Mean over this batch's pairs (TRL's reduction). Prefer `losses.sum() / total_pairs` when accumulating."""
        return self.losses.mean()

    @property
    def reward_margin(self) -> torch.Tensor:
        """`[b]`: chosen_reward - rejected_reward."""
        return self.chosen_rewards - self.rejected_rewards

    @property
    def reward_correct(self) -> torch.Tensor:
        """`[b]` bool: chosen_reward > rejected_reward (gather this, not the fraction, across ranks)."""
        return self.chosen_rewards > self.rejected_rewards

    @property
    def reward_accuracy(self) -> torch.Tensor:
        """Scalar: fraction of pairs with chosen_reward > rejected_reward (strictly; ties count as wrong, as TRL)."""
        return self.reward_correct.float().mean()

    def metrics(self) -> dict[str, float]:
        """Batch means under TRL's metric names."""
        return {
            "loss": self.loss.item(),
            "rewards/chosen": self.chosen_rewards.mean().item(),
            "rewards/rejected": self.rejected_rewards.mean().item(),
            "rewards/margins": self.reward_margin.mean().item(),
            "rewards/accuracies": self.reward_accuracy.item(),
        }


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    *,
    chosen_n_tokens: torch.Tensor | None = None,
    rejected_n_tokens: torch.Tensor | None = None,
) -> DPOOutput:
    """Per-pair DPO loss and implicit rewards (formulas in the module docstring).

    All four log-prob tensors are `[b]` *summed* sequence log-probs (from `sequence_logps`); they are promoted to at
    least float32. `chosen_n_tokens` / `rejected_n_tokens` `[b]` are the supervised-token counts, required for
    `ipo` (TRL normalises IPO by length) and ignored by the other loss types, so a caller may always pass them.
    `label_smoothing` is cDPO's eps in [0, 0.5), only for `sigmoid`.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {list(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies only to loss_type='sigmoid' (cDPO), not {loss_type!r}")
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if any(t.dim() != 1 or t.shape != policy_chosen_logps.shape for t in logps):
        raise ValueError("policy/ref chosen/rejected log-probs must all be 1-D [b] of the same length; got "
                         f"{[tuple(t.shape) for t in logps]}")
    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    pc, pr, rc, rr = (t.to(dtype) for t in logps)

    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    delta = chosen_logratios - rejected_logratios

    if loss_type == "sigmoid":
        if label_smoothing == 0.0:
            losses = -F.logsigmoid(beta * delta)
        else:
            losses = (-F.logsigmoid(beta * delta) * (1 - label_smoothing)
                      - F.logsigmoid(-beta * delta) * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:  # ipo
        if chosen_n_tokens is None or rejected_n_tokens is None:
            raise ValueError("loss_type='ipo' needs chosen_n_tokens and rejected_n_tokens: TRL normalises the IPO "
                             "log-ratios by completion length (pass torch.ones(b) for the unnormalised form)")
        if chosen_n_tokens.shape != pc.shape or rejected_n_tokens.shape != pc.shape:
            raise ValueError(f"n_tokens must be [b]={tuple(pc.shape)}; got {tuple(chosen_n_tokens.shape)} and "
                             f"{tuple(rejected_n_tokens.shape)}")
        chosen_avg = chosen_logratios / chosen_n_tokens.to(dtype).clamp(min=1.0)
        rejected_avg = rejected_logratios / rejected_n_tokens.to(dtype).clamp(min=1.0)
        losses = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2

    return DPOOutput(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )


def selected_sequence_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                       torch.Tensor]:
    """`sequence_logps` from logits computed only at the predicting positions (`VLM.forward(logits_mask=mask)`):
    logits `[n, v]`, targets `[n]`, mask `[b, s]` → (logps `[b]`, n_tokens `[b]`); fp32, or fp64 for fp64 logits."""
    tok = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    tok = tok.gather(-1, targets[:, None]).squeeze(-1)  # [n]
    rows = mask.nonzero()[:, 0]
    logps = torch.zeros(mask.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)
    return logps, mask.sum(-1)


def indexed_sequence_logps(logits: torch.Tensor, targets: torch.Tensor, seq_index: torch.Tensor,
                           n_seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed log-probs from logits at explicit positions (shared-prefix rows, `vlmtrain.data.prefix`:
    DPO's `collate_preference_shared` / `collate_preference_prefix`): logits `[n, v]`, targets `[n]`, seq_index
    `[n]` → (logps `[n_seq]`, n_tokens `[n_seq]`); fp32, or fp64 for fp64 logits."""
    tok = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    tok = tok.gather(-1, targets[:, None]).squeeze(-1)  # [n]
    logps = torch.zeros(n_seq, dtype=tok.dtype, device=tok.device).index_add(0, seq_index, tok)
    return logps, torch.bincount(seq_index, minlength=n_seq)
