"""Resolve and instantiate the HF parts of a VLM (vision tower, causal LM) from a config dict or a pretrained path.

Nothing here downloads unless the user pointed `pretrained` at a hub id and is online; tiny configs and `meta`
builds never touch the network.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from vlmtrain.errors import ConfigError, VlmtrainError

# Friendly names → transformers model_type of the *vision-only* config class.
VISION_ALIASES = {
    "clip": "clip_vision_model",
    "siglip": "siglip_vision_model",
    "siglip2": "siglip2_vision_model",
}


def _config_class(model_type: str, field: str):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{field}.model_type: unknown transformers model_type {model_type!r}{hint}")
    del AutoConfig
    return CONFIG_MAPPING[model_type]


def make_hf_config(part_cfg, field: str, vision: bool):
    """Build the transformers config object for a part.

    Inline `config` wins (it fixes the architecture offline); otherwise read `pretrained`'s config.json (local
    folder or HF cache). Unknown inline keys are errors: HF config classes would silently accept a typo.
    """
    if part_cfg.config is not None:
        raw: dict[str, Any] = dict(part_cfg.config)
        mt = raw.pop("model_type")
        if vision:
            mt = VISION_ALIASES.get(mt, mt)
        cls = _config_class(mt, f"{field}.config")
        known = set(cls().to_dict().keys())
        bad = [k for k in raw if k not in known]
        if bad:
            problems = []
            for k in bad:
                close = difflib.get_close_matches(k, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(f"{field}.config.{k}: unknown field for {mt}{hint}")
            raise ConfigError(problems)
        return cls(**raw)
    from transformers import AutoConfig

    try:
        # trust_remote_code=False: transformers raises for remote code instead of asking "run the custom code? [y/N]"
        cfg = AutoConfig.from_pretrained(part_cfg.pretrained, trust_remote_code=False)
    except (OSError, ValueError) as e:
        if "custom code" in str(e):
            raise ConfigError(f"{field}.pretrained: {part_cfg.pretrained} is a remote-code checkpoint; vlmtrain "
                              "builds transformers' own classes only") from None
        raise VlmtrainError(
            f"{field}.pretrained: cannot read config of {part_cfg.pretrained!r} offline "
            f"({str(e).splitlines()[0]}); give an inline `config` or a local folder"
        ) from None
    if vision and hasattr(cfg, "vision_config"):  # a full CLIP/SigLIP checkpoint: take its vision half
        cfg = cfg.vision_config
    return cfg


def has_local_weights(pretrained: str | None) -> bool:
    """True when `pretrained` is a local folder or already in the HF cache (no network needed)."""
    if pretrained is None:
        return False
    if Path(pretrained).is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json"):
            hit = try_to_load_from_cache(pretrained, name)
            if isinstance(hit, str):
                return True
    except Exception:  # a malformed id is simply "not local"
        return False
    return False


def instantiate(hf_config, pretrained: str | None, load_weights: bool, causal_lm: bool, field: str):
    """Random-init from the config, or load real weights from `pretrained` when asked."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if causal_lm else AutoModel
    if load_weights and pretrained is not None:
        try:
            return auto.from_pretrained(pretrained, config=hf_config)
        except OSError as e:
            raise VlmtrainError(
                f"{field}.pretrained: weights of {pretrained!r} not found ({str(e).splitlines()[0]}); "
                "download them first or build with random weights (--random-weights)"
            ) from None
    try:
        return auto.from_config(hf_config)
    except ValueError as e:
        kind = "causal LM" if causal_lm else "vision model"
        raise ConfigError(f"{field}: {hf_config.model_type!r} is not a {kind} transformers can build ({e})") from None
