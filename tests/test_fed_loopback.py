"""The federation on Flower's Deployment Engine over 127.0.0.1: SuperLink + 3 SuperNodes started and stopped by the
test (`vlmtrain fed run`). Checked against independent references: Opacus' accountant for each site's ε, the
arrays' npy sizes for the bytes on the wire, the model's own parameter list for the allow-list, numpy's weighted
mean of the sites' kept replies for FedAvg, and a centralised run (`vlmtrain run`) for the held-out loss."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "recipes" / "medical-federated.yaml"
ROUNDS, LOCAL = 2, 6
FAST = [f"federated.rounds={ROUNDS}", f"federated.local_steps={LOCAL}", "public.trainer.max_steps=30"]
pytestmark = pytest.mark.slow


def vlmtrain(*args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "vlmtrain", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def fed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fed") / "run"
    wire = out.parent / "wire"
    env = dict(os.environ, VLMTRAIN_FED_WIRE_LOG=str(wire))
    r = vlmtrain("fed", "run", RECIPE, "--out", out, *FAST, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, wire, json.loads((out / "summary.json").read_text())


def test_summary_contract(fed_run):
    out, _, s = fed_run
    f, p = s["federated"], s["privacy"]
    assert s["status"] == "completed" and s["flower"]["status"].startswith("finished:completed")
    assert f["rounds"] == ROUNDS == f["rounds_aggregated"]
    assert sorted(f["sites"]) == sorted(["hospital-radiology", "hospital-general", "hospital-eye-path"])
    assert f["secure_aggregation"] is False and len(f["bytes_up_per_round"]) == ROUNDS
    assert f["transport"] == {"tls": True, "supernode_auth": True, "host": "127.0.0.1"}
    assert set(p["sites"]) == set(f["sites"]) and p["epsilon"] == max(v["epsilon"] for v in p["sites"].values())
    assert p["delta"] == 1e-5


def test_site_epsilon_equals_opacus_accountant_for_its_steps(fed_run):
    """σ from Opacus' get_noise_multiplier for the site's q over rounds × local steps; ε from Opacus' RDP accountant
    stepped once per DP step of every round."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    out, _, s = fed_run
    for site, v in s["privacy"]["sites"].items():
        units = v["units"]
        q = 16 / units  # dp-sft.data.batch_size / the site's patients
        assert abs(v["sample_rate"] - q) < 1e-12
        sigma = get_noise_multiplier(target_epsilon=3.8, target_delta=1e-5, sample_rate=q, steps=ROUNDS * LOCAL,
                                     accountant="rdp")
        assert abs(v["noise_multiplier"] - sigma) < 1e-9
        acc = RDPAccountant()
        for _ in range(ROUNDS * LOCAL):
            acc.step(noise_multiplier=sigma, sample_rate=q)
        assert abs(v["epsilon"] - acc.get_epsilon(delta=1e-5)) <= 1e-6
        assert v["epsilon"] <= 3.8 + 1e-6
        ledger = json.loads((out / "sites" / site / "privacy_ledger.json").read_text())
        (entries,) = [d["entries"] for d in ledger["datasets"].values()]
        assert [e["round"] for e in entries] == list(range(1, ROUNDS + 1))


def test_wire_carries_only_trainable_tensors_and_allowed_fields(fed_run):
    """On the replies as they left each ClientApp: array names are exactly the stage's trainable parameters
    (connector + LoRA), no base weight; config/metric keys are allow-listed; no text, path, record or patient id."""
    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.fed.arrays import ALLOWED_METRICS, ALLOWED_SITE_INFO
    from vlmtrain.fed.run import site_model

    out, wire, s = fed_run
    plan = json.loads((out / "coordinator" / "plan.json").read_text())
    model = site_model(Path(plan["base_model"]), validate(StageConfig, plan["stage"])).model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(n.startswith("connector.") or "lora_" in n for n in trainable)
    ids, groups = set(), set()
    for site in s["federated"]["sites"]:
        for url in sorted((out / "sites" / site / "shards").glob("*.tar")):
            from vlmtrain.data.shards import iter_shard

            for raw in iter_shard(str(url)):
                rec = json.loads(raw["json"])
                ids.add(rec["id"])
                groups.add(rec["meta"]["patient_group"])
    dumps = sorted(wire.glob("*.json"))
    assert len(dumps) == ROUNDS * 3
    for d in dumps:
        msg = json.loads(d.read_text())
        assert set(msg) == {"arrays", "metrics", "site"}
        arrays = msg["arrays"]["items"]
        assert set(arrays) == set(trainable) and not set(arrays) & frozen
        for n, a in arrays.items():
            assert a["dtype"] == "float32" and a["shape"] == list(trainable[n].shape)
        assert set(msg["metrics"]["items"]) <= ALLOWED_METRICS
        assert all(isinstance(v, float | int) for v in msg["metrics"]["items"].values())
        info = msg["site"]["items"]
        assert set(info) <= ALLOWED_SITE_INFO
        for v in info.values():
            assert "/" not in v and v not in ids and v not in groups and len(v) <= 64
        text = d.read_text()
        assert not any(i in text for i in ids) and not any(g in text for g in groups)


