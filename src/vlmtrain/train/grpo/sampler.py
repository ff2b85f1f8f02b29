"""Keyed sampling: each completion's tokens drawn from its own random stream, named by a key.

    completion_keys(seed, step, record_ids [r], G) -> keys [r*G]      (prompt i's G keys at i*G .. i*G+G-1)
    KeyedSampler(keys)                                                 a transformers `LogitsProcessor`

`generate(do_sample=True, logits_processor=[KeyedSampler(keys)])`: transformers applies its processors and warpers
(temperature, top-k, top-p) as usual, then, last in the list, the sampler adds Gumbel noise drawn for row i from a
`torch.Generator` seeded with `keys[i]` to the warped scores `[n, V]` and hands back a one-hot of the argmax (0 there,
-inf elsewhere), which `generate`'s own draw then picks with probability 1. The argmax of scores + Gumbel(0, 1)
noise is an exact draw from softmax(scores) (the Gumbel-max trick), so the completions follow the distribution
`generate` samples from.

Why by hand: `generate` draws every row from torch's global generator, so a completion depends on the batch it
shares, the rank it runs on and everything drawn before it. Keyed by (run seed, step, record id, completion index),
a completion depends on its key and the model only: two ranks sample what one process samples for the same prompts
(the 2-rank run equals the one-process run), and a resumed run samples what the uninterrupted one did.
"""

from __future__ import annotations

import hashlib

import torch
from transformers import LogitsProcessor


def completion_keys(seed: int, step: int, record_ids: list, G: int) -> list[int]:
    """63-bit keys for the G completions of each record (`record_ids` in prompt order): a hash of (run seed, step,
    record id, completion index), so the same record in another epoch or step samples afresh."""
    keys = []
    for rid in record_ids:
        for j in range(G):
            digest = hashlib.blake2b(f"{seed}\x1f{step}\x1f{rid}\x1f{j}".encode(), digest_size=8).digest()
            keys.append(int.from_bytes(digest, "little") >> 1)
    return keys


class KeyedSampler(LogitsProcessor):
    """Gumbel-max sampling with one generator per row (module doc), after `generate`'s own warpers."""

    def __init__(self, keys: list[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator(device=device).manual_seed(k) for k in keys]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Warped `scores [n, V]` → a one-hot `[n, V]` (0 at the drawn token, -inf elsewhere)."""
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"KeyedSampler: {scores.shape[0]} rows but {len(self.generators)} keys")
        V = scores.shape[-1]
        u = torch.stack([torch.rand(V, generator=g, device=g.device, dtype=torch.float64)
                         for g in self.generators]).to(scores.device)
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-300)))
        drawn = (scores.double() + gumbel).argmax(-1)  # a -inf score (filtered, suppressed) is never drawn
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, drawn[:, None], 0.0)
