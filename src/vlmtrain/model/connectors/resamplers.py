"""Learned-query connectors with a fixed token count, independent of the patch count.

- `perceiver_resampler` (Flamingo): latents attend to [features; latents], several layers with feed-forward.
- `qformer` (BLIP-2): learned queries through transformers' own `Blip2QFormerModel` (self-attention among queries,
  cross-attention to the image features).
- `cross_attn_resampler` (Qwen-VL): one cross-attention layer from learned queries to features, with fixed 2-D
  sin-cos position embeddings on both sides.

All map `[b, n, d_v]` → `[b, num_queries, d_lm]`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmtrain.model.connectors.base import Connector, register_connector


class _PerceiverLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ff_mult: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_size {dim} not divisible by num_heads {heads}")
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.ff = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(), nn.Linear(dim * ff_mult, dim, bias=False)
        )

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        b, l, d = latents.shape
        media, lat = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(lat)
        k, v = self.to_kv(torch.cat([media, lat], dim=1)).chunk(2, dim=-1)
        split = lambda t: t.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        attn = F.scaled_dot_product_attention(split(q), split(k), split(v))
        latents = latents + self.to_out(attn.transpose(1, 2).reshape(b, l, d))
        return latents + self.ff(latents)


@register_connector("perceiver_resampler")
class PerceiverResampler(Connector):
    def __init__(self, vision_dim, llm_dim, num_features, grid, num_latents: int = 64, depth: int = 2,
                 num_heads: int = 8, hidden_size: int | None = None, ff_mult: int = 4):
        super().__init__(vision_dim, llm_dim, num_features, grid)
        dim = hidden_size or vision_dim
        self.num_latents = num_latents
        self.in_proj = nn.Linear(vision_dim, dim) if dim != vision_dim else nn.Identity()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.layers = nn.ModuleList(_PerceiverLayer(dim, num_heads, ff_mult) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, llm_dim)

    @property
    def num_tokens(self) -> int:
        return self.num_latents

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        media = self.in_proj(x)
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.out_proj(self.norm(latents))


@register_connector("qformer")
class QFormerConnector(Connector):
    def __init__(self, vision_dim, llm_dim, num_features, grid, num_queries: int = 32, depth: int = 2,
                 num_heads: int = 8, hidden_size: int | None = None, intermediate_size: int | None = None,
                 cross_attention_frequency: int = 1):
        super().__init__(vision_dim, llm_dim, num_features, grid)
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        dim = hidden_size or vision_dim
        self.num_queries = num_queries
        qcfg = Blip2QFormerConfig(
            hidden_size=dim, num_hidden_layers=depth, num_attention_heads=num_heads,
            intermediate_size=intermediate_size or 4 * dim, encoder_hidden_size=vision_dim,
            cross_attention_frequency=cross_attention_frequency,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # connectors train without dropout (LLaVA)
        )
        self.vision_norm = nn.LayerNorm(vision_dim)  # BLIP-2's ln_vision
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, dim) * qcfg.initializer_range)
        self.qformer = Blip2QFormerModel(qcfg)
        self.out_proj = nn.Linear(dim, llm_dim)

    @property
    def num_tokens(self) -> int:
        return self.num_queries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query_tokens.expand(x.shape[0], -1, -1)
        out = self.qformer(query_embeds=q, encoder_hidden_states=self.vision_norm(x)).last_hidden_state
        return self.out_proj(out)


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding `[side*side, dim]` (MAE / Qwen-VL recipe).

    Hand-written: a dozen lines, and no kept library exposes it outside a model class.
    """
    if dim % 4:
        raise ValueError(f"hidden_size {dim} must be divisible by 4 for 2-D sin-cos embeddings")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    ys, xs = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64), indexing="ij")
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        out = np.einsum("m,d->md", pos, omega)
        parts += [np.sin(out), np.cos(out)]
    return torch.from_numpy(np.concatenate(parts, axis=1)).float()


@register_connector("cross_attn_resampler")
class CrossAttnResampler(Connector):
    def __init__(self, vision_dim, llm_dim, num_features, grid, num_queries: int = 64, num_heads: int = 8,
                 hidden_size: int | None = None):
        super().__init__(vision_dim, llm_dim, num_features, grid)
        dim = hidden_size or vision_dim
        q_side = math.isqrt(num_queries)
        if q_side * q_side != num_queries:
            raise ValueError(f"num_queries {num_queries} must be a perfect square (queries sit on a 2-D grid)")
        kv_side = grid if grid is not None else math.isqrt(num_features)
        self.num_queries = num_queries
        self.query = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.register_buffer("pos_q", sincos_2d(dim, q_side), persistent=False)
        # With a CLS token kept there is no grid: the CLS slot gets a zero position.
        pos_kv = sincos_2d(dim, kv_side)
        if pos_kv.shape[0] < num_features:
            pos_kv = torch.cat([torch.zeros(num_features - pos_kv.shape[0], dim), pos_kv])
        self.register_buffer("pos_kv", pos_kv, persistent=False)
        self.kv_proj = nn.Linear(vision_dim, dim, bias=False) if dim != vision_dim else nn.Identity()
        self.ln_q = nn.LayerNorm(dim)
        self.ln_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.ln_post = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, llm_dim)

    @property
    def num_tokens(self) -> int:
        return self.num_queries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(self.kv_proj(x))
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        out, _ = self.attn(q + self.pos_q.to(q.dtype), kv + self.pos_kv.to(kv.dtype), kv, need_weights=False)
        return self.out_proj(self.ln_post(out))
