"""`python -m bench sft --family qwen2_5_vl` / `python -m bench dpo --family qwen2_5_vl`: vlmtrain vs TRL on a
native transformers VLM, one process.

Model: bench.qwen_model's ~23M-parameter Qwen2.5-VL-shaped checkpoint (`save_pretrained` folder; --quick: the
64-d tiny one). vlmtrain loads it with a native model config (`pretrained: DIR`) through the normal stage path
(`fit_stage`); TRL loads `AutoModelForImageTextToText` + vlmtrain's processor.py processor from the same folder
(bench.trl_native). Same records (bench.records with digit images of 56–168 px per side, so 4–36 image tokens per
image, and 1–4 exchanges or varied answer phrasings), batch 4, max length 256, AdamW at a constant LR, 2 dataloader
workers, fp32 and CPU/GPU bf16 autocast (TRL's `bf16=True`; fp32 weights on both sides). SFT trains merger + LM
(tower frozen), DPO the LM (tower + merger frozen; vlmtrain as shipped, one shared-prefix row per pair — prompt and
image computed once —, and with `dpo.share_prompt: false`, two rows per pair as TRL). Sides are interleaved over
repeats; medians. Same-work checks: both sides start from
the same weights (every tensor equal by name) and the first batch has the same token ids and supervised positions.

Packing: run automatically once train/native.py stops refusing `data.mode: pack` for native families; until then
`packed_ratio` is null and `packed_refused` says why. Profile (bench.native_profile): vision tower / LM forward /
head+loss+backward on the first batch for both sides, and the data-wait share of every timed run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench import native_profile, qwen_model, records, trl_native, trl_side, vlm_side
from bench.common import interleaved, machine, save
from bench.steady import medians, steady

FAMILIES = ("qwen2_5_vl",)
IMAGE_SIDES = (56, 84, 112, 140, 168)  # px per side, drawn per image for width and height
BATCH, WORKERS, MAX_LEN, PACK_ROWS = 4, 2, 256, 2
SFT_LR, DPO_LR, BETA = 1e-4, 1e-5, 0.1
BF16 = {"trainer": {"precision": "bf16-mixed"}}


def _sizes(quick: bool) -> tuple[int, int, int, int]:
    """records, warm-up steps, timed steps, repeats."""
    return (48, 1, 2, 1) if quick else (96, 1, 3, 2)


def _same_start(bundle, peer_model) -> dict:
    """Every parameter and buffer of TRL's model equals vlmtrain's start model's (by name, bit for bit)."""
    ours = bundle.model.hf.state_dict()
    theirs = peer_model.state_dict()
    differ = sorted(k for k in ours.keys() | theirs.keys()
                    if k not in ours or k not in theirs or not torch.equal(ours[k], theirs[k]))
    return {"tensors": len(ours), "all_equal": not differ, "differ": differ[:10]}


