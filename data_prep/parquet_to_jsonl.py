#!/usr/bin/env python
"""Hugging Face parquet (images embedded as {"bytes", "path"}) → JSONL + image files that `vlmtrain prep` reads.

    python data_prep/parquet_to_jsonl.py RLAIF-V-Dataset/*.parquet --out rlaif-v
    vlmtrain prep dpo --json rlaif-v/data.jsonl --images rlaif-v --out shards/rlaif-v

Every image column (a struct with `bytes`, or a list of them) is written to OUT/images/ with its original
bytes, and the row keeps the relative path in its place; other columns are copied as they are. Needs pyarrow.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

_PIL_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}


def _ext(data: bytes, name: str | None) -> str:
    """The original file's extension when the parquet kept its name, else the format PIL detects."""
    suffix = Path(name).suffix.lower().lstrip(".") if name else ""
    if suffix in ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"):
        return "jpg" if suffix == "jpeg" else suffix
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _PIL_EXT.get(im.format or "", "bin")
    except Exception:  # not an image PIL knows: keep the bytes, `prep` will report it as undecodable_image
        return "bin"


def _is_image(v) -> bool:
    return isinstance(v, dict) and isinstance(v.get("bytes"), (bytes, bytearray))


def _export_value(v, stem: str, images: Path):
    """An image struct (or list of them) → relative path(s) of the written file(s); anything else unchanged."""
    if _is_image(v):
        rel = f"images/{stem}.{_ext(v['bytes'], v.get('path'))}"
        (images.parent / rel).write_bytes(v["bytes"])
        return rel
    if isinstance(v, list) and v and all(_is_image(x) for x in v):
        return [_export_value(x, f"{stem}_{k}", images) for k, x in enumerate(v)]
    if isinstance(v, (bytes, bytearray)):
        return None  # raw bytes outside an image struct have no JSON form
    return v


def export(parquets: list[str], out: Path, batch_size: int = 256) -> int:
    """Write out/data.jsonl and out/images/; returns the number of rows."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit("error: this script needs pyarrow (pip install pyarrow)") from None
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    n = 0
    with (out / "data.jsonl").open("w", encoding="utf-8") as f:
        for path in parquets:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
                for row in batch.to_pylist():
                    stem = f"{n:09d}"
                    rec = {k: _export_value(v, stem if k == "image" else f"{stem}_{k}", images)
                           for k, v in row.items()}
                    f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
                    n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("parquet", nargs="+", help="parquet files, in order")
    p.add_argument("--out", required=True, type=Path, help="folder for data.jsonl and images/")
    args = p.parse_args(argv)
    n = export(args.parquet, args.out)
    print(f"wrote {n:,} rows to {args.out / 'data.jsonl'} (images under {args.out / 'images'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
