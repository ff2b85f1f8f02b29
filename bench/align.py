"""Alignment stage with and without the frozen-tower feature cache (`trainer.vision_feature_cache_mb`).

In the align stage the vision tower is frozen, so each image's features can be computed once and reused in later
epochs. Both sides run the product's `fit_stage` (align preset: connector trained, vision and LM frozen) on the same
model, data (scikit-learn digit captions, 1,497 records), batch and seed, for two epochs plus a few steps; timed are
the steps of the second epoch (where the cached side takes every image from the cache), end of step to end of step,
logged every step. One process, interleaved repeats. Reported: samples/s per side, the ratio, and the vision
tower's share of a step's FLOPs (what the cache can remove at most).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench import vlm_side
from bench.common import ROOT, interleaved, machine, median, save

MODELS = {"llava-30m": "bench/llava-30m.yaml", "tiny-clip-llama": "configs/models/tiny-clip-llama.yaml"}
BATCH, RECORDS = 16, 1497


def _stage(model: str, data: Path, steps: int, cache_mb: int, workers: int):
    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.train.presets import with_preset

    return validate(StageConfig, with_preset({
        "name": "align", "preset": "align", "model": str(ROOT / model),
        "data": {"train": [{"path": str(data)}], "batch_size": BATCH, "num_workers": workers, "max_len": 128},
        "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
        "trainer": {"max_steps": steps, "log_every_n_steps": 1, "save_every_n_steps": 10**9, "seed": 0,
                    "vision_feature_cache_mb": cache_mb}}))


def _timed(stage, work: Path, first: int, last: int) -> dict:
    r = vlm_side.timed_fit(stage, work, first, last)
    return {k: r[k] for k in ("steps", "seconds", "samples_per_s")} | {"cache": r["summary"].get(
        "vision_feature_cache")}


def _vision_share(model: str, data: Path) -> float:
    """Vision tower FLOPs / all FLOPs of one align micro-step (forward + backward), by the FLOP counter."""
    from bench import flops
    from vlmtrain.data.builtin import _captions

    stage = _stage(model, data, 1, 0, 0)
    bundle = vlm_side.start_bundle(stage)
    samples = [s for _, s in zip(range(BATCH), _captions())]
    batch = vlm_side.encode_batch(bundle, samples, 128)
    m = bundle.model
    parts = flops.step_flops(vlm_side.step_fn(bundle, stage, batch), m, {"vision": m.vision, "connector": m.connector})
    return parts["vision"] / parts["total"]


def run(quick: bool = False, out: str | None = None) -> dict:
    from vlmtrain.data.builtin import prepare_builtin

    models = {"tiny-clip-llama": MODELS["tiny-clip-llama"]} if quick else MODELS
    epoch = -(-RECORDS // BATCH)  # 94 steps
    first, last = (epoch, epoch + 6) if quick else (epoch, 2 * epoch)
    repeats, workers = (1, 0) if quick else (3, 2)
    result = {"bench": "align", "quick": quick, "batch": BATCH, "records": RECORDS, "timed_steps": [first + 1, last],
              "repeats": repeats, "workers": workers, "models": {}, "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="bench-align-") as tmp:
        work = Path(tmp)
        data = prepare_builtin("digits-captions", work / "data")
        for name, model in models.items():
            runs = interleaved({side: (lambda mb=mb, m=model: _timed(_stage(m, data, last, mb, workers), work,
                                                                     first, last))
                                for side, mb in (("cached", 1024), ("uncached", 0))}, repeats)
            med = {k: median([r["samples_per_s"] for r in v]) for k, v in runs.items()}
            result["models"][name] = {"model": model, "runs": runs, "median_samples_per_s": med,
                                      "speedup": med["cached"] / med["uncached"],
                                      "vision_flops_share": _vision_share(model, data)}
    result["headline"] = {name: {"speedup": v["speedup"], "vision_flops_share": v["vision_flops_share"]}
                          for name, v in result["models"].items()}
    save("align-quick" if quick and out is None else "align", result, out)
    return result
