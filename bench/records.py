"""Fixture data shared by the SFT and DPO benchmarks: the same records for vlmtrain (tar shards) and TRL (a
`datasets.Dataset` in TRL's vision format), so both sides train on identical images and conversations.

Images: scikit-learn's 1,797 handwritten digits (8×8, upscaled to 28 px, grey → RGB PNG; Fashion-MNIST-sized).
Chat records: "What digit is this?" → "seven", then 0–3 follow-up exchanges (parity, successor, numeral,
spelling...), so lengths vary (~60–120 tokens with the bench model's 49 image tokens).
Preference records: one question (several phrasings) with the right digit chosen over a wrong one, both answered in
the same phrasing, so chosen and rejected differ only in the digit word.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from vlmtrain.data.schema import IMAGE_PART, Sample, text

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_SIZE = 28

# Follow-up exchanges: question and a function of the digit giving the answer. Answers differ in length on purpose.
FOLLOW_UPS = [
    ("Is it odd or even?", lambda y: f"It is {'odd' if y % 2 else 'even'}."),
    ("Which digit comes next?", lambda y: WORDS[(y + 1) % 10]),
    ("Is it larger than five?", lambda y: "Yes." if y > 5 else "No."),
    ("Write it as a numeral.", lambda y: str(y)),
    ("Spell it letter by letter.", lambda y: "-".join(WORDS[y])),
]
PREF_QUESTIONS = ["What digit is this?", "Which handwritten digit does this image show?",
                  "Read the digit in the picture.", "Name the number written here."]
PREF_ANSWERS = ["{}", "It looks like {}.", "The digit in the image is {}."]


def _png(im8, size: tuple[int, int]) -> bytes:
    from PIL import Image

    im = Image.fromarray((im8 * (255 / 16)).astype(np.uint8), "L").resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def digit_pngs() -> list[tuple[bytes, int]]:
    """(PNG bytes, label) for every scikit-learn digit, 28 px RGB."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return [(_png(im8, (IMAGE_SIZE, IMAGE_SIZE)), int(y)) for im8, y in zip(d.images, d.target)]


class VariedDigits:
    """Digit `i` as a PNG of a width and height drawn from `sides` (its own seeded stream, so the records' text
    is the same as with fixed-size images): for dynamic-resolution processors, whose image-token count follows
    the image size (Qwen2.5-VL: one token per 28×28 px)."""

    def __init__(self, sides: tuple[int, ...], seed: int = 0):
        from sklearn.datasets import load_digits

        d = load_digits()
        self.images, self.labels = d.images, d.target
        self.sides, self.rng = sides, np.random.default_rng(seed + 1)

    def __call__(self, i: int) -> tuple[bytes, int]:
        k = i % len(self.labels)
        w, h = (int(x) for x in self.rng.choice(self.sides, size=2))
        return _png(self.images[k], (w, h)), int(self.labels[k])


def _digit_source(image_sides: tuple[int, ...] | None, seed: int):
    if image_sides:
        return VariedDigits(image_sides, seed)
    pngs = digit_pngs()
    return lambda i: pngs[i % len(pngs)]


def chat_samples(n: int, seed: int = 0, image_sides: tuple[int, ...] | None = None) -> list[Sample]:
    """`n` chat records (1–4 exchanges, uniformly), images cycling through the digits (28 px, or of sizes drawn
    from `image_sides`)."""
    rng = np.random.default_rng(seed)
    digit = _digit_source(image_sides, seed)
    samples = []
    for i in range(n):
        png, y = digit(i)
        msgs = [{"role": "user", "content": [IMAGE_PART, text("What digit is this?")]},
                {"role": "assistant", "content": [text(WORDS[y])]}]
        for k in rng.choice(len(FOLLOW_UPS), size=int(rng.integers(0, 4)), replace=False):
            q, answer = FOLLOW_UPS[k]
            msgs += [{"role": "user", "content": [text(q)]}, {"role": "assistant", "content": [text(answer(y))]}]
        samples.append(Sample({"id": f"chat-{i}", "kind": "chat", "messages": msgs}, [("png", png)]))
    return samples


def preference_samples(n: int, seed: int = 0, image_sides: tuple[int, ...] | None = None) -> list[Sample]:
    """`n` preference records: right digit chosen, a random wrong one rejected, same question and phrasing
    (images as in `chat_samples`)."""
    rng = np.random.default_rng(seed)
    digit = _digit_source(image_sides, seed)
    samples = []
    for i in range(n):
        png, y = digit(i)
        wrong = (y + int(rng.integers(1, 10))) % 10
        form = PREF_ANSWERS[int(rng.integers(len(PREF_ANSWERS)))]
        q = PREF_QUESTIONS[int(rng.integers(len(PREF_QUESTIONS)))]
        rec = {"id": f"pref-{i}", "kind": "preference",
               "prompt": [{"role": "user", "content": [IMAGE_PART, text(q)]}],
               "chosen": [{"role": "assistant", "content": [text(form.format(WORDS[y]))]}],
               "rejected": [{"role": "assistant", "content": [text(form.format(WORDS[wrong]))]}]}
        samples.append(Sample(rec, [("png", png)]))
    return samples


def write(samples: list[Sample], out: str | Path, shards: int = 8) -> Path:
    """vlmtrain side: WebDataset shards + manifest, through the product's own writer. Several shards, so that
    every (rank × dataloader worker) slot owns some."""
    from vlmtrain.data.writer import write_shards

    write_shards(samples, out, "bench", shard_size=-(-len(samples) // shards), overwrite=True)
    return Path(out)


def _trl_messages(msgs: list[dict]) -> list[dict]:
    # Arrow stores a list of parts as one struct type: image parts get text=None. The chat templates test the
    # part's type first, and TRL fills image parts that lack an "image" key from the `images` column.
    return [{"role": m["role"], "content": [{"type": p["type"], "text": p.get("text")} for p in m["content"]]}
            for m in msgs]


def _image_features(extra: dict):
    from datasets import Features, Image, List, Value

    part = {"type": Value("string"), "text": Value("string")}
    msgs = List({"role": Value("string"), "content": List(part)})
    return Features({"images": List(Image()), **{k: msgs for k in extra}})


def trl_sft_dataset(samples: list[Sample]):
    """TRL side: `images` (PNG bytes, decoded on access like vlmtrain's tar reader) + `messages`."""
    from datasets import Dataset

    cols = {"images": [[{"bytes": data, "path": None} for _, data in s.images] for s in samples],
            "messages": [_trl_messages(s.record["messages"]) for s in samples]}
    return Dataset.from_dict(cols, features=_image_features({"messages": 1}))


def trl_dpo_dataset(samples: list[Sample]):
    """TRL side: `images` + conversational `prompt` / `chosen` / `rejected`."""
    from datasets import Dataset

    keys = ("prompt", "chosen", "rejected")
    cols = {"images": [[{"bytes": data, "path": None} for _, data in s.images] for s in samples],
            **{k: [_trl_messages(s.record[k]) for s in samples] for k in keys}}
    return Dataset.from_dict(cols, features=_image_features(dict.fromkeys(keys)))
