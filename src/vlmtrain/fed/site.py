"""One site's round: the stage's DP-SGD for `local_steps` steps on the site's own gated shards.

The round is an ordinary DP stage: `StageRun`'s start-model, trainability and data phases (`SiteRound`), started
from the global trainable arrays, then the stage's `DPModule` (Opacus' `GradSampleModule` and `DPOptimizer`, the
per-sample loss) stepped by a short loop instead of Lightning's Trainer: a ClientApp process lives for one
message, and the Trainer's setup would cost more than the handful of local steps.

Order of one round (why): gate report checked → budget checked against the ledger (refuse before any gradient) →
train → charge the ledger → keep the reply on the site's disk → reply. A repeated request for the same (run,
round, global arrays) — the coordinator resumed after the reply was lost — gets the kept reply: releasing the same
result twice costs no privacy, and training again would charge again.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlmtrain import atomic
from vlmtrain.errors import VlmtrainError
from vlmtrain.fed.arrays import load_trainable, trainable_arrays
from vlmtrain.fed.ledger import Ledger, epsilon_of
from vlmtrain.fed.site_data import check_gate_report, dataset_key
from vlmtrain.train.stage import StageRun

log = logging.getLogger("vlmtrain.fed")


@dataclass
class RoundRequest:
    """What the coordinator sends for one round (besides the global arrays)."""

    run: str                 # federation run id (ledger entries and kept replies are keyed by it)
    round: int
    local_steps: int
    total_steps: int         # rounds × local_steps: σ is planned so the run spends at most the target ε
    stage: dict              # the DP stage (validated here as a StageConfig)
    epsilon_budget: float    # the site's lifetime budget on this dataset
    seed: int
    proximal_mu: float = 0.0  # FedProx: μ of the proximal term μ/2·‖w − w_global‖² (0: plain local DP-SGD)


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for n in sorted(arrays):
        h.update(n.encode())
        h.update(np.ascontiguousarray(arrays[n], dtype=np.float32).tobytes())
    return h.hexdigest()


def add_proximal_gradient(params: list[torch.Tensor], anchors: list[torch.Tensor], mu: float) -> None:
    """FedProx's term μ/2·‖w − w_global‖² as its gradient μ·(w − w_global), added to each `p.grad` (same shape as
    p). Added after Opacus privatised the gradient: the term does not read data, so it costs no privacy."""
    with torch.no_grad():
        for p, a in zip(params, anchors, strict=True):
            p.grad.add_(p - a, alpha=mu)


def seeded_dp_dataset(sources, encoder, unit: str, seed: int):
    """`train.dp.DPDataset` whose choice among a sampled patient's records comes from its own `random.Random(seed)`
    instead of the global `random`: inside a ClientApp process Flower's heartbeat and retry threads draw from the
    global `random` at timing-dependent moments (`flwr.supercore.heartbeat`, `flwr.supercore.retry`), which made the
    same round pick different records in different processes (weights up to 7.4e-4 apart, 2026-11-30)."""
    from vlmtrain.train.dp import DPDataset

    class SeededDPDataset(DPDataset):
        def __getitem__(self, j: int) -> dict:
            members = self.units[j]
            return self.encode(members[0] if len(members) == 1 else rng.choice(members))

    rng = random.Random(seed)
    return SeededDPDataset(sources, encoder, unit=unit)


def _round_seed(seed: int, site: str, rnd: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{site}:{rnd}".encode()).digest()[:8], "little") % 2**62


class Site:
    """A site's fixed parts: its directory (shards, ledger, kept replies) and its base model on local disk."""

    def __init__(self, site_dir: str | Path, base_model: str | Path, name: str | None = None):
        self.dir = Path(site_dir)
        self.name = name or self.dir.name
        self.shards = self.dir / "shards"
        self.base_model = Path(base_model)
        self.ledger = Ledger(self.dir / "privacy_ledger.json")

    def _kept_path(self, run: str, rnd: int) -> Path:
        return self.dir / "replies" / f"{run}-round{rnd:04d}.npz"

    def train_round(self, req: RoundRequest, global_arrays: dict[str, np.ndarray]) -> tuple[dict, dict, dict]:
        """→ (arrays, metrics, site_info). Raises BudgetExceeded / VlmtrainError to refuse the round."""
        from vlmtrain.config.load import validate
        from vlmtrain.config.stage import StageConfig

        gate_sha = check_gate_report(self.shards)
        key = dataset_key(self.shards)
        stage_dict = dict(req.stage)
        stage_dict["data"] = {**stage_dict["data"], "train": [{"path": str(self.shards)}]}  # this site's own data
        for part in ("eval", "audit"):  # a round neither evaluates nor audits (the coordinator evaluates the release)
            stage_dict.pop(part, None)
        stage = validate(StageConfig, stage_dict, prefix="stage")
        if stage.privacy is None:
            raise VlmtrainError("stage.privacy: a federated site trains only under DP-SGD")
        digest = arrays_digest(global_arrays)
        kept = self.ledger.find(key, req.run, req.round)
        if kept is not None:
            path = self._kept_path(req.run, req.round)
            if kept.get("input_sha256") != digest or not path.is_file():
                raise VlmtrainError(f"site {self.name}: round {req.round} of run {req.run} was already trained on "
                                    "other global weights; refusing to train it again")
            with np.load(path) as z:
                arrays = {n: z[n] for n in z.files}
            log.info(f"site {self.name}: round {req.round} already trained; re-sending the kept reply")
            return arrays, kept["metrics"], {"gate_report_sha256": gate_sha}
        arrays, metrics, entry = self._train(stage, req, global_arrays, key)
        entry.update(run=req.run, round=req.round, input_sha256=digest, metrics=metrics)
        path = self._kept_path(req.run, req.round)
        path.parent.mkdir(exist_ok=True)
        with atomic.replacing(path, "wb") as f:  # the kept reply first: a ledger entry always has its reply on disk
            np.savez(f, **arrays)
        # the ledger's ε after this round (== eps_after of the check, over the same history)
        metrics["epsilon"] = self.ledger.charge(key, entry, stage.privacy.delta, stage.privacy.accountant)
        return arrays, metrics, {"gate_report_sha256": gate_sha}

    def _train(self, stage, req: RoundRequest, global_arrays, key: str):
        """The round's DP-SGD from the global arrays → (arrays, metrics, ledger entry: σ, q, steps)."""
        from vlmtrain.train.dp import quiet_expected_warnings

        quiet_expected_warnings()
        cfg = stage.privacy
        planned: dict = {}

        def check_budget(plan) -> float:  # before any gradient: refuse a round the site's budget cannot pay
            planned.update(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                           steps=req.local_steps)
            return self.ledger.check(key, planned, cfg.delta, req.epsilon_budget, cfg.accountant)

        run = SiteRound(stage, self.base_model, _round_seed(req.seed, self.name, req.round), req.total_steps,
                        check_budget)
        run.start_model()
        run.trainability()
        load_trainable(run.bundle.model, global_arrays)
        run.data()
        losses, empty = local_dp_steps(run.module, run.train_data, req.local_steps, req.proximal_mu)
        plan = run.plan
        metrics = {"num-examples": float(plan.units), "train_loss": float(np.mean(losses)) if losses else float("nan"),
                   "delta": float(cfg.delta), "noise_multiplier": float(plan.noise_multiplier),
                   "sample_rate": float(plan.sample_rate), "steps": float(req.local_steps),
                   "round": float(req.round), "batches_empty": float(empty), "epsilon": run.eps_after}
        log.info(f"site {self.name}: round {req.round}: {req.local_steps} DP steps on {plan.units} {plan.unit}s, "
                 f"σ={plan.noise_multiplier:.4g}, q={plan.sample_rate:.4g}, loss {metrics['train_loss']:.4f}")
        return trainable_arrays(run.bundle.model), metrics, dict(planned)


