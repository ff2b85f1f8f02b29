"""Per-token log-probabilities of G completions sharing one prompt, for a composed VLM, with the prompt and its images
computed once per group.

Layout (the DPO shared-prompt rows of `collate_preference_shared`, generalised from 2 answers to G): one row per
group, `[prompt | c_1 | c_2 | … | c_G]`. Position ids continue the prompt for every completion (each `c_j` starts
at position `len(prompt)`), and a boolean mask `[r, 1, s, s]` lets each completion token see the prompt and the
earlier tokens of its own completion, nothing of the other completions: every token sees exactly the context it has
when the completion is scored alone, while the vision tower, the connector and the prompt's layers run once.

    collate_groups(prompts [r] of token lists, completions [r][G] of token lists, pad) -> GroupRows
    group_token_logps(vlm, rows, pixel_values [n_img, c, h, w]) -> (logps [r*G, t], mask [r*G, t])

Completion `k = g * G + j` is completion `j` of group `g` (groups contiguous, as `advantages` expects).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupRows:
    """input_ids, position_ids `[r, s]`; allowed `[r, 1, s, s]` (bool, True = may attend); logits_index `[n, 2]`
    (row, position) of the position predicting each scored token; targets `[n]`; out_index `[n, 2]` (completion,
    token) where each log-prob goes; lengths `[r*G]` completion lengths."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    logits_index: torch.Tensor
    targets: torch.Tensor
    out_index: torch.Tensor
    lengths: torch.Tensor


def _row(prompt: list[int], group: list[list[int]], row: int, k0: int):
    """Tokens, positions, the (row, position) predicting each completion token and its (completion, token) slot."""
    p = len(prompt)
    tokens, positions = list(prompt), list(range(p))
    index, targets, out = [], [], []
    spans = []
    for j, comp in enumerate(group):
        start = len(tokens)
        spans.append((start, start + len(comp)))
        for t, tok in enumerate(comp):
            index.append((row, p - 1 if t == 0 else start + t - 1))  # token 0 is predicted by the prompt's end
            targets.append(tok)
            out.append((k0 + j, t))
        tokens += comp
        positions += range(p, p + len(comp))
    return tokens, positions, spans, index, targets, out


def collate_groups(prompts: list[list[int]], completions: list[list[list[int]]], pad_token_id: int,
                   image_token_id: int | None = None) -> GroupRows:
    """One row per prompt with its G completions after it (module docstring). Image tokens may only be in the
    prompt: the completions attend to the prompt's image features, they carry none."""
    if len(prompts) != len(completions) or any(not p for p in prompts):
        raise ValueError("need one non-empty prompt per group of completions")
    if image_token_id is not None and any(image_token_id in c for g in completions for c in g):
        raise ValueError("a completion contains the image token; image slots belong in the prompt")
    starts = [sum(len(g) for g in completions[:i]) for i in range(len(completions))]  # first completion index
    built = [_row(p, g, i, k0) for i, (p, g, k0) in enumerate(zip(prompts, completions, starts))]
    r, s = len(built), max(len(b[0]) for b in built)
    input_ids = torch.full((r, s), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((r, s), dtype=torch.long)
    allowed = torch.zeros((r, s, s), dtype=torch.bool)
    for i, (tokens, positions, spans, *_) in enumerate(built):
        m, p = len(tokens), len(prompts[i])
        input_ids[i, :m] = torch.tensor(tokens)
        position_ids[i, :m] = torch.tensor(positions)
        allowed[i, :p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
        for a, b in spans:  # each completion: the whole prompt, then itself causally
            allowed[i, a:b, :p] = True
            allowed[i, a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        allowed[i, range(m, s), range(m, s)] = True  # padding attends to itself (no all-masked row)
    cat = lambda k: torch.tensor([x for b in built for x in b[k]], dtype=torch.long)  # noqa: E731
    return GroupRows(input_ids=input_ids, position_ids=position_ids, allowed=allowed[:, None],
                     logits_index=cat(3).reshape(-1, 2), targets=cat(4), out_index=cat(5).reshape(-1, 2),
                     lengths=torch.tensor([len(c) for g in completions for c in g], dtype=torch.long))


def attention_mask_for(vlm, allowed: torch.Tensor) -> torch.Tensor:
    """The bool mask in the form the LM's attention takes: sdpa takes it as is, eager adds it to the scores (the
    same conversion as DPO's shared-prompt inputs in `VLMModule._shared_inputs`)."""
    impl = getattr(vlm.llm.config, "_attn_implementation", "sdpa")
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        dtype = vlm.llm.get_input_embeddings().weight.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                           torch.finfo(dtype).min)
    raise ValueError(f"group scoring needs sdpa or eager attention; the model uses {impl}")


def group_token_logps(vlm, rows: GroupRows, pixel_values: torch.Tensor | None = None,
                      image_embeds: torch.Tensor | None = None, return_entropy: bool = False):
    """Per-token log-probs `[r*G, t]` (float32; 0 past each completion's end) and the completion mask `[r*G, t]`
    of the grouped rows, in one forward of `vlm` (differentiable). `pixel_values` holds each group's images once,
    in row order; or pass `image_embeds` (`vlm.encode_images` output) to reuse features encoded for generation.
    With `return_entropy`, also the entropy of each predicting distribution `[r*G, t]` (detached; for logging)."""
    dev = rows.input_ids.device
    logits = vlm(rows.input_ids, pixel_values, attention_mask=attention_mask_for(vlm, rows.allowed),
                 position_ids=rows.position_ids, logits_mask=rows.logits_index, image_embeds=image_embeds)
    logp_all = logits.float().log_softmax(-1)  # [n, v]
    tok = logp_all.gather(-1, rows.targets.to(dev)[:, None]).squeeze(-1)  # [n]
    n, t = rows.lengths.numel(), int(rows.lengths.max()) if rows.lengths.numel() else 0
    index = (rows.out_index[:, 0].to(dev), rows.out_index[:, 1].to(dev))
    logps = torch.zeros(n, t, dtype=tok.dtype, device=dev).index_put(index, tok)
    mask = torch.arange(t, device=dev)[None] < rows.lengths.to(dev)[:, None]
    if not return_entropy:
        return logps, mask
    with torch.no_grad():
        ent = -(logp_all.exp() * logp_all).sum(-1)  # [n]
    return logps, mask, torch.zeros(n, t, dtype=ent.dtype, device=dev).index_put(index, ent)
