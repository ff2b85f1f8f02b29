"""Keyed sampling: each completion's tokens drawn from its own random stream, named by a key.

    completion_keys(seed, step, record_ids [r], G) -> keys [r*G]      (prompt i's G keys at i*G .. i*G+G-1)
    KeyedSampler(keys, settings)                                       a transformers `LogitsProcessor`

`generate(do_sample=True, **NEUTRAL_WARPERS, logits_processor=[KeyedSampler(keys, settings)])`: transformers runs its processors (suppressed tokens, repetition penalty, ...) and then this one, which applies the
stage's temperature, top-k and top-p with transformers' own warpers (in the order `generate` applies them when it
samples), adds Gumbel noise drawn for row i from a `torch.Generator` seeded with `keys[i]` to the warped scores
`[n, V]`, and hands back a one-hot of the argmax (0 there, -inf elsewhere), which `generate`'s own draw then picks
with probability 1. The sampler warps itself because `generate` appends its warpers after a caller's processors:
given to `generate`, temperature, top-k and top-p would act on the one-hot, i.e. not at all (so `generate` gets the
neutral values, and a checkpoint's own sampling defaults cannot change a one-hot either). The argmax of scores +
Gumbel(0, 1) noise is an exact draw from softmax(scores) (the Gumbel-max trick).

Why by hand: `generate` draws every row from torch's global generator, so a completion depends on the batch it
shares, the rank it runs on and everything drawn before it. Keyed by (run seed, step, record id, completion index),
a completion depends on its key and the model only: two ranks sample what one process samples for the same prompts
(the 2-rank run equals the one-process run), and a resumed run samples what the uninterrupted one did. The
generators are created on the model's device, so these hold between runs on the same kind of device (CPU and CUDA
generators give different streams for one key). Two records with the same id in one step (a mixture whose sources
reuse ids) draw the same streams: their completions differ only as far as their prompts do.
"""

from __future__ import annotations

import hashlib

import torch
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


def completion_keys(seed: int, step: int, record_ids: list, G: int) -> list[int]:
    """63-bit keys for the G completions of each record (`record_ids` in prompt order): a hash of (run seed, step,
    record id, completion index), so the same record in another epoch or step samples afresh."""
    keys = []
    for rid in record_ids:
        for j in range(G):
            digest = hashlib.blake2b(f"{seed}\x1f{step}\x1f{rid}\x1f{j}".encode(), digest_size=8).digest()
            keys.append(int.from_bytes(digest, "little") >> 1)
    return keys


# what `generate` gets beside a KeyedSampler: its own warpers off (the sampler applies the stage's)
NEUTRAL_WARPERS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


class KeyedSampler(LogitsProcessor):
    """Gumbel-max sampling with one generator per row, after the stage's temperature / top-k / top-p (module doc).
    `settings`: `SamplingSettings` (top_k 0 and top_p 1.0 are off)."""

    def __init__(self, keys: list[int], settings, device: torch.device | str = "cpu"):
        self.generators = [torch.Generator(device=device).manual_seed(k) for k in keys]
        self.warpers = []
        if settings.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            self.warpers.append(TopKLogitsWarper(top_k=settings.top_k))
        if settings.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=settings.top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """`scores [n, V]` (after `generate`'s processors) → a one-hot `[n, V]` (0 at the drawn token, -inf
        elsewhere)."""
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"KeyedSampler: {scores.shape[0]} rows but {len(self.generators)} keys")
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        V = scores.shape[-1]
        u = torch.stack([torch.rand(V, generator=g, device=g.device, dtype=torch.float64)
                         for g in self.generators]).to(scores.device)
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-300)))
        drawn = (scores.double() + gumbel).argmax(-1)  # a -inf score (filtered, suppressed) is never drawn
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, drawn[:, None], 0.0)
