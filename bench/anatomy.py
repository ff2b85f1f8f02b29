"""Step anatomy of the demo's SFT stage: where one optimizer step's wall time goes.

Runs the real `fit_stage` on the demo recipe's `sft` stage (tiny-clip-llama, digits-qa, batch 32, 2 dataloader
workers, its LR schedule and checkpoint cadence), started from a fresh model instead of the align stage's output
(weights do not change the timing) and without its held-out eval (which runs outside the steps). Timers are added
by swapping in subclasses of vlmtrain's own `VLMModule` and `StepWindows` for the run; the step code is untouched:

- data wait: time inside the window iterator (next micro-batch from the ShardLoader + the cursor copy);
- loop: the rest of the time between two training steps (Lightning's loop, Recorder, checkpoint callbacks);
- forward: model forward + loss (`accumulate_lm` minus its backward);
- backward: `manual_backward`;
- optimizer: the rest of `training_step` (gradient clipping, AdamW step, zero_grad, LR scheduler, step stats).

Shares are over the steady-state steps (the first `warmup` dropped), of the end-to-end time between step ends.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from unittest import mock

from bench.common import ROOT, machine, save

RECIPE = ROOT / "configs/recipes/demo.yaml"
PARTS = ("data_wait", "loop", "forward", "backward", "optimizer")


def _timed(base_module, base_windows, log: list[dict]):
    pending = {"wait": 0.0}

    class TimedWindows(base_windows):
        def __iter__(self):
            it = super().__iter__()
            while True:
                t = time.perf_counter()
                try:
                    window = next(it)
                except StopIteration:
                    return
                pending["wait"] += time.perf_counter() - t
                yield window

    class TimedModule(base_module):
        _t_end = None

        def training_step(self, window, batch_idx):
            t0 = time.perf_counter()
            self._acc = self._bwd = 0.0
            super().training_step(window, batch_idx)
            t1 = time.perf_counter()
            gap = t0 - self._t_end if self._t_end is not None else 0.0
            wait, pending["wait"] = pending["wait"], 0.0
            parts = {"data_wait": wait, "loop": max(gap - wait, 0.0), "forward": self._acc - self._bwd,
                     "backward": self._bwd, "optimizer": (t1 - t0) - self._acc}
            log.append({**parts, "total": sum(parts.values()), "samples": self.last_stats["samples"]})
            self._t_end = t1

        def accumulate_lm(self, micro):
            t = time.perf_counter()
            out = super().accumulate_lm(micro)
            self._acc += time.perf_counter() - t
            return out

        def _backward(self, loss, last=True):
            t = time.perf_counter()
            super()._backward(loss, last=last)
            self._bwd += time.perf_counter() - t

    return TimedModule, TimedWindows


def demo_sft_stage(out: Path, max_steps: int | None):
    from vlmtrain.config.stage import EvalConfig
    from vlmtrain.train.runner import resolve_recipe

    stage = next(s for s in resolve_recipe(RECIPE, out) if s.name == "sft")
    trainer = stage.trainer if max_steps is None else stage.trainer.model_copy(update={"max_steps": max_steps})
    return stage.model_copy(update={"init_from": None, "model": str(ROOT / "configs/models/tiny-clip-llama.yaml"),
                                    "eval": EvalConfig(), "trainer": trainer})


def run(quick: bool = False, out: str | None = None) -> dict:
    import vlmtrain.train.module as module
    from vlmtrain.train.runner import fit_stage

    max_steps, warmup = (12, 2) if quick else (None, 5)
    log: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stage = demo_sft_stage(tmp / "run", max_steps)
        timed_module, timed_windows = _timed(module.VLMModule, module.StepWindows, log)
        with mock.patch.object(module, "VLMModule", timed_module), \
                mock.patch.object(module, "StepWindows", timed_windows):
            fit_stage(stage, tmp / "run" / "sft", data_root=tmp / "data", base_dir=ROOT)
    steps = log[warmup:]
    total = sum(s["total"] for s in steps)
    shares = {k: sum(s[k] for s in steps) / total for k in PARTS}
    step_ms = 1000 * total / len(steps)
    result = {
        "bench": "anatomy", "quick": quick, "stage": stage.model_dump(mode="json"), "warmup_steps": warmup,
        "timed_steps": len(steps), "steps": log, "shares": shares, "machine": machine(),
        "headline": {**{f"{k}_share": v for k, v in shares.items()}, "step_ms": step_ms,
                     "samples_per_s": sum(s["samples"] for s in steps) / total,
                     "data_wait_under_5pct": shares["data_wait"] < 0.05},
    }
    save("anatomy" + ("-quick" if quick else ""), result, out)
    return result
