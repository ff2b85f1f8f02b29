"""Memory-planner geometry of native transformers VLM families (`vlmtrain.model.native`).

`vlmtrain.plan.core` models one training step from a `Geometry`: the LLM's and the vision tower's block stacks,
per-image token counts, and the connector. This module fills that `Geometry` for a `NativeVLM` built on `meta`,
so that parameters, gradients, optimizer states, LoRA/QLoRA and gradient checkpointing come from the same code
as for composed models, and only what differs per family lives here:

- Qwen2-VL / Qwen2.5-VL (dynamic resolution): an image of H×W pixels is resized by the processor's
  `smart_resize` to multiples of patch·merge (28 px) inside [`min_pixels`, `max_pixels`]; the tower sees
  (H'/14)·(W'/14) patches of 3·2·14² pixel values (the frame repeated over `temporal_patch_size`), the merger
  turns each 2×2 group into one LM token. The tower runs every image as one flat sequence and SDPA per chunk
  (Qwen2.5-VL: 112 px windows in most blocks, whole images in `fullatt_block_indexes`): no s² term and no mask
  either way, so window and full blocks save the same tensors per token. Qwen2.5-VL's blocks are RMSNorm +
  SwiGLU, Qwen2-VL's LayerNorm + quick_gelu MLP. Without `--image-size` the plan takes the worse of the smallest
  (min_pixels) and the largest (max_pixels / 28² LM tokens) image: image tokens count inside `max_len`, so a
  small image leaves more supervised text positions and a larger logits term.
- Gemma 3: fixed `mm_tokens_per_image` (256) soft tokens per image from a SigLIP tower at `image_size` (896²:
  4096 patches), average-pooled by the projector; the image's tokens attend bidirectionally, so transformers
  always materialises the [rows, 1, s, s] mask; the decoder adds q/k RMSNorms and sandwich norms per layer.
- Idefics3 / SmolVLM: image splitting by transformers' own rule (the image scaled to the longest edge, cut into
  crop-sized tiles + one global view); the SigLIP-style tower runs once per crop (`Geometry.crops_per_image`), the
  connector (pixel shuffle + projection) gives `(crop / patch)² / scale²` LM tokens per crop, plus the processor's
  crop markers. Without `--image-size` a square image at the longest edge (the most crops).

- LLaVA / LLaVA-NeXT / LLaVA-OneVision: a CLIP or SigLIP tower run once per AnyRes crop (transformers'
  `image_size_to_num_patches`: the image's best grid pinpoint cut into tower-sized tiles + the base view; LLaVA-1.5
  one crop), up to the feature layer (only that layer's hidden state is captured), a 2-layer GELU projector over
  every crop's features, then the processor's own LM-token count (`_get_number_of_features`: unpadded grid + a
  newline per row + the base view; OneVision scales the grid down past `anyres_max_N` tiles). OneVision gives each
  image of a multi-image sample one crop and its base tokens + a newline, as its processor and model do. Without
  `--image-size` the worse of the pinpoint with the most crops and the one with the most LM tokens.
- Qwen3-VL: Qwen's dynamic resolution with 16-px patches (32-px LM tokens) and Qwen3-VL's published pixel budget
  (65,536 … 16,777,216 px) unless the checkpoint says otherwise; LayerNorm + GELU blocks with full attention per
  image; the merger plus one DeepStack merger per `deepstack_visual_indexes` layer, each over the tower's tokens
  (their outputs are added to the first decoder layers' hidden states at the image positions, in place of a
  tensor those layers save anyway); the text decoder's q/k RMSNorms.
- Qwen3-VL-MoE and Qwen3.5 (dense and MoE): Qwen3-VL's tower and budget (Qwen3.5 without DeepStack); decoder
  blocks with a Gated DeltaNet token mixer (Qwen3.5's linear-attention layers) or an expert MLP are traced on meta
  (`TracedLayers`), the gated full-attention layers keep the closed form (+ the gate's sigmoid); all experts'
  parameters count in weights / gradients / AdamW states, each token's top-k experts in the activations; the MoE
  router loss holds every layer's router logits to the end of the forward.
- GLM-4.1V (`glm4v`): Qwen's dynamic resolution by its own `smart_resize` (an image counts as
  `temporal_patch_size` frames against the pixel budget), a Qwen2.5-VL-style tower (RMSNorm + SwiGLU blocks, full
  attention), the `downsample` conv (merge × merge patches → one token) and the merger traced as the connector,
  and a decoder with sandwich norms after attention and after the MLP. GLM-4.5V (`glm4v_moe`): the same tower and
  connector, a decoder without sandwich norms whose expert MLPs (routed + shared experts) are traced on meta as
  Qwen3-VL-MoE's are.
- Packed rows (Qwen-VL families): `pack_len` tokens per row holding `--images-per-sample` images in all (the images
  of every sample packed into the row), transformers' block-diagonal mask from the restarting positions.

- InternVL (`-hf` checkpoints): the processor's tiles (`crop_to_patches`: the image's best grid of tower-sized tiles
  up to `max_patches`, + a thumbnail when there is more than one), the InternViT tower once per tile (patches + CLS,
  the CLS dropped), pixel shuffle (×0.5: a quarter of the patches) and the MLP projector traced as the connector,
  `<img>` + 256 (`image_seq_length`) tokens per tile + `</img>` in the LM; a Qwen3 LM's q/k norms. Without
  `--image-size` an image cut into the most tiles.

- Mistral 3: Pixtral's resize (the longest edge within `longest_edge`, both sides multiples of patch × merge),
  every image of the micro-batch through the tower as one sequence under a block-diagonal [N, N] mask (traced whole
  when the tower trains, quadratic in the images), all of its hidden states kept, the patch merger + MLP projector
  traced as the connector, and rows × (cols + 1) LM tokens per image ([IMG_BREAK] after each row, [IMG_END] last).
- PaliGemma (1 and 2): a SigLIP tower at its fixed `image_size` (every patch an LM token), the linear projector, and
  a Gemma / Gemma 2 LM traced whole on meta (`decoder_run`: sandwich norms, soft-capped attention, sliding layers
  as transformers runs them) under the prefix-LM mask it always builds.
- Llama 4: the processor's tiles (the best canvas of up to `max_patches` tower-sized tiles, + a global tile when
  there is more than one), the tower once per tile with its pixel-shuffle adapter, the projector, and per tile
  (tile / patch)² · ratio² `<|patch|>` tokens with the processor's separators; the MoE decoder (chunked and NoPE
  layers, every expert run on every token as transformers does) traced whole on meta by `decoder_run`. Without
  `--image-size`, the image with the most tiles whose tokens fit `max_len`.
- LFM2-VL: the processor's layout (`split_layout`: one tile within the token budget, or a grid of `tile_size`
  tiles + a thumbnail), the SigLIP2 NaFlex tower once per tile over its patches padded to `max_num_patches`, the
  pixel-unshuffle projector traced as the connector, the processor's tokens (tiles' tokens, their row/column
  markers, the thumbnail's); the LFM2 decoder (short-convolution and attention layers) traced whole by `decoder_run`.
  Without `--image-size`, the grid with the most tiles whose tokens fit `max_len`.
- Gemma 4: the processor's soft-token budget (`max_soft_tokens` × k² patches through the tower, padded; k × k pooled
  into soft tokens + 2 markers in the LM), `embed_vision` traced as the connector; no two decoder layers alike (two
  head sizes, layers reusing earlier keys and values, per-layer inputs), so the decoder — and the tower when it
  trains — is traced whole on meta (`plan.traced.TracedStack`).

Not planned yet (refused with a message): list-valued `vision_feature_layer`, unlisted families and Mllama, packed rows of the other families (and of Qwen3.5, which training
refuses), LoRA on fused expert tensors, and what `native_refusals` refuses for training.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

from vlmtrain.errors import ConfigError
from vlmtrain.plan.core import ROLES, Geometry, StackGeo, stack_geo, stacks_geometry, step_parts
from vlmtrain.plan.traced import TracedLayers, TracedStack, decoder_run
from vlmtrain.train.native import native_refusals, packing_refusal

LLAVA_FAMILIES = ("llava", "llava_next", "llava_onevision")
# Qwen3-VL's tower and decoder with Gated DeltaNet layers (Qwen3.5) and/or mixture-of-experts MLPs (TracedLayers)
QWEN3_FAMILIES = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
PLANNED_FAMILIES = ("qwen2_vl", "qwen2_5_vl", *QWEN3_FAMILIES, "gemma3", "idefics3", "smolvlm", *LLAVA_FAMILIES,
                    *("glm4v", "glm4v_moe"), "internvl", "gemma4", "mistral3", "paligemma", "llama4", "lfm2_vl")
GLM_FAMILIES = ("glm4v", "glm4v_moe")  # GLM-4.1V and GLM-4.5V: one tower, resize rule and connector

# Linear leaf names of the Qwen vision blocks (attn.qkv, attn.proj; Qwen3-VL's mlp.linear_fc1/2) next to the usual
# ones, and of the Gated DeltaNet token mixer (its out_proj is "o" already)
_NATIVE_ROLES = {**ROLES, "qkv": "qkv", "proj": "o", "linear_fc1": "fc1", "linear_fc2": "fc2",
                 "in_proj_qkv": "in_qkv", "in_proj_z": "in_z", "in_proj_b": "in_b", "in_proj_a": "in_a",
                 "projection_layer": "o"}  # InternViT's attention output
# Qwen3-VL checkpoints' image budget (their preprocessor_config.json: size.shortest_edge / longest_edge, 256² … 4096²
# px); transformers' class defaults are Qwen2-VL's.
QWEN3_VL_PIXELS = (65536, 16777216)
# Block Linears of both roles: llm.model.layers.N…, vision.model.blocks.N… (Qwen),
# vision.model[.vision_model].encoder.layers.N… (SigLIP; the nesting differs between transformers versions).
_BLOCK_RE = re.compile(r"^(vision|llm)\.model\.(?:[\w.]*?\.)?(?:layers|blocks)\.(\d+)\.(.+)$")


def native_geometry(model, stage, model_cfg, opts) -> Geometry:
    """`Geometry` of a NativeVLM (usually on meta) under `stage`, for images of `opts.image_size`, or else the
    worse of the smallest and the largest image the processor makes: image tokens sit inside `max_len`, so a large
    image grows the tower's share and a small one leaves more text positions whose logits the loss keeps. Raises
    ConfigError for families and stage features the planner does not model."""
    if _qwen_like(model.model_type) and opts.image_size is None:
        vc = model.hf.config.vision_config
        budget = qwen_pixel_budget(model_cfg, model.model_type)
        unit = vc.patch_size * vc.spatial_merge_size
        sizes = {"smallest (min_pixels)": (unit, unit), "largest (max_pixels)": None}
        geos = [_geometry(model, stage, model_cfg, opts, qwen_patches(vc, budget, size, model.model_type in GLM_FAMILIES),
                          f"the {name} image "
                          "(the worse of the smallest and the largest; --image-size HxW plans a given size)")
                for name, size in sizes.items()]
        return _worst(geos, stage, opts)
    if model.model_type in ("llava_next", "llava_onevision") and opts.image_size is None:
        return _worst([_geometry(model, stage, model_cfg, opts, image_hw=hw, how=how)
                       for hw, how in anyres_worst_images(model, opts.images_per_sample)], stage, opts)
    return _geometry(model, stage, model_cfg, opts)


def _hybrid_and_experts(model, stage, llm: StackGeo, layers) -> None:
    """Qwen3.5 / Qwen3-VL-MoE decoders: their Gated DeltaNet mixers and expert MLPs are traced (`TracedLayers`); a
    block's backward excess is sized by the routed width (k experts × their width per token); the router logits
    the load-balancing loss reads are held to the end of the forward (`Geometry.router_logits`)."""
    traced = TracedLayers(layers, stage)
    if not traced.any():
        return
    llm.traced = traced
    cfg = model.llm.config
    if any(k["mlp"] for k in traced.kinds):
        # the shared expert's width: Qwen's own field, or GLM-4.5V's n_shared_experts × the expert width
        shared = int(getattr(cfg, "shared_expert_intermediate_size", 0) or 0) or int(
            getattr(cfg, "n_shared_experts", 0) or 0) * int(cfg.moe_intermediate_size)
        llm.intermediate = max(llm.intermediate, int(cfg.num_experts_per_tok) * int(cfg.moe_intermediate_size), shared)


def _expert_adapters(model, stage) -> list[str]:
    from vlmtrain.model.lora import target_parameter_names

    return target_parameter_names(model, stage.lora.llm_target_parameters)


def router_logits_per_token(model, stage) -> int:
    """Router logits per token the MoE load-balancing loss keeps (Σ experts over the MoE layers), 0 when off."""
    coef = stage.trainer.router_aux_loss_coef
    coef = getattr(model, "router_aux_loss_coef", 0.0) if coef is None else coef
    if not model.family.router_aux_loss or not coef:
        return 0
    moe = sum(1 for layer in model.llm.model.layers if hasattr(getattr(layer, "mlp", None), "experts"))
    cfg = model.llm.config
    return moe * int(getattr(cfg, "num_experts", None) or cfg.n_routed_experts)  # GLM-4.5V: n_routed_experts


def plan_refusal(model_type: str) -> str:
    """Why the planner does not model this family ("" when it does)."""
    if model_type in PLANNED_FAMILIES:
        return ""
    return (f"plan: native family {model_type!r} is not planned yet (planned: {', '.join(PLANNED_FAMILIES)}); "
            "`vlmtrain describe` gives its parameters per role")


def _worst(geos: list[Geometry], stage, opts) -> Geometry:
    """The candidate image geometry whose training step peaks highest."""
    return max(geos, key=lambda g: sum(step_parts(g, stage, stage.data.batch_size, opts)[0].values()))


def _geometry(model, stage, model_cfg, opts, patches: int | None = None, how: str = "",
              image_hw: tuple[int, int] | None = None) -> Geometry:
    mt = model.model_type
    if plan_refusal(mt):
        raise ConfigError(plan_refusal(mt))

    problems = native_refusals(stage)
    if stage.data.mode == "pack" and packing_refusal(model.family, model.llm.config):
        problems.append(f"data.mode: pack is refused for {mt}: {packing_refusal(model.family, model.llm.config)}")
    if stage.lora is not None and stage.train.llm == "lora" and _expert_adapters(model, stage):
        problems.append("lora.llm_target_parameters: adapters on fused expert tensors (PEFT's target_parameters) "
                        "are not planned yet; plan with lora.llm_target_parameters='' (adapters on the linear "
                        "layers only)")
    if stage.data.mode == "pack" and not mt.startswith("qwen"):
        # Qwen-VL packed rows are transformers' own (restarting positions → its block-diagonal mask; per-sample mRoPE
        # ids, [4, b, s] integers); Gemma 3 builds its own masks per layer kind and the other families' packed rows
        # have no measured plan yet
        problems.append(f"data.mode: pack is planned for the Qwen-VL families only, not {mt} yet (plan the padded "
                        "stage: data.mode=plain)")
    if problems:
        raise ConfigError("plan: " + "; ".join(problems))
    layers = {"llm": model.llm.model.layers, "vision": _block_list(model.vision)}
    text_cfg = model.llm.config
    llm = _gemma4_stack(text_cfg, layers["llm"][0]) if mt == "gemma4" else stack_geo(text_cfg, layers["llm"][0],
                                                                                    rotary=True)
    if _qwen_like(mt):
        vis, image = _qwen(model, model_cfg, opts, layers["vision"][0], patches, how)
    elif mt in ("idefics3", "smolvlm"):
        vis, image = _idefics3(model, model_cfg, layers["vision"][0], opts.image_size, how)
    elif mt in LLAVA_FAMILIES:
        vis, image = _llava(model, layers["vision"][0], image_hw or opts.image_size, opts.images_per_sample, how)
    elif mt == "internvl":
        vis, image = _internvl(model, model_cfg, layers["vision"][0], opts, stage.data.max_len)
        llm.qk_norm = hasattr(layers["llm"][0].self_attn, "q_norm")  # a Qwen3 LM (InternVL3.5)
    elif mt == "mistral3":
        vis, image = _mistral3(model, model_cfg, layers["vision"][0], opts, stage.data.max_len)
        vis.traced = TracedStack(model.vision.model.transformer, layers["vision"], _pixtral_run,
                                 stage.train.vision is True, one_sequence=True)
    elif mt == "llama4":
        vis, image = _llama4(model, model_cfg, layers["vision"][0], opts, stage.data.max_len)
        llm.traced = TracedStack(model.llm.model, layers["llm"], decoder_run, stage.train.llm is True)
        llm.intermediate = max(int(layer.feed_forward.experts.intermediate_size) if hasattr(layer.feed_forward, "experts")
                               else int(layer.feed_forward.down_proj.in_features) for layer in layers["llm"])
    elif mt == "lfm2_vl":
        vis, image = _lfm2_vl(model, model_cfg, layers["vision"][0], opts, stage.data.max_len)
        llm.traced = TracedStack(model.llm.model, layers["llm"], decoder_run, stage.train.llm is True)
        llm.intermediate = max(int(layer.feed_forward.w2.in_features) for layer in layers["llm"])
    elif mt == "paligemma":
        vis, image = _paligemma(model, layers["vision"][0], opts)
        llm.traced = TracedStack(model.llm.model, layers["llm"], decoder_run, stage.train.llm is True)
    elif mt == "gemma4":
        vis, image = _gemma4(model, model_cfg, layers["vision"][0], opts)
        vis.traced = TracedStack(model.vision.model.encoder, layers["vision"], _gemma4_vision_run,
                                 stage.train.vision is True)
        _gemma4_decoder(model, stage, llm, layers["llm"])
    else:
        vis, image = _gemma3(model, opts, layers["vision"][0])
        llm.qk_norm = llm.post_norms = True
    if mt == "glm4v":
        llm.post_norms = True  # GLM-4 sandwich norms after attention and after the MLP
    if mt in QWEN3_FAMILIES or mt == "glm4v_moe":
        llm.qk_norm = True
        _hybrid_and_experts(model, stage, llm, layers["llm"])
    how = image.pop("how")
    geo = stacks_geometry(model, stage, llm, vis, layers, image, _BLOCK_RE, _NATIVE_ROLES)
    # native towers return their last (or selected) hidden state only; Mistral 3 asks Pixtral for all of them
    geo.vision_keeps_hidden_states = mt == "mistral3"
    geo.vision_block_mask = mt == "mistral3"
    # image tokens attend bidirectionally within their image (Gemma 3; Gemma 4 with use_bidirectional_attention:
    # vision): transformers materialises the masks whenever a row holds an image; PaliGemma's prefix (image and
    # prompt) always attends bidirectionally
    geo.llm_mask_always = mt == "paligemma" or opts.images_per_sample > 0 and (mt == "gemma3" or (
        mt == "gemma4" and getattr(text_cfg, "use_bidirectional_attention", None) == "vision"))
    geo.router_logits = router_logits_per_token(model, stage)
    crops = f"{geo.crops_per_image} crops × {geo.vision_tokens}" if geo.crops_per_image > 1 else f"{geo.vision_tokens}"
    geo.notes = [f"{mt}: {opts.images_per_sample} image(s) per sample, {geo.image_tokens} LM tokens each "
                 f"({crops} tower patches); {how}"]
    return geo


def _qwen_like(model_type: str) -> bool:
    """Qwen-VL's dynamic resolution and tower layout: the Qwen families and GLM-4.1V (a Qwen2.5-VL-style block
    stack; its `smart_resize` takes the same factor and pixel budget for one image)."""
    return model_type.startswith("qwen") or model_type in GLM_FAMILIES


def _block_list(role):
    """The tower's block ModuleList (`blocks` in Qwen, `encoder.layers` in SigLIP)."""
    from torch import nn

    return next(m for n, m in role.named_modules()
                if isinstance(m, nn.ModuleList) and n.rsplit(".", 1)[-1] in ("blocks", "layers") and len(m))


