"""Group-relative advantages from the rewards of G completions per prompt, and dynamic sampling.

Shapes: `n = groups × G` completions, groups contiguous (completion `i` belongs to group `i // G`), `k` reward
functions. A reward function may return None for a completion it does not apply to; it arrives here as NaN.

    weighted_rewards(per_func [n, k], weights [k]) -> rewards [n]     (NaN where every function returned None)
    group_advantages(rewards [n], G, scale_rewards) -> Advantages(advantages [n], zero_spread [groups], ...)
    groups_with_spread(rewards [n], G) -> keep [groups]                (DAPO's dynamic sampling filter)

The formulas are TRL 1.16's (`GRPOTrainer._generate_and_score_completions`, `multi_objective_aggregation=
"sum_then_normalize"`): weighted NaN-sum over functions; the group's NaN-mean as the baseline; the divisor is the
group's (group) or the whole batch's (batch) Bessel-corrected NaN-std plus 1e-4, or nothing (none); a completion no
function could score gets advantage 0 and is left out of its group's baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")
_STD_EPS = 1e-4  # TRL's: keeps a zero-spread group's advantages at 0 instead of 0/0


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaNs (NaN with fewer than two values). Written here because
    torch has no `nanstd` and TRL (which has one) is only a bench dependency of vlmtrain."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    std = torch.sqrt(var * correction)
    if keepdim:
        return std
    return std.reshape(()) if dim is None else std.squeeze(dim)


def weighted_rewards(per_func: torch.Tensor, weights: torch.Tensor | list[float]) -> torch.Tensor:
    """`[n, k]` rewards (NaN = None) → `[n]` weighted sum over the functions that scored each completion; NaN for a
    completion that none could score (so it stays out of the baselines and gets advantage 0)."""
    w = torch.as_tensor(weights, dtype=per_func.dtype, device=per_func.device)
    total = (per_func * w.unsqueeze(0)).nansum(dim=1)
    return total.masked_fill(torch.isnan(per_func).all(dim=1), float("nan"))


@dataclass
class Advantages:
    """advantages `[n]` (0 for unscorable completions), baseline `[n]` (the group mean each was compared with),
    std `[n]` (the divisor before the epsilon; the group's std under `none` too, for the zero-spread metric),
    zero_spread `[groups]` (True where all of a group's rewards are equal: no learning signal)."""

    advantages: torch.Tensor
    baseline: torch.Tensor
    std: torch.Tensor
    zero_spread: torch.Tensor

    @property
    def zero_spread_fraction(self) -> float:
        """Fraction of groups whose rewards have zero spread."""
        return self.zero_spread.float().mean().item()


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> Advantages:
    """Group-relative advantages of `[n]` rewards (NaN = unscorable) with G = `num_generations` per group."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards: {scale_rewards!r} is not one of {', '.join(SCALE_REWARDS)}")
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    grouped = rewards.view(-1, num_generations)
    baseline = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    group_std = nanstd(grouped, dim=1) if num_generations > 1 else grouped.new_zeros(grouped.shape[0])
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = group_std.repeat_interleave(num_generations)
    advantages = rewards - baseline
    if scale_rewards != "none":
        advantages = advantages / (std + _STD_EPS)
    zero_spread = torch.isclose(group_std, torch.zeros_like(group_std))
    return Advantages(advantages=torch.nan_to_num(advantages, nan=0.0), baseline=baseline, std=std,
                      zero_spread=zero_spread)


def groups_with_spread(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """`[groups]` bool: groups whose rewards differ (DAPO's dynamic sampling keeps only these; a group where every
    completion earned the same reward has all-zero advantages and only dilutes the batch). A group with fewer than
    two scorable completions has no spread either (its std is NaN)."""
    std = nanstd(rewards.view(-1, num_generations), dim=1)
    return std > 1e-8  # the tolerance of torch.isclose(std, 0), TRL's zero-spread test; NaN compares False


def keep_groups(keep: torch.Tensor, num_generations: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Rows of each `[n, ...]` tensor whose group `keep` `[groups]` marks, groups kept whole and in order."""
    rows = keep.repeat_interleave(num_generations)
    return [t[rows] for t in tensors]


def reward_metrics(per_func: torch.Tensor, weights: torch.Tensor | list[float],
                   names: list[str]) -> dict[str, float]:
    """Mean and std of each function's rewards over the completions it scored, and of the weighted total over the
    scorable completions (TRL's `rewards/<name>/mean|std`, `reward`, `reward_std`)."""
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        out[f"rewards/{name}/mean"] = torch.nanmean(per_func[:, i]).item()
        out[f"rewards/{name}/std"] = nanstd(per_func[:, i]).item()
    total = weighted_rewards(per_func, weights)
    out["reward"] = torch.nanmean(total).item()
    out["reward_std"] = nanstd(total).item()
    return out
