"""Public VLM data formats → canonical records (see `vlmtrain.data.schema`), one module per format.

Each `read_*` opens its input (file-level problems raise VlmtrainError before anything is written) and returns a
`FormatSource`; `source.samples(workers)` yields, per input record and in input order, a `Sample` (record + the
original image bytes, checked decodable) or a `Reject` (id, reason from schema.REASONS, detail, line).

    source = read_format("llava", path="llava_v1_5_mix665k.json", images="data/")
    for item in source.samples(workers=8): ...
"""

from __future__ import annotations

from vlmtrain.data.formats.base import ID_POLICIES, FormatSource
from vlmtrain.data.formats.captions import read_captions
from vlmtrain.data.formats.dpo import read_dpo
from vlmtrain.data.formats.items import Draft, ImageRef, Reject
from vlmtrain.data.formats.llava import read_llava
from vlmtrain.data.formats.sharegpt import read_sharegpt

# name → reader; `messages` is an alias of `sharegpt` (same reader, and the manifest names the canonical one).
FORMATS = {
    "llava": read_llava,
    "sharegpt": read_sharegpt,
    "messages": read_sharegpt,
    "captions": read_captions,
    "dpo": read_dpo,
}


def read_format(name: str, **options) -> FormatSource:
    """Open an input in format `name` with that reader's keyword options."""
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name](**options)


__all__ = ["FORMATS", "ID_POLICIES", "Draft", "FormatSource", "ImageRef", "Reject", "read_captions", "read_dpo",
           "read_format", "read_llava", "read_sharegpt"]
