"""An in-flight rollout in a checkpoint: with `num_iterations` = n > 1 a window's later iterations train on the
rollout its first one generated, so a checkpoint taken between them must carry that rollout, or a resumed run would
generate a new one from the updated policy (other completions, other old log-probs) and leave the uninterrupted
run's path.

    pack(rollouts) -> plain data      tensors (on the CPU), lists, dicts, strings and numbers only, so the
                                      checkpoint still loads with `torch.load(weights_only=True)`
    unpack(data, device) -> rollouts  the same rollouts, tensors on `device`

A rollout holds `GroupRows` (stored as its fields) and, for native families, the image features as transformers'
output class (stored as its fields and the class's import path).
"""

from __future__ import annotations

import importlib
from dataclasses import fields

import torch

from vlmtrain.train.grpo.scoring import GroupRows

_ROWS, _OUTPUT = "__group_rows__", "__model_output__"


def pack(value):
    """A rollout (or any nesting of them) as plain data."""
    from transformers.utils import ModelOutput

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, GroupRows):
        return {_ROWS: {f.name: pack(getattr(value, f.name)) for f in fields(value)}}
    if isinstance(value, ModelOutput):
        cls = type(value)
        return {_OUTPUT: f"{cls.__module__}:{cls.__qualname__}", "fields": {k: pack(v) for k, v in value.items()}}
    if isinstance(value, dict):
        return {k: pack(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [pack(v) for v in value]
    return value


def unpack(value, device):
    """What `pack` stored, with its tensors on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict) and _ROWS in value:
        return GroupRows(**{k: unpack(v, device) for k, v in value[_ROWS].items()})
    if isinstance(value, dict) and _OUTPUT in value:
        module, _, name = value[_OUTPUT].partition(":")
        return getattr(importlib.import_module(module), name)(**unpack(value["fields"], device))
    if isinstance(value, dict):
        return {k: unpack(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [unpack(v, device) for v in value]
    return value
