"""Vision tower: any transformers vision model, returning the features of one hidden layer.

Shapes: pixel_values `[n, c, h, w]` → features `[n, p, d_v]`, where `p` is the patch count (+1 with `select: all`
on models that have a CLS token).
"""

from __future__ import annotations

import torch
from torch import nn

# Tokens before the patch grid in each known family's hidden states (CLIP: one CLS; SigLIP: none).
PREFIX_TOKENS = {
    "clip_vision_model": 1,
    "siglip_vision_model": 0,
    "siglip2_vision_model": 0,
    "dinov2": 1,
    "vit": 1,
}


def count_prefix_tokens(model: nn.Module, image_size: int, num_patches: int) -> int:
    """Infer prefix tokens for an unknown family with one forward on the meta device (no compute, no memory)."""
    mt = model.config.model_type
    if mt in PREFIX_TOKENS:
        return PREFIX_TOKENS[mt]
    channels = getattr(model.config, "num_channels", 3)
    with torch.device("meta"):
        probe = model.__class__(model.config)
        out = probe(torch.empty(1, channels, image_size, image_size), output_hidden_states=True)
    return out.hidden_states[-1].shape[1] - num_patches


class VisionTower(nn.Module):
    def __init__(self, model: nn.Module, feature_layer: int = -2, select: str = "drop_cls", prefix_tokens: int = 0):
        super().__init__()
        cfg = model.config
        self.model = model
        self.feature_layer = feature_layer
        self.select = select
        self.image_size = int(cfg.image_size)
        self.patch_size = int(cfg.patch_size)
        self.grid = self.image_size // self.patch_size
        self.prefix_tokens = prefix_tokens
        self.hidden_size = int(cfg.hidden_size)
        n_layers = int(cfg.num_hidden_layers)
        if not -n_layers - 1 <= feature_layer <= n_layers:
            raise ValueError(f"feature_layer {feature_layer} out of range for {n_layers} layers")

    @property
    def num_features(self) -> int:
        """Feature tokens per image after selection."""
        keep_prefix = self.prefix_tokens if self.select == "all" else 0
        return self.grid * self.grid + keep_prefix

    @property
    def has_grid(self) -> bool:
        """True when the features form a square patch grid (pixel-shuffle and conv connectors need it)."""
        return self.select == "drop_cls" or self.prefix_tokens == 0

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[n, c, h, w]` → `[n, p, d_v]`."""
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values.to(dtype), output_hidden_states=True)
        feats = out.hidden_states[self.feature_layer]
        if self.select == "drop_cls" and self.prefix_tokens:
            feats = feats[:, self.prefix_tokens :]
        return feats
