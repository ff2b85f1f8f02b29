"""Per-token log-probabilities of G completions sharing one prompt, with the prompt and its images computed once per
group.

Layout: the shared-prefix rows of `vlmtrain.data.prefix` with k = G, one row per group, `[prompt | c_1 | … | c_G]`,
numbered group-first (`order="group"`). Position ids continue the prompt for every completion (each `c_j` starts
at position `len(prompt)`), and the mask lets each completion token see the prompt and the earlier tokens of its own
completion, nothing of the other completions: every token sees exactly the context it has when the completion is
scored alone, while the vision tower, the connector and the prompt's layers run once. A composed VLM takes the
bool mask `[r, 1, s, s]` (`allowed`); a native family builds its own masks and mRoPE ids from `segments`
(`vlmtrain.model.native.shared_prefix`).

    collate_groups(prompts [r] of token lists, completions [r][G] of token lists, pad) -> GroupRows
    group_token_logps(vlm, rows, pixel_values [n_img, c, h, w]) -> (logps [r*G, t], mask [r*G, t])

Completion `k = g * G + j` is completion `j` of group `g` (groups contiguous, as `advantages` expects).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmtrain.data.chat import IGNORE
from vlmtrain.data.prefix import segment_attention_mask, shared_prefix_rows


@dataclass
class GroupRows:
    """input_ids, position_ids, segments `[r, s]` (segments: 0 prompt, j + 1 completion j, -1 padding); allowed
    `[r, 1, s, s]` (bool, True = may attend); logits_index `[n, 2]` (row, position) of the position predicting each
    scored token; targets `[n]`; out_index `[n, 2]` (completion, token) where each log-prob goes; lengths `[r*G]`
    completion lengths; token_extras: per-token family tensors `[r, s]` (a native family's `token_type_ids`, …)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    allowed: torch.Tensor
    logits_index: torch.Tensor
    targets: torch.Tensor
    out_index: torch.Tensor
    lengths: torch.Tensor
    token_extras: dict = field(default_factory=dict)

    def to(self, device) -> "GroupRows":
        move = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return GroupRows(**move, token_extras={k: v.to(device) for k, v in self.token_extras.items()})


def collate_groups(prompts: list[list[int]], completions: list[list[list[int]]], pad_token_id: int,
                   image_token_id: int | None = None, prompt_extras: list[dict] | None = None) -> GroupRows:
    """One row per prompt with its G completions after it (module docstring). Image tokens may only be in the
    prompt: the completions attend to the prompt's image features, they carry none. `prompt_extras[i]`: prompt i's
    per-token family tensors as lists (`{"token_type_ids": [p_i]}`); completion tokens get 0 (text)."""
    if len(prompts) != len(completions) or any(not p for p in prompts):
        raise ValueError("need one non-empty prompt per group of completions")
    if image_token_id is not None and any(image_token_id in c for g in completions for c in g):
        raise ValueError("a completion contains the image token; image slots belong in the prompt")
    extras = prompt_extras or [{} for _ in prompts]
    groups = [[{"input_ids": p + c, "labels": [IGNORE] * len(p) + c,
                "token_extras": {k: list(v) + [0] * len(c) for k, v in ex.items()}} for c in g]
              for p, g, ex in zip(prompts, completions, extras)]
    rows = shared_prefix_rows(groups, [len(p) for p in prompts], pad_token_id, order="group")
    p_len = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    tok_in_completion = rows["token_index"] - p_len[rows["logits_index"][:, 0]]
    return GroupRows(input_ids=rows["input_ids"], position_ids=rows["position_ids"], segments=rows["segments"],
                     allowed=segment_attention_mask(rows["segments"]), logits_index=rows["logits_index"],
                     targets=rows["targets"], out_index=torch.stack([rows["seq_index"], tok_in_completion], 1),
                     lengths=torch.tensor([len(c) for g in completions for c in g], dtype=torch.long),
                     token_extras=rows["token_extras"])


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
    """Per-token log-probs `[r*G, t]` (float32 at least; 0 past each completion's end) and the completion mask
    `[r*G, t]` of the grouped rows, in one forward of `vlm` (differentiable). `pixel_values` holds each group's
    images once, in row order; or pass `image_embeds` (`vlm.encode_images` output) to reuse features encoded for generation.
    With `return_entropy`, also the entropy of each predicting distribution `[r*G, t]` (detached; for logging)."""
    logits = vlm(rows.input_ids, pixel_values, attention_mask=attention_mask_for(vlm, rows.allowed),
                 position_ids=rows.position_ids, logits_mask=rows.logits_index, image_embeds=image_embeds)
    return scatter_token_logps(logits, rows, return_entropy)


def scatter_token_logps(logits: torch.Tensor, rows: GroupRows, return_entropy: bool = False):
    """Logits `[n, v]` at `rows.logits_index` → per-token log-probs `[r*G, t]` of the targets (float32, 0 past each
    completion's end), the completion mask `[r*G, t]` and, with `return_entropy`, each predicting distribution's
    entropy `[r*G, t]` (detached)."""
    dev = logits.device
    logp_all = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)  # [n, v]
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
