"""DP-SGD cost: time per trained sample with DP-SGD (Opacus per-sample gradients, clipping, noise) over the same
training without it, for a connector-only stage and a connector + LoRA stage. One process, interleaved repeats.

Both sides run the product's `fit_stage` on the same model (`bench/llava-30m.yaml`, or the tiny preset with
--quick), data (`medical-cohort`, 400 records, one image each, ~100 tokens), expected batch, LR and steps. The DP side
samples Poisson batches (sizes vary around the expected batch), so the comparison is per sample: seconds per trained
sample over the timed steps (end of step to end of step, logged every step), the first `warmup` steps dropped.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench import vlm_side
from bench.common import ROOT, interleaved, machine, median, save

MODEL = "bench/llava-30m.yaml"
QUICK_MODEL = "configs/models/tiny-clip-llama.yaml"
BATCH, LR, MAX_LEN = 16, 1e-3, 192
PRIVACY = {"noise_multiplier": 1.0, "delta": 1e-5, "max_grad_norm": 0.7}
SETUPS = {
    "connector": {"train": {"vision": False, "connector": True, "llm": False}},
    "lora": {"train": {"vision": False, "connector": True, "llm": "lora"},
             "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
}


def _stage(setup: str, dp: bool, data: Path, model: str, steps: int, workers: int):
    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.train.presets import with_preset

    d = {"name": f"{setup}-{'dp' if dp else 'plain'}", "preset": "sft", "model": str(ROOT / model),
         **SETUPS[setup],
         "data": {"train": [{"path": str(data)}], "batch_size": BATCH, "num_workers": workers, "max_len": MAX_LEN},
         "optim": {"lr": LR, "schedule": "constant", "warmup_ratio": 0.0},
         "trainer": {"max_steps": steps, "log_every_n_steps": 1, "save_every_n_steps": 10**9, "seed": 0}}
    if dp:
        d["privacy"] = dict(PRIVACY)
    return validate(StageConfig, with_preset(d))


def _timed(stage, work: Path, first: int, last: int) -> dict:
    r = vlm_side.timed_fit(stage, work, first, last)
    r.pop("summary")
    return r


def run(quick: bool = False, out: str | None = None) -> dict:
    from vlmtrain.train.sources import prepare_builtin

    model = QUICK_MODEL if quick else MODEL
    warmup, timed, repeats, workers = (2, 4, 1, 0) if quick else (3, 15, 3, 2)
    with tempfile.TemporaryDirectory(prefix="bench-dp-") as tmp:
        work = Path(tmp)
        data = prepare_builtin("medical-cohort", work / "data")
        sides = {f"{s}/{'dp' if dp else 'plain'}": (lambda s=s, dp=dp: _timed(
            _stage(s, dp, data, model, warmup + timed, workers), work, warmup, warmup + timed))
            for s in SETUPS for dp in (False, True)}
        runs = interleaved(sides, repeats)
    med = {k: {f: median([r[f] for r in v]) for f in v[0]} for k, v in runs.items()}
    ratios = {s: med[f"{s}/dp"]["seconds_per_sample"] / med[f"{s}/plain"]["seconds_per_sample"] for s in SETUPS}
    result = {"bench": "dp", "quick": quick, "model": model, "expected_batch": BATCH, "max_len": MAX_LEN,
              "privacy": PRIVACY, "warmup_steps": warmup, "timed_steps": timed, "repeats": repeats,
              "workers": workers, "runs": runs, "medians": med, "machine": machine(),
              "headline": {"dp_over_plain_time_per_sample": ratios,
                           **{f"{k}_samples_per_s": v["samples_per_s"] for k, v in med.items()}}}
    save("dp-quick" if quick and out is None else "dp", result, out)
    return result
