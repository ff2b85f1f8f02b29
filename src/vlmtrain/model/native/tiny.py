"""Tiny checkpoints of each native family, written as a user's checkpoint folder is: `save_pretrained` of a
random-weight model and of its processor (tokenizer + image processor + official chat template).

Tests, the native demo recipes and the benchmarks load these folders with `pretrained: DIR`, exactly as they
would load a downloaded checkpoint; nothing is fetched. The tokenizer is vlmtrain's offline byte-level BPE with
the family's special tokens added, so the family's own templates and processors work unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmtrain.model.native.processor import build_image_only, save_processor

# Shared tiny LM shape: head_dim 16 (Qwen's mRoPE sections split its 8 rotary pairs as 2/3/3).
_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096}
_VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": 32, "patch_size": 8}

_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
_CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
_LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "<image>"]
_GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                   "<end_of_image>", "<image_soft_token>"]
_IDEFICS_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                     "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]

_MLLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                    "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>", "<|image|>"]

TINY_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "idefics3", "smolvlm", "llava_onevision",
                 "llava_next", "llava", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "mllama", "internvl", "gemma4",
                 "paligemma", "glm4v", "glm4v_moe", "mistral3", "llama4", "lfm2_vl")
# Gemma 4's turn markers, image/audio wrappers and placeholders (the processor reads boi/eoi/image and boa/eoa/audio
# token names from the tokenizer; it refuses a tokenizer without the audio ones)
_GEMMA4_SPECIALS = ["<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>", "<|audio>",
                    "<audio|>", "<|audio|>", "<|video|>"]
_INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
# Qwen3-VL's tower (patch 16, learned position table, mRoPE interleaved) is shared by these
_QWEN3_TOWER = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
# MoE text configs: 4 experts, top-2, every layer sparse (as the published Qwen MoE checkpoints)
_MOE = {"moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2}


def _tokenizer(specials: list[str], bos: str | None, eos: str, pad: str, extra: dict | None = None):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from vlmtrain.model.tokenizer import _train_tiny_bpe

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_train_tiny_bpe(512)), bos_token=bos,
                                  eos_token=eos, pad_token=pad, extra_special_tokens=extra or {})
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def _vocab(tok) -> int:
    return -(-len(tok) // 64) * 64


def _ids(tok, **tokens) -> dict[str, int]:
    return {k: tok.convert_tokens_to_ids(v) for k, v in tokens.items()}


def _qwen(model_type: str):
    from transformers import AutoConfig, Qwen2VLImageProcessorPil

    specials = _QWEN_SPECIALS + (["<think>", "</think>"] if model_type.startswith("qwen3_5") else [])
    tok = _tokenizer(specials, None, "<|im_end|>", "<|endoftext|>")
    ids = _ids(tok, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
               vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
    text = {**_TEXT, "vocab_size": _vocab(tok), "bos_token_id": None, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}}
    patch = 16 if model_type in _QWEN3_TOWER else 14
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
              "patch_size": patch, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if model_type == "qwen2_5_vl":
        vision.update(window_size=4 * patch, fullatt_block_indexes=[1])
    if model_type == "qwen2_vl":
        vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2, "num_heads": 2, "patch_size": patch,
                  "spatial_merge_size": 2, "temporal_patch_size": 2}
    if model_type in _QWEN3_TOWER:
        vision.update(num_position_embeddings=64)
        text["rope_parameters"]["mrope_interleaved"] = True
    if model_type in ("qwen3_vl", "qwen3_vl_moe"):
        vision.update(deepstack_visual_indexes=[0])
    if model_type == "qwen3_vl_moe":
        text.update(_MOE, decoder_sparse_step=1)
    if model_type.startswith("qwen3_5"):
        text.update(_qwen3_5_text(model_type))
    if model_type == "qwen3_5_moe":
        del text["intermediate_size"]  # its text config has no dense MLP width (every layer is sparse)
    cfg = AutoConfig.for_model(model_type, text_config=text, vision_config=vision, **ids)
    unit = patch * 2  # one merged image token covers unit × unit pixels
    ip = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": 4 * unit * unit, "longest_edge": 16 * unit * unit})
    return cfg, ip, tok, {}


def _qwen3_5_text(model_type: str) -> dict:
    """Text-config fields of a tiny Qwen3.5: one Gated DeltaNet layer, then one full-attention layer.

    `layer_types` must be given: the default comes from `full_attention_interval=4`, which makes both of two layers
    linear attention, and transformers' cache then has no attention layer to read the sequence length from."""
    fields = {
        # Qwen3.5 rotates a quarter of head_dim 256 (mRoPE 11/11/10 pairs); at head_dim 16 half: 4 pairs 2/1/1
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.5,
                            "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        "layer_types": ["linear_attention", "full_attention"],
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    }
    if model_type == "qwen3_5_moe":
        fields.update(_MOE, shared_expert_intermediate_size=32)
    return fields


