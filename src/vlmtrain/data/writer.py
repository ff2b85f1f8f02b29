"""Samples → WebDataset tar shards + `manifest.json` + `rejects.jsonl` (the end of `vlmtrain prep`).

    DIR/shard-000000.tar   {key}.json (canonical record, UTF-8) and {key}.img0.{ext}, {key}.img1.{ext}, ...
    DIR/manifest.json      counts, shards, length stats, a per-shard length index (written last: its presence
                           marks a finished run)
    DIR/rejects.jsonl      {"id", "reason", "detail", "line"?} per dropped record, never the record's content

Keys are the global sample index `f"{i:09d}"` (no dots, sorted = written order). Shards rotate after
`shard_size` samples or once a shard's payload reaches `shard_bytes`. Member mtimes are fixed, so the same input
gives byte-identical shards. Every record is validated again here, whatever reader produced it, and its length
is measured: in chat-template tokens (image slots included) when a tokenizer is given, else in characters.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

from vlmtrain import __version__, atomic
from vlmtrain.data.chat import MaskError
from vlmtrain.data.encode import record_token_length
from vlmtrain.data.formats.items import Reject
from vlmtrain.data.schema import RecordError, Sample, record_messages, validate_record
from vlmtrain.errors import VlmtrainError

MANIFEST_FORMAT = "vlmtrain-shards/1"
SHARD_PATTERN = "shard-%06d.tar"
_OWN_FILES = ("manifest.json", "manifest.json.tmp", "rejects.jsonl")


# ---- output folder -------------------------------------------------------------------------------------------

def check_out_dir(out: str | Path, overwrite: bool = False) -> list[Path]:
    """The files of an earlier run in `out` (a manifest, or shards an interrupted run left); refuses them
    unless `overwrite`. Changes nothing, so callers can fail fast before reading a large input."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VlmtrainError(f"{out}: exists and is not a folder")
    old = sorted(out.glob("shard-*.tar")) + [out / n for n in _OWN_FILES if (out / n).exists()]
    if old and not overwrite:
        what = "a manifest.json" if (out / "manifest.json").exists() else "shards of an unfinished run"
        raise VlmtrainError(f"{out}: already holds {what}; pass --overwrite to replace it")
    return old


