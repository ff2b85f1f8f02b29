"""GRPO prompt records: a canonical record → the prompt a policy completes, plus the columns reward functions read.

Two record shapes serve as prompts, both ordinary shard records (`vlmtrain prep llava` writes the first):

- a chat record whose last turn is the assistant's: the prompt is the conversation before that turn, and the turn's
  text becomes the `answer` column (the ground truth an accuracy reward compares with);
- a chat record with an `answer` or `solution` field (top level or in `meta`): the prompt is the whole
  conversation up to its last user turn (a trailing assistant turn is dropped), the field is the column.

The prompt is tokenized as generation sees it: the chat template with its generation prompt (`add_generation_prompt`,
the same form as the held-out eval's), each image token expanded to the model's slots. A prompt that leaves no room
for `max_completion_length` tokens within `max_len` is rejected (`over_length`), never cut: a cut would slice
through image slots or drop the question.

    prompt_messages(record) -> (messages, columns)
    PromptEncoder(record, images) -> {"id", "input_ids", "labels", "pixel_values", "columns", "prompt"}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmtrain.data.chat import IGNORE, encode_messages
from vlmtrain.data.schema import IMAGE_PART, RecordError

_TRUTH_FIELDS = ("answer", "solution")


def _text_of(message: dict) -> str:
    return "".join(p["text"] for p in message["content"] if p.get("type") == "text")


def prompt_messages(record: dict) -> tuple[list[dict], dict[str, Any]]:
    """The messages to complete and the record's reward columns (`answer`, `solution`, `boxes`, `meta` when the
    record has them). Raises RecordError naming the field when the record cannot be a prompt."""
    if record.get("kind") != "chat":
        raise RecordError("missing_field", f"kind: a GRPO prompt is a chat record, got {record.get('kind')!r}")
    msgs = record["messages"]
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    columns: dict[str, Any] = {}
    for name in _TRUTH_FIELDS:
        value = record.get(name, meta.get(name))
        if value is not None:
            columns[name] = value
    if msgs[-1]["role"] == "assistant":
        if "answer" not in columns:
            columns["answer"] = _text_of(msgs[-1])
        msgs = msgs[:-1]
    if not msgs or msgs[-1]["role"] != "user":
        raise RecordError("malformed_turns", "messages: a GRPO prompt must end with a user turn (before the last "
                                             "assistant turn)")
    if not columns:
        raise RecordError("missing_field", "answer: no assistant turn and no answer/solution field to reward "
                                           "against")
    for name in ("boxes",):
        if name in record or name in meta:
            columns[name] = record.get(name, meta.get(name))
    if meta:
        columns["meta"] = meta
    return msgs, columns


def generation_prompt_ids(tokenizer, messages: list[dict], image_token_id: int, num_image_tokens: int) -> list[int]:
    """Token ids of `messages` followed by the template's generation prompt (`<|assistant|>`), each image token
    expanded to `num_image_tokens` slots: the prefix generation continues (also the held-out eval's prompt)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out: list[int] = []
    for t in tokenizer(text, add_special_tokens=False)["input_ids"]:
        out.extend([t] * num_image_tokens if t == image_token_id else [t])
    return out


def end_of_turn_ids(tokenizer, image_token_id: int) -> list[int]:
    """The tokens that end an assistant turn: the last supervised token of a rendered assistant reply (the chat
    template's end-of-turn marker, `<|end|>` / `<|im_end|>` / EOS), and the tokenizer's EOS. Read from the template
    rather than from a list of known names, so a new template needs no code."""
    msgs = [{"role": "user", "content": [{"type": "text", "text": "q"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]
    enc = encode_messages(tokenizer, msgs, image_token_id, 1)
    last = [t for t in enc.labels if t != IGNORE][-1]
    ids = {int(last)}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


@dataclass
class PromptEncoder:
    """Record + decoded images → a GRPO prompt sample (picklable: runs in DataLoader workers). `base` is the
    stage's `SampleEncoder` (tokenizer, image processor, slots); `max_completion_length` is reserved in `max_len`.

    A native family's encoder (`NativeSampleEncoder`) renders the prompt with its template and its processor, which
    also makes the family's image and per-token tensors; its `image_resize` column comes from that output where one
    processed size per image can be read (`native_resized_size`). `input_ids` is the prompt; `labels` are all IGNORE (a prompt has nothing supervised: completions are
    scored after generation), so the ordinary collator pads it."""

    base: Any
    max_completion_length: int

    def __call__(self, record: dict, images: list) -> dict:
        b = self.base
        msgs, columns = prompt_messages(record)
        if sum(p == IMAGE_PART for m in msgs for p in m["content"]) != len(images):
            raise RecordError("image_slot_mismatch", "messages: an image of the record is in the dropped answer turn")
        native = hasattr(b, "split_outputs")  # a native family's encoder: its processor expands the images
        if native:
            out = b.process(b.render(msgs, add_generation_prompt=True), images)
            ids = out["input_ids"][0].tolist()
        else:
            ids = generation_prompt_ids(b.tokenizer, msgs, b.image_token_id, b.num_image_tokens)
        room = b.max_len - self.max_completion_length
        if len(ids) > room:
            raise RecordError("over_length", f"prompt of {len(ids)} tokens + max_completion_length "
                                             f"{self.max_completion_length} > max_len {b.max_len}")
        if native:  # pixel_values, the per-image and per-token family tensors, as for training samples
            size = native_resized_size(out, b.processor, len(images)) if images else None
            if size is not None:
                columns["image_resize"] = {"original": list(images[0].size), "resized": size}
            return {"id": record["id"], "input_ids": ids, "labels": [IGNORE] * len(ids),
                    **b.split_outputs(out, len(ids)), "columns": columns, "prompt": msgs}
        pix = b.pixels(images)
        if images:
            size = list(pix.shape[-1:-3:-1]) if pix is not None else None  # [w, h] of the processed image
            columns["image_resize"] = {"original": list(images[0].size), "resized": size}
        return {"id": record["id"], "input_ids": ids, "labels": [IGNORE] * len(ids), "pixel_values": pix,
                "columns": columns, "prompt": msgs}


def native_resized_size(out, processor, n_images: int) -> list[int] | None:
    """`[w, h]` in pixels of the first image as a native family's processor handed it to the model, the frame its
    answers' coordinates are in: Qwen-style `image_grid_thw` (`[t, h, w]` patches) × the image processor's
    `patch_size`; else `pixel_values` of one `[c, h, w]` image per image (fixed-size towers). None for tiled layouts
    (AnyRes crops, Idefics3 splitting, tile-indexed InternVL / Llama 4), where no single frame exists, and after a
    center crop (CLIP's: the model sees part of the image, not a rescaled whole)."""
    ip = getattr(processor, "image_processor", None)
    if getattr(ip, "do_center_crop", False):
        return None
    grid = out.get("image_grid_thw")
    patch = getattr(ip, "patch_size", None)
    if grid is not None and isinstance(patch, int):
        return [int(grid[0][2]) * patch, int(grid[0][1]) * patch]
    pix = out.get("pixel_values")
    if grid is None and pix is not None and pix.dim() == 4 and pix.shape[0] == n_images:
        return [int(pix.shape[-1]), int(pix.shape[-2])]
    return None
