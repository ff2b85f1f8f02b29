"""The coordinator's round loop and its checkpoint; runs inside Flower's ServerApp (`fed.server_app`).

The loop is Flower's own strategy (`flwr.serverapp.strategy.FedAvg`, `FedProx` or `FedAdam`: node sampling,
message construction, the weighted mean of `aggregate_train` and FedAdam's server step) driven one round at a time,
so that every round can be checkpointed: `Strategy.start` runs all rounds in one call and keeps its state in memory.

Quorum with a deadline: Flower's `sample_nodes` waits forever for `min_available_nodes`; `quorum_strategy` waits at
most `round_timeout_s` and then trains with the nodes that are connected; `Grid.send_and_receive(timeout=...)`
returns the replies that arrived by the deadline. A round with fewer than `min_sites` valid replies is skipped:
the global arrays stay, and sites that did train have charged their own ledgers (their ε is what they released).

Checkpoint (`COORD/checkpoint/`): `arrays-roundNNNN.npz` (global trainable arrays, and the strategy's own state
under `strategy:` keys: FedAdam's moments m_t, v_t; FedAvg and FedProx have none) and `state.json` (round counter,
per-round history with bytes and site metrics, the plan's hash), each written to a temporary name and
`os.replace`d (`vlmtrain.atomic`), arrays first: `state.json` names the arrays file it goes with, so a crash
between the two leaves the previous consistent pair. The sites' RNG is derived from (seed, site, round), so a resumed run repeats exactly
the rounds an uninterrupted one would run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from vlmtrain import atomic
from vlmtrain.errors import VlmtrainError
from vlmtrain.fed.arrays import from_record, payload_bytes, to_record, wire_bytes
from vlmtrain.fed.ledger import epsilon_of

log = logging.getLogger("vlmtrain.fed")


def plan_hash(plan: dict) -> str:
    keep = {k: plan.get(k) for k in ("run", "rounds", "local_steps", "stage", "seed", "epsilon_budget", "strategy")}
    if plan.get("secure_aggregation"):  # only when on: plans written before the field keep their hash
        keep["secure_aggregation"] = True
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


STRATEGY_PREFIX = "strategy:"  # checkpoint npz keys of the strategy's state (parameter names hold no colon)
STRATEGY_STATE = ("m_t", "v_t")  # FedAdam's server moments (Flower's FedOpt attributes); FedAvg/FedProx have none


def wait_for_quorum(connected, min_sites: int, deadline_s: float, rnd: int) -> int:
    """Poll `connected()` (the number of connected sites) until it reaches `min_sites` or `deadline_s` passes;
    returns the last count, with a warning when the round must be skipped (Flower's own sampling waits forever)."""
    t_end = time.time() + deadline_s
    while (n := connected()) < min_sites and time.time() < t_end:
        time.sleep(0.5)
    if n < min_sites:
        log.warning(f"round {rnd}: {n} sites connected after {deadline_s:.0f}s, quorum {min_sites}: round skipped")
    return n


def quorum_strategy(min_sites: int, deadline_s: float, name: str = "fedavg", options: dict | None = None):
    """Flower's own strategy (`flwr.serverapp.strategy.FedAvg` / `FedProx` / `FedAdam`) with quorum sampling:
    wait for `min_sites` connected nodes at most `deadline_s`, then train every connected node (fraction 1.0);
    fewer than `min_sites` → no messages (the round is skipped). The strategy's own `configure_train` still builds
    the messages, so FedProx's `proximal-mu` and FedAdam's record of the round's global arrays are Flower's."""
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    base = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}[name]

    class Quorum(base):
        def configure_train(self, server_round, arrays, config, grid):
            n = wait_for_quorum(lambda: len(grid.get_node_ids()), min_sites, deadline_s, server_round)
            if n < min_sites:
                return []
            # Flower's sampling waits for min_available_nodes and samples max(fraction·n, min_train_nodes): with
            # both set to the nodes connected now it returns at once with all of them
            self.min_available_nodes = self.min_train_nodes = n
            return super().configure_train(server_round, arrays, config, grid)

    return Quorum(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=min_sites,
                  min_available_nodes=min_sites, **(options or {}))


SITE_WEIGHT = "site-weight"  # site-level DP averages the clipped updates unweighted (coordinator-side metric)


def build_strategy(plan: dict):
    """→ (the strategy the rounds call, the inner Flower strategy whose state is checkpointed). With `site_dp`:
    Flower's `DifferentialPrivacyServerSideFixedClipping` around it, averaging unweighted (each site's clipped
    update moves the mean by at most C/k, the sensitivity its noise σ·C/k is calibrated to)."""
    spec = plan.get("strategy") or {"name": "fedavg", "options": {}}
    dp = plan.get("site_dp")
    options = {**spec["options"], **({"weighted_by_key": SITE_WEIGHT} if dp else {})}
    inner = quorum_strategy(plan["min_sites"], plan["round_timeout_s"], spec["name"], options)
    if dp is None:
        return inner, inner
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    outer = DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier=dp["noise_multiplier"],
                                                       clipping_norm=dp["clipping_norm"],
                                                       num_sampled_clients=len(plan.get("sites") or {}) or 1)
    return outer, inner


