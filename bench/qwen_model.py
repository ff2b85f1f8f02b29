"""The Qwen2.5-VL-shaped model the `--family qwen2_5_vl` benches train: tens of millions of parameters, written
offline as a `save_pretrained` folder (model + processor), so both sides load it the way a user loads a checkpoint.

The tokenizer, image processor and chat template are those of `vlmtrain.model.native.tiny` (vlmtrain's offline BPE
with Qwen's special tokens; Qwen's own image processor; the official Qwen2.5-VL template); only the dimensions grow:
a 6-layer 512-d LM (GQA 8/4 heads, head_dim 64, mRoPE sections 8/12/12 as Qwen's 16/24/24 halved) and a 4-block
256-d vision tower with window attention (window 112 px, full attention in the last block, as the 7B's
`fullatt_block_indexes` pattern) and the 2×2 patch merger. Dynamic resolution: 4 … 64 merged image tokens per image
(one token = 28×28 px), so the benches' images of 56–224 px per side get different token counts.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILY = "qwen2_5_vl"
TEXT = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 6, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 64, "max_position_embeddings": 4096}
VISION = {"depth": 4, "hidden_size": 256, "intermediate_size": 704, "num_heads": 4, "out_hidden_size": 512,
          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
          "fullatt_block_indexes": [3]}
UNIT = 28  # pixels per side of one merged image token (patch 14 × merge 2)
MIN_TOKENS, MAX_TOKENS = 4, 64


def write_checkpoint(out: str | Path, quick: bool = False, seed: int = 0) -> Path:
    """Random-weight Qwen2.5-VL-shaped model + its processor, `save_pretrained` into `out`."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmtrain.model.native.processor import build_image_only, save_processor
    from vlmtrain.model.native.tiny import tiny_parts, write_tiny_checkpoint
    from vlmtrain.model.native.templates import official_template

    if quick:
        return write_tiny_checkpoint(FAMILY, out, seed=seed)
    tiny_cfg, ip, tok, proc_kwargs = tiny_parts(FAMILY)
    ids = {k: getattr(tiny_cfg, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                              "vision_end_token_id")}
    text = {**TEXT, "vocab_size": tiny_cfg.text_config.vocab_size, "bos_token_id": None,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}}
    cfg = AutoConfig.for_model(FAMILY, text_config=text, vision_config=VISION, **ids)
    ip.size = {"shortest_edge": MIN_TOKENS * UNIT * UNIT, "longest_edge": MAX_TOKENS * UNIT * UNIT}
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    proc = build_image_only(FAMILY, ip, tok, chat_template=official_template(FAMILY), **proc_kwargs)
    out = Path(out)
    model.save_pretrained(out)
    save_processor(proc, out)
    return out