def test_bytes_up_equal_the_trainable_tensors(fed_run):
    """Bytes per site per round as received by the coordinator = the npy buffers of the site's trainable tensors
    (each tensor's fp32 payload + numpy's header), computed here with numpy from the model's parameter shapes."""
    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.fed.run import site_model

    out, wire, s = fed_run
    plan = json.loads((out / "coordinator" / "plan.json").read_text())
    model = site_model(Path(plan["base_model"]), validate(StageConfig, plan["stage"])).model
    expected, payload = 0, 0
    for p in model.parameters():
        if p.requires_grad:
            buf = io.BytesIO()
            np.save(buf, np.zeros(tuple(p.shape), np.float32), allow_pickle=False)
            expected += len(buf.getvalue())
            payload += p.numel() * 4
    for per_site in s["federated"]["bytes_up_per_round"]:
        assert len(per_site) == 3 and set(per_site.values()) == {expected}
    assert set(s["federated"]["payload_bytes_per_site"].values()) == {payload}
    sent = [sum(a["bytes"] for a in json.loads(d.read_text())["arrays"]["items"].values())
            for d in wire.glob("*.json")]
    assert set(sent) == {expected}


def test_fedavg_of_the_last_round_is_the_weighted_mean_of_the_sites_replies(fed_run):
    """final.npz = Σ n_k·w_k / Σ n_k over the sites' kept replies (on the sites' disks) of the last round."""
    out, _, s = fed_run
    run = json.loads((out / "coordinator" / "plan.json").read_text())["run"]
    total, acc = 0.0, None
    for site, v in s["privacy"]["sites"].items():
        with np.load(out / "sites" / site / "replies" / f"{run}-round{ROUNDS:04d}.npz") as z:
            arrays = {k: z[k].astype(np.float64) for k in z.files}
        n = float(v["units"])
        acc = {k: a * n for k, a in arrays.items()} if acc is None else {k: acc[k] + a * n for k, a in arrays.items()}
        total += n
    with np.load(out / "coordinator" / "final.npz") as z:
        for k in z.files:
            np.testing.assert_allclose(z[k], acc[k] / total, rtol=0, atol=1e-6)


def test_privacy_report_verb_reads_the_site_ledger(fed_run):
    out, _, s = fed_run
    site = s["federated"]["sites"][0]
    r = vlmtrain("fed", "privacy-report", out / "sites" / site, "--json")
    assert r.returncode == 0, r.stderr
    (rep,) = json.loads(r.stdout).values()
    assert abs(rep["epsilon"] - s["privacy"]["sites"][site]["epsilon"]) <= 1e-9 and rep["steps"] == ROUNDS * LOCAL
    r = vlmtrain("fed", "status", out)
    assert r.returncode == 0 and r.stdout.count("aggregated=True") == ROUNDS, r.stdout + r.stderr


