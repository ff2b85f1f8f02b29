"""The one LightningModule: next-token or DPO objective over the composed VLM, with manual optimisation so that
the loss of an optimizer step is normalised by the supervised tokens (or pairs) of the *whole* accumulated batch
across ranks — not a mean of per-micro-batch means.

A training "batch" is a window of `grad_accum` micro-batches plus the data cursor after it (`StepWindows`), so
a checkpoint taken after step k resumes the data exactly after step k, whatever Lightning prefetched.
"""

from __future__ import annotations

import copy
import logging
import random
from typing import Iterator

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist

from vlmtrain.data.chat import IGNORE
from vlmtrain.errors import VlmtrainError
from vlmtrain.train.dpo import dpo_loss, selected_sequence_logps
from vlmtrain.train.objectives import prediction_mask, selected_token_loss_sum
from vlmtrain.train.optim import build_optimizer, build_scheduler

log = logging.getLogger("vlmtrain.train")


class StepWindows:
    """Iterable of {"micro": [k micro-batches], "cursor": loader state after them}. Not itself stateful: the
    cursor travels with the batch and the module checkpoints the cursor of the last *trained* window."""

    def __init__(self, loader, k: int):
        self.loader, self.k = loader, k

    def __iter__(self) -> Iterator[dict]:
        it = iter(self.loader)
        while True:
            micro = []
            for _ in range(self.k):
                try:
                    micro.append(next(it))
                except StopIteration:
                    return
            yield {"micro": micro, "cursor": self.loader.state_dict()}


def _tokens(b: dict) -> int:
    """Non-padding tokens of a batch (for a shared-prompt DPO batch: of its pairs' two sequences, so tokens/s stays
    comparable across layouts)."""
    if "token_count" in b:
        return int(b["token_count"])
    if b.get("attention_mask") is not None:
        return int(b["attention_mask"].sum())
    return int(b["input_ids"].numel())


def _model_inputs(b: dict) -> tuple:
    return b["input_ids"], b.get("pixel_values"), b.get("attention_mask"), b.get("position_ids")


def model_extras(b: dict) -> dict:
    """The family tensors a native model's batch carries (`image_grid_thw`, `token_type_ids`, ...)."""
    return {k: b[k] for k in b.get("model_extras", ())}


