"""The one canonical record form that every source format is converted to, and that shards store.

A shard sample is a group of tar members sharing a key (WebDataset convention; keys contain no dots):

    {key}.json            the record below (UTF-8 JSON)
    {key}.img0.{ext}      image bytes exactly as read from the source (jpg/png/webp/...), in slot order
    {key}.img1.{ext}      ...

Record kinds (field `kind`):

- `chat`:       {"id", "kind": "chat", "messages": [Message, ...]}   (ends with an assistant turn, unless it carries
                its ground truth as an `answer` / `solution` field: a GRPO prompt, `data.prompts`)
- `preference`: {"id", "kind": "preference", "prompt": [Message, ...], "chosen": [Message, ...],
                 "rejected": [Message, ...]}   (chosen/rejected are the assistant turn(s) that follow the prompt)
- `caption`:    {"id", "kind": "caption", "caption": str}   (exactly one image)

Message: {"role": "system" | "user" | "assistant", "content": [Part, ...]} where Part is {"type": "image"} or
{"type": "text", "text": str}. The number of image parts over all messages equals the number of images, and image
parts map to images in order of appearance. Optional extra fields: "source" (format name), "meta" (dict).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

# Reasons a record is dropped, written to rejects.jsonl and counted in summaries. One vocabulary for prep and
# for the reader, so counts from both places add up.
REASONS = {
    "bad_json": "the record is not valid JSON or not an object",
    "missing_field": "a required field is absent or has the wrong type",
    "missing_image": "an image file named by the record does not exist",
    "undecodable_image": "an image file exists but cannot be decoded",
    "empty_turns": "no messages, or a message with no content",
    "malformed_turns": "unknown role, bad content part, or no assistant reply to learn from",
    "image_slot_mismatch": "the number of <image> slots differs from the number of images",
    "over_length": "longer than the maximum sequence length (image slots are never cut)",
    "mask_unbuildable": "the chat template gave no supervised tokens for this record",
    "duplicate_id": "another record already used this id",
    "corrupt_shard": "a tar shard is unreadable or ends early (the rest of that shard is skipped)",
}


class RecordError(ValueError):
    """A record that cannot be used. `reason` is a key of REASONS; `detail` says which field/what (never PHI)."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass
class Sample:
    """A record plus its images' raw bytes, as stored in one shard sample."""

    record: dict[str, Any]
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (extension, bytes) in slot order
    extra: dict[str, bytes] = field(default_factory=dict)  # more members, `{key}.{name}` (e.g. dcm.json for audits)


def text(t: str) -> dict:
    return {"type": "text", "text": t}


IMAGE_PART = {"type": "image"}


def _check_messages(msgs: Any, where: str, need_assistant: bool) -> int:
    """Validate a message list; return its number of image parts."""
    if not isinstance(msgs, list) or not msgs:
        raise RecordError("empty_turns", f"{where}: no messages")
    n_img = 0
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RecordError("malformed_turns", f"{where}[{i}].role: expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, list) or not content:
            raise RecordError("empty_turns", f"{where}[{i}].content: empty")
        has_text = False
        for j, p in enumerate(content):
            if p == IMAGE_PART:
                n_img += 1
            elif isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                has_text = has_text or bool(p["text"].strip())
            else:
                raise RecordError("malformed_turns", f"{where}[{i}].content[{j}]: not an image or text part")
        if m["role"] == "assistant" and not has_text:
            raise RecordError("empty_turns", f"{where}[{i}]: assistant turn without text")
    if need_assistant and not any(m["role"] == "assistant" for m in msgs):
        raise RecordError("malformed_turns", f"{where}: no assistant turn to learn from")
    return n_img


def validate_record(rec: Any, n_images: int) -> dict:
    """Check a canonical record against the schema above; raise RecordError naming the field."""
    if not isinstance(rec, dict):
        raise RecordError("bad_json", "record is not a JSON object")
    if not isinstance(rec.get("id"), str) or not rec["id"]:
        raise RecordError("missing_field", "id: missing or not a string")
    kind = rec.get("kind")
    if kind == "chat":
        # a GRPO prompt record may carry its ground truth as a field instead of a final assistant turn
        has_truth = any(rec.get(k) is not None for k in ("answer", "solution"))
        slots = _check_messages(rec.get("messages"), "messages", need_assistant=not has_truth)
    elif kind == "preference":
        slots = _check_messages(rec.get("prompt"), "prompt", need_assistant=False)
        for side in ("chosen", "rejected"):
            if _check_messages(rec.get(side), side, need_assistant=True):
                raise RecordError("image_slot_mismatch", f"{side}: images belong in the prompt")
    elif kind == "caption":
        if not isinstance(rec.get("caption"), str) or not rec["caption"].strip():
            raise RecordError("empty_turns", "caption: missing or empty")
        slots = 1
    else:
        raise RecordError("missing_field", f"kind: expected chat, preference or caption, got {kind!r}")
    if slots != n_images:
        raise RecordError("image_slot_mismatch", f"{slots} image slot(s) but {n_images} image(s)")
    return rec


def caption_messages(record: dict, prompt: str = "") -> list[dict]:
    """A caption pair as one exchange: user = the image (+ an optional instruction), assistant = the caption."""
    user = [IMAGE_PART] + ([text(prompt)] if prompt else [])
    return [{"role": "user", "content": user}, {"role": "assistant", "content": [text(record["caption"])]}]


def record_messages(record: dict, caption_prompt: str = "") -> list[dict] | tuple[list[dict], list[dict]]:
    """Messages to train on: a list for chat/caption; a (chosen, rejected) pair of full conversations for
    preference records (each = prompt + that side's assistant turns)."""
    kind = record["kind"]
    if kind == "chat":
        return record["messages"]
    if kind == "caption":
        return caption_messages(record, caption_prompt)
    return record["prompt"] + record["chosen"], record["prompt"] + record["rejected"]
