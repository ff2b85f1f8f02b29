"""Secure aggregation (Flower's SecAgg+, `vlmtrain.fed.secagg`): the coordinator's SecAgg+ round, driven by Flower's
own `DefaultWorkflow(fit_workflow=SecAggPlusWorkflow)` against vlmtrain's real ClientApp (with Flower's
`secaggplus_mod`) answered in-process, must give the weighted mean of the arrays the sites computed, worked out
here from those arrays; and the coordinator must never receive a site's arrays.

In-process: each site's ClientApp gets its own persistent `Context` (as a SuperNode keeps it between messages), and
`Site.train_round` is replaced by a deterministic stand-in (its DP training is tested in test_fed_loopback.py):
what is tested is everything between the sites' arrays and the coordinator's checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("flwr")

SITES = {1: ("hospital-a", 50), 2: ("hospital-b", 78), 3: ("hospital-c", 73)}  # node id → (site, patients)


class InProcessGrid:
    """The Grid surface the workflow uses, answered by vlmtrain's ClientApp in this process; node k's context
    persists across the four SecAgg+ exchanges of a round. Keeps every reply as the coordinator received it."""

    def __init__(self, tmp_path: Path, nodes=(1, 2, 3)):
        from flwr.app import Context, RecordDict

        self.nodes = list(nodes)
        self.contexts = {k: Context(run_id=1, node_id=k, node_config={"site-dir": str(tmp_path / SITES[k][0]),
                                                                    "base-model": str(tmp_path / "base"),
                                                                    "site-name": SITES[k][0]},
                                    state=RecordDict(), run_config={}) for k in self.nodes}
        self.received = []
        self.run = SimpleNamespace(run_id=1)  # Flower's client-manager thread reads the grid's run id

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        from flwr.common.serde import message_from_proto, message_to_proto
        from flwr.supercore.task_identity import TaskIdentity

        from vlmtrain.fed.client_app import app

        def over_the_wire(m):  # serialised and parsed as the SuperLink relays it (no object shared by reference)
            out = message_from_proto(message_to_proto(m))
            out.metadata.__dict__["_message_id"] = out.object_id  # the id the SuperLink gives it
            return out

        replies = []
        for m in messages:
            k = m.metadata.dst_node_id
            TaskIdentity.node_id = k  # the reply is stamped by the node that sends it
            reply = over_the_wire(app(over_the_wire(m), self.contexts[k]))
            TaskIdentity.node_id = 0
            self.received.append(reply)
            replies.append(reply)
        return replies


@pytest.fixture
def identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


@pytest.fixture
def sites(monkeypatch):
    """Stand-in for `Site.train_round`: site s replies global + a fixed, site-specific update (values up to ~0.6,
    like LoRA/connector tensors), weight = its patients; every reply it computed is kept for the by-hand mean."""
    from vlmtrain.fed.site import Site

    class Computed(dict):  # (site, round) → (arrays, weight); .proximal_mu: (site, round) → the μ it trained with
        proximal_mu: dict[tuple[str, int], float]

    computed = Computed()
    computed.proximal_mu = {}

    def train_round(self, req, global_arrays):
        k = [n for n, (name, _) in SITES.items() if name == self.name][0]
        rng = np.random.default_rng(1000 * k + req.round)
        arrays = {n: (a + rng.normal(scale=0.2, size=a.shape)).astype(np.float32) for n, a in global_arrays.items()}
        units = float(SITES[k][1])
        computed[(self.name, req.round)] = (arrays, units)
        computed.proximal_mu[(self.name, req.round)] = req.proximal_mu
        metrics = {"num-examples": units, "train_loss": 1.0, "epsilon": 0.5 * k, "delta": 1e-5,
                   "noise_multiplier": 1.2, "sample_rate": 0.2, "steps": float(req.local_steps),
                   "round": float(req.round), "batches_empty": 0.0}
        return arrays, metrics, {"gate_report_sha256": f"{k:064d}"}

    monkeypatch.setattr(Site, "train_round", train_round)
    return computed


def _plan(tmp_path, **kw):
    stage = {"privacy": {"unit": "patient"}}
    plan = {"run": "r", "rounds": 2, "local_steps": 2, "stage": stage, "seed": 0, "epsilon_budget": 8.0,
            "min_sites": 2, "round_timeout_s": 30.0, "coordinator_dir": str(tmp_path / "coordinator"),
            "secure_aggregation": True, "sites": {name: "" for name, _ in SITES.values()}}
    plan.update(kw)
    return plan


def _initial():
    rng = np.random.default_rng(7)
    return {"connector.proj.weight": rng.normal(scale=0.3, size=(16, 12)).astype(np.float32),
            "lm.q_proj.lora_A": rng.normal(scale=0.3, size=(4, 16)).astype(np.float32),
            "lm.q_proj.lora_B": np.zeros((16, 4), np.float32)}


def _weighted_mean(replies):
    total = sum(w for _, w in replies)
    return {n: sum(a[n].astype(np.float64) * w for a, w in replies) / total for n in replies[0][0]}


def test_secagg_round_equals_fedavg_of_the_sites_replies_and_the_coordinator_never_sees_them(tmp_path, identity,
                                                                                            sites, monkeypatch):
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from vlmtrain.fed.client_app import WIRE_LOG_ENV
    from vlmtrain.fed.secagg import run_rounds_secagg, secagg_summary

    monkeypatch.setenv(WIRE_LOG_ENV, str(tmp_path / "wire"))  # every reply as it leaves a site's ClientApp
    grid = InProcessGrid(tmp_path)
    plan = _plan(tmp_path)
    state = run_rounds_secagg(grid, plan, _initial())
    assert state["round"] == 2 and not state["stopped"]
    # the released arrays (round 2) = the weighted mean of what the sites computed in round 2
    # (Σ patients·arrays / Σ patients, in float64 here); round 1's mean is checked by the next test
    by_hand = _weighted_mean([sites[(name, 2)] for name, _ in SITES.values()])
    for n, a in by_hand.items():
        assert np.abs(state["arrays"][n] - a).max() <= 1e-5, n
    with np.load(Path(plan["coordinator_dir"]) / "checkpoint" / "arrays-round0002.npz") as z:
        np.testing.assert_array_equal(z["lm.q_proj.lora_A"], state["arrays"]["lm.q_proj.lora_A"])
    # the coordinator received no array from any site: only keys, key shares and masked vectors
    for reply in grid.received:
        assert not reply.has_error()
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
    masked = [r for r in grid.received if Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(masked) == 2 * 3
    logs = [json.loads(p.read_text()) for p in (tmp_path / "wire").glob("*.json")]
    assert len(logs) == 2 * 4 * 3  # rounds × SecAgg+ exchanges × sites
    for log in logs:
        assert all(rec["items"] == {} for rec in log.values() if rec["type"] == "ArrayRecord")
    vectors = [log[RECORD_KEY_CONFIGS]["items"][Key.MASKED_PARAMETERS] for log in logs
               if Key.MASKED_PARAMETERS in log.get(RECORD_KEY_CONFIGS, {}).get("items", {})]
    assert len(vectors) == 2 * 3 and all(set(v[0]) == {"bytes", "sha256"} for v in vectors)
    summary = secagg_summary(plan, state)
    fed = summary["federated"]
    assert fed["secure_aggregation"] is True and fed["rounds_aggregated"] == 2
    assert set(summary["privacy"]["sites"]) == {name for name, _ in SITES.values()}
    assert summary["privacy"]["epsilon"] == 1.5  # max of the sites' reported ε (0.5·k)
    n_params = sum(a.size for a in _initial().values())
    for per_site in fed["bytes_up_per_round"]:
        assert set(per_site) == set(fed["sites"])
    for site, payload in fed["payload_bytes_per_site"].items():
        # the masked vector: one integer per parameter plus the weight factor per array, 8 bytes each + npy headers
        assert n_params * 8 < payload < n_params * 8 + 3 * 256, (site, payload)


def test_secagg_round_1_mean_is_what_every_site_received_in_round_2(tmp_path, identity, sites, monkeypatch):
    from vlmtrain.fed import secagg
    from vlmtrain.fed.secagg import run_rounds_secagg

    received = {}
    parse = secagg.parse_fit

    def keep(msg):
        arrays, cfg = parse(msg)
        received[(msg.metadata.dst_node_id, int(cfg["server-round"]))] = arrays
        return arrays, cfg

    monkeypatch.setattr(secagg, "parse_fit", keep)
    run_rounds_secagg(InProcessGrid(tmp_path), _plan(tmp_path), _initial())
    by_hand = _weighted_mean([sites[(name, 1)] for name, _ in SITES.values()])
    for k in SITES:
        for n, a in by_hand.items():
            assert np.abs(received[(k, 2)][n] - a).max() <= 1e-5, (k, n)


def test_secagg_stopped_after_a_round_resumes_to_the_same_rounds(tmp_path, identity, sites):
    """Stopped after round 1's checkpoint, a fresh coordinator runs only round 2, with round 2's number (the
    sites' ledger and seeds key on it), from round 1's arrays; the history holds both rounds."""
    from vlmtrain.fed.secagg import run_rounds_secagg

    first = run_rounds_secagg(InProcessGrid(tmp_path), _plan(tmp_path, stop_after_round=1), _initial())
    assert first["stopped"] and first["round"] == 1 and set(sites) == {(n, 1) for n, _ in SITES.values()}
    rest = run_rounds_secagg(InProcessGrid(tmp_path), _plan(tmp_path), _initial())
    assert rest["round"] == 2 and [h["round"] for h in rest["history"]] == [1, 2]
    assert set(sites) == {(n, r) for n, _ in SITES.values() for r in (1, 2)}
    by_hand = _weighted_mean([sites[(name, 2)] for name, _ in SITES.values()])
    for n, a in by_hand.items():
        assert np.abs(rest["arrays"][n] - a).max() <= 1e-5
    state = json.loads((Path(_plan(tmp_path)["coordinator_dir"]) / "checkpoint" / "state.json").read_text())
    assert state["round"] == 2


def test_a_site_outside_the_clipping_range_is_refused_and_the_others_are_aggregated(tmp_path, identity, sites,
                                                                                  monkeypatch):
    """A reply SecAgg+ would clip silently is refused by its site (an error reply); SecAgg+ recovers the dropped
    site's masks from the others' shares and the round is the weighted mean of the two that replied."""
    from vlmtrain.fed.site import Site

    honest = Site.train_round

    def train_round(self, req, global_arrays):
        arrays, metrics, info = honest(self, req, global_arrays)
        if self.name == "hospital-c":
            arrays["lm.q_proj.lora_B"][0, 0] = 9.0  # past Flower's ±8 clipping range
        return arrays, metrics, info

    monkeypatch.setattr(Site, "train_round", train_round)
    from vlmtrain.fed.secagg import run_rounds_secagg

    grid = InProcessGrid(tmp_path)
    state = run_rounds_secagg(grid, _plan(tmp_path, rounds=1), _initial())
    (h,) = state["history"]
    assert h["aggregated"] and [r["site"] for r in h["replies"]] == ["hospital-a", "hospital-b"]
    assert any("outside SecAgg+'s clipping range" in e for e in h["errors"])
    by_hand = _weighted_mean([sites[(name, 1)] for name in ("hospital-a", "hospital-b")])
    for n, a in by_hand.items():
        assert np.abs(state["arrays"][n] - a).max() <= 1e-5


def _mean_of(sites, rnd, names=None):
    return _weighted_mean([sites[(name, rnd)] for name in (names or [n for n, _ in SITES.values()])])


def test_secagg_fedprox_sends_every_site_the_proximal_term(tmp_path, identity, sites):
    """FedProx under SecAgg+: Flower's legacy FedProx puts μ in every fit config; each site's local objective gets
    it; the aggregate is still the weighted mean."""
    from vlmtrain.fed.secagg import run_rounds_secagg

    plan = _plan(tmp_path, rounds=1, strategy={"name": "fedprox", "options": {"proximal_mu": 0.05}})
    state = run_rounds_secagg(InProcessGrid(tmp_path), plan, _initial())
    assert sites.proximal_mu == {(n, 1): 0.05 for n, _ in SITES.values()}
    for n, a in _mean_of(sites, 1).items():
        assert np.abs(state["arrays"][n] - a).max() <= 1e-5


ADAM = {"eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}


def _adam_by_hand(sites, rounds):
    """Server-side Adam (Reddi et al., Flower's FedAdam with its bias-corrected step η·√(1−β₂^(t+1))/(1−β₁^(t+1)))
    on the weighted means of the sites' replies, in float64 numpy; the global arrays sent are float32."""
    w = {n: a.astype(np.float64) for n, a in _initial().items()}
    m = {n: np.zeros_like(a) for n, a in w.items()}
    v = {n: np.zeros_like(a) for n, a in w.items()}
    b1, b2 = ADAM["beta_1"], ADAM["beta_2"]
    for t in range(1, rounds + 1):
        mean = _mean_of(sites, t)
        eta = ADAM["eta"] * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        for n in w:
            delta = mean[n] - w[n]
            m[n] = b1 * m[n] + (1 - b1) * delta
            v[n] = b2 * v[n] + (1 - b2) * delta**2
            w[n] = (w[n] + eta * m[n] / (np.sqrt(v[n]) + ADAM["tau"])).astype(np.float32).astype(np.float64)
    return w


def test_secagg_fedadam_steps_on_the_unmasked_mean_and_resumes_with_its_moments(tmp_path, identity, sites):
    """FedAdam under SecAgg+: the server step on the secure mean equals Adam computed here from the sites' replies;
    stopped after round 1 and resumed, the moments m_t, v_t come back from the checkpoint and round 2's bias
    correction counts the federation's round, not the resumed workflow's."""
    from vlmtrain.fed.secagg import run_rounds_secagg

    plan = _plan(tmp_path, strategy={"name": "fedadam", "options": ADAM})
    first = run_rounds_secagg(InProcessGrid(tmp_path), {**plan, "stop_after_round": 1}, _initial())
    assert first["stopped"]
    with np.load(Path(plan["coordinator_dir"]) / "checkpoint" / "arrays-round0001.npz") as z:
        assert {k.split("/")[0] for k in z.files if k.startswith("strategy:")} == {"strategy:m_t", "strategy:v_t"}
    state = run_rounds_secagg(InProcessGrid(tmp_path), plan, _initial())
    assert [h["round"] for h in state["history"]] == [1, 2]
    by_hand = _adam_by_hand(sites, 2)
    for n, a in by_hand.items():
        assert np.abs(state["arrays"][n] - a).max() <= 1e-5, n


def _big_initial():
    rng = np.random.default_rng(11)
    return {"connector.proj.weight": rng.normal(scale=0.3, size=(96, 96)).astype(np.float32),
            "lm.q_proj.lora_A": rng.normal(scale=0.3, size=(16, 96)).astype(np.float32),
            "lm.q_proj.lora_B": np.zeros((96, 16), np.float32)}


@pytest.mark.parametrize("refused", [None, "hospital-c"])
def test_secagg_site_dp_clips_at_the_sites_and_noises_the_unweighted_mean(tmp_path, identity, sites, monkeypatch,
                                                                          refused):
    """Site-level DP under SecAgg+: every site clips its own update to C (Flower's fixedclipping_mod, before the
    mask), the sum is unweighted, and the coordinator adds N(0, (σ·C/k)²) for the k updates summed. Checked
    against the clipped mean computed here from the sites' replies: the residual is Gaussian noise of std σ·C/k
    (18,688 values: its sample std is within ~0.5% of the true one; 5% allowed) — with a refused site, k = 2."""
    from flwr.supercore.differential_privacy import get_norm

    from vlmtrain.fed.secagg import run_rounds_secagg
    from vlmtrain.fed.site import Site

    honest = Site.train_round

    def train_round(self, req, global_arrays):
        if self.name == refused:
            from vlmtrain.errors import VlmtrainError

            raise VlmtrainError("budget exhausted")
        return honest(self, req, global_arrays)

    monkeypatch.setattr(Site, "train_round", train_round)
    sigma, clip = 0.05, 0.5
    plan = _plan(tmp_path, rounds=1, site_dp={"noise_multiplier": sigma, "clipping_norm": clip, "delta": 1e-5,
                                              "target_epsilon": 8.0})
    start = _big_initial()
    state = run_rounds_secagg(InProcessGrid(tmp_path), plan, start)
    (h,) = state["history"]
    names = sorted(start)
    kept = [n for n, _ in SITES.values() if n != refused]
    assert h["aggregated"] and [r["site"] for r in h["replies"]] == kept
    clipped = []
    for site in kept:
        update = [sites[(site, 1)][0][n].astype(np.float64) - start[n] for n in names]
        assert get_norm(update) > 10 * clip  # the stand-in's updates are far outside C: clipping shows
        clipped.append([u * min(1.0, clip / get_norm(update)) for u in update])
    expected = {n: start[n] + sum(c[i] for c in clipped) / len(kept) for i, n in enumerate(names)}
    residual = np.concatenate([(state["arrays"][n] - expected[n]).ravel() for n in names])
    std = sigma * clip / len(kept)
    assert abs(residual.std() / std - 1) < 0.05, (residual.std(), std)
    assert abs(residual.mean()) < 5 * std / np.sqrt(residual.size)


@pytest.mark.parametrize("change, secure, message", [
    ({}, True, None),
    ({"secure_aggregation": None}, True, None),  # unset: on with 3 sites
    ({"secure_aggregation": False}, False, None),
    ({"strategy": "fedadam"}, True, None),
    ({"strategy": "fedprox", "proximal_mu": 0.01}, True, None),
    ({"site_dp": {"target_epsilon": 8, "clipping_norm": 0.1, "force": True}}, True, None),
    ({"sites": {"a": {"CT": 0.5}, "b": {"CT": 0.5}}, "secure_aggregation": None}, False, None),  # unset, 2 sites
    ({"sites": {"a": {"CT": 0.5}, "b": {"CT": 0.5}}}, None, "SecAgg+ needs at least 3 sites (2 given)"),
])
def test_secure_aggregation_config_validation(change, secure, message):
    from pydantic import ValidationError

    from vlmtrain.fed.config import FederatedConfig

    fed = {"stage": "dp-sft", "rounds": 2, "local_steps": 2, "epsilon_budget": 8.0, "secure_aggregation": True,
           "sites": {"a": {"CT": 0.3}, "b": {"CT": 0.3}, "c": {"CT": 0.4}}, **change}
    fed = {k: v for k, v in fed.items() if v is not None}
    if message is None:
        assert FederatedConfig.model_validate(fed).secure is secure
    else:
        with pytest.raises(ValidationError, match=re.escape(message)):
            FederatedConfig.model_validate(fed)


def test_without_secagg_the_same_sites_send_their_named_arrays_and_only_allowed_fields(tmp_path, identity, sites,
                                                                                     monkeypatch):
    """`secure_aggregation: false` (the Message-API coordinator, Flower's FedAvg) over the same in-process sites:
    each reply as it left the ClientApp holds exactly the global arrays' names, fp32, the allow-listed numbers and
    site info; the aggregate is the weighted mean (the loopback federation runs the SecAgg+ default)."""
    from vlmtrain.fed.arrays import ALLOWED_METRICS, ALLOWED_SITE_INFO
    from vlmtrain.fed.client_app import WIRE_LOG_ENV
    from vlmtrain.fed.coordinator import run_rounds

    monkeypatch.setenv(WIRE_LOG_ENV, str(tmp_path / "wire"))
    plan = _plan(tmp_path, rounds=1, secure_aggregation=False)
    state = run_rounds(InProcessGrid(tmp_path), plan, _initial())
    for n, a in _mean_of(sites, 1).items():
        assert np.abs(state["arrays"][n] - a).max() <= 1e-6, n
    logs = [json.loads(p.read_text()) for p in (tmp_path / "wire").glob("*.json")]
    assert len(logs) == 3
    for log in logs:
        assert set(log) == {"arrays", "metrics", "site"}
        assert {n: (a["dtype"], a["shape"]) for n, a in log["arrays"]["items"].items()} == \
            {n: ("float32", list(a.shape)) for n, a in _initial().items()}
        assert set(log["metrics"]["items"]) <= ALLOWED_METRICS and set(log["site"]["items"]) <= ALLOWED_SITE_INFO