def _gemma3():
    from transformers import AutoConfig, Gemma3ImageProcessorPil

    tok = _tokenizer(_GEMMA_SPECIALS, "<bos>", "<eos>", "<pad>",
                     extra={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                            "image_token": "<image_soft_token>"})
    text = {**_TEXT, "vocab_size": _vocab(tok), "query_pre_attn_scalar": 16, "sliding_window": 64,
            "layer_types": ["sliding_attention", "full_attention"], "bos_token_id": tok.bos_token_id,
            "eos_token_id": [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")],
            "pad_token_id": tok.pad_token_id}
    vision = {**_VIT, "model_type": "siglip_vision_model", "vision_use_head": False}
    cfg = AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4,
                               **_ids(tok, boi_token_index="<start_of_image>", eoi_token_index="<end_of_image>",
                                      image_token_index="<image_soft_token>"))
    ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    return cfg, ip, tok, {"image_seq_length": 4}


def _idefics3(model_type: str):
    from transformers import AutoConfig, Idefics3ImageProcessorPil, SmolVLMImageProcessorPil

    tok = _tokenizer(_IDEFICS_SPECIALS, None, "<end_of_utterance>", "<|endoftext|>")
    text = {**_TEXT, "model_type": "llama", "vocab_size": _vocab(tok), "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}
    cfg = AutoConfig.for_model(model_type, text_config=text, vision_config={**_VIT}, scale_factor=2,
                               **_ids(tok, image_token_id="<image>"), pad_token_id=tok.pad_token_id)
    cls = SmolVLMImageProcessorPil if model_type == "smolvlm" else Idefics3ImageProcessorPil
    ip = cls(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
    return cfg, ip, tok, {"image_seq_len": 4}


def _llava(model_type: str):
    from transformers import AutoConfig, CLIPImageProcessorPil, LlavaNextImageProcessorPil, \
        LlavaOnevisionImageProcessorPil

    pinpoints = [[32, 64], [64, 32], [64, 64]]
    if model_type == "llava_onevision":
        tok = _tokenizer(_CHATML_SPECIALS, None, "<|im_end|>", "<|endoftext|>")
        text = {**_TEXT, "model_type": "qwen2", "vocab_size": _vocab(tok), "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id}
        vision = {**_VIT, "model_type": "siglip_vision_model", "vision_use_head": False}
        cfg = AutoConfig.for_model(model_type, text_config=text, vision_config=vision,
                                   image_grid_pinpoints=[[32, 32]] + pinpoints, vision_feature_layer=-1,
                                   vision_feature_select_strategy="full",
                                   **_ids(tok, image_token_index="<image>", video_token_index="<video>"))
        ip = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                             image_grid_pinpoints=[[32, 32]] + pinpoints)
        return cfg, ip, tok, {"num_image_tokens": 16, "vision_feature_select_strategy": "full",
                              "vision_aspect_ratio": "anyres_max_9"}
    tok = _tokenizer(_LLAMA_SPECIALS, "<s>", "</s>", "<unk>")
    text = {**_TEXT, "model_type": "llama", "vocab_size": _vocab(tok), "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {**_VIT, "model_type": "clip_vision_model", "projection_dim": 32}
    extra = {"image_grid_pinpoints": pinpoints} if model_type == "llava_next" else {"image_seq_length": 16}
    cfg = AutoConfig.for_model(model_type, text_config=text, vision_config=vision, vision_feature_layer=-2,
                               vision_feature_select_strategy="default",
                               **_ids(tok, image_token_index="<image>"), **extra)
    if model_type == "llava_next":
        ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                        image_grid_pinpoints=pinpoints)
    else:
        ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return cfg, ip, tok, {"patch_size": 8, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}


def _mllama():
    """Llama 3.2 Vision: 3 LM layers, the middle one cross-attention; a 2-layer tower + 1 gated global layer, 32 px
    tiles (4 per image), `vision_output_dim` = hidden × (the 2 intermediate layers + the last)."""
    from transformers import AutoConfig, MllamaImageProcessorPil

    tok = _tokenizer(_MLLAMA_SPECIALS, "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
                     extra={"image_token": "<|image|>"})
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096, "cross_attention_layers": [1],
            "vocab_size": _vocab(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_global_layers": 1,
              "attention_heads": 2, "image_size": 32, "patch_size": 8, "max_num_tiles": 4,
              "intermediate_layers_indices": [0, 1], "vision_output_dim": 96}
    cfg = AutoConfig.for_model("mllama", text_config=text, vision_config=vision,
                               **_ids(tok, image_token_index="<|image|>"))
    ip = MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=4)
    return cfg, ip, tok, {}


def _internvl():
    """InternVL with a Qwen2 LM; 32 px tiles of 8 px patches, pixel shuffle 0.5 → 4 tokens per tile; an image is cut
    into up to 4 tiles (+ a thumbnail when it has more than one), as the checkpoints' `crop_to_patches` does."""
    from transformers import AutoConfig, GotOcr2ImageProcessorPil

    # the processor reads these names (and their `_id`s) from the tokenizer
    tok = _tokenizer(_INTERNVL_SPECIALS, None, "<|im_end|>", "<|endoftext|>",
                     extra={"start_image_token": "<img>", "end_image_token": "</img>",
                            "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    text = {**_TEXT, "model_type": "qwen2", "vocab_size": _vocab(tok), "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}
    vision = {**_VIT, "image_size": [32, 32], "patch_size": [8, 8]}
    cfg = AutoConfig.for_model("internvl", text_config=text, vision_config=vision, downsample_ratio=0.5,
                               image_seq_length=4, vision_feature_layer=-1, vision_feature_select_strategy="default",
                               **_ids(tok, image_token_id="<IMG_CONTEXT>"))
    ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                                  max_patches=4)
    return cfg, ip, tok, {"image_seq_length": 4}


def _gemma4():
    """Gemma 4: a sliding then a full-attention layer (full layers use `global_head_dim`), per-layer inputs of width
    8, images bidirectional on sliding layers (`use_bidirectional_attention: vision`); a 2-layer tower of 8 px patches
    pooled 2×2 (at most 70 soft tokens = 280 patches per image, the processor's smallest budget); a 1-layer audio
    tower (the frozen role) and the audio feature extractor the processor requires."""
    from transformers import AutoConfig, Gemma4AudioFeatureExtractor, Gemma4ImageProcessorPil

    tok = _tokenizer(_GEMMA4_SPECIALS, "<bos>", "<eos>", "<pad>",
                     extra={"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
                            "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"})
    text = {**_TEXT, "vocab_size": _vocab(tok), "vocab_size_per_layer_input": _vocab(tok),
            "hidden_size_per_layer_input": 8, "sliding_window": 64, "global_head_dim": 32,
            "layer_types": ["sliding_attention", "full_attention"], "use_bidirectional_attention": "vision",
            "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
            "eos_token_id": [tok.eos_token_id, tok.convert_tokens_to_ids("<turn|>")]}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "head_dim": 16, "patch_size": 8, "pooling_kernel_size": 2,
              "position_embedding_size": 64}
    audio = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "subsampling_conv_channels": [8, 4],
             "output_proj_dims": 32}
    cfg = AutoConfig.for_model("gemma4", text_config=text, vision_config=vision, audio_config=audio,
                               **_ids(tok, boi_token_id="<|image>", eoi_token_id="<image|>", image_token_id="<|image|>",
                                      boa_token_id="<|audio>", eoa_token_index="<audio|>", audio_token_id="<|audio|>",
                                      video_token_id="<|video|>"))
    ip = Gemma4ImageProcessorPil(patch_size=8, max_soft_tokens=70, pooling_kernel_size=2)
    return cfg, ip, tok, {"feature_extractor": Gemma4AudioFeatureExtractor(), "image_seq_length": 70}


