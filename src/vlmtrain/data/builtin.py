"""Datasets made by the code from data that ships in packages, so demos and tests never download anything.

`digits-*`: scikit-learn's 1,797 handwritten digit scans (8×8, upscaled to 32 px PNG), split once with a fixed
seed into 1,497 train and 300 held-out images:

- `digits-captions` (train): caption pairs "a handwritten seven" (alignment);
- `digits-qa` (train): "What digit is this?" → "seven" conversations (instruction SFT);
- `digits-pref` (train): the same question with the right answer chosen over a wrong one (DPO);
- `digits-eval` (held-out): QA conversations with `meta.choices` = the ten digit words (VQA + multiple choice).

`medical-samples`: pydicom-data and scikit-image medical images with synthetic reports, passed through the privacy
gate (`vlmtrain.privacy.medical_samples`). `medical-cohort` (400 records), `medical-cohort-holdout` (200) and
`medical-cohort-public` (2,000): the gated images with new PHI-free synthetic reports, for DP training and its
audit (`vlmtrain.privacy.medical_cohort`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from vlmtrain.data.schema import IMAGE_PART, Sample, text
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


def prepare_builtin(name: str, root: str | Path) -> Path:
    """Write the dataset's shards under `root/name` once; later calls reuse them."""
    from vlmtrain.data.writer import write_shards

    if name == "medical-samples":  # radiographs/CT/MR/US + retina/histology through the privacy gate
        from vlmtrain.privacy.medical_samples import prepare_medical_builtin

        return prepare_medical_builtin(root)
    from vlmtrain.privacy.medical_cohort import SIZES as COHORTS

    if name in COHORTS:  # synthetic reports on the gated images (DP training and its audit)
        from vlmtrain.privacy.medical_cohort import prepare_cohort_builtin

        return prepare_cohort_builtin(root, name)
    if name not in BUILTINS:
        raise VlmtrainError(f"data: unknown builtin dataset {name!r} "
                            f"(choose from: {', '.join([*BUILTINS, 'medical-samples', *COHORTS])})")
    out = Path(root) / name
    man = out / "manifest.json"
    if man.is_file() and json.loads(man.read_text()).get("samples"):
        return out
    make, per_shard = BUILTINS[name]
    write_shards(make(), out, f"builtin:{name}", shard_size=per_shard, overwrite=True)
    return out
