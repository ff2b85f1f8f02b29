"""DP-SGD for a training stage (the stage's `privacy:` block), with Opacus.

What a DP step is here (Abadi et al. 2016), and which library does each part:

- sampling: every unit (record, or patient) joins a batch independently with probability q = batch_size / units
  (Poisson; Opacus' `UniformWithReplacementSampler` over a map-style view of the shards). Batches vary in size and
  may be empty; an empty batch is still a step (noise only), as the accountant assumes;
- per-sample gradients: Opacus' `GradSampleModule` hooks on the trainable layers (connector linears, LoRA A/B);
  the loss handed to autograd is Σ_i loss_i (each record's mean token loss), so grad_sample[i] = ∇loss_i. Native
  transformers families' connectors see images or patches, not records: their rows are summed per record
  (`privacy.dp_native`), so records may carry any number of images there;
- clip each sample's whole gradient to `max_grad_norm` C, sum, add N(0, σ²C²), divide by the expected batch size
  q·N (Opacus' `DPOptimizer`, with a seeded generator unless `secure_mode`), then the stage's own optimizer;
- accounting: Opacus' RDP or PRV accountant, fed by the optimizer's step hook; ε at δ is logged during training and
  written to `summary.json["privacy"]`. With `target_epsilon`, σ comes from Opacus' `get_noise_multiplier` for
  the planned steps.

Patient-level units (`unit: patient`): units are the gate's `meta.patient_group`s; a sampled patient contributes
one of their records, drawn at random, so one patient changes at most one clipped term of one step's sum — the
same sensitivity C, with q counted over patients.

Why a map-style view and not the streaming loader: the guarantee is for Poisson sampling over a fixed dataset of
known size; a shuffle buffer over streams is neither. The view keeps each record's raw tar members (compressed
image bytes) in memory and encodes on access.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from vlmtrain.data.chat import IGNORE
from vlmtrain.errors import VlmtrainError

log = logging.getLogger("vlmtrain.privacy")


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


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """σ such that `steps` Poisson-subsampled Gaussian steps at rate q spend at most `target_epsilon` (Opacus)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant))


def make_plan(cfg, units: int, records: int, batch_size: int, steps: int) -> DPPlan:
    if units < 2:
        raise VlmtrainError(f"privacy: the training set has {units} {cfg.unit}(s); DP-SGD needs more")
    if batch_size >= units:
        raise VlmtrainError(f"data.batch_size: {batch_size} is the expected Poisson batch and must be below the "
                            f"number of {cfg.unit}s ({units}); the sample rate would be ≥ 1")
    q = batch_size / units
    sigma = cfg.noise_multiplier
    if sigma is None:
        sigma = noise_for_target(cfg.target_epsilon, cfg.delta, q, steps, cfg.accountant)
    return DPPlan(units=units, records=records, unit=cfg.unit, expected_batch_size=batch_size, sample_rate=q,
                  noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm, delta=cfg.delta, steps=steps,
                  accountant=cfg.accountant, target_epsilon=cfg.target_epsilon, secure_mode=cfg.secure_mode)


