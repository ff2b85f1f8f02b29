"""Datasets made by the code from data that ships in packages, so demos and tests never download anything.

`digits-*`: scikit-learn's 1,797 handwritten digit scans (8×8, upscaled to 32 px PNG), split once with a fixed
seed into 1,497 train and 300 held-out images:

- `digits-captions` (train): caption pairs "a handwritten seven" (alignment);
- `digits-qa` (train): "What digit is this?" → "seven" conversations (instruction SFT);
- `digits-pref` (train): the same question with the right answer chosen over a wrong one (DPO);
- `digits-eval` (held-out): QA conversations with `meta.choices` = the ten digit words (VQA + multiple choice).

The medical builtins (`medical-samples`, the `medical-cohort*` sets) are made by the privacy gate, which sits above
data: `vlmtrain.train.sources.prepare_builtin` hands their makers to `prepare_builtin` here (`makers`), which keeps
the one cache for every builtin.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

import vlmtrain
from vlmtrain import atomic
from vlmtrain.data.schema import IMAGE_PART, Sample, text
from vlmtrain.data.writer import write_shards
from vlmtrain.errors import VlmtrainError

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
QUESTION = "What digit is this?"
HELD_OUT = 300


def _digits(split: str) -> Iterator[tuple[int, bytes, int]]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.images))
    idx = order[:HELD_OUT] if split == "eval" else order[HELD_OUT:]
    for i in idx:
        im = Image.fromarray((d.images[i] * (255 / 16)).astype(np.uint8), "L").resize((32, 32), Image.BILINEAR)
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
        yield int(i), buf.getvalue(), int(d.target[i])


def _question() -> list[dict]:
    return [{"role": "user", "content": [IMAGE_PART, text(QUESTION)]}]


def _captions() -> Iterator[Sample]:
    for i, png, y in _digits("train"):
        yield Sample({"id": f"digit-{i}", "kind": "caption", "caption": f"a handwritten {WORDS[y]}"}, [("png", png)])


def _qa(split: str) -> Iterator[Sample]:
    for i, png, y in _digits(split):
        rec = {"id": f"digit-{i}", "kind": "chat",
               "messages": _question() + [{"role": "assistant", "content": [text(WORDS[y])]}]}
        if split == "eval":
            rec["meta"] = {"choices": WORDS}
        yield Sample(rec, [("png", png)])


def _pref() -> Iterator[Sample]:
    rng = np.random.default_rng(1)
    for i, png, y in _digits("train"):
        wrong = WORDS[(y + int(rng.integers(1, 10))) % 10]
        rec = {"id": f"digit-{i}", "kind": "preference", "prompt": _question(),
               "chosen": [{"role": "assistant", "content": [text(WORDS[y])]}],
               "rejected": [{"role": "assistant", "content": [text(wrong)]}]}
        yield Sample(rec, [("png", png)])


BUILTINS: dict[str, tuple[Callable[[], Iterator[Sample]], int]] = {
    "digits-captions": (_captions, 250),
    "digits-qa": (lambda: _qa("train"), 250),
    "digits-pref": (_pref, 250),
    "digits-eval": (lambda: _qa("eval"), 150),
}


# A builtin made outside data (the medical sets): writes `root/name` and returns it.
Maker = Callable[[Path], Path]


def prepare_builtin(name: str, root: str | Path, makers: Mapping[str, Maker] | None = None) -> Path:
    """Write the dataset's shards under `root/name` once; later calls reuse them. `makers`: the builtins made above
    data (name → maker), offered beside `BUILTINS`.

    With `VLMTRAIN_BUILTIN_CACHE=DIR` set, each dataset is made once per machine: the first run writes it to
    `root/name` and copies it into DIR; later runs (any `root`) copy it from there instead of making it again
    (digits: ~8 s of CPU each; medical samples: the privacy gate's OCR). Entries are keyed by a fingerprint of the
    code that makes them, so an upgrade never reuses a stale copy.
    """
    out = Path(root) / name
    if _complete(out):
        return out
    cache = os.environ.get("VLMTRAIN_BUILTIN_CACHE")
    if not cache:
        return _make_builtin(name, Path(root), makers)
    for needed in _PREREQUISITES.get(name, ()):  # the run folder holds what making it would have left there
        prepare_builtin(needed, root, makers)
    entry = Path(cache) / f"{name}-{_maker_fingerprint()}"
    folders = [f"{name}{suffix}" for suffix in _COMPANIONS.get(name, ())] + [name]  # the shard folder last
    if not _complete(entry / name):
        made = _make_builtin(name, Path(root), makers)
        _store(Path(root), folders, entry)
        return made
    for folder in folders:
        _copy_atomically(entry / folder, Path(root) / folder)
    return out


# What making a builtin leaves in the data folder besides its shards, and which builtins it makes first there: a
# copy from the cache must leave the same folders (the gate's privacy_report.json of medical-samples, its -src set).
_COMPANIONS = {"medical-samples": ("-src",)}
_PREREQUISITES = {"medical-cohort": ("medical-samples",), "medical-cohort-holdout": ("medical-samples",),
                  "medical-cohort-public": ("medical-samples",)}


def _complete(folder: Path) -> bool:
    man = folder / "manifest.json"
    return man.is_file() and bool(json.loads(man.read_text()).get("samples"))


def _store(root: Path, folders: list[str], entry: Path) -> None:
    """Copy `folders` of `root` into a new cache entry, renamed into place whole: readers see a complete entry or
    none. An entry another process stored first (same bytes) is kept, and ours dropped."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        for folder in folders:
            shutil.copytree(root / folder, tmp / folder)
        if entry.exists() and not _complete(entry / folders[-1]):  # an interrupted earlier store
            shutil.rmtree(entry)
        try:
            os.replace(tmp, entry)
        except OSError:  # a complete entry is already there (stored by another process meanwhile): keep it
            if not _complete(entry / folders[-1]):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_atomically(src: Path, dst: Path) -> None:
    """Copy a folder of a cache entry beside `dst`, then rename it into place (replacing an interrupted earlier
    attempt): a kill mid-copy leaves no half folder behind a valid name. Plain copies, not hard links: a later
    rewrite of one side must never change the other."""
    with atomic.staged_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def _maker_fingerprint() -> str:
    """sha256 (12 hex) over the source of the data and privacy packages: everything that shapes a builtin's bytes
    (the medical makers live in privacy; `train.sources` only picks which maker runs)."""
    h = hashlib.sha256(vlmtrain.__version__.encode())
    pkg = Path(vlmtrain.__file__).parent
    for f in sorted([*(pkg / "data").rglob("*.py"), *(pkg / "privacy").rglob("*.py")]):
        h.update(f.relative_to(pkg).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def _make_builtin(name: str, root: Path, makers: Mapping[str, Maker] | None = None) -> Path:
    makers = makers or {}
    if name in makers:
        return makers[name](root)
    if name not in BUILTINS:
        raise VlmtrainError(f"data: unknown builtin dataset {name!r} "
                            f"(choose from: {', '.join([*BUILTINS, *makers])})")
    out = root / name
    make, per_shard = BUILTINS[name]
    write_shards(make(), out, f"builtin:{name}", shard_size=per_shard, overwrite=True)
    return out
