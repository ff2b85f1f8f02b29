"""Turning encoded samples into batches: padding, length grouping and packing.

Packing puts several samples into one row. Isolation is exact: position ids restart at 0 for each sample, and
with `attention_mask=None` transformers derives a block-diagonal causal mask from those restarts
(`masking_utils.find_packed_sequence_indices`), so no token attends across samples. The first label of every
sample is ignored (it is never a next-token target on its own either), and each sample's images stay in slot order.

Native families carry per-token tensors (Gemma 3's `token_type_ids`, Qwen's `mm_token_type_ids`); a packed row
holds its samples' values end to end. Qwen's 3-D mRoPE ids are not built here: they need the model's own
rope-index function, so `NativeVLM.forward` derives them per sample from these restarting `position_ids`.
"""

from __future__ import annotations

import torch

from vlmtrain.data.chat import IGNORE
from vlmtrain.data.prefix import common_prefix_len, segment_attention_mask, shared_prefix_rows


def collate(samples: list[dict], pad_token_id: int) -> dict:
    """Right-padded batch: input_ids/labels/attention_mask `[b, s_max]`, pixel_values `[Σ n_img, c, h, w]`."""
    s_max = max(len(x["input_ids"]) for x in samples)
    b = len(samples)
    input_ids = torch.full((b, s_max), pad_token_id, dtype=torch.long)
    labels = torch.full((b, s_max), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((b, s_max), dtype=torch.long)
    for i, x in enumerate(samples):
        n = len(x["input_ids"])
        input_ids[i, :n] = torch.as_tensor(x["input_ids"])
        labels[i, :n] = torch.as_tensor(x["labels"])
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    _add_pixels(batch, samples)
    _add_token_extras(batch, samples, s_max)
    return batch


def cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding the other dims to their maximum. Native families carry per-sample
    image tensors whose inner sizes vary (Idefics3 `[1, n_crops, c, h, w]`, OneVision `[n_img, n_patches, ...]`);
    their models drop the all-zero padding crops or slice patches by `image_sizes`."""
    if all(t.shape[1:] == tensors[0].shape[1:] for t in tensors):
        return torch.cat(tensors)
    inner = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    out = tensors[0].new_zeros((sum(t.shape[0] for t in tensors), *inner))
    row = 0
    for t in tensors:
        out[(slice(row, row + t.shape[0]), *(slice(0, n) for n in t.shape[1:]))] = t
        row += t.shape[0]
    return out


def _add_token_extras(batch: dict, samples: list[dict], s_max: int) -> None:
    """Per-token family tensors of native models (e.g. Gemma 3's `token_type_ids`), right-padded with 0."""
    keys = sorted({k for x in samples for k in x.get("token_extras", {})})
    for k in keys:
        t = torch.zeros((len(samples), s_max), dtype=torch.long)
        for i, x in enumerate(samples):
            v = x.get("token_extras", {}).get(k)
            if v is not None:
                t[i, : len(v)] = torch.as_tensor(v)
        batch[k] = t
    if keys:
        batch["model_extras"] = sorted(set(batch.get("model_extras", [])) | set(keys))


# Image tensors that are also per token: `[1, s, images, tiles]` (Mllama); their image axis is dim 2, not dim 1
SEQ_IMAGE_EXTRAS = ("cross_attention_mask",)


def _aligned_row(ref: torch.Tensor, key: str, n_tokens: int) -> torch.Tensor:
    """A text-only sample's row of a batch-aligned image tensor: no image slots (cat_padded pads them with 0,
    transformers' own padding: pixels 0, `aspect_ratio_ids` 0 = no image, masks 0)."""
    shape = [1, *ref.shape[1:]]
    if key in SEQ_IMAGE_EXTRAS:
        shape[1], shape[2] = n_tokens, 0
    else:
        shape[1] = 0
    return ref.new_zeros(shape)


def _add_aligned_pixels(batch: dict, samples: list[dict]) -> None:
    """Batch-aligned families (Family.batch_aligned_images): one row per sample of `pixel_values` and of every image
    tensor, text-only samples included, padded to the batch's most images and (`cross_attention_mask`) its length."""
    ref = next(x for x in samples if x.get("pixel_values") is not None)
    keys = sorted(ref["image_extras"])

    def rows(key: str) -> list[torch.Tensor]:
        def own(x):
            return x["pixel_values"] if key == "pixel_values" else x["image_extras"][key]

        return [own(x) if x.get("pixel_values") is not None else _aligned_row(own(ref), key, len(x["input_ids"]))
                for x in samples]

    batch["pixel_values"] = cat_padded(rows("pixel_values"))
    for k in keys:
        batch[k] = cat_padded(rows(k))
    if "aspect_ratio_mask" in batch:
        # transformers' processor marks tile 0 of every image slot, padding slots too (its `build_aspect_ratio_mask`:
        # the original implementation padded aspect ratios with (1, 1)); real images always have tile 0
        batch["aspect_ratio_mask"][:, :, 0] = 1
    if keys:
        batch["model_extras"] = sorted(set(batch.get("model_extras", [])) | set(keys))


def _add_pixels(batch: dict, samples: list[dict]) -> None:
    pix = [x["pixel_values"] for x in samples if x.get("pixel_values") is not None]
    if pix and any(x.get("batch_aligned") for x in samples):
        _add_aligned_pixels(batch, samples)
    elif pix:
        batch["pixel_values"] = cat_padded(pix)
        # per-image family tensors of native models (`image_grid_thw`, `image_sizes`, `pixel_attention_mask`)
        keys = sorted({k for x in samples if x.get("pixel_values") is not None for k in x.get("image_extras", {})})
        for k in keys:
            batch[k] = cat_padded([x["image_extras"][k] for x in samples if x.get("pixel_values") is not None])
        if keys:
            batch["model_extras"] = sorted(set(batch.get("model_extras", [])) | set(keys))
        if all("cache_key" in x for x in samples):  # keys for the frozen-tower feature cache (VLM.vision_cache)
            batch["image_keys"] = [f"{x['cache_key']}#{k}" for x in samples if x.get("pixel_values") is not None
                                   for k in range(x["pixel_values"].shape[0])]


def pack_rows(samples: list[dict], max_len: int) -> list[list[dict]]:
    """First-fit-decreasing bin packing of samples into rows of at most `max_len` tokens.

    Deterministic for a given input order (ties keep input order). Hand-written: a dozen lines, and packing
    libraries (e.g. in TRL) work on text-only tensors and would split a sample's image slots.
    """
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]["input_ids"]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(samples[i]["input_ids"])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_len - n)
    # Within a row keep the original order, so a sample's images stay ordered relative to other samples.
    return [[samples[i] for i in sorted(r)] for r in rows]


