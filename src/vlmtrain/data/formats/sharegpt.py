"""OpenAI-style message records (and ShareGPT `conversations`) → chat records. Alias: `messages`.

    {"id": "x", "images": ["a.jpg", "b.jpg"],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                                {"type": "image"}]},
                  {"role": "assistant", "content": "The first is brighter."}]}

String content may carry `<image>` placeholders instead of image parts; `conversations` with `from`/`value` and
a single `image` are accepted too. Images map to slots in order of appearance.
"""

from __future__ import annotations

from pathlib import Path

from vlmtrain.data.formats.base import FormatSource, convert_rows
from vlmtrain.data.formats.images import image_base, image_names, resolve_image
from vlmtrain.data.formats.rows import read_json_rows
from vlmtrain.data.formats.turns import parse_turns, place_images
from vlmtrain.data.schema import RecordError


def convert_messages(raw: dict, base: Path | None) -> tuple[dict, list]:
    """One messages/ShareGPT record → (chat record body, image refs)."""
    field = "messages" if "messages" in raw else "conversations" if "conversations" in raw else None
    if field is None:
        raise RecordError("missing_field", "messages: missing (or conversations)")
    names = image_names(raw["images"] if "images" in raw else raw.get("image"), "images")
    refs = [resolve_image(n, base) for n in names]
    messages = place_images(parse_turns(raw[field], field), len(refs), field)
    return {"kind": "chat", "messages": messages}, refs


def read_sharegpt(path: str | Path, images: str | Path | None = None, ids: str = "source") -> FormatSource:
    """Open a messages JSON list or JSONL file; image paths resolve under `images` (default: the file's folder)."""
    base = image_base(images, path)
    total, rows = read_json_rows(path)
    drafts = convert_rows("sharegpt", rows, lambda raw: convert_messages(raw, base), ids)
    return FormatSource("sharegpt", [str(path)], drafts, total)
