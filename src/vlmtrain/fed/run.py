"""`vlmtrain fed run RECIPE --out OUT [--simulation]`: the whole federation on one machine (loopback), top to bottom;
on Flower's Deployment Engine (a SuperLink and one SuperNode process per site), or with `--simulation` on its
Simulation Engine (one virtual node per site in Ray actors).

    OUT/<stage>/                 stages before the federated one, run centrally (public data → the base model)
    OUT/sites/<SITE>/            each site's gated shards, privacy ledger and kept replies (what stays at a site)
    OUT/coordinator/             plan.json, initial.npz, checkpoint/, final.npz, summary.json (the coordinator's)
    OUT/deploy/                  SuperLink database, FLWR_HOME, process logs and PIDs
    OUT/summary.json             federation summary + held-out evaluation of the released model

In a real deployment the same pieces run on different hosts (docs/federated.md): each site prepares its own
`sites/<SITE>` and base model, starts `flower-supernode` with its `--node-config`, and the coordinator submits the
app with `flwr run`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import signal
import sys
import time
from pathlib import Path

import numpy as np

from vlmtrain.atomic import write_json
from vlmtrain.data.encode import encoder_for
from vlmtrain.errors import ConfigError, VlmtrainError
from vlmtrain.fed.config import MIN_SITES_FOR_SITE_DP, FederatedConfig
from vlmtrain.fed.deploy import Loopback, write_app
from vlmtrain.fed.simulate import check_isolation, simulate_isolated
from vlmtrain.fed.site_data import prepare_sites

log = logging.getLogger("vlmtrain.fed")


SITE_SHARDS = "(the site's own gated shards)"


def load_federated(recipe: str | Path, out: str | Path, overrides: list[str] | None = None):
    """→ (FederatedConfig, stages before the federated stage, the federated stage), all validated up front."""
    from vlmtrain.config.load import load_yaml_with_overrides, validate
    from vlmtrain.config.stage import RecipeConfig
    from vlmtrain.train.runner import resolve_recipe

    recipe = Path(recipe)
    raw = validate(RecipeConfig, load_yaml_with_overrides(recipe), source=str(recipe))
    if raw.federated is None:
        raise ConfigError("federated: missing (a federated recipe names its federated stage and sites)",
                          source=str(recipe))
    fed_overrides = [o.removeprefix("federated.") for o in overrides or [] if o.startswith("federated.")]
    stage_overrides = [o for o in overrides or [] if not o.startswith("federated.")]
    fed_dict = dict(raw.federated)
    if fed_overrides:
        from vlmtrain.config.load import apply_overrides

        fed_dict = apply_overrides(fed_dict, fed_overrides, source=str(recipe))
    fed = validate(FederatedConfig, fed_dict, source=str(recipe), prefix="federated")
    if fed.site_dp is not None and len(fed.sites) < MIN_SITES_FOR_SITE_DP and not fed.site_dp.force:
        sigma, n = fed.site_dp_noise(), len(fed.sites)
        raise ConfigError(f"federated.site_dp: {n} sites is a small consortium for site-level DP: ε="
                          f"{fed.site_dp.target_epsilon:g} at δ={fed.site_dp.delta:g} over {fed.rounds} rounds needs "
                          f"σ={sigma:.3f}, i.e. noise of std {sigma / n:.3f}×clipping_norm on the mean of {n} updates "
                          f"each at most 1×clipping_norm; set federated.site_dp.force=true to run anyway",
                          source=str(recipe))
    stages = resolve_recipe(recipe, out, stage_overrides)
    names = [s.name for s in stages]
    if fed.stage not in names:
        raise ConfigError(f"federated.stage: no stage named {fed.stage!r} (stages: {', '.join(names)})",
                          source=str(recipe))
    i = names.index(fed.stage)
    if i != len(stages) - 1:
        raise ConfigError(f"federated.stage: {fed.stage!r} must be the last stage (later stages would need the "
                          "federated model centrally)", source=str(recipe))
    if stages[i].privacy is None:
        raise ConfigError(f"stages[{i}].privacy: the federated stage trains under DP-SGD at every site",
                          source=str(recipe))
    if stages[i].audit is not None:
        raise ConfigError(f"stages[{i}].audit: canaries are not planted in federated runs", source=str(recipe))
    return fed, stages[:i], stages[i]


def site_model(base_model: Path, stage):
    """The base model with the stage's LoRA and trainability applied (seeded: the same on every call): the start
    model and trainability phases of a site's round."""
    from vlmtrain.fed.site import SiteRound

    run = SiteRound(stage, base_model, stage.trainer.seed)
    run.start_model()
    run.trainability()
    return run.bundle


def heldout_loss(bundle, shards: str | Path, max_records: int = 200) -> float:
    """Mean per-record next-token loss over held-out shards (the DP recipe's held-out loss)."""
    import torch

    from vlmtrain.data.loader import image_members, parse_sample
    from vlmtrain.data.shards import Source, iter_shard
    from vlmtrain.train.audit import encoded_records, record_losses

    encoder = encoder_for(bundle, 192)
    items = []
    for url in Source(str(shards)).shard_urls():
        for raw in iter_shard(url):
            if "__error__" not in raw and len(items) < max_records:
                rec, _ = parse_sample(raw)
                items.append((rec, [(k, raw[k]) for k in image_members(raw)]))
    bundle.model.eval()
    with torch.no_grad():
        return float(np.mean(record_losses(bundle.model, bundle.tokenizer.pad_token_id, encoded_records(encoder, items))))