def collate_packed(rows: list[list[dict]], pad_token_id: int) -> dict:
    """Packed batch: input_ids/labels/position_ids `[b, s_max]`, no attention_mask (see module doc).

    Padding at a row's end forms its own block (positions restart at 0) with ignored labels.
    """
    lengths = [sum(len(x["input_ids"]) for x in row) for row in rows]
    s_max = max(lengths)
    b = len(rows)
    input_ids = torch.full((b, s_max), pad_token_id, dtype=torch.long)
    labels = torch.full((b, s_max), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((b, s_max), dtype=torch.long)
    flat = []
    for i, row in enumerate(rows):
        pos = 0
        for x in row:
            n = len(x["input_ids"])
            input_ids[i, pos : pos + n] = torch.as_tensor(x["input_ids"])
            lab = torch.tensor(x["labels"])  # a copy: samples may be cached and reused by the loader
            lab[0] = IGNORE
            labels[i, pos : pos + n] = lab
            position_ids[i, pos : pos + n] = torch.arange(n)
            pos += n
            flat.append(x)
        position_ids[i, pos:] = torch.arange(s_max - pos)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
             "samples_per_row": torch.tensor([len(r) for r in rows])}
    _add_pixels(batch, flat)
    _add_token_extras(batch, [_row_token_extras(row) for row in rows], s_max)
    return batch


def _row_token_extras(row: list[dict]) -> dict:
    """One packed row's per-token family tensors: each sample's values end to end (0 where a sample has none)."""
    keys = sorted({k for x in row for k in x.get("token_extras", {})})
    extras = {}
    for k in keys:
        parts = []
        for x in row:
            v = x.get("token_extras", {}).get(k)
            parts.append(torch.as_tensor(v, dtype=torch.long) if v is not None
                         else torch.zeros(len(x["input_ids"]), dtype=torch.long))
        extras[k] = torch.cat(parts)
    return {"token_extras": extras}


def collate_preference(samples: list[dict], pad_token_id: int) -> dict:
    """DPO batch: rows `[0, b)` are the chosen sequences, `[b, 2b)` the rejected ones; each side carries the
    prompt's images, so pixel_values hold the images twice in that order."""
    def side(x: dict, name: str) -> dict:
        aligned = {"batch_aligned": True} if x.get("batch_aligned") else {}
        # a side's own per-token image tensors (Mllama's cross_attention_mask has its length) over the pair's
        extras = {**x.get("image_extras", {}), **x[name].get("image_extras", {})}
        return {**x[name], "pixel_values": x.get("pixel_values"), "image_extras": extras, **aligned}

    chosen = [side(x, "chosen") for x in samples]
    rejected = [side(x, "rejected") for x in samples]
    return collate(chosen + rejected, pad_token_id)


