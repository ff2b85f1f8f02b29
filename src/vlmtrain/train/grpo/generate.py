"""Sampling G completions per prompt from a composed VLM, each prompt's images encoded once.

    sample_groups(vlm, prompt_ids [r] token lists, image_embeds [n_img, t, d] | None, G, settings, pad, stop_ids)
        -> completions [r][G] token lists (each ends at its first stop token, which it includes, or is cut at
           max_completion_length)

The prompts are left-padded into one batch with their image features (`vlm.encode_images`, computed once per prompt
by the caller), and `VLM.generate_repeated` runs each prompt once: its KV cache is computed on the r prompt rows and
repeated for the G completions, which transformers' `generate` then samples in one batched loop. So the vision
tower, the connector and the prompt's forward run once per group, not G times. The same features then serve the
loss forward (`scoring.group_token_logps(image_embeds=...)`).
Each completion draws from its own random stream, named by its key (`sampler.KeyedSampler`): what it samples
does not depend on the batch, the rank or what was drawn before it. The image token is never sampled (a completion
has no image to fill it with).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmtrain.train.grpo.sampler import NEUTRAL_WARPERS, KeyedSampler


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


@torch.no_grad()
def sample_groups(vlm, prompts: list[list[int]], image_embeds: torch.Tensor | None, G: int,
                  settings: SamplingSettings, pad_token_id: int, stop_ids: list[int], keys: list[int],
                  synced: bool = False) -> list[list[list[int]]]:
    """G sampled completions per prompt (module docstring); `keys` [r*G] name each completion's random stream
    (`sampler.completion_keys`); `synced`: every rank keeps stepping until all ranks are done (sharded weights
    are gathered per forward, so the ranks' forwards must pair up)."""
    ids, att = left_pad(prompts, pad_token_id)
    dev = next(vlm.parameters()).device
    feats = image_embeds if image_embeds is not None and image_embeds.shape[0] else None
    out = vlm.generate_repeated(ids.to(dev), att.to(dev), G, image_embeds=feats,
                                max_new_tokens=settings.max_completion_length, do_sample=True,
                                **NEUTRAL_WARPERS,
                                logits_processor=[KeyedSampler(keys, settings, dev)], synced_gpus=synced,
                                eos_token_id=list(stop_ids), pad_token_id=pad_token_id,
                                suppress_tokens=[vlm.image_token_id])  # image slots belong to prompts
    stop = set(stop_ids)
    rows = [cut_at_stop(r, stop) for r in out.tolist()]
    return [rows[i * G:(i + 1) * G] for i in range(len(prompts))]
