"""Reward functions vlmtrain ships, in TRL's signature `f(prompts, completions, **columns) -> list[float | None]`.

A completion is a string (standard prompts) or TRL's conversational form `[{"role": "assistant", "content": ...}]`.
Ground truth comes from the record's columns: `answer` (a chat record's last assistant turn) or `solution` (the
column name of TRL's and R1-V's datasets). A function returns None for a completion it cannot judge (no ground
truth), which the advantage computation leaves out (`advantages.weighted_rewards`).

Stage configs name them by their short name (`fn: accuracy`) or by path (`vlmtrain.train.grpo.reward_fns:accuracy`);
`args:` binds keyword arguments (`{fn: length_penalty, args: {max_length: 64, cache: 16}}`).
"""

from __future__ import annotations

import math
import re
from typing import Any

from vlmtrain.train.evaluate import normalize_answer

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
_THINK_ANSWER = re.compile(r"^\s*<think>(?!.*<think>).*?</think>\s*<answer>(?!.*<answer>).*?</answer>\s*$", re.DOTALL)
# option letters are capitals: "(B) red", "B.", "B:", "B)" or a bare "B" at the start; or after "answer is" & co.
_LETTER = re.compile(r"^(?:\(([A-Z])\)|([A-Z])(?:[.:)]|\s*$))")
_LETTER_AFTER = re.compile(r"\b(?i:answer|option|choice)(?:\s+(?i:is))?\s*:?\s*\(?([A-Z])\b")


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the concatenated text of TRL's conversational form."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message.get("content", "")
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(p.get("text", "") for p in content if p.get("type") == "text")
    return "".join(parts)


def extract_answer(text: str) -> str:
    """The last `<answer>…</answer>` span if there is one, else the whole text, stripped."""
    spans = _ANSWER.findall(text)
    return (spans[-1] if spans else text).strip()


def as_number(text: str) -> float | None:
    """`text` as a number when it is one: a numeral (thousands commas allowed, a trailing % kept as the number) or a
    number word up to twenty; None otherwise (so "3 apples" is compared as text, not as 3)."""
    s = text.strip().rstrip(".").replace(",", "").removesuffix("%").strip()
    if s.lower() in _WORDS:
        return float(_WORDS.index(s.lower()))
    return float(s) if _NUMBER.fullmatch(s) else None


def _truth(i: int, answer: list | None, solution: list | None) -> str | None:
    for column in (answer, solution):
        if column is not None and column[i] is not None:
            return extract_answer(str(column[i]))
    return None


def answers_match(predicted: str, truth: str, rel_tol: float = 1e-4, abs_tol: float = 1e-6) -> bool:
    """Numbers within tolerance when both sides are numbers, else the normalised strings (lower case, no
    punctuation, articles or extra spaces: the same normalisation as the stage's exact-match eval) are equal."""
    p, t = as_number(predicted), as_number(truth)
    if p is not None and t is not None:
        return math.isclose(p, t, rel_tol=rel_tol, abs_tol=abs_tol)
    return normalize_answer(predicted) == normalize_answer(truth)


def accuracy(completions: list, answer: list | None = None, solution: list | None = None, rel_tol: float = 1e-4,
             abs_tol: float = 1e-6, **kwargs) -> list[float | None]:
    """1.0 when the completion's answer (inside `<answer>` tags if present) matches the ground truth, else 0.0;
    None without ground truth."""
    out: list[float | None] = []
    for i, completion in enumerate(completions):
        truth = _truth(i, answer, solution)
        predicted = extract_answer(completion_text(completion))
        out.append(None if truth is None else float(answers_match(predicted, truth, rel_tol, abs_tol)))
    return out


def choice_letter(text: str) -> str | None:
    """The option letter a text picks: "B", "(B)", "B.", "B) because…", "The answer is B" (capitals only: a
    lower-case "a" is an article), or None."""
    s = extract_answer(text)
    m = _LETTER.match(s)
    if m:
        return m.group(1) or m.group(2)
    m = _LETTER_AFTER.search(s)
    return m.group(1) if m else None