# ---- the map-style dataset --------------------------------------------------------------------------------------
class DPDataset(Dataset):
    """Every record of the stage's shards, validated once; item j is unit j (a record, or one of a patient's records
    drawn at random). Items are encoded samples with their `id`."""

    def __init__(self, sources, encoder, unit: str = "record", one_image: bool = True):
        from vlmtrain.data.loader import image_members, parse_sample
        from vlmtrain.data.schema import RecordError
        from vlmtrain.data.shards import iter_shard

        self.encoder = encoder
        self.raw: list[dict] = []
        self.skipped: Counter = Counter()
        seen: set[str] = set()
        for src in sources:
            for url in src.shard_urls():
                for raw in iter_shard(url):
                    if "__error__" in raw:
                        self.skipped[raw["__error__"]] += 1
                        continue
                    try:
                        rec, images = parse_sample(raw)
                        enc = encoder(rec, images)
                    except RecordError as e:
                        self.skipped[e.reason] += 1
                        continue
                    if "chosen" in enc:
                        raise VlmtrainError(f"{url}: preference records cannot train under DP-SGD (next_token only)")
                    n_img = 0 if enc.get("pixel_values") is None else int(enc["pixel_values"].shape[0])
                    if one_image and n_img != 1:
                        # The connector's per-sample gradients are per image: they line up with records only when
                        # every record has exactly one image. (Native families sum each record's rows instead:
                        # privacy.dp_native.)
                        self.skipped["dp_needs_one_image"] += 1
                        continue
                    if rec["id"] in seen:
                        self.skipped["duplicate_id"] += 1
                        continue
                    seen.add(rec["id"])
                    self.raw.append({"record": rec, "images": [(k, raw[k]) for k in image_members(raw)]})
        log.info(f"DP-SGD: {len(self.raw)} records validated for Poisson sampling"
                 + (f" ({sum(self.skipped.values())} skipped: {dict(self.skipped)})" if self.skipped else ""))
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(self.raw):
            if unit == "patient":
                key = (r["record"].get("meta") or {}).get("patient_group")
                if not key:
                    raise VlmtrainError(f"privacy.unit: patient, but record {r['record']['id']} has no "
                                        "meta.patient_group (prepare the data with `vlmtrain prep medical`)")
            else:
                key = r["record"]["id"]
            groups.setdefault(key, []).append(i)
        self.units = list(groups.values())

    @property
    def records(self) -> int:
        return len(self.raw)

    def encode(self, i: int) -> dict:
        from vlmtrain.data.encode import decode_image

        r = self.raw[i]
        images = [decode_image(data, f"{r['record']['id']}.{k}") for k, data in r["images"]]
        enc = self.encoder(r["record"], images)
        enc["id"] = r["record"]["id"]
        return enc

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, j: int) -> dict:
        members = self.units[j]
        return self.encode(members[0] if len(members) == 1 else random.choice(members))


def poisson_collate(pad_token_id: int):
    """Batch (possibly empty) → the window shape VLMModule steps take: {"micro": [batch], "cursor": None}."""
    from vlmtrain.data.batching import collate

    def fn(items: list[dict]) -> dict:
        if not items:
            return {"micro": [{"ids": []}], "cursor": None}
        b = collate(items, pad_token_id)
        b["ids"] = [x["id"] for x in items]
        return {"micro": [b], "cursor": None}

    return fn


