"""The items a format reader yields: a `Draft` (a converted record with references to its images, `ImageRef`) or a
`Reject` (a dropped record, by id and reason). `base` (the pipeline) and `images` (loading a draft) both use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtrain.data.schema import RecordError


@dataclass
class Reject:
    """A dropped input record: its id, a REASONS key and a detail naming the field (never the record content)."""

    id: str
    reason: str
    detail: str = ""
    line: int | None = None  # 1-based line in the source file, where the source has lines

    @classmethod
    def of(cls, rid: str, err: RecordError, line: int | None = None) -> "Reject":
        return cls(rid, err.reason, err.detail, line)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"id": self.id, "reason": self.reason, "detail": self.detail}
        if self.line is not None:
            out["line"] = self.line
        return out


@dataclass
class ImageRef:
    """One image of a record: a file to read, or bytes already in memory (a member of a source tar).

    `path` and `data` both None means the source named something that cannot be read locally (a URL)."""

    name: str  # as the source wrote it: used in reject details and kept in the record's meta
    path: Path | None = None
    data: bytes | None = None


@dataclass
class Draft:
    """A converted, schema-valid record whose images are not loaded yet."""

    record: dict
    images: list[ImageRef]
    line: int | None = None
