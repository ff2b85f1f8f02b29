"""Optimizer parameter groups (per-module learning rates, no decay on biases/norms) and the LR schedule.

The schedule comes from transformers' `get_scheduler` (warmup + cosine/linear/constant), a kept library.
"""

from __future__ import annotations

import math

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
    from transformers import get_scheduler

    warmup = math.ceil(optim.warmup_ratio * total_steps)
    return get_scheduler(optim.schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
