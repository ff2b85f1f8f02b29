"""`ldp`: MobileVLM's Lightweight Downsample Projector.

An MLP to the LM width, then two depthwise-separable conv blocks on the patch grid (the second with stride 2),
so `[b, g*g, d_v]` → `[b, ceil(g/2)², d_lm]`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlmtrain.model.connectors.base import Connector, register_connector


class _LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of a `[b, c, h, w]` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _DepthwiseSeparable(nn.Module):
    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.residual = stride == 1
        self.dw = nn.Conv2d(dim, dim, 3, stride=stride, padding=1, groups=dim, bias=False)
        self.norm1 = _LayerNorm2d(dim)
        self.act = nn.Hardswish()
        self.pw = nn.Conv2d(dim, dim, 1, bias=False)
        self.norm2 = _LayerNorm2d(dim)

    def forward(self, x):
        y = self.norm2(self.pw(self.act(self.norm1(self.dw(x)))))
        return x + y if self.residual else y


@register_connector("ldp")
class LDPConnector(Connector):
    needs_grid = True

    def __init__(self, vision_dim, llm_dim, num_features, grid):
        super().__init__(vision_dim, llm_dim, num_features, grid)
        self.mlp = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
        self.block1 = _DepthwiseSeparable(llm_dim, stride=1)
        self.block2 = _DepthwiseSeparable(llm_dim, stride=2)

    @property
    def num_tokens(self) -> int:
        return math.ceil(self.grid / 2) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = self.mlp(x)  # [b, n, d]
        x = x.transpose(1, 2).reshape(b, -1, self.grid, self.grid)  # [b, d, g, g]
        x = self.block2(self.block1(x))  # [b, d, g', g']
        return x.flatten(2).transpose(1, 2)  # [b, g'², d]