def capture_rng() -> dict:
    """RNG states as tensors/ints only, so checkpoints load with torch.load(weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      gauss],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class VLMModule(pl.LightningModule):
    def __init__(self, bundle, stage, loader=None):
        super().__init__()
        self.model = bundle.model
        self.stage = stage
        self.loader = loader
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold trainable weights only; frozen ones come from the init source
        self._ref: list = []  # DPO reference model, kept out of the module tree (not saved, not wrapped by DDP)
        self.cursor: dict | None = None
        self.last_stats: dict = {}
        if stage.objective == "dpo" and stage.dpo.reference == "copy":
            ref = copy.deepcopy(self.model).eval().requires_grad_(False)
            self._ref.append(ref)

    def configure_model(self) -> None:
        """Called by Lightning once the process group exists: data-parallel strategies need every rank to touch
        the vision tower every step, and FSDP2 shards the blocks here."""
        from vlmtrain.train.strategy import apply_fsdp2, fsdp_mesh, is_data_parallel

        tr = self.stage.trainer
        self.model.always_encode_images = is_data_parallel(tr.strategy)
        if tr.strategy == "deepspeed_zero3" and hasattr(self.model, "bare_parameters"):
            # ZeRO-3 gathers a partitioned parameter when the module holding it is called; a native family's bare
            # parameter that transformers reads directly (LLaVA-NeXT/OneVision's image_newline) is gathered for the
            # whole NativeVLM.forward instead (DeepSpeed's own API for parameters used outside their module)
            import deepspeed

            for param in self.model.bare_parameters():
                deepspeed.zero.register_external_parameter(self.model, param)
        if tr.vision_feature_cache_mb and self.model.vision_cache is None:
            from vlmtrain.model.vlm import FeatureCache

            if self.stage.train.vision:
                log.info("vision feature cache: off (the vision tower trains in this stage)")
            elif tr.strategy in ("fsdp", "deepspeed_zero3"):  # sharded tower: every rank must run every forward
                log.info(f"vision feature cache: off (not with {tr.strategy})")
            else:
                self.model.vision_cache = FeatureCache(tr.vision_feature_cache_mb)
        if tr.strategy == "fsdp" and not getattr(self, "_sharded", False):
            dtype = torch.bfloat16 if tr.precision.startswith("bf16") else None
            apply_fsdp2(self.model, fsdp_mesh(self.device_mesh["data_parallel"], tr.fsdp_shard_size),
                        tr.fsdp_reshard_after_forward, tr.fsdp_cpu_offload, dtype)
            self._sharded = True

    # ---- optimisation ------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = build_optimizer(self.model, self.stage.optim)
        sch = build_scheduler(opt, self.stage.optim, self.stage.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": "step"}}

    def _world(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def _all_sum(self, x: float | int) -> float:
        t = torch.tensor(float(x), device=self.device if self._trainer is not None else "cpu", dtype=torch.float64)
        if self._world() > 1:
            dist.all_reduce(t)
        return float(t)

    def _backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """Backward of one micro-batch of a step's window (`last`: the window's final one)."""
        if self._trainer is None:
            loss.backward()
        elif self.stage.trainer.strategy.startswith("deepspeed"):
            # the engine reduces (and ZeRO partitions) gradients only at an accumulation boundary: mark it
            # ourselves, so one engine step follows a whole window; the loss is already normalised over the
            # window, so no further 1/accumulation scaling
            engine = self.trainer.strategy.model
            engine.set_gradient_accumulation_boundary(last)
            self.manual_backward(loss, scale_wrt_gas=False)
            if not last:
                # ZeRO-3 moves to "accumulate into the gradient partitions" (micro_step_id += 1) in
                # engine.forward, which Lightning calls once per window: do that step between micro-batches
                engine.optimizer.clear_backward_seen_flag()
        else:
            self.manual_backward(loss)

    def accumulate_lm(self, micro: list[dict]) -> dict:
        """Backward over a window of micro-batches; the step's loss is Σ token losses / Σ supervised tokens
        (all ranks). Under DDP gradients are averaged over ranks, hence the `world` factor."""
        n_local = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
        n_global = self._all_sum(n_local)
        if n_global == 0:
            raise VlmtrainError("a training step has no supervised tokens (every label masked)")
        scale = self._world() / n_global
        coef = getattr(self.model, "router_aux_loss_coef", 0.0)  # MoE families (NativeVLM); 0 = no router loss
        routers: list | None = [] if coef > 0 else None
        loss_total = 0.0
        for i, b in enumerate(micro):
            loss_sum = self._lm_loss(b, routers)
            loss = loss_sum * scale
            if routers:
                # transformers adds coef·aux to each forward's mean loss and gradient accumulation averages those:
                # 1/k per micro-batch here, and DDP's gradient average takes the mean over ranks
                loss = loss + coef * routers[-1].aux / len(micro)
            self._backward(loss, last=i == len(micro) - 1)
            loss_total += float(loss_sum.detach())
        stats = {"loss": self._all_sum(loss_total) / n_global, "supervised_tokens": n_local}
        return stats | self._moe_window_stats(routers, len(micro))

    def _lm_loss(self, b: dict, routers: list | None) -> torch.Tensor:
        """Summed next-token loss of one micro-batch over its supervised tokens; `routers`: a list that gets the
        forward's `RouterLoss` (MoE model, `NativeVLM.forward(router_aux=True)`: load-balancing loss, token counts)."""
        mask, targets = prediction_mask(b["labels"])
        out = self.model(*_model_inputs(b), logits_mask=mask, image_keys=b.get("image_keys"), **model_extras(b),
                         **({"router_aux": True} if routers is not None else {}))
        if routers is not None:
            out, router = out
            routers.append(router)
        return selected_token_loss_sum(out, targets)

    def _moe_window_stats(self, routers: list | None, k: int) -> dict:
        """A step's MoE log from the `RouterLoss` of each of its k micro-batches (none for dense models): the router
        loss averaged over micro-batches and ranks, and the token slots per expert summed over them."""
        if not routers:
            return {}
        aux = self._all_sum(sum(float(r.aux.detach()) for r in routers)) / (k * self._world())
        tokens = sum(r.expert_tokens for r in routers).detach().clone()
        if self._world() > 1:
            dist.all_reduce(tokens)
        return {"moe/router_aux_loss": aux, "moe/expert_tokens": [int(c) for c in tokens.tolist()]}

    def _pairs(self, b: dict) -> int:
        return b["pairs"] if b.get("shared_prompt") else b["input_ids"].shape[0] // 2

    def _shared_inputs(self, b: dict) -> tuple:
        """Model inputs of a shared-prompt DPO batch, its 4D mask in the form the attention kernel takes. A native
        family's rows (`collate_preference_prefix`) carry `segments` instead: the model builds its own masks."""
        if "segments" in b:
            return b["input_ids"], b.get("pixel_values"), None, b["position_ids"]
        mask = b["attention_mask"]
        impl = getattr(self.model.llm.config, "_attn_implementation", "sdpa")
        if impl == "eager":  # eager adds the mask to the scores: additive float, blocked = dtype minimum
            dtype = self.model.llm.get_input_embeddings().weight.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        elif impl != "sdpa":
            raise VlmtrainError(f"dpo.share_prompt: needs sdpa or eager attention; the model uses {impl} "
                                "(set dpo.share_prompt: false)")
        return b["input_ids"], b.get("pixel_values"), mask, b["position_ids"]

    def _dpo_inputs(self, b: dict) -> tuple:
        return self._shared_inputs(b) if b.get("shared_prompt") else _model_inputs(b)

    def _pair_logps(self, model, b: dict, inputs: tuple,
                    routers: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs and supervised-token counts `[2b]` (chosen rows first), for either batch layout;
        `inputs` from `_dpo_inputs(b)` (built once, shared by the policy and the reference). `routers`: a list that
        gets the forward's `RouterLoss` (MoE policy, `NativeVLM.forward(router_aux=True)`)."""
        kw = {"router_aux": True} if routers is not None else {}

        def run(**args):
            out = model(*inputs, **args, **kw)
            if routers is None:
                return out
            routers.append(out[1])
            return out[0]

        if b.get("shared_prompt"):
            from vlmtrain.train.dpo import indexed_sequence_logps

            logits = run(logits_mask=b["logits_index"], **model_extras(b))
            return indexed_sequence_logps(logits, b["targets"], b["seq_index"], 2 * b["pairs"])
        mask, targets = prediction_mask(b["labels"])
        return selected_sequence_logps(run(logits_mask=mask, **model_extras(b)), targets, mask)

    def accumulate_dpo(self, micro: list[dict]) -> dict:
        d = self.stage.dpo
        pairs_global = self._all_sum(sum(self._pairs(b) for b in micro))
        scale = self._world() / pairs_global
        sums = {"loss": 0.0, "chosen": 0.0, "rejected": 0.0, "correct": 0.0}
        coef = getattr(self.model, "router_aux_loss_coef", 0.0)  # MoE families: the policy's router loss joins in
        routers: list | None = [] if coef > 0 else None
        for i, b in enumerate(micro):
            inputs = self._dpo_inputs(b)
            logps, ntok = self._pair_logps(self.model, b, inputs, routers)
            ref_logps = self._reference_logps(inputs, b)
            pc, pr = logps.chunk(2)
            rc, rr = ref_logps.chunk(2)
            nc, nr = ntok.chunk(2)
            out = dpo_loss(pc, pr, rc, rr, d.beta, d.loss_type, d.label_smoothing,
                           chosen_n_tokens=nc, rejected_n_tokens=nr)
            loss = out.losses.sum() * scale
            if routers:  # as in the LM objective (and TRL's DPO): coef·aux per forward, averaged over the window
                loss = loss + coef * routers[-1].aux / len(micro)
            self._backward(loss, last=i == len(micro) - 1)
            sums["loss"] += float(out.losses.detach().sum())
            sums["chosen"] += float(out.chosen_rewards.sum())
            sums["rejected"] += float(out.rejected_rewards.sum())
            sums["correct"] += float(out.reward_correct.sum())
        tot = {k: self._all_sum(v) / pairs_global for k, v in sums.items()}
        return {"loss": tot["loss"], "rewards/chosen": tot["chosen"], "rewards/rejected": tot["rejected"],
                "rewards/margins": tot["chosen"] - tot["rejected"], "rewards/accuracies": tot["correct"],
                "pairs": pairs_global} | self._moe_window_stats(routers, len(micro))

    @torch.no_grad()
    def _reference_logps(self, inputs: tuple, b: dict) -> torch.Tensor:
        """The frozen reference: a copy of the starting model, or the policy itself with its LoRA adapters off
        (no second model in memory)."""
        if self._ref:
            return self._pair_logps(self._ref[0], b, inputs)[0]
        from vlmtrain.model.lora import set_adapters_enabled

        set_adapters_enabled(self.model, False)
        try:
            return self._pair_logps(self.model, b, inputs)[0]
        finally:
            set_adapters_enabled(self.model, True)

    def on_fit_start(self) -> None:
        for ref in self._ref:
            ref.to(self.device)

    def on_train_start(self) -> None:
        # transformers' from_pretrained returns eval-mode modules and Lightning keeps the mode a model comes with:
        # left so, dropout would be off, transformers' gradient checkpointing (active only while `self.training`)
        # would silently not run, and Opacus (which records activations in training mode only) would see nothing
        self.model.train()

    def accumulate(self, window: dict) -> dict:
        """The objective's backward over one step's window of micro-batches; returns the step's stats (`loss` and
        what the recorder logs). Another objective (GRPO: `train.grpo.module`) overrides this."""
        micro = window["micro"]
        return self.accumulate_dpo(micro) if self.stage.objective == "dpo" else self.accumulate_lm(micro)

    def training_step(self, window: dict, batch_idx: int):
        opt = self.optimizers()
        micro = window["micro"]
        stats = self.accumulate(window)
        if self.stage.trainer.strategy.startswith("deepspeed"):
            opt.step()  # the engine clips (config gradient_clipping) and steps its partitioned optimizer
            norm = self.trainer.strategy.model.get_global_grad_norm()
        else:
            params = [p for g in opt.optimizer.param_groups for p in g["params"]]
            clip = self.stage.optim.grad_clip
            norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
            opt.step()
        opt.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        stats["grad_norm"] = float(norm) if norm is not None else float("nan")
        stats["lr"] = opt.optimizer.param_groups[0]["lr"]
        stats["ids"] = [i for b in micro for i in b["ids"]]
        # throughput counts are global (all ranks), so samples/s means the whole job's rate
        stats["samples"] = int(self._all_sum(len(stats["ids"])))
        stats["tokens"] = int(self._all_sum(sum(_tokens(b) for b in micro)))
        if "supervised_tokens" in stats:
            stats["supervised_tokens"] = int(self._all_sum(stats["supervised_tokens"]))
        self.last_stats = stats
        self.cursor = window["cursor"]

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def _trainable_keys(self) -> set[str]:
        return {f"model.{n}" for n, p in self.model.named_parameters(remove_duplicate=False) if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self._trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["vlmtrain"] = {"data_cursor": self.cursor, "rng": capture_rng(), "stage": self.stage.name,
                                  "trainable_keys": sorted(keep)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("vlmtrain")
        if meta is None:
            raise VlmtrainError("checkpoint was not written by vlmtrain (no data cursor / RNG state)")
        # DeepSpeed restores the module inside its engine and hands back only the client state (no state_dict)
        missing = self._trainable_keys() - set(checkpoint["state_dict"]) if "state_dict" in checkpoint else set()
        if missing:
            raise VlmtrainError(f"checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}): "
                                "it belongs to a stage that trains different modules")
        if meta["data_cursor"] is not None and self.loader is not None:
            self.loader.load_state_dict(meta["data_cursor"])
        self.cursor = meta["data_cursor"]
        restore_rng(meta["rng"])