class SiteRound(StageRun):
    """A site's round as the first phases of a `StageRun`: start model (the site's base model, seeded per round),
    trainability, data. Its training data is the site's own DP view: the patient choice from the round's generator
    (`seeded_dp_dataset`), σ planned over the whole federation's steps, the budget checked (`check_budget(plan)`
    → ε after the round) before the Poisson loader and the `DPModule` are built."""

    def __init__(self, stage, base_model: Path, seed: int, total_steps: int | None = None, check_budget=None):
        super().__init__(stage, init_from=base_model)
        self.seed, self.total_steps, self.check_budget = seed, total_steps, check_budget

    def seed_rng(self) -> None:
        """torch's generator from the round's seed (62 bits: beyond what Lightning's seed_everything accepts)."""
        torch.manual_seed(self.seed)

    def training_data(self) -> tuple:
        """→ (the site's DP view, its Poisson loader); the plan, ε after the round and the DPModule on `self`."""
        from vlmtrain.train.dp import make_plan, poisson_loader
        from vlmtrain.train.dp_module import DPModule

        cfg = self.stage.privacy
        ds = seeded_dp_dataset(self.train_sources, self.encoder, cfg.unit, self.seed)
        self.plan = make_plan(cfg, len(ds), ds.records, self.stage.data.batch_size, self.total_steps)
        self.eps_after = self.check_budget(self.plan)
        loader, gen = poisson_loader(ds, self.plan, self.bundle.tokenizer.pad_token_id, 0, self.seed)
        self.module = DPModule(self.bundle, self.stage, self.plan, gen, noise_seed=self.seed + 1)
        return ds, loader


