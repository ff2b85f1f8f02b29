"""The site's Flower ClientApp (Message API): one `train` message = one DP round at the site (`fed.site`).

The SuperNode's `--node-config` names the site's own things: `site-dir` (gated shards, ledger, kept replies) and
`base-model` (the base model on local disk). Under Flower's Simulation Engine (`fed run --simulation`) a node has
only `partition-id`; `site_config` maps it to the plan's sites (`simulation_sites`). The message brings the global
trainable arrays and the round's request; the reply holds only the allow-listed content (`fed.arrays`): trainable
arrays, numeric metrics, the site's name and the sha256 of the gate report it trained under. A refused round
(budget, missing gate report, mismatched arrays) is an error reply with the reason — which names no record, path or
patient.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp

from vlmtrain.errors import VlmtrainError
from vlmtrain.fed import app_logging
from vlmtrain.fed.arrays import from_record, to_record
from vlmtrain.fed.secagg import is_secagg, secagg_mod

REFUSED = 601  # Flower error code for a round a site refuses (budget, gate)
WIRE_LOG_ENV = "VLMTRAIN_FED_WIRE_LOG"


def wire_log_mod(msg: Message, context: Context, call_next) -> Message:
    """With VLMTRAIN_FED_WIRE_LOG=DIR in the SuperNode's environment, write every outgoing reply as it leaves the
    ClientApp: each record's type and keys, every config/metric value, and per array its dtype, shape, byte length
    and sha256 of its serialised buffer. For audits and the allow-list test; off by default."""
    reply = call_next(msg, context)
    out = os.environ.get(WIRE_LOG_ENV)
    if out and reply.has_content():
        dump = {}
        for key, rec in reply.content.items():
            kind = type(rec).__name__
            if kind == "ArrayRecord":
                dump[key] = {"type": kind, "items": {n: {"dtype": a.dtype, "shape": list(a.shape),
                                                         "bytes": len(a.data),
                                                         "sha256": hashlib.sha256(a.data).hexdigest()}
                                                     for n, a in rec.items()}}
            else:
                dump[key] = {"type": kind, "items": {n: wire_value(v) for n, v in rec.items()}}
        site = str(site_config(context).get("site-name", context.node_id))
        path = Path(out) / f"{site}-{reply.metadata.reply_to_message_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dump))
    return reply


def wire_value(v):
    """A config/metric value as the wire log records it: scalars as they are; byte strings (SecAgg+'s keys, shares
    and masked vectors) as their length and sha256, not their content."""
    if isinstance(v, bytes):
        return {"bytes": len(v), "sha256": hashlib.sha256(v).hexdigest()}
    if isinstance(v, list):
        return [wire_value(x) for x in v]
    return v if isinstance(v, (int, float, str, bool)) else repr(v)


def simulation_sites(plan: dict) -> list[dict]:
    """Partition id → the node config a SuperNode of that site would have: the plan's sites in name order."""
    return [{"site-dir": plan["sites"][name], "base-model": plan["base_model"], "site-name": name}
            for name in sorted(plan["sites"])]


def site_config(context: Context) -> dict:
    """The site's own settings (`site-dir`, `base-model`, `site-name`): the SuperNode's `--node-config` in a
    deployment; in a simulation, where Flower gives each virtual node only `partition-id`, the entry of that index
    in the plan's sites (every simulated site runs on the coordinator's machine, so the plan is on its disk)."""
    if "site-dir" in context.node_config or "partition-id" not in context.node_config:
        return dict(context.node_config)
    plan = json.loads(Path(str(context.run_config["plan"])).read_text())
    return simulation_sites(plan)[int(context.node_config["partition-id"])]


# secagg_mod: Flower's `secaggplus_mod` on SecAgg+ messages only (`fed.secagg`); inside wire_log_mod, so the wire
# log records what leaves the site (masked vectors, not arrays)
app = ClientApp(mods=[wire_log_mod, secagg_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    from vlmtrain.fed.site import Site

    app_logging()
    node = site_config(context)
    site = Site(str(node["site-dir"]), str(node["base-model"]), name=str(node.get("site-name", "")) or None)
    if is_secagg(msg):
        return train_secagg(msg, context, site)
    cfg = msg.content["config"]
    try:
        arrays, metrics, info = site.train_round(round_request(cfg), from_record(msg.content["arrays"]))
    except VlmtrainError as e:
        # the reason is the library's own message (budget numbers, a missing file of this site); no record data
        return Message(Error(code=REFUSED, reason=f"site {site.name}: {e}"), reply_to=msg)
    content = RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord(metrics),
                          "site": ConfigRecord({"site": site.name, **info})})
    return Message(content=content, reply_to=msg)


def round_request(cfg):
    from vlmtrain.fed.site import RoundRequest

    return RoundRequest(run=str(cfg["run"]), round=int(cfg["server-round"]), local_steps=int(cfg["local-steps"]),
                       total_steps=int(cfg["total-steps"]), stage=json.loads(str(cfg["stage"])),
                       epsilon_budget=float(cfg["epsilon-budget"]), seed=int(cfg["seed"]),
                       # FedProx's strategy sends it (Message API: proximal-mu; legacy, under SecAgg+: proximal_mu)
                       proximal_mu=float(cfg.get("proximal-mu", cfg.get("proximal_mu", 0.0))))


def train_secagg(msg: Message, context: Context, site) -> Message:
    """SecAgg+'s masked-vector stage: the same `Site.train_round`, replied as the legacy FitRes that
    `secaggplus_mod` quantises, masks and sends instead of the arrays. Refused (an error reply) when the arrays or
    the weight are outside what the secure sum can carry (`fed.secagg.check_secagg_bounds`)."""
    from vlmtrain.fed.secagg import check_secagg_bounds, fit_reply, parse_fit, secagg_state, site_clipping_norm

    try:
        global_arrays, cfg = parse_fit(msg)
        arrays, metrics, info = site.train_round(round_request(cfg), global_arrays)
        sa = secagg_state(context)
        # site-level DP averages unweighted (its noise σ·C/k is calibrated to that): every site the same weight,
        # the largest SecAgg+ carries exactly (weight 1 would divide the quantisation grid by max_weight)
        weight = float(sa["max_weight"]) if site_clipping_norm(msg) is not None else metrics["num-examples"]
        check_secagg_bounds(arrays, weight, float(sa["clipping_range"]), float(sa["max_weight"]), site.name)
    except VlmtrainError as e:
        return Message(Error(code=REFUSED, reason=f"site {site.name}: {e}"), reply_to=msg)
    return fit_reply(msg, list(global_arrays), arrays, metrics, {"site": site.name, **info}, weight)
