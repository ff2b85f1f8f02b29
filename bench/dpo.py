"""DPO throughput: vlmtrain (`fit_stage`, objective dpo, frozen copy as reference) vs `trl.DPOTrainer` 1.16
(`ref_model` = a frozen copy too), one process.

Same ~30M-parameter LLaVA-shaped model as the SFT bench (TRL trains its transformers Llava export; same initial
weights, checked by hash), same preference records (a digit image and a question; the right digit word chosen over a
wrong one, same phrasing), 8 pairs per step, max length 256, LM trained (vision tower and connector frozen), sigmoid
loss with beta 0.1, AdamW at a constant 1e-5, fp32, 2 dataloader workers. vlmtrain runs twice: as shipped (the
shared-prompt layout: one row per pair, prompt and image computed once) and with `dpo.share_prompt: false` (two
rows per pair, as TRL), so the table shows what that layout is worth on its own. Each repeat trains both sides from scratch
(interleaved); `warmup` steps are dropped and the next `timed` steps are timed end of step to end of step.

Also reported: supervised tokens/s, padding, the first batch's equality between the two sides (token ids and
scored positions) and FLOPs (`bench.flops`): executed per step per side, useful per pair, achieved GFLOP/s.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench import flops, records, trl_side, vlm_side
from bench.common import interleaved, machine, save
from bench.steady import medians, steady

MODEL = "bench/llava-30m.yaml"
QUICK_MODEL = "configs/models/tiny-clip-llama.yaml"  # --quick: the same pipeline in seconds
BATCH, WORKERS, MAX_LEN, LR, BETA = 8, 2, 256, 1e-5, 0.1


def _parity(ours: dict, peer: dict) -> dict:
    """Same tokens, and vlmtrain's supervised positions = TRL's completion positions (rows: chosen, then rejected)?"""
    same_shape = ours["input_ids"].shape == peer["input_ids"].shape
    return {"same_input_ids": same_shape and torch.equal(ours["input_ids"], peer["input_ids"]),
            "same_supervised_positions": same_shape and torch.equal(ours["labels"] != -100,
                                                                    peer["completion_mask"].bool()),
            "vlmtrain_supervised": int((ours["labels"][:, 1:] != -100).sum()),
            "peer_supervised": int(peer["completion_mask"][:, 1:].sum())}


def _flops(bundle, stage, samples, probe, peer_batch: dict, n_pairs: int) -> dict:
    m = bundle.model
    ours = {"vision": m.vision, "connector": m.connector}
    peer = {"vision": probe.model.model.vision_tower, "connector": probe.model.model.multi_modal_projector}
    # useful work: one pair alone (policy forward+backward and reference forward on chosen and rejected)
    useful = flops.mean_flops([flops.step_flops(vlm_side.step_fn(bundle, stage, vlm_side.encode_batch(
        bundle, [s], MAX_LEN)), m, ours) for s in samples[:n_pairs]])
    plain = vlm_side.encode_batch(bundle, samples[:BATCH], MAX_LEN)
    shared = vlm_side.encode_batch(bundle, samples[:BATCH], MAX_LEN, shared_prompt=True)
    executed = {"vlmtrain": flops.step_flops(vlm_side.step_fn(bundle, stage, shared), m, ours),
                "vlmtrain_unshared": flops.step_flops(vlm_side.step_fn(bundle, stage, plain), m, ours),
                "trl": flops.step_flops(trl_side.step_fn(probe, peer_batch), probe.model, peer)}
    return {"useful_per_pair": useful, "useful_shares": flops.shares(useful), "executed_per_step": executed,
            "executed_over_useful": {k: v["total"] / (BATCH * useful["total"]) for k, v in executed.items()}}


def run(quick: bool = False, out: str | None = None) -> dict:
    from vlmtrain.model.bundle import count_params
    from vlmtrain.model.hf_llava import export_llava
    from vlmtrain.train.runner import module_hashes

    n, warmup, timed, repeats, n_pairs = (200, 1, 2, 1, 2) if quick else (2000, 5, 30, 5, 16)
    steps = warmup + timed
    samples = records.preference_samples(n)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = records.write(samples, tmp / "shards")
        dataset = records.trl_dpo_dataset(samples)
        stage = vlm_side.stage_config("dpo", "dpo", shards, model=QUICK_MODEL if quick else MODEL, batch=BATCH,
                                      mode="plain", workers=WORKERS, max_len=MAX_LEN, lr=LR, steps=steps,
                                      extra={"dpo": {"beta": BETA, "loss_type": "sigmoid", "share_prompt": True}})
        # the same stage without the shared-prompt layout: what that one optimisation is worth
        unshared = vlm_side.stage_config("dpo", "dpo", shards, model=QUICK_MODEL if quick else MODEL, batch=BATCH,
                                         mode="plain", workers=WORKERS, max_len=MAX_LEN, lr=LR, steps=steps,
                                         extra={"dpo": {"beta": BETA, "loss_type": "sigmoid", "share_prompt": False}})
        bundle = vlm_side.start_bundle(stage)
        start = module_hashes(bundle.model)
        params = count_params(bundle.model)
        export_llava(bundle, tmp / "hf")
        table = vlm_side.record_table(bundle, samples, MAX_LEN)
        args = trl_side.common_args(tmp / "trl", batch=BATCH, steps=steps, lr=LR, workers=WORKERS, max_len=MAX_LEN)

        probe = trl_side.dpo_trainer(tmp / "hf", dataset, args, BETA)
        peer_batch = trl_side.collate(probe, dataset, BATCH)
        parity = _parity(vlm_side.encode_batch(bundle, samples[:BATCH], MAX_LEN), peer_batch)
        fl = _flops(bundle, stage, samples, probe, peer_batch, n_pairs)
        del probe, bundle

        def ours(st=stage) -> dict:
            logs, started = vlm_side.run(st, tmp, table)
            if started != start:
                raise RuntimeError("vlmtrain started from other weights than the ones given to TRL")
            return steady(logs, warmup, timed)

        def peer() -> dict:
            return steady(trl_side.run(trl_side.dpo_trainer(tmp / "hf", dataset, args, BETA)), warmup, timed)

        runs = interleaved({"vlmtrain": ours, "vlmtrain_unshared": lambda: ours(unshared), "trl": peer}, repeats)
    med = medians(runs)
    a, b = med["vlmtrain"]["samples_per_s"], med["trl"]["samples_per_s"]
    gflops = {k: flops.achieved(fl["useful_per_pair"]["total"] * med[k]["samples_per_s"]) for k in med}
    result = {
        "bench": "dpo", "quick": quick, "records": n, "model": stage.model, "pairs_per_step": BATCH,
        "max_len": MAX_LEN, "lr": LR, "beta": BETA, "workers": WORKERS, "warmup_steps": warmup,
        "timed_steps": timed, "repeats": repeats, "params": params, "start_weights_sha256": start,
        "parity_first_batch": parity, "runs": runs, "medians": med, "flops": fl, "achieved": gflops,
        "machine": machine(),
        "headline": {"ratio": a / b, "vlmtrain_samples_per_s": a, "peer_samples_per_s": b,
                     "unit": "preference pairs",
                     "unshared_ratio": med["vlmtrain_unshared"]["samples_per_s"] / b,
                     "vlmtrain_unshared_samples_per_s": med["vlmtrain_unshared"]["samples_per_s"],
                     "vlmtrain_supervised_tokens_per_s": med["vlmtrain"]["supervised_tokens_per_s"],
                     "peer_supervised_tokens_per_s": med["trl"]["supervised_tokens_per_s"],
                     "gflops_per_s": {k: v["gflops_per_s"] for k, v in gflops.items()},
                     "peer": "trl.DPOTrainer " + _trl_version()},
    }
    save("dpo" + ("-quick" if quick else ""), result, out)
    return result


def _trl_version() -> str:
    import trl

    return trl.__version__
