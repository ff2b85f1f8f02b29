"""Image–caption pairs → caption records, from img2dataset tar shards or from a CSV/JSONL table.

- img2dataset output (`--src DIR | TAR | GLOB | {00000..00009}.tar`): each key has `.jpg` (or `.png`/`.webp`)
  and `.txt` (the caption; `.json`'s "caption" is the fallback); the key is the id.
- a table (`--csv FILE` / `--jsonl FILE`): an image column (`image`, else `filepath`, `url`, `path`) and a
  caption column (`caption`, else `text`); ids from `id` or `key` when present.
"""

from __future__ import annotations

import glob
import json
import tarfile
from pathlib import Path
from typing import Iterator

from braceexpand import braceexpand

from vlmtrain.data.formats.base import FormatSource, Row, convert_rows
from vlmtrain.data.formats.images import image_base, normalise_ext, resolve_image
from vlmtrain.data.formats.items import ImageRef
from vlmtrain.data.formats.rows import read_csv_rows, read_json_rows
from vlmtrain.data.formats.turns import PLACEHOLDER
from vlmtrain.data.schema import RecordError
from vlmtrain.errors import VlmtrainError

IMAGE_COLUMNS = ("image", "filepath", "url", "path")
CAPTION_COLUMNS = ("caption", "text")


def caption_body(caption) -> dict:
    """A caption record body; the caption must be non-empty text without an image placeholder (the record's one
    image is implicit, and a literal `<image>` would tokenize as a second slot)."""
    if not isinstance(caption, str) or not caption.strip():
        raise RecordError("empty_turns" if isinstance(caption, str) else "missing_field", "caption: missing or empty")
    if PLACEHOLDER in caption:
        raise RecordError("image_slot_mismatch", "caption: contains <image>; a caption has exactly one image")
    return {"kind": "caption", "caption": caption.strip()}


# ---- tables --------------------------------------------------------------------------------------------------

def _pick(columns: list[str], explicit: str | None, candidates: tuple[str, ...], what: str, where: str) -> str:
    """The table column holding `what`: the one named on the command line, else the first known name present."""
    if explicit is not None:
        if explicit not in columns:
            raise VlmtrainError(f"{where}: no {what} column {explicit!r} (columns: {_shown(columns)})")
        return explicit
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        raise VlmtrainError(f"{where}: no {what} column; expected one of {', '.join(candidates)} "
                            f"(columns: {_shown(columns)}); name it with --{what}-col")
    return found


def _shown(columns: list[str]) -> str:
    """The header for an error message, short even when the file is not really a CSV."""
    names = [c if len(c) <= 24 else c[:21] + "..." for c in columns[:8]]
    return ", ".join(names) + (f", ... ({len(columns)} in all)" if len(columns) > 8 else "")


def _table_converter(image_cols: tuple[str, ...], caption_cols: tuple[str, ...], base: Path | None):
    """Rows → caption drafts, each field taken from the first of its candidate columns that the row has."""
    def first(raw: dict, cols: tuple[str, ...]):
        """The first non-empty value; else "" when a column is present but empty (→ empty caption); else None."""
        present = [raw[c] for c in cols if raw.get(c) is not None]
        return next((v for v in present if v != ""), present[0] if present else None)

    def convert(raw: dict) -> tuple[dict, list]:
        name = first(raw, image_cols)
        if name in (None, ""):
            raise RecordError("missing_field", f"{'/'.join(image_cols)}: missing")
        return caption_body(first(raw, caption_cols)), [resolve_image(name, base)]

    return convert


def _with_ids(rows: Iterator[Row]) -> Iterator[Row]:
    """Table rows whose id lives in a `key` column (img2dataset's name for it): expose it as `id` for the shared
    id rules."""
    for index, line, raw in rows:
        if isinstance(raw, dict) and raw.get("id") in (None, "") and raw.get("key") not in (None, ""):
            raw = {**raw, "id": raw["key"]}
        yield index, line, raw


def read_caption_table(path: str | Path, table: str = "csv", images: str | Path | None = None,
                       image_col: str | None = None, caption_col: str | None = None,
                       ids: str = "source") -> FormatSource:
    """Open a caption table, `table="csv"` (with a header row) or `"jsonl"` (JSONL or a JSON list); image paths
    resolve under `images` (default: the table's folder)."""
    p = Path(path)
    base = image_base(images, p)
    if table == "csv":
        total, rows, columns = read_csv_rows(p)
        # A header names the columns once: resolve them now, so a wrong name is one error, not a reject per row.
        icols = (_pick(columns, image_col, IMAGE_COLUMNS, "image", str(p)),)
        ccols = (_pick(columns, caption_col, CAPTION_COLUMNS, "caption", str(p)),)
    else:
        total, rows = read_json_rows(p)
        icols = (image_col,) if image_col else IMAGE_COLUMNS
        ccols = (caption_col,) if caption_col else CAPTION_COLUMNS
    drafts = convert_rows("captions", _with_ids(rows), _table_converter(icols, ccols, base), ids)
    return FormatSource("captions", [str(p)], drafts, total)