def run_id(recipe_name: str, out: Path) -> str:
    return f"{recipe_name}-{hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:8]}"


def prepare(recipe: str | Path, out: str | Path, overrides: list[str] | None = None, resume: bool = False,
            local_sites: bool = True) -> dict:
    """Central stages, site data, initial arrays and the coordinator's plan (each step once; reused on resume).
    `local_sites=False` (`fed coordinator`): the sites hold their own data on their own hosts; the plan names them
    only."""
    from vlmtrain.fed.arrays import trainable_arrays
    from vlmtrain.train.runner import fit_stage

    out = Path(out)
    fed, central, stage = load_federated(recipe, out, overrides)
    if out.exists() and any(out.iterdir()) and not resume:
        raise VlmtrainError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    parent = None
    for st in central:  # public data: trained where the coordinator is, like `vlmtrain run`
        done = out / st.name / "summary.json"
        if not (done.is_file() and json.loads(done.read_text()).get("status") == "completed"):
            fit_stage(st, out / st.name, out / "data", resume=resume, base_dir=Path(recipe).parent, parent=parent)
        parent = {"name": st.name, "model": str(out / st.name / "model")}
    if stage.init_from is None:
        raise ConfigError("federated: the federated stage needs a central stage before it (its base model)")
    base_model = Path(stage.init_from)
    sites = prepare_sites(out / "sites", fed.sites, fed.seed) if local_sites else {}
    coord = out / "coordinator"
    coord.mkdir(exist_ok=True)
    initial = coord / "initial.npz"
    if not initial.is_file():
        np.savez(initial, **trainable_arrays(site_model(base_model, stage).model))
    stage_dict = stage.model_dump(mode="json")
    # each site trains on its own shards (it puts their path here); the union never exists in one place
    stage_dict["data"]["train"] = [{"path": SITE_SHARDS}]
    stage_dict["init_from"] = None
    plan = {"run": run_id(Path(recipe).stem, out), "rounds": fed.rounds, "local_steps": fed.local_steps,
            "stage": stage_dict, "seed": fed.seed, "epsilon_budget": fed.epsilon_budget, "min_sites": fed.quorum,
            "strategy": {"name": fed.strategy, "options": fed.strategy_options()},
            "site_dp": None if fed.site_dp is None else {"noise_multiplier": fed.site_dp_noise(),
                                                         "clipping_norm": fed.site_dp.clipping_norm,
                                                         "delta": fed.site_dp.delta,
                                                         "target_epsilon": fed.site_dp.target_epsilon},
            "round_timeout_s": fed.round_timeout_s, "coordinator_dir": str(coord.resolve()),
            "initial_arrays": str(initial.resolve()), "patients_disjoint": fed.patients_disjoint,
            "secure_aggregation": fed.secure,
            "sites": {name: str(sites[name].resolve()) if name in sites else "" for name in fed.sites},
            "base_model": str(base_model.resolve())}
    (coord / "plan.json").write_text(json.dumps(plan, indent=1))
    return plan


def run_loopback(recipe: str | Path, out: str | Path, overrides: list[str] | None = None, resume: bool = False,
                 plan_extra: dict | None = None, evaluate: bool = True, simulation: bool = False) -> dict:
    """Prepare, start SuperLink + one SuperNode per site on 127.0.0.1, run the federation, stop everything,
    evaluate the released model on the held-out cohort, write OUT/summary.json. With `simulation`, the same plan,
    ServerApp and ClientApp run on Flower's Simulation Engine instead (one virtual node per site, in a private
    network namespace: `fed.simulate`)."""
    t0 = time.time()
    out = Path(out)
    if simulation:
        if importlib.util.find_spec("ray") is None:  # before minutes of preparation, not after
            raise VlmtrainError("--simulation runs Flower's Simulation Engine, which needs Ray: install the fed-sim "
                                "extra (`pip install -c requirements/constraints-fed.txt -e .[fed-sim]`)")
        check_isolation()
    plan = prepare(recipe, out, overrides, resume)

    def start_sites(net):
        for name, site_dir in plan["sites"].items():
            net.start_site(name, Path(site_dir), Path(plan["base_model"]))

    def launch(plan_path: Path, timeout: float):
        if simulation:
            return (*simulate_isolated(out / "deploy", plan_path, len(plan["sites"]), timeout), None)
        return deploy(plan, plan_path, Loopback(out / "deploy"), start_sites, timeout)

    return serve(plan, launch, plan_extra, evaluate, t0)


