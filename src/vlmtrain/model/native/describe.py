"""Image tokens per image for `describe` on native families, where the count depends on the image.

With the family's processor at hand (a local checkpoint), its own count for one 448×448 image
(`_get_num_multimodal_tokens`). On `meta` without processor files, the family's rule from the config for that
image: Qwen `(448 / (patch × merge))²`; Gemma 3 `mm_tokens_per_image`; Idefics3/SmolVLM one crop
`(image_size / patch)² / scale²`; LLaVA-family the tower's grid at its native size (AnyRes tiles come on top).
"""

from __future__ import annotations

REFERENCE_SIDE = 448


def _from_config(cfg) -> tuple[int, str]:
    mt = cfg.model_type
    v = getattr(cfg, "vision_config", None)
    if mt.startswith("qwen"):
        unit = v.patch_size * v.spatial_merge_size
        return (REFERENCE_SIDE // unit) ** 2, f"one {REFERENCE_SIDE}x{REFERENCE_SIDE} image, from the config"
    if mt == "gemma3":
        return int(cfg.mm_tokens_per_image), "fixed per image (mm_tokens_per_image)"
    if mt in ("idefics3", "smolvlm"):
        per_crop = (v.image_size // v.patch_size) ** 2 // cfg.scale_factor ** 2
        return per_crop, "per image crop (image splitting adds crops for larger images)"
    grid = (v.image_size // v.patch_size) ** 2
    if getattr(cfg, "vision_feature_select_strategy", "default") == "full":
        grid += 1
    return grid, "per view at the tower's native size (AnyRes adds tiles)"


def image_tokens_estimate(hf_config, processor, overrides: dict | None = None) -> tuple[int, str]:
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
    except (AttributeError, KeyError, TypeError, NotImplementedError):
        return None
