"""Shared helpers for native-family tests: tiny checkpoints written by `save_pretrained`, records with 0/1/2 images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "idefics3", "smolvlm", "llava_onevision", "llava_next",
            "llava")
# tested in tests/test_native_hybrid_moe.py (one shared checkpoint each) rather than in every FAMILIES test
NEW_FAMILIES = ("qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")


def checkpoint(root: Path, family: str) -> Path:
    """A tiny checkpoint folder of `family` under `root` (written once per session root)."""
    from vlmtrain.model.native.tiny import write_tiny_checkpoint

    out = root / family
    if not (out / "config.json").is_file():
        write_tiny_checkpoint(family, out)
    return out


def model_config(path: Path, **extra):
    from vlmtrain.config.model import NativeModelConfig

    return NativeModelConfig(pretrained=str(path), **extra)


def image(w: int, h: int, seed: int = 0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def user(*parts) -> dict:
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


IMG = {"type": "image"}


def records() -> list[tuple[dict, list]]:
    """(record, images): one image; text only, two turns; two images of different sizes."""
    return [
        ({"id": "one", "kind": "chat", "messages": [user(IMG, "what digit is this"), assistant("seven")]},
         [image(40, 30, 1)]),
        ({"id": "text", "kind": "chat", "messages": [user("hello there"), assistant("one two"), user("and then"),
                                                     assistant("three")]}, []),
        ({"id": "two", "kind": "chat", "messages": [user(IMG, IMG, "compare them"), assistant("the same")]},
         [image(64, 64, 2), image(30, 50, 3)]),
    ]


def encoded_batch(bundle):
    """The shared `records()` through the family's encoder and `collate`: (samples, (input_ids, pixel_values,
    attention_mask), the batch's model extras) — the arguments of a forward as training passes them."""
    from vlmtrain.data.batching import collate
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.train.module import model_extras

    enc = encoder_for(bundle)
    samples = [enc(r, ims) for r, ims in records()]  # one image; text only (two turns); two images
    b = collate(samples, bundle.tokenizer.pad_token_id)
    return samples, (b["input_ids"], b["pixel_values"], b["attention_mask"]), model_extras(b)


def adapter_step(m, args, extras) -> list[str]:
    """One sign-SGD step of the adapters only (so they are not the identity), then eval mode. → names with a grad."""
    import torch

    m.requires_grad_(False)
    for n, p in m.named_parameters():
        p.requires_grad_("lora_" in n)
    m(*args, **extras).logits.float().pow(2).mean().backward()
    trained = [n for n, p in m.named_parameters() if p.grad is not None]
    with torch.no_grad():
        for p in m.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad.sign()
    m.eval()
    return trained


def assert_merge_keeps_logits(m, args, extras, dequantize: bool = False) -> None:
    """The trained adapters merged (over the dequantised NF4 base when `dequantize`) give the same logits."""
    import torch

    from vlmtrain.model.lora import merge_lora_
    from vlmtrain.model.quantize import dequantize_

    with torch.no_grad():
        before = m(*args, **extras).logits
        if dequantize:
            dequantize_(m)
        merge_lora_(m)
        after = m(*args, **extras).logits
    assert not any(hasattr(mod, "lora_A") for mod in m.hf.modules())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
