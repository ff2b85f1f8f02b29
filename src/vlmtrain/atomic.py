"""Files and folders that appear whole or not at all: the one place for vlmtrain's temporary-file-plus-rename writes.

A reader (or a run resumed after a kill at any moment) sees either the old content under a name or the new one,
never part of either: the bytes go to a sibling first (`<name>.tmp` for a file, a hidden `mkdtemp` folder for a
directory), are flushed to disk, and `os.replace` renames them over the name (atomic within one file system).

This module sits below every package (it imports nothing of vlmtrain) so that data, train, privacy and fed writers
all use it. Checkpoint rotation (`last.ckpt` → `last.ckpt.prev`, `train.checkpoint_io.rotate_in`) keeps a previous
copy on purpose and stays there; it is built from the same renames.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def tmp_path(path: str | Path) -> Path:
    """The sibling a file is written to before it is renamed over `path`: `<name>.tmp`."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


@contextmanager
def replacing(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """`with replacing(p, "wb") as f:` write f; on a clean exit f is fsynced and renamed over `p`. On an error
    the temporary file is removed and `p` keeps its old content."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """`path` holds `text` (UTF-8) or its old content, never part of either."""
    with replacing(path) as f:
        f.write(text)


def write_json(path: str | Path, obj, **dump_kw) -> None:
    """`path` holds `json.dumps(obj, **dump_kw)` or its old content, never part of either."""
    write_text(path, json.dumps(obj, **dump_kw))


def swap_dir(staging: str | Path, final: str | Path) -> None:
    """Rename the finished folder `staging` to `final`, replacing a previous `final` whole (none of its files
    survive). A rename cannot replace a non-empty folder, so the old one is first renamed aside
    (`.NAME.replaced-PID`) and removed after: a kill in between leaves the new folder in place and the old one
    aside, which the writer's next run may clean up."""
    staging, final = Path(staging), Path(final)
    if final.exists():
        old = final.parent / f".{final.name}.replaced-{os.getpid()}"
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)


@contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """`with staged_dir(d) as tmp:` fill the folder tmp (a hidden sibling of d); on a clean exit it replaces d
    whole (`swap_dir`). On an error, or a kill, no half folder ever carries d's name."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        swap_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
