"""`vlmtrain data inspect`: render samples exactly as the trainer will see them, supervised spans marked."""

from __future__ import annotations

from typing import Iterator

from vlmtrain.data.chat import IGNORE
from vlmtrain.data.encode import encoder_for
from vlmtrain.data.loader import ShardLoader


def _rows(batch: dict) -> list[tuple[str, str | None, list[int], list[int]]]:
    """(id, side, input_ids, labels) per sequence of an unpadded single-sample batch."""
    ids = batch["ids"][0]
    seqs = []
    for r in range(batch["input_ids"].shape[0]):
        mask = batch["attention_mask"][r].bool()
        side = None if not batch["preference"] else ("chosen" if r == 0 else "rejected")
        seqs.append((ids, side, batch["input_ids"][r][mask].tolist(), batch["labels"][r][mask].tolist()))
    return seqs


def _images(batch: dict, ids: list[int], m) -> int:
    """Images of the sample: slots / tokens per image (composed), or the record's image count (native, where the
    processor gives each image its own token count)."""
    if m.num_image_tokens:
        return ids.count(m.image_token_id) // m.num_image_tokens
    rec = batch["records"][0]
    return sum(1 for msg in rec.get("messages", rec.get("prompt", [])) for p in msg["content"]
               if p == {"type": "image"}) + (1 if rec.get("kind") == "caption" else 0)


def inspect_samples(shards: str, bundle, n: int = 5, max_len: int = 4096) -> Iterator[dict]:
    """Yield per sequence: id, input_ids, labels (-100 = unsupervised), text, supervised_text, image_slots
    (image-token positions), images, and `side` for preference records. Deterministic order, no shuffle buffer."""
    tok, m = bundle.tokenizer, bundle.model
    loader = ShardLoader(shards, encoder_for(bundle, max_len), tok.pad_token_id, batch_size=1, num_workers=0,
                         epochs=1, shuffle_buffer=1, max_bad_fraction=1.0, rank=0, world_size=1, keep_raw=True)
    for count, batch in enumerate(loader):
        if count >= n:
            return
        for rid, side, ids, labels in _rows(batch):
            sup = [t for t in labels if t != IGNORE]
            out = {"id": rid, "input_ids": ids, "labels": labels, "text": tok.decode(ids),
                   "supervised_text": tok.decode(sup), "image_slots": ids.count(m.image_token_id),
                   "images": _images(batch, ids, m)}
            if side:
                out["side"] = side
            yield out


def render(sample: dict, tokenizer, image_token_id: int) -> str:
    """Human view: supervised spans in [[...]], each image's slots collapsed to <image×N>."""
    out, run_sup, i = [], False, 0
    ids, labels = sample["input_ids"], sample["labels"]
    while i < len(ids):
        if ids[i] == image_token_id:
            j = i
            while j < len(ids) and ids[j] == image_token_id:
                j += 1
            out.append(f"<image×{j - i}>")
            i = j
            continue
        sup = labels[i] != IGNORE
        if sup != run_sup:
            out.append("[[" if sup else "]]")
            run_sup = sup
        out.append(tokenizer.decode([ids[i]]))
        i += 1
    if run_sup:
        out.append("]]")
    return "".join(out)
