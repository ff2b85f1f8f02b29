"""Run one stage (`vlmtrain fit`) or a multi-stage recipe (`vlmtrain run`), top to bottom.

Run directory of a stage:
    checkpoints/last.ckpt   Lightning checkpoint: trainable weights, optimizer, scheduler, loop state,
                            plus vlmtrain's data cursor and RNG states (exact resume)
    model/                  the stage's output model (vlmtrain format; the next stage starts from it)
    metrics.jsonl, loss.png, eval.png, summary.json, stage.json, config.yaml
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import yaml

from vlmtrain.config.load import validate
from vlmtrain.config.model import ModelConfig, NativeModelConfig, is_native_config
from vlmtrain.config.stage import StageConfig
from vlmtrain.errors import VlmtrainError
from vlmtrain.train import phases, preempt
from vlmtrain.train.lock import holding_lock, lock_run_dir
from vlmtrain.train.finalize import is_complete, record_final_eval, training_figures, write_json_atomic
from vlmtrain.train.recipe import load_stage_config, resolve_recipe  # noqa: F401  (callers import them here)

log = logging.getLogger("vlmtrain.train")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def module_hashes(model) -> dict[str, str]:
    """sha256 (16 hex) of each module's weights: the handoff check between stages."""
    out = {}
    for name in ("vision", "connector", "llm"):
        h = hashlib.sha256()
        for k, v in getattr(model, name).state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        out[name] = h.hexdigest()[:16]
    return out


def _resolve_model(ref, base_dir: Path) -> ModelConfig | NativeModelConfig:
    from vlmtrain.config.load import load_model_config

    if isinstance(ref, (ModelConfig, NativeModelConfig)):
        return ref
    if isinstance(ref, dict):
        return validate(NativeModelConfig if is_native_config(ref) else ModelConfig, ref, prefix="model")
    p = Path(ref)
    for cand in (base_dir / p, p):
        if cand.is_file():
            return load_model_config(cand)
    raise VlmtrainError(f"model: file not found: {ref}")


def _sources(refs, data_root: Path):
    from vlmtrain.data.builtin import prepare_builtin
    from vlmtrain.data.shards import Source

    out = []
    for r in refs:
        if r.builtin:
            phases.mark("data_prep")
        path = str(prepare_builtin(r.builtin, data_root)) if r.builtin else r.path
        out.append(Source(path, r.weight))
    return out


def _rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def load_stage_start(stage: StageConfig, base_dir: Path):
    """The model a stage starts from: its parent's output folder, or a fresh build (seeded) from the model config."""
    import lightning.pytorch as pl

    from vlmtrain.model import build_model
    from vlmtrain.model.io import load_any

    pl.seed_everything(stage.trainer.seed, workers=True, verbose=False)
    if stage.init_from:
        bundle = load_any(stage.init_from)
    elif stage.model is None:
        raise VlmtrainError("stage: give `model` (first stage) or `init_from`")
    else:
        bundle = build_model(_resolve_model(stage.model, base_dir))
    if stage.lora is not None and stage.lora.quantize:  # QLoRA: the LLM's Linears become NF4 before adapters
        import torch

        from vlmtrain.model.quantize import quantize_llm_

        compute = torch.bfloat16 if stage.trainer.precision.startswith("bf16") else torch.float32
        n = quantize_llm_(bundle.model, compute)
        log.info(f"QLoRA: {n} LLM linear layers quantised to 4-bit NF4 (double quantisation), compute {compute}")
    if stage.lora is not None:
        from vlmtrain.model.lora import apply_lora

        apply_lora(bundle.model, stage.lora, llm=stage.train.llm == "lora", vision=stage.train.vision == "lora")
    return bundle


def fit_stage(stage: StageConfig, run_dir: str | Path, data_root: str | Path | None = None, resume: bool = False,
              base_dir: str | Path = ".", parent: dict | None = None) -> dict:
    """Train one stage into `run_dir` (or finish it, with `resume`); holds the directory's lock while it runs."""
    with holding_lock(run_dir):
        return _fit_stage(stage, run_dir, data_root, resume, base_dir, parent)


