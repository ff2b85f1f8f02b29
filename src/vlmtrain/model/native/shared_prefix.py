"""Shared-prefix rows (`vlmtrain.data.prefix`) on a native transformers VLM: the attention masks and the 3-D mRoPE
position ids that make every continuation of a row see exactly what it sees in its own sequence.

Masks. allowed(q, k) = (k in the prefix ∨ k in q's segment) ∧ (k ≤ q ∨ q, k in the same image block)
[∧ pos(q) − pos(k) < window on sliding layers]. They are built with transformers' own `create_causal_mask` (with
these rules as mask functions, no packing detection), so each attention implementation gets the form it takes
(sdpa: bool `[b, 1, s, s]`, eager: additive float). transformers 5.23 returns a 4-D mask unchanged for every listed
family (`masking_utils._preprocess_mask_arguments`: "already 4D ... returned as-is"), but it then serves full and
sliding layers alike; a model with sliding layers therefore gets a dict `{"full_attention", "sliding_attention"}`,
which the text models that have such layers (Gemma 3, Qwen2) take as prepared masks, and a model whose every layer
slides (a `sliding_window` without `layer_types`: Mistral) the sliding mask. The window compares *positions*,
not row indices: the second continuation of a row sits further right than its positions say.
Image blocks (`Family.bidirectional_images`): image tokens attend to their whole image, numbered as transformers
does (`get_block_sequence_ids_for_mask`); images lie in the prefix, so the blocks do too. Gemma 3 marks them with
`token_type_ids` on every layer; Gemma 4 with `mm_token_type_ids` on sliding layers only, and only where its text
config says `use_bidirectional_attention: vision` (`Family.image_block_key`, `image_blocks_sliding_only`).
Prefix block (`Family.prefix_suffix`, PaliGemma): every token with `token_type_ids` 0 (image tokens + prompt) is one
bidirectional block per row; those tokens are all in the shared prefix (the prompt is the same for every
continuation), so each continuation sees the whole block as alone. Its positions start at 1
(`Family.position_offset`).

mRoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): a continuation's 3-D ids depend on the whole prefix (image grids advance the
text index by the grid's extent, not its token count), so each continuation's ids come from the model's own
`get_rope_index` on prefix + continuation, exactly the sequence it is alone, and are placed at its row positions.
"""

from __future__ import annotations

import torch

from vlmtrain.errors import VlmtrainError

# attention implementations whose masks are built from mask functions (flash attention takes only a padding mask, so
# a continuation would see the others)
MASKED_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