def poisson_loader(dataset: DPDataset, plan: DPPlan, pad_token_id: int, num_workers: int, seed: int):
    """DataLoader whose batches are Poisson samples of the units (Opacus' sampler, seeded generator)."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    gen = torch.Generator().manual_seed(seed)
    sampler = UniformWithReplacementSampler(num_samples=len(dataset), sample_rate=plan.sample_rate, generator=gen)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=poisson_collate(pad_token_id),
                      num_workers=num_workers, persistent_workers=num_workers > 0), gen


# ---- the per-sample loss ----------------------------------------------------------------------------------------
def per_sample_losses(model, batch: dict, mean: bool = True) -> torch.Tensor:
    """`[b]`: each record's mean (or, `mean=False`, summed) next-token loss over its supervised tokens (logits
    only where supervised)."""
    from vlmtrain.train.module import model_extras
    from vlmtrain.train.objectives import prediction_mask

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
    return int((batch["labels"][:, 1:] != IGNORE).sum()) if "labels" in batch else 0


# ---- the Lightning module ---------------------------------------------------------------------------------------
def _module_class():
    from vlmtrain.train.module import VLMModule

    class DPModule(VLMModule):
        """VLMModule whose step is a DP-SGD step: per-sample loss, Opacus hooks, DPOptimizer (clip, noise,
        average), accountant. Checkpoints add the accountant's history and the sampler/noise generator states."""

        def __init__(self, bundle, stage, plan: DPPlan, sampler_gen: torch.Generator):
            from opacus import GradSampleModule
            from opacus.accountants import create_accountant

            super().__init__(bundle, stage, loader=None)
            self.plan = plan
            self.native = bundle.native
            self.sampler_gen = sampler_gen
            seed = stage.privacy.seed if stage.privacy.seed is not None else stage.trainer.seed
            self.noise_gen = None if plan.secure_mode else torch.Generator().manual_seed(seed + 1)
            self.accountant = create_accountant(plan.accountant)
            # kept out of the module tree: hooks live on self.model's layers; state_dict keys stay unchanged
            self._gsm = [GradSampleModule(self.model, batch_first=True, loss_reduction="sum", strict=True)]
            self.trainable = [p for p in self.model.parameters() if p.requires_grad]

        def configure_optimizers(self):
            from opacus.optimizers import DPOptimizer

            from vlmtrain.train.optim import build_optimizer, build_scheduler

            p = self.plan
            dp_opt = DPOptimizer(build_optimizer(self.model, self.stage.optim), noise_multiplier=p.noise_multiplier,
                                 max_grad_norm=p.max_grad_norm, expected_batch_size=p.expected_batch_size,
                                 loss_reduction="mean", generator=self.noise_gen, secure_mode=p.secure_mode)
            dp_opt.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=p.sample_rate))
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
                from vlmtrain.privacy.dp_native import fold_connector_grad_samples

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

        def on_train_end(self) -> None:
            self._gsm[0]._close()  # remove Opacus' hooks and grad_sample attributes before export / merging

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

    return DPModule


def _quiet_expected_warnings() -> None:
    import warnings

    # The connector's first layer gets frozen-tower features (no input grad): expected with per-sample hooks.
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
    # Poisson batches are independent draws and the sampler's generator is restored, so mid-epoch resume is exact.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")


def build_dp_training(stage, bundle, encoder, sources, run_dir: Path):
    """Dataset, plan, Poisson loader and DP module for a stage with a `privacy:` block."""
    _quiet_expected_warnings()
    cfg = stage.privacy
    seed = cfg.seed if cfg.seed is not None else stage.trainer.seed
    ds = DPDataset(sources, encoder, unit=cfg.unit, one_image=not bundle.native)
    plan = make_plan(cfg, len(ds), ds.records, stage.data.batch_size, stage.trainer.max_steps)
    loader, gen = poisson_loader(ds, plan, bundle.tokenizer.pad_token_id, stage.data.num_workers, seed)
    module = _module_class()(bundle, stage, plan, gen)
    out = Path(run_dir) / "privacy"
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2))
    log.info(f"DP-SGD: {plan.units} units ({plan.unit}s; {plan.records} records), q={plan.sample_rate:.4g}, "
             f"σ={plan.noise_multiplier:.4g}, C={plan.max_grad_norm}, δ={plan.delta:g}, {plan.steps} steps, "
             f"accountant {plan.accountant}" + (f" (σ chosen for ε={plan.target_epsilon})" if cfg.target_epsilon
                                                 else ""))
    return ds, plan, loader, module


def privacy_summary(module, plan: DPPlan, dataset: DPDataset) -> dict:
    """`summary.json["privacy"]`: the achieved guarantee and the numbers that produced it."""
    import opacus

    steps = sum(int(h[2]) for h in module.accountant.history)  # (σ, q, steps) entries
    return {"epsilon": module.epsilon(), "delta": plan.delta, "noise_multiplier": plan.noise_multiplier,
            "max_grad_norm": plan.max_grad_norm, "sample_rate": plan.sample_rate, "steps": int(steps),
            "accountant": plan.accountant, "unit": plan.unit, "units": plan.units, "records": plan.records,
            "expected_batch_size": plan.expected_batch_size, "target_epsilon": plan.target_epsilon,
            "secure_mode": plan.secure_mode, "opacus": opacus.__version__}
