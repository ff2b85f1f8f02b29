"""Secure aggregation (Flower's SecAgg+) for the federation: the coordinator sees only the weighted sum of the
sites' arrays, never one site's arrays.

In Flower 1.42.0 SecAgg+ exists only on the legacy API: `SecAggPlusWorkflow` needs a `LegacyContext` and drives a
legacy `flwr.server.strategy.Strategy` on `Parameters` (an unnamed list of arrays), and the site-side
`secaggplus_mod` reads the ClientApp's reply as a legacy `FitRes`. So this mode runs Flower's
`DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))` over Flower's legacy strategy (`FedAvg`, `FedProx` or
`FedAdam`) with vlmtrain's pieces added: quorum with a deadline in `configure_fit`, the round's request in the fit
config, and
after every round (`evaluate`, which `DefaultWorkflow` calls once per round) the same atomic checkpoint and history
the Message-API coordinator writes (`fed.coordinator.Checkpoint`), so `--resume` works the same way.

What SecAgg+ computes (flwr/client/mod/secure_aggregation/secaggplus_mod.py, .../secaggplus_workflow.py): each site
uploads, masked, [q(n_i / max_weight), q(n_i / max_weight · w_i)] with q the stochastic quantisation onto
`quantization_range` levels over [−clipping_range, clipping_range]; the workflow unmasks only their sum and divides
by the summed weight factor, i.e. the FedAvg mean Σ n_i w_i / Σ n_i, then puts that mean in every `FitRes`
before `Strategy.aggregate_fit` (whose weighted mean of identical arrays is that mean again). A site's value
outside ±clipping_range would be clipped silently, and a weight above `max_weight` could overflow: the site
refuses both before sending (`check_secagg_bounds`).

Strategies: Flower's legacy FedAvg, FedProx (its `proximal_mu` in every site's fit config) and FedAdam (the server
step on the unmasked mean, its moments m_t, v_t checkpointed). Site-level central DP runs as Flower's
`DifferentialPrivacyClientSideFixedClipping` around the strategy: each site clips its own update with Flower's
`fixedclipping_mod` *before* `secaggplus_mod` masks it (the coordinator cannot clip what it cannot see), weighs it
equally (the noise σ·C/k is calibrated to an unweighted mean), and the coordinator adds the noise to the unmasked
mean.
"""

from __future__ import annotations

import json
import logging
import math
import time

import numpy as np

from vlmtrain.errors import VlmtrainError
from vlmtrain.fed.coordinator import STRATEGY_STATE, Checkpoint, round_config, wait_for_quorum

log = logging.getLogger("vlmtrain.fed")

CLIPPING_RANGE = 8.0  # Flower's default; trainable LoRA/connector values are far inside it (the site checks)
MAX_WEIGHT = 1000.0  # Flower's default: a site's weight (its number of patients) must not exceed it (checked)
MODULUS_RANGE = 2**32  # Flower's largest allowed modulus


def quantization_range(n_sites: int) -> int:
    """The finest quantisation whose sum over `n_sites` cannot wrap the 2**32 modulus: the largest power of two
    with n_sites · range ≤ 2**31 (Flower's default 2**22 gives a step of 3.8e-6 over ±8, which the weighted mean
    divides by Σ n_i / max_weight — over 1e-5 for a few hundred patients; 2**29 for 3 sites gives 3e-8)."""
    return 2 ** max(22, 31 - math.ceil(math.log2(max(n_sites, 2))))


def secagg_workflow(plan: dict):
    """Flower's `SecAggPlusWorkflow` for this plan: every sampled site holds a share of every other's keys
    (num_shares 1.0 = all sites), reconstruction from a 2/3 majority of them, quantisation as above."""
    from flwr.server.workflow import SecAggPlusWorkflow

    return SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=2 / 3, max_weight=MAX_WEIGHT,
                              clipping_range=CLIPPING_RANGE, quantization_range=quantization_range(len(plan["sites"])),
                              modulus_range=MODULUS_RANGE, timeout=plan["round_timeout_s"])


def check_secagg_bounds(arrays: dict[str, np.ndarray], weight: float, clipping_range: float,
                        max_weight: float, site: str) -> None:
    """Refuse a reply SecAgg+ would corrupt: a value outside ±clipping_range (clipped silently by quantisation)
    or a weight above max_weight (the quantised sum could wrap)."""
    peak = max(float(np.abs(a).max()) for a in arrays.values() if a.size)
    if peak > clipping_range:
        raise VlmtrainError(f"site {site}: a trainable value of magnitude {peak:.3g} is outside SecAgg+'s "
                            f"clipping range ±{clipping_range:g}; the secure sum would clip it")
    if weight > max_weight:
        raise VlmtrainError(f"site {site}: weight {weight:g} (its patients) is above SecAgg+'s max_weight "
                            f"{max_weight:g}; the quantised sum could overflow")