def _parity(ours: dict, peer: dict, peer_mask, tokenizer) -> dict:
    """Same token ids, image grids and supervised (scored) positions? Where the positions differ, which tokens."""
    same_shape = ours["input_ids"].shape == peer["input_ids"].shape
    ours_mask, peer_mask = ours["labels"] != -100, peer_mask.bool()
    differ = {}
    if same_shape:
        for name, only in (("peer_only", peer_mask & ~ours_mask), ("vlmtrain_only", ours_mask & ~peer_mask)):
            toks = ours["input_ids"][only].tolist()
            differ[name] = {"count": len(toks), "tokens": sorted({tokenizer.decode([t]) for t in toks})}
    return {"differing_supervised_positions": differ,
            "same_input_ids": same_shape and torch.equal(ours["input_ids"], peer["input_ids"]),
            "same_supervised_positions": same_shape and torch.equal(ours_mask, peer_mask),
            "same_image_grid_thw": torch.equal(ours["image_grid_thw"], peer["image_grid_thw"]),
            "image_tokens_per_image": (ours["image_grid_thw"].prod(1) // 4).tolist(),
            "vlmtrain_supervised": int((ours["labels"][:, 1:] != -100).sum()),
            "peer_supervised": int(peer_mask[:, 1:].sum())}


def _packing_refusal(stage) -> str | None:
    from vlmtrain.train.native import native_refusals

    return next((p for p in native_refusals(stage) if "pack" in p), None)


def _ours(stage, tmp: Path, table: dict, start: dict, warmup: int, timed: int):
    def side() -> dict:
        waits: list[dict] = []
        with native_profile.vlmtrain_waits(waits):
            logs, started = vlm_side.run(stage, tmp, table)
        if started != start:
            raise RuntimeError("vlmtrain started from other weights than the ones TRL loads")
        return {**steady(logs, warmup, timed),
                "data_wait_share": native_profile.wait_share([w["data_wait"] for w in waits], logs, warmup, timed)}
    return side


def _peer(make_trainer, warmup: int, timed: int):
    def side() -> dict:
        trainer = make_trainer()
        waits = native_profile.trl_waits(trainer)
        logs = trl_side.run(trainer)
        return {**steady(logs, warmup, timed), "data_wait_share": native_profile.wait_share(waits, logs, warmup,
                                                                                            timed)}
    return side


def _profile(bundle, stage, batch: dict, probe, peer_batch: dict) -> dict:
    return {"vlmtrain": native_profile.forward_split(bundle.model.hf, vlm_side.step_fn(bundle, stage, batch)),
            "trl": native_profile.forward_split(probe.model, trl_side.step_fn(probe, peer_batch))}


def _common(kind: str, quick: bool, family: str):
    if family not in FAMILIES:
        raise ValueError(f"--family {family}: the native benches cover {', '.join(FAMILIES)}")
    n, warmup, timed, repeats = _sizes(quick)
    make = records.chat_samples if kind == "sft" else records.preference_samples
    return make(n, image_sides=IMAGE_SIDES), n, warmup, timed, repeats


def run_sft(family: str, quick: bool = False, out: str | None = None) -> dict:
    from vlmtrain.model.bundle import count_params
    from vlmtrain.train.runner import module_hashes

    samples, n, warmup, timed, repeats = _common("sft", quick, family)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ck = qwen_model.write_checkpoint(tmp / "checkpoint", quick=quick)
        shards = records.write(samples, tmp / "shards")
        dataset = records.trl_sft_dataset(samples)
        kw = dict(model={"pretrained": str(ck)}, workers=WORKERS, max_len=MAX_LEN, lr=SFT_LR, steps=warmup + timed)
        stages = {"sft": vlm_side.stage_config("sft", "sft", shards, batch=BATCH, mode="plain", **kw),
                  "sft_bf16": vlm_side.stage_config("sft", "sft", shards, batch=BATCH, mode="plain", **kw,
                                                    extra=BF16)}
        packed = vlm_side.stage_config("sft", "sft", shards, batch=PACK_ROWS, mode="pack", pack_len=MAX_LEN, **kw)
        refused = _packing_refusal(packed)
        if refused is None:
            stages["packed"] = packed
            stages["packed_bf16"] = vlm_side.stage_config("sft", "sft", shards, batch=PACK_ROWS, mode="pack",
                                                          pack_len=MAX_LEN, **kw, extra=BF16)
        bundle = vlm_side.start_bundle(stages["sft"])
        start, params = module_hashes(bundle.model), count_params(bundle.model)
        table = vlm_side.record_table(bundle, samples, MAX_LEN)
        args = {p: trl_side.common_args(tmp / "trl", batch=BATCH, steps=warmup + timed, lr=SFT_LR, workers=WORKERS,
                                        max_len=MAX_LEN, bf16=p == "bf16") for p in ("fp32", "bf16")}
        template = bundle.template  # the marked template vlmtrain labels with; TRL gets it too (bench.trl_native)
        tokenizer = bundle.processor.tokenizer
        probe = trl_native.sft_trainer(ck, dataset, args["fp32"], template)
        peer_batch = trl_side.collate(probe, dataset, BATCH)
        ours_batch = vlm_side.encode_batch(bundle, samples[:BATCH], MAX_LEN)
        checks = {"start_weights": _same_start(bundle, probe.model),
                  "first_batch": _parity(ours_batch, peer_batch, peer_batch["labels"] != -100, tokenizer)}
        profile = _profile(bundle, stages["sft"], ours_batch, probe, peer_batch)
        del probe, bundle
        sides = {"vlmtrain": _ours(stages["sft"], tmp, table, start, warmup, timed),
                 "trl": _peer(lambda: trl_native.sft_trainer(ck, dataset, args["fp32"], template), warmup, timed),
                 "vlmtrain_bf16": _ours(stages["sft_bf16"], tmp, table, start, warmup, timed),
                 "trl_bf16": _peer(lambda: trl_native.sft_trainer(ck, dataset, args["bf16"], template), warmup, timed)}
        if refused is None:
            sides["vlmtrain_packed"] = _ours(stages["packed"], tmp, table, start, warmup, timed)
            sides["vlmtrain_packed_bf16"] = _ours(stages["packed_bf16"], tmp, table, start, warmup, timed)
        runs = interleaved(sides, repeats)
    med = medians(runs)
    rate = {k: v["samples_per_s"] for k, v in med.items()}
    packed_ratio = None if refused else rate["vlmtrain_packed"] / rate["trl"]
    headline = {"ratio": rate["vlmtrain"] / rate["trl"], "vlmtrain_samples_per_s": rate["vlmtrain"],
                "peer_samples_per_s": rate["trl"], "packed_ratio": packed_ratio,
                "vlmtrain_packed_samples_per_s": rate.get("vlmtrain_packed"), "packed_refused": refused,
                "family": family, "peer": "trl.SFTTrainer " + _trl_version(),
                "bf16": {"ratio": rate["vlmtrain_bf16"] / rate["trl_bf16"],
                         "vlmtrain_samples_per_s": rate["vlmtrain_bf16"], "peer_samples_per_s": rate["trl_bf16"],
                         "packed_ratio": None if refused else rate["vlmtrain_packed_bf16"] / rate["trl_bf16"],
                         "vlmtrain_packed_samples_per_s": rate.get("vlmtrain_packed_bf16")},
                "data_wait_share": {k: v["data_wait_share"] for k, v in med.items()}}
    result = _result("sft", family, quick, n, warmup, timed, repeats, params, checks, profile, runs, med, headline,
                     {"batch_size": BATCH, "pack_rows": PACK_ROWS, "max_len": MAX_LEN, "lr": SFT_LR})
    save(f"sft-{family}" + ("-quick" if quick else ""), result, out)
    return result


def run_dpo(family: str, quick: bool = False, out: str | None = None) -> dict:
    from vlmtrain.model.bundle import count_params
    from vlmtrain.train.runner import module_hashes

    samples, n, warmup, timed, repeats = _common("dpo", quick, family)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ck = qwen_model.write_checkpoint(tmp / "checkpoint", quick=quick)
        shards = records.write(samples, tmp / "shards")
        dataset = records.trl_dpo_dataset(samples)
        dpo = {"dpo": {"beta": BETA, "loss_type": "sigmoid", "share_prompt": True}}
        two_rows = {"dpo": {"beta": BETA, "loss_type": "sigmoid", "share_prompt": False}}
        kw = dict(model={"pretrained": str(ck)}, batch=BATCH, mode="plain", workers=WORKERS, max_len=MAX_LEN,
                  lr=DPO_LR, steps=warmup + timed)
        stages = {"fp32": vlm_side.stage_config("dpo", "dpo", shards, **kw, extra=dpo),
                  "bf16": vlm_side.stage_config("dpo", "dpo", shards, **kw, extra={**dpo, **BF16}),
                  # the same stage in two rows per pair: what the shared-prefix layout is worth on its own
                  "two_rows": vlm_side.stage_config("dpo", "dpo", shards, **kw, extra=two_rows)}
        bundle = vlm_side.start_bundle(stages["fp32"])
        start, params = module_hashes(bundle.model), count_params(bundle.model)
        table = vlm_side.record_table(bundle, samples, MAX_LEN)
        args = {p: trl_side.common_args(tmp / "trl", batch=BATCH, steps=warmup + timed, lr=DPO_LR, workers=WORKERS,
                                        max_len=MAX_LEN, bf16=p == "bf16") for p in ("fp32", "bf16")}
        template, tokenizer = bundle.template, bundle.processor.tokenizer
        probe = trl_native.dpo_trainer(ck, dataset, args["fp32"], BETA, template)
        peer_batch = trl_side.collate(probe, dataset, BATCH)
        ours_batch = vlm_side.encode_batch(bundle, samples[:BATCH], MAX_LEN)
        checks = {"start_weights": _same_start(bundle, probe.model),
                  "first_batch": _parity(ours_batch, peer_batch, peer_batch["completion_mask"], tokenizer)}
        shared_batch = vlm_side.encode_batch(bundle, samples[:BATCH], MAX_LEN, shared_prompt=True)
        checks["shared_rows_first_batch"] = {"rows": int(shared_batch["input_ids"].shape[0]),
                                             "row_len": int(shared_batch["input_ids"].shape[1]),
                                             "two_row_tokens": int(ours_batch["attention_mask"].sum()),
                                             "shared_row_tokens": int((shared_batch["segments"] >= 0).sum()),
                                             "scored": int(shared_batch["targets"].numel())}
        profile = _profile(bundle, stages["fp32"], shared_batch, probe, peer_batch)
        profile["vlmtrain_two_rows"] = _profile(bundle, stages["two_rows"], ours_batch, probe, peer_batch)["vlmtrain"]
        del probe, bundle
        sides = {}
        for p in ("fp32", "bf16"):
            sfx = "" if p == "fp32" else "_bf16"
            sides["vlmtrain" + sfx] = _ours(stages[p], tmp, table, start, warmup, timed)
            sides["trl" + sfx] = _peer(lambda a=args[p]: trl_native.dpo_trainer(ck, dataset, a, BETA, template), warmup,
                                       timed)
            if p == "fp32":
                sides["vlmtrain_two_rows"] = _ours(stages["two_rows"], tmp, table, start, warmup, timed)
        runs = interleaved(sides, repeats)
    med = medians(runs)
    rate = {k: v["samples_per_s"] for k, v in med.items()}
    headline = {"ratio": rate["vlmtrain"] / rate["trl"], "vlmtrain_samples_per_s": rate["vlmtrain"],
                "peer_samples_per_s": rate["trl"], "unit": "preference pairs", "family": family,
                "two_rows_ratio": rate["vlmtrain_two_rows"] / rate["trl"],
                "vlmtrain_two_rows_samples_per_s": rate["vlmtrain_two_rows"],
                "peer": "trl.DPOTrainer " + _trl_version(),
                "bf16": {"ratio": rate["vlmtrain_bf16"] / rate["trl_bf16"],
                         "vlmtrain_samples_per_s": rate["vlmtrain_bf16"], "peer_samples_per_s": rate["trl_bf16"]},
                "data_wait_share": {k: v["data_wait_share"] for k, v in med.items()}}
    result = _result("dpo", family, quick, n, warmup, timed, repeats, params, checks, profile, runs, med, headline,
                     {"pairs_per_step": BATCH, "max_len": MAX_LEN, "lr": DPO_LR, "beta": BETA})
    save(f"dpo-{family}" + ("-quick" if quick else ""), result, out)
    return result


def _result(bench, family, quick, n, warmup, timed, repeats, params, checks, profile, runs, med, headline,
            settings) -> dict:
    return {"bench": bench, "family": family, "quick": quick, "records": n, "image_sides": IMAGE_SIDES,
            "workers": WORKERS, "warmup_steps": warmup, "timed_steps": timed, "repeats": repeats, **settings,
            "params": params, "same_work": checks, "profile_first_batch": profile, "runs": runs, "medians": med,
            "machine": machine(), "headline": headline}


def _trl_version() -> str:
    import trl

    return trl.__version__
