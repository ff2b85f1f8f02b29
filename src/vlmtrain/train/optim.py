"""Optimizer parameter groups (per-module learning rates, no decay on biases/norms) and the LR schedule.

The schedule is transformers' (warmup + cosine/linear/constant), formula for formula; see build_scheduler for why
it is not imported from there.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from vlmtrain.train.freeze import MODULES


def param_groups(model, optim) -> list[dict]:
    groups = []
    for name in MODULES:
        lr = optim.lr_groups.get(name, optim.lr)
        decay, no_decay = [], []
        for pname, p in getattr(model, name).named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in pname.lower() else decay).append(p)
        for params, wd, tag in ((decay, optim.weight_decay, "decay"), (no_decay, 0.0, "no_decay")):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": f"{name}/{tag}"})
    return groups


def build_optimizer(model, optim) -> torch.optim.Optimizer:
    # fused AdamW (one kernel per parameter, no temporaries) on CUDA and on CPU alike: on the 2-core dev CPU it
    # steps 27M parameters in 14 ms against foreach's 44-63 ms, whose temporaries (a fresh buffer per tensor per
    # op) cost more than the arithmetic. transformers' Trainer defaults to the same kernel (adamw_torch_fused).
    return torch.optim.AdamW(param_groups(model, optim), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             fused=True)


def build_scheduler(optimizer, optim, total_steps: int):
    """transformers.get_scheduler(optim.schedule, ...) for the four schedules a stage can name: the same LambdaLR
    with the same multipliers (copied from transformers/optimization.py, 5.23.0), so the same learning rates bit for
    bit and the same state_dict (tests/test_train.py compares both with transformers').

    Why not import it: transformers.optimization imports transformers.trainer_utils, which imports peft, which
    imports bitsandbytes, whose torch.compile'd kernels import torch._inductor — ~2-3 s of CPU at the start of every
    training process (and of every rank) that trains no LoRA, for four one-line formulas."""
    from torch.optim.lr_scheduler import LambdaLR

    warmup = math.ceil(optim.warmup_ratio * total_steps)
    if optim.schedule == "constant":  # get_scheduler ignores the warmup of "constant"
        return LambdaLR(optimizer, _constant_lambda)
    if optim.schedule == "constant_with_warmup":
        return LambdaLR(optimizer, partial(_constant_with_warmup_lambda, num_warmup_steps=warmup))
    lam = {"linear": _linear_with_warmup_lambda, "cosine": partial(_cosine_with_warmup_lambda, num_cycles=0.5)}
    return LambdaLR(optimizer, partial(lam[optim.schedule], num_warmup_steps=warmup, num_training_steps=total_steps))


# transformers/optimization.py's multipliers, verbatim (same float operations in the same order)
def _constant_lambda(_=None):
    return 1


def _constant_with_warmup_lambda(current_step: int, *, num_warmup_steps: int):
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1.0, num_warmup_steps))
    return 1.0


def _linear_with_warmup_lambda(current_step: int, *, num_warmup_steps: int, num_training_steps: int):
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    return max(0.0, float(num_training_steps - current_step) / float(max(1, num_training_steps - num_warmup_steps)))


def _cosine_with_warmup_lambda(current_step: int, *, num_warmup_steps: int, num_training_steps: int,
                               num_cycles: float):
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))