def content_bytes(content) -> tuple[int, int]:
    """→ (bytes of arrays and byte strings in a reply: npy buffers, keys, key shares, masked vectors;
    of those, the masked vector's). Numbers and short strings (metrics, the site's name) are not counted."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    total = masked = 0
    for rec in content.array_records.values():
        total += sum(len(a.data) for a in rec.values())
    for key, rec in content.config_records.items():
        for name, value in rec.items():
            values = value if isinstance(value, list) else [value]
            n = sum(len(v) for v in values if isinstance(v, bytes))
            total += n
            if key == RECORD_KEY_CONFIGS and name == Key.MASKED_PARAMETERS:
                masked += n
    return total, masked


class MeteredGrid:
    """The Grid the workflow talks through, measuring what each site sends back (all four SecAgg+ stages) and
    keeping the error replies' reasons; everything else is the wrapped Grid's."""

    def __init__(self, grid):
        self._grid = grid
        self.bytes_up: dict[int, int] = {}
        self.masked_bytes: dict[int, int] = {}
        self.errors: list[str] = []

    def reset(self) -> None:
        self.bytes_up, self.masked_bytes, self.errors = {}, {}, []

    def send_and_receive(self, messages, timeout=None):
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for m in replies:
            if m.has_error():
                self.errors.append(str(m.error.reason))
                continue
            total, masked = content_bytes(m.content)
            src = int(m.metadata.src_node_id)
            self.bytes_up[src] = self.bytes_up.get(src, 0) + total
            self.masked_bytes[src] = self.masked_bytes.get(src, 0) + masked
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)


def fit_config(plan: dict, names: list[str], rnd: int) -> dict:
    """The legacy fit config: the Message-API round config, the round, and the arrays' names (legacy
    `Parameters` are an unnamed list, in this order)."""
    cfg = dict(round_config(plan).items())
    return {**cfg, "server-round": rnd, "array-names": json.dumps(names)}


def legacy_strategy(plan: dict):
    """Flower's legacy strategy class and its options for the plan's `strategy` (SecAgg+ drives legacy ones)."""
    from flwr.server.strategy import FedAdam, FedAvg, FedProx

    spec = plan.get("strategy") or {"name": "fedavg", "options": {}}
    return {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}[spec["name"]], dict(spec["options"])


def secagg_strategy(plan: dict, grid: MeteredGrid, names: list[str], arrays: dict[str, np.ndarray], done: int,
                    history: list[dict], ckpt: Checkpoint, saved: dict[str, np.ndarray]):
    """Flower's legacy strategy (FedAvg, FedProx or FedAdam) with quorum sampling, the round offset of a resumed
    run, and the checkpoint after every round; with `site_dp`, inside Flower's client-side-clipping DP wrapper.
    Workflow round r is federation round done + r. → (the strategy the workflow drives, the inner one)."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

    min_sites, deadline = plan["min_sites"], plan["round_timeout_s"]
    base, options = legacy_strategy(plan)
    if base.__name__ == "FedAdam":  # its server step starts from the resumed global arrays
        options["initial_parameters"] = ndarrays_to_parameters([arrays[n] for n in names])

    class SecAggStrategy(base):
        def __init__(self):
            super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=min_sites,
                             min_evaluate_clients=min_sites, min_available_clients=min_sites,
                             on_fit_config_fn=lambda r: fit_config(plan, names, done + r), **options)
            self.arrays = arrays
            self.entry: dict | None = None
            self.t0 = 0.0
            for attr in STRATEGY_STATE:  # FedAdam's moments of a resumed run, in `names` order
                if any(k.startswith(attr + "/") for k in saved):
                    setattr(self, attr, [saved[f"{attr}/{n}"] for n in names])

        def initialize_parameters(self, client_manager):
            return ndarrays_to_parameters([self.arrays[n] for n in names])

        def configure_fit(self, server_round, parameters, client_manager):
            rnd = done + server_round
            self.t0 = time.time()
            grid.reset()
            self.entry = {"round": rnd, "sent": 0, "replies": [], "errors": [], "aggregated": False}
            n = wait_for_quorum(client_manager.num_available, min_sites, deadline, rnd)
            if n < min_sites:
                return []
            self.min_fit_clients = self.min_available_clients = n  # every connected site, at once
            instructions = super().configure_fit(server_round, parameters, client_manager)
            self.entry["sent"] = len(instructions)
            return instructions

        def aggregate_fit(self, server_round, results, failures):
            replies = sorted((secagg_reply_record(p.node_id, r, grid) for p, r in results), key=lambda x: x["site"])
            self.entry["replies"] = replies
            if len(results) < min_sites:
                return None, {}
            # the federation's round number: FedAdam's bias correction counts rounds across a resume
            agg, metrics = super().aggregate_fit(done + server_round, results, failures)
            if agg is not None:
                self.entry["aggregated"] = True
                if hasattr(self, "current_weights"):  # FedAdam: next round steps from the float32 arrays sent
                    self.current_weights = [a.astype(np.float32) for a in parameters_to_ndarrays(agg)]
            return agg, metrics

        def evaluate(self, server_round, parameters):
            """Called once a round by DefaultWorkflow with the round's released arrays (after site-level DP's
            noise, when on): they become the global arrays, then the round's checkpoint is written."""
            if server_round == 0 or self.entry is None:  # the initial arrays: nothing to record
                return None
            entry, self.entry = self.entry, None
            if entry["aggregated"]:
                self.arrays = {n: a.astype(np.float32, copy=False)
                               for n, a in zip(names, parameters_to_ndarrays(parameters), strict=True)}
            entry["errors"] = list(grid.errors)
            entry["seconds"] = time.time() - self.t0
            entry["secure_aggregation"] = entry["aggregated"]
            if not entry["aggregated"]:
                log.warning(f"round {entry['round']}: {len(entry['replies'])} replies, quorum {min_sites}: not "
                            "aggregated" + (f" ({'; '.join(entry['errors'])})" if entry["errors"] else ""))
            history.append(entry)
            ckpt.save(entry["round"], self.arrays, history, plan, legacy_state(self, names))
            log.info(f"coordinator (SecAgg+): round {entry['round']}/{plan['rounds']} in {entry['seconds']:.1f}s, "
                     f"{len(entry['replies'])}/{entry['sent']} sites, aggregated={entry['aggregated']}")
            return None

    inner = SecAggStrategy()
    return (inner if plan.get("site_dp") is None else site_dp_wrapper(inner, plan["site_dp"])), inner


