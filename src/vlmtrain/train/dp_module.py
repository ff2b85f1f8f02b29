"""The DP-SGD training step: `DPModule`, a `VLMModule` whose step is per-sample loss → Opacus' per-sample
gradients → `DPOptimizer` (clip, noise, average) → accountant, and the per-sample loss it differentiates.

The plan (σ, q, C, δ), the Poisson data and the checks that a config keeps the guarantee live in
`vlmtrain.train.dp`, which builds this module and imports it (not the other way round, so `DPPlan`, the numbers
this module is built with, is defined here). The federated site (`vlmtrain.fed.site`) drives the same module without Lightning:
`make_dp_optimizer` and `dp_backward` are the two pieces it calls.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from vlmtrain.data.chat import IGNORE
from vlmtrain.errors import VlmtrainError
from vlmtrain.train.module import VLMModule, model_extras
from vlmtrain.train.objectives import prediction_mask


@dataclass
class DPPlan:
    """The numbers that define the guarantee, fixed before the first step."""

    units: int
    records: int
    unit: str
    expected_batch_size: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    steps: int
    accountant: str
    target_epsilon: float | None
    secure_mode: bool

    def to_dict(self) -> dict:
        return asdict(self)


def per_sample_losses(model, batch: dict, mean: bool = True) -> torch.Tensor:
    """`[b]`: each record's mean (or, `mean=False`, summed) next-token loss over its supervised tokens (logits
    only where supervised)."""
    labels = batch["labels"]
    mask, targets = prediction_mask(labels)
    logits = model(batch["input_ids"], batch.get("pixel_values"), batch.get("attention_mask"),
                   batch.get("position_ids"), logits_mask=mask, **model_extras(batch))
    tok = F.cross_entropy(logits.float(), targets, reduction="none")
    rows = mask.nonzero()[:, 0]
    b = labels.shape[0]
    sums = torch.zeros(b, dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)
    if not mean:
        return sums
    counts = torch.bincount(rows, minlength=b).clamp(min=1)
    return sums / counts


def supervised_count(batch: dict) -> int:
    """Supervised (label ≠ IGNORE) next-token targets of a batch."""
    return int((batch["labels"][:, 1:] != IGNORE).sum()) if "labels" in batch else 0


class DPModule(VLMModule):
    """VLMModule whose step is a DP-SGD step: per-sample loss, Opacus hooks, DPOptimizer (clip, noise,
    average), accountant. Checkpoints add the accountant's history and the sampler/noise generator states.

    `noise_seed`: the noise generator's seed (default: the stage's privacy seed, else its trainer seed, + 1);
    ignored under `secure_mode` (Opacus' cryptographically secure noise)."""

    def __init__(self, bundle, stage, plan: DPPlan, sampler_gen: torch.Generator, noise_seed: int | None = None):
        from opacus import GradSampleModule
        from opacus.accountants import create_accountant

        super().__init__(bundle, stage, loader=None)
        self.plan = plan
        self.native = bundle.native
        self.sampler_gen = sampler_gen
        if noise_seed is None:
            noise_seed = (stage.privacy.seed if stage.privacy.seed is not None else stage.trainer.seed) + 1
        self.noise_gen = None if plan.secure_mode else torch.Generator().manual_seed(noise_seed)
        self.accountant = create_accountant(plan.accountant)
        # kept out of the module tree: hooks live on self.model's layers; state_dict keys stay unchanged
        self._gsm = [GradSampleModule(self.model, batch_first=True, loss_reduction="sum", strict=True)]
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    def make_dp_optimizer(self):
        """The stage's optimizer wrapped in Opacus' `DPOptimizer` (σ, C, expected batch from the plan), its steps
        counted by the accountant."""
        from opacus.optimizers import DPOptimizer

        from vlmtrain.train.optim import build_optimizer

        p = self.plan
        dp_opt = DPOptimizer(build_optimizer(self.model, self.stage.optim), noise_multiplier=p.noise_multiplier,
                             max_grad_norm=p.max_grad_norm, expected_batch_size=p.expected_batch_size,
                             loss_reduction="mean", generator=self.noise_gen, secure_mode=p.secure_mode)
        dp_opt.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=p.sample_rate))
        return dp_opt

    def configure_optimizers(self):
        from vlmtrain.train.optim import build_scheduler

        dp_opt = self.make_dp_optimizer()
        sch = build_scheduler(dp_opt, self.stage.optim, self.stage.trainer.max_steps)
        return {"optimizer": dp_opt, "lr_scheduler": {"scheduler": sch, "interval": "step"}}

    def epsilon(self) -> float:
        return float(self.accountant.get_epsilon(delta=self.plan.delta)) if len(self.accountant) else 0.0

    def dp_backward(self, batch: dict) -> dict:
        """Forward + backward of one Poisson batch; an empty batch gets zero-row per-sample gradients, so the
        optimizer still adds noise and the accountant still counts the step."""
        if not batch["ids"]:
            for q in self.trainable:
                q.grad_sample = torch.zeros((0, *q.shape), dtype=q.dtype, device=q.device)
            return {"loss": float("nan"), "supervised_tokens": 0}
        losses = per_sample_losses(self.model, batch)
        self._backward(losses.sum())
        if self.native:  # a native connector's rows are images/patches, not records
            # imported here: train must not import privacy at module level (privacy sits above train)
            from vlmtrain.train.dp_native import fold_connector_grad_samples

            fold_connector_grad_samples(self.model, batch)
        return {"loss": float(losses.detach().mean()), "supervised_tokens": supervised_count(batch)}

    def training_step(self, window: dict, batch_idx: int):
        opt = self.optimizers()
        batch = window["micro"][0]
        stats = self.dp_backward(batch)
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        stats["grad_norm"] = None  # per-sample norms are clipped individually; there is no global norm
        stats["lr"] = opt.optimizer.param_groups[0]["lr"]
        stats["ids"] = list(batch["ids"])
        stats["samples"] = len(stats["ids"])
        stats["tokens"] = int(batch["attention_mask"].sum()) if batch["ids"] else 0
        stats["privacy/epsilon"] = self.epsilon()
        stats["privacy/batch_size"] = len(stats["ids"])
        self.last_stats = stats

    def close_hooks(self) -> None:
        """Remove Opacus' hooks and grad_sample attributes (before export / merging)."""
        self._gsm[0]._close()

    def on_train_end(self) -> None:
        self.close_hooks()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["vlmtrain"]["privacy"] = {
            "history": [list(h) for h in self.accountant.history], "plan": self.plan.to_dict(),
            "sampler_rng": self.sampler_gen.get_state(),
            "noise_rng": self.noise_gen.get_state() if self.noise_gen is not None else None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint["vlmtrain"].get("privacy")
        if saved is None:
            raise VlmtrainError("checkpoint has no privacy accounting: it was not written by a DP stage")
        for key in ("sample_rate", "noise_multiplier", "max_grad_norm", "expected_batch_size", "units"):
            if saved["plan"][key] != getattr(self.plan, key):
                raise VlmtrainError(f"privacy: resuming with {key}={getattr(self.plan, key)} but the checkpoint "
                                    f"was trained with {saved['plan'][key]}; the accounting would not hold")
        self.accountant.history = [tuple(h) for h in saved["history"]]
        self.sampler_gen.set_state(saved["sampler_rng"])
        if saved["noise_rng"] is not None and self.noise_gen is not None:
            self.noise_gen.set_state(saved["noise_rng"])