# ---- img2dataset tar shards ----------------------------------------------------------------------------------

def find_tars(src: str | Path) -> list[Path]:
    """A folder (its *.tar), one tar, a glob, or a brace list → sorted tar paths."""
    s = str(src)
    p = Path(s)
    if p.is_dir():
        tars = sorted(p.glob("*.tar"))
    elif p.is_file():
        tars = [p]
    else:
        tars = sorted({Path(m) for pattern in braceexpand(s) for m in glob.glob(pattern)})
    if not tars:
        raise VlmtrainError(f"{src}: no tar shards found (expected a folder of *.tar, a tar file or a glob)")
    return tars


def _stats_total(tars: list[Path]) -> int | None:
    """img2dataset writes `NNNNN_stats.json` beside `NNNNN.tar` with its `successes`: their sum is the number
    of samples, which gives the progress line an ETA. None when any is missing."""
    total = 0
    for t in tars:
        stats = t.with_name(t.stem + "_stats.json")
        try:
            total += int(json.loads(stats.read_text())["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return total


def _tar_groups(tar: Path, warnings: list[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, WebDataset convention: the key is the member path up to the first dot of
    its file name. A tar that ends early keeps what was read and adds a warning (its lost records are unknown,
    so they cannot be counted as rejects)."""
    key, group = None, {}
    try:
        with tarfile.open(tar, "r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                folder, _, fname = m.name.rpartition("/")
                stem, dot, ext = fname.partition(".")
                if not dot or fname.startswith("."):
                    continue
                k = f"{folder}/{stem}" if folder else stem
                if k != key and key is not None:
                    yield key, group
                    group = {}
                key = k
                group[ext.lower()] = tf.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        warnings.append(f"{tar}: unreadable after {key or 'the start'} ({type(e).__name__}); rest skipped")
        return
    if key is not None:
        yield key, group


def _tar_rows(tars: list[Path], warnings: list[str]) -> Iterator[Row]:
    index = 0
    for tar in tars:
        for key, group in _tar_groups(tar, warnings):
            yield index, None, {"id": key, "__members__": group, "__tar__": tar.name}
            index += 1


def _convert_member(raw: dict) -> tuple[dict, list]:
    group = raw["__members__"]
    img_ext = next((e for e in group if normalise_ext(e)), None)
    if img_ext is None:
        raise RecordError("missing_image", f"{raw['__tar__']}:{raw['id']}: no image member")
    if "txt" in group:
        try:
            caption = group["txt"].decode("utf-8")
        except UnicodeDecodeError:
            raise RecordError("bad_json", f"{raw['__tar__']}:{raw['id']}.txt: not valid UTF-8") from None
    else:
        try:
            meta = json.loads(group.get("json", b"{}"))
        except ValueError:
            raise RecordError("bad_json", f"{raw['__tar__']}:{raw['id']}.json: not valid JSON") from None
        caption = meta.get("caption") if isinstance(meta, dict) else None
    return caption_body(caption), [ImageRef(f"{raw['id']}.{img_ext}", data=group[img_ext])]


def read_caption_tars(src: str | Path, ids: str = "source") -> FormatSource:
    """Open img2dataset output shards."""
    tars = find_tars(src)
    source = FormatSource("captions", [str(t) for t in tars], [], _stats_total(tars))
    source.drafts = convert_rows("captions", _tar_rows(tars, source.warnings), _convert_member, ids)
    return source


def read_captions(src: str | Path | None = None, csv: str | Path | None = None, jsonl: str | Path | None = None,
                  images: str | Path | None = None, image_col: str | None = None, caption_col: str | None = None,
                  ids: str = "source") -> FormatSource:
    """Exactly one of `src` (img2dataset tars), `csv` or `jsonl` (a caption table)."""
    given = [x for x in (src, csv, jsonl) if x is not None]
    if len(given) != 1:
        raise VlmtrainError("captions: give exactly one of --src, --csv, --jsonl")
    if src is not None:
        return read_caption_tars(src, ids)
    if csv is not None:
        return read_caption_table(csv, "csv", images, image_col, caption_col, ids)
    return read_caption_table(jsonl, "jsonl", images, image_col, caption_col, ids)
