"""What every format reader shares: record ids, converting rows, and the image-loading pipeline (the items it
yields, `Reject` / `ImageRef` / `Draft`, are in `vlmtrain.data.formats.items`, which `images` imports too).

A reader runs in two steps so that the expensive part can run in parallel without reordering anything:

1. *convert* (sequential, cheap): raw source row → a canonical record plus references to its images
   (`Draft`), or a `Reject` when the row itself is unusable;
2. *load* (parallel threads, I/O and decoding): read every image's original bytes and check that it decodes
   (`images.load_draft`) → `Sample` or `Reject`.

`FormatSource.samples()` runs both and yields, per input record and in input order, a `Sample` or a `Reject`.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from vlmtrain.data.formats.images import load_draft
from vlmtrain.data.formats.items import Draft, ImageRef, Reject
from vlmtrain.data.schema import RecordError, Sample, validate_record

ID_POLICIES = ("source", "index")


Row = tuple[int, "int | None", Any]  # (record index, source line or None, parsed object or RecordError)
Converter = Callable[[dict], "tuple[dict, list[ImageRef]]"]


@dataclass
class FormatSource:
    """An opened input: its format name, the files read, the number of records when known (for the ETA),
    and warnings about the input as a whole (filled in while iterating, e.g. a truncated source tar)."""

    name: str
    inputs: list[str]
    drafts: Iterable["Draft | Reject"]
    total: int | None = None
    warnings: list[str] = field(default_factory=list)

    def samples(self, workers: int = 1) -> Iterator["Sample | Reject"]:
        """Per input record, in input order: a Sample (images loaded and checked decodable) or a Reject."""
        return ordered_map(load_draft, self.drafts, workers)


def assign_id(raw: dict, default: str, policy: str = "source") -> tuple[str, dict]:
    """The record's id and any meta it implies. `policy="index"` ignores source ids (for sources that reuse
    them for distinct records) and keeps the original under meta.source_id."""
    src = raw.get("id")
    if src is None or src == "":
        return default, {}
    if isinstance(src, bool) or not isinstance(src, (str, int)):
        raise RecordError("missing_field", "id: expected a string or an integer")
    if policy == "index":
        return default, {"source_id": str(src)}
    return str(src), {}


def convert_rows(fmt: str, rows: Iterable[Row], convert: Converter, ids: str = "source") -> Iterator[Draft | Reject]:
    """Drive a format's `convert(raw) -> (record body without id, image refs)` over parsed rows: assign ids, add
    `source`/`meta`, and validate against the schema before any image is read (cheap rejects first)."""
    if ids not in ID_POLICIES:
        raise ValueError(f"ids must be one of {ID_POLICIES}, got {ids!r}")
    for index, line, raw in rows:
        default = f"{fmt}-{index}"
        if isinstance(raw, RecordError):
            yield Reject.of(default, raw, line)
            continue
        try:
            rid, meta = assign_id(raw, default, ids)
        except RecordError as e:
            yield Reject.of(default, e, line)
            continue
        try:
            try:
                body, refs = convert(raw)
            except (TypeError, AttributeError, KeyError) as e:
                # Converters check types explicitly; this net keeps one oddly-typed record among millions from
                # ending the whole run, and still names what went wrong.
                raise RecordError("missing_field", f"unexpected field type ({type(e).__name__})") from None
            record = {"id": rid, **body, "source": fmt}
            if any(r.path is not None for r in refs):
                meta["images"] = [r.name for r in refs]
            if meta:
                record["meta"] = meta
            validate_record(record, len(refs))
        except RecordError as e:
            yield Reject.of(rid, e, line)
            continue
        yield Draft(record, refs, line)


def ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """`map(fn, items)` on a thread pool, results in input order, at most ~16 items per worker in flight (so a
    million-record source never sits in memory). Threads suffice: PIL releases the GIL while decoding."""
    if workers <= 1:
        yield from map(fn, items)
        return
    window = workers * 16
    with ThreadPoolExecutor(workers, thread_name_prefix="prep") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
