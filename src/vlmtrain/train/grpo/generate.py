"""Sampling G completions per prompt from a composed VLM, each prompt's images encoded once.

    sample_groups(vlm, prompt_ids [r] token lists, image_embeds [n_img, t, d] | None, G, settings, pad, stop_ids)
        -> completions [r][G] token lists (each ends at its first stop token, which it includes, or is cut at
           max_completion_length)

The prompts are left-padded into one batch; their image features (`vlm.encode_images`, computed once per prompt by
the caller) are repeated for the G copies of each prompt, so the vision tower and connector run once per group
while transformers' `generate` samples all r × G continuations in one batched loop with a KV cache
(`VLM.generate`). The same features then serve the loss forward (`scoring.group_token_logps(image_embeds=...)`).
Each completion draws from its own random stream, named by its key (`sampler.KeyedSampler`): what it samples
does not depend on the batch, the rank or what was drawn before it. The image token is never sampled (a completion
has no image to fill it with).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmtrain.train.grpo.sampler import KeyedSampler


@dataclass
class SamplingSettings:
    """The sampling knobs of a grpo section (TRL's names): temperature, top_p, top_k (0 = off), the cap."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_completion_length: int = 512


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[r, s]` left-padded ids and attention mask (generation appends on the right)."""
    s = max(map(len, prompts))
    ids = torch.full((len(prompts), s), pad_token_id, dtype=torch.long)
    att = torch.zeros((len(prompts), s), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, s - len(p):] = torch.tensor(p)
        att[i, s - len(p):] = 1
    return ids, att


def cut_at_stop(row: list[int], stop_ids: set[int]) -> list[int]:
    """Tokens up to and including the first stop token (generate pads finished rows after it)."""
    for i, t in enumerate(row):
        if t in stop_ids:
            return row[:i + 1]
    return row


def images_per_prompt(prompts: list[list[int]], image_token_id: int, slots: int) -> list[int]:
    """Images of each prompt, from its image-token slots."""
    return [sum(t == image_token_id for t in p) // slots for p in prompts]


def repeat_groups(image_embeds: torch.Tensor, counts: list[int], G: int) -> torch.Tensor:
    """`[n_img, t, d]` features (prompts' images in order) → each prompt's block repeated G times, in the row order
    of the prompts repeated G times each (`repeat_interleave`). A repeat of a tensor, not a new encoding."""
    blocks, start = [], 0
    for n in counts:
        blocks += [image_embeds[start:start + n]] * G
        start += n
    return torch.cat(blocks)


@torch.no_grad()
def sample_groups(vlm, prompts: list[list[int]], image_embeds: torch.Tensor | None, G: int,
                  settings: SamplingSettings, pad_token_id: int, stop_ids: list[int], keys: list[int],
                  synced: bool = False) -> list[list[list[int]]]:
    """G sampled completions per prompt (module docstring); `keys` [r*G] name each completion's random stream
    (`sampler.completion_keys`); `synced`: every rank keeps stepping until all ranks are done (sharded weights
    are gathered per forward, so the ranks' forwards must pair up)."""
    ids, att = left_pad(prompts, pad_token_id)
    dev = next(vlm.parameters()).device
    feats = None
    if image_embeds is not None and image_embeds.shape[0]:
        counts = images_per_prompt(prompts, vlm.image_token_id, vlm.num_image_tokens)
        feats = repeat_groups(image_embeds, counts, G)
    out = vlm.generate(ids.repeat_interleave(G, 0).to(dev), attention_mask=att.repeat_interleave(G, 0).to(dev),
                       max_new_tokens=settings.max_completion_length, image_embeds=feats, do_sample=True,
                       temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                       logits_processor=[KeyedSampler(keys, dev)], synced_gpus=synced,
                       eos_token_id=list(stop_ids), pad_token_id=pad_token_id,
                       suppress_tokens=[vlm.image_token_id])  # image slots belong to prompts, never completions
    stop = set(stop_ids)
    rows = [cut_at_stop(r, stop) for r in out.tolist()]
    return [rows[i * G:(i + 1) * G] for i in range(len(prompts))]