def test_federated_heldout_loss_within_97_percent_of_centralised_on_the_union(fed_run):
    """The centralised baseline: the same recipe's dp-sft stage run by `vlmtrain run` on the union of the sites'
    patients (`medical-cohort`), from the same public model, for the same number of optimizer steps as the
    federation's global model took (rounds × local steps). Held-out loss on `medical-cohort-holdout`, same
    function for both; goal: central_loss / federated_loss ≥ 0.97."""
    import shutil

    from vlmtrain.fed.run import heldout_loss
    from vlmtrain.model.io import load_any

    out, _, s = fed_run
    central = out.parent / "central"
    central.mkdir()
    shutil.copytree(out / "public", central / "public")  # the same base model: the public stage is skipped
    r = vlmtrain("run", RECIPE, "--out", central, "--resume", *[o for o in FAST if not o.startswith("federated.")],
                 f"dp-sft.trainer.max_steps={ROUNDS * LOCAL}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    central_loss = heldout_loss(load_any(central / "dp-sft" / "model"), out / "data" / "medical-cohort-holdout")
    fed_loss = s["eval"]["heldout_loss"]
    print(f"held-out loss: federated {fed_loss:.4f}, centralised {central_loss:.4f}, "
          f"ratio {central_loss / fed_loss:.4f}")
    assert central_loss / fed_loss >= 0.97


def test_coordinator_stopped_and_resumed_ends_with_the_same_weights_and_epsilon(fed_run):
    """A copy of the federation's inputs (base model, site shards; fresh ledgers): the coordinator stops right after
    round 1's checkpoint, `--resume` runs round 2; every site's ε equals the uninterrupted run's, no round is charged
    twice, the final arrays agree to 2e-3 (not bit-exactly: see below)."""
    import shutil

    out, _, s = fed_run
    again = out.parent / "again"
    shutil.copytree(out, again, ignore=shutil.ignore_patterns("deploy", "privacy_ledger.json", "replies"))
    for done in ("summary.json", "coordinator/summary.json", "coordinator/final.npz", "coordinator/checkpoint"):
        shutil.rmtree(again / done) if (again / done).is_dir() else (again / done).unlink()
    code = ("import sys, json; from vlmtrain.fed.run import run_loopback; "
            "s = run_loopback(sys.argv[1], sys.argv[2], sys.argv[3:], resume=True, evaluate=False, "
            "plan_extra={'stop_after_round': 1}); print(json.dumps(s['status']))")
    r = subprocess.run([sys.executable, "-c", code, str(RECIPE), str(again), *FAST], capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith('"stopped"'), r.stdout[-2000:] + r.stderr[-3000:]
    assert json.loads((again / "coordinator" / "checkpoint" / "state.json").read_text())["round"] == 1
    r = vlmtrain("fed", "run", RECIPE, "--out", again, "--resume", *FAST)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = json.loads((again / "summary.json").read_text())
    for site, v in s["privacy"]["sites"].items():
        assert abs(resumed["privacy"]["sites"][site]["epsilon"] - v["epsilon"]) <= 1e-9
        ledger = json.loads((again / "sites" / site / "privacy_ledger.json").read_text())
        (entries,) = [d["entries"] for d in ledger["datasets"].values()]
        assert [e["round"] for e in entries] == [1, 2]  # round 1 was not trained (or charged) twice
    # Not bit-identical: on 2026-11-30 the resumed run's final arrays differed from the uninterrupted run's by up to
    # 7.4e-4 (LoRA values ~0.1; one DP step moves a weight by ~lr = 1e-3) although every site's sampler and noise are
    # seeded by (seed, site, round); the source is not found yet (docs/federated.md#not-built). The bound below is
    # what holds: far below one round's movement of the weights.
    with np.load(out / "coordinator" / "final.npz") as a, np.load(again / "coordinator" / "final.npz") as b:
        for k in a.files:
            np.testing.assert_allclose(b[k], a[k], rtol=0, atol=2e-3)


def test_unregistered_site_is_refused_by_the_tls_superlink(tmp_path):
    """A SuperLink with TLS and SuperNode authentication: the site whose public key was registered
    (`flwr supernode register`) comes online; a site with an unregistered key is refused and never listed."""
    import time

    from vlmtrain.fed.deploy import Loopback

    net = Loopback(tmp_path / "net")
    try:
        net.start_superlink()
        net.start_site("registered", tmp_path, tmp_path)
        net.start_site("rogue", tmp_path, tmp_path, register=False, max_retries=2)
        t_end, nodes = time.time() + 180, []
        while time.time() < t_end:
            nodes = net.nodes()
            if any(n["status"] == "online" for n in nodes) and net.procs["site-rogue"].poll() is not None:
                break
            time.sleep(2)
        assert [n["status"] for n in nodes] == ["online"]  # only the registered key's node exists
        assert net.procs["site-rogue"].returncode != 0
        log = (tmp_path / "net" / "logs" / "site-rogue.log").read_text()
        assert "Failed to activate SuperNode" in log
        assert "BEGIN CERTIFICATE" in net.tls["ca"].read_text()
    finally:
        net.stop()
