"""The trainable tensors that cross the wire, and nothing else.

A site's reply carries exactly the parameters its stage trains (connector + LoRA A/B), fp32 by name; base weights
never leave the site. `ALLOWED_METRICS` / `ALLOWED_SITE_INFO` are the only other keys a reply may hold
(tests assert it on the actual messages).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vlmtrain.errors import VlmtrainError

if TYPE_CHECKING:
    import torch

# torch is imported where a model is touched: a site's ClientApp is a fresh process per message, and three of
# SecAgg+'s four exchanges (keys, shares, unmasking) need only numpy and Flower

# numbers a site reports per round; nothing per record, no text
ALLOWED_METRICS = frozenset({"num-examples", "train_loss", "epsilon", "delta", "noise_multiplier", "sample_rate",
                             "steps", "round", "batches_empty"})
# strings a site reports: its pseudonymous site name and the hash of the gate report it trained under
ALLOWED_SITE_INFO = frozenset({"site", "gate_report_sha256"})


def trainable_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """name → fp32 copy of each parameter with requires_grad (shapes as in the model)."""
    import torch

    return {n: p.detach().to(torch.float32).cpu().numpy().copy()
            for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Copy `arrays` into the model's trainable parameters; the names must match exactly."""
    import torch

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(arrays):
        missing, extra = sorted(set(params) - set(arrays)), sorted(set(arrays) - set(params))
        raise VlmtrainError(f"federated arrays do not match the stage's trainable parameters: missing {missing[:3]}, "
                            f"unexpected {extra[:3]}")
    with torch.no_grad():
        for n, p in params.items():
            if tuple(arrays[n].shape) != tuple(p.shape):
                raise VlmtrainError(f"federated arrays: {n} has shape {arrays[n].shape}, the model {tuple(p.shape)}")
            p.copy_(torch.from_numpy(np.asarray(arrays[n])).to(p.dtype))


def to_record(arrays: dict[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({n: Array(np.ascontiguousarray(a, dtype=np.float32)) for n, a in arrays.items()})


def from_record(record) -> dict[str, np.ndarray]:
    return {n: a.numpy() for n, a in record.items()}


def payload_bytes(record) -> int:
    """Bytes of tensor payload in an ArrayRecord, from each Array's own dtype and shape."""
    return sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in record.values())


def wire_bytes(record) -> int:
    """Bytes the ArrayRecord serialises to (each Array's npy buffer, headers included)."""
    return sum(len(a.data) for a in record.values())
