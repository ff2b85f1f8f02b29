"""A stage's finalisation: the summary written last and atomically, and the metrics it needs recovered from the
run directory when the process that trained the stage died before writing it.

A stage is complete exactly when `summary.json` is complete (`is_complete`): it is the last file a stage writes,
through a temporary file and a rename (`vlmtrain.atomic`), so a kill at any moment leaves either no summary or a
complete one.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmtrain.atomic import write_text
from vlmtrain.errors import VlmtrainError

REQUIRED = ("final_loss", "steps", "samples_per_s", "tokens_per_s", "skipped")


def is_complete(summary_path: Path) -> bool:
    """A summary that marks its stage done: parses, `status: completed`, every required field non-null."""
    try:
        s = json.loads(Path(summary_path).read_text())
    except (OSError, ValueError):
        return False
    return s.get("status") == "completed" and all(s.get(k) is not None for k in REQUIRED)


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's rows; a line a kill cut short (only ever the last one) is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for ln in path.read_text().splitlines():
        if not ln.strip():
            continue
        try:
            rows.append(json.loads(ln))
        except ValueError:
            continue
    return rows


def write_metrics(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def totals_from_metrics(rows: list[dict], upto_step: int) -> dict:
    """Training totals rebuilt from the logged rows (each row covers `seconds` of training at its rates): the
    fallback for a checkpoint written before the recorder saved its totals in it."""
    train = [r for r in rows if r.get("seconds") is not None and r.get("step", 0) <= upto_step]
    losses = [r["loss"] for r in train if r.get("loss") is not None]
    return {"samples": round(sum(r["samples_per_s"] * r["seconds"] for r in train)),
            "tokens": round(sum(r["tokens_per_s"] * r["seconds"] for r in train)),
            "train_seconds": sum(r["seconds"] for r in train),
            "last_loss": losses[-1] if losses else None}


def training_figures(recorder, metrics_path: Path, steps: int) -> dict:
    """final_loss and the training totals of a stage, from the recorder (restored from the checkpoint on resume),
    else from metrics.jsonl. Raises if neither knows the final loss (nothing was trained and logged)."""
    totals = dict(recorder.totals)
    last_loss = recorder.last_loss
    if last_loss is None or totals["train_seconds"] <= 0:
        recovered = totals_from_metrics(read_metrics(metrics_path), steps)
        last_loss = last_loss if last_loss is not None else recovered["last_loss"]
        if totals["train_seconds"] <= 0:
            totals.update({k: recovered[k] for k in ("samples", "tokens", "train_seconds")})
    if last_loss is None:
        raise VlmtrainError(f"{metrics_path}: no logged training loss up to step {steps}; cannot summarise the stage")
    seconds = max(totals["train_seconds"], 1e-9)
    return {"final_loss": last_loss, "samples": totals["samples"], "tokens": totals["tokens"],
            "samples_per_s": totals["samples"] / seconds, "tokens_per_s": totals["tokens"] / seconds,
            "train_seconds": totals["train_seconds"], "supervised": totals.get("supervised", 0)}


def record_final_eval(metrics_path: Path, step: int, result: dict) -> None:
    """Append the after-training eval row to metrics.jsonl once (a redone finalisation replaces its own row)."""
    rows = [r for r in read_metrics(metrics_path)
            if not (r.get("step") == step and r.get("final_eval"))]
    rows.append({"step": step, "final_eval": True, **{f"eval/{k}": v for k, v in result.items()}})
    write_metrics(metrics_path, rows)
