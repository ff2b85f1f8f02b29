"""SFT throughput: vlmtrain (`fit_stage`, data.mode plain and pack) vs `trl.SFTTrainer` 1.16, one process.

Same ~30M-parameter LLaVA-shaped model (`bench/llava-30m.yaml`; TRL trains its transformers Llava export, same
initial weights, checked by hash), same records (digits, 1–4 exchanges, ~90 tokens), batch 8, max length 256,
connector + LM trained, vision frozen, AdamW at a constant 1e-4, fp32, 2 dataloader workers. Packed vlmtrain
batches are 4 rows of up to 256 tokens (8–16 samples per step). Each repeat trains every side from scratch
(interleaved); `warmup` steps are dropped and the next `timed` steps are timed end of step to end of step (packed:
the steps that deliver one whole packing chunk per worker, 512 samples, since a chunk's rows come longest-first).

vlmtrain's packed sides also run with `trainer.compile` (decoder layers through torch.compile; TRL is run with its
defaults, which do not compile).

Also reported: supervised tokens/s, padding, the first batch's equality between the two sides (token ids and
supervised positions), and FLOPs (`bench.flops`): useful FLOPs per sample, executed FLOPs per step per side, and
the achieved GFLOP/s of each side.
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import torch

from bench import flops, records, trl_side, vlm_side
from bench.common import interleaved, machine, save
from bench.steady import medians, steady

MODEL = "bench/llava-30m.yaml"
QUICK_MODEL = "configs/models/tiny-clip-llama.yaml"  # --quick: the same pipeline in seconds
BATCH, WORKERS, MAX_LEN, LR = 8, 2, 256, 1e-4
PACK_ROWS, PACK_LEN = 4, 256


def _parity(ours: dict, peer: dict) -> dict:
    """Do both sides turn the same records into the same tokens and supervise the same positions?"""
    same_shape = ours["input_ids"].shape == peer["input_ids"].shape
    return {"same_input_ids": same_shape and torch.equal(ours["input_ids"], peer["input_ids"]),
            "same_supervised_positions": same_shape and torch.equal(ours["labels"] != -100, peer["labels"] != -100),
            "vlmtrain_supervised": int((ours["labels"][:, 1:] != -100).sum()),
            "peer_supervised": int((peer["labels"][:, 1:] != -100).sum())}


def _flops(bundle, stages: dict, samples, table: dict, shards: Path, probe, peer_batch: dict, n_fit: int) -> dict:
    m = bundle.model
    ours = {"vision": m.vision, "connector": m.connector}
    peer = {"vision": probe.model.model.vision_tower, "connector": probe.model.model.multi_modal_projector}
    sft = stages["sft"]

    def alone(s) -> dict:  # useful work: one sample, unpadded, through vlmtrain's own step
        return flops.step_flops(vlm_side.step_fn(bundle, sft, vlm_side.encode_batch(bundle, [s], MAX_LEN)), m, ours)

    by_len = sorted(samples, key=lambda s: table[s.record["id"]]["tokens"])
    picks = [by_len[round(q * (len(by_len) - 1) / (n_fit - 1))] for q in range(n_fit)]
    counted = [(table[s.record["id"]]["tokens"], alone(s)) for s in picks]
    model = flops.length_model([(n, c["total"]) for n, c in counted])
    median_len, median_breakdown = counted[len(counted) // 2]
    plain = vlm_side.encode_batch(bundle, samples[:BATCH], MAX_LEN)
    packed = next(iter(vlm_side.stage_loader(stages["packed"], bundle)))
    n_packed = len(packed["ids"])
    executed = {"vlmtrain": flops.step_flops(vlm_side.step_fn(bundle, sft, plain), m, ours),
                "vlmtrain_packed": flops.step_flops(vlm_side.step_fn(bundle, sft, packed), m, ours),
                "trl": flops.step_flops(trl_side.step_fn(probe, peer_batch), probe.model, peer),
                # the same padded batch with align's trainability (connector only): how much is the frozen tower
                "vlmtrain_align": flops.step_flops(vlm_side.step_fn(bundle, stages["align"], plain), m, ours)}
    useful = {"vlmtrain": sum(flops.flops_at(model, n) for n in plain["attention_mask"].sum(1).tolist()),
              "vlmtrain_packed": sum(flops.flops_at(model, table[i]["tokens"]) for i in packed["ids"])}
    useful["trl"] = useful["vlmtrain_align"] = useful["vlmtrain"]
    return {"length_model": model, "useful_at_median_length": {"length": median_len, **median_breakdown},
            "useful_shares": flops.shares(median_breakdown), "executed_per_step": executed,
            "packed_step_samples": n_packed,
            "executed_over_useful": {k: v["total"] / useful[k] for k, v in executed.items()},
            "align_vision_share": executed["vlmtrain_align"]["vision"] / executed["vlmtrain_align"]["total"]}


def run(quick: bool = False, out: str | None = None) -> dict:
    from vlmtrain.model.hf_llava import export_llava
    from vlmtrain.model.bundle import count_params
    from vlmtrain.train.runner import module_hashes

    from vlmtrain.data.loader import LoaderConfig

    n, warmup, timed, repeats, n_fit = (200, 1, 2, 1, 3) if quick else (2000, 5, 30, 5, 5)
    steps = warmup + timed
    pack_cycle = WORKERS * LoaderConfig().pack_chunk  # samples in one packing chunk of every worker
    samples = records.chat_samples(n)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = records.write(samples, tmp / "shards")
        dataset = records.trl_sft_dataset(samples)
        kw = dict(model=QUICK_MODEL if quick else MODEL, workers=WORKERS, max_len=MAX_LEN, lr=LR, steps=steps)
        pack = dict(batch=PACK_ROWS, mode="pack", pack_len=PACK_LEN)
        bf16 = {"trainer": {"precision": "bf16-mixed"}}  # CPU/GPU autocast to bf16, fp32 weights (TRL's bf16=True)
        stages = {"sft": vlm_side.stage_config("sft", "sft", shards, batch=BATCH, mode="plain", **kw),
                  "packed": vlm_side.stage_config("sft", "sft", shards, **pack, **kw),
                  "align": vlm_side.stage_config("align", "align", shards, batch=BATCH, mode="plain", **kw)}
        bundle = vlm_side.start_bundle(stages["sft"])
        # The packed window spans whole packing chunks (one per worker): see vlm_side.window_steps.
        packed_timed = timed if quick else vlm_side.window_steps(stages["packed"], bundle, warmup, pack_cycle)
        stages["packed"] = vlm_side.stage_config("sft", "sft", shards, **pack,
                                                 **{**kw, "steps": warmup + packed_timed})
        stages["sft_bf16"] = vlm_side.stage_config("sft", "sft", shards, batch=BATCH, mode="plain", **kw, extra=bf16)
        stages["packed_bf16"] = vlm_side.stage_config("sft", "sft", shards, **pack,
                                                      **{**kw, "steps": warmup + packed_timed}, extra=bf16)
        # + trainer.compile (decoder layers through torch.compile; the warm-up steps absorb the compile)
        comp = {"trainer": {"compile": True}}
        stages["packed_compiled"] = vlm_side.stage_config("sft", "sft", shards, **pack,
                                                          **{**kw, "steps": warmup + packed_timed}, extra=comp)
        stages["packed_bf16_compiled"] = vlm_side.stage_config(
            "sft", "sft", shards, **pack, **{**kw, "steps": warmup + packed_timed},
            extra={"trainer": {**bf16["trainer"], **comp["trainer"]}})
        start = module_hashes(bundle.model)
        params = count_params(bundle.model)
        export_llava(bundle, tmp / "hf")
        table = vlm_side.record_table(bundle, samples, MAX_LEN)
        args = trl_side.common_args(tmp / "trl", batch=BATCH, steps=steps, lr=LR, workers=WORKERS, max_len=MAX_LEN)
        args_bf16 = trl_side.common_args(tmp / "trl", batch=BATCH, steps=steps, lr=LR, workers=WORKERS,
                                         max_len=MAX_LEN, bf16=True)

        probe = trl_side.sft_trainer(tmp / "hf", dataset, args)
        peer_batch = trl_side.collate(probe, dataset, BATCH)
        parity = _parity(vlm_side.encode_batch(bundle, samples[:BATCH], MAX_LEN), peer_batch)
        fl = _flops(bundle, stages, samples, table, shards, probe, peer_batch, n_fit)
        per_len = partial(flops.flops_at, fl["length_model"])
        del probe, bundle

        def ours(stage, n_timed: int):
            def side() -> dict:
                logs, started = vlm_side.run(stage, tmp, table)
                if started != start:
                    raise RuntimeError("vlmtrain started from other weights than the ones given to TRL")
                return steady(logs, warmup, n_timed, per_len)
            return side

        def peer(a=args) -> dict:
            return steady(trl_side.run(trl_side.sft_trainer(tmp / "hf", dataset, a)), warmup, timed, per_len)

        runs = interleaved({"vlmtrain": ours(stages["sft"], timed),
                            "vlmtrain_packed": ours(stages["packed"], packed_timed), "trl": peer,
                            # the same three in bf16 autocast (TRL's default precision), fp32 weights on both sides
                            "vlmtrain_bf16": ours(stages["sft_bf16"], timed),
                            "vlmtrain_packed_bf16": ours(stages["packed_bf16"], packed_timed),
                            "trl_bf16": lambda: peer(args_bf16),
                            "vlmtrain_packed_compiled": ours(stages["packed_compiled"], packed_timed),
                            "vlmtrain_packed_bf16_compiled": ours(stages["packed_bf16_compiled"], packed_timed)},
                           repeats)
    med = medians(runs)
    a, p, b = (med[k]["samples_per_s"] for k in ("vlmtrain", "vlmtrain_packed", "trl"))
    sup = {k: med[k]["supervised_tokens_per_s"] for k in med}
    gflops = {k: flops.achieved(med[k]["useful_flops_per_s"]) for k in med}
    result = {
        "bench": "sft", "quick": quick, "records": n, "model": kw["model"], "batch_size": BATCH, "pack_rows": PACK_ROWS,
        "pack_len": PACK_LEN, "max_len": MAX_LEN, "lr": LR, "workers": WORKERS, "warmup_steps": warmup,
        "timed_steps": timed, "packed_timed_steps": packed_timed, "packed_window_samples": pack_cycle,
        "repeats": repeats, "params": params, "start_weights_sha256": start,
        "parity_first_batch": parity, "runs": runs, "medians": med, "flops": fl, "achieved": gflops,
        "machine": machine(),
        "headline": {"ratio": a / b, "vlmtrain_samples_per_s": a, "peer_samples_per_s": b,
                     "packed_ratio": p / b, "vlmtrain_packed_samples_per_s": p,
                     "vlmtrain_supervised_tokens_per_s": sup["vlmtrain"],
                     "vlmtrain_packed_supervised_tokens_per_s": sup["vlmtrain_packed"],
                     "peer_supervised_tokens_per_s": sup["trl"],
                     "gflops_per_s": {k: v["gflops_per_s"] for k, v in gflops.items()},
                     "packed_compiled_ratio": med["vlmtrain_packed_compiled"]["samples_per_s"] / b,
                     "vlmtrain_packed_compiled_samples_per_s": med["vlmtrain_packed_compiled"]["samples_per_s"],
                     "peer": "trl.SFTTrainer " + _trl_version(),
                     "bf16": {"ratio": med["vlmtrain_bf16"]["samples_per_s"] / med["trl_bf16"]["samples_per_s"],
                              "packed_ratio": (med["vlmtrain_packed_bf16"]["samples_per_s"]
                                               / med["trl_bf16"]["samples_per_s"]),
                              "vlmtrain_samples_per_s": med["vlmtrain_bf16"]["samples_per_s"],
                              "vlmtrain_packed_samples_per_s": med["vlmtrain_packed_bf16"]["samples_per_s"],
                              "packed_compiled_ratio": (med["vlmtrain_packed_bf16_compiled"]["samples_per_s"]
                                                        / med["trl_bf16"]["samples_per_s"]),
                              "vlmtrain_packed_compiled_samples_per_s": (
                                  med["vlmtrain_packed_bf16_compiled"]["samples_per_s"]),
                              "peer_samples_per_s": med["trl_bf16"]["samples_per_s"]}},
    }
    save("sft" + ("-quick" if quick else ""), result, out)
    return result


def _trl_version() -> str:
    import trl

    return trl.__version__
