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
        # Frozen-tower feature cache (`trainer.vision_feature_cache_mb`): image key → vision output `[t, d_v]`.
        self.vision_cache: FeatureCache | None = None

    @property
    def num_image_tokens(self) -> int:
        """Image-token slots per image."""
        return self.connector.num_tokens

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[n_img, c, h, w]` → `[n_img, t, d_lm]`."""
        return self.connector(self.vision(pixel_values))

    def vision_features(self, pixel_values: torch.Tensor, image_keys: list | None = None) -> torch.Tensor:
        """`[n_img, c, h, w]` → vision output `[n_img, t, d_v]`, from the feature cache when every image of the batch
        is in it. A batch with any miss runs the tower on the whole batch (as without a cache) and stores it."""
        cache = self.vision_cache
        if cache is None or image_keys is None or len(image_keys) != pixel_values.shape[0]:
            return self.vision(pixel_values)
        hit = cache.get_all(image_keys)
        if hit is not None:
            return hit.to(device=pixel_values.device)
        with torch.no_grad():
            feats = self.vision(pixel_values)
        cache.put_all(image_keys, feats)
        return feats

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_keys: list | None = None, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings `[b, s, d_lm]` with image features written into the image-token slots. `image_embeds`
        (`encode_images`' output `[n_img, t, d_lm]`, in slot order) replaces `pixel_values`: images encoded once and
        scored in several sequences (one record's multiple-choice answers)."""
        slots = input_ids == self.image_token_id
        embeds = self.llm.get_input_embeddings()(input_ids)
        n_slots = int(slots.sum())
        source = image_embeds if image_embeds is not None else pixel_values
        n_img = 0 if source is None else source.shape[0]
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
        if image_embeds is None:
            image_embeds = self.connector(self.vision_features(pixel_values, image_keys))
        feats = image_embeds.to(embeds.dtype)  # [n_img, t, d]
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
                logits_mask: torch.Tensor | None = None, image_keys: list | None = None,
                image_embeds: torch.Tensor | None = None, **lm_kwargs):
        """Returns the LM's output (`.logits [b, s, vocab]`). Loss lives in `vlmtrain.train` (it needs the
        whole accumulated batch's supervised-token count, which one forward cannot know).

        Packed rows: pass `position_ids` restarting at 0 for each sample and `attention_mask=None`."""
        embeds = self.embed(input_ids, pixel_values, image_keys, image_embeds)
        # No KV cache for training/scoring forwards; transformers also only derives the packed-sequence
        # (block-diagonal) mask from restarting position_ids when there is no cache.
        lm_kwargs.setdefault("use_cache", False)
        if logits_mask is not None:
            # Logits only where a loss needs them: `logits_mask [b, s]` → `[n, vocab]`. The LM head over every
            # position is wasted work, and its fp32 logits are often the largest activation of a step.
            # `logits_mask` is a bool `[b, s]` mask, or `[n, 2]` (row, position) pairs when a position must be
            # scored more than once (DPO's shared-prompt rows).
            select = (lambda h: h[logits_mask]) if logits_mask.dtype == torch.bool else (
                lambda h: h[logits_mask[:, 0], logits_mask[:, 1]])
            if not self.supports_selective_head:
                return select(self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                       **lm_kwargs).logits)
            hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                            position_ids=position_ids, **lm_kwargs).last_hidden_state
            return self.llm.get_output_embeddings()(select(hidden))
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, **lm_kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 image_embeds: torch.Tensor | None = None, **gen_kwargs) -> torch.Tensor:
        """Greedy by default. Returns only the new tokens `[b, n_new]` (left-pad prompts for batched use)."""
        embeds = self.embed(input_ids, pixel_values, image_embeds=image_embeds)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        gen_kwargs.setdefault("do_sample", False)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                 max_new_tokens=max_new_tokens, **gen_kwargs)

    @torch.no_grad()
    def generate_repeated(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, repeats: int,
                          image_embeds: torch.Tensor | None = None, max_new_tokens: int = 32,
                          **gen_kwargs) -> torch.Tensor:
        """`repeats` continuations of each prompt of a left-padded batch `[r, s]` (`image_embeds`: its prompts'
        image features, each once), the prompt run once: the KV cache of all but its last position is computed on
        the r rows and repeated for the r × `repeats` rows (prompt i's at i·repeats …) that transformers' `generate`
        then continues from it (it runs the last position itself, so the first token's logits come from its own
        forward). Returns only the new tokens `[r·repeats, n_new]`. The prefill, most of a short completion's cost
        when prompts carry hundreds of image tokens, runs r rows instead of r × repeats."""
        embeds = self.embed(input_ids, None, image_embeds=image_embeds)  # [r, s, d]
        positions = attention_mask.long().cumsum(-1) - 1  # as `generate` derives them from a left-padded mask
        positions = positions.masked_fill(attention_mask == 0, 1)
        cache = self.llm(inputs_embeds=embeds[:, :-1], attention_mask=attention_mask[:, :-1],
                         position_ids=positions[:, :-1], use_cache=True).past_key_values
        cache.batch_repeat_interleave(repeats)
        return self.llm.generate(inputs_embeds=embeds.repeat_interleave(repeats, 0),
                                 attention_mask=attention_mask.repeat_interleave(repeats, 0), past_key_values=cache,
                                 max_new_tokens=max_new_tokens, **gen_kwargs)


class FeatureCache:
    """Vision-tower outputs of a frozen tower, by image key (shard URL + sample key + image index), kept on the CPU
    under a byte budget; once full, new keys are not stored. Why by hand: the keys come from the data loader and
    the values from inside the model's forward, which no caching library bridges.

    Numerics: an image's cached features were computed within an earlier batch; recomputing them within another
    batch can differ in the last float bits (kernel blocking), so runs with and without the cache agree to ~1e-6,
    not bit for bit — and a resumed run (empty cache) is exact to that tolerance only."""

    def __init__(self, budget_mb: int):
        self.budget = budget_mb * 2**20
        self.used = 0
        self.store: dict = {}
        self.hits = self.misses = 0

    def get_all(self, keys: list) -> torch.Tensor | None:
        try:
            out = torch.stack([self.store[k] for k in keys])
        except KeyError:
            self.misses += 1
            return None
        self.hits += 1
        return out

    def put_all(self, keys: list, feats: torch.Tensor) -> None:
        for k, f in zip(keys, feats.detach()):
            if k in self.store:
                continue
            size = f.numel() * f.element_size()
            if self.used + size > self.budget:
                return
            self.store[k] = f.to("cpu", copy=True)
            self.used += size