def legacy_state(strategy, names: list[str]) -> dict[str, np.ndarray]:
    """A legacy strategy's own state (FedAdam's m_t, v_t: lists in `names` order) named as the Message-API
    coordinator's checkpoint names it (`m_t/<param>`)."""
    return {f"{attr}/{n}": a for attr in STRATEGY_STATE for n, a in zip(names, getattr(strategy, attr, None) or [])}


def site_dp_wrapper(inner, dp: dict):
    """Flower's `DifferentialPrivacyClientSideFixedClipping` (the sites clip, `fixedclipping_mod`; the coordinator
    adds N(0, (σ·C/k)²) to the unmasked mean), with k = the replies actually summed: a site that dropped out does not
    void the round (Flower's wrapper skips any round with a failure) — the noise is calibrated to the k updates in
    the mean, as the Message-API path's server-side wrapper is."""
    from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping

    class SiteDP(DifferentialPrivacyClientSideFixedClipping):
        def aggregate_fit(self, server_round, results, failures):
            if not results:
                return None, {}
            self.num_sampled_clients = len(results)
            return super().aggregate_fit(server_round, results, [])

    return SiteDP(inner, noise_multiplier=dp["noise_multiplier"], clipping_norm=dp["clipping_norm"],
                  num_sampled_clients=max(1, inner.min_fit_clients))


def secagg_reply_record(node_id: int, fitres, grid: MeteredGrid) -> dict:
    """What the coordinator keeps of one SecAgg+ reply: the site's numbers (its arrays it never sees), the bytes
    it sent over the round's four exchanges, and the masked vector's bytes (its payload)."""
    from vlmtrain.fed.arrays import ALLOWED_SITE_INFO

    m = dict(fitres.metrics)
    return {"site": str(m["site"]), "node_id": int(node_id), "bytes_up": grid.bytes_up.get(node_id, 0),
            "payload_bytes": grid.masked_bytes.get(node_id, 0),
            "metrics": {k: float(v) for k, v in m.items() if k not in ALLOWED_SITE_INFO},
            "gate_report_sha256": str(m["gate_report_sha256"])}


