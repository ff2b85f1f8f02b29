"""vlmtrain side of the training comparisons: the product's own `fit_stage` (Lightning Trainer, VLMModule over
StepWindows(ShardLoader), Recorder) on a stage config, nothing hand-written in between.

Per-step timing comes back from what every run records anyway: `metrics.jsonl` (logged every step here, so each
row's samples/s covers exactly one step, end of step to end of step) and `sample_ids.jsonl` (which records each step
trained on). Token counts come from a table of each record's encoded length and supervised tokens, built with the
stage's own encoder.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from bench.common import ROOT

IGNORE = -100


def stage_config(name: str, preset: str, shards: Path, *, model: str, batch: int, mode: str, workers: int,
                 max_len: int, lr: float, steps: int, seed: int = 0, pack_len: int | None = None,
                 extra: dict | None = None):
    """A validated StageConfig: constant LR without warmup, no eval, no mid-run checkpoints, logged every step."""
    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.train.presets import deep_merge, with_preset

    data = {"name": name, "preset": preset, "model": model,
            "data": {"train": [{"path": str(shards)}], "batch_size": batch, "num_workers": workers,
                     "max_len": max_len, "mode": mode, "pack_len": pack_len},
            "optim": {"lr": lr, "schedule": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0, "grad_clip": 1.0},
            "trainer": {"max_steps": steps, "log_every_n_steps": 1, "save_every_n_steps": 10**9,
                        "log_sample_ids": True, "seed": seed, "precision": "32-true", "grad_checkpointing": False}}
    return validate(StageConfig, with_preset(deep_merge(data, extra or {})))


def start_bundle(stage):
    """The exact model `fit_stage` starts from (same seeding, same builder): what the peer gets, exported."""
    from vlmtrain.train.runner import load_stage_start

    return load_stage_start(stage, ROOT)


def record_table(bundle, samples, max_len: int) -> dict[str, dict]:
    """id → tokens (non-padding), longest row, rows and supervised target tokens, as the stage encodes it."""
    from vlmtrain.data.encode import decode_image, encoder_for

    enc = encoder_for(bundle, max_len)
    table = {}
    for s in samples:
        images = [decode_image(data, s.record["id"]) for _, data in s.images]
        e = enc(s.record, images)
        seqs = [e["chosen"], e["rejected"]] if "chosen" in e else [e]
        lens = [len(x["input_ids"]) for x in seqs]
        table[s.record["id"]] = {"tokens": sum(lens), "longest": max(lens), "rows": len(seqs),
                                 "supervised": sum(sum(t != IGNORE for t in x["labels"][1:]) for x in seqs)}
    return table


def run(stage, workdir: Path, table: dict[str, dict]) -> tuple[list[dict], dict]:
    """Train the stage; return per-step logs and the module weight hashes it started from (stage.json)."""
    from vlmtrain.train.runner import fit_stage

    run_dir = Path(workdir) / f"vlmtrain-{uuid.uuid4().hex[:8]}"
    try:
        fit_stage(stage, run_dir, base_dir=ROOT)
        rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        rows = sorted((r for r in rows if "loss" in r), key=lambda r: r["step"])
        ids = {r["step"]: r["ids"] for r in map(json.loads, (run_dir / "sample_ids.jsonl").read_text().splitlines())}
        start = json.loads((run_dir / "stage.json").read_text())["weights_sha256"]["start"]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)  # checkpoint + model: hundreds of MB per run
    packed = stage.data.mode == "pack"
    steps = []
    for r in rows:
        recs = [table[i] for i in ids[r["step"]]]
        dt = len(recs) / r["samples_per_s"]
        # Padded batches are [rows, longest]; packed ones have no mask and the recorder counts their full tensor.
        slots = r["tokens_per_s"] * dt if packed else sum(x["rows"] for x in recs) * max(x["longest"] for x in recs)
        steps.append({"dt": dt, "samples": len(recs), "supervised": sum(x["supervised"] for x in recs),
                      "tokens": sum(x["tokens"] for x in recs), "slots": slots, "loss": r["loss"],
                      "lengths": [x["tokens"] for x in recs]})
    return steps, start


def encode_batch(bundle, samples, max_len: int, shared_prompt: bool = False) -> dict:
    """The padded batch the plain loader would make of `samples` (chat or preference records; preference records in
    the shared-prompt layout with `shared_prompt`: a native family's shared-prefix rows for a native model)."""
    from vlmtrain.data.batching import collate, collate_preference
    from vlmtrain.data.encode import decode_image, encoder_for

    enc = encoder_for(bundle, max_len)
    xs = [enc(s.record, [decode_image(d, s.record["id"]) for _, d in s.images]) for s in samples]
    pad = bundle.tokenizer.pad_token_id
    if "chosen" in xs[0] and shared_prompt:
        from vlmtrain.data.batching import collate_preference_prefix, collate_preference_shared

        shared = collate_preference_prefix if bundle.native else collate_preference_shared
        return shared(xs, pad, bundle.model.image_token_id)
    return collate_preference(xs, pad) if "chosen" in xs[0] else collate(xs, pad)


def step_fn(bundle, stage, batch: dict):
    """One real micro-step of the stage (VLMModule.accumulate_lm / accumulate_dpo: forward, loss, backward) on
    `batch`, outside Lightning: what the FLOP counter runs."""
    from vlmtrain.train.freeze import apply_stage_trainability
    from vlmtrain.train.module import VLMModule

    apply_stage_trainability(bundle.model, stage.train)
    module = VLMModule(bundle, stage)
    accumulate = module.accumulate_dpo if stage.objective == "dpo" else module.accumulate_lm
    return lambda: accumulate([batch])


def stage_loader(stage, bundle):
    """The loader `fit_stage` builds for this stage (same arguments, same seed, so the same batches)."""
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.data.loader import ShardLoader

    d = stage.data
    return ShardLoader([r.path for r in d.train], encoder_for(bundle, d.max_len, d.caption_prompt,
                                                              d.anyres_pinpoints),
                       bundle.tokenizer.pad_token_id, batch_size=d.batch_size, num_workers=d.num_workers,
                       seed=stage.trainer.seed, shuffle_buffer=d.shuffle_buffer, mode=d.mode,
                       pack_len=d.pack_len or d.max_len, max_bad_fraction=d.max_bad_fraction, split=d.split,
                       cache_mb=d.encoded_cache_mb)


def window_steps(stage, bundle, warmup: int, n_samples: int) -> int:
    """How many steps after `warmup` it takes the stage's loader to deliver `n_samples` samples.

    Why: the packing loader plans each chunk of samples longest-first, so a packed step's sample count (and length)
    drifts within a chunk; a timed window must span whole chunks, i.e. a fixed number of samples, not of steps."""
    seen, steps = 0, 0
    for i, batch in enumerate(stage_loader(stage, bundle)):
        if i >= warmup:
            seen += len(batch["ids"])
            steps += 1
            if seen >= n_samples:
                return steps
    raise RuntimeError("the loader ended before the window was full")


def timed_fit(stage, work: Path, first: int, last: int) -> dict:
    """Train the stage (logged every step) in a throw-away run dir; throughput over steps first+1 … last, from the
    per-step `seconds` and `samples_per_s` the recorder writes. Also returns the run's summary."""
    from vlmtrain.train.runner import fit_stage

    run_dir = Path(work) / f"run-{uuid.uuid4().hex[:8]}"
    try:
        summary = fit_stage(stage, run_dir, data_root=Path(work) / "data", base_dir=ROOT)
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    rows = [r for r in rows if "seconds" in r and first < r["step"] <= last]
    secs = sum(r["seconds"] for r in rows)
    samples = sum(r["samples_per_s"] * r["seconds"] for r in rows)
    return {"steps": len(rows), "seconds": secs, "samples": round(samples), "seconds_per_sample": secs / samples,
            "samples_per_s": samples / secs, "summary": summary}
