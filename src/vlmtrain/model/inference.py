"""Single-prompt inference: chat-template the prompt, expand image slots, greedy-decode the reply."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmtrain.data.encode import encoder_for
from vlmtrain.errors import VlmtrainError


def load_image(path: str | Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise VlmtrainError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise VlmtrainError(f"{path}: cannot decode image ({e})") from None


def prompt_messages(prompt: str, n_images: int) -> list[dict]:
    """One user turn: the images first, then the text (LLaVA's layout)."""
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}]


def expand_image_tokens(ids: list[int], image_token_id: int, n: int) -> list[int]:
    """Replace each image token by `n` slots (what LlavaProcessor does to the text)."""
    out: list[int] = []
    for t in ids:
        out.extend([t] * n if t == image_token_id else [t])
    return out


def prepare_inputs(bundle, prompt: str, images: list) -> dict[str, torch.Tensor]:
    tok, m = bundle.tokenizer, bundle.model
    text = tok.apply_chat_template(prompt_messages(prompt, len(images)), tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = expand_image_tokens(ids, m.image_token_id, m.num_image_tokens)
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if images:
        batch["pixel_values"] = bundle.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return batch


def generate_text(bundle, prompt: str, images: list, max_new_tokens: int = 32) -> str:
    bundle.model.eval()
    if bundle.native:  # the family's processor builds the prompt (its image tokens, its tensors)
        inputs = encoder_for(bundle).prompt_inputs(prompt_messages(prompt, len(images)), images)
        ids = inputs.pop("input_ids")
        new = bundle.model.generate(ids, inputs.pop("attention_mask", None), max_new_tokens=max_new_tokens, **inputs)
        return bundle.tokenizer.decode(new[0], skip_special_tokens=True)
    inputs = prepare_inputs(bundle, prompt, images)
    new = bundle.model.generate(**inputs, max_new_tokens=max_new_tokens)
    return bundle.tokenizer.decode(new[0], skip_special_tokens=True)