def _paligemma():
    """PaliGemma: a Gemma LM, a SigLIP tower of 32 px images in 8 px patches (16 image tokens, every patch a token),
    its linear projector; the processor's `<image>` token and its `token_type_ids` for prefix / suffix."""
    from transformers import AutoConfig, SiglipImageProcessorPil

    tok = _tokenizer(["<pad>", "<eos>", "<bos>", "<image>"], "<bos>", "<eos>", "<pad>",
                     extra={"image_token": "<image>"})
    text = {**_TEXT, "model_type": "gemma", "vocab_size": _vocab(tok), "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {**_VIT, "model_type": "siglip_vision_model", "projection_dim": 64}
    cfg = AutoConfig.for_model("paligemma", text_config=text, vision_config=vision, projection_dim=64, hidden_size=64,
                               vocab_size=_vocab(tok), **_ids(tok, image_token_index="<image>"))
    ip = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    ip.image_seq_length = 16  # PaliGemmaProcessor reads the image-token count from its image processor
    return cfg, ip, tok, {}


_GLM4V_SPECIALS = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|begin_of_image|>",
                   "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>", "<|video|>"]


def _glm4v(model_type: str):
    """GLM-4.1V / 4.5V: a 2-layer tower of 8 px patches (2×2 merged by its downsample conv: one token per 16×16 px),
    rotary on half of head_dim 16 (mRoPE 2/1/1 pairs, as the checkpoints' 0.5 factor); the MoE LM has one dense layer
    then one of 4 routed experts (top 2) + a shared expert."""
    from transformers import AutoConfig, Glm4vImageProcessorPil

    tok = _tokenizer(_GLM4V_SPECIALS, None, "<|user|>", "<|endoftext|>",
                     extra={"image_token": "<|image|>", "video_token": "<|video|>"})
    text = {**_TEXT, "vocab_size": _vocab(tok), "eos_token_id": [tok.convert_tokens_to_ids("<|endoftext|>"),
                                                                tok.eos_token_id], "pad_token_id": tok.pad_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                                "mrope_section": [2, 1, 1]}}
    if model_type == "glm4v_moe":
        text.update(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                    first_k_dense_replace=1, n_group=1, topk_group=1)
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
              "patch_size": 8, "image_size": 32, "spatial_merge_size": 2, "temporal_patch_size": 2}
    cfg = AutoConfig.for_model(model_type, text_config=text, vision_config=vision,
                               **_ids(tok, image_token_id="<|image|>", video_token_id="<|video|>",
                                      image_start_token_id="<|begin_of_image|>", image_end_token_id="<|end_of_image|>",
                                      video_start_token_id="<|begin_of_video|>", video_end_token_id="<|end_of_video|>"))
    unit = 16  # one merged token covers 16 × 16 px
    ip = Glm4vImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                size={"shortest_edge": 4 * unit * unit, "longest_edge": 16 * unit * unit})
    return cfg, ip, tok, {}


