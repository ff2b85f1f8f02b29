"""Run one stage (`vlmtrain fit`) or a multi-stage recipe (`vlmtrain run`), top to bottom.

Run directory of a stage:
    checkpoints/last.ckpt   Lightning checkpoint: trainable weights, optimizer, scheduler, loop state,
                            plus vlmtrain's data cursor and RNG states (exact resume)
    model/                  the stage's output model (vlmtrain format; the next stage starts from it)
    metrics.jsonl, loss.png, eval.png, summary.json, stage.json, config.yaml
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vlmtrain.config.stage import StageConfig
from vlmtrain.errors import VlmtrainError
from vlmtrain.train import phases
from vlmtrain.train.finalize import is_complete
from vlmtrain.train.lock import holding_lock, lock_run_dir
from vlmtrain.train.recipe import load_stage_config, resolve_recipe  # noqa: F401  (callers import them here)
from vlmtrain.train.stage import StageRun, load_stage_start, module_hashes, rank_zero  # noqa: F401  (as above)

log = logging.getLogger("vlmtrain.train")


def fit_stage(stage: StageConfig, run_dir: str | Path, data_root: str | Path | None = None, resume: bool = False,
              base_dir: str | Path = ".", parent: dict | None = None) -> dict:
    """Train one stage into `run_dir` (or finish it, with `resume`); holds the directory's lock while it runs.
    The phases, in order, are `train.stage.StageRun`'s."""
    run_class = StageRun
    if stage.objective == "grpo":  # generate-then-score inside fit: the objective's own module, data and summary
        from vlmtrain.train.grpo.stage import GRPOStageRun as run_class
    with holding_lock(run_dir):
        return run_class(stage, run_dir, data_root, resume, base_dir, parent).run()


def run_recipe(path: str | Path, out: str | Path, resume: bool = False, overrides: list[str] | None = None,
               max_steps: int | None = None) -> list[dict]:
    """Run a recipe's stages in order; each starts from the previous stage's `model/`. Completed stages (complete
    summary.json) are skipped on --resume. Holds OUT's lock while it runs."""
    with holding_lock(out):
        return _run_recipe(path, out, resume, overrides, max_steps)


def _run_recipe(path: str | Path, out: str | Path, resume: bool, overrides: list[str] | None,
                max_steps: int | None) -> list[dict]:
    from vlmtrain.train.strategy import init_distributed, rank_zero_first

    path, out = Path(path), Path(out)
    stages = resolve_recipe(path, out, overrides, max_steps)
    init_distributed()

    def check_out() -> None:
        if out.exists() and any(out.iterdir()) and not resume:
            raise VlmtrainError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        lock_run_dir(out)

    rank_zero_first(check_out, others=False)
    summaries, parent = [], None
    for stage in stages:
        run_dir = out / stage.name
        done = run_dir / "summary.json"
        if resume and is_complete(done):
            log.info(f"== stage {stage.name}: already completed, skipping")
            summaries.append(json.loads(done.read_text()))
        else:
            summaries.append(fit_stage(stage, run_dir, out / "data", resume=resume, base_dir=path.parent,
                                       parent=parent))
        phases.mark("handoff")
        parent = {"name": stage.name, "model": str(run_dir / "model"),
                  "weights_sha256": json.loads((run_dir / "stage.json").read_text())["weights_sha256"]["end"]}
    if rank_zero():
        _print_eval_table(summaries)
    return summaries


def _print_eval_table(summaries: list[dict]) -> None:
    rows = [s for s in summaries if s.get("eval")]
    if not rows:
        return
    keys = [k for k in rows[0]["eval"] if k != "eval_samples"]
    n = int(rows[0]["eval"].get("eval_samples", 0))
    head = f"{'stage':<8}" + "".join(f" | {k:^26}" for k in keys)
    sub = f"{'':<8}" + "".join(f" | {'before':>12} {'after':>13}" for _ in keys)
    lines = [f"held-out evaluation ({n} samples):", head, sub]
    for s in rows:
        b = s.get("eval_before") or {}
        lines.append(f"{s['stage']:<8}" + "".join(f" | {b.get(k, float('nan')):>12.3f} {s['eval'][k]:>13.3f}"
                                                  for k in keys))
    print("\n".join(lines), flush=True)
