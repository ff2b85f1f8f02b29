"""The memory planner on native transformers VLM families, planned vs measured (part of `python -m bench plan`).

Models: the tiny checkpoints of `vlmtrain.model.native.tiny` (the family's own config class, tokenizer and
processor) scaled up to ~10M parameters so that the measured peaks are tens of MiB above allocator noise, written
with `save_pretrained` into a temporary folder and loaded as a user's checkpoint (`pretrained: DIR`).

Measured as `bench.plan` measures composed models (the profiler's allocation running sum over the second of two
training steps, plus the bytes live before it): the stage's model from `build_model`, QLoRA by `quantize_llm_`,
LoRA by PEFT's `inject_adapter_in_model` with the stage's regex, gradient checkpointing by the native model's own
switch (as `fit_stage` does), vlmtrain's `VLMModule.accumulate_lm` and the AdamW `build_optimizer` makes.
The batch comes from the family's processor (one image of the config's size per row → pixel values, grid, image
tokens, token-type ids), then text up to `max_len`: the first half of the text unsupervised, the rest supervised,
row 0 ending in 8 padding positions. The planner gets the same image size and supervised fraction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT

# Scaled tiny shapes: LM 4 layers × 256 wide (GQA 4/2 heads of 64), towers 4 blocks × 128 wide.
_TEXT = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 64}
SCALE = {
    "qwen2_5_vl": {"text": {**_TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                         "mrope_section": [8, 12, 12]}},
                   "vision": {"depth": 4, "hidden_size": 128, "intermediate_size": 384, "num_heads": 4,
                              "out_hidden_size": 256, "window_size": 112, "fullatt_block_indexes": [1, 3]},
                   # 4..400 LM tokens per image (one token = 28×28 px)
                   "processor": {"min_pixels": 4 * 28 * 28, "max_pixels": 400 * 28 * 28}},
    # Qwen3-VL: 16-px patches (one LM token = 32×32 px), DeepStack mergers after tower blocks 1 and 2
    "qwen3_vl": {"text": {**_TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 5e6,
                                                       "mrope_section": [8, 12, 12], "mrope_interleaved": True}},
                 "vision": {"depth": 4, "hidden_size": 128, "intermediate_size": 384, "num_heads": 4,
                            "out_hidden_size": 256, "num_position_embeddings": 256, "deepstack_visual_indexes": [1, 2]},
                 # 4..400 LM tokens per image
                 "processor": {"min_pixels": 4 * 32 * 32, "max_pixels": 400 * 32 * 32}},
    # Qwen3.5 (hybrid): the tiny pattern linear / full attention repeated over 4 layers; Gated DeltaNet 2 key / 4
    # value heads of 64, causal conv 4; a quarter of head_dim 64 rotated (mRoPE 3/3/2 pairs); Qwen3-VL's tower
    # without DeepStack
    "qwen3_5": {"text": {**_TEXT, "linear_key_head_dim": 64, "linear_value_head_dim": 64,
                         "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_conv_kernel_dim": 4,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                             "mrope_section": [3, 3, 2], "mrope_interleaved": True}},
                "vision": {"depth": 4, "hidden_size": 128, "intermediate_size": 384, "num_heads": 4,
                           "out_hidden_size": 256, "num_position_embeddings": 256},
                "processor": {"min_pixels": 4 * 32 * 32, "max_pixels": 400 * 32 * 32}},
    # Qwen3-VL-MoE: every layer 8 experts of width 128, top-2 (router loss at the config's 0.001); Qwen3-VL's tower
    "qwen3_vl_moe": {"text": {**_TEXT, "moe_intermediate_size": 128, "num_experts": 8, "num_experts_per_tok": 2,
                              "rope_parameters": {"rope_type": "default", "rope_theta": 5e6,
                                                  "mrope_section": [8, 12, 12], "mrope_interleaved": True}},
                     "vision": {"depth": 4, "hidden_size": 128, "intermediate_size": 384, "num_heads": 4,
                                "out_hidden_size": 256, "num_position_embeddings": 256,
                                "deepstack_visual_indexes": [1, 2]},
                     "processor": {"min_pixels": 4 * 32 * 32, "max_pixels": 400 * 32 * 32}},
    # Idefics3: 64-px crops of 8-px patches (64 per crop), pixel shuffle ×2 → 16 LM tokens per crop; images up to
    # 128 px on their longest edge → at most 2 × 2 crops + the global view
    "idefics3": {"text": _TEXT,
                 "vision": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                            "num_attention_heads": 4, "image_size": 64, "patch_size": 8},
                 "scale_factor": 2, "crop": 64, "longest_edge": 128, "processor": {}},
    # LLaVA-OneVision: 64-px crops of 8-px patches (64 tower tokens each), AnyRes pinpoints up to 128² → at most
    # 2 × 2 crops + the base view (anyres_max_9 never scales them down at this size)
    "llava_onevision": {"text": _TEXT,
                        "vision": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                                   "num_attention_heads": 4, "image_size": 64, "patch_size": 8},
                        "pinpoints": [[64, 64], [64, 128], [128, 64], [128, 128]], "processor": {}},
    # GLM-4.1V: 8-px patches (one LM token = 16×16 px after the 2×2 downsample conv), half of head_dim 64 rotated
    # (mRoPE 8/4/4 pairs); its processor counts an image as 2 frames against the budget: 4..400 LM tokens
    "glm4v": {"text": {**_TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                    "partial_rotary_factor": 0.5, "mrope_section": [8, 4, 4]}},
              "vision": {"depth": 4, "hidden_size": 128, "intermediate_size": 384, "num_heads": 4,
                         "out_hidden_size": 256},
              "processor": {"size": {"shortest_edge": 2 * 4 * 16 * 16, "longest_edge": 2 * 400 * 16 * 16}},
              # no template is vendored for GLM-4.1V (the batch comes from the processor, not a template): a
              # minimal one with generation marks so the model config builds
              "chat_template": ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' }}{% if m['role'] == "
                                "'assistant' %}{% generation %}{{ m['content'][0]['text'] }}{% endgeneration %}"
                                "{% else %}{{ m['content'][0]['text'] }}{% endif %}{% endfor %}")},
    # GLM-4.5V: GLM-4.1V's tower and processor budget; 4 layers, the first dense, then 8 routed experts of width 128
    # (top 2) + 1 shared expert, with the router loss at the config's coefficient
    "glm4v_moe": {"text": {**_TEXT, "moe_intermediate_size": 128, "n_routed_experts": 8, "num_experts_per_tok": 2,
                           "n_shared_experts": 1, "first_k_dense_replace": 1,
                           "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                                               "mrope_section": [8, 4, 4]}},
                  "vision": {"depth": 4, "hidden_size": 128, "intermediate_size": 384, "num_heads": 4,
                             "out_hidden_size": 256},
                  "processor": {"size": {"shortest_edge": 2 * 4 * 16 * 16, "longest_edge": 2 * 400 * 16 * 16}}},
    # InternVL: 64-px tiles of 8-px patches (64 + CLS through the tower, pixel shuffle ×0.5 → 16 LM tokens per tile),
    # up to 6 tiles per image (+ the thumbnail), a Qwen2 LM
    "internvl": {"text": _TEXT,
                 "vision": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                            "num_attention_heads": 4, "image_size": [64, 64], "patch_size": [8, 8]},
                 "tile": 64, "max_patches": 6, "processor": {},
                 # no template is vendored for InternVL: a minimal one with generation marks so the model builds
                 "chat_template": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] "
                                   "== 'assistant' %}{% generation %}{{ m['content'][0]['text'] }}{{ '<|im_end|>' }}"
                                   "{% endgeneration %}{% else %}{{ m['content'][0]['text'] }}{{ '<|im_end|>' }}"
                                   "{% endif %}{{ '\n' }}{% endfor %}")},
    # Mistral 3: a Mistral LM; a 4-block, 128-wide Pixtral tower of 8-px patches, 2×2 patch merger (one LM token per
    # 16 × 16 px), images resized to a 128-px longest edge (at most 8 × 8 tokens + 8 [IMG_BREAK]s)
    "mistral3": {"text": _TEXT,
                 "vision": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                            "num_attention_heads": 4, "head_dim": 32, "image_size": 128, "patch_size": 8},
                 "longest_edge": 128, "processor": {},
                 # no template is vendored for Mistral 3: a minimal one with generation marks so the model builds
                 "chat_template": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST]' + "
                                   "m['content'][0]['text'] + '[/INST]' }}{% else %}{% generation %}"
                                   "{{ m['content'][0]['text'] + eos_token }}{% endgeneration %}{% endif %}"
                                   "{% endfor %}")},
    # Llama 4: 4 layers — MoE (8 experts of width 256, top 1, + the shared expert) and dense MLP (768) alternating,
    # chunked attention in chunks of 128 with every 4th layer full-attention NoPE; a 4-block, 128-wide tower on
    # 64-px tiles of 8-px patches, pixel shuffle 0.5 (16 `<|patch|>` tokens per tile), up to 4 tiles + the global one
    "llama4": {"text": {**_TEXT, "intermediate_size": 256, "intermediate_size_mlp": 768, "num_local_experts": 8,
                        "num_experts_per_tok": 1, "moe_layers": [0, 2], "no_rope_layers": [1, 1, 1, 0],
                        "attention_chunk_size": 128},
               "vision": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
                          "num_attention_heads": 4, "image_size": 64, "patch_size": 8, "vision_output_dim": 256,
                          "projector_input_dim": 256, "projector_output_dim": 256},
               "tile": 64, "max_patches": 4, "processor": {},
               "chat_template": ("{{ bos_token }}{% for m in messages %}{{ '<|header_start|>' + m['role'] + "
                                 "'<|header_end|>\n\n' }}{% if m['role'] == 'assistant' %}{% generation %}"
                                 "{{ m['content'][0]['text'] + '<|eot|>' }}{% endgeneration %}{% else %}"
                                 "{{ m['content'][0]['text'] + '<|eot|>' }}{% endif %}{% endfor %}")},
    # LFM2-VL: 4 layers alternating gated short convolution (kernel 3) and attention, MLP 768; a 4-block, 128-wide
    # SigLIP2 NaFlex tower of 8-px patches padded to 256 per tile, pixel unshuffle 2 (16 tokens per 64-px tile); a
    # small image is one tile (16-64 tokens), a large one 2-4 tiles + a thumbnail
    "lfm2_vl": {"text": {**_TEXT, "block_ff_dim": 768, "block_auto_adjust_ff_dim": False},
                "vision": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                           "num_attention_heads": 4, "patch_size": 8, "num_patches": 256},
                "processor": {},
                "chat_template": ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
                                  "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'][0]['text'] + "
                                  "'<|im_end|>' }}{% endgeneration %}{% else %}{{ m['content'][0]['text'] + "
                                  "'<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}")},
    # PaliGemma: a Gemma LM; a 4-block, 128-wide SigLIP tower at 64 px in 8-px patches (64 image tokens)
    "paligemma": {"text": _TEXT,
                  "vision": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                             "num_attention_heads": 4, "image_size": 64, "patch_size": 8, "projection_dim": 256},
                  "processor": {}},
    # Gemma 4: sliding / full layers alternating (full layers 128-wide heads), the last 2 layers reusing keys and
    # values, per-layer inputs of 32; a 4-block tower of 8-px patches pooled 2×2, at most 140 soft tokens per image
    "gemma4": {"text": {**_TEXT, "global_head_dim": 128, "hidden_size_per_layer_input": 32, "num_kv_shared_layers": 2,
                        "sliding_window": 128},
               "vision": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                          "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 32},
               "max_soft_tokens": 140, "processor": {},
               # no template is vendored for Gemma 4: a minimal one with generation marks so the model builds
               "chat_template": ("{% for m in messages %}{{ '<|turn>' + m['role'] + '\n' }}{% if m['role'] == "
                                 "'assistant' %}{% generation %}{{ m['content'][0]['text'] }}{{ '<turn|>' }}"
                                 "{% endgeneration %}{% else %}{{ m['content'][0]['text'] }}{{ '<turn|>' }}"
                                 "{% endif %}{{ '\n' }}{% endfor %}")},
    # Gemma 4 26B-A4B's layout: every layer a dense MLP (384) beside 8 experts of width 128 (top 2), full-attention
    # keys doubling as values, no per-layer inputs and no shared keys/values; Gemma 4's tower as above
    "gemma4_moe": {"family": "gemma4",
                   "text": {**_TEXT, "intermediate_size": 384, "global_head_dim": 128, "hidden_size_per_layer_input": 0,
                            "num_kv_shared_layers": 0, "sliding_window": 128, "attention_k_eq_v": True,
                            "num_global_key_value_heads": 1, "enable_moe_block": True, "num_experts": 8,
                            "top_k_experts": 2, "moe_intermediate_size": 128},
                   "vision": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                              "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 32},
                   "max_soft_tokens": 140, "processor": {}},
    "gemma3": {"text": {**_TEXT, "query_pre_attn_scalar": 64, "sliding_window": 128},
               "vision": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                          "num_attention_heads": 4, "image_size": 224, "patch_size": 14},
               "mm_tokens_per_image": 64, "processor": {}},
}
SCALE["glm4v_moe"]["chat_template"] = SCALE["glm4v"]["chat_template"]
SCALE["gemma4_moe"]["chat_template"] = SCALE["gemma4"]["chat_template"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LORA_LLM = {"train": {"vision": False, "connector": False, "llm": "lora"}, "lora": LORA}
# name → (family, image (height, width), stage fields over an SFT stage)
CONFIGS = {
    "qwen-lora-224x224-b2-s512": ("qwen2_5_vl", (224, 224), {**LORA_LLM, "data": {"batch_size": 2, "max_len": 512}}),
    "qwen-lora-448x336-b2-s512": ("qwen2_5_vl", (448, 336), {**LORA_LLM, "data": {"batch_size": 2, "max_len": 512}}),
    "qwen-lora-560x560-b1-s640": ("qwen2_5_vl", (560, 560), {**LORA_LLM, "data": {"batch_size": 1, "max_len": 640}}),
    # packed: 4 samples of 256 tokens per 1,024-token row, one 224² image each (64 image tokens)
    "qwen-lora-pack4-224x224-b1-s1024": ("qwen2_5_vl", (224, 224),
                                         {**LORA_LLM, "data": {"batch_size": 1, "max_len": 256, "mode": "pack",
                                                               "pack_len": 1024}}),
    "qwen-sft-ckpt-336x336-b2-s384": ("qwen2_5_vl", (336, 336),
                                      {"train": {"vision": False, "connector": True, "llm": True},
                                       "data": {"batch_size": 2, "max_len": 384},
                                       "trainer": {"grad_checkpointing": True}}),
    "qwen3-lora-256x320-b2-s512": ("qwen3_vl", (256, 320), {**LORA_LLM, "data": {"batch_size": 2, "max_len": 512}}),
    "qwen3-sft-conn-384x384-b1-s640": ("qwen3_vl", (384, 384),
                                       {"train": {"vision": False, "connector": True, "llm": True},
                                        "data": {"batch_size": 1, "max_len": 640}}),
    "gemma-lora-b2-s256": ("gemma3", (224, 224), {**LORA_LLM, "data": {"batch_size": 2, "max_len": 256}}),
    "idefics3-lora-96x128-b2-s512": ("idefics3", (96, 128), {**LORA_LLM, "data": {"batch_size": 2, "max_len": 512}}),
    "idefics3-sft-conn-128x128-b2-s384": ("idefics3", (128, 128),
                                          {"train": {"vision": False, "connector": True, "llm": True},
                                           "data": {"batch_size": 2, "max_len": 384}}),
    "onevision-lora-96x128-b2-s512": ("llava_onevision", (96, 128),
                                      {**LORA_LLM, "data": {"batch_size": 2, "max_len": 512}}),
    "onevision-sft-conn-128x128-b2-s512": ("llava_onevision", (128, 128),
                                           {"train": {"vision": False, "connector": True, "llm": True},
                                            "data": {"batch_size": 2, "max_len": 512}}),
    "qwen35-lora-256x256-b2-s512": ("qwen3_5", (256, 256), {**LORA_LLM, "data": {"batch_size": 2, "max_len": 512}}),
    "qwen35-sft-conn-256x256-b1-s640": ("qwen3_5", (256, 256),
                                        {"train": {"vision": False, "connector": True, "llm": True},
                                         "data": {"batch_size": 1, "max_len": 640}}),
    "qwen3moe-sft-conn-256x256-b2-s384": ("qwen3_vl_moe", (256, 256),
                                          {"train": {"vision": False, "connector": True, "llm": True},
                                           "data": {"batch_size": 2, "max_len": 384}}),
    # LoRA on the linear layers (attention); the fused experts stay frozen (llm_target_parameters: '')
    "qwen3moe-lora-256x256-b2-s512": ("qwen3_vl_moe", (256, 256),
                                      {"train": LORA_LLM["train"], "lora": {**LORA, "llm_target_parameters": ""},
                                       "data": {"batch_size": 2, "max_len": 512}}),
    "glm4v-lora-224x224-b2-s512": ("glm4v", (224, 224), {**LORA_LLM, "data": {"batch_size": 2, "max_len": 512}}),
    "glm4v-sft-conn-192x256-b1-s640": ("glm4v", (192, 256),
                                       {"train": {"vision": False, "connector": True, "llm": True},
                                        "data": {"batch_size": 1, "max_len": 640}}),
    "glm45v-sft-conn-224x224-b2-s384": ("glm4v_moe", (224, 224),
                                        {"train": {"vision": False, "connector": True, "llm": True},
                                         "data": {"batch_size": 2, "max_len": 384}}),
    # LoRA on the linear layers (attention, the dense MLP, the shared expert); the fused experts stay frozen
    "glm45v-lora-224x224-b2-s512": ("glm4v_moe", (224, 224),
                                    {"train": LORA_LLM["train"], "lora": {**LORA, "llm_target_parameters": ""},
                                     "data": {"batch_size": 2, "max_len": 512}}),
    # 128×192: a 2×3 grid of 64-px tiles + the thumbnail (7 tower passes, 114 LM tokens); 128×128: 2×2 + 1
    "internvl-lora-128x192-b2-s512": ("internvl", (128, 192),
                                      {**LORA_LLM, "data": {"batch_size": 2, "max_len": 512}}),
    "internvl-sft-conn-128x128-b1-s640": ("internvl", (128, 128),
                                          {"train": {"vision": False, "connector": True, "llm": True},
                                           "data": {"batch_size": 1, "max_len": 640}}),
    # Gemma 4: a 160×224 image → 140 soft tokens (the budget), 192×192 → 121, by the processor's resize
    "gemma4-lora-160x224-b2-s512": ("gemma4", (160, 224), {**LORA_LLM, "data": {"batch_size": 2, "max_len": 512}}),
    "gemma4-sft-conn-192x192-b1-s640": ("gemma4", (192, 192),
                                        {"train": {"vision": False, "connector": True, "llm": True},
                                         "data": {"batch_size": 1, "max_len": 640}}),
    "gemma4-lora-ckpt-160x224-b2-s512": ("gemma4", (160, 224), {**LORA_LLM, "data": {"batch_size": 2, "max_len": 512},
                                                                 "trainer": {"grad_checkpointing": True}}),
    # the tower trained too (its blocks traced whole as well), LoRA on the decoder
    "gemma4-vision-160x160-b1-s512": ("gemma4", (160, 160), {"train": {"vision": True, "connector": True,
                                                                        "llm": "lora"},
                                                              "lora": LORA, "data": {"batch_size": 1, "max_len": 512}}),
    # Mistral 3: 128×96 → 8 × 6 tokens (+ 8 breaks), 128×128 → 8 × 8 (+ 8); the tower's one sequence per batch
    "mistral3-lora-128x96-b2-s512": ("mistral3", (128, 96), {**LORA_LLM, "data": {"batch_size": 2, "max_len": 512}}),
    "mistral3-sft-conn-128x128-b1-s640": ("mistral3", (128, 128),
                                          {"train": {"vision": False, "connector": True, "llm": True},
                                           "data": {"batch_size": 1, "max_len": 640}}),
    "mistral3-vision-128x128-b2-s384": ("mistral3", (128, 128), {"train": {"vision": True, "connector": True,
                                                                            "llm": "lora"},
                                                                  "lora": LORA, "data": {"batch_size": 2, "max_len": 384}}),
    # Llama 4: 128×96 → a 2×2 canvas (4 tiles + the global one: 80 patch tokens + separators); 64×64 → one tile
    "llama4-lora-128x96-b2-s512": ("llama4", (128, 96), {"train": LORA_LLM["train"],
                                                         "lora": {**LORA, "llm_target_parameters": ""},
                                                         "data": {"batch_size": 2, "max_len": 512}}),
    "llama4-sft-conn-128x128-b1-s640": ("llama4", (128, 128),
                                        {"train": {"vision": False, "connector": True, "llm": True},
                                         "data": {"batch_size": 1, "max_len": 640}}),
    # LFM2-VL: 256×192 → 4 tiles (2 × 2) + a thumbnail; 64×64 → one tile of 16 tokens
    "lfm2vl-lora-256x192-b2-s512": ("lfm2_vl", (256, 192), {**LORA_LLM, "data": {"batch_size": 2, "max_len": 512}}),
    "lfm2vl-sft-conn-64x64-b1-s640": ("lfm2_vl", (64, 64),
                                      {"train": {"vision": False, "connector": True, "llm": True},
                                       "data": {"batch_size": 1, "max_len": 640}}),
    "paligemma-lora-b2-s512": ("paligemma", (64, 64), {**LORA_LLM, "data": {"batch_size": 2, "max_len": 512}}),
    "paligemma-sft-conn-b1-s640": ("paligemma", (64, 64), {"train": {"vision": False, "connector": True, "llm": True},
                                                          "data": {"batch_size": 1, "max_len": 640}}),
    # Gemma 4 with 26B-A4B's expert block (traced in bf16 on meta, counted at 4 bytes), LoRA on the linear layers
    "gemma4moe-lora-160x224-b2-s512": ("gemma4_moe", (160, 224),
                                       {"train": LORA_LLM["train"], "lora": {**LORA, "llm_target_parameters": ""},
                                        "data": {"batch_size": 2, "max_len": 512}}),
    "gemma4moe-sft-conn-192x192-b1-s640": ("gemma4_moe", (192, 192),
                                           {"train": {"vision": False, "connector": True, "llm": True},
                                            "data": {"batch_size": 1, "max_len": 640}}),
    "gemma-qlora-b2-s256": ("gemma3", (224, 224), {"train": LORA_LLM["train"], "lora": {**LORA, "quantize": "4bit"},
                                                   "data": {"batch_size": 2, "max_len": 256}}),
}


def write_checkpoint(family: str, out: Path) -> dict:
    """The scaled tiny checkpoint of `family` in `out`; returns its native model config (a dict)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlmtrain.model.native.families import FAMILIES
    from vlmtrain.model.native.processor import build_image_only, save_processor
    from vlmtrain.model.native.tiny import tiny_parts
    from vlmtrain.model.native.templates import official_template

    spec = SCALE[family]
    family = spec.get("family", family)  # a variant of a family's layout (gemma4_moe: Gemma 4's expert sizes)
    cfg, ip, tok, proc_kwargs = tiny_parts(family)
    for k, v in spec["text"].items():
        setattr(cfg.text_config, k, v)
    types = getattr(cfg.text_config, "layer_types", None)  # per-layer attention kinds: the tiny pattern, repeated
    if types:
        cfg.text_config.layer_types = [types[i % len(types)] for i in range(cfg.text_config.num_hidden_layers)]
    if family == "gemma4":  # its per-layer config is derived at construction: rebuild it from the fields above
        text = cfg.text_config.to_dict()
        text.pop("per_layer_config")
        cfg.text_config = type(cfg.text_config)(**text)
    for k, v in spec["vision"].items():
        setattr(cfg.vision_config, k, v)
    if family == "idefics3":
        cfg.scale_factor = spec["scale_factor"]
        ip.size, ip.max_image_size = {"longest_edge": spec["longest_edge"]}, {"longest_edge": spec["crop"]}
        proc_kwargs["image_seq_len"] = (spec["crop"] // spec["vision"]["patch_size"]) ** 2 // spec["scale_factor"] ** 2
    if family == "llava_onevision":
        cfg.image_grid_pinpoints = ip.image_grid_pinpoints = spec["pinpoints"]
        crop = spec["vision"]["image_size"]
        ip.size = {"height": crop, "width": crop}
        proc_kwargs["num_image_tokens"] = (crop // spec["vision"]["patch_size"]) ** 2
    if family == "internvl":
        ip.size, ip.max_patches = {"height": spec["tile"], "width": spec["tile"]}, spec["max_patches"]
        vc = spec["vision"]
        cfg.image_seq_length = proc_kwargs["image_seq_length"] = \
            (vc["image_size"][0] // vc["patch_size"][0]) ** 2 // 4  # pixel shuffle ×0.5
    if family == "mistral3":
        ip.size = {"longest_edge": spec["longest_edge"]}
    if family == "lfm2_vl":
        cfg.projector_hidden_size = 256
        for k, v in {"encoder_patch_size": 8, "tile_size": 64, "min_image_tokens": 16, "max_image_tokens": 64,
                     "min_tiles": 2, "max_tiles": 4}.items():
            setattr(ip, k, v)
    if family == "llama4":
        ip.size, ip.max_patches = {"height": spec["tile"], "width": spec["tile"]}, spec["max_patches"]
        cfg.text_config.layer_types = ["full_attention" if not r else "chunked_attention"
                                       for r in spec["text"]["no_rope_layers"]]
    if family == "paligemma":  # the projector's width follows the LM; the processor writes one token per patch
        vc = spec["vision"]
        cfg.projection_dim = cfg.hidden_size = cfg.text_config.hidden_size
        ip.size = {"height": vc["image_size"], "width": vc["image_size"]}
        ip.image_seq_length = cfg.text_config.num_image_tokens = (vc["image_size"] // vc["patch_size"]) ** 2
    if family == "gemma4":
        ip.max_soft_tokens = proc_kwargs["image_seq_length"] = spec["max_soft_tokens"]
    if family == "gemma3":
        cfg.mm_tokens_per_image = spec["mm_tokens_per_image"]
        ip.size = {"height": spec["vision"]["image_size"], "width": spec["vision"]["image_size"]}
        proc_kwargs["image_seq_length"] = spec["mm_tokens_per_image"]
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg)
    template = official_template(FAMILIES[family].template) if FAMILIES[family].template else spec.get("chat_template")
    proc = build_image_only(family, ip, tok, chat_template=template, **proc_kwargs)
    model.save_pretrained(out)
    save_processor(proc, out)
    return {"pretrained": str(out), "processor": spec["processor"],
            **({"chat_template": spec["chat_template"]} if "chat_template" in spec else {})}


def stage_of(model: dict, fields: dict):
    from bench.plan import build_stage

    return build_stage(model, fields)


def samples_per_row(stage) -> int:
    """Samples packed into one row: pack_len // max_len when packing, else 1."""
    d = stage.data
    return (d.pack_len or d.max_len) // d.max_len if d.mode == "pack" else 1


def make_stage_batch(proc, family: str, image_size: tuple[int, int], stage) -> dict:
    d = stage.data
    if d.mode == "pack":
        return make_packed_batch(proc, family, image_size, d.batch_size, d.max_len, samples_per_row(stage))
    return make_native_batch(proc, family, image_size, d.batch_size, d.max_len)


def make_packed_batch(proc, family: str, image_size: tuple[int, int], rows: int, seq: int, per_row: int) -> dict:
    """`rows` packed rows of `per_row` samples, each sample built as `make_native_batch` builds a row (one image,
    text to `seq` tokens, half supervised), collated by vlmtrain's own packing collator (`collate_packed`:
    restarting position ids, no attention mask, per-image and per-token family tensors)."""
    from vlmtrain.data.batching import collate_packed
    from vlmtrain.data.native_encode import TOKEN_EXTRAS

    one = make_native_batch(proc, family, image_size, 1, seq)
    sample = {"input_ids": one["input_ids"][0].tolist(), "labels": one["labels"][0].tolist(),
              "pixel_values": one["pixel_values"],
              "image_extras": {k: one[k] for k in one["model_extras"] if k not in TOKEN_EXTRAS},
              "token_extras": {k: one[k][0].tolist() for k in one["model_extras"]
                               if k in TOKEN_EXTRAS}}
    batch = collate_packed([[sample] * per_row for _ in range(rows)], pad_token_id=0)
    batch["model_extras"] = tuple(batch.get("model_extras", ()))
    return batch


def make_native_batch(proc, family: str, image_size: tuple[int, int], rows: int, seq: int) -> dict:
    """One image per row through the family's processor, then text to `seq` tokens (see the module doc)."""
    family = SCALE.get(family, {}).get("family", family)
    import numpy as np
    import torch
    from PIL import Image

    from vlmtrain.data.native_encode import TOKEN_EXTRAS

    h, w = image_size
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    placeholder = {"idefics3": "<image>", "llava_onevision": "<image>", "gemma3": "<start_of_image>",
                   "glm4v": "<|begin_of_image|><|image|><|end_of_image|>",
                   "glm4v_moe": "<|begin_of_image|><|image|><|end_of_image|>", "internvl": "<IMG_CONTEXT>",
                   "gemma4": "<|image|>", "mistral3": "[IMG]",
                   "paligemma": "<image>", "llama4": "<|image|>",
                   "lfm2_vl": "<image>"}.get(
        family, "<|vision_start|><|image_pad|><|vision_end|>")
    images = [[img]] if family == "gemma3" else [img]
    out = proc(text=[placeholder], images=images, return_tensors="pt", add_special_tokens=False)
    head = out["input_ids"][0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 500, (rows, seq), generator=g)
    ids[:, :len(head)] = head
    labels = ids.clone()
    labels[:, :len(head) + (seq - len(head)) // 2] = -100
    att = torch.ones(rows, seq, dtype=torch.long)
    if rows > 1:
        att[0, -8:] = 0
        labels[0, -8:] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": att}
    extras = []
    for k, v in out.items():
        if k in ("input_ids", "attention_mask", "labels"):  # PaliGemma's processor writes labels too
            continue
        if k in TOKEN_EXTRAS:
            full = torch.zeros(rows, seq, dtype=v.dtype)
            full[:, :v.shape[1]] = v[0]
            v = full
        else:  # per image: one image per row (Llama 4's processor writes bf16 pixels; the data path keeps fp32)
            v = torch.cat([v] * rows)
            v = v.float() if v.is_floating_point() else v
        batch[k] = v
        if k != "pixel_values":
            extras.append(k)
    if "token_type_ids" in batch and family == "paligemma":  # the supervised text is the suffix (type 1)
        batch["token_type_ids"][labels != -100] = 1
    batch["model_extras"] = tuple(extras)
    return batch


def n_image_tokens(batch: dict, image_token_id: int) -> int:
    """Image tokens in row 0 (all of its packed samples')."""
    return int((batch["input_ids"][0] == image_token_id).sum())


def supervised_fraction(batch: dict, n_img: int) -> float:
    rows, seq = batch["labels"].shape
    return int((batch["labels"][:, 1:] != -100).sum()) / (rows * (seq - 1 - n_img))


def planned(model: dict, family: str, image_size, fields: dict, frac: float) -> dict:
    from vlmtrain.config.model import NativeModelConfig
    from vlmtrain.model import build_model
    from vlmtrain.plan import PlanOptions, plan_stage

    mcfg = NativeModelConfig.model_validate(model)
    meta = build_model(mcfg, device="meta").model
    stage = stage_of(model, fields)
    opts = PlanOptions(device="cpu", supervised_fraction=frac, image_size=tuple(image_size),
                       images_per_sample=samples_per_row(stage))  # packed: the row's images, one per sample
    pl = plan_stage(stage, mcfg, 1 << 50, opts, model=meta)
    return {"peak": pl.peak, "parts": pl.parts, "phase": pl.phase}


# ---- the measured side (a subprocess) ------------------------------------------------------------------------------

def prepare(model: dict, family: str, image_size, fields: dict):
    """(model, optimizer, step function, micro-batches, module) for the stage, set up as `fit_stage` does."""
    import torch

    from vlmtrain.config.model import NativeModelConfig
    from vlmtrain.model import build_model
    from vlmtrain.train.module import VLMModule
    from vlmtrain.train.optim import build_optimizer

    torch.manual_seed(0)
    stage = stage_of(model, fields)
    bundle = build_model(NativeModelConfig.model_validate(model))
    m = bundle.model.train().requires_grad_(False)
    if stage.lora is not None and stage.lora.quantize:
        from vlmtrain.model.quantize import quantize_llm_

        quantize_llm_(m, torch.float32)
    if stage.lora is not None:
        from peft import LoraConfig, inject_adapter_in_model

        lc = stage.lora
        inject_adapter_in_model(LoraConfig(target_modules=lc.llm_target, r=lc.r, lora_alpha=lc.alpha,
                                           lora_dropout=lc.dropout), m)
        for n, p in m.named_parameters():
            p.requires_grad_("lora_" in n)
    for part in ("vision", "connector", "llm"):
        if getattr(stage.train, part) is True:
            getattr(m, part).requires_grad_(True)
    if stage.trainer.grad_checkpointing:
        m.enable_gradient_checkpointing()
    module = VLMModule(bundle, stage)
    opt = build_optimizer(m, stage.optim)
    batch = make_stage_batch(bundle.processor, family, image_size, stage)

    def step():
        module.accumulate_lm([batch])
        params = [p for grp in opt.param_groups for p in grp["params"]]
        torch.nn.utils.clip_grad_norm_(params, stage.optim.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)

    return m, opt, step, [batch], module


def measure(model: dict, family: str, image_size, fields: dict) -> dict:
    from bench.plan import measure_prepared

    return measure_prepared(*prepare(model, family, image_size, fields))


def _subprocess(model: dict, family: str, image_size, fields: dict) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=path,
               OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    args = [json.dumps(x) for x in (model, family, image_size, fields)]
    r = subprocess.run([sys.executable, "-m", "bench.plan_native", "measure", *args], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"native measurement subprocess failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def rows(only: list[str] | None = None) -> list[dict]:
    """Planned vs measured for every native config (or the named ones)."""
    from vlmtrain.config.model import NativeModelConfig
    from vlmtrain.model import build_model

    out = []
    with tempfile.TemporaryDirectory(prefix="plan-native-") as tmp:
        models: dict[str, dict] = {}
        for name, (family, image_size, fields) in CONFIGS.items():
            if only and name not in only:
                continue
            if family not in models:
                models[family] = write_checkpoint(family, Path(tmp) / family)
            model = models[family]
            bundle = build_model(NativeModelConfig.model_validate(model))
            stage = stage_of(model, fields)
            b = make_stage_batch(bundle.processor, family, image_size, stage)
            n_img = n_image_tokens(b, bundle.model.image_token_id)
            frac = supervised_fraction(b, n_img)
            plan = planned(model, family, image_size, fields, frac)
            prof = _subprocess(model, family, image_size, fields)
            row = {"config": name, "family": family, "image": list(image_size), "image_tokens": n_img,
                   "planned": plan["peak"], "phase": plan["phase"], "parts": plan["parts"],
                   "supervised_fraction": frac, "measured": prof["peak"], "measured_base": prof["base"],
                   "profiler_end_delta": prof["end_delta"],
                   "error_pct": 100 * (plan["peak"] - prof["peak"]) / prof["peak"]}
            out.append(row)
            print(f"{name:<32} planned {plan['peak'] / 2**20:9.1f} MiB  measured {prof['peak'] / 2**20:9.1f} MiB  "
                  f"error {row['error_pct']:+6.1f}%  ({plan['phase']}, {n_img} image tokens)", file=sys.stderr,
                  flush=True)
    return out


def headline(table: list[dict]) -> dict:
    errs = [abs(r["error_pct"]) for r in table]
    return {"configs": len(table), "within_5pct": sum(e <= 5 for e in errs), "max_abs_error_pct": max(errs)}


def replan(path: Path) -> dict:
    """Re-plan saved rows with the current planner (the measured peaks do not depend on it): after a planner
    change, without re-measuring."""
    data = json.loads(path.read_text())
    with tempfile.TemporaryDirectory(prefix="plan-native-") as tmp:
        models: dict[str, dict] = {}
        for row in data["rows"]:
            family, image_size, fields = CONFIGS[row["config"]]
            if family not in models:
                models[family] = write_checkpoint(family, Path(tmp) / family)
            plan = planned(models[family], family, image_size, fields, row["supervised_fraction"])
            row.update(planned=plan["peak"], phase=plan["phase"], parts=plan["parts"],
                       error_pct=100 * (plan["peak"] - row["measured"]) / row["measured"])
    data["headline"] = headline(data["rows"])
    data["replanned"] = machine_date()
    path.write_text(json.dumps(data, indent=2))
    return data


def machine_date() -> str:
    from bench.common import machine

    return machine()["date"]


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "measure":
        print(json.dumps(measure(*(json.loads(a) for a in sys.argv[2:]))))
    elif len(sys.argv) >= 2 and sys.argv[1] == "rows":  # the native rows alone (or the named configs)
        from bench.common import machine, save

        table = rows(sys.argv[2:] or None)
        saved = ROOT / "bench" / "results" / "plan-native.json"
        if sys.argv[2:] and saved.is_file():  # named configs: replace those rows, keep the others
            fresh = {r["config"] for r in table}
            table = [r for r in json.loads(saved.read_text())["rows"] if r["config"] not in fresh] + table
        print(save("plan-native", {"machine": machine(), "rows": table, "headline": headline(table)}, None))
    elif len(sys.argv) == 2 and sys.argv[1] == "replan":
        for r in replan(ROOT / "bench" / "results" / "plan-native.json")["rows"]:
            print(f"{r['config']:<32} planned {r['planned'] / 2**20:9.1f} MiB  measured {r['measured'] / 2**20:9.1f}"
                  f" MiB  error {r['error_pct']:+6.1f}%  ({r['phase']})")
    else:
        print("usage: python -m bench.plan_native rows [CONFIG...] | replan  (rows are also part of "
              "`python -m bench plan`)",
              file=sys.stderr)
        sys.exit(2)
