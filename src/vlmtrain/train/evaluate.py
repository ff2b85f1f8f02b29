"""Held-out evaluation: VQA exact match (greedy generation) and multiple-choice accuracy (log-likelihood).

Eval records are chat records whose last assistant turn is the reference answer. A record with
`meta.choices` (a list of strings containing the reference) is also scored as multiple choice: each choice is
appended as the assistant reply and the choice with the highest summed log-probability wins.
"""

from __future__ import annotations

import re
import string

import torch

from vlmtrain.data.batching import collate
from vlmtrain.data.chat import encode_messages
from vlmtrain.data.encode import encoder_for
from vlmtrain.data.loader import ShardLoader
from vlmtrain.data.prompts import generation_prompt_ids
from vlmtrain.data.schema import text as text_part
from vlmtrain.train.dpo import sequence_logps


def normalize_answer(s: str) -> str:
    """Lower-case, strip punctuation/articles/extra spaces (the VQA/SQuAD normalisation)."""
    s = s.lower().strip()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _split(record: dict) -> tuple[list[dict], str]:
    msgs = record["messages"]
    if msgs[-1]["role"] != "assistant":
        raise ValueError(f"eval record {record['id']}: last turn must be the assistant's reference answer")
    answer = "".join(p["text"] for p in msgs[-1]["content"] if p.get("type") == "text")
    return msgs[:-1], answer


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = max(map(len, seqs))
    ids = torch.full((len(seqs), s), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), s), dtype=torch.long)
    for i, q in enumerate(seqs):
        ids[i, s - len(q):] = torch.tensor(q)
        att[i, s - len(q):] = 1
    return ids, att


def _prompt_ids(tok, prompt_msgs, image_token_id, n_slots) -> list[int]:
    return generation_prompt_ids(tok, prompt_msgs, image_token_id, n_slots)  # the prompt GRPO generation sees too


@torch.no_grad()
def evaluate(bundle, shards: str, max_samples: int = 300, max_new_tokens: int = 8, batch_size: int = 32,
             device: torch.device | str | None = None) -> dict[str, float]:
    """Returns {"vqa_exact_match", "eval_samples"} and, when records carry `meta.choices`, "mc_accuracy" (the right
    choice has the highest log-likelihood) and "answer_nll" (the right choice's mean per-token negative
    log-likelihood: a continuous held-out metric that moves before accuracy does)."""
    if bundle.native:
        return evaluate_native(bundle, shards, max_samples, max_new_tokens, device)
    m, tok = bundle.model, bundle.tokenizer
    was_training = m.training
    m.eval()
    device = device or next(m.parameters()).device
    enc = encoder_for(bundle)
    loader = ShardLoader(shards, enc, tok.pad_token_id, batch_size=batch_size, num_workers=0, epochs=1,
                         shuffle_buffer=1, keep_raw=True, max_bad_fraction=1.0, rank=0, world_size=1)
    n = exact = mc_n = mc_right = 0
    nlls: list[float] = []
    for batch in loader:
        recs = batch["records"][: max_samples - n]
        if not recs:
            break
        pix_all = batch.get("pixel_values")
        # images of each record, in slot order
        counts = [sum(1 for msg in r["messages"] for p in msg["content"] if p == {"type": "image"}) for r in recs]
        offsets = [sum(counts[:i]) for i in range(len(counts))]
        prompts, answers = zip(*(_split(r) for r in recs))
        p_ids = [_prompt_ids(tok, p, m.image_token_id, m.num_image_tokens) for p in prompts]
        ids, att = _left_pad(p_ids, tok.pad_token_id)
        pix = pix_all[: sum(counts)].to(device) if pix_all is not None and sum(counts) else None
        # the batch's images through tower + connector once, for the prompts and every record's choices (the
        # choices of a record share its images: encoding them per choice cost ~n_choices× the tower's time)
        feats = m.encode_images(pix) if pix is not None else None  # [n_img, t, d_lm]
        new = m.generate(ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
                         image_embeds=feats)
        outs = tok.batch_decode(new, skip_special_tokens=True)
        exact += sum(normalize_answer(o) == normalize_answer(a) for o, a in zip(outs, answers))
        for i, r in enumerate(recs):
            choices = (r.get("meta") or {}).get("choices")
            if not choices:
                continue
            seqs = []
            for c in choices:
                msgs = list(prompts[i]) + [{"role": "assistant", "content": [text_part(c)]}]
                e = encode_messages(tok, msgs, m.image_token_id, m.num_image_tokens)
                seqs.append({"input_ids": e.input_ids, "labels": e.labels})
            b = collate(seqs, tok.pad_token_id)
            # each choice's sequence holds the record's images in the same slots: its features, once per choice
            own = None if feats is None or counts[i] == 0 else feats[offsets[i]: offsets[i] + counts[i]]
            logits = m(b["input_ids"].to(device), None, b["attention_mask"].to(device),
                       image_embeds=None if own is None else own.repeat(len(choices), 1, 1)).logits
            logps, n_tok = sequence_logps(logits, b["labels"].to(device))
            mc_n += 1
            mc_right += int(choices[int(logps.argmax())] == answers[i])
            nlls += _answer_nll(choices, answers[i], logps, n_tok)
        n += len(recs)
        if n >= max_samples:
            break
    m.train(was_training)
    out = {"vqa_exact_match": exact / max(n, 1), "eval_samples": n}
    if mc_n:
        out["mc_accuracy"] = mc_right / mc_n
    if nlls:
        out["answer_nll"] = sum(nlls) / len(nlls)
    return out


