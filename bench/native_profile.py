"""Where a training step's time goes, for the native-family benches: vision tower vs language model vs the rest,
and how long each step waited for data. Timers only (perf_counter around calls); the step code is untouched.

- `forward_split`: forward hooks on the transformers model's parts (`model.visual` = Qwen's tower + merger,
  `model.language_model` = decoder stack, `model` = both) during one micro-step (forward, loss, backward) on a
  given batch; the rest (LM head, loss, backward) is the step minus `model`'s forward. The tower is frozen in
  these stages, so its backward is only the merger's (SFT) or nothing (DPO).
- `vlmtrain_waits`: bench.anatomy's timers (time inside vlmtrain's window iterator) patched in for a `fit_stage` run.
- `trl_waits`: the same for TRL: time inside `Trainer.get_batch_samples` (where the training loop pulls its
  micro-batches from the dataloader).
"""

from __future__ import annotations

import contextlib
import time
from unittest import mock


def forward_split(hf_model, step, repeats: int = 1) -> dict:
    """Mean over `repeats` calls of `step()` (after one untimed call): seconds per part."""
    parts = {"vision": hf_model.model.visual, "language_model": hf_model.model.language_model,
             "inner": hf_model.model}
    spent = dict.fromkeys(parts, 0.0)
    started: dict[str, float] = {}
    handles = []
    for name, mod in parts.items():
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: started.__setitem__(n, time.perf_counter())))
        handles.append(mod.register_forward_hook(
            lambda m, a, o, n=name: spent.__setitem__(n, spent[n] + time.perf_counter() - started[n])))
    try:
        step()  # first call: allocations, lazy init
        for k in spent:
            spent[k] = 0.0
        t = time.perf_counter()
        for _ in range(repeats):
            step()
        total = (time.perf_counter() - t) / repeats
    finally:
        for h in handles:
            h.remove()
    per = {k: v / repeats for k, v in spent.items()}
    out = {"step_s": total, "vision_forward_s": per["vision"], "lm_forward_s": per["language_model"],
           "head_loss_backward_s": total - per["inner"]}
    out["shares"] = {k[:-2]: v / total for k, v in out.items() if k != "step_s"}
    return out


@contextlib.contextmanager
def vlmtrain_waits(log: list[dict]):
    """Within the block, every vlmtrain `fit_stage` appends one row per step to `log` (bench.anatomy's parts)."""
    import vlmtrain.train.module as module

    from bench.anatomy import _timed

    timed_module, timed_windows = _timed(module.VLMModule, module.StepWindows, log)
    with mock.patch.object(module, "VLMModule", timed_module), \
            mock.patch.object(module, "StepWindows", timed_windows):
        yield


def trl_waits(trainer) -> list[float]:
    """Patch `trainer` so each micro-batch fetch is timed; returns the list the seconds are appended to."""
    waits: list[float] = []
    fetch = trainer.get_batch_samples

    def timed(*args, **kw):
        t = time.perf_counter()
        out = fetch(*args, **kw)
        waits.append(time.perf_counter() - t)
        return out

    trainer.get_batch_samples = timed
    return waits


def wait_share(waits: list[float], steps: list[dict], warmup: int, timed: int) -> float:
    """Share of the timed window's wall time spent waiting for data (`waits[i]` belongs to step i)."""
    window = slice(warmup, warmup + timed)
    return sum(waits[window]) / sum(s["dt"] for s in steps[window])
