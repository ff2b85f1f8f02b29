"""The composed VLM: vision tower → connector → causal LM, with image embeddings scattered into image-token slots.

Batch contract:
- `input_ids [b, s]` already contain `num_image_tokens` copies of the image token per image (the collator expands
  one `<image>` into that many slots);
- `pixel_values [n_img, c, h, w]` hold every image of the batch in slot order (row-major over samples); samples may
  have 0, 1 or several images, and a batch may have none (`pixel_values=None`).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmtrain.model.connectors import Connector
from vlmtrain.model.vision import VisionTower


class VLM(nn.Module):
    def __init__(self, vision: VisionTower, connector: Connector, llm: nn.Module, image_token_id: int):
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.image_token_id = int(image_token_id)
        # Under data parallelism every rank must use the same parameters every step (DDP's reducer, FSDP's and
        # ZeRO-3's gathers): a batch without images then runs one zero-weighted dummy image through the tower.
        self.always_encode_images = False

    @property
    def num_image_tokens(self) -> int:
        """Image-token slots per image."""
        return self.connector.num_tokens

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[n_img, c, h, w]` → `[n_img, t, d_lm]`."""
        return self.connector(self.vision(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings `[b, s, d_lm]` with image features written into the image-token slots."""
        slots = input_ids == self.image_token_id
        embeds = self.llm.get_input_embeddings()(input_ids)
        n_slots = int(slots.sum())
        n_img = 0 if pixel_values is None else pixel_values.shape[0]
        if n_slots != n_img * self.num_image_tokens:
            raise ValueError(
                f"batch has {n_slots} image-token slots but {n_img} image(s) × {self.num_image_tokens} tokens "
                f"= {n_img * self.num_image_tokens}: expand each image token to num_image_tokens slots"
            )
        if n_img == 0:
            if self.always_encode_images and torch.is_grad_enabled():
                p = next(self.vision.parameters())
                dummy = torch.zeros(1, 3, self.vision.image_size, self.vision.image_size, dtype=p.dtype,
                                    device=embeds.device)
                embeds = embeds + 0.0 * self.encode_images(dummy).sum().to(embeds.dtype)
            return embeds
        feats = self.encode_images(pixel_values).to(embeds.dtype)  # [n_img, t, d]
        return embeds.masked_scatter(slots.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))

    # Families whose causal-LM head is exactly `lm_head(final hidden state)` (no soft-capping or logit scaling), so
    # the head can be applied to selected positions only.
    PLAIN_HEAD_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "smollm3")

    @property
    def supports_selective_head(self) -> bool:
        cfg = self.llm.config
        return cfg.model_type in self.PLAIN_HEAD_FAMILIES and getattr(cfg, "final_logit_softcapping", None) is None

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                logits_mask: torch.Tensor | None = None, **lm_kwargs):
        """Returns the LM's output (`.logits [b, s, vocab]`). Loss lives in `vlmtrain.train` (it needs the
        whole accumulated batch's supervised-token count, which one forward cannot know).

        Packed rows: pass `position_ids` restarting at 0 for each sample and `attention_mask=None`."""
        embeds = self.embed(input_ids, pixel_values)
        # No KV cache for training/scoring forwards; transformers also only derives the packed-sequence
        # (block-diagonal) mask from restarting position_ids when there is no cache.
        lm_kwargs.setdefault("use_cache", False)
        if logits_mask is not None:
            # Logits only where a loss needs them: `logits_mask [b, s]` → `[n, vocab]`. The LM head over every
            # position is wasted work, and its fp32 logits are often the largest activation of a step.
            if not self.supports_selective_head:
                return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                **lm_kwargs).logits[logits_mask]
            hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                            position_ids=position_ids, **lm_kwargs).last_hidden_state
            return self.llm.get_output_embeddings()(hidden[logits_mask])
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, **lm_kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32, **gen_kwargs) -> torch.Tensor:
        """Greedy by default. Returns only the new tokens `[b, n_new]` (left-pad prompts for batched use)."""
        embeds = self.embed(input_ids, pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        gen_kwargs.setdefault("do_sample", False)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                 max_new_tokens=max_new_tokens, **gen_kwargs)
