"""Source files → numbered rows: JSON lists, JSONL and CSV, with one bad line costing one record, not the run.

Each reader returns `(total, rows)`: the number of records (known before writing starts, for the ETA) and an
iterator of `(index, line, obj)` where `obj` is a dict or a RecordError('bad_json') for an unusable line.
Whole-file problems (missing file, a JSON list that does not parse) are user errors raised before any output.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

from vlmtrain.data.formats.base import Row
from vlmtrain.data.schema import RecordError
from vlmtrain.errors import VlmtrainError

_BOM = b"\xef\xbb\xbf"


def _existing_file(path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise VlmtrainError(f"{p}: no such file")
    return p


def _first_byte(p: Path) -> bytes:
    with p.open("rb") as f:
        head = f.read(4096).removeprefix(_BOM)
    stripped = head.lstrip()
    return stripped[:1]


def read_json_rows(path) -> tuple[int, Iterator[Row]]:
    """A JSON list (`[{...}, ...]`, as LLaVA ships) or JSONL (one object per line), told apart by the first
    character. A JSON list is parsed whole; a JSONL file is streamed."""
    p = _existing_file(path)
    if _first_byte(p) == b"[":
        return _json_list(p)
    return _count_lines(p), _jsonl(p)


def _json_list(p: Path) -> tuple[int, Iterator[Row]]:
    try:
        data = json.loads(p.read_bytes().removeprefix(_BOM))
    except ValueError as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise VlmtrainError(f"{p}: not a valid JSON list{where}; JSONL needs one object per line") from None

    def rows() -> Iterator[Row]:
        for i, obj in enumerate(data):
            yield i, None, obj if isinstance(obj, dict) else RecordError("bad_json", f"[{i}]: not an object")

    return len(data), rows()


def _count_lines(p: Path) -> int:
    with p.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _jsonl(p: Path) -> Iterator[Row]:
    index = 0
    with p.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1:
                line = line.removeprefix(_BOM)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)  # bytes in: invalid UTF-8 is a ValueError like bad syntax
            except ValueError as e:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else "not valid UTF-8"
                obj = RecordError("bad_json", f"line {lineno}: {msg}")
            if not isinstance(obj, (dict, RecordError)):
                obj = RecordError("bad_json", f"line {lineno}: not a JSON object")
            yield index, lineno, obj
            index += 1


def read_csv_rows(path) -> tuple[int, Iterator[Row], list[str]]:
    """CSV rows as dicts keyed by the header, plus the header. Undecodable bytes reject that row (bad_json: the
    record cannot be parsed) instead of ending the run."""
    p = _existing_file(path)
    with p.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        total = sum(1 for row in reader if any(row))

    def rows() -> Iterator[Row]:
        with p.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            index = 0
            for row in reader:
                if not any(v for k, v in row.items() if k is not None):
                    continue
                line = reader.line_num
                if any(isinstance(v, str) and _has_surrogates(v) for v in row.values()):
                    yield index, line, RecordError("bad_json", f"line {line}: not valid UTF-8")
                else:
                    yield index, line, {k: v for k, v in row.items() if k is not None}
                index += 1

    return total, rows(), header


def _has_surrogates(s: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in s)