def local_dp_steps(module, loader, steps: int, proximal_mu: float = 0.0) -> tuple[list[float], int]:
    """`steps` DP-SGD steps of a `DPModule` over the Poisson batches of `loader`, without a Trainer (module doc:
    why); the sampler starts another pass when one ends. FedProx (`proximal_mu` > 0) adds its term to the
    privatised gradient. → (mean loss of each non-empty batch, number of empty batches)."""
    module.model.train()
    opt = module.make_dp_optimizer()
    anchors = [q.detach().clone() for q in module.trainable] if proximal_mu else None  # FedProx's w_global
    losses, empty, it = [], 0, iter(loader)
    for _ in range(steps):
        try:
            window = next(it)
        except StopIteration:  # one pass of the sampler is len(ds)/batch draws; start another
            it = iter(loader)
            window = next(it)
        batch = window["micro"][0]
        stats = module.dp_backward(batch)  # an empty Poisson batch is still a step: noise only
        if batch["ids"]:
            losses.append(stats["loss"])
        else:
            empty += 1
        if anchors is None:
            opt.step()
        elif opt.pre_step():  # Opacus' clip + noise + average into p.grad (what `opt.step` does first)
            add_proximal_gradient(module.trainable, anchors, proximal_mu)
            opt.original_optimizer.step()
        opt.zero_grad(set_to_none=True)
    module.close_hooks()
    return losses, empty


def site_report(site_dir: str | Path) -> dict:
    """The site's ledger as a privacy report: per dataset, ε at its δ over every round of every run."""
    ledger = Ledger(Path(site_dir) / "privacy_ledger.json").read()
    out = {}
    for key, ds in ledger["datasets"].items():
        out[key] = {"epsilon": epsilon_of(ds["entries"], ds["delta"], ds["accountant"]), "delta": ds["delta"],
                    "accountant": ds["accountant"], "rounds": len(ds["entries"]),
                    "steps": int(sum(e["steps"] for e in ds["entries"])),
                    "runs": sorted({e["run"] for e in ds["entries"]})}
    return out

