"""Federated training (vlmtrain.fed): the ledger against Opacus' accountant, Flower's FedAvg against a hand-computed
weighted mean, the site split, the recipe's validation. The loopback deployment is in test_fed_loopback.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from vlmtrain.fed.ledger import BudgetExceeded, Ledger  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "recipes" / "medical-federated.yaml"


def opacus_epsilon(rounds: list[tuple[float, float, int]], delta: float) -> float:
    """ε by Opacus' RDP accountant fed one optimizer step at a time, as a centralised DP run feeds it."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for sigma, q, steps in rounds:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


def test_ledger_composes_rounds_and_runs_like_opacus_and_survives_reopening(tmp_path):
    path = tmp_path / "site" / "privacy_ledger.json"
    path.parent.mkdir()
    rounds = [(1.1, 0.12, 10), (1.1, 0.12, 10), (0.9, 0.2, 5)]
    for i, (s, q, k) in enumerate(rounds):
        # a new Ledger object per round: what a fresh ClientApp process sees
        eps = Ledger(path).charge("data-a", {"noise_multiplier": s, "sample_rate": q, "steps": k,
                                             "run": "run1" if i < 2 else "run2", "round": i + 1}, 1e-5)
        assert abs(eps - opacus_epsilon(rounds[: i + 1], 1e-5)) <= 1e-6
    assert abs(Ledger(path).epsilon("data-a", 1e-5) - opacus_epsilon(rounds, 1e-5)) <= 1e-6
    assert Ledger(path).epsilon("data-b", 1e-5) == 0.0  # another dataset has its own account
    assert Ledger(path).find("data-a", "run2", 3)["steps"] == 5


def test_ledger_refuses_a_round_over_budget_and_charges_nothing(tmp_path):
    led = Ledger(tmp_path / "ledger.json")
    led.charge("d", {"noise_multiplier": 1.0, "sample_rate": 0.2, "steps": 20, "run": "r", "round": 1}, 1e-5)
    before = led.read()
    spent = led.epsilon("d", 1e-5)
    plan = {"noise_multiplier": 1.0, "sample_rate": 0.2, "steps": 20}
    with pytest.raises(BudgetExceeded, match="over the site's budget"):
        led.check("d", plan, 1e-5, budget=spent + 0.01)
    assert led.read() == before
    assert led.check("d", plan, 1e-5, budget=100.0) > spent


def _reply(arrays: dict, n: float):
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1  # a Message is stamped with its run and sender (set by Flower inside a run)
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1

    from vlmtrain.fed.arrays import to_record

    return Message(content=RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord({"num-examples": n})}),
                   dst_node_id=1, message_type="train")


def test_flower_fedavg_is_the_weighted_mean_by_hand():
    from vlmtrain.fed.arrays import from_record
    from vlmtrain.fed.coordinator import quorum_strategy

    rng = np.random.default_rng(0)
    sites = [({"connector.w": rng.normal(size=(4, 3)).astype(np.float32),
               "lora_A": rng.normal(size=(2, 5)).astype(np.float32)}, n) for n in (50.0, 120.0, 30.0)]
    agg, metrics = quorum_strategy(2, 1.0).aggregate_train(1, [_reply(a, n) for a, n in sites])
    out = from_record(agg)
    total = sum(n for _, n in sites)
    for name in ("connector.w", "lora_A"):
        by_hand = sum(a[name].astype(np.float64) * n for a, n in sites) / total
        np.testing.assert_allclose(out[name], by_hand, rtol=0, atol=1e-6)