def saved_image_processor(model_cfg) -> dict:
    """The image processor's saved settings in a local checkpoint folder: `preprocessor_config.json`, or the
    `image_processor` entry of `processor_config.json` (transformers 5 saves it there); {} for a hub id or none."""
    folder = Path(model_cfg.pretrained) if model_cfg.pretrained else None
    if folder is None or not folder.is_dir():
        return {}
    if (folder / "preprocessor_config.json").is_file():
        return json.loads((folder / "preprocessor_config.json").read_text())
    if (folder / "processor_config.json").is_file():
        return json.loads((folder / "processor_config.json").read_text()).get("image_processor") or {}
    return {}


# ---- Qwen2-VL / Qwen2.5-VL ------------------------------------------------------------------------------------------

def qwen_pixel_budget(model_cfg, model_type: str = "qwen2_5_vl") -> tuple[int, int]:
    """(min_pixels, max_pixels) of the processor: transformers' defaults (Qwen3-VL: its checkpoints' budget), then
    the checkpoint folder's saved image processor (`saved_image_processor`), then the model config's `processor:`."""
    from transformers import Glm4vImageProcessorPil, Qwen2VLImageProcessorPil

    size = dict((Glm4vImageProcessorPil if model_type in GLM_FAMILIES else Qwen2VLImageProcessorPil).size)
    budget = {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}
    if model_type in QWEN3_FAMILIES:
        budget = dict(zip(("min_pixels", "max_pixels"), QWEN3_VL_PIXELS))
    for layer in (saved_image_processor(model_cfg), model_cfg.processor):
        s = layer.get("size") or {}
        budget["min_pixels"] = layer.get("min_pixels") or s.get("shortest_edge") or budget["min_pixels"]
        budget["max_pixels"] = layer.get("max_pixels") or s.get("longest_edge") or budget["max_pixels"]
    return int(budget["min_pixels"]), int(budget["max_pixels"])


