"""One stage run as a sequence of named phases (`StageRun`), the ones `train/phases.py` marks:

    open run dir → start model → trainability → data → eval before → trainer → fit →
    finalize (gather → adapter/merge → model save → eval after → summary)

Each phase is a method that reads what the phases before it left on `self` and leaves its own results there. A
kill at any moment resumes from the run directory alone: the checkpoint (`checkpoints/last.ckpt`), the cached
eval before training (`eval_before.json`) and the recorder's totals inside the checkpoint; `summary.json` is
written last and atomically, so a stage is complete exactly when it exists (`finalize.is_complete`).

Where another objective or caller plugs in (override in a subclass, keep the phase order):
- `build_module`: the LightningModule of the objective (next-token and DPO: `VLMModule`; DP-SGD: `DPModule`);
- `batch_layout`: objective-specific options of the streaming loader (DPO's shared-prompt rows);
- `objective_summary`: objective-specific fields of `summary.json`;
- `seed_rng`, `training_data`: the federated site's round (`fed.site.SiteRound`) seeds per round and builds its
  own DP view, and runs its local steps without a Trainer.
"""

from __future__ import annotations

# Lightning (and `train.preempt`, which needs it) is imported inside the phases that use it: the federated site
# subclasses StageRun and its ClientApp process should not pay for Lightning's import.
import hashlib
import json
import logging
import time
import warnings
from pathlib import Path

import torch
import yaml

from vlmtrain.atomic import write_json
from vlmtrain.config.load import validate
from vlmtrain.config.model import ModelConfig, NativeModelConfig, is_native_config
from vlmtrain.config.stage import StageConfig
from vlmtrain.data.encode import encoder_for
from vlmtrain.errors import VlmtrainError
from vlmtrain.train import phases
from vlmtrain.train.compile import compile_decoder_layers
from vlmtrain.train.finalize import record_final_eval, training_figures
from vlmtrain.train.freeze import apply_stage_trainability
from vlmtrain.train.lock import lock_run_dir
from vlmtrain.train.native import check_native_stage

log = logging.getLogger("vlmtrain.train")


# ---- helpers the phases share ------------------------------------------------------------------------------------
def config_hash(obj) -> str:
    """sha256 (16 hex) of a JSON-able object (`stage.json["config_hash"]`)."""
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


def resolve_model(ref, base_dir: Path) -> ModelConfig | NativeModelConfig:
    """A stage's `model`: a config object, an inline dict, or a YAML file (relative to `base_dir` first)."""
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


def data_sources(refs, data_root: Path):
    """`data.train` / `eval.data` entries → `Source`s; builtin datasets are prepared under `data_root` first."""
    from vlmtrain.data.shards import Source
    from vlmtrain.train.sources import prepare_builtin

    out = []
    for r in refs:
        if r.builtin:
            phases.mark("data_prep")
        path = str(prepare_builtin(r.builtin, data_root)) if r.builtin else r.path
        out.append(Source(path, r.weight))
    return out


