"""LLaVA conversation files (LLaVA-Pretrain 558K, LLaVA-Instruct/mix665K, ShareGPT4V) → chat records.

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",       # or a list, or absent (text-only)
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

`human` → user, `gpt` → assistant, `system` → system; image paths are relative to `--images`.
"""

from __future__ import annotations

from pathlib import Path

from vlmtrain.data.formats.base import FormatSource, convert_rows
from vlmtrain.data.formats.images import image_base, image_names, resolve_image
from vlmtrain.data.formats.rows import read_json_rows
from vlmtrain.data.formats.turns import parse_turns, place_images
from vlmtrain.data.schema import RecordError


def convert_llava(raw: dict, base: Path | None) -> tuple[dict, list]:
    """One LLaVA record → (chat record body, image refs)."""
    if "conversations" not in raw:
        raise RecordError("missing_field", "conversations: missing")
    refs = [resolve_image(n, base) for n in image_names(raw.get("image"), "image")]
    messages = place_images(parse_turns(raw["conversations"], "conversations"), len(refs), "conversations")
    return {"kind": "chat", "messages": messages}, refs


def read_llava(path: str | Path, images: str | Path | None = None, ids: str = "source") -> FormatSource:
    """Open a LLaVA JSON list or JSONL file; image paths resolve under `images` (default: the file's folder)."""
    base = image_base(images, path)
    total, rows = read_json_rows(path)
    drafts = convert_rows("llava", rows, lambda raw: convert_llava(raw, base), ids)
    return FormatSource("llava", [str(path)], drafts, total)