def _answer_nll(choices: list[str], answer: str, logps: torch.Tensor, n_tokens: torch.Tensor) -> list[float]:
    """Mean per-token negative log-likelihood of the reference answer among the scored choices (logps, n_tokens
    `[len(choices)]`): one value, or none when the reference is not among the choices (it has no score here)."""
    if answer not in choices:
        return []
    i = choices.index(answer)
    return [float(-logps[i] / n_tokens[i].clamp(min=1))]


class _KeepImages:
    """Wraps an encoder so each kept record also carries its decoded images (`_images`): a native model's
    processor needs the images themselves to build prompts and choices."""

    def __init__(self, encoder):
        self.encoder = encoder

    def __call__(self, record: dict, images: list) -> dict:
        record["_images"] = images
        return self.encoder(record, images)


def _to(d: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


@torch.no_grad()
def evaluate_native(bundle, shards: str, max_samples: int = 300, max_new_tokens: int = 8,
                    device: torch.device | str | None = None) -> dict[str, float]:
    """`evaluate` for native families, one record at a time: prompts and choices go through the family's
    processor (the image-token count depends on each image), generation through transformers' `generate`."""
    from vlmtrain.train.dpo import selected_sequence_logps
    from vlmtrain.train.module import model_extras
    from vlmtrain.train.objectives import prediction_mask

    m, tok = bundle.model, bundle.tokenizer
    was_training = m.training
    m.eval()
    device = device or next(m.parameters()).device
    enc = encoder_for(bundle)
    loader = ShardLoader(shards, _KeepImages(enc), tok.pad_token_id, batch_size=1, num_workers=0, epochs=1,
                         shuffle_buffer=1, keep_raw=True, max_bad_fraction=1.0, rank=0, world_size=1)
    n = exact = mc_n = mc_right = 0
    nlls: list[float] = []
    for batch in loader:
        if n >= max_samples:
            break
        r = batch["records"][0]
        prompt, answer = _split(r)
        inputs = _to(enc.prompt_inputs(prompt, r["_images"]), device)
        ids = inputs.pop("input_ids")
        new = m.generate(ids, inputs.pop("attention_mask", None), max_new_tokens=max_new_tokens, **inputs)
        exact += normalize_answer(tok.decode(new[0], skip_special_tokens=True)) == normalize_answer(answer)
        n += 1
        choices = (r.get("meta") or {}).get("choices")
        if not choices:
            continue
        seqs = [enc.encode_conversation(list(prompt) + [{"role": "assistant", "content": [text_part(c)]}],
                                        r["_images"]) for c in choices]
        b = _to(collate(seqs, tok.pad_token_id), device)
        mask, targets = prediction_mask(b["labels"])
        logits = m(b["input_ids"], b.get("pixel_values"), b["attention_mask"], logits_mask=mask, **model_extras(b))
        logps, n_tok = selected_sequence_logps(logits, targets, mask)
        mc_n += 1
        mc_right += int(choices[int(logps.argmax())] == answer)
        nlls += _answer_nll(choices, answer, logps, n_tok)
    m.train(was_training)
    out = {"vqa_exact_match": exact / max(n, 1), "eval_samples": n}
    if mc_n:
        out["mc_accuracy"] = mc_right / mc_n
    if nlls:
        out["answer_nll"] = sum(nlls) / len(nlls)
    return out


__all__ = ["evaluate", "evaluate_native", "normalize_answer"]