def _pair_groups(samples: list[dict], image_token_id: int,
                 token_keys: tuple[str, ...] = ()) -> tuple[list[list[dict]], list[int]] | None:
    """Each pair as a shared-prefix group [chosen, rejected] and its shared prefix length (the longest common prefix
    of the two encoded sequences: prompt, images, template, and any identical first answer tokens); None when a
    pair has image tokens outside it."""
    groups, lens = [], []
    for x in samples:
        pair = [x["chosen"], x["rejected"]]
        n = common_prefix_len(pair, token_keys)
        if any(image_token_id in s["input_ids"][n:] for s in pair):
            return None
        groups.append(pair)
        lens.append(n)
    return groups, lens


def _shared_pair_batch(rows: dict, b: int) -> dict:
    return {"input_ids": rows["input_ids"], "position_ids": rows["position_ids"],
            "logits_index": rows["logits_index"], "targets": rows["targets"], "seq_index": rows["seq_index"],
            "pairs": b, "shared_prompt": True,
            # what the classic layout would have cost, for throughput accounting
            "token_count": rows["token_count"]}


def collate_preference_shared(samples: list[dict], pad_token_id: int, image_token_id: int) -> dict | None:
    """DPO batch of a composed model with the prompt computed once per pair: row i is
    `[shared prefix | chosen rest | rejected rest]` (`vlmtrain.data.prefix`, k = 2).

    Position ids restart at the prefix length for the rejected rest, and a custom mask `attention_mask [b, 1, s, s]`
    (bool, True = may attend) is causal except that the rejected rest never sees the chosen rest — so every token
    sees exactly the context it has in its own sequence. The images are in the prefix, once (the classic layout
    carries them twice). Scoring uses explicit (row, position) → target pairs: logits_index `[n, 2]`, targets `[n]`,
    seq_index `[n]` (pair i's chosen = i, rejected = b + i).
    Returns None when a pair has image tokens outside its shared prefix, or the family's image tensors are per row
    (Family.batch_aligned_images): the caller uses `collate_preference`."""
    if any(x.get("batch_aligned") for x in samples):
        return None  # per-row image tensors (Mllama's cross_attention_mask) follow each sequence: classic layout
    pairs = _pair_groups(samples, image_token_id)
    if pairs is None:
        return None
    rows = shared_prefix_rows(*pairs, pad_token_id)
    batch = _shared_pair_batch(rows, len(samples))
    batch["attention_mask"] = segment_attention_mask(rows["segments"])
    _add_pixels(batch, samples)
    return batch


def collate_preference_prefix(samples: list[dict], pad_token_id: int, image_token_id: int) -> dict | None:
    """DPO batch of a native family in shared-prefix rows (`vlmtrain.data.prefix`, k = 2): the layout of
    `collate_preference_shared`, but the model builds the mask itself from `segments [b, s]` (a model_extra), since
    it depends on the family (Gemma 3's bidirectional image blocks, sliding windows, Qwen's 3-D mRoPE ids continuing
    the prefix: `vlmtrain.model.native.shared_prefix`). Per-token family tensors (`token_type_ids`,
    `mm_token_type_ids`) follow the row; the images and their tensors appear once. None when a pair has image tokens
    outside its shared prefix or the images are per row (the caller uses `collate_preference`)."""
    if any(x.get("batch_aligned") for x in samples):
        return None
    keys = tuple(sorted({k for x in samples for side in ("chosen", "rejected")
                         for k in x[side].get("token_extras", {})}))
    pairs = _pair_groups(samples, image_token_id, keys)
    if pairs is None:
        return None
    rows = shared_prefix_rows(*pairs, pad_token_id)
    batch = _shared_pair_batch(rows, len(samples))
    batch["segments"] = rows["segments"]
    batch.update(rows["token_extras"])
    _add_pixels(batch, samples)
    batch["model_extras"] = sorted(set(batch.get("model_extras", [])) | set(keys) | {"segments"})
    return batch


def sample_length(x: dict) -> int:
    if "input_ids" in x:
        return len(x["input_ids"])
    return max(len(x["chosen"]["input_ids"]), len(x["rejected"]["input_ids"]))