def prepare_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Create `out` for a new run. With `overwrite`, an earlier run's files are removed: only those, never
    anything else a user keeps there."""
    for p in check_out_dir(out, overwrite):
        p.unlink()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


# ---- length measures -----------------------------------------------------------------------------------------

class CharLength:
    """Characters of all text in the training sequence (images count 0; for preferences, the longer side).

    An approximation for when no tokenizer is at hand: good for relative lengths and spotting outliers, not for
    packing budgets (tokens per character vary by tokenizer and language, and each image adds its slots)."""

    unit = "chars"

    def __call__(self, record: dict) -> int:
        msgs = record_messages(record)
        convs = msgs if isinstance(msgs, tuple) else (msgs,)
        return max(sum(len(p["text"]) for m in conv for p in m["content"] if p.get("type") == "text")
                   for conv in convs)


class TokenLength:
    """Tokens of the training sequence as the model's chat template and image slots make it (what the loader
    will see). Records over `max_len` are over_length; templates that supervise nothing are mask_unbuildable."""

    unit = "tokens"

    def __init__(self, tokenizer, image_token_id: int, num_image_tokens: int, max_len: int | None = None):
        self.tokenizer, self.image_token_id, self.num_image_tokens = tokenizer, image_token_id, num_image_tokens
        self.max_len = max_len

    def __call__(self, record: dict) -> int:
        try:
            n = record_token_length(self.tokenizer, record, self.image_token_id, self.num_image_tokens)
        except MaskError as e:
            raise RecordError("mask_unbuildable", str(e)) from None
        if self.max_len is not None and n > self.max_len:
            raise RecordError("over_length", f"{n} tokens > max_len {self.max_len}")
        return n


# ---- statistics ----------------------------------------------------------------------------------------------

def _summary(values: list[int]) -> dict:
    """min/mean/p50/p95/max (nearest-rank percentiles); empty dict for no values."""
    if not values:
        return {}
    s = sorted(values)

    def pct(q: float) -> int:
        return s[max(0, math.ceil(q / 100 * len(s)) - 1)]

    return {"min": s[0], "mean": round(sum(s) / len(s), 2), "p50": pct(50), "p95": pct(95), "max": s[-1]}


# ---- writer --------------------------------------------------------------------------------------------------

class ShardSetWriter:
    """Write samples into rotating tar shards and count everything; `close()` writes the manifest.

    `progress(done=, kept=, rejected=)` is called after every input record (the caller rate-limits output)."""

    def __init__(self, out: str | Path, source_format: str, measure: Callable[[dict], int] | None = None,
                 shard_size: int = 1000, shard_bytes: int = 10**9, progress: Callable | None = None):
        if shard_size < 1 or shard_bytes < 1:
            raise VlmtrainError("shard size and shard bytes must be at least 1")
        self.out, self.source_format = Path(out), source_format
        self.measure = measure or CharLength()
        self.shard_size, self.shard_bytes, self.progress = shard_size, int(shard_bytes), progress
        self.input_records = self.samples = 0
        self.rejected_by_reason: Counter = Counter()
        self.kinds: Counter = Counter()
        self.lengths: list[int] = []
        self.images_per_sample: list[int] = []
        self.length_index: dict[str, list[int]] = {}
        self.shard_bytes_written: dict[str, int] = {}
        self._seen_ids: set[str] = set()
        self._shards = None  # opened at the first kept sample, so a run that keeps nothing leaves no empty tar
        self._rejects = (self.out / "rejects.jsonl").open("w", encoding="utf-8")

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    def add(self, item: Sample | Reject) -> bool:
        """Take one input record's outcome; True when it was written."""
        self.input_records += 1
        try:
            kept = self._add(item)
        finally:
            if self.progress is not None:
                self.progress(done=self.input_records, kept=self.samples, rejected=self.rejected)
        return kept

    def _add(self, item: Sample | Reject) -> bool:
        rid = item.id if isinstance(item, Reject) else item.record.get("id")
        # An id is claimed by the first record that carries it, kept or not: "another record already used it".
        if isinstance(rid, str) and rid in self._seen_ids:
            self._reject(Reject(rid, "duplicate_id", "an earlier record has this id",
                                item.line if isinstance(item, Reject) else None))
            return False
        if isinstance(rid, str):
            self._seen_ids.add(rid)
        if isinstance(item, Reject):
            self._reject(item)
            return False
        try:
            validate_record(item.record, len(item.images))
            length = self.measure(item.record)
        except RecordError as e:
            self._reject(Reject.of(str(rid), e))
            return False
        self._write(item, length)
        return True

    def _reject(self, r: Reject) -> None:
        self.rejected_by_reason[r.reason] += 1
        self._rejects.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")

    def _write(self, s: Sample, length: int) -> None:
        if self._shards is None:
            import webdataset as wds  # imports torch: only pay for it when something is written

            pattern = str(self.out).replace("%", "%%") + "/" + SHARD_PATTERN
            self._shards = wds.ShardWriter(pattern, maxcount=self.shard_size, maxsize=self.shard_bytes,
                                           post=self._shard_done, verbose=0, encoder=False, mtime=0)
        obj = {"__key__": f"{self.samples:09d}",
               "json": json.dumps(s.record, ensure_ascii=False).encode("utf-8")}
        for i, (ext, data) in enumerate(s.images):
            obj[f"img{i}.{ext}"] = data
        obj.update(s.extra)
        self._shards.write(obj)
        self.length_index.setdefault(Path(self._shards.fname).name, []).append(length)
        self.samples += 1
        self.kinds[s.record["kind"]] += 1
        self.lengths.append(length)
        self.images_per_sample.append(len(s.images))

    def _shard_done(self, fname: str) -> None:
        self.shard_bytes_written[Path(fname).name] = os.path.getsize(fname)

    def close(self, extra: dict | None = None) -> dict:
        """Finish the last shard, write manifest.json (atomically, last) and return it."""
        if self._shards is not None:
            self._shards.close()
            self._shards = None
        self._rejects.close()
        manifest = self.manifest(extra)
        atomic.write_text(self.out / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
        return manifest

    def manifest(self, extra: dict | None = None) -> dict:
        shards = [{"name": n, "samples": len(lengths), "bytes": self.shard_bytes_written.get(n, 0)}
                  for n, lengths in self.length_index.items()]
        ips = self.images_per_sample
        return {
            "format": MANIFEST_FORMAT,
            "source_format": self.source_format,
            "input_records": self.input_records,
            "samples": self.samples,
            "rejected": self.rejected,
            "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
            "kinds": dict(sorted(self.kinds.items())),
            "shards": shards,
            "stats": {
                "length": _summary(self.lengths),
                "images_per_sample": {**_summary(ips), "total": sum(ips),
                                      "histogram": {str(k): v for k, v in sorted(Counter(ips).items())}},
            },
            "length_unit": self.measure.unit,
            "length_index": self.length_index,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "vlmtrain_version": __version__,
            **(extra or {}),
        }

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._shards is not None:  # an interrupted run: close the tar cleanly but write no manifest
            self._shards.close()
            self._shards = None
        if not self._rejects.closed:
            self._rejects.close()


def write_shards(items: Iterable[Sample | Reject], out: str | Path, source_format: str, *,
                 measure: Callable[[dict], int] | None = None, shard_size: int = 1000, shard_bytes: int = 10**9,
                 overwrite: bool = False, progress: Callable | None = None, extra: dict | None = None) -> dict:
    """Write every item into shards under `out` and return the manifest (also written to out/manifest.json)."""
    out = prepare_out_dir(out, overwrite)
    with ShardSetWriter(out, source_format, measure, shard_size, shard_bytes, progress) as w:
        for item in items:
            w.add(item)
        return w.close(extra)
