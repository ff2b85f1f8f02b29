"""Steady-state throughput from per-step logs, computed the same way for every side of a comparison.

A step log is `{"dt", "samples", "supervised", "tokens", "slots", "loss", "lengths"}`: seconds from the end of the
previous optimizer step to the end of this one (so data waits, the loop and the optimizer are all inside), samples
(or preference pairs) trained, supervised target tokens, non-padding tokens, token slots of the batch tensors
(padding included), the step's loss and each trained sequence's length. The first `warmup` steps (worker start-up,
first allocations) are dropped; the next `timed` steps count.
"""

from __future__ import annotations

import os

from bench.common import median


def steady(steps: list[dict], warmup: int, timed: int, flops_of_len=None) -> dict:
    window = steps[warmup:warmup + timed]
    if len(window) != timed:
        raise RuntimeError(f"expected {warmup + timed} logged steps, got {len(steps)}")
    secs = sum(s["dt"] for s in window)
    tot = {k: sum(s[k] for s in window) for k in ("samples", "supervised", "tokens", "slots")}
    out = {"steps": timed, "seconds": secs, "samples": tot["samples"],
           "samples_per_s": tot["samples"] / secs, "supervised_tokens_per_s": tot["supervised"] / secs,
           "tokens_per_s": tot["tokens"] / secs, "samples_per_step": tot["samples"] / timed,
           "padding_fraction": 1 - tot["tokens"] / tot["slots"],
           "mean_loss": sum(s["loss"] for s in window) / timed,
           # other jobs on a shared machine slow both sides alike only on average: keep the load next to the number
           "load_1m": os.getloadavg()[0]}
    if flops_of_len is not None:  # useful FLOPs of the very samples trained in the window, per second
        out["useful_flops_per_s"] = sum(flops_of_len(n) for s in window for n in s["lengths"]) / secs
    return out


def medians(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per side, the median of every numeric field over the interleaved repeats."""
    return {side: {k: median([r[k] for r in reps]) for k in reps[0]} for side, reps in runs.items()}
