"""DP-SGD for a training stage (the stage's `privacy:` block), with Opacus.

What a DP step is here (Abadi et al. 2016), and which library does each part:

- sampling: every unit (record, or patient) joins a batch independently with probability q = batch_size / units
  (Poisson; Opacus' `UniformWithReplacementSampler` over a map-style view of the shards). Batches vary in size and
  may be empty; an empty batch is still a step (noise only), as the accountant assumes;
- per-sample gradients: Opacus' `GradSampleModule` hooks on the trainable layers (connector linears, LoRA A/B);
  the loss handed to autograd is Σ_i loss_i (each record's mean token loss), so grad_sample[i] = ∇loss_i. Native
  transformers families' connectors see images or patches, not records: their rows are summed per record
  (`train.dp_native`), so records may carry any number of images there;
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
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from vlmtrain.data.encode import decode_image
from vlmtrain.data.schema import RecordError
from vlmtrain.errors import VlmtrainError
from vlmtrain.train.dp_module import DPModule, DPPlan, per_sample_losses, supervised_count  # noqa: F401  (callers
# import the plan and the per-sample loss from here too: the audit, the federated site, and tests that check it
# against one-record-at-a-time gradients)

log = logging.getLogger("vlmtrain.privacy")


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
                        # train.dp_native.)
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


def quiet_expected_warnings() -> None:
    # The connector's first layer gets frozen-tower features (no input grad): expected with per-sample hooks.
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
    # Poisson batches are independent draws and the sampler's generator is restored, so mid-epoch resume is exact.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")


def build_dp_training(stage, bundle, encoder, sources, run_dir: Path):
    """Dataset, plan, Poisson loader and DP module for a stage with a `privacy:` block."""
    quiet_expected_warnings()
    cfg = stage.privacy
    seed = cfg.seed if cfg.seed is not None else stage.trainer.seed
    ds = DPDataset(sources, encoder, unit=cfg.unit, one_image=not bundle.native)
    plan = make_plan(cfg, len(ds), ds.records, stage.data.batch_size, stage.trainer.max_steps)
    loader, gen = poisson_loader(ds, plan, bundle.tokenizer.pad_token_id, stage.data.num_workers, seed)
    module = DPModule(bundle, stage, plan, gen)
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