def qwen_patches(vc, budget: tuple[int, int], image_size: tuple[int, int] | None, glm: bool = False) -> int:
    """Tower patches of one image: (H'/patch)·(W'/patch) after `smart_resize`; without a size, the budget's
    largest (max_pixels // (patch·merge)² LM tokens, each merge² patches). `glm`: GLM-4.1V's `smart_resize`, which
    counts an image as `temporal_patch_size` frames against the budget."""
    from transformers.models.glm4v.image_processing_pil_glm4v import smart_resize as glm_resize
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    unit = vc.patch_size * vc.spatial_merge_size
    frames = int(vc.temporal_patch_size) if glm else 1
    if image_size is None:
        return (budget[1] // frames // unit**2) * vc.spatial_merge_size**2
    if glm:
        h, w = glm_resize(frames, image_size[0], image_size[1], temporal_factor=frames, factor=unit,
                          min_pixels=budget[0], max_pixels=budget[1])
    else:
        h, w = smart_resize(image_size[0], image_size[1], factor=unit, min_pixels=budget[0], max_pixels=budget[1])
    return (h // vc.patch_size) * (w // vc.patch_size)


def _qwen(model, model_cfg, opts, block, patches: int | None, how: str) -> tuple[StackGeo, dict]:
    """The tower's stack and the image fields for `patches` per image (None: from `opts.image_size`)."""
    vc = model.hf.config.vision_config
    v2 = model.model_type == "qwen2_vl"  # Qwen2-VL: embed_dim wide, LayerNorm, fc1 → quick_gelu → fc2
    hidden = int(vc.embed_dim if v2 else vc.hidden_size)
    heads = int(vc.num_heads)
    names = [type(m).__name__.lower() for m in block.modules()]
    roles = {_NATIVE_ROLES.get(n.rsplit(".", 1)[-1]) for n, _ in block.named_modules()}
    vis = StackGeo(hidden=hidden, intermediate=int(hidden * vc.mlp_ratio if v2 else vc.intermediate_size),
                   heads=heads, kv_heads=heads, head_dim=hidden // heads,
                   norm="rms" if any("rms" in n for n in names) else "layer", gated=bool(roles & {"gate", "gate_up"}),
                   act_saves=2 if str(vc.hidden_act) == "quick_gelu" else 1,
                   attn_impl=str(getattr(vc, "_attn_implementation", None) or "sdpa"), rotary=True)
    if patches is None:
        patches = qwen_patches(vc, qwen_pixel_budget(model_cfg, model.model_type), opts.image_size,
                               model.model_type in GLM_FAMILIES)
        how = f"a {opts.image_size[0]}x{opts.image_size[1]} image through the processor's resize"
    merge = vc.spatial_merge_size**2
    image = dict(vision_used_layers=len(model.vision.model.blocks), vision_tokens=patches,
                 vision_feature_tokens=patches, image_size=0, image_tokens=patches // merge,
                 connector_name=f"native:{model.model_type}", connector_module=_qwen_mergers(model),
                 pixel_elements=patches * vc.in_channels * vc.temporal_patch_size * vc.patch_size**2, how=how)
    return vis, image


def _qwen_mergers(model):
    """The module the planner traces for the connector: the merger, and for Qwen3-VL also each DeepStack merger,
    every one over the tower's tokens (the DeepStack ones read intermediate layers: same shape, same saved bytes);
    GLM-4.1V's `downsample` conv (merge × merge patches → one token) then its merger."""
    from torch import nn

    if model.model_type in GLM_FAMILIES:
        return _glm4v_connector(model.connector, model.hf.config.vision_config.spatial_merge_size)
    deepstack = getattr(model.connector, "deepstack_merger_list", None)
    if deepstack is None:
        return model.connector.merger

    class AllMergers(nn.Module):
        def __init__(self):
            super().__init__()
            self.mergers = nn.ModuleList([model.connector.merger, *deepstack])

        def forward(self, x):  # x: [n_img, patches, d_vision] → one [n_img·patches/merge², d_lm] per merger
            return [m(x) for m in self.mergers]

    return AllMergers()


def _glm4v_connector(connector, merge: int):
    """GLM-4.1V's connector as its tower runs it after the post-layernorm (`Glm4vVisionModel.forward`): the merge ×
    merge patches of each LM token through the `downsample` conv, then the merger: `[n_img, patches, d] →
    [n_img·patches/merge², d_lm]`."""
    from torch import nn

    class Glm4vConnector(nn.Module):
        def __init__(self):
            super().__init__()
            self.downsample, self.merger = connector.downsample, connector.merger

        def forward(self, x):
            x = x.reshape(-1, merge, merge, x.shape[-1]).permute(0, 3, 1, 2)
            return self.merger(self.downsample(x).reshape(-1, self.downsample.out_channels))

    return Glm4vConnector()


# ---- Gemma 3 --------------------------------------------------------------------------------------------------------

def _gemma3(model, opts, block) -> tuple[StackGeo, dict]:
    cfg = model.hf.config
    vc = cfg.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    image = dict(vision_used_layers=int(vc.num_hidden_layers), vision_tokens=patches, vision_feature_tokens=patches,
                 image_size=int(vc.image_size), image_tokens=int(cfg.mm_tokens_per_image),
                 connector_name="native:gemma3", connector_module=model.connector.projector,
                 how=f"fixed per image ({vc.image_size}² SigLIP input, average-pooled"
                     + ("; --image-size is ignored" if opts.image_size else "") + ")")
    return stack_geo(vc, block, rotary=False), image



# ---- Idefics3 / SmolVLM ---------------------------------------------------------------------------------------------

def idefics3_budget(model, model_cfg) -> tuple[int, int]:
    """(crop side, longest edge) of the image splitting: the checkpoint folder's saved image processor, then the
    model config's `processor:`; else the tower's input size as the crop and 4 crops per side as the longest edge
    (Idefics3-8B: 364 / 1456, SmolVLM-256M/500M: 512 / 2048 — transformers' class defaults are Idefics3-8B's)."""
    crop = int(model.hf.config.vision_config.image_size)
    longest = 4 * crop
    for layer in (saved_image_processor(model_cfg), model_cfg.processor):
        crop = int((layer.get("max_image_size") or {}).get("longest_edge", crop))
        longest = int((layer.get("size") or {}).get("longest_edge", longest))
    return crop, longest


def idefics3_crops(model, model_cfg, image_hw: tuple[int, int]) -> tuple[int, int, int]:
    """(crops, rows, cols) for an image of `image_hw`, by transformers' own rule
    (`Idefics3ImageProcessorPil.get_number_of_image_patches`): the resized image cut into crop-sized tiles plus one
    global view, or one crop when the image fits in one."""
    from transformers import Idefics3ImageProcessorPil

    crop, longest = idefics3_budget(model, model_cfg)
    proc = Idefics3ImageProcessorPil(size={"longest_edge": longest}, max_image_size={"longest_edge": crop})
    n, rows, cols = proc.get_number_of_image_patches(image_hw[0], image_hw[1])
    return max(n, 1), rows, cols


def _idefics3(model, model_cfg, block, image_hw, how: str) -> tuple[StackGeo, dict]:
    """SigLIP-style tower run once per crop, pixel shuffle + projection per crop (`image_seq_len` LM tokens), and the
    processor's text around them: `<fake_token_around_image><row_r_col_c>` per tile, a newline per row, the global
    view's `<fake_token_around_image><global-img>` and a closing `<fake_token_around_image>`."""
    cfg = model.hf.config
    vc = cfg.vision_config
    crop, longest = idefics3_budget(model, model_cfg)
    if image_hw is None:  # the processor scales every image up to longest_edge: a square one gives the most crops
        image_hw = (longest, longest)
        how = (f"a square image (the processor resizes every image to a {longest}-px longest edge, then cuts "
               f"{crop}² crops; --image-size HxW plans a given aspect)")
    crops, rows, cols = idefics3_crops(model, model_cfg, image_hw)
    patches = (crop // vc.patch_size) ** 2
    seq_len = patches // cfg.scale_factor**2
    lm_tokens = seq_len + 3 + (rows * (cols * (seq_len + 2) + 1) if rows else 0)  # Idefics3Processor's count
    image = dict(vision_used_layers=int(vc.num_hidden_layers), vision_tokens=patches, vision_feature_tokens=patches,
                 image_size=crop, image_tokens=lm_tokens, crops_per_image=crops,
                 connector_name=f"native:{model.model_type}", connector_module=model.connector.projector,
                 how=how or f"a {image_hw[0]}x{image_hw[1]} image: {crops} crop(s) of {crop}² by the processor's rule")
    return stack_geo(vc, block, rotary=False), image


# ---- LLaVA / LLaVA-NeXT / LLaVA-OneVision ---------------------------------------------------------------------------

def _tower_prefix_tokens(model) -> int:
    """Tokens the tower adds before its patches: CLIP's CLS (1), SigLIP none (0)."""
    emb = next(m for m in model.vision.modules() if hasattr(m, "patch_embedding"))
    return 1 if getattr(emb, "class_embedding", None) is not None else 0


def llava_crops(model, image_hw: tuple[int, int], images_per_sample: int = 1) -> int:
    """Tower passes for one image: transformers' own `image_size_to_num_patches` (best grid pinpoint in tower-sized
    tiles + the base view); LLaVA-1.5 and each image of a multi-image OneVision sample: one."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.hf.config
    if model.model_type == "llava" or (model.model_type == "llava_onevision" and images_per_sample > 1):
        return 1
    return image_size_to_num_patches(list(image_hw), cfg.image_grid_pinpoints, cfg.vision_config.image_size)


def llava_image_tokens(model, image_hw: tuple[int, int], images_per_sample: int = 1) -> int:
    """LM tokens of one image, by the processor's own rule (`LlavaNextProcessor` / `LlavaOnevisionProcessor`
    `._get_number_of_features`). The rule reads only the grid pinpoints, the crop's patch grid and OneVision's
    `anyres_max_N` cap, so it runs on a bare processor object holding those: the constructor wants a tokenizer,
    which a `meta` preset does not have."""
    from transformers import LlavaNextProcessor, LlavaOnevisionProcessor

    cfg = model.hf.config
    vc = cfg.vision_config
    side = vc.image_size // vc.patch_size
    prefix = _tower_prefix_tokens(model)
    drop_cls = 1 if cfg.vision_feature_select_strategy == "default" else 0
    if model.model_type == "llava":
        return side * side + prefix - drop_cls
    if model.model_type == "llava_onevision":
        if images_per_sample > 1:  # the processor's multi-image rule: the base view + the image_newline
            return side * side + 1 - drop_cls
        proc = object.__new__(LlavaOnevisionProcessor)
        proc.num_image_tokens, proc.vision_aspect_ratio = side * side, cfg.vision_aspect_ratio
    else:
        proc = object.__new__(LlavaNextProcessor)
        proc.patch_size, proc.num_additional_image_tokens = vc.patch_size, prefix
    proc.image_processor = SimpleNamespace(image_grid_pinpoints=cfg.image_grid_pinpoints)
    return proc._get_number_of_features(image_hw[0], image_hw[1], vc.image_size, vc.image_size) - drop_cls


def anyres_worst_images(model, images_per_sample: int) -> list[tuple[tuple[int, int], str]]:
    """Image sizes to plan when none is given: the grid pinpoint with the most crops (the tower's worst) and the one
    with the most LM tokens (the LLM's worst), each with how the plan chose it."""
    if model.model_type == "llava_onevision" and images_per_sample > 1:
        side = int(model.hf.config.vision_config.image_size)
        return [((side, side), "each image of a multi-image sample is one base view + image_newline (the "
                               "processor's and the model's multi-image rule), whatever its size")]
    pins = [tuple(int(v) for v in pin) for pin in model.hf.config.image_grid_pinpoints]
    most_crops = max(pins, key=lambda hw: (llava_crops(model, hw, images_per_sample), hw[0] * hw[1]))
    most_tokens = max(pins, key=lambda hw: (llava_image_tokens(model, hw, images_per_sample), hw[0] * hw[1]))
    how = ("the worse of the grid pinpoint with the most crops ({}) and the one with the most LM tokens ({}); "
           "--image-size HxW plans a given size").format(*("x".join(map(str, hw)) for hw in (most_crops, most_tokens)))
    return [(hw, f"a {hw[0]}x{hw[1]} image, {how}") for hw in dict.fromkeys((most_crops, most_tokens))]


def _llava(model, block, image_hw, images_per_sample: int, how: str) -> tuple[StackGeo, dict]:
    """The tower's stack up to the feature layer, run once per crop; the 2-layer GELU projector (the planner's
    `mlp2x_gelu` closed form) over every crop's selected features; the processor's LM-token count per image."""
    cfg = model.hf.config
    vc = cfg.vision_config
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise ConfigError(f"plan: {model.model_type} with a list-valued vision_feature_layer ({layer}) is not "
                          "planned yet (its projector reads the concatenated layers)")
    if image_hw is None:  # LLaVA-1.5: one fixed-size crop whatever the image
        image_hw = (int(vc.image_size), int(vc.image_size))
    patches = (vc.image_size // vc.patch_size) ** 2
    prefix = _tower_prefix_tokens(model)
    n_layers = int(vc.num_hidden_layers)
    crops = llava_crops(model, image_hw, images_per_sample)
    image = dict(vision_used_layers=layer if layer >= 0 else n_layers + 1 + layer, vision_tokens=patches + prefix,
                 vision_feature_tokens=patches + prefix - (cfg.vision_feature_select_strategy == "default"),
                 image_size=int(vc.image_size), image_tokens=llava_image_tokens(model, image_hw, images_per_sample),
                 crops_per_image=crops, connector_name="mlp2x_gelu", connector_module=model.connector.projector,
                 how=how or (f"a {image_hw[0]}x{image_hw[1]} image: {crops} crop(s) of {vc.image_size}² by "
                             "transformers' AnyRes rule" if model.model_type != "llava"
                             else f"fixed per image ({vc.image_size}² tower input)"))
    return stack_geo(vc, block, rotary=False), image


# ---- InternVL -------------------------------------------------------------------------------------------------------

def internvl_tiling(model, model_cfg) -> dict:
    """The image processor's tiling settings (`crop_to_patches`, `min_patches`, `max_patches`, tile `size`): the
    checkpoint folder's saved processor, then the model config's `processor:`; else the InternVL checkpoints'
    (tiles of the tower's input size, 1 … 12 of them)."""
    side = _side(model.hf.config.vision_config.image_size)
    out = {"crop_to_patches": True, "min_patches": 1, "max_patches": 12, "size": {"height": side, "width": side}}
    for layer in (saved_image_processor(model_cfg), model_cfg.processor):
        out.update({k: v for k, v in layer.items() if k in out})
    return out


def _side(size) -> int:
    """A tower's square input side from `image_size` given as an int or `[h, w]`."""
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def internvl_tiles(model, model_cfg, image_hw: tuple[int, int]) -> int:
    """Tower passes for one image, by transformers' own rule (`GotOcr2ImageProcessorPil.get_number_of_image_patches`:
    the best grid of tiles for the image's aspect, + a thumbnail when there is more than one tile)."""
    from transformers import GotOcr2ImageProcessorPil

    t = internvl_tiling(model, model_cfg)
    proc = GotOcr2ImageProcessorPil(size=t["size"], crop_to_patches=t["crop_to_patches"])
    return int(proc.get_number_of_image_patches(image_hw[0], image_hw[1],
                                                {"min_patches": t["min_patches"], "max_patches": t["max_patches"]}))


def _internvl(model, model_cfg, block, opts, max_len: int) -> tuple[StackGeo, dict]:
    """InternViT run once per tile up to the feature layer (-1: all), its CLS dropped, then the pixel shuffle and the
    MLP projector (`_internvl_connector`); `image_seq_length` LM tokens per tile between `<img>` and `</img>`.
    Without `--image-size`, the image with the most tiles whose tokens fit `max_len` (a sample with more is
    rejected as over_length, so it never trains)."""
    cfg = model.hf.config
    vc = cfg.vision_config
    if cfg.vision_feature_layer != -1:
        raise ConfigError(f"plan: internvl with vision_feature_layer {cfg.vision_feature_layer} is not planned yet "
                          "(only the last layer, as the InternVL checkpoints use)")
    t = internvl_tiling(model, model_cfg)
    tile = int(t["size"]["height"])
    patches = (_side(vc.image_size) // _side(vc.patch_size)) ** 2
    shuffled = int(patches * cfg.downsample_ratio ** 2)
    image_hw, how = opts.image_size, ""
    if image_hw is None:
        image_hw, how = _internvl_worst_image(model, model_cfg, t, tile, shuffled, opts.images_per_sample, max_len)
    tiles = internvl_tiles(model, model_cfg, image_hw)
    image = dict(vision_used_layers=int(vc.num_hidden_layers), vision_tokens=patches + 1,
                 vision_feature_tokens=patches, image_size=_side(vc.image_size),
                 image_tokens=tiles * shuffled + 2, crops_per_image=tiles, connector_name="native:internvl",
                 connector_module=_internvl_connector(model),
                 how=how or f"a {image_hw[0]}x{image_hw[1]} image: {tiles} tile(s) of {tile}² by the processor's rule")
    return stack_geo(vc, block, rotary=False), image


def _internvl_worst_image(model, model_cfg, tiling: dict, tile: int, per_tile: int, images: int,
                          max_len: int) -> tuple[tuple[int, int], str]:
    """(image size, how) of the image with the most tiles (a grid of n tiles, n ≤ max_patches) whose LM tokens fit
    `max_len` with `images` images per sample."""
    top = int(tiling["max_patches"]) if tiling["crop_to_patches"] else 1
    for n in range(top, 0, -1):
        cols = max(c for c in range(1, n + 1) if n % c == 0 and c * c <= n)
        hw = (tile * cols, tile * (n // cols))
        tokens = internvl_tiles(model, model_cfg, hw) * per_tile + 2
        if images * tokens <= max_len - 1:
            cut = "" if n == top else f"; more tiles would not fit max_len {max_len}"
            return hw, (f"an image cut into {n} tile(s) (max_patches {top}{cut}; --image-size HxW plans a given "
                        "size)")
    raise ConfigError(f"plan: one InternVL tile is {per_tile + 2} LM tokens; {images} image(s) per sample do not fit "
                      f"max_len {max_len}")


def projector_on(projector, feed):
    """A module the planner traces as the connector: the family's `projector` (a submodule, so the trace's deep copy,
    dtype and requires-grad reach it) called on `feed(x)`, the arguments its model's `get_image_features` hands it
    for the tower's `[n_img, tokens, d]` output."""
    from torch import nn

    class Connector(nn.Module):
        def __init__(self):
            super().__init__()
            self.projector = projector

        def forward(self, x):
            return self.projector(*feed(x))

    return Connector()


def _internvl_connector(model):
    """InternVL's connector as `get_image_features` runs it on the tower's features without the CLS:
    `[tiles, patches, d] → pixel shuffle → [tiles, patches·r², d/r²] → projector → [tiles, patches·r², d_lm]`."""
    hf, ratio = model.hf.model, model.hf.config.downsample_ratio

    def feed(x):
        n, patches, d = x.shape  # n may be 0 (text-only samples)
        side = int(patches ** 0.5)
        x = hf.pixel_shuffle(x.reshape(n, side, side, d), scale_factor=ratio)
        return (x.reshape(n, int(patches * ratio ** 2), x.shape[-1]),)

    return projector_on(model.connector.projector, feed)


# ---- Gemma 4 --------------------------------------------------------------------------------------------------------

def gemma4_patching(model, model_cfg) -> dict:
    """The image processor's patch budget (`patch_size`, `max_soft_tokens`, `pooling_kernel_size`): the checkpoint
    folder's saved processor, then the model config's `processor:`; else transformers' defaults (the checkpoints'
    16 px, 280 soft tokens, 3 × 3 pooling)."""
    from transformers import Gemma4ImageProcessorPil

    out = {k: getattr(Gemma4ImageProcessorPil, k) for k in ("patch_size", "max_soft_tokens", "pooling_kernel_size")}
    for layer in (saved_image_processor(model_cfg), model_cfg.processor):
        out.update({k: int(v) for k, v in layer.items() if k in out})
    return out


def gemma4_soft_tokens(patching: dict, image_hw: tuple[int, int]) -> int:
    """Soft tokens of one image, by the processor's own resize (`get_aspect_ratio_preserving_size`: the largest
    multiple of pooling × patch px per side within the patch budget), one per pooled k × k patches."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

    k, ps = patching["pooling_kernel_size"], patching["patch_size"]
    h, w = get_aspect_ratio_preserving_size(image_hw[0], image_hw[1], ps, patching["max_soft_tokens"] * k * k, k)
    return (h // ps) * (w // ps) // (k * k)


def _gemma4(model, model_cfg, block, opts) -> tuple[StackGeo, dict]:
    """The tower over every image's patches padded to the budget (`max_soft_tokens` × k² of them, whatever the
    image), pooled k × k into soft tokens, `embed_vision` (a norm and a projection) traced as the connector, and
    `<|image>` + the soft tokens + `<image|>` in the LM. Without `--image-size`, the budget's `max_soft_tokens`
    (no image has more)."""
    vc = model.hf.config.vision_config
    t = gemma4_patching(model, model_cfg)
    k = t["pooling_kernel_size"]
    patches = t["max_soft_tokens"] * k * k
    if opts.image_size is None:
        soft, how = t["max_soft_tokens"], (f"at most {t['max_soft_tokens']} soft tokens per image (the processor's "
                                           "budget; --image-size HxW plans a given size)")
    else:
        soft = gemma4_soft_tokens(t, opts.image_size)
        how = f"a {opts.image_size[0]}x{opts.image_size[1]} image: {soft} soft tokens by the processor's resize"
    image = dict(vision_used_layers=int(vc.num_hidden_layers), vision_tokens=patches, vision_feature_tokens=soft,
                 image_size=0, image_tokens=soft + 2, connector_name="native:gemma4",
                 connector_module=model.connector.embed_vision,
                 pixel_elements=patches * 3 * t["patch_size"] ** 2, how=how)
    return stack_geo(vc, block, rotary=True), image


def _gemma4_stack(cfg, layer) -> StackGeo:
    """The decoder's `StackGeo` from its first layer: head sizes are per layer in Gemma 4's config (its blocks are
    traced whole, so these fields only name the stack)."""
    attn = layer.self_attn
    return StackGeo(hidden=int(cfg.hidden_size), intermediate=int(layer.mlp.intermediate_size),
                    heads=int(cfg.num_attention_heads), kv_heads=int(attn.k_proj.out_features // attn.head_dim),
                    head_dim=int(attn.head_dim), norm="rms", gated=True, act_saves=1,
                    attn_impl=str(getattr(cfg, "_attn_implementation", None) or "sdpa"), rotary=True)


def _gemma4_decoder(model, stage, llm: StackGeo, layers) -> None:
    """Gemma 4's decoder layers differ from one another (sliding and full attention with their own head sizes,
    layers that reuse an earlier layer's keys and values, double-wide MLPs there, per-layer inputs, an expert block
    beside the MLP), so the whole decoder is traced on meta (`TracedStack`) with the inputs transformers gives it in
    training; the backward excess is sized by the widest MLP."""
    llm.intermediate = max(int(layer.mlp.intermediate_size) for layer in layers)
    moe = any(getattr(layer, "enable_moe_block", False) for layer in layers)
    llm.traced = TracedStack(model.llm.model, layers, _gemma4_text_run, stage.train.llm is True, moe_bf16=moe)


def _gemma4_text_run(text_model, rows: int, seq: int, dtype, x_rg: bool, mask: bool) -> None:
    """One training forward of Gemma 4's text model on meta: the merged embeddings `[rows, seq, d]`, the per-layer
    token embeddings `[rows, seq, layers, d_pl]` (looked up outside it), and the masks per layer kind as
    `create_masks_for_vision_model` makes them: the full-attention layers' for padded rows (several rows), the
    sliding layers' also for image rows (bidirectional within an image) and whenever the sequence outgrows the
    window."""
    import torch

    cfg = text_model.config
    x = torch.empty(rows, seq, cfg.hidden_size, device="meta", dtype=dtype, requires_grad=x_rg)
    per_layer = None
    if cfg.hidden_size_per_layer_input:
        per_layer = torch.empty(rows, seq, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input, device="meta",
                                dtype=dtype, requires_grad=text_model.embed_tokens_per_layer.weight.requires_grad)
    # full-attention layers stay causal over images: a mask only for padded rows (one row needs none)
    full = torch.ones(rows, 1, seq, seq, dtype=torch.bool, device="meta") if mask and rows > 1 else None
    window = cfg.sliding_window and seq > cfg.sliding_window
    sliding = torch.ones(rows if mask else 1, 1, seq, seq, dtype=torch.bool, device="meta") if mask or window else None
    text_model(inputs_embeds=x, per_layer_inputs=per_layer, use_cache=False,
               attention_mask={"full_attention": full, "sliding_attention": sliding})


def _gemma4_vision_run(encoder, images: int, patches: int, dtype, x_rg: bool, mask: bool) -> None:
    """One training forward of Gemma 4's vision encoder on meta: every image's patch embeddings `[n, patches, d]`,
    their (x, y) positions, and the padding mask `[n, 1, patches, patches]` the tower builds whenever an image has
    fewer patches than the budget (assumed: the worst case)."""
    import torch

    x = torch.empty(images, patches, encoder.config.hidden_size, device="meta", dtype=dtype, requires_grad=x_rg)
    positions = torch.zeros(images, patches, 2, dtype=torch.long, device="meta")
    pad = torch.ones(images, 1, patches, patches, dtype=torch.bool, device="meta")
    encoder(inputs_embeds=x, attention_mask=pad, pixel_position_ids=positions)


# ---- Mistral 3 ------------------------------------------------------------------------------------------------------

def pixtral_budget(model, model_cfg) -> int:
    """The processor's `longest_edge`: the checkpoint folder's saved processor, then the model config's
    `processor:`; else the tower's `image_size` (the checkpoints' own value: 1540 for Mistral-Small-3.1/3.2, whose
    2D RoPE table holds 1540 / 14 = 110 positions per side)."""
    edge = int(model.hf.config.vision_config.image_size)
    for layer in (saved_image_processor(model_cfg), model_cfg.processor):
        edge = int((layer.get("size") or {}).get("longest_edge", edge))
    return edge


def pixtral_grid(model, model_cfg, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of LM tokens for an image, by the processor's own resize (`get_resize_output_image_size` with
    patch × merge px per token)."""
    import numpy as np
    from transformers.models.pixtral.image_processing_pil_pixtral import get_resize_output_image_size

    cfg = model.hf.config
    unit = int(cfg.vision_config.patch_size) * int(cfg.spatial_merge_size)
    edge = pixtral_budget(model, model_cfg)
    h, w = get_resize_output_image_size(np.zeros((*image_hw, 3)), size=(edge, edge), patch_size=(unit, unit))
    return h // unit, w // unit


def _mistral3(model, model_cfg, block, opts, max_len: int) -> tuple[StackGeo, dict]:
    """Pixtral's patches of the resized image (merge² per LM token), the projector (norm, patch merger, MLP) traced as
    the connector, rows × (cols + 1) LM tokens. Without `--image-size`, the largest square image whose tokens fit
    `max_len` (a sample with more is rejected as over_length, so it never trains)."""
    cfg = model.hf.config
    vc = cfg.vision_config
    if cfg.vision_feature_layer != -1:
        raise ConfigError(f"plan: mistral3 with vision_feature_layer {cfg.vision_feature_layer} is not planned yet "
                          "(only the last layer, as the Mistral 3 checkpoints use)")
    merge = int(cfg.spatial_merge_size)
    unit = int(vc.patch_size) * merge
    edge = pixtral_budget(model, model_cfg)
    if opts.image_size:
        image_hw = opts.image_size
        rows, cols = pixtral_grid(model, model_cfg, image_hw)
        how = f"a {image_hw[0]}x{image_hw[1]} image: {rows}×{cols} tokens by the processor's resize"
    else:
        rows = cols = _pixtral_largest_square(edge // unit, opts.images_per_sample, max_len)
        image_hw = (rows * unit, cols * unit)
        cut = "" if rows == edge // unit else f"; larger ones would not fit max_len {max_len}"
        how = (f"a {image_hw[0]}x{image_hw[1]} image, the largest square (longest edge {edge} px{cut}; --image-size "
               "HxW plans a given size)")
    patches = rows * cols * merge * merge
    side = (rows * merge * int(vc.patch_size), cols * merge * int(vc.patch_size))
    image = dict(vision_used_layers=int(vc.num_hidden_layers), vision_tokens=patches, vision_feature_tokens=patches,
                 image_size=0, image_tokens=rows * (cols + 1), connector_name="native:mistral3",
                 connector_module=_mistral3_connector(model, side), pixel_elements=3 * side[0] * side[1], how=how)
    return stack_geo(vc, block, rotary=True), image


def _pixtral_largest_square(side: int, images: int, max_len: int) -> int:
    """Tokens per side of the largest square image (≤ `side`) of which `images` fit `max_len` (rows × (cols + 1)
    each, next to at least one text token)."""
    for n in range(side, 0, -1):
        if images * n * (n + 1) <= max_len - 1:
            return n
    raise ConfigError(f"plan: one Mistral 3 image is at least 2 LM tokens; {images} image(s) per sample do not fit "
                      f"max_len {max_len}")


def _mistral3_connector(model, side: tuple[int, int]):
    """Mistral 3's projector as `get_image_features` runs it on the tower's one sequence: `[n_img, patches, d] →
    [n_img·patches, d] → norm → patch merger (merge × merge patches of each image's grid → one) → MLP →
    [n_img·patches/merge², d_lm]`, every image `side` px (its resized height and width)."""
    import torch

    return projector_on(model.connector.projector,
                        lambda x: (x.reshape(-1, x.shape[-1]), torch.tensor([side] * x.shape[0])))


def _pixtral_run(transformer, images: int, patches: int, dtype, x_rg: bool, mask: bool) -> None:
    """One training forward of Pixtral's blocks on meta: every image's patches as one sequence `[1, images·patches,
    d]`, the 2D rotary tables over it and the block-diagonal mask `[1, 1, N, N]` in the compute dtype
    (`generate_block_attention_mask`)."""
    import torch

    n = images * patches
    head_dim = transformer.layers[0].attention.head_dim
    x = torch.empty(1, n, transformer.config.hidden_size, device="meta", dtype=dtype, requires_grad=x_rg)
    rotary = (torch.empty(n, head_dim, device="meta", dtype=dtype), torch.empty(n, head_dim, device="meta",
                                                                                 dtype=dtype))
    block_mask = torch.empty(1, 1, n, n, device="meta", dtype=dtype)
    transformer(x, attention_mask=block_mask, position_embeddings=rotary)


# ---- PaliGemma ------------------------------------------------------------------------------------------------------

def _paligemma(model, block, opts) -> tuple[StackGeo, dict]:
    """SigLIP at its fixed input size, every patch one LM token through the linear projector (the planner's
    `linear` closed form)."""
    vc = model.hf.config.vision_config
    patches = (int(vc.image_size) // int(vc.patch_size)) ** 2
    image = dict(vision_used_layers=int(vc.num_hidden_layers), vision_tokens=patches, vision_feature_tokens=patches,
                 image_size=int(vc.image_size), image_tokens=patches, connector_name="linear",
                 connector_module=model.connector.projector,
                 how=f"fixed per image ({vc.image_size}² SigLIP input" + ("; --image-size is ignored)" if opts.image_size
                                                                          else ")"))
    return stack_geo(vc, block, rotary=False), image


# ---- Llama 4 --------------------------------------------------------------------------------------------------------

def llama4_tiling(model, model_cfg) -> tuple[int, int]:
    """(tile side, max_patches) of the image processor: the checkpoint folder's saved processor, then the model
    config's `processor:`; else the tower's input size and the checkpoints' 16 tiles."""
    tile, most = int(model.hf.config.vision_config.image_size), 16
    for layer in (saved_image_processor(model_cfg), model_cfg.processor):
        tile = int((layer.get("size") or {}).get("height", tile))
        most = int(layer.get("max_patches", most))
    return tile, most


def llama4_grid(model, model_cfg, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of tiles for an image, by the image processor's own canvas choice (`best_fit` over the
    supported resolutions; vlmtrain's torchvision-free port of transformers' processor)."""
    import torch

    from vlmtrain.model.native.image_processors.llama4 import best_fit, supported_resolutions

    tile, most = llama4_tiling(model, model_cfg)
    target = best_fit(tuple(image_hw), torch.tensor(supported_resolutions(most, tile)), False)
    return int(target[0]) // tile, int(target[1]) // tile


def llama4_image_tokens(rows: int, cols: int, per_tile: int) -> int:
    """LM tokens of one image as `Llama4Processor._prompt_split_image` writes them: `<|image_start|>`, for more than
    one tile each tile's patches with an x-separator between columns and a y-separator after each row, then
    `<|image|>`, the global tile's patches and `<|image_end|>`."""
    tiled = rows * cols * per_tile + rows * (cols - 1) + rows if rows * cols > 1 else 0
    return 1 + tiled + 1 + per_tile + 1


def _llama4(model, model_cfg, block, opts, max_len: int) -> tuple[StackGeo, dict]:
    """The tower (patches + CLS per tile) through its pixel-shuffle adapter and the projector, traced together as the
    connector from the tower's blocks' output (`_llama4_connector`)."""
    vc = model.hf.config.vision_config
    side = int(vc.image_size) // int(vc.patch_size)
    per_tile = int(side * side * float(vc.pixel_shuffle_ratio) ** 2)
    if opts.image_size:
        image_hw, how = opts.image_size, ""
        rows, cols = llama4_grid(model, model_cfg, image_hw)
    else:
        (rows, cols), how = _llama4_worst_grid(model, model_cfg, per_tile, opts.images_per_sample, max_len)
    crops = rows * cols + (1 if rows * cols > 1 else 0)
    if not how:
        how = f"a {image_hw[0]}x{image_hw[1]} image: {rows}×{cols} tile(s) by the processor's canvas choice"
    image = dict(vision_used_layers=int(vc.num_hidden_layers), vision_tokens=side * side + 1,
                 vision_feature_tokens=side * side + 1, image_size=int(vc.image_size),
                 image_tokens=llama4_image_tokens(rows, cols, per_tile), crops_per_image=crops,
                 connector_name="native:llama4", connector_module=_llama4_connector(model), how=how)
    return stack_geo(vc, block, rotary=True), image


def _llama4_worst_grid(model, model_cfg, per_tile: int, images: int, max_len: int) -> tuple[tuple[int, int], str]:
    """The tile grid with the most tiles (≤ max_patches) whose tokens fit `max_len` with `images` per sample."""
    tile, most = llama4_tiling(model, model_cfg)
    for n in range(most, 0, -1):
        cols = max(c for c in range(1, n + 1) if n % c == 0 and c * c <= n)
        grid = (n // cols, cols)
        if images * llama4_image_tokens(*grid, per_tile) <= max_len - 1:
            cut = "" if n == most else f"; more tiles would not fit max_len {max_len}"
            return grid, (f"an image cut into {n} tile(s) + the global one (max_patches {most}{cut}; --image-size "
                          "HxW plans a given size)")
    raise ConfigError(f"plan: one Llama 4 image is {llama4_image_tokens(1, 1, per_tile)} LM tokens; {images} "
                      f"image(s) per sample do not fit max_len {max_len}")


def _llama4_connector(model):
    """What runs between the tower's blocks and the LM: the post-norm, the CLS dropped, the pixel-shuffle adapter
    (part of the vision role: it trains with the tower) and the projector (the connector role):
    `[tiles, patches + 1, d] → [tiles, patches · ratio², d_lm]`."""
    from torch import nn

    tower, projector = model.vision.model, model.connector.projector

    class Llama4Connector(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.adapter, self.projector = tower.layernorm_post, tower.vision_adapter, projector

        def requires_grad_(self, requires_grad: bool = True):  # the planner's "connector trains": the projector's
            self.projector.requires_grad_(requires_grad)
            return self

        def forward(self, x):
            return self.projector(self.adapter(self.norm(x)[:, :-1, :]))

    return Llama4Connector()


# ---- LFM2-VL --------------------------------------------------------------------------------------------------------

def lfm2_vl_options(model, model_cfg) -> dict:
    """The image processor's options (vlmtrain's port, `Lfm2VlImageProcessorPil`): its defaults (the checkpoints'),
    then the checkpoint folder's saved processor, then the model config's `processor:`."""
    from vlmtrain.model.native.image_processors.lfm2_vl import Lfm2VlImageProcessorKwargs, Lfm2VlImageProcessorPil

    kw = {}
    for layer in (saved_image_processor(model_cfg), model_cfg.processor):
        kw.update({k: v for k, v in layer.items() if k in Lfm2VlImageProcessorKwargs.__annotations__})
    return Lfm2VlImageProcessorPil(**kw)._options({})


def lfm2_vl_layout(o: dict, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(tower passes, LM tokens) of one image, as the processor tiles it and `Lfm2VlProcessor._build_image_tokens`
    writes it (with the image special tokens: start, per-tile row/column markers, the thumbnail marker, end)."""
    from vlmtrain.model.native.image_processors.lfm2_vl import split_layout

    eps, df = o["encoder_patch_size"], o["downsample_factor"]
    split, rows, cols, (h, w) = split_layout(*image_hw, o)
    single = math.ceil((h // eps) / df) * math.ceil((w // eps) / df)
    if not split or rows * cols == 1:
        return 1, 2 + (math.ceil(o["tile_size"] // eps / df) ** 2 if split else single)
    per_tile = math.ceil(o["tile_size"] // eps / df) ** 2
    thumb = 1 + single if o["use_thumbnail"] else 0
    return rows * cols + bool(o["use_thumbnail"]), 2 + rows * cols * (1 + per_tile) + thumb


def _lfm2_vl(model, model_cfg, block, opts, max_len: int) -> tuple[StackGeo, dict]:
    """Every tile through the tower over `max_num_patches` padded patches; the projector reads a tile's patch grid
    (the largest tile's, `tile_size / patch` per side)."""
    vc = model.hf.config.vision_config
    o = lfm2_vl_options(model, model_cfg)
    if opts.image_size:
        image_hw, how = opts.image_size, ""
    else:
        image_hw, how = _lfm2_vl_worst_image(o, opts.images_per_sample, max_len)
    tiles, tokens = lfm2_vl_layout(o, image_hw)
    how = how or f"a {image_hw[0]}x{image_hw[1]} image: {tiles} tile(s) by the processor's layout"
    side = o["tile_size"] // o["encoder_patch_size"]
    patches = int(o["max_num_patches"])
    image = dict(vision_used_layers=int(vc.num_hidden_layers), vision_tokens=patches, vision_feature_tokens=patches,
                 image_size=0, image_tokens=tokens, crops_per_image=tiles, connector_name="native:lfm2_vl",
                 connector_module=_lfm2_vl_connector(model, side),
                 pixel_elements=patches * 3 * o["encoder_patch_size"] ** 2, how=how)
    return stack_geo(vc, block, rotary=False), image


def _lfm2_vl_worst_image(o: dict, images: int, max_len: int) -> tuple[tuple[int, int], str]:
    """The image (a tile grid's own size) with the most tower passes whose tokens fit `max_len`."""
    from vlmtrain.model.native.image_processors.lfm2_vl import target_ratios

    tile, budget = o["tile_size"], o["max_image_tokens"] * (o["encoder_patch_size"] * o["downsample_factor"]) ** 2
    grids = [(1, 1)] + [(r, c) for c, r in target_ratios(o["min_tiles"], o["max_tiles"])]
    # each grid's aspect, scaled past the processor's split threshold (tolerance × the token budget in pixels)
    scale = [max(1, math.ceil(math.sqrt(o["max_pixels_tolerance"] * budget / (tile * tile * r * c))) + 1)
             for r, c in grids]
    sizes = sorted(((tile * r * k, tile * c * k) for (r, c), k in zip(grids, scale)),
                   key=lambda hw: lfm2_vl_layout(o, hw), reverse=True)
    for hw in sizes:
        if images * lfm2_vl_layout(o, hw)[1] <= max_len - 1:
            tiles = lfm2_vl_layout(o, hw)[0]
            return hw, (f"a {hw[0]}x{hw[1]} image: {tiles} tile(s), the most whose tokens fit max_len {max_len} "
                        "(--image-size HxW plans a given size)")
    raise ConfigError(f"plan: {images} LFM2-VL image(s) per sample do not fit max_len {max_len}")


def _lfm2_vl_connector(model, side: int):
    """LFM2-VL's projector as `get_image_features` runs it on one tile's unpadded features: `[tiles, patches, d] →
    [tiles, side, side, d] → pixel unshuffle → norm → MLP → [tiles, side² / factor², d_lm]`."""
    return projector_on(model.connector.projector,
                        lambda x: (x[:, :side * side].reshape(x.shape[0], side, side, x.shape[-1]),))