def strategy_state(strategy) -> dict[str, np.ndarray]:
    """The strategy's own state as arrays named `m_t/<param>`, `v_t/<param>` (empty for FedAvg/FedProx)."""
    return {f"{attr}/{n}": a for attr in STRATEGY_STATE for n, a in (getattr(strategy, attr, None) or {}).items()}


def restore_strategy_state(strategy, state: dict[str, np.ndarray]) -> None:
    for attr in STRATEGY_STATE:
        part = {k.split("/", 1)[1]: a for k, a in state.items() if k.startswith(attr + "/")}
        if part:
            setattr(strategy, attr, part)


class Checkpoint:
    def __init__(self, coord_dir: str | Path):
        self.dir = Path(coord_dir) / "checkpoint"

    def load(self, plan: dict) -> tuple[int, dict[str, np.ndarray] | None, list[dict], dict[str, np.ndarray]]:
        """→ (last round done, global arrays, history, strategy state); (0, None, [], {}) with no checkpoint."""
        state_path = self.dir / "state.json"
        if not state_path.is_file():
            return 0, None, [], {}
        state = json.loads(state_path.read_text())
        if state["plan_hash"] != plan_hash(plan):
            raise VlmtrainError(f"{state_path}: written for another federation plan ({state['plan_hash']}); "
                                "resume with the same recipe, or choose another --out")
        with np.load(self.dir / state["arrays"]) as z:
            arrays = {n: z[n] for n in z.files if not n.startswith(STRATEGY_PREFIX)}
            strategy = {n.removeprefix(STRATEGY_PREFIX): z[n] for n in z.files if n.startswith(STRATEGY_PREFIX)}
        return state["round"], arrays, state["history"], strategy

    def save(self, rnd: int, arrays: dict[str, np.ndarray], history: list[dict], plan: dict,
             strategy: dict[str, np.ndarray] | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"arrays-round{rnd:04d}.npz"
        with atomic.replacing(self.dir / name, "wb") as f:
            np.savez(f, **arrays, **{STRATEGY_PREFIX + k: a for k, a in (strategy or {}).items()})
        atomic.write_json(self.dir / "state.json", {"round": rnd, "arrays": name, "history": history,
                                                    "plan_hash": plan_hash(plan)}, indent=1)
        for old in self.dir.glob("arrays-round*.npz"):  # earlier rounds' arrays: state.json no longer names them
            if old.name != name:
                old.unlink()


def round_config(plan: dict):
    from flwr.app import ConfigRecord

    return ConfigRecord({"run": plan["run"], "local-steps": plan["local_steps"],
                         "total-steps": plan["rounds"] * plan["local_steps"], "stage": json.dumps(plan["stage"]),
                         "epsilon-budget": float(plan["epsilon_budget"]), "seed": plan["seed"]})


def reply_record(msg) -> dict:
    """What the coordinator keeps of one reply: site, bytes, metrics."""
    c = msg.content
    return {"site": str(c["site"]["site"]), "node_id": int(msg.metadata.src_node_id),
            "bytes_up": wire_bytes(c["arrays"]), "payload_bytes": payload_bytes(c["arrays"]),
            "metrics": {k: float(v) for k, v in c["metrics"].items()},
            "gate_report_sha256": str(c["site"]["gate_report_sha256"])}


def run_rounds(grid, plan: dict, initial: dict[str, np.ndarray]) -> dict:
    """Rounds `state.round + 1 .. plan.rounds`; returns the final state (round, arrays, history)."""
    coord = Path(plan["coordinator_dir"])
    ckpt = Checkpoint(coord)
    done, arrays, history, saved_strategy = ckpt.load(plan)
    if arrays is None:
        arrays = initial
    elif done:
        log.info(f"coordinator: resuming after round {done} from {ckpt.dir}")
    strategy, inner = build_strategy(plan)
    restore_strategy_state(inner, saved_strategy)
    for rnd in range(done + 1, plan["rounds"] + 1):
        t0 = time.time()
        msgs = list(strategy.configure_train(rnd, to_record(arrays), round_config(plan), grid))
        replies = list(grid.send_and_receive(msgs, timeout=plan["round_timeout_s"])) if msgs else []
        valid = sorted((m for m in replies if not m.has_error()), key=lambda m: str(m.content["site"]["site"]))
        errors = [str(m.error.reason) for m in replies if m.has_error()]
        entry = {"round": rnd, "sent": len(msgs), "replies": [reply_record(m) for m in valid], "errors": errors}
        agg = None
        if len(valid) >= plan["min_sites"]:
            if plan.get("site_dp"):
                for m in valid:
                    m.content["metrics"][SITE_WEIGHT] = 1.0
                strategy.num_sampled_clients = len(valid)  # noise σ·C/k for the k updates actually averaged
            agg, _ = strategy.aggregate_train(rnd, valid)
        if agg is not None:
            arrays = {n: a.astype(np.float32, copy=False) for n, a in from_record(agg).items()}  # FedAdam: fp64
            entry["aggregated"] = True
        else:
            entry["aggregated"] = False
            log.warning(f"round {rnd}: {len(valid)} valid replies, quorum {plan['min_sites']}: not aggregated"
                        + (f" ({'; '.join(errors)})" if errors else ""))
        entry["seconds"] = time.time() - t0
        history.append(entry)
        ckpt.save(rnd, arrays, history, plan, strategy_state(inner))
        log.info(f"coordinator: round {rnd}/{plan['rounds']} in {entry['seconds']:.1f}s, "
                 f"{len(valid)}/{len(msgs)} sites, aggregated={entry['aggregated']}")
        if plan.get("stop_after_round") == rnd:  # tests: a coordinator stopped right after a checkpoint
            log.info("coordinator: stopping after this round (stop_after_round)")
            return {"round": rnd, "arrays": arrays, "history": history, "stopped": True}
    return {"round": plan["rounds"], "arrays": arrays, "history": history, "stopped": False}


def federation_summary(plan: dict, state: dict) -> dict:
    """`summary.json` of the federation: rounds, sites, bytes per round, and the privacy report (per-site
    patient-level ε as the sites reported it; global = max over patient-disjoint sites, else their sum)."""
    history = state["history"]
    sites: dict[str, dict] = {}
    for h in history:
        for r in h["replies"]:
            sites[r["site"]] = {"epsilon": r["metrics"]["epsilon"], "delta": r["metrics"]["delta"],
                                "noise_multiplier": r["metrics"]["noise_multiplier"],
                                "sample_rate": r["metrics"]["sample_rate"],
                                "steps_this_run": sites.get(r["site"], {}).get("steps_this_run", 0)
                                + int(r["metrics"]["steps"]),
                                "units": int(r["metrics"]["num-examples"]),
                                "gate_report_sha256": r["gate_report_sha256"]}
    per_round = [{r["site"]: r["bytes_up"] for r in h["replies"]} for h in history]
    eps = [s["epsilon"] for s in sites.values()]
    disjoint = plan.get("patients_disjoint", True)
    privacy = {"sites": sites, "epsilon": (max(eps) if disjoint else sum(eps)) if eps else 0.0,
               "delta": max((s["delta"] for s in sites.values()), default=None),
               "composition": "max over patient-disjoint sites" if disjoint else "sum over sites",
               "unit": plan["stage"]["privacy"]["unit"]}
    if plan.get("site_dp"):
        privacy["site_level"] = site_level_privacy(plan["site_dp"], sum(h["aggregated"] for h in history))
    return {
        "status": "completed" if state["round"] == plan["rounds"] and not state.get("stopped") else "stopped",
        "federated": {"rounds": len(history), "rounds_aggregated": sum(h["aggregated"] for h in history),
                      "sites": sorted(sites), "bytes_up_per_round": per_round,
                      "payload_bytes_per_site": {r["site"]: r["payload_bytes"] for h in history
                                                 for r in h["replies"]},
                      "round_seconds": [h["seconds"] for h in history], "secure_aggregation": False,
                      "strategy": (plan.get("strategy") or {"name": "fedavg"})["name"],
                      "site_dp": plan.get("site_dp") is not None, "min_sites": plan["min_sites"], "local_steps": plan["local_steps"],
                      "errors": [e for h in history for e in h["errors"]]},
        "privacy": privacy,
    }


def site_level_privacy(dp: dict, releases: int) -> dict:
    """Site-level (ε, δ) of the released global arrays: one Gaussian release per aggregated round, every site in
    every round (no sampling amplification), by Opacus' RDP accountant. Apart from, never added to, the
    patient-level ε: it protects a whole site's contribution, not one patient."""
    eps = epsilon_of([{"noise_multiplier": dp["noise_multiplier"], "sample_rate": 1.0, "steps": releases}],
                     dp["delta"]) if releases else 0.0
    return {"epsilon": eps, "delta": dp["delta"], "noise_multiplier": dp["noise_multiplier"],
            "clipping_norm": dp["clipping_norm"], "releases": releases, "unit": "site"}
