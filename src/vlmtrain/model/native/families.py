"""Where each native family keeps its parts: one small map per family (ms-swift's model-arch habit).

Roles are vision / connector / llm. Each role maps local names (under the role) to paths inside the transformers
`*ForConditionalGeneration` object; a path may name a module or a bare parameter (LLaVA-NeXT's `image_newline`).
Local names are chosen so the stage's default LoRA regexes hold for every family: the language model sits at
`llm.model` (its decoder layers at `llm.model.layers.N`), a ViT tower at `vision.model`.

A family not listed here is mapped by the generic rule (`generic_roles`) when its parts have the usual names;
the map is accepted only if the roles cover every parameter and buffer of the model exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmtrain.errors import ConfigError

_LLM = {"model": "model.language_model", "lm_head": "lm_head"}


@dataclass(frozen=True)
class Family:
    roles: dict[str, dict[str, str]]
    template: str  # key into vlmtrain.model.native.templates ("" = none vendored: the config gives one)
    nested_images: bool = False  # the processor takes one image list per text
    # image tokens attend bidirectionally within their image (`token_type_ids`); packed rows need own masks
    bidirectional_images: bool = False
    # decoder blocks per role, for gradient checkpointing, FSDP2 wrapping and the planner
    blocks: dict[str, str] = field(default_factory=dict)
    # the image a text-only batch runs on sharded ranks (NativeVLM.blank_image_inputs): "grid" (Qwen's smallest
    # merged grid), "fixed" (one tower-sized image), "crop" (one Idefics3 crop), "anyres" (a tower-sized image as
    # AnyRes tiles it), "patches" (Gemma 4: the patches of one pooled soft token), "aligned" (Mllama: a padding image
    # slot per row through the forward, so its cross-attention layers run), "pixtral" (Mistral 3: 2×2 merged tokens),
    # "naflex" (LFM2-VL: one SigLIP2 NaFlex tile); "" = none (sharded strategies refused)
    blank_image: str = ""
    # why `data.mode: pack` is refused for this family ("" = packed rows keep samples apart)
    no_packing: str = ""
    # the LM is a mixture of experts whose router load-balancing loss joins the training objective, as in the
    # family's own `*ForConditionalGeneration.forward` (`load_balancing_loss_func` of its modeling module)
    router_aux_loss: bool = False
    # every sample of a batch needs its own row of the image tensors, text-only ones included (Mllama's
    # `pixel_values [b, images, tiles, ...]`, `aspect_ratio_*`, `cross_attention_mask [b, s, images, tiles]`)
    batch_aligned_images: bool = False
    # fixed variables for the chat template, so the rendered training text does not depend on the day it runs
    template_kwargs: dict = field(default_factory=dict)
    # why shared-prefix rows (a prompt once, DPO's chosen and rejected / GRPO's completions after it under one mask,
    # `vlmtrain.data.prefix`) cannot score this family's sequences as they score alone ("" = they can; DPO then
    # runs two full rows per pair)
    shared_prefix: str = ""
    # parts beside vision / connector / llm that no stage trains (Gemma 4's audio tower): role → {local: path}, as
    # `roles`. Frozen at build (no gradient ever: data-parallel wrappers then skip them) and listed as frozen rows of
    # the trainable table; counted by `describe`.
    frozen_roles: dict[str, dict[str, str]] = field(default_factory=dict)
    # which per-token tensor marks bidirectional image blocks (`bidirectional_images`), and on which layer types
    # the blocks apply: Gemma 3 `token_type_ids` on every layer, Gemma 4 `mm_token_type_ids` on sliding layers
    # only (its `create_masks_for_vision_model`: full-attention layers stay causal)
    image_block_key: str = "token_type_ids"
    image_blocks_sliding_only: bool = False
    # no chat template: samples are the processor's prefix (user turn) + suffix (answer) with `token_type_ids` 1 on
    # the suffix (PaliGemma; `vlmtrain.data.native_encode.PrefixSuffixEncoder`)
    prefix_suffix: bool = False
    # the family's default vision LoRA regex where the stage's `lora.vision_target` is left at its default ("" = that
    # default reaches the tower's projections)
    vision_lora_target: str = ""
    # where the decoder's hidden states come from when the model has no `.model` returning them (Llama 4: the
    # top-level forward runs its own `language_model`, a whole causal LM): the decoder module's path; its output is
    # read off a forward hook of the top-level forward ("" = `hf.model(...)` returns them)
    hidden_from: str = ""
    # the family's default regex of fused expert tensors for PEFT `target_parameters`, where the stage leaves
    # `lora.llm_target_parameters` at its default ("" = that default, `...mlp.experts.(gate_up_proj|down_proj)`)
    expert_lora_target: str = ""
    # the LM's first text position where vlmtrain passes position ids itself (shared-prefix rows): PaliGemma's are
    # 1-indexed (its model adds 1 to the positions it builds)
    position_offset: int = 0
    # the LM module (under the llm role) after which the family's forward runs the tower, where a text-only batch runs
    # its blank image ("" = the token embedding); Gemma 4 embeds its per-layer inputs first, so ZeRO-3 would gather
    # `embed_tokens_per_layer` on an image rank while a text-only rank gathers the tower
    blank_image_after: str = ""


_QWEN_VISION = {"model.patch_embed": "model.visual.patch_embed", "model.rotary_pos_emb": "model.visual.rotary_pos_emb",
                "model.blocks": "model.visual.blocks"}

_QWEN3_VL_ROLES = {"vision": {**_QWEN_VISION, "model.pos_embed": "model.visual.pos_embed"},
                   "connector": {"merger": "model.visual.merger",
                                 "deepstack_merger_list": "model.visual.deepstack_merger_list"},
                   "llm": _LLM}
# Qwen3.5 (dense and MoE): Qwen3-VL's tower without DeepStack mergers; its merger is the connector
_QWEN3_5_ROLES = {"vision": {**_QWEN_VISION, "model.pos_embed": "model.visual.pos_embed"},
                  "connector": {"merger": "model.visual.merger"}, "llm": _LLM}
# transformers 5.23's CPU path of the Gated DeltaNet runs its causal convolution and recurrent state over the whole
# row: position_ids restarts do not reset them, and the cu_seqlens / seq_idx that would are taken only by the
# flash-linear-attention and causal-conv1d GPU kernels (measured: a packed second sample's logits 0.03-0.04 off)
_LINEAR_ATTENTION_PACKING = ("its Gated DeltaNet (linear attention) layers carry a recurrent state and a "
                             "convolution window across packed samples; use data.mode: plain or group")
# the same state runs along a shared-prefix row, through one continuation into the next: no mask stops it
_LINEAR_ATTENTION_PREFIX = ("its Gated DeltaNet (linear attention) layers carry a recurrent state along the row, "
                            "so a continuation would see the one before it")

# Mllama's image states reach the LM through cross-attention from a per-row `cross_attention_mask [b, s, images,
# tiles]`: packed samples of a row would share one image axis, and a token's fully masked row attends to every image
# of the row (transformers' `_prepare_cross_attention_mask` un-masks such rows), so images would leak across samples
_CROSS_ATTENTION_PACKING = ("its cross-attention image states are per row, not per sample, so packed samples would "
                            "attend to each other's images; use data.mode: plain or group")
# its image tensors are per row and per token (`cross_attention_mask [b, s, images, tiles]`), built for whole rows
_CROSS_ATTENTION_PREFIX = ("its images enter through a per-row, per-token cross_attention_mask, which the "
                           "shared-prefix layout does not build")

# PaliGemma's mask makes every token with token_type_ids 0 one bidirectional block per row: packed samples' prefixes
# would attend to each other
_PREFIX_PACKING = ("its prefix block (token_type_ids 0) is one bidirectional block per row, so packed samples' "
                   "prompts would attend to each other; use data.mode: plain or group")

# Llama 4's NoPE layers scale their queries by a temperature read from the row index (`torch.arange` over the row),
# not from position_ids: a continuation placed after another in a shared-prefix row is scaled as if it continued it
# (measured on the tiny checkpoint, floor_scale 16: log-probs 0.43 off alone; real checkpoints' floor_scale is 8,192)
_NOPE_TEMPERATURE_PREFIX = ("its NoPE layers scale attention by a temperature taken from the row index, not the "
                            "positions, so a continuation after another would be scaled as if it continued it; DPO "
                            "keeps two rows per pair")

FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family({"vision": _QWEN_VISION, "connector": {"merger": "model.visual.merger"}, "llm": _LLM},
                       "qwen2_vl", blocks={"vision": "model.blocks", "llm": "model.layers"}, blank_image="grid"),
    "qwen2_5_vl": Family({"vision": _QWEN_VISION, "connector": {"merger": "model.visual.merger"}, "llm": _LLM},
                         "qwen2_5_vl", blocks={"vision": "model.blocks", "llm": "model.layers"}, blank_image="grid"),
    "qwen3_vl": Family(_QWEN3_VL_ROLES, "qwen3_vl", blocks={"vision": "model.blocks", "llm": "model.layers"},
                       blank_image="grid"),
    # Qwen3-VL-MoE: the Qwen3-VL tree (same tower, DeepStack mergers and decoder layout; experts inside each layer's
    # mlp) and the same official template (Qwen3-VL-30B-A3B/235B-A22B-Instruct ship Qwen3-VL's bytes)
    "qwen3_vl_moe": Family(_QWEN3_VL_ROLES, "qwen3_vl", blocks={"vision": "model.blocks", "llm": "model.layers"},
                           blank_image="grid", router_aux_loss=True),
    "qwen3_5": Family(_QWEN3_5_ROLES, "qwen3_5", blocks={"vision": "model.blocks", "llm": "model.layers"},
                      blank_image="grid", no_packing=_LINEAR_ATTENTION_PACKING,
                      shared_prefix=_LINEAR_ATTENTION_PREFIX),
    "qwen3_5_moe": Family(_QWEN3_5_ROLES, "qwen3_5", blocks={"vision": "model.blocks", "llm": "model.layers"},
                          blank_image="grid", no_packing=_LINEAR_ATTENTION_PACKING, router_aux_loss=True,
                          shared_prefix=_LINEAR_ATTENTION_PREFIX),
    "gemma3": Family({"vision": {"model": "model.vision_tower"},
                      "connector": {"projector": "model.multi_modal_projector"}, "llm": _LLM},
                     "gemma3", nested_images=True, bidirectional_images=True,
                     blocks={"vision": "model.encoder.layers", "llm": "model.layers"}, blank_image="fixed"),
    "idefics3": Family({"vision": {"model": "model.vision_model"}, "connector": {"projector": "model.connector"},
                        "llm": {"model": "model.text_model", "lm_head": "lm_head"}},
                       "smolvlm", nested_images=True,  # SmolVLM checkpoints are model_type idefics3
                       blocks={"vision": "model.encoder.layers", "llm": "model.layers"}, blank_image="crop"),
    "smolvlm": Family({"vision": {"model": "model.vision_model"}, "connector": {"projector": "model.connector"},
                       "llm": {"model": "model.text_model", "lm_head": "lm_head"}},
                      "smolvlm", nested_images=True,
                      blocks={"vision": "model.encoder.layers", "llm": "model.layers"}, blank_image="crop"),
    "llava": Family({"vision": {"model": "model.vision_tower"},
                     "connector": {"projector": "model.multi_modal_projector"}, "llm": _LLM},
                    "llava", blocks={"vision": "model.encoder.layers", "llm": "model.layers"}, blank_image="fixed"),
    "llava_next": Family({"vision": {"model": "model.vision_tower"},
                          "connector": {"projector": "model.multi_modal_projector",
                                        "image_newline": "model.image_newline"}, "llm": _LLM},
                         "llava_next", blocks={"vision": "model.encoder.layers", "llm": "model.layers"},
                         blank_image="anyres"),
    "llava_onevision": Family({"vision": {"model": "model.vision_tower"},
                               "connector": {"projector": "model.multi_modal_projector",
                                             "image_newline": "model.image_newline"}, "llm": _LLM},
                              "llava_onevision",
                              # nested: a multi-image sample gets one crop per image (the processor's and the
                              # model's `batch_num_images` rule), as apply_chat_template passes images when serving
                              nested_images=True, blocks={"vision": "model.encoder.layers", "llm": "model.layers"},
                              blank_image="anyres"),
    # Llama 3.2 Vision: the cross-attention decoder layers sit in the LM's `layers` list (every 5th), so they are
    # in the llm role; one `<|image|>` token per image, the tiles enter through cross-attention.
    "mllama": Family({"vision": {"model": "model.vision_model"},
                      "connector": {"projector": "model.multi_modal_projector"}, "llm": _LLM},
                     "mllama", nested_images=True, blocks={"vision": "model.transformer.layers", "llm": "model.layers"},
                     no_packing=_CROSS_ATTENTION_PACKING, batch_aligned_images=True, blank_image="aligned",
                     shared_prefix=_CROSS_ATTENTION_PREFIX,
                     # the template's own fallback date: without it a text-only turn renders today's date
                     template_kwargs={"date_string": "26 Jul 2024"}),
    # InternVL (the transformers-converted `-hf` checkpoints): the tower's blocks are `encoder.layer`, so the tower is
    # split as Qwen's is, to sit at `vision.model.layers.N` for the default vision LoRA regex. Tile-indexed
    # `pixel_values [Σ tiles, c, h, w]`: the model encodes every tile and scatters the features in order, so tiles
    # concatenate over the batch. No official template is vendored (no verifiable copy of the checkpoints' file was
    # found offline): `chat_template:` in the model config, or a checkpoint template with generation marks.
    "internvl": Family({"vision": {"model.embeddings": "model.vision_tower.embeddings",
                                   "model.layers": "model.vision_tower.encoder.layer",
                                   "model.layernorm": "model.vision_tower.layernorm"},
                        "connector": {"projector": "model.multi_modal_projector"}, "llm": _LLM},
                       "", blocks={"vision": "model.layers", "llm": "model.layers"}, blank_image="fixed"),
}

# Gemma 4 (transformers 5.23 `Gemma4ForConditionalGeneration`): SigLIP-like tower with a spatial pooler, the
# `embed_vision` projection as the connector, a Gemma LM with per-layer inputs. Image tokens attend bidirectionally
# within their image on sliding layers when the text config says `use_bidirectional_attention: vision`. The audio
# tower and its projection are a frozen role. Default configs carry neither tower (a path that is None is skipped).
# No official template is vendored: `chat_template:` with generation marks is required (see templates.py).
FAMILIES["gemma4"] = Family({"vision": {"model": "model.vision_tower"},
                             "connector": {"embed_vision": "model.embed_vision"}, "llm": _LLM},
                            "", nested_images=True, bidirectional_images=True,
                            blocks={"vision": "model.encoder.layers", "llm": "model.layers"}, blank_image="patches",
                            blank_image_after="model.embed_tokens_per_layer",
                            frozen_roles={"audio": {"model": "model.audio_tower", "embed_audio": "model.embed_audio"}},
                            image_block_key="mm_token_type_ids", image_blocks_sliding_only=True,
                            # the tower's projections are Gemma4ClippableLinear wrappers around `.linear`
                            vision_lora_target=r"vision\.model\..*layers\.\d+\..*(q|k|v|o)_proj\.linear")

# PaliGemma (1 and 2): a SigLIP tower, a linear projector and a Gemma LM whose prefix (image tokens + prompt,
# token_type_ids 0) attends bidirectionally and whose suffix (the answer) is causal. It has no chat template (the
# checkpoints ship none): samples are encoded as prefix + suffix, as PaliGemmaProcessor(suffix=) does.
FAMILIES["paligemma"] = Family({"vision": {"model": "model.vision_tower"},
                                "connector": {"projector": "model.multi_modal_projector"}, "llm": _LLM},
                               "", blocks={"vision": "model.encoder.layers", "llm": "model.layers"},
                               blank_image="fixed", prefix_suffix=True, no_packing=_PREFIX_PACKING, position_offset=1)

# GLM-4.1V (`glm4v`) and GLM-4.5V (`glm4v_moe`): a Qwen2-VL-style tower (patch embedding, learned position table,
# post-conv norm, blocks) whose `downsample` conv and `merger` hand tokens to the LM; mRoPE positions from its own
# `get_rope_index`. No verbatim template was found offline (only a copy with blank lines stripped): `chat_template:`
# with generation marks is required.
_GLM4V_ROLES = {"vision": {f"model.{n}": f"model.visual.{n}" for n in
                           ("embeddings", "patch_embed", "rotary_pos_emb", "post_conv_layernorm", "blocks",
                            "post_layernorm")},
                "connector": {"downsample": "model.visual.downsample", "merger": "model.visual.merger"}, "llm": _LLM}
FAMILIES["glm4v"] = Family(_GLM4V_ROLES, "", blocks={"vision": "model.blocks", "llm": "model.layers"},
                           blank_image="grid")
FAMILIES["glm4v_moe"] = Family(_GLM4V_ROLES, "", blocks={"vision": "model.blocks", "llm": "model.layers"},
                               blank_image="grid", router_aux_loss=True)

# Mistral 3 (Mistral-Small-3.1/3.2, `Mistral3ForConditionalGeneration`): a Pixtral tower (2D RoPE over each image's
# own patch grid, any aspect ratio), the projector with its patch merger, a Mistral LM. The processor is transformers'
# PixtralProcessor over its PIL image processor (`processor.pil_sibling_processor`: no torchvision). No verbatim
# official template was found offline (the checkpoints' Jinja sits in their hub repos and in a transformers test file
# not shipped with the package; it renders today's date): the checkpoint's own template or `chat_template:` is used.
FAMILIES["mistral3"] = Family({"vision": {"model": "model.vision_tower"},
                               "connector": {"projector": "model.multi_modal_projector"}, "llm": _LLM},
                              "", blocks={"vision": "model.transformer.layers", "llm": "model.layers"},
                              blank_image="pixtral")

# transformers 5.23's Llama 4 scales the queries of its NoPE (full-attention) layers by a temperature computed from
# the row index (`torch.arange` over the row), not from position_ids: in a packed row every sample after the first
# gets the scales of its offset (measured: 7e-4 to 1.7e-3 off alone). Its chunked attention does follow per-sample
# positions (packed == alone with the temperature off, tests/test_native_llama4.py).
_NOPE_TEMPERATURE_PACKING = ("its NoPE layers scale attention by a temperature taken from the row index, not the "
                             "sample's positions, so packed samples after the first would be scaled as if they "
                             "continued the one before; use data.mode: plain or group")

# Llama 4 (Scout / Maverick): the top-level model holds the tower (`vision_model`), the projector and a whole causal
# LM (`language_model`, a Llama4ForCausalLM with its own `.model` and `.lm_head`), so the LM role points inside it and
# NativeVLM reads the decoder's hidden states off it (`Family.hidden_from`). Routed experts are fused 3-D tensors
# (`gate_up_proj [E, h, 2i]`, `down_proj [E, i, h]`); transformers' Llama 4 forward adds no router load-balancing
# loss, so none joins the objective. The image processor is vlmtrain's port of the torchvision-only original
# (`image_processors.llama4`).
FAMILIES["llama4"] = Family({"vision": {"model": "vision_model"},
                             "connector": {"projector": "multi_modal_projector"},
                             "llm": {"model": "language_model.model", "lm_head": "language_model.lm_head"}},
                            "", blocks={"vision": "model.model.layers", "llm": "model.layers"},
                            no_packing=_NOPE_TEMPERATURE_PACKING, shared_prefix=_NOPE_TEMPERATURE_PREFIX,
                            hidden_from="language_model.model", blank_image="fixed",
                            expert_lora_target=r"llm\.model\.layers\.\d+\.feed_forward\.experts\.(gate_up_proj|down_proj)")

# LFM2-VL: a SigLIP2 NaFlex tower (`pixel_attention_mask`, `spatial_shapes` per tile), the pixel-unshuffle projector
# as the connector, an LFM2 LM whose gated short-convolution layers run their causal conv window along the whole
# row (transformers 5.23's CPU path takes no per-sample boundaries), so packed samples would see the tokens before
# them; packing is refused (measured in tests/test_native_lfm2_vl.py). The image processor is vlmtrain's port of the
# torchvision-only original (`image_processors.lfm2_vl`).
_CONV_PACKING = ("its LFM2 short-convolution layers run their convolution window across packed samples; use "
                 "data.mode: plain or group")
_CONV_PREFIX = ("its LFM2 short-convolution layers run along the row, so a continuation would see the end of the one "
                "before it")
FAMILIES["lfm2_vl"] = Family({"vision": {"model": "model.vision_tower"},
                              "connector": {"projector": "model.multi_modal_projector"}, "llm": _LLM},
                             "", nested_images=True, blocks={"vision": "model.encoder.layers", "llm": "model.layers"},
                             no_packing=_CONV_PACKING, shared_prefix=_CONV_PREFIX, blank_image="naflex")

SUPPORTED = tuple(FAMILIES)

_VISION_NAMES = ("vision_tower", "vision_model", "visual")
_CONNECTOR_NAMES = ("multi_modal_projector", "connector", "mm_projector")
_LLM_NAMES = ("language_model", "text_model")


def generic_roles(hf_model) -> dict[str, dict[str, str]] | None:
    """Roles of an unlisted family from the usual attribute names, or None when they are not there."""
    inner = getattr(hf_model, "model", None)
    if inner is None or not hasattr(hf_model, "lm_head"):
        return None
    children = dict(inner.named_children())
    vision = next((n for n in _VISION_NAMES if n in children), None)
    connector = next((n for n in _CONNECTOR_NAMES if n in children), None)
    llm = next((n for n in _LLM_NAMES if n in children), None)
    if not (vision and connector and llm):
        return None
    roles = {"vision": {"model": f"model.{vision}"}, "connector": {"projector": f"model.{connector}"},
             "llm": {"model": f"model.{llm}", "lm_head": "lm_head"}}
    for pname, _ in inner.named_parameters(recurse=False):  # e.g. image_newline
        roles["connector"][pname] = f"model.{pname}"
    return roles


def family_for(model_type: str, hf_model=None) -> tuple[Family, bool]:
    """(the family's map, whether it is a listed family). Unlisted families get the generic map or a refusal."""
    if model_type in FAMILIES:
        return FAMILIES[model_type], True
    roles = generic_roles(hf_model) if hf_model is not None else None
    if roles is None:
        raise ConfigError(f"model_type {model_type!r}: no native family map in vlmtrain and its parts are not at "
                          f"model.{'|'.join(_VISION_NAMES)} / model.{'|'.join(_CONNECTOR_NAMES)} / "
                          f"model.{'|'.join(_LLM_NAMES)} + lm_head{_has(hf_model)}")
    return Family(roles, template="", blocks={"llm": "model.layers"}), False


def _has(hf_model) -> str:
    """` (ItsClass has: a, b, c)`: the parts the model does have, where the generic rule looked for them."""
    if hf_model is None:
        return ""
    inner = getattr(hf_model, "model", None)
    where, root = ("model.", inner) if inner is not None and hasattr(inner, "named_children") else ("", hf_model)
    names = [n for n, _ in root.named_children()]
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return f" ({type(hf_model).__name__} has {where}{{{shown}}})" if names else f" ({type(hf_model).__name__})"