# Mistral 3's tokenizer specials (Tekken): turn markers and the three image tokens PixtralProcessor reads
_MISTRAL3_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
                      "[IMG_BREAK]", "[IMG_END]"]


def _mistral3():
    """Mistral 3 (Mistral-Small-3.1): a 2-layer Pixtral tower of 8 px patches (2D RoPE over the image's own grid),
    the patch merger (2×2 patches → one token: 16×16 px) and a Mistral LM; images keep their aspect ratio, longest
    edge 64 px, each row of tokens closed by [IMG_BREAK] and the image by [IMG_END]."""
    from transformers import AutoConfig, PixtralImageProcessorPil

    tok = _tokenizer(_MISTRAL3_SPECIALS, "<s>", "</s>", "<unk>")
    text = {**_TEXT, "model_type": "mistral", "vocab_size": _vocab(tok), "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "sliding_window": None}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "head_dim": 16, "image_size": 64, "patch_size": 8}
    cfg = AutoConfig.for_model("mistral3", text_config=text, vision_config=vision, spatial_merge_size=2,
                               vision_feature_layer=-1, **_ids(tok, image_token_index="[IMG]"))
    # the processor passes patch_size × spatial_merge_size (16) to the image processor, as the checkpoints do
    ip = PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size={"height": 16, "width": 16})
    return cfg, ip, tok, {"patch_size": 8, "spatial_merge_size": 2}


