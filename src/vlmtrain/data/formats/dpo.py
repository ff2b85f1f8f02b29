"""Preference pairs (RLAIF-V, VLFeedback-derived, TRL-style) → preference records.

    {"id": "x", "image": "a.jpg",                      # or a list (`images` too), or absent (text-only)
     "prompt": "<image>\\nWhat is unusual here?",      # or "question"; or a list of messages
     "chosen": "A cat rides a bike.",                  # or a list of assistant messages
     "rejected": "Nothing is unusual."}

Images belong to the prompt: with no placeholder they go to the start of its first user turn.
"""

from __future__ import annotations

from pathlib import Path

from vlmtrain.data.formats.base import FormatSource, convert_rows
from vlmtrain.data.formats.images import image_base, image_names, resolve_image
from vlmtrain.data.formats.rows import read_json_rows
from vlmtrain.data.formats.turns import parse_content, parse_turns, place_images
from vlmtrain.data.schema import RecordError


def _side(value, field: str, role: str) -> list[dict]:
    """A prompt or answer given as a plain string (one `role` turn) or as a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": parse_content(value, field)}]
    if isinstance(value, list):
        return parse_turns(value, field)
    raise RecordError("missing_field", f"{field}: expected a string or a list of messages")


def convert_preference(raw: dict, base: Path | None) -> tuple[dict, list]:
    """One preference record → (preference record body, image refs)."""
    key = "prompt" if "prompt" in raw else "question" if "question" in raw else None
    if key is None:
        raise RecordError("missing_field", "prompt: missing (or question)")
    for side in ("chosen", "rejected"):
        if side not in raw:
            raise RecordError("missing_field", f"{side}: missing")
    names = image_names(raw["images"] if "images" in raw else raw.get("image"), "image")
    refs = [resolve_image(n, base) for n in names]
    prompt = place_images(_side(raw[key], key, "user"), len(refs), key)
    body = {"kind": "preference", "prompt": prompt,
            "chosen": _side(raw["chosen"], "chosen", "assistant"),
            "rejected": _side(raw["rejected"], "rejected", "assistant")}
    return body, refs


def read_dpo(path: str | Path, images: str | Path | None = None, ids: str = "source") -> FormatSource:
    """Open a preference JSON list or JSONL file; image paths resolve under `images` (default: its folder)."""
    base = image_base(images, path)
    total, rows = read_json_rows(path)
    drafts = convert_rows("dpo", rows, lambda raw: convert_preference(raw, base), ids)
    return FormatSource("dpo", [str(path)], drafts, total)
