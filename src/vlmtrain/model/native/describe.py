"""Image tokens per image for `describe` on native families, where the count depends on the image.

With the family's processor at hand (a local checkpoint), its own count for one 448×448 image
(`_get_num_multimodal_tokens`). On `meta` without processor files, the family's rule from the config for that
image, for the model types whose rule was checked against their transformers processor (or, for PaliGemma, the
model's own feature count; tests/test_describe_all.py): Qwen2/2.5/3-VL, Qwen3-VL-MoE, Qwen3.5 (dense and MoE),
GLM-4.1V/4.5V `(448 / (patch × merge))²`; Gemma 3 `mm_tokens_per_image`; PaliGemma and LLaVA the tower's grid;
LLaVA-NeXT/-OneVision transformers' AnyRes count; Idefics3/SmolVLM one crop `(image_size / patch)² / scale²`;
InternVL `<img>` + the pixel-shuffled grid per tile + `</img>`; Mllama one `<|image|>` token (its tiles enter
through cross-attention). Any other model type: unknown (None) — a rule guessed from another family's config
fields would print a number that is not the family's (Pixtral merges patches, GOT-OCR2 compresses them, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

REFERENCE_SIDE = 448
_ONE_IMAGE = f"one {REFERENCE_SIDE}x{REFERENCE_SIDE} image, from the config"


def _qwen(cfg) -> tuple[int, str]:
    v = cfg.vision_config
    unit = v.patch_size * v.spatial_merge_size
    return (REFERENCE_SIDE // unit) ** 2, _ONE_IMAGE


def _gemma3(cfg) -> tuple[int, str]:
    return int(cfg.mm_tokens_per_image), "fixed per image (mm_tokens_per_image)"


def _idefics3(cfg) -> tuple[int, str]:
    v = cfg.vision_config
    return (v.image_size // v.patch_size) ** 2 // cfg.scale_factor ** 2, \
        "per image crop (image splitting adds crops for larger images)"


def _cls_tokens(cfg) -> int:
    """Tokens a LLaVA tower adds beside its patch grid: CLIP's class token, kept by the "full" feature strategy
    (the processors' `num_additional_image_tokens` minus the one "default" drops); SigLIP has none."""
    clip = cfg.vision_config.model_type == "clip_vision_model"
    return 1 if clip and getattr(cfg, "vision_feature_select_strategy", "default") == "full" else 0


def _llava(cfg) -> tuple[int, str]:
    v = cfg.vision_config
    return (v.image_size // v.patch_size) ** 2 + _cls_tokens(cfg), "per image, resized to the tower's size"


def _anyres(cfg) -> tuple[int, str]:
    """LLaVA-NeXT / -OneVision: transformers' own AnyRes count (the processor's `_get_number_of_features`) for one
    448×448 image, with the config's grid pinpoints and the checkpoints' processor settings (views at the tower's
    size; OneVision's base view is the tower's grid, its `vision_aspect_ratio` caps the tiles)."""
    import transformers

    v = cfg.vision_config
    side, grid = v.image_size, (v.image_size // v.patch_size) ** 2
    name = "LlavaNextProcessor" if cfg.model_type == "llava_next" else "LlavaOnevisionProcessor"
    proc = object.__new__(getattr(transformers, name))  # only its counting methods run: no tokenizer needed
    proc.image_processor = SimpleNamespace(image_grid_pinpoints=cfg.image_grid_pinpoints)
    proc.patch_size = v.patch_size
    proc.num_image_tokens = grid
    proc.vision_aspect_ratio = getattr(cfg, "vision_aspect_ratio", "anyres_max_9")
    strategy = getattr(cfg, "vision_feature_select_strategy", "default")
    proc.vision_feature_select_strategy = strategy
    proc.num_additional_image_tokens = 1 if v.model_type == "clip_vision_model" else 0
    tokens = proc._get_number_of_features(REFERENCE_SIDE, REFERENCE_SIDE, side, side)
    if strategy == "default":
        tokens -= 1
    return tokens, f"{_ONE_IMAGE}: AnyRes views of {side}x{side}"


def _side(value) -> int:
    """A square size given as an int or as (height, width)."""
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


def _internvl(cfg) -> tuple[int, str]:
    """InternVLProcessor: `<img>` + `<IMG_CONTEXT>` per feature of each tile + `</img>`. Features per tile: the tower's
    grid after the pixel shuffle (as get_image_features makes them; the checkpoints' processors set image_seq_length
    to it). Tiles: the processor crops to patches by default (its images_kwargs), so the tiles of a 448×448 image
    come from transformers' own GotOcr2 tiling at the tower's size (one tile for a 448-px tower)."""
    from transformers import GotOcr2ImageProcessorPil

    v = cfg.vision_config
    side = _side(v.image_size)
    per_tile = int((side // _side(v.patch_size)) ** 2 * cfg.downsample_ratio ** 2)
    tiling = GotOcr2ImageProcessorPil(size={"height": side, "width": side}, crop_to_patches=True)
    tiles = tiling.get_number_of_image_patches(REFERENCE_SIDE, REFERENCE_SIDE, {})
    return 2 + per_tile * tiles, f"{_ONE_IMAGE}: {tiles} tile(s) of {side}x{side}, {per_tile} tokens each"


def _paligemma(cfg) -> tuple[int, str]:
    # the image is resized to the tower's size and every patch is a token (no pooling): what get_image_features
    # returns per image, and the image_seq_length the checkpoints' processors write
    v = cfg.vision_config
    return (v.image_size // v.patch_size) ** 2, "fixed per image (the tower's patch grid)"


def _mllama(cfg) -> tuple[int, str]:
    return 1, "one <|image|> token per image (its tiles enter through cross-attention)"


RULES: dict[str, Callable] = {
    "qwen2_vl": _qwen, "qwen2_5_vl": _qwen, "qwen3_vl": _qwen, "qwen3_vl_moe": _qwen, "qwen3_5": _qwen,
    "qwen3_5_moe": _qwen, "glm4v": _qwen, "glm4v_moe": _qwen,  # GLM-4.1V/4.5V: Qwen2-VL's smart_resize and merge
    "paligemma": _paligemma,
    "gemma3": _gemma3,
    "idefics3": _idefics3, "smolvlm": _idefics3,
    "llava": _llava, "llava_next": _anyres, "llava_onevision": _anyres,
    "internvl": _internvl,
    "mllama": _mllama,
}


def _from_config(cfg) -> tuple[int | None, str]:
    rule = RULES.get(cfg.model_type)
    if rule is None:
        return None, (f"no vlmtrain rule for model_type {cfg.model_type!r}; the processor of a local `pretrained:` "
                      "checkpoint counts them")
    try:
        return rule(cfg)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError) as e:  # a config the rule cannot read
        return None, f"the {cfg.model_type} rule cannot read this config ({type(e).__name__}: {e})"


def image_tokens_estimate(hf_config, processor, overrides: dict | None = None) -> tuple[int | None, str]:
    """(tokens for one image, how they were counted); tokens is None where vlmtrain cannot say (`how` says why)."""
    counted = _from_processor(processor)
    if counted is not None:
        return counted, f"one {REFERENCE_SIDE}x{REFERENCE_SIDE} image, from the processor"
    return _from_config(hf_config)


def _from_processor(processor) -> int | None:
    """The processor's own count, or None when it has no image-token helper (then the config rule applies)."""
    if processor is None or not hasattr(processor, "_get_num_multimodal_tokens"):
        return None
    try:
        data = processor._get_num_multimodal_tokens(image_sizes=[[REFERENCE_SIDE, REFERENCE_SIDE]])
        return int(data["num_image_tokens"][0] if isinstance(data, dict) else data.num_image_tokens[0])
    except (AttributeError, KeyError, TypeError, ValueError, IndexError, NotImplementedError):
        return None