def shared_prefix_masks(model, segments: torch.Tensor, position_ids: torch.Tensor,
                        token_type_ids: torch.Tensor | None):
    """Attention masks of shared-prefix rows for the NativeVLM `model`: a 4-D mask, or per layer type a dict of them
    when the LM has sliding-window layers (module doc). `segments [b, s]` (0 prefix, j ≥ 1 continuation, -1 pad),
    `position_ids [b, s]` (1-D text positions), `token_type_ids [b, s]`: the batch's `Family.image_block_key` tensor
    (1 = image token) for families with bidirectional image blocks, PaliGemma's `token_type_ids` (0 = prefix)."""
    from transformers.masking_utils import and_masks, blockwise_overlay, create_causal_mask

    cfg = model.llm.config
    impl = getattr(cfg, "_attn_implementation", None) or "sdpa"
    if impl not in MASKED_IMPLEMENTATIONS:
        raise VlmtrainError("shared-prefix rows need attention with custom masks "
                            f"({', '.join(MASKED_IMPLEMENTATIONS)}); the model uses {impl} "
                            "(set dpo.share_prompt: false)")

    def same_branch(batch_idx, head_idx, q_idx, kv_idx):
        kv = segments[batch_idx, kv_idx]
        return (kv == 0) | (kv == segments[batch_idx, q_idx])

    dtype = model.llm.get_input_embeddings().weight.dtype
    probe = torch.empty((*segments.shape, 0), dtype=dtype, device=segments.device)  # batch, length, dtype only
    common = {"config": cfg, "inputs_embeds": probe, "attention_mask": None, "past_key_values": None}
    blocks = _blocks(model.family, cfg, segments, token_type_ids)
    overlay = {"or_mask_function": blockwise_overlay(blocks)} if blocks is not None else {}
    # Gemma 4 keeps its full-attention layers causal (its create_masks_for_vision_model)
    full = create_causal_mask(**common, **({} if model.family.image_blocks_sliding_only else overlay),
                              and_mask_function=same_branch)
    # a `sliding_window` only counts where the config class declares it: LlamaConfig and GLM's text config keep a
    # stray key of a config.json that their forward never reads
    window = getattr(cfg, "sliding_window", None) if _declares(cfg, "sliding_window") else None
    layer_types = getattr(cfg, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return full

    def within_window(batch_idx, head_idx, q_idx, kv_idx):  # transformers' sliding_window_overlay, by position
        return position_ids[batch_idx, kv_idx] > position_ids[batch_idx, q_idx] - window

    sliding = create_causal_mask(**common, **overlay, and_mask_function=and_masks(same_branch, within_window))
    # a `sliding_window` without `layer_types` (Mistral, Mistral 3's LM) slides in every layer: those models call
    # create_sliding_window_causal_mask whenever it is set
    return sliding if layer_types is None else {"full_attention": full, "sliding_attention": sliding}


def _declares(cfg, name: str) -> bool:
    """Whether `cfg`'s class (or a base) declares the field `name` (transformers 5 configs annotate their fields)."""
    return any(name in vars(k).get("__annotations__", {}) for k in type(cfg).__mro__)


def _blocks(family, text_cfg, segments: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor | None:
    """`[b, s]` bidirectional block ids of shared-prefix rows (-1 = none), or None when the family has no blocks:
    image blocks (`bidirectional_images`; Gemma 4 only with `use_bidirectional_attention: vision`, as its model
    checks) or PaliGemma's prefix block (`prefix_suffix`: every non-padding token with token_type_ids 0, block 0,
    as its `torch.where(token_type_ids == 0, 0, -1)`; padding is excluded by `segments` anyway)."""
    if token_type_ids is None:
        return None
    if family.prefix_suffix:
        return torch.where((token_type_ids == 0) & (segments >= 0), 0, -1)
    if not family.bidirectional_images:
        return None
    if family.image_blocks_sliding_only and getattr(text_cfg, "use_bidirectional_attention", None) != "vision":
        return None  # Gemma 4 sizes whose images attend causally
    return _image_blocks(token_type_ids)


def _image_blocks(token_type_ids: torch.Tensor) -> torch.Tensor:
    """`[b, s]` → `[b, s]`: the index of each image token's image within its row, -1 elsewhere (Gemma 3's
    `get_block_sequence_ids_for_mask` numbering)."""
    is_image = token_type_ids == 1
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    return torch.where(is_image, starts.long().cumsum(1) - 1, -1)


def shared_prefix_mrope_positions(rope_index, input_ids: torch.Tensor, segments: torch.Tensor,
                                  position_ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None,
                                  image_grid_thw: torch.Tensor | None) -> torch.Tensor:
    """`[4, b, s]` position ids of shared-prefix rows for an mRoPE family: row 0 the 1-D text positions, rows 1–3
    each continuation's ids from `rope_index` (the model's `get_rope_index`) on prefix + continuation.

    `mm_token_type_ids [b, s]` (1 = image token) tells which row owns which of `image_grid_thw [n_img, 3]`'s rows,
    in order, one per run of image tokens (all in prefixes). Padding keeps its text positions."""
    if mm_token_type_ids is None:
        raise VlmtrainError("shared-prefix rows: the batch has no mm_token_type_ids (the processor's modality map), "
                            "which 3-D mRoPE positions need")
    out = position_ids.new_zeros((4, *position_ids.shape))
    out[0] = position_ids
    out[1:] = position_ids
    first_image = 0
    for row in range(input_ids.shape[0]):
        seg, types = segments[row], mm_token_type_ids[row]
        prefix = seg == 0
        n_images = int((prefix & (types == 1) & (torch.cat([types.new_zeros(1), types[:-1]]) != 1)).sum())
        grids = image_grid_thw[first_image:first_image + n_images] if n_images else None
        first_image += n_images
        for j in range(1, max(int(seg.max()), 1) + 1):  # at least once: a row whose continuations are all empty
            where = (prefix | (seg == j)).nonzero().flatten()  # prefix + continuation j, in order
            pos, _ = rope_index(input_ids[row, where][None], mm_token_type_ids=types[where][None],
                                image_grid_thw=grids)
            out[1:, row, where] = pos[:, 0].to(out.dtype)
    return out
