"""The quickstart job (`make demo`): compose a tiny VLM, teach it to read handwritten digits, export it to
transformers, and check that transformers reproduces it.

Data: scikit-learn's bundled digits (1,797 8×8 scans), as "What digit is this?" → "seven" conversations.
The training issue replaces the plain loop below with the Lightning align → SFT → DPO recipe.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from vlmtrain.config import load_model_config
from vlmtrain.data.chat import encode_messages
from vlmtrain.data.batching import collate
from vlmtrain.model import build_model, count_params
from vlmtrain.model.inference import prepare_inputs, prompt_messages
from vlmtrain.train.objectives import next_token_loss_sum

log = logging.getLogger("vlmtrain.demo")

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
QUESTION = "What digit is this?"
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "models" / "tiny-clip-llama.yaml"


def digit_images(size: int):
    """sklearn digits as RGB PIL images of `size` px, with integer labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = [Image.fromarray((x * (255 / 16)).astype(np.uint8), "L").resize((size, size), Image.BILINEAR).convert("RGB")
            for x in d.images]
    return imgs, d.target.tolist()


def _encode(bundle, images, targets):
    m = bundle.model
    pix = bundle.image_processor(images=images, return_tensors="pt")["pixel_values"]
    out = []
    for i, y in enumerate(targets):
        msgs = prompt_messages(QUESTION, 1) + [{"role": "assistant", "content": WORDS[y]}]
        enc = encode_messages(bundle.tokenizer, msgs, m.image_token_id, m.num_image_tokens)
        out.append({"input_ids": enc.input_ids, "labels": enc.labels, "pixel_values": pix[i : i + 1]})
    return out


@torch.no_grad()
def accuracy(bundle, images, targets) -> float:
    """Greedy exact match of the answer word (all prompts have one length, so no padding is needed)."""
    m = bundle.model.eval()
    inputs = prepare_inputs(bundle, QUESTION, images[:1])
    ids = inputs["input_ids"].expand(len(images), -1)
    pix = bundle.image_processor(images=images, return_tensors="pt")["pixel_values"]
    new = m.generate(ids, pix, attention_mask=torch.ones_like(ids), max_new_tokens=4)
    texts = bundle.tokenizer.batch_decode(new, skip_special_tokens=True)
    return float(np.mean([t.strip() == WORDS[y] for t, y in zip(texts, targets)]))


def run_demo(out: str | Path, steps: int = 300, seed: int = 0, batch_size: int = 32, lr: float = 2e-3,
             config: str | Path = DEFAULT_CONFIG) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    t0 = time.time()
    cfg = load_model_config(config)
    bundle = build_model(cfg)
    m = bundle.model
    params = count_params(m)
    log.info(f"[1/5] composed {cfg.name}: {params['total']:,} params "
             f"(vision {params['vision']:,} frozen, connector {params['connector']:,}, llm {params['llm']:,}); "
             f"{m.num_image_tokens} image tokens per image")

    images, targets = digit_images(m.vision.image_size)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    held, train = order[:300], order[300:]
    held_imgs, held_y = [images[i] for i in held], [targets[i] for i in held]
    train_samples = _encode(bundle, [images[i] for i in train], [targets[i] for i in train])
    log.info(f"[2/5] data: sklearn digits, {len(train_samples)} train / {len(held)} held-out conversations")

    acc_before = accuracy(bundle, held_imgs, held_y)
    trainable = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    m.train()
    losses, t_train, seen = [], time.time(), 0
    for step in range(1, steps + 1):
        idx = rng.choice(len(train_samples), batch_size, replace=False)
        batch = collate([train_samples[i] for i in idx], bundle.tokenizer.pad_token_id)
        logits = m(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits
        loss_sum, n_tok = next_token_loss_sum(logits, batch["labels"])
        loss = loss_sum / n_tok
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        seen += batch_size
        if step % 50 == 0 or step == steps:
            rate = seen / (time.time() - t_train)
            eta = (steps - step) * batch_size / rate
            log.info(f"[3/5] step {step}/{steps}  loss {np.mean(losses[-50:]):.4f}  {rate:.0f} samples/s  ETA {eta:.0f}s")
    acc_after = accuracy(bundle, held_imgs, held_y)
    log.info(f"[3/5] held-out accuracy: {acc_before:.1%} before → {acc_after:.1%} after (chance 10%)")

    from vlmtrain.model.hf_llava import export_llava
    from vlmtrain.model.io import save_native

    save_native(bundle, out / "model")
    export_llava(bundle, out / "hf-llava")
    log.info(f"[4/5] saved {out / 'model'} (vlmtrain) and {out / 'hf-llava'} (transformers Llava)")
    check = _check_transformers(bundle, out / "hf-llava", held_imgs[0])
    log.info(f"[5/5] transformers LlavaForConditionalGeneration: max |Δlogits| {check['max_abs_logit_diff']:.2e}, "
             f"greedy text {'equal' if check['same_text'] else 'DIFFERENT'} ({check['text']!r})")
    summary = {
        "model": cfg.name, "params": params, "steps": steps, "batch_size": batch_size,
        "final_loss": float(np.mean(losses[-20:])), "samples_per_s": seen / (time.time() - t_train),
        "accuracy_before": acc_before, "accuracy_after": acc_after, "transformers_check": check,
        "seconds": time.time() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info(f"done in {summary['seconds']:.0f}s; summary in {out / 'summary.json'}")
    return summary


@torch.no_grad()
def _check_transformers(bundle, folder: Path, image) -> dict:
    """Load the export with transformers alone and compare logits and greedy text with vlmtrain's."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlmtrain.model.inference import generate_text

    llava = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    proc = AutoProcessor.from_pretrained(folder)
    inputs = proc.apply_chat_template(prompt_messages(QUESTION, 1), add_generation_prompt=True, tokenize=True,
                                      return_dict=True, return_tensors="pt", images=[image])
    ref = llava(**inputs).logits
    ours = bundle.model.eval()(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]).logits
    hf_new = llava.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    hf_text = proc.tokenizer.decode(hf_new, skip_special_tokens=True)
    our_text = generate_text(bundle, QUESTION, [image], 8)
    return {"max_abs_logit_diff": float((ref - ours).abs().max()), "same_text": hf_text == our_text, "text": our_text}