def test_sites_are_patient_disjoint_and_skewed_by_modality():
    from types import SimpleNamespace

    from vlmtrain.fed.site_data import assign_patients

    samples = [SimpleNamespace(record={"id": f"r{i}", "meta": {"patient_group": f"p{i // 2}",
                                                                 "modality": ["CT", "OP"][(i // 2) % 2]}})
               for i in range(400)]
    shares = {"a": {"CT": 0.9, "OP": 0.1}, "b": {"CT": 0.1, "OP": 0.9}}
    split = assign_patients(samples, shares, seed=0)
    groups = {s: {x.record["meta"]["patient_group"] for x in v} for s, v in split.items()}
    assert not groups["a"] & groups["b"] and sum(len(v) for v in split.values()) == 400
    frac_ct = {s: np.mean([x.record["meta"]["modality"] == "CT" for x in v]) for s, v in split.items()}
    assert frac_ct["a"] > 0.8 and frac_ct["b"] < 0.2


def test_gate_report_required(tmp_path):
    from vlmtrain.errors import VlmtrainError
    from vlmtrain.fed.site_data import check_gate_report

    with pytest.raises(VlmtrainError, match="passed the privacy gate"):
        check_gate_report(tmp_path)
    (tmp_path / "privacy_report.json").write_text(json.dumps({"policy_hash": "sha256:x", "kept": 0}))
    with pytest.raises(VlmtrainError, match="passing gate run"):
        check_gate_report(tmp_path)


def test_bad_federated_recipe_exits_2_naming_the_field(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vlmtrain", "fed", "run", str(RECIPE), "--out", str(tmp_path / "o"),
                        "federated.min_sites=5"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "federated.min_sites: " in r.stderr and "medical-federated.yaml" in r.stderr


@pytest.mark.parametrize("override, message", [
    ("federated.stage=public", "federated.stage: 'public' must be the last stage"),
    ("federated.rounds=0", "federated.rounds: "),
    ("federated.sites.x={CT: -1}", "federated.sites: "),
    ("dp-sft.privacy=null", "privacy: the federated stage trains under DP-SGD"),
])
def test_federated_recipe_validation(tmp_path, override, message):
    from vlmtrain.errors import ConfigError
    from vlmtrain.fed.run import load_federated

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_federated(RECIPE, tmp_path, [override])


class FakeGrid:
    """Flower's Grid surface the coordinator uses (get_node_ids, send_and_receive), answered in-process: node k
    replies global + k (its site's `num-examples` = 10·k); nodes in `dead` never reply (a killed SuperNode)."""

    def __init__(self, nodes=(1, 2, 3), dead=()):
        self.nodes, self.dead, self.sent = list(nodes), set(dead), []

    def get_node_ids(self):
        return [n for n in self.nodes if n not in self.dead]

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

        from vlmtrain.fed.arrays import from_record, to_record

        replies = []
        for m in messages:
            self.sent.append(m.metadata.dst_node_id)
            k = m.metadata.dst_node_id
            if k in self.dead:
                continue
            arrays = {n: a + k for n, a in from_record(m.content["arrays"]).items()}
            metrics = {"num-examples": 10.0 * k, "epsilon": 0.1 * k, "delta": 1e-5, "noise_multiplier": 1.0,
                       "sample_rate": 0.1, "steps": 2.0, "train_loss": 1.0}
            replies.append(Message(RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord(metrics),
                                               "site": ConfigRecord({"site": f"s{k}", "gate_report_sha256": "0" * 64})}),
                                   reply_to=m))
        return replies


def _plan(tmp_path, **kw):
    plan = {"run": "r", "rounds": 3, "local_steps": 2, "stage": {"privacy": {"unit": "patient"}}, "seed": 0,
            "epsilon_budget": 8.0, "min_sites": 2, "round_timeout_s": 1.0, "coordinator_dir": str(tmp_path / "c")}
    plan.update(kw)
    return plan


@pytest.fixture
def identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def test_coordinator_aggregates_the_sites_that_replied_and_skips_below_quorum(tmp_path, identity):
    from vlmtrain.fed.coordinator import run_rounds

    init = {"w": np.zeros((2, 2), np.float32)}
    state = run_rounds(FakeGrid(dead={3}), _plan(tmp_path, rounds=1), init)  # node 3 killed: 2 of 3 reply
    (h,) = state["history"]
    assert h["aggregated"] and [r["site"] for r in h["replies"]] == ["s1", "s2"]
    np.testing.assert_allclose(state["arrays"]["w"], (10 * 1 + 20 * 2) / 30, atol=1e-6)  # weighted by 10·k
    grid = FakeGrid(dead={2, 3})  # below quorum 2: sampling waits its deadline, the round is skipped
    state = run_rounds(grid, _plan(tmp_path / "b", rounds=1), init)
    assert not state["history"][0]["aggregated"] and grid.sent == []
    np.testing.assert_array_equal(state["arrays"]["w"], init["w"])


def test_coordinator_stopped_after_a_checkpoint_resumes_to_the_same_result(tmp_path, identity):
    from vlmtrain.fed.coordinator import federation_summary, run_rounds

    init = {"w": np.arange(4, dtype=np.float32).reshape(2, 2)}
    whole = run_rounds(FakeGrid(), _plan(tmp_path / "a"), init)
    first = run_rounds(FakeGrid(), _plan(tmp_path / "b", stop_after_round=1), init)
    assert first["stopped"] and first["round"] == 1
    grid = FakeGrid()
    rest = run_rounds(grid, _plan(tmp_path / "b"), init)  # a new process: only the checkpoint on disk
    assert len(grid.sent) == 2 * 3 and rest["round"] == 3 and len(rest["history"]) == 3
    np.testing.assert_array_equal(rest["arrays"]["w"], whole["arrays"]["w"])
    a, b = federation_summary(_plan(tmp_path), whole), federation_summary(_plan(tmp_path), rest)
    assert a["privacy"] == b["privacy"] and a["federated"]["bytes_up_per_round"] == b["federated"]["bytes_up_per_round"]
    with pytest.raises(Exception, match="another federation plan"):
        run_rounds(FakeGrid(), _plan(tmp_path / "b", local_steps=5), init)


def test_flower_fedadam_round_is_the_adam_step_by_hand(identity):
    """Two rounds of Flower's FedAdam (through the coordinator's quorum wrapper) against Adam written out here:
    Δ = weighted mean − global, m = β₁m + (1−β₁)Δ, v = β₂v + (1−β₂)Δ², w += η·√(1−β₂^(t+1))/(1−β₁^(t+1))·m/(√v + τ)
    (Flower's bias correction, t = the server round)."""
    from vlmtrain.fed.arrays import from_record, to_record
    from vlmtrain.fed.coordinator import quorum_strategy

    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    strategy = quorum_strategy(2, 1.0, "fedadam", {"eta": eta, "beta_1": b1, "beta_2": b2, "tau": tau})
    rng = np.random.default_rng(1)
    w = {"lora_A": rng.normal(size=(3, 4)).astype(np.float32)}
    m = v = np.zeros((3, 4))
    for rnd in (1, 2):
        msgs = strategy.configure_train(rnd, to_record(w), _round_cfg(), FakeGrid(nodes=(1, 2)))
        assert len(msgs) == 2
        replies = [({"lora_A": w["lora_A"] + rng.normal(scale=0.1, size=(3, 4)).astype(np.float32)}, n)
                   for n in (30.0, 10.0)]
        agg, _ = strategy.aggregate_train(rnd, [_reply(a, n) for a, n in replies])
        mean = sum(a["lora_A"].astype(np.float64) * n for a, n in replies) / 40.0
        delta = mean - w["lora_A"]
        m = b1 * m + (1 - b1) * delta
        v = b2 * v + (1 - b2) * delta**2
        step = eta * np.sqrt(1 - b2 ** (rnd + 1)) / (1 - b1 ** (rnd + 1)) * m / (np.sqrt(v) + tau)
        by_hand = w["lora_A"] + step
        out = from_record(agg)["lora_A"]
        np.testing.assert_allclose(out, by_hand, rtol=0, atol=1e-6)
        assert np.abs(out - mean).max() > 1e-3  # not FedAvg's answer
        w = {"lora_A": out.astype(np.float32)}


def test_fedprox_sends_mu_and_the_site_adds_the_proximal_gradient(identity):
    """Flower's FedProx puts `proximal-mu` in every round's config; the site adds μ·(w − w_global) to each
    privatised gradient (the gradient of μ/2·‖w − w_global‖²), checked on numbers written out here."""
    import torch

    from vlmtrain.fed.arrays import to_record
    from vlmtrain.fed.coordinator import quorum_strategy
    from vlmtrain.fed.site import add_proximal_gradient

    msgs = quorum_strategy(2, 1.0, "fedprox", {"proximal_mu": 0.3}).configure_train(
        1, to_record({"w": np.zeros(2, np.float32)}), _round_cfg(), FakeGrid(nodes=(1, 2, 3)))
    assert [m.content["config"]["proximal-mu"] for m in msgs] == [0.3] * 3
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    p.grad = torch.tensor([0.1, 0.2, 0.3])
    add_proximal_gradient([p], [torch.tensor([0.0, -1.0, 1.5])], 0.3)
    torch.testing.assert_close(p.grad, torch.tensor([0.1 + 0.3 * 1.0, 0.2 + 0.3 * -1.0, 0.3 + 0.3 * -1.0]))


def test_fedadam_coordinator_resumes_with_its_moments_bit_exactly(tmp_path, identity):
    """FedAdam's m_t, v_t are in the round checkpoint: stopped after round 1 and resumed in a fresh strategy, the
    final arrays equal an uninterrupted run's bit for bit (without the moments round 2's step would differ)."""
    from vlmtrain.fed.coordinator import run_rounds

    adam = {"name": "fedadam", "options": {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}}
    init = {"w": np.arange(4, dtype=np.float32).reshape(2, 2)}
    whole = run_rounds(FakeGrid(), _plan(tmp_path / "a", strategy=adam), init)
    run_rounds(FakeGrid(), _plan(tmp_path / "b", strategy=adam, stop_after_round=1), init)
    rest = run_rounds(FakeGrid(), _plan(tmp_path / "b", strategy=adam), init)
    np.testing.assert_array_equal(rest["arrays"]["w"], whole["arrays"]["w"])
    fedavg = run_rounds(FakeGrid(), _plan(tmp_path / "c"), init)
    assert np.abs(fedavg["arrays"]["w"] - whole["arrays"]["w"]).max() > 1e-3


def _round_cfg():
    from flwr.app import ConfigRecord

    return ConfigRecord({"run": "r"})


def test_fedprox_without_mu_is_refused_by_the_recipe(tmp_path):
    from vlmtrain.errors import ConfigError
    from vlmtrain.fed.run import load_federated

    with pytest.raises(ConfigError, match=re.escape("federated.proximal_mu: ")):
        load_federated(RECIPE, tmp_path, ["federated.strategy=fedprox"])
    fed, _, _ = load_federated(RECIPE, tmp_path, ["federated.strategy=fedprox", "federated.proximal_mu=0.01"])
    assert fed.strategy_options() == {"proximal_mu": 0.01}


def test_site_level_dp_clips_each_update_noises_the_mean_and_is_accounted_apart(tmp_path, identity):
    """Flower's server-side fixed-clipping wrapper through the coordinator: node k's update (+k on every one of N
    entries, norm k·√N) is clipped to C, so every clipped update is C/√N per entry and so is their unweighted mean;
    the noise on it has std σ·C/k for the k sites that replied (2 when one is dead). Site-level ε = Opacus' RDP
    accountant over one q=1 release per aggregated round, reported apart from the patient-level ε."""
    from opacus.accountants import RDPAccountant

    from vlmtrain.fed.coordinator import federation_summary, run_rounds

    sigma, clip, n = 0.8, 0.5, 40_000
    dp = {"noise_multiplier": sigma, "clipping_norm": clip, "delta": 1e-5, "target_epsilon": 0.0}
    init = {"w": np.zeros((200, 200), np.float32)}
    for dead, replied in (((), 3), ((3,), 2)):
        plan = _plan(tmp_path / f"dead{len(dead)}", rounds=1, site_dp=dp, sites={"s1": "", "s2": "", "s3": ""})
        state = run_rounds(FakeGrid(dead=set(dead)), plan, init)
        moved = state["arrays"]["w"].astype(np.float64) - init["w"]
        assert abs(moved.mean() - clip / np.sqrt(n)) < 4 * sigma * clip / replied / np.sqrt(n)
        assert abs(moved.std() / (sigma * clip / replied) - 1) < 0.03
    plan = _plan(tmp_path / "acc", site_dp=dp, sites={"s1": "", "s2": "", "s3": ""})
    summary = federation_summary(plan, run_rounds(FakeGrid(), plan, init))
    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=sigma, sample_rate=1.0)
    site = summary["privacy"]["site_level"]
    assert abs(site["epsilon"] - acc.get_epsilon(delta=1e-5)) <= 1e-6 and site["releases"] == 3
    assert summary["privacy"]["epsilon"] == max(0.1 * k for k in (1, 2, 3))  # patient-level: the sites' own


def test_site_level_dp_is_refused_for_a_small_consortium_unless_forced(tmp_path):
    """3 sites: refused with the σ Opacus plans for the target (printed), unless `force`; never with FedAdam."""
    from opacus.accountants.utils import get_noise_multiplier

    from vlmtrain.errors import ConfigError
    from vlmtrain.fed.run import load_federated

    dp = ["federated.site_dp={target_epsilon: 8, clipping_norm: 0.1}"]
    sigma = get_noise_multiplier(target_epsilon=8, target_delta=1e-5, sample_rate=1.0, steps=3, accountant="rdp")
    with pytest.raises(ConfigError, match=re.escape(f"needs σ={sigma:.3f}")):
        load_federated(RECIPE, tmp_path, dp)
    fed, _, _ = load_federated(RECIPE, tmp_path, ["federated.site_dp={target_epsilon: 8, clipping_norm: 0.1, "
                                                  "force: true}"])
    assert abs(fed.site_dp_noise() - sigma) < 1e-12
    with pytest.raises(ConfigError, match="federated.site_dp: .*FedAdam"):
        load_federated(RECIPE, tmp_path, ["federated.strategy=fedadam", dp[0]])


def test_multi_host_verbs_refuse_what_they_can_check_before_joining(tmp_path, capsys):
    """`fed site` refuses a site directory without a passing gate report (before any connection); `fed coordinator`
    refuses a key list that does not name every site of the recipe (before any stage runs); `fed certs` and
    `fed site-key` write the files the other two take (a CA that signed the server certificate; an OpenSSH key).
    In-process through the CLI's own `main` (every refusal happens before `fed site` would exec its SuperNode)."""
    from cryptography import x509

    from vlmtrain.cli.main import main

    recipe = ROOT / "configs" / "recipes" / "medical-federated.yaml"
    assert main(["fed", "certs", "--out", str(tmp_path / "certs"), "--host", "127.0.0.1"]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "certs" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    assert server.issuer == ca.subject
    assert main(["fed", "site-key", "--out", str(tmp_path / "keys"), "--name", "hospital-general"]) == 0
    assert (tmp_path / "keys" / "hospital-general.pub").read_text().startswith("ecdsa-sha2-nistp384")
    (tmp_path / "site" / "shards").mkdir(parents=True)
    capsys.readouterr()
    code = main(["fed", "site", "--superlink", "127.0.0.1:1", "--name", "hospital-general",
                 "--site-dir", str(tmp_path / "site"), "--base-model", str(tmp_path),
                 "--root-cert", str(tmp_path / "certs" / "ca.crt"),
                 "--key", str(tmp_path / "keys" / "hospital-general.key")])
    err = capsys.readouterr().err
    assert code != 0 and "privacy_report.json" in err and "passed the privacy gate" in err, err
    code = main(["fed", "coordinator", str(recipe), "--out", str(tmp_path / "coord"), "--tls-dir",
                 str(tmp_path / "certs"), f"--site-key=hospital-general={tmp_path / 'keys' / 'hospital-general.pub'}"])
    err = capsys.readouterr().err
    assert code == 2 and "no key given for hospital-eye-path, hospital-radiology" in err, err
    assert not (tmp_path / "coord").exists() or not any((tmp_path / "coord").iterdir())