_LLAMA4_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad|>", "<|header_start|>",
                    "<|header_end|>", "<|eot|>", "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
                    "<|tile_x_separator|>", "<|tile_y_separator|>"]


def _llama4():
    """Llama 4 (Scout/Maverick layout): a chunked-attention MoE layer (4 routed experts, top-1, + the shared expert)
    then a full-attention dense NoPE layer, chunks of 16 tokens so packed rows cross chunk borders; a 2-layer tower
    of 8 px patches on 32 px tiles, pixel shuffle 0.5 (4 `<|patch|>` tokens per tile), up to 4 tiles + a global
    tile per image."""
    from transformers import AutoConfig

    from vlmtrain.model.native.image_processors.llama4 import Llama4ImageProcessorPil

    tok = _tokenizer(_LLAMA4_SPECIALS, "<|begin_of_text|>", "<|eot|>", "<|finetune_right_pad|>")
    text = {**_TEXT, "vocab_size": _vocab(tok), "intermediate_size_mlp": 128, "num_local_experts": 4,
            "num_experts_per_tok": 1, "moe_layers": [0], "no_rope_layers": [1, 0], "attention_chunk_size": 16,
            "floor_scale": 16, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
            "eos_token_id": [tok.eos_token_id, tok.convert_tokens_to_ids("<|end_of_text|>")]}
    # intermediate_size is 4 × hidden: the pixel-shuffle MLP takes the 2×2-shuffled features (as the checkpoints)
    vision = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8, "pixel_shuffle_ratio": 0.5, "vision_output_dim": 64,
              "projector_input_dim": 64, "projector_output_dim": 64}
    cfg = AutoConfig.for_model("llama4", text_config=text, vision_config=vision,
                               **_ids(tok, image_token_index="<|patch|>", boi_token_index="<|image_start|>",
                                      eoi_token_index="<|image_end|>"))
    ip = Llama4ImageProcessorPil(size={"height": 32, "width": 32}, max_patches=4)
    return cfg, ip, tok, {"patch_size": 8, "pixel_shuffle_ratio": 0.5}


_LFM2_VL_SPECIALS = ["<|startoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<image>", "<|image_start|>",
                     "<|image_end|>", "<|img_thumbnail|>"] + \
    [f"<|img_row_{r}_col_{c}|>" for r in range(1, 5) for c in range(1, 5)]


