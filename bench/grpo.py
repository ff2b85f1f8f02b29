"""GRPO throughput: vlmtrain's grpo stage (`fit_stage`, `GRPOModule`) vs `trl.GRPOTrainer` 1.16, one process,
interleaved repeats, medians.

Same ~30M-parameter LLaVA-shaped model as the SFT/DPO benches (TRL trains its transformers Llava export, the same
start weights, checked by hash), the same prompts (a digit image and "What digit is this?", the digit word as the
`answer` column), the same reward (vlmtrain's shipped `accuracy`, passed to TRL as a plain function), 4 prompts per
step, G = 8 completions each, temperature 1 (no top-p/top-k), `dapo` loss, beta 0 (no reference model), one
iteration per rollout, the LM trained (tower and connector frozen), AdamW at a constant 1e-6, fp32, no workers.
Both sides generate exactly `max_completion_length` tokens per completion (TRL: `min_new_tokens`; vlmtrain: the
bench makes the image token, which generation never samples, its only stop token), so each step trains on the same
number of completion tokens. Throughput is prompts per second per optimizer step, `warmup` steps dropped.

Profile per step (medians of the timed steps): `generate` (the sampling loop), `loss` (the scoring forward of the
completions with grad and its backward), `other` (rewards, advantages, batching, optimizer, the loop).
vlmtrain's come from its `rl/generate_seconds` / `rl/train_seconds` metrics; TRL's from timing its own
`_generate_single_turn` and `training_step` (loss = training_step − `_generate_and_score_completions`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import torch

from bench import records, trl_side, vlm_side
from bench.common import ROOT, interleaved, machine, median, save

MODEL = "bench/llava-30m.yaml"
QUICK_MODEL = "configs/models/tiny-clip-llama.yaml"
PROMPTS, G, N_TOKENS, WORKERS, MAX_LEN, LR = 4, 8, 16, 0, 256, 1e-6


def prompt_samples(n: int, image_sides: tuple[int, ...] | None = None) -> list:
    """`n` one-question chat records (the digit image, "What digit is this?", the digit word as the answer)."""
    return [records.Sample({**s.record, "messages": s.record["messages"][:2]}, s.images)
            for s in records.chat_samples(n, image_sides=image_sides)]


def trl_dataset(samples: list):
    """TRL side: `images`, the conversational `prompt` (the user turn) and the `answer` column."""
    from datasets import Dataset, Features, Image, List, Value

    part = {"type": Value("string"), "text": Value("string")}
    features = Features({"images": List(Image()), "prompt": List({"role": Value("string"), "content": List(part)}),
                         "answer": Value("string")})
    cols = {"images": [[{"bytes": data, "path": None} for _, data in s.images] for s in samples],
            "prompt": [records._trl_messages(s.record["messages"][:1]) for s in samples],
            "answer": [s.record["messages"][1]["content"][0]["text"] for s in samples]}
    return Dataset.from_dict(cols, features=features)


def _reward(completions, answer, **kwargs):
    from vlmtrain.train.grpo.reward_fns import accuracy

    return accuracy(completions, answer=answer)


def grpo_trainer(folder, dataset, steps: int, *, load_fn=trl_side.load,
                 freeze=("model.vision_tower", "model.multi_modal_projector")):
    """`trl.GRPOTrainer` with the bench's settings; `bench_profile` collects each step's timings."""
    from trl import GRPOConfig, GRPOTrainer

    args = trl_side.common_args("/tmp/trl-grpo", batch=PROMPTS * G, steps=steps, lr=LR, workers=WORKERS,
                                max_len=MAX_LEN)
    args.pop("max_length")
    cfg = GRPOConfig(**args, num_generations=G, max_completion_length=N_TOKENS, temperature=1.0, top_p=1.0,
                     beta=0.0, loss_type="dapo", num_iterations=1, steps_per_generation=1, shuffle_dataset=False,
                     generation_kwargs={"min_new_tokens": N_TOKENS})
    model, processor = load_fn(folder, freeze=freeze)

    class Timed(GRPOTrainer):
        def _generate_single_turn(self, *a, **kw):
            t0 = time.perf_counter()
            out = super()._generate_single_turn(*a, **kw)
            self.bench_now["generate"] += time.perf_counter() - t0
            return out

        def _generate_and_score_completions(self, *a, **kw):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(*a, **kw)
            self.bench_now["rollout"] += time.perf_counter() - t0
            self.bench_now["completion_len"] = self._metrics["train"]["completions/mean_length"][-1]
            return out

        def training_step(self, *a, **kw):
            self.bench_now = {"generate": 0.0, "rollout": 0.0}
            t0 = time.perf_counter()
            loss = super().training_step(*a, **kw)
            self.bench_now["step"] = time.perf_counter() - t0
            self.bench_profile.append(self.bench_now)
            return loss

    trainer = Timed(model=model, reward_funcs=[_reward], args=cfg, train_dataset=dataset, processing_class=processor)
    trainer.bench_profile = []
    return trainer


def run_trl(folder, dataset, steps: int, warmup: int, load_fn=trl_side.load, freeze=None) -> dict:
    kw = {"load_fn": load_fn} | ({"freeze": freeze} if freeze is not None else {})
    trainer = grpo_trainer(folder, dataset, steps, **kw)
    trainer.bench_steps = [{} for _ in range(steps)]  # trl_side.run pairs these with its step clock
    logs = trl_side.run(trainer)
    if any(p["completion_len"] != N_TOKENS for p in trainer.bench_profile):
        raise RuntimeError("TRL's completions are not all max_completion_length long")
    rows = []
    for log, prof in list(zip(logs, trainer.bench_profile))[warmup:]:
        loss = prof["step"] - prof["rollout"]
        rows.append({"dt": log["dt"], "generate": prof["generate"], "loss": loss,
                     "other": log["dt"] - prof["generate"] - loss})
    return _summary(rows)


def run_ours(stage, workdir: Path, warmup: int) -> dict:
    """Train the grpo stage through `fit_stage`; per-step timings from metrics.jsonl."""
    from vlmtrain.train.grpo.module import GRPOModule
    from vlmtrain.train.grpo.native import NativeGRPOModule
    from vlmtrain.train.runner import fit_stage

    stops = GRPOModule._stop_ids, NativeGRPOModule._stop_ids
    never = lambda self, bundle: [bundle.model.image_token_id]  # noqa: E731  (never sampled: always N tokens)
    GRPOModule._stop_ids = NativeGRPOModule._stop_ids = never
    run_dir = Path(workdir) / f"vlmtrain-{uuid.uuid4().hex[:8]}"
    try:
        fit_stage(stage, run_dir, base_dir=ROOT)
        rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        start = json.loads((run_dir / "stage.json").read_text())["weights_sha256"]["start"]
    finally:
        GRPOModule._stop_ids, NativeGRPOModule._stop_ids = stops
        shutil.rmtree(run_dir, ignore_errors=True)
    rows = sorted((r for r in rows if "loss" in r), key=lambda r: r["step"])[warmup:]
    if any(r["rl/completion_len_mean"] != N_TOKENS for r in rows):
        raise RuntimeError("vlmtrain completions are not all max_completion_length long")
    out = []
    for r in rows:
        dt = PROMPTS / r["samples_per_s"]
        out.append({"dt": dt, "generate": r["rl/generate_seconds"], "loss": r["rl/train_seconds"],
                    "other": dt - r["rl/generate_seconds"] - r["rl/train_seconds"]})
    return _summary(out) | {"start": start}


def _summary(rows: list[dict]) -> dict:
    secs = sum(r["dt"] for r in rows)
    return {"steps": len(rows), "seconds": secs, "prompt_steps_per_s": len(rows) / secs,
            "prompts_per_s": PROMPTS * len(rows) / secs,
            "profile_s": {k: median([r[k] for r in rows]) for k in ("dt", "generate", "loss", "other")}}


def run(quick: bool = False, out: str | None = None) -> dict:
    from vlmtrain.model.hf_llava import export_llava
    from vlmtrain.train.runner import module_hashes

    n, warmup, timed, repeats = (16, 1, 2, 1) if quick else (100, 1, 4, 3)
    steps = warmup + timed
    samples = prompt_samples(n)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = records.write(samples, tmp / "shards")
        dataset = trl_dataset(samples)
        stage = _stage(shards, QUICK_MODEL if quick else MODEL, steps)
        bundle = vlm_side.start_bundle(stage)
        start = module_hashes(bundle.model)
        export_llava(bundle, tmp / "hf")
        del bundle

        def ours() -> dict:
            res = run_ours(stage, tmp, warmup)
            if res.pop("start") != start:
                raise RuntimeError("vlmtrain started from other weights than the ones given to TRL")
            return res

        runs = interleaved({"vlmtrain": ours, "trl": lambda: run_trl(tmp / "hf", dataset, steps, warmup)}, repeats)
    return _result("grpo", quick, runs, {"model": stage.model, "start_weights_sha256": start, "records": n,
                                         "warmup_steps": warmup, "timed_steps": timed, "repeats": repeats}, out)


def _stage(shards, model, steps: int):
    return vlm_side.stage_config(
        "grpo", "grpo", shards, model=model, batch=PROMPTS, mode="plain", workers=WORKERS, max_len=MAX_LEN, lr=LR,
        steps=steps, extra={"rewards": [{"fn": "accuracy"}], "data": {"shuffle_buffer": 1},
                            "grpo": {"num_generations": G, "max_completion_length": N_TOKENS, "temperature": 1.0,
                                     "top_p": 1.0, "top_k": 0, "loss_type": "dapo", "beta": 0.0,
                                     "num_iterations": 1, "log_completions_every": 0}})


def run_native(family: str, quick: bool = False, out: str | None = None) -> dict:
    """`--family qwen2_5_vl`: bench.qwen_model's ~23M-parameter Qwen2.5-VL checkpoint (--quick: the tiny one), digit
    images of 56–168 px per side; TRL loads it as `AutoModelForImageTextToText` with vlmtrain's processor and
    template (bench.trl_native), the tower and merger frozen on both sides."""
    from functools import partial

    from bench import native, qwen_model, trl_native
    from vlmtrain.train.runner import module_hashes

    n, warmup, timed, repeats = (16, 1, 2, 1) if quick else (100, 1, 4, 3)
    steps = warmup + timed
    samples = prompt_samples(n, native.IMAGE_SIDES)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ck = qwen_model.write_checkpoint(tmp / "ck", quick=quick)
        shards = records.write(samples, tmp / "shards")
        dataset = trl_dataset(samples)
        stage = _stage(shards, {"pretrained": str(ck)}, steps)
        bundle = vlm_side.start_bundle(stage)
        start, template = module_hashes(bundle.model), bundle.template
        del bundle

        def ours() -> dict:
            res = run_ours(stage, tmp, warmup)
            if res.pop("start") != start:
                raise RuntimeError("vlmtrain started from other weights than the checkpoint")
            return res

        load = partial(trl_native.load, chat_template=template)
        runs = interleaved({"vlmtrain": ours, "trl": lambda: run_trl(ck, dataset, steps, warmup, load_fn=load,
                                                                     freeze=trl_native.VISION + trl_native.CONNECTOR)},
                           repeats)
    return _result(f"grpo-{family}", quick, runs, {"family": family, "records": n, "warmup_steps": warmup,
                                                   "timed_steps": timed, "repeats": repeats}, out)


def _result(name: str, quick: bool, runs: dict, extra: dict, out: str | None) -> dict:
    med = {side: {"prompt_steps_per_s": median([r["prompt_steps_per_s"] for r in reps]),
                  "profile_s": {k: median([r["profile_s"][k] for r in reps]) for k in reps[0]["profile_s"]}}
           for side, reps in runs.items()}
    a, b = med["vlmtrain"]["prompt_steps_per_s"], med["trl"]["prompt_steps_per_s"]
    import trl

    result = {"bench": name, "quick": quick, "prompts_per_step": PROMPTS, "num_generations": G,
              "completion_tokens": N_TOKENS, "lr": LR, **extra, "runs": runs, "medians": med, "machine": machine(),
              "headline": {"ratio": a / b, "vlmtrain_steps_per_s": a, "peer_steps_per_s": b,
                           "unit": f"optimizer steps of {PROMPTS} prompts x {G} completions x {N_TOKENS} tokens",
                           "vlmtrain_profile_s": med["vlmtrain"]["profile_s"], "peer_profile_s": med["trl"]["profile_s"],
                           "peer": "trl.GRPOTrainer " + trl.__version__,
                           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}}
    save(name + ("-quick" if quick else ""), result, out)
    return result
