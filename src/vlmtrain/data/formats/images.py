"""Image references → original bytes, checked decodable at prep time so that training never meets a bad file.

Bytes are stored exactly as read (never re-encoded: no quality loss, no size growth). The member extension comes
from the source file name, lower-cased, `jpeg` → `jpg`; only when the name has no known image extension is it
taken from the format PIL detects, because the shard reader recognises image members by extension.
"""

from __future__ import annotations

import io
from pathlib import Path

from vlmtrain.data.encode import decode_image
from vlmtrain.data.formats.items import Draft, ImageRef, Reject
from vlmtrain.data.schema import IMAGE_EXTS, RecordError, Sample
from vlmtrain.errors import VlmtrainError

_EXT_ALIASES = {"jpeg": "jpg"}
_PIL_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}


def image_base(images: str | Path | None, source_file: str | Path) -> Path:
    """The folder relative image paths start from: `images` when given (it must exist: a typo there would
    otherwise turn every record into a missing_image reject), else the source file's folder."""
    if images is None:
        return Path(source_file).parent
    base = Path(images)
    if not base.is_dir():
        raise VlmtrainError(f"{base}: no such image folder")
    return base


def resolve_image(name, base: Path | None) -> ImageRef:
    """A source's image name → ImageRef: relative paths are taken under `base`; `file://` is a local path;
    http(s) URLs cannot be read offline and are refused when loaded (missing_image)."""
    if not isinstance(name, str) or not name.strip():
        raise RecordError("missing_field", "image: expected a file path string")
    if name.startswith(("http://", "https://")):
        return ImageRef(name)
    local = name[len("file://"):] if name.startswith("file://") else name
    p = Path(local)
    if not p.is_absolute() and base is not None:
        p = base / p
    return ImageRef(name, path=p)


def image_names(value, field: str) -> list:
    """A source's image field (absent, one name, or a list of names) as a list."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    raise RecordError("missing_field", f"{field}: expected a path or a list of paths")


def normalise_ext(ext: str) -> str | None:
    """`.JPEG` → `jpg`; None when it is not an image extension the shard reader knows."""
    e = ext.lower().lstrip(".")
    e = _EXT_ALIASES.get(e, e)
    return e if e in IMAGE_EXTS else None


def _detected_ext(data: bytes) -> str | None:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return _PIL_FORMATS.get(im.format or "")


def load_image(ref: ImageRef, where: str) -> tuple[str, bytes]:
    """(extension, original bytes) of one image; RecordError missing_image / undecodable_image."""
    data = ref.data
    if data is None:
        if ref.path is None:
            raise RecordError("missing_image", f"{where}: a remote URL; download the images first (img2dataset)")
        try:
            data = ref.path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise RecordError("missing_image", f"{where}: no such file") from None
        except OSError as e:
            raise RecordError("missing_image", f"{where}: cannot read ({e.strerror or type(e).__name__})") from None
    decode_image(data, where)
    ext = normalise_ext(Path(ref.name).suffix) or _detected_ext(data)
    if ext is None:
        raise RecordError("undecodable_image", f"{where}: not one of the image types {', '.join(IMAGE_EXTS)}")
    return ext, data


def load_draft(item: Draft | Reject) -> Sample | Reject:
    """Load a draft's images (a Reject passes through unchanged)."""
    if isinstance(item, Reject):
        return item
    try:
        images = [load_image(r, f"image {i} ({r.name})") for i, r in enumerate(item.images)]
    except RecordError as e:
        return Reject.of(item.record["id"], e, item.line)
    return Sample(item.record, images)
