"""Canonical record (+ decoded images) → model inputs: token ids, role-span labels, pixel values.

Lives in the data room and knows of the model only what the design allows: the tokenizer, the image processor,
the image-token id and the number of slots per image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from vlmtrain.data.anyres import AnyResTiler
from vlmtrain.data.chat import IGNORE, Encoded, MaskError, encode_messages
from vlmtrain.data.native_encode import NativeSampleEncoder, PrefixSuffixEncoder
from vlmtrain.data.schema import IMAGE_PART, RecordError, record_messages


def decode_image(data: bytes, where: str):
    """Bytes → RGB PIL image; RecordError('undecodable_image') on truncated/corrupt data."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # force a full decode: a truncated JPEG fails here, not later in the processor
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise RecordError("undecodable_image", f"{where}: {type(e).__name__}") from None


@dataclass
class SampleEncoder:
    """Picklable (ships to DataLoader workers). `max_len` counts tokens including image slots."""

    tokenizer: Any
    image_processor: Any
    image_token_id: int
    num_image_tokens: int
    max_len: int = 2048
    caption_prompt: str = ""
    tiler: Any = None  # e.g. AnyResTiler: one image → several views, each its own image slot

    def _tile(self, messages: list[dict], images: list) -> tuple[list[dict], list]:
        """Expand each image part into one part per view, in order."""
        views = [self.tiler(im) for im in images]
        it = iter(views)
        out = []
        for m in messages:
            parts = []
            for p in m["content"]:
                parts.extend([IMAGE_PART] * len(next(it)) if p == IMAGE_PART else [p])
            out.append({**m, "content": parts})
        return out, [v for vs in views for v in vs]

    def encode_text(self, messages: list[dict]) -> Encoded:
        try:
            enc = encode_messages(self.tokenizer, messages, self.image_token_id, self.num_image_tokens)
        except MaskError as e:
            raise RecordError("mask_unbuildable", str(e)) from None
        if len(enc.input_ids) > self.max_len:
            raise RecordError("over_length", f"{len(enc.input_ids)} tokens > max_len {self.max_len}")
        return enc

    def pixels(self, images: list):
        if not images:
            return None
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def __call__(self, record: dict, images: list) -> dict:
        """Chat/caption → {"input_ids", "labels", "pixel_values", "id"};
        preference → {"chosen": {...}, "rejected": {...}, "pixel_values", "id"} (images shared by both sides)."""
        msgs = record_messages(record, self.caption_prompt)
        if self.tiler is not None and images:
            if isinstance(msgs, tuple):  # preference: images live in the (shared) prompt
                n_prompt = len(record["prompt"])
                chosen, tiled = self._tile(msgs[0], images)
                rejected = chosen[:n_prompt] + msgs[1][n_prompt:]
                msgs, images = (chosen, rejected), tiled
            else:
                msgs, images = self._tile(msgs, images)
        pix = self.pixels(images)
        if isinstance(msgs, tuple):
            sides = {}
            for name, m in zip(("chosen", "rejected"), msgs):
                e = self.encode_text(m)
                sides[name] = {"input_ids": e.input_ids, "labels": e.labels}
            return {"id": record["id"], "pixel_values": pix, **sides}
        e = self.encode_text(msgs)
        return {"id": record["id"], "input_ids": e.input_ids, "labels": e.labels, "pixel_values": pix}


def record_token_length(tokenizer, record: dict, image_token_id: int, num_image_tokens: int) -> int:
    """Tokens (image slots included) of a record's training sequence; for preferences, the longer side."""
    msgs = record_messages(record)
    convs = msgs if isinstance(msgs, tuple) else (msgs,)
    return max(len(encode_messages(tokenizer, m, image_token_id, num_image_tokens).input_ids) for m in convs)


def encoder_for(bundle, max_len: int = 4096, caption_prompt: str = "",
                anyres_pinpoints: list | None = None) -> SampleEncoder:
    """The encoder training, eval, generation and the federated site feed `bundle` with: the family processor's for
    the native kind, `SampleEncoder` (with an AnyRes tiler when `anyres_pinpoints`) for a composed VLM."""
    m = bundle.model
    if bundle.native:  # the family's processor expands images and makes the family tensors
        cls = PrefixSuffixEncoder if m.family.prefix_suffix else NativeSampleEncoder  # PaliGemma: no chat template
        return cls(bundle.processor, bundle.template, m.image_token_id, max_len=max_len,
                   caption_prompt=caption_prompt, nested_images=m.family.nested_images,
                   template_kwargs=dict(m.family.template_kwargs),
                   batch_aligned_images=m.family.batch_aligned_images,
                   shared_prefix_rows=getattr(m, "dpo_shared_prefix", False),
                   stop_ids=generation_stop_ids(bundle))
    tiler = AnyResTiler(anyres_pinpoints, m.vision.image_size) if anyres_pinpoints else None
    return SampleEncoder(bundle.tokenizer, bundle.image_processor, m.image_token_id, m.num_image_tokens,
                         max_len=max_len, caption_prompt=caption_prompt, tiler=tiler)


def generation_stop_ids(bundle) -> tuple[int, ...]:
    """The tokens a native checkpoint's generation stops at: its `generation_config.eos_token_id` (an id or a list)
    and the tokenizer's EOS."""
    eos = getattr(getattr(bundle.model.hf, "generation_config", None), "eos_token_id", None)
    ids = [*(eos if isinstance(eos, (list, tuple)) else [eos]), bundle.tokenizer.eos_token_id]
    return tuple(sorted({int(t) for t in ids if t is not None}))


__all__ = ["IGNORE", "SampleEncoder", "decode_image", "encoder_for", "generation_stop_ids", "record_token_length"]
