"""DP-SGD by hand, for tests that check one step through vlmtrain + Opacus against it."""

from __future__ import annotations

import torch


def hand_dp_step(reference, per_sample: list[dict], plan, optim_cfg, seed: int) -> list[float]:
    """One DP-SGD step on `reference` from per-record gradients (`per_sample`: one {name: grad} per record, from
    plain autograd): each record's gradient clipped to C = plan.max_grad_norm over all trainable tensors, summed,
    plus N(0, σ²C²) noise drawn in the optimizer's parameter order from the generator vlmtrain seeds with
    `seed + 1`, divided by the expected batch size; then the stage's optimizer steps. Returns the clip factors."""
    from vlmtrain.train.optim import build_optimizer

    C, sigma = plan.max_grad_norm, plan.noise_multiplier
    summed = {n: torch.zeros_like(g) for n, g in per_sample[0].items()}
    factors = []
    for g in per_sample:
        norm = torch.sqrt(sum((t.double() ** 2).sum() for t in g.values())).float()
        factors.append(min(1.0, float(C / (norm + 1e-6))))
        for n in summed:
            summed[n] += factors[-1] * g[n]
    hand_opt = build_optimizer(reference, optim_cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    name_of = {id(p): n for n, p in reference.named_parameters()}
    for group in hand_opt.param_groups:  # the optimizer's parameter order is the order noise is drawn in
        for p in group["params"]:
            n = name_of[id(p)]
            noise = torch.normal(mean=0, std=sigma * C, size=p.shape, generator=gen)
            p.grad = (summed[n] + noise) / plan.expected_batch_size
    hand_opt.step()
    return factors