def rank_zero() -> bool:
    """This process is rank 0 (or the only one): the rank that writes a stage's outputs."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_ranks_counter(counter) -> dict:
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


def start_bundle(stage: StageConfig, base_dir: Path, init_from: str | Path | None = None):
    """The model a stage starts from, unseeded: `init_from` (default: the stage's), else a fresh build from the
    model config; QLoRA quantises the LLM's Linears, then LoRA adapters are added."""
    from vlmtrain.model import build_model
    from vlmtrain.model.io import load_any

    init_from = init_from or stage.init_from
    if init_from:
        bundle = load_any(init_from)
    elif stage.model is None:
        raise VlmtrainError("stage: give `model` (first stage) or `init_from`")
    else:
        bundle = build_model(resolve_model(stage.model, Path(base_dir)))
    if stage.lora is not None and stage.lora.quantize:  # QLoRA: the LLM's Linears become NF4 before adapters
        from vlmtrain.model.quantize import quantize_llm_

        compute = torch.bfloat16 if stage.trainer.precision.startswith("bf16") else torch.float32
        n = quantize_llm_(bundle.model, compute)
        log.info(f"QLoRA: {n} LLM linear layers quantised to 4-bit NF4 (double quantisation), compute {compute}")
    if stage.lora is not None:
        from vlmtrain.model.lora import apply_lora

        apply_lora(bundle.model, stage.lora, llm=stage.train.llm == "lora", vision=stage.train.vision == "lora")
    return bundle


def load_stage_start(stage: StageConfig, base_dir: Path):
    """The model a stage starts from: its parent's output folder, or a fresh build (seeded) from the model config."""
    import lightning.pytorch as pl

    pl.seed_everything(stage.trainer.seed, workers=True, verbose=False)
    return start_bundle(stage, base_dir)


def quiet_lightning() -> None:
    """Lightning sets INFO at import; keep its warnings only. vlmtrain checkpoints after the optimizer step on
    purpose (the state a resume continues from), which Lightning warns about under manual optimisation."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


# ---- the phases ------------------------------------------------------------------------------------------------
class StageRun:
    """One stage trained into `run_dir` (module doc: phases, resume, where objectives plug in). `run()` runs the
    phases in order; a caller that needs only some of them (the federated site) calls those."""

    def __init__(self, stage: StageConfig, run_dir: str | Path | None = None, data_root: str | Path | None = None,
                 resume: bool = False, base_dir: str | Path = ".", parent: dict | None = None,
                 init_from: str | Path | None = None):
        self.stage = stage
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.data_root = Path(data_root) if data_root else (self.run_dir.parent / "data" if self.run_dir else None)
        self.resume, self.base_dir, self.parent, self.init_from = resume, Path(base_dir), parent, init_from
        self.t0 = time.time()
        self.bundle = self.module = self.loader = self.train_data = self.dp = self.eval_shards = None
        self.eval_before = None

    @property
    def ckpt(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    def run(self) -> dict:
        """All phases, in order; returns the summary (what `summary.json` holds)."""
        self.open_run_dir()
        self.start_model()
        self.start_hashes = module_hashes(self.bundle.model)  # stage.json's handoff check between stages
        self.trainability()
        self.model_options()
        self.data()
        self.evaluate_before()
        self.build_trainer()
        self.fit()
        return self.finalize()

    def open_run_dir(self) -> None:
        """Phase `setup`: refuse a used directory without --resume, take its lock, write config.yaml (rank 0
        first), then join the process group's view of the stage."""
        from vlmtrain.train.strategy import init_distributed, rank_zero_first

        quiet_lightning()
        init_distributed()
        run_dir, stage = self.run_dir, self.stage

        def prepare() -> None:
            if run_dir.exists() and any(run_dir.iterdir()) and not self.resume:
                raise VlmtrainError(f"{run_dir} already holds a run; pass --resume to continue it or choose "
                                    "another --out")
            lock_run_dir(run_dir)  # a second live run on this directory is refused (train.lock)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(stage.model_dump(mode="json"), sort_keys=False))

        rank_zero_first(prepare, others=False)
        phases.enter_stage(stage.name)
        phases.mark("setup")
        self.t0 = time.time()
        log.info(f"== stage {stage.name} ({stage.preset or 'custom'}, objective {stage.objective}) → {run_dir}")

    def seed_rng(self) -> None:
        """Seed every generator from `trainer.seed` (model init, LoRA init, dropout, data order)."""
        import lightning.pytorch as pl

        pl.seed_everything(self.stage.trainer.seed, workers=True, verbose=False)

    def start_model(self) -> None:
        """Phase start model: seed, then the parent's model folder (or `init_from`) or a fresh build, quantised
        (QLoRA) and with LoRA adapters added when the stage has a `lora:` block."""
        self.seed_rng()
        self.bundle = start_bundle(self.stage, self.base_dir, self.init_from)

    def trainability(self) -> None:
        """Phase trainability: which modules train (`train:`), logged as a table; native families refuse what
        they cannot train (`train.native.check_native_stage`)."""
        stage, bundle = self.stage, self.bundle
        self.table = apply_stage_trainability(bundle.model, stage.train)
        if stage.lora is not None:
            from vlmtrain.model.lora import lora_layers

            log.info(f"LoRA r={stage.lora.r} alpha={stage.lora.alpha}: {len(lora_layers(bundle.model))} adapted "
                     "layers")
        if bundle.native:
            check_native_stage(stage, bundle)

    def model_options(self) -> None:
        """Gradient checkpointing and compiled decoder layers, when the trainer config asks for them."""
        tr, bundle = self.stage.trainer, self.bundle
        if tr.grad_checkpointing and bundle.native:
            bundle.model.enable_gradient_checkpointing()
        elif tr.grad_checkpointing:
            kw = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
            bundle.model.llm.gradient_checkpointing_enable(**kw)
            if self.stage.train.vision:
                bundle.model.vision.model.gradient_checkpointing_enable(**kw)
        if tr.compile:
            compile_decoder_layers(bundle.model)

    def data(self) -> None:
        """Phase data: the record encoder, the train and eval sources (builtin datasets prepared by rank 0 first),
        the audit's canaries when asked, then the training batches (`training_data`)."""
        from vlmtrain.train.strategy import rank_zero_first

        stage, d, root = self.stage, self.stage.data, self.data_root
        self.encoder = encoder_for(self.bundle, d.max_len, d.caption_prompt, d.anyres_pinpoints)
        self.train_sources = rank_zero_first(data_sources, d.train, root)
        eval_sources = rank_zero_first(data_sources, [stage.eval.data], root) if stage.eval.data else None
        if stage.audit is not None:  # canaries planted, members listed, for `vlmtrain privacy audit`
            from vlmtrain.train.audit import prepare_audit

            holdout = rank_zero_first(data_sources, [stage.audit.holdout], root)[0] if stage.audit.holdout else None
            self.train_sources = rank_zero_first(prepare_audit, stage.audit, self.train_sources, holdout,
                                                 self.run_dir, self.encoder)
        self.loader, self.train_data = self.training_data()
        self.eval_shards = str(eval_sources[0].path) if eval_sources else None

    def training_data(self) -> tuple:
        """→ (loader, train_data): under DP-SGD a Poisson view of the shards (train.dp; its `.skipped` counts
        malformed records) whose module is built with it; else the streaming loader in windows of grad_accum
        micro-batches (`StepWindows`: the data cursor travels with each window)."""
        from vlmtrain.data.loader import ShardLoader
        from vlmtrain.train.module import StepWindows

        stage, d = self.stage, self.stage.data
        if stage.privacy is not None:
            from vlmtrain.train.dp import build_dp_training

            self.dp = build_dp_training(stage, self.bundle, self.encoder, self.train_sources, self.run_dir)
            dp_data, _, train_data, self.module = self.dp
            return dp_data, train_data
        loader = ShardLoader(self.train_sources, self.encoder, self.bundle.tokenizer.pad_token_id,
                             batch_size=d.batch_size, num_workers=d.num_workers, seed=stage.trainer.seed,
                             shuffle_buffer=d.shuffle_buffer, mode=d.mode, pack_len=d.pack_len or d.max_len,
                             max_bad_fraction=d.max_bad_fraction, split=d.split, cache_mb=d.encoded_cache_mb,
                             **self.batch_layout())
        return loader, StepWindows(loader, stage.trainer.grad_accum)

    def batch_layout(self) -> dict:
        """Objective-specific loader options: DPO with `share_prompt` (composed models) packs each pair's prompt
        once (`share_prompt_image_token`)."""
        s, b = self.stage, self.bundle
        shared = s.objective == "dpo" and s.dpo.share_prompt and not b.native
        return {"share_prompt_image_token": b.model.image_token_id if shared else None}

    def run_eval(self) -> dict:
        """The held-out evaluation of the current model (eval.data)."""
        from vlmtrain.train.evaluate import evaluate

        ev = self.stage.eval
        return evaluate(self.bundle, self.eval_shards, ev.max_samples, ev.max_new_tokens, ev.batch_size)

    def evaluate_before(self) -> None:
        """Phase eval before (rank 0, when `eval.data` is set): computed once and kept in eval_before.json, so a
        resumed stage reports the same numbers instead of evaluating the trained model."""
        if not (self.eval_shards and rank_zero()):
            return
        path = self.run_dir / "eval_before.json"
        if path.is_file():
            self.eval_before = json.loads(path.read_text())
            return
        phases.mark("eval_before")
        self.eval_before = self.run_eval()
        write_json(path, self.eval_before)
        log.info("eval before: " + ", ".join(f"{k} {v:.4f}" for k, v in self.eval_before.items()))

    def build_module(self):
        """The objective's LightningModule: `VLMModule` runs next-token and DPO (by `stage.objective`); a DP
        stage's `DPModule` was built with its Poisson data. A new objective overrides this."""
        from vlmtrain.train.module import VLMModule

        return self.module if self.dp is not None else VLMModule(self.bundle, self.stage, self.loader)

    def build_trainer(self) -> None:
        """Phase trainer: the module, the recorder (metrics.jsonl, periodic eval), the optional W&B logger, the
        strategy, and Lightning's Trainer with vlmtrain's checkpointing (atomic IO, preemption checkpoint)."""
        import lightning.pytorch as pl
        from lightning.pytorch.callbacks import ModelCheckpoint

        from vlmtrain.train import preempt
        from vlmtrain.train.checkpoint_io import AtomicCheckpointIO
        from vlmtrain.train.recorder import Recorder
        from vlmtrain.train.strategy import make_strategy

        self.module = self.build_module()
        tr, run_dir = self.stage.trainer, self.run_dir
        self.recorder = Recorder(run_dir, tr.max_steps, tr.log_every_n_steps,
                                 evaluator=self.run_eval if self.eval_shards else None,
                                 eval_every=self.stage.eval.every_n_steps, log_sample_ids=tr.log_sample_ids)
        logger = False
        if tr.wandb:
            from lightning.pytorch.loggers import WandbLogger

            logger = WandbLogger(project=tr.wandb_project, name=f"{run_dir.parent.name}/{self.stage.name}",
                                 save_dir=str(run_dir), offline=not tr.wandb_online)
        strategy, devices, nodes = make_strategy(self.stage, native=self.bundle.native)
        self.trainer = pl.Trainer(
            max_steps=tr.max_steps, max_epochs=-1, accelerator="auto", devices=devices, num_nodes=nodes,
            strategy=strategy, precision=tr.precision, logger=logger,
            callbacks=[ModelCheckpoint(dirpath=run_dir / "checkpoints", save_top_k=0, save_last=True,
                                       every_n_train_steps=tr.save_every_n_steps), self.recorder,
                       preempt.PreemptionCheckpoint(self.ckpt)],
            plugins=[AtomicCheckpointIO()], enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
            default_root_dir=str(run_dir), log_every_n_steps=tr.log_every_n_steps,
        )

    def fit(self) -> None:
        """Phase fit: train (from the last intact checkpoint with --resume) to max_steps, then write the final
        checkpoint. A preemption signal stops at the next step boundary, after a checkpoint."""
        from vlmtrain.data.loader import stop_receivers
        from vlmtrain.train import preempt
        from vlmtrain.train.checkpoint_io import resolve_last

        resume_from = resolve_last(self.ckpt) if self.resume else None
        if resume_from:
            log.info(f"resuming from {resume_from}")
        try:
            with preempt.defer_to_step_boundary():
                self.trainer.fit(self.module, train_dataloaders=self.train_data,
                                 ckpt_path=str(resume_from) if resume_from else None)
        finally:
            stop_receivers()  # the loader's background receiver ends with training, not at interpreter exit
        phases.mark("train_done")
        self.trainer.save_checkpoint(self.ckpt)
        phases.mark("final_checkpoint")

    # ---- finalize: gather → adapter/merge → model save → eval after → summary --------------------------------
    def finalize(self) -> dict:
        """Phase finalize: every rank gathers and counts; rank 0 writes the outputs, summary.json last; all ranks
        wait for it, since the next stage starts from the model folder rank 0 wrote."""
        self.gather()
        summary = self.summarise()
        if rank_zero():
            self.merge_adapter()
            phases.mark("model_save")
            from vlmtrain.model.io import save_model_folder

            save_model_folder(self.bundle, self.run_dir / "model")
            self.evaluate_after(summary)
            self.write_summary(summary)
        barrier()
        log.info(f"== stage {self.stage.name} done: {summary['steps']} steps, loss {summary['final_loss']:.4f}, "
                 f"{summary['samples_per_s']:.1f} samples/s")
        return summary

    def gather(self) -> None:
        """Sharded strategies: collect the full weights; rank 0 continues with an ordinary (unsharded) model."""
        tr = self.stage.trainer
        if tr.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(self.bundle.model, options=opts)
        elif tr.strategy == "deepspeed_zero3":  # partitioned parameters: gather on every rank, rank 0 keeps a copy
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.bundle.model.parameters()), modifier_rank=None):
                full = ({k: v.detach().cpu().clone() for k, v in self.bundle.model.state_dict().items()}
                        if rank_zero() else None)
        else:
            return
        if rank_zero():
            self.bundle = load_stage_start(self.stage, self.base_dir)
            self.bundle.model.load_state_dict(full)

    def summarise(self) -> dict:
        """The summary's training figures (all ranks: skipped counts are summed over ranks). The recorder's totals
        come back with the checkpoint, so a stage resumed after its training finished (a kill during
        finalisation) still reports all of its steps; metrics.jsonl is the fallback."""
        skipped = all_ranks_counter(self.loader.skipped)
        steps = self.trainer.global_step
        fig = training_figures(self.recorder, self.run_dir / "metrics.jsonl", steps)
        summary = {"stage": self.stage.name, "status": "completed", "steps": steps,
                   "final_loss": fig["final_loss"], "samples": fig["samples"], "tokens": fig["tokens"],
                   "samples_per_s": fig["samples_per_s"], "tokens_per_s": fig["tokens_per_s"],
                   "train_seconds": fig["train_seconds"], "skipped": skipped}
        self.objective_summary(summary, fig)
        cache = getattr(self.module.model, "vision_cache", None)
        if cache is not None:  # steps whose images all came from the frozen-tower feature cache
            summary["vision_feature_cache"] = {"hit_steps": cache.hits, "miss_steps": cache.misses,
                                               "images": len(cache.store), "mib": cache.used / 2**20}
        if self.dp is not None:
            from vlmtrain.train.dp import privacy_summary

            dp_data, dp_plan = self.dp[0], self.dp[1]
            summary["privacy"] = privacy_summary(self.module, dp_plan, dp_data)
            log.info(f"DP-SGD: ε = {summary['privacy']['epsilon']:.3f} at δ = {dp_plan.delta:g} after "
                     f"{summary['privacy']['steps']} steps")
        return summary

    def plots(self) -> list[str]:
        """The run's PNGs (file names): loss.png and eval.png from metrics.jsonl; an objective may add its own."""
        from vlmtrain.train.recorder import plot_metrics

        return plot_metrics(self.run_dir)

    def objective_summary(self, summary: dict, fig: dict) -> None:
        """Objective-specific summary fields: next-token reports the share of (non-pad) tokens that carry a loss."""
        if self.stage.objective == "next_token":
            summary["supervised_fraction"] = fig["supervised"] / max(fig["tokens"], 1)

    def merge_adapter(self) -> None:
        """Phase adapter (rank 0, LoRA stages): keep the adapter (PEFT export) in adapter/, then hand the next
        stage a merged model (QLoRA: the dequantised base plus merged adapters, full precision)."""
        from vlmtrain.model.lora import adapter_state_dict, has_lora, merge_lora_

        if not has_lora(self.bundle.model):
            return
        from safetensors.torch import save_file

        phases.mark("adapter")
        out = self.run_dir / "adapter"
        out.mkdir(exist_ok=True)
        save_file(adapter_state_dict(self.bundle.model), str(out / "adapter.safetensors"))
        (out / "lora.json").write_text(json.dumps(self.stage.lora.model_dump(mode="json")))
        if self.stage.lora.quantize:
            from vlmtrain.model.quantize import dequantize_

            dequantize_(self.bundle.model)
        merge_lora_(self.bundle.model)

    def evaluate_after(self, summary: dict) -> None:
        """Phase eval after (rank 0, when `eval.data` is set): into the summary beside the eval before, and once
        into metrics.jsonl (a redone finalisation replaces its own row)."""
        if not self.eval_shards:
            return
        phases.mark("eval_after")
        summary["eval"] = self.run_eval()
        summary["eval_before"] = self.eval_before
        record_final_eval(self.run_dir / "metrics.jsonl", self.trainer.global_step, summary["eval"])
        log.info("eval after: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items()))

    def write_summary(self, summary: dict) -> None:
        """Phase summary (rank 0): plots, stage.json (trainable table, weights before/after, template, image
        processor), then summary.json, last and atomically: it marks the stage complete."""
        stage, bundle = self.stage, self.bundle
        summary["plots"] = self.plots()
        summary["wall_seconds"] = time.time() - self.t0
        stage_json = {
            "name": stage.name, "preset": stage.preset, "objective": stage.objective,
            "parent": self.parent, "config_hash": config_hash(stage.model_dump(mode="json")),
            "trainable": self.table,
            "weights_sha256": {"start": self.start_hashes, "end": module_hashes(bundle.model)},
            "template": bundle.template or bundle.tokenizer.chat_template,
            "image_processor": bundle.image_processor.to_dict(),
            "image_tokens": bundle.model.num_image_tokens,
        }
        write_json(self.run_dir / "stage.json", stage_json, indent=2, default=str)
        phases.mark("summary")
        write_json(self.run_dir / "summary.json", summary, indent=2)  # last: it marks the stage complete
