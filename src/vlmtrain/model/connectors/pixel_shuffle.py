"""`pixel_shuffle` (Idefics3 / SmolVLM): fold each s×s block of patches into one token, then a linear projection.

Cuts image tokens by s²; features `[b, g*g, d_v]` → `[b, (g/s)², d_lm]`.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmtrain.model.connectors.base import Connector, register_connector


@register_connector("pixel_shuffle")
class PixelShuffleConnector(Connector):
    needs_grid = True

    def __init__(self, vision_dim, llm_dim, num_features, grid, scale_factor: int = 2):
        super().__init__(vision_dim, llm_dim, num_features, grid)
        if scale_factor < 1 or grid % scale_factor:
            raise ValueError(f"scale_factor {scale_factor} must divide the patch grid side {grid}")
        self.scale_factor = scale_factor
        # Idefics3's modality projection has no bias.
        self.proj = nn.Linear(vision_dim * scale_factor**2, llm_dim, bias=False)

    @property
    def num_tokens(self) -> int:
        return (self.grid // self.scale_factor) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        s, g = self.scale_factor, self.grid
        # [b, g, g, d] → [b, g/s, s, g/s, s, d] → [b, g/s, g/s, s, s, d]: each output token holds one s×s block.
        x = x.reshape(b, g // s, s, g // s, s, d).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (g // s) ** 2, s * s * d)
        return self.proj(x)
