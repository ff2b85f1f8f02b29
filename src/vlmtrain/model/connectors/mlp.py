"""LLaVA-family projectors: `linear` (LLaVA-1.0) and `mlp2x_gelu` (LLaVA-1.5). Token count is unchanged."""

from __future__ import annotations

import torch
from torch import nn

from vlmtrain.model.connectors.base import Connector, register_connector


@register_connector("linear")
class LinearConnector(Connector):
    def __init__(self, vision_dim, llm_dim, num_features, grid):
        super().__init__(vision_dim, llm_dim, num_features, grid)
        self.proj = nn.Linear(vision_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[b, n, d_v]` → `[b, n, d_lm]`."""
        return self.proj(x)


@register_connector("mlp2x_gelu")
class MLP2xGeluConnector(Connector):
    # Attribute names match transformers' LlavaMultiModalProjector so export is a plain copy.
    def __init__(self, vision_dim, llm_dim, num_features, grid):
        super().__init__(vision_dim, llm_dim, num_features, grid)
        self.linear_1 = nn.Linear(vision_dim, llm_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[b, n, d_v]` → `[b, n, d_lm]`."""
        return self.linear_2(self.act(self.linear_1(x)))