def _fit_stage(stage: StageConfig, run_dir: str | Path, data_root: str | Path | None, resume: bool,
               base_dir: str | Path, parent: dict | None) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from vlmtrain.data.inspect import encoder_for
    from vlmtrain.data.loader import ShardLoader
    from vlmtrain.model.io import save_model_folder
    from vlmtrain.train.checkpoint_io import AtomicCheckpointIO
    from vlmtrain.train.evaluate import evaluate
    from vlmtrain.train.freeze import apply_stage_trainability
    from vlmtrain.train.module import StepWindows, VLMModule
    from vlmtrain.train.recorder import Recorder, plot_metrics
    from vlmtrain.train.strategy import make_strategy

    from vlmtrain.train.strategy import init_distributed, rank_zero_first

    for name in ("lightning.pytorch", "lightning.fabric"):  # Lightning sets INFO at import; keep its warnings only
        logging.getLogger(name).setLevel(logging.WARNING)
    import warnings

    # vlmtrain checkpoints after the optimizer step on purpose (the state a resume continues from)
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    run_dir = Path(run_dir)
    base_dir = Path(base_dir)
    data_root = Path(data_root) if data_root else run_dir.parent / "data"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    init_distributed()

    def prepare_run_dir() -> None:
        if run_dir.exists() and any(run_dir.iterdir()) and not resume:
            raise VlmtrainError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
        lock_run_dir(run_dir)  # a second live run on this directory is refused (train.lock)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(stage.model_dump(mode="json"), sort_keys=False))

    rank_zero_first(prepare_run_dir, others=False)
    phases.enter_stage(stage.name)
    phases.mark("setup")
    t0 = time.time()
    log.info(f"== stage {stage.name} ({stage.preset or 'custom'}, objective {stage.objective}) → {run_dir}")

    bundle = load_stage_start(stage, base_dir)
    start_hashes = module_hashes(bundle.model)
    table = apply_stage_trainability(bundle.model, stage.train)
    if stage.lora is not None:
        from vlmtrain.model.lora import lora_layers

        log.info(f"LoRA r={stage.lora.r} alpha={stage.lora.alpha}: {len(lora_layers(bundle.model))} adapted layers")
    if bundle.native:
        from vlmtrain.train.native import check_native_stage

        check_native_stage(stage, bundle)
    if stage.trainer.grad_checkpointing and bundle.native:
        bundle.model.enable_gradient_checkpointing()
    elif stage.trainer.grad_checkpointing:
        bundle.model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if stage.train.vision:
            bundle.model.vision.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    if stage.trainer.compile:
        from vlmtrain.train.compile import compile_decoder_layers

        compile_decoder_layers(bundle.model)

    d = stage.data
    encoder = encoder_for(bundle, d.max_len, d.caption_prompt, d.anyres_pinpoints)
    # builtin datasets are written once, by rank 0, before the other ranks look for them
    train_sources = rank_zero_first(_sources, d.train, data_root)
    eval_sources = rank_zero_first(_sources, [stage.eval.data], data_root) if stage.eval.data else None
    if stage.audit is not None:  # canaries planted, members listed, for `vlmtrain privacy audit`
        from vlmtrain.privacy.audit import prepare_audit

        holdout = rank_zero_first(_sources, [stage.audit.holdout], data_root)[0] if stage.audit.holdout else None
        train_sources = rank_zero_first(prepare_audit, stage.audit, train_sources, holdout, run_dir, encoder)
    dp = None
    if stage.privacy is not None:  # DP-SGD: Poisson batches over a map-style view of the shards (privacy.dp)
        from vlmtrain.privacy.dp import build_dp_training

        dp = build_dp_training(stage, bundle, encoder, train_sources, run_dir)
        dp_data, dp_plan, train_data, module = dp
        loader = dp_data  # .skipped: malformed records counted while the view was built
    else:
        loader = ShardLoader(train_sources, encoder, bundle.tokenizer.pad_token_id,
                             batch_size=d.batch_size, num_workers=d.num_workers, seed=stage.trainer.seed,
                             shuffle_buffer=d.shuffle_buffer, mode=d.mode, pack_len=d.pack_len or d.max_len,
                             max_bad_fraction=d.max_bad_fraction, split=d.split, cache_mb=d.encoded_cache_mb,
                             share_prompt_image_token=(bundle.model.image_token_id if stage.objective == "dpo"
                                                       and stage.dpo.share_prompt and not bundle.native
                                                       else None))
    eval_shards = str(eval_sources[0].path) if eval_sources else None

    def run_eval() -> dict:
        return evaluate(bundle, eval_shards, stage.eval.max_samples, stage.eval.max_new_tokens,
                        stage.eval.batch_size)

    before_path = run_dir / "eval_before.json"
    eval_before = None
    if eval_shards and _rank_zero():
        if before_path.is_file():
            eval_before = json.loads(before_path.read_text())
        else:
            phases.mark("eval_before")
            eval_before = run_eval()
            write_json_atomic(before_path, eval_before)
            log.info("eval before: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_before.items()))

    if dp is None:
        module = VLMModule(bundle, stage, loader)
        train_data = StepWindows(loader, stage.trainer.grad_accum)
    tr = stage.trainer
    recorder = Recorder(run_dir, tr.max_steps, tr.log_every_n_steps,
                        evaluator=run_eval if eval_shards else None, eval_every=stage.eval.every_n_steps,
                        log_sample_ids=tr.log_sample_ids)
    logger = False
    if tr.wandb:
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(project=tr.wandb_project, name=f"{run_dir.parent.name}/{stage.name}",
                             save_dir=str(run_dir), offline=not tr.wandb_online)
    strategy, devices, nodes = make_strategy(stage, native=bundle.native)
    trainer = pl.Trainer(
        max_steps=tr.max_steps, max_epochs=-1, accelerator="auto", devices=devices, num_nodes=nodes,
        strategy=strategy, precision=tr.precision, logger=logger,
        callbacks=[ModelCheckpoint(dirpath=run_dir / "checkpoints", save_top_k=0, save_last=True,
                                   every_n_train_steps=tr.save_every_n_steps), recorder,
                   preempt.PreemptionCheckpoint(ckpt)],
        plugins=[AtomicCheckpointIO()], enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
        default_root_dir=str(run_dir), log_every_n_steps=tr.log_every_n_steps,
    )
    from vlmtrain.train.checkpoint_io import resolve_last

    resume_from = resolve_last(ckpt) if resume else None
    if resume_from:
        log.info(f"resuming from {resume_from}")
    from vlmtrain.data.loader import stop_receivers

    try:  # a preemption signal during training stops at the next step boundary, after a checkpoint
        with preempt.defer_to_step_boundary():
            trainer.fit(module, train_dataloaders=train_data,
                        ckpt_path=str(resume_from) if resume_from else None)
    finally:
        stop_receivers()  # the loader's background receiver ends with training, not at interpreter exit
    phases.mark("train_done")
    trainer.save_checkpoint(ckpt)
    phases.mark("final_checkpoint")
    if tr.strategy == "fsdp":  # gather the shards; rank 0 continues with an ordinary (unsharded) model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(bundle.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if _rank_zero():
            bundle = load_stage_start(stage, base_dir)
            bundle.model.load_state_dict(full)
    if tr.strategy == "deepspeed_zero3":  # partitioned parameters: gather on every rank, rank 0 keeps a copy
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(bundle.model.parameters()), modifier_rank=None):
            full = {k: v.detach().cpu().clone() for k, v in bundle.model.state_dict().items()} if _rank_zero() else None
        if _rank_zero():
            bundle = load_stage_start(stage, base_dir)
            bundle.model.load_state_dict(full)
    skipped = _all_ranks_counter(loader.skipped)

    # the recorder's totals come back with the checkpoint, so a stage resumed after its training finished (a kill
    # during finalisation) still reports all of its steps; metrics.jsonl is the fallback
    fig = training_figures(recorder, run_dir / "metrics.jsonl", trainer.global_step)
    summary = {"stage": stage.name, "status": "completed", "steps": trainer.global_step,
               "final_loss": fig["final_loss"], "samples": fig["samples"], "tokens": fig["tokens"],
               "samples_per_s": fig["samples_per_s"], "tokens_per_s": fig["tokens_per_s"],
               "train_seconds": fig["train_seconds"], "skipped": skipped}
    if stage.objective == "next_token":  # share of (non-pad) tokens that carry a loss
        summary["supervised_fraction"] = fig["supervised"] / max(fig["tokens"], 1)
    cache = getattr(module.model, "vision_cache", None)
    if cache is not None:  # steps whose images all came from the frozen-tower feature cache
        summary["vision_feature_cache"] = {"hit_steps": cache.hits, "miss_steps": cache.misses,
                                           "images": len(cache.store), "mib": cache.used / 2**20}
    if dp is not None:
        from vlmtrain.privacy.dp import privacy_summary

        summary["privacy"] = privacy_summary(module, dp_plan, dp_data)
        log.info(f"DP-SGD: ε = {summary['privacy']['epsilon']:.3f} at δ = {dp_plan.delta:g} after "
                 f"{summary['privacy']['steps']} steps")
    if _rank_zero():
        from vlmtrain.model.lora import adapter_state_dict, has_lora, merge_lora_

        if has_lora(bundle.model):  # keep the adapter (PEFT export), hand the next stage a merged model
            from safetensors.torch import save_file

            phases.mark("adapter")
            (run_dir / "adapter").mkdir(exist_ok=True)
            save_file(adapter_state_dict(bundle.model), str(run_dir / "adapter" / "adapter.safetensors"))
            (run_dir / "adapter" / "lora.json").write_text(json.dumps(stage.lora.model_dump(mode="json")))
            if stage.lora.quantize:  # the output model is full precision: the dequantised base + merged adapters
                from vlmtrain.model.quantize import dequantize_

                dequantize_(bundle.model)
            merge_lora_(bundle.model)
        phases.mark("model_save")
        save_model_folder(bundle, run_dir / "model")
        if eval_shards:
            phases.mark("eval_after")
            summary["eval"] = run_eval()
            summary["eval_before"] = eval_before
            record_final_eval(run_dir / "metrics.jsonl", trainer.global_step, summary["eval"])
            log.info("eval after: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items()))
        summary["plots"] = plot_metrics(run_dir)
        summary["wall_seconds"] = time.time() - t0
        stage_json = {
            "name": stage.name, "preset": stage.preset, "objective": stage.objective,
            "parent": parent, "config_hash": _hash(stage.model_dump(mode="json")),
            "trainable": table, "weights_sha256": {"start": start_hashes, "end": module_hashes(bundle.model)},
            "template": bundle.template or bundle.tokenizer.chat_template,
            "image_processor": bundle.image_processor.to_dict(),
            "image_tokens": bundle.model.num_image_tokens,
        }
        write_json_atomic(run_dir / "stage.json", stage_json, indent=2, default=str)
        phases.mark("summary")
        write_json_atomic(run_dir / "summary.json", summary, indent=2)  # last: it marks the stage complete
    _barrier()  # the next stage (on every rank) starts from the model folder rank 0 just wrote
    log.info(f"== stage {stage.name} done: {summary['steps']} steps, loss {summary['final_loss']:.4f}, "
             f"{summary['samples_per_s']:.1f} samples/s")
    return summary


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _all_ranks_counter(counter) -> dict:
    """Skipped-sample counts summed over ranks (each rank reads different samples)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(counter)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, dict(counter))
    total: dict = {}
    for p in parts:
        for k, v in p.items():
            total[k] = total.get(k, 0) + v
    return total


def run_recipe(path: str | Path, out: str | Path, resume: bool = False, overrides: list[str] | None = None,
               max_steps: int | None = None) -> list[dict]:
    """Run a recipe's stages in order; each starts from the previous stage's `model/`. Completed stages (complete
    summary.json) are skipped on --resume. Holds OUT's lock while it runs."""
    with holding_lock(out):
        return _run_recipe(path, out, resume, overrides, max_steps)


def _run_recipe(path: str | Path, out: str | Path, resume: bool, overrides: list[str] | None,
                max_steps: int | None) -> list[dict]:
    from vlmtrain.train.strategy import init_distributed, rank_zero_first

    path, out = Path(path), Path(out)
    stages = resolve_recipe(path, out, overrides, max_steps)
    init_distributed()

    def check_out() -> None:
        if out.exists() and any(out.iterdir()) and not resume:
            raise VlmtrainError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        lock_run_dir(out)

    rank_zero_first(check_out, others=False)
    summaries, parent = [], None
    for stage in stages:
        run_dir = out / stage.name
        done = run_dir / "summary.json"
        if resume and is_complete(done):
            log.info(f"== stage {stage.name}: already completed, skipping")
            summaries.append(json.loads(done.read_text()))
        else:
            summaries.append(fit_stage(stage, run_dir, out / "data", resume=resume, base_dir=path.parent,
                                       parent=parent))
        phases.mark("handoff")
        parent = {"name": stage.name, "model": str(run_dir / "model"),
                  "weights_sha256": json.loads((run_dir / "stage.json").read_text())["weights_sha256"]["end"]}
    if _rank_zero():
        _print_eval_table(summaries)
    return summaries


def _print_eval_table(summaries: list[dict]) -> None:
    rows = [s for s in summaries if s.get("eval")]
    if not rows:
        return
    keys = [k for k in rows[0]["eval"] if k != "eval_samples"]
    n = int(rows[0]["eval"].get("eval_samples", 0))
    head = f"{'stage':<8}" + "".join(f" | {k:^26}" for k in keys)
    sub = f"{'':<8}" + "".join(f" | {'before':>12} {'after':>13}" for _ in keys)
    lines = [f"held-out evaluation ({n} samples):", head, sub]
    for s in rows:
        b = s.get("eval_before") or {}
        lines.append(f"{s['stage']:<8}" + "".join(f" | {b.get(k, float('nan')):>12.3f} {s['eval'][k]:>13.3f}"
                                                  for k in keys))
    print("\n".join(lines), flush=True)
