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


# Templates a user writes for a family vlmtrain vendors no official template for (none could be verified offline),
# each in its family's turn layout, with the assistant text and end-of-turn marked. Not official copies. Without
# the marks (`unmarked`) each plays the checkpoint's own chat_template.jinja of a download.
USER_TEMPLATES = {
    # Gemma 4's turns: `<|turn>role` … `<turn|>`, images as `\n\n<|image|>\n\n`
    "gemma4": (
        "{{ bos_token }}{% for message in messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}{{ '<|turn>' + role + '\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{% for c in message['content'] %}{{ c['text'] }}"
        "{% endfor %}{{ '<turn|>' }}{% endgeneration %}{% else %}{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}{{ '\n\n<|image|>\n\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
        "{{ '<turn|>' }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|turn>model\n' }}{% endif %}"),
    # GLM-4.1V: `[gMASK]<sop>`, `<|role|>\n`, images in <|begin_of_image|>…<|end_of_image|>, no end-of-turn token
    "glm4v": (
        "[gMASK]<sop>{% for message in messages %}{{ '<|' + message['role'] + '|>\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{% for c in message['content'] %}{{ c['text'] }}"
        "{% endfor %}{% endgeneration %}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
        "{{ '<|begin_of_image|><|image|><|end_of_image|>' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
    # ChatML, as InternVL's Qwen-based checkpoints
    "internvl": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{% for c in message['content'] %}{{ c['text'] }}"
        "{% endfor %}{{ '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    # LFM2's ChatML
    "lfm2_vl": (
        "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{% for c in message['content'] %}{{ c['text'] }}"
        "{% endfor %}{{ '<|im_end|>' }}{% endgeneration %}{% else %}{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}{{ '<image>' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>' }}"
        "{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    # Llama 4's headers: `<|header_start|>role<|header_end|>\n\n` … `<|eot|>`
    "llama4": (
        "{{ bos_token }}{% for message in messages %}{{ '<|header_start|>' + message['role'] + '<|header_end|>\n\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{% for c in message['content'] %}{{ c['text'] }}"
        "{% endfor %}{{ '<|eot|>' }}{% endgeneration %}{% else %}{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}{{ '<|image|>' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{{ '<|eot|>' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|header_start|>assistant<|header_end|>\n\n' }}"
        "{% endif %}"),
    # Mistral's [INST] … [/INST] answer</s>
    "mistral3": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST]' }}"
        "{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}{{ '[IMG]' }}{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{{ '[/INST]' }}{% else %}{% generation %}{% for c in message['content'] %}{{ c['text'] }}"
        "{% endfor %}{{ eos_token }}{% endgeneration %}{% endif %}{% endfor %}"),
}
USER_TEMPLATES["glm4v_moe"] = USER_TEMPLATES["glm4v"]


def unmarked(template: str) -> str:
    """`template` without its `{% generation %}` / `{% endgeneration %}` tags: the same rendered text."""
    return template.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def checkpoint_with_own_template(root: Path, family: str) -> Path:
    """The tiny checkpoint of `family` carrying `unmarked(USER_TEMPLATES[family])` as its chat_template.jinja, as a
    download carries its own (written once per root)."""
    import shutil

    out = root / f"{family}-own-template"
    if not (out / "config.json").is_file():
        shutil.copytree(checkpoint(root, family), out)
        (out / "chat_template.jinja").write_text(unmarked(USER_TEMPLATES[family]))
    return out


def download_folder(root: Path, family: str) -> Path:
    """The tiny checkpoint of `family` as a download looks: with its own unmarked template where vlmtrain vendors
    none (`checkpoint_with_own_template`), else the plain tiny checkpoint (its official template comes with it)."""
    return checkpoint_with_own_template(root, family) if family in USER_TEMPLATES else checkpoint(root, family)


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