def run_rounds_secagg(grid, plan: dict, initial: dict[str, np.ndarray]) -> dict:
    """Rounds `state.round + 1 .. plan.rounds` (or up to `stop_after_round`) under SecAgg+; returns the final
    state as `fed.coordinator.run_rounds` does (round, arrays, history, stopped)."""
    from flwr.app import Context, RecordDict
    from flwr.server import ServerConfig
    from flwr.server.compat import LegacyContext
    from flwr.server.workflow import DefaultWorkflow

    ckpt = Checkpoint(plan["coordinator_dir"])
    done, arrays, history, saved = ckpt.load(plan)
    arrays = initial if arrays is None else arrays
    last = min(plan["rounds"], plan.get("stop_after_round") or plan["rounds"])
    if done >= last:
        return {"round": done, "arrays": arrays, "history": history, "stopped": done < plan["rounds"]}
    names = sorted(arrays)
    metered = MeteredGrid(grid)
    strategy, inner = secagg_strategy(plan, metered, names, arrays, done, history, ckpt, saved)
    base = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, config=ServerConfig(num_rounds=last - done), strategy=strategy)
    DefaultWorkflow(fit_workflow=secagg_workflow(plan))(metered, context)
    return {"round": last, "arrays": inner.arrays, "history": history, "stopped": last < plan["rounds"]}


def secagg_summary(plan: dict, state: dict) -> dict:
    """`fed.coordinator.federation_summary`, with `secure_aggregation` true only when every aggregated round was
    SecAgg+'s sum (and at least one round was aggregated)."""
    from vlmtrain.fed.coordinator import federation_summary

    summary = federation_summary(plan, state)
    aggregated = [h for h in state["history"] if h["aggregated"]]
    summary["federated"]["secure_aggregation"] = bool(aggregated) and all(h.get("secure_aggregation")
                                                                          for h in aggregated)
    return summary


def parse_fit(msg) -> tuple[dict[str, np.ndarray], dict]:
    """A legacy fit message at the site → (global arrays by name, fit config)."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    names = json.loads(str(fitins.config["array-names"]))
    values = parameters_to_ndarrays(fitins.parameters)
    if len(names) != len(values):
        raise VlmtrainError(f"SecAgg+ fit message: {len(values)} arrays for {len(names)} names")
    return dict(zip(names, values, strict=True)), dict(fitins.config)


def fit_reply(msg, names: list[str], arrays: dict[str, np.ndarray], metrics: dict, info: dict, weight: float):
    """The legacy FitRes reply `secaggplus_mod` masks: arrays in `names` order, the site's weight in the mean (its
    patients; equal weights under site-level DP), metrics and site info in the FitRes metrics (the mod keeps them,
    clears the arrays)."""
    from flwr.app import Message
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    # float64: secaggplus_mod scales and quantises in the arrays' own dtype, and in float32 the ~2**29-level grid
    # loses ~64 levels to rounding (6.8e-6 off the weighted mean at 41,088 parameters, measured); the values are
    # the site's float32 arrays exactly, and nothing of them leaves the site unmasked
    values = [np.asarray(arrays[n], dtype=np.float64) for n in names]
    res = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(values),
                 num_examples=int(weight), metrics={**metrics, **info})
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def site_clipping_norm(msg) -> float | None:
    """The clipping norm Flower's client-side-clipping DP wrapper put in a fit message (None: no site-level DP)."""
    from flwr.app.message_type import MessageType
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    if msg.metadata.message_type != MessageType.TRAIN or "fitins.config" not in msg.content.config_records:
        return None
    value = msg.content.config_records["fitins.config"].get(KEY_CLIPPING_NORM)
    return None if value is None else float(value)


def is_secagg(msg) -> bool:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    return msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records


def secagg_state(context) -> dict:
    """The SecAgg+ parameters the site's mod received at setup (clipping range, max weight)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    return dict(context.state.config_records.get(RECORD_KEY_STATE, {}))


class SiteRefused(Exception):
    """A refused round inside `secaggplus_mod`: the mod reads the reply's content, which an error reply lacks."""

    def __init__(self, reply):
        super().__init__(str(reply.error.reason))
        self.reply = reply


def secagg_mod(msg, context, call_next):
    """Flower's `secaggplus_mod` for SecAgg+ messages; Message-API train messages pass through untouched. A site's
    refusal (an error reply from `train`) leaves the mod as that error reply, unmasked and without content."""
    from flwr.client.mod import fixedclipping_mod, secaggplus_mod

    if not is_secagg(msg):
        return call_next(msg, context)

    def train_or_raise(m, c):
        # site-level DP: Flower's fixedclipping_mod clips this site's update here, before secaggplus_mod masks it
        reply = fixedclipping_mod(m, c, call_next) if site_clipping_norm(m) is not None else call_next(m, c)
        if reply.has_error():
            raise SiteRefused(reply)
        return reply

    try:
        return secaggplus_mod(msg, context, train_or_raise)
    except SiteRefused as e:
        return e.reply