def multiple_choice(completions: list, answer: list | None = None, solution: list | None = None,
                    **kwargs) -> list[float | None]:
    """1.0 when the completion picks the ground truth's option letter, else 0.0 (also when it names none); None
    without ground truth or when the ground truth names no letter."""
    out: list[float | None] = []
    for i, completion in enumerate(completions):
        truth = _truth(i, answer, solution)
        want = choice_letter(truth) if truth is not None else None
        got = choice_letter(completion_text(completion))
        out.append(None if want is None else float(got == want))
    return out


def think_answer_format(completions: list, **kwargs) -> list[float]:
    """1.0 for `<think>…</think>` then `<answer>…</answer>` and nothing else (one of each; whitespace around and
    between allowed), else 0.0 (R1-V's and VLM-R1's format reward)."""
    return [1.0 if _THINK_ANSWER.match(completion_text(c)) else 0.0 for c in completions]


def parse_box(text: str) -> list[float] | None:
    """The first four numbers of the answer as `[x1, y1, x2, y2]`, or None when there are fewer than four."""
    nums = _NUMBER.findall(extract_answer(text))
    return [float(v) for v in nums[:4]] if len(nums) >= 4 else None


def iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two `[x1, y1, x2, y2]` boxes (0.0 for degenerate ones)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def to_original(box: list[float], resize: Any) -> list[float]:
    """A box in the processed image's pixels → the original image's. `resize` describes the processor's resize:
    `{"original": [w, h], "resized": [w, h]}` (or the 4-tuple `(orig_w, orig_h, resized_w, resized_h)`)."""
    if isinstance(resize, dict):
        (ow, oh), (rw, rh) = resize["original"], resize["resized"]
    else:
        ow, oh, rw, rh = resize
    sx, sy = ow / rw, oh / rh
    return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]


def box_iou(completions: list, boxes: list | None = None, answer: list | None = None, solution: list | None = None,
            image_resize: list | None = None, **kwargs) -> list[float | None]:
    """IoU of the completion's box with the ground-truth box, both in the ORIGINAL image's pixels.

    The model answers in the coordinates of the image it saw (the processor's resize); with an `image_resize`
    column (see `to_original`) the predicted box is mapped back before comparing. Ground truth: the `boxes` column
    (`[x1, y1, x2, y2]`), else a box parsed from `answer`/`solution`. 0.0 when the completion has no box; None
    without ground truth."""
    out: list[float | None] = []
    for i, completion in enumerate(completions):
        if boxes is not None and boxes[i] is not None:
            truth = [float(v) for v in boxes[i]]
        else:
            text = _truth(i, answer, solution)
            truth = parse_box(text) if text is not None else None
        if truth is None:
            out.append(None)
            continue
        pred = parse_box(completion_text(completion))
        if pred is not None and image_resize is not None and image_resize[i] is not None:
            pred = to_original(pred, image_resize[i])
        out.append(0.0 if pred is None else iou(pred, truth))
    return out


def length_penalty(completion_ids: list, max_length: int = 512, cache: int = 128, **kwargs) -> list[float]:
    """DAPO's soft overlong punishment (eq. 13), by completion tokens `n`: 0 up to `max_length - cache`, then
    falling linearly to -1 at `max_length`, -1 beyond."""
    if not 0 < cache <= max_length:
        raise ValueError(f"length_penalty: need 0 < cache ({cache}) <= max_length ({max_length})")
    start = max_length - cache
    out = []
    for ids in completion_ids:
        n = len(ids)
        out.append(0.0 if n <= start else (start - n) / cache if n <= max_length else -1.0)
    return out


SHIPPED: dict[str, Any] = {"accuracy": accuracy, "multiple_choice": multiple_choice,
                           "think_answer_format": think_answer_format, "box_iou": box_iou,
                           "length_penalty": length_penalty}