def _lfm2_vl():
    """LFM2-VL: an LFM2 LM of one gated short-convolution layer (kernel 3) then one attention layer; a 2-layer SigLIP2
    NaFlex tower of 8 px patches, pixel unshuffle 2 (a 16×16 px region per token) and the MLP projector; 32 px tiles
    (2-4 per large image + a thumbnail), 4-16 tokens per single-tile image."""
    from transformers import AutoConfig

    from vlmtrain.model.native.image_processors.lfm2_vl import Lfm2VlImageProcessorPil

    tok = _tokenizer(_LFM2_VL_SPECIALS, "<|startoftext|>", "<|im_end|>", "<|pad|>",
                     extra={"image_token": "<image>", "image_start_token": "<|image_start|>",
                            "image_end_token": "<|image_end|>", "image_thumbnail_token": "<|img_thumbnail|>"})
    text = {**_TEXT, "vocab_size": _vocab(tok), "layer_types": ["conv", "full_attention"], "conv_L_cache": 3,
            "block_ff_dim": 128, "block_auto_adjust_ff_dim": False, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "patch_size": 8, "num_patches": 16, "vision_use_head": False}
    cfg = AutoConfig.for_model("lfm2_vl", text_config=text, vision_config=vision, downsample_factor=2,
                               projector_hidden_size=64, **_ids(tok, image_token_id="<image>"))
    ip = Lfm2VlImageProcessorPil(encoder_patch_size=8, downsample_factor=2, tile_size=32, min_image_tokens=4,
                                 max_image_tokens=16, min_tiles=2, max_tiles=4)
    return cfg, ip, tok, {}


def _open_gates(model) -> None:
    """Mllama's cross-attention layers scale their output by tanh(gate), and transformers initialises the gates to 0:
    a random tiny model would then ignore its images. Trained checkpoints have non-zero gates; so do these."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                p.fill_(0.5)


def tiny_parts(model_type: str):
    """(config, image processor, tokenizer, processor kwargs) of a tiny model of the family."""
    if model_type.startswith("qwen"):
        return _qwen(model_type)
    if model_type == "gemma3":
        return _gemma3()
    if model_type in ("idefics3", "smolvlm"):
        return _idefics3(model_type)
    if model_type in ("llava", "llava_next", "llava_onevision"):
        return _llava(model_type)
    if model_type == "mllama":
        return _mllama()
    if model_type == "internvl":
        return _internvl()
    if model_type == "gemma4":
        return _gemma4()
    if model_type == "paligemma":
        return _paligemma()
    if model_type.startswith("glm4v"):
        return _glm4v(model_type)
    if model_type == "mistral3":
        return _mistral3()
    if model_type == "llama4":
        return _llama4()
    if model_type == "lfm2_vl":
        return _lfm2_vl()
    raise ValueError(f"no tiny builder for {model_type!r} (have: {', '.join(TINY_FAMILIES)})")


def write_tiny_checkpoint(model_type: str, out: str | Path, seed: int = 0) -> Path:
    """Random-weight tiny model + processor of the family, saved with `save_pretrained` into `out`."""
    from transformers import AutoModelForImageTextToText

    from vlmtrain.model.native.families import FAMILIES
    from vlmtrain.model.native.templates import official_template

    cfg, ip, tok, proc_kwargs = tiny_parts(model_type)
    key = FAMILIES[model_type].template
    template = official_template(key) if key else None  # none vendored (InternVL, Gemma 4): the config gives one
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg)
    if model_type == "mllama":
        _open_gates(model)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = cfg.get_text_config().eos_token_id
    proc = build_image_only(model_type, ip, tok, chat_template=template, **proc_kwargs)
    out = Path(out)
    model.save_pretrained(out)
    save_processor(proc, out)
    return out