def run_coordinator(recipe: str | Path, out: str | Path, host: str, port: int, tls_dir: str | Path | None,
                    site_keys: dict[str, Path], overrides: list[str] | None = None, resume: bool = False,
                    online_timeout_s: float = 600.0, evaluate: bool = True) -> dict:
    """The coordinator of a multi-host federation (`vlmtrain fed coordinator`): central stages and the plan, a
    SuperLink bound to host:port with TLS and SuperNode authentication, the sites' public keys registered, then —
    once every site is online (`vlmtrain fed site` on each site's host) — the run; OUT/summary.json as `fed run`."""
    t0 = time.time()
    recipe_sites = list(load_federated(recipe, out, overrides)[0].sites)  # checked before any stage runs
    unknown, missing = sorted(set(site_keys) - set(recipe_sites)), sorted(set(recipe_sites) - set(site_keys))
    if unknown or missing:
        raise ConfigError(f"--site-key: the recipe's sites are {', '.join(recipe_sites)}; "
                          + "; ".join(([f"no key given for {', '.join(missing)}"] if missing else [])
                                      + ([f"not in the recipe: {', '.join(unknown)}"] if unknown else [])))
    plan = prepare(recipe, out, overrides, resume, local_sites=False)

    def register_sites(net):
        for name, public_key in site_keys.items():
            net.register(name, Path(public_key))
        log.info(f"coordinator: SuperLink on {host}:{net.port}; waiting for {len(site_keys)} sites "
                 "(`vlmtrain fed site` on each site's host)")

    def launch(plan_path: Path, timeout: float):
        net = Loopback(Path(out) / "deploy", port=port, host=host, tls_dir=Path(tls_dir) if tls_dir else None)
        return deploy(plan, plan_path, net, register_sites, timeout, online_timeout_s)

    return serve(plan, launch, None, evaluate, t0)


def serve(plan: dict, launch, plan_extra: dict | None, evaluate: bool, t0: float) -> dict:
    """Write the plan, `launch(plan_path, timeout)` the federation (→ run id, status, the deployment's processes or
    None for a simulation), then the summary (+ held-out evaluation) in OUT/summary.json."""
    if plan_extra:
        plan.update(plan_extra)
    coord = Path(plan["coordinator_dir"])
    out = coord.parent
    plan_path = coord / "plan.json"
    plan_path.write_text(json.dumps(plan, indent=1))
    (coord / "summary.json").unlink(missing_ok=True)
    run, status, net = launch(plan_path, plan["round_timeout_s"] * plan["rounds"] + 300)
    if not (coord / "summary.json").is_file():
        raise VlmtrainError(f"federation run ended ({status}) without a coordinator summary; see "
                            f"{out / 'deploy' / 'logs'}")
    summary = json.loads((coord / "summary.json").read_text())
    summary["flower"] = {"run_id": run, "status": status}
    summary["federated"]["transport"] = transport(net)
    if evaluate and summary["status"] == "completed":
        summary["eval"] = evaluate_released(plan, coord / "final.npz", out / "data")
    summary["wall_seconds"] = time.time() - t0
    if summary["status"] == "completed":
        write_json(out / "summary.json", summary, indent=1)
    return summary


def deploy(plan: dict, plan_path: Path, net, start_sites, timeout: float, online_timeout_s: float = 180.0):
    """The SuperLink of `net`, the sites (`start_sites(net)`: local SuperNodes, or registered keys of remote ones),
    `flwr run`, wait, stop every process started here → (run id, status, net)."""
    # SIGTERM (a `timeout`, a scheduler) ends this driver through `finally`, so the processes it started stop too
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        net.start_superlink()
        start_sites(net)
        net.wait_online(len(plan["sites"]), timeout=online_timeout_s)
        run = net.submit(write_app(net.root / "app"), plan_path)
        log.info(f"federation: flwr run {run} submitted to the SuperLink on {net.host}:{net.port}")
        status = net.wait(run, timeout=timeout)
        net.save_run_log(run)
    finally:
        net.stop()
        signal.signal(signal.SIGTERM, previous)
    return run, status, net


def transport(net) -> dict:
    """How the messages travelled: a deployment over TLS with authenticated SuperNodes (`net`), or Flower's
    Simulation Engine (None: Ray actors on this machine, in a network namespace that has only loopback)."""
    if net is None:
        return {"engine": "simulation", "backend": "ray", "tls": False, "supernode_auth": False,
                "host": "127.0.0.1", "network_namespace": "loopback only"}
    return {"engine": "deployment", "tls": net.secure, "supernode_auth": net.secure, "host": net.host}


def evaluate_released(plan: dict, arrays_path: Path, data_root: Path) -> dict:
    """Held-out loss of the base model and of base + federated arrays, on `medical-cohort-holdout`."""
    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.fed.arrays import load_trainable
    from vlmtrain.train.sources import prepare_builtin

    stage = validate(StageConfig, plan["stage"], prefix="stage")  # data.train is not read here
    holdout = prepare_builtin("medical-cohort-holdout", data_root)
    bundle = site_model(Path(plan["base_model"]), stage)
    before = heldout_loss(bundle, holdout)
    with np.load(arrays_path) as z:
        load_trainable(bundle.model, {n: z[n] for n in z.files})
    return {"heldout_loss": heldout_loss(bundle, holdout), "heldout_loss_before": before,
            "heldout": "medical-cohort-holdout"}
