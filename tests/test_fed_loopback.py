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
FAST = [f"federated.rounds={ROUNDS}", f"federated.local_steps={LOCAL}", "public.trainer.max_steps=150"]
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
