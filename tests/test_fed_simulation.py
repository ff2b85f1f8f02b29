"""`vlmtrain fed run --simulation`: the medical federation's recipe on Flower's Simulation Engine (one virtual node
per site, ClientApps in Ray actors), with the same site preparation, ServerApp and ClientApp as the deployment.
One tiny federation (1 round × 1 local step, 3 sites: SecAgg+ on by default), checked against independent
references: Opacus' RDP accountant for each site's ε, numpy's weighted mean of the replies each site kept on its own
disk for the released arrays, and the process table (psutil) for what is left running afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "recipes" / "medical-federated.yaml"
SITES = ["hospital-eye-path", "hospital-general", "hospital-radiology"]
TINY = ["federated.rounds=1", "federated.local_steps=1", "public.trainer.max_steps=5"]
pytestmark = pytest.mark.slow


def test_simulation_runs_the_recipe_like_the_deployment(tmp_path):
    from vlmtrain.errors import VlmtrainError
    from vlmtrain.fed.simulate import check_isolation

    try:  # `--simulation` refuses (tested by its message) where no private network namespace can be made
        check_isolation()
    except VlmtrainError as e:
        pytest.skip(f"this machine cannot make a private network namespace: {e}")
    out = tmp_path / "run"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    driver = subprocess.Popen([sys.executable, "-m", "vlmtrain", "fed", "run", str(RECIPE), "--out", str(out),
                               "--simulation", *TINY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=ROOT)
    try:  # the gate's OCR of every site's images dominates: ~10 min at load 6-10 on 2 cores, 20+ at load 20
        stdout, stderr = driver.communicate(timeout=2400)
    finally:
        if driver.poll() is None:  # SIGTERM: the driver stops the simulation it started
            driver.terminate()
            driver.wait(timeout=120)
    assert driver.returncode == 0, stdout[-3000:] + stderr[-3000:]

    # nothing the federation started is still running: every Flower and Ray process inherited its FLWR_HOME
    home = str(out / "deploy")
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                assert not proc.environ().get("FLWR_HOME", "").startswith(home), proc.cmdline()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue

    # the simulation ran in a network namespace whose only interface is loopback (Ray binds every interface)
    assert json.loads((out / "deploy" / "simulation.json").read_text())["interfaces"] == ["lo"]

    s = json.loads((out / "summary.json").read_text())
    f, p = s["federated"], s["privacy"]
    assert s["status"] == "completed" and s["flower"]["status"].startswith("finished:completed")
    assert f["transport"] == {"engine": "simulation", "backend": "ray", "tls": False, "supernode_auth": False,
                              "host": "127.0.0.1", "network_namespace": "loopback only"}
    assert f["rounds"] == 1 == f["rounds_aggregated"] and f["local_steps"] == 1 and f["errors"] == []
    assert sorted(f["sites"]) == SITES and f["strategy"] == "fedavg" and f["min_sites"] == 2
    assert f["secure_aggregation"] is True  # 3 sites: SecAgg+ by default, as in the deployment
    assert sorted(f["bytes_up_per_round"][0]) == SITES and len(f["round_seconds"]) == 1
    assert set(p["sites"]) == set(SITES) and p["epsilon"] == max(v["epsilon"] for v in p["sites"].values())
    assert p["delta"] == 1e-5 and p["unit"] == "patient"
    assert np.isfinite(s["eval"]["heldout_loss"]) and s["eval"]["heldout"] == "medical-cohort-holdout"

    # each site's ε: σ planned by Opacus for its q over rounds × local steps, then Opacus' RDP accountant stepped
    # once per DP step it ran; its ledger on its own disk holds that one round
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    for site, v in p["sites"].items():
        q = 16 / v["units"]  # dp-sft.data.batch_size / the site's patients
        sigma = get_noise_multiplier(target_epsilon=3.8, target_delta=1e-5, sample_rate=q, steps=1, accountant="rdp")
        assert abs(v["sample_rate"] - q) < 1e-12 and abs(v["noise_multiplier"] - sigma) < 1e-9
        assert v["steps_this_run"] == 1
        acc = RDPAccountant()
        acc.step(noise_multiplier=sigma, sample_rate=q)
        assert abs(v["epsilon"] - acc.get_epsilon(delta=1e-5)) <= 1e-6
        ledger = json.loads((out / "sites" / site / "privacy_ledger.json").read_text())
        (entries,) = [d["entries"] for d in ledger["datasets"].values()]
        assert [e["round"] for e in entries] == [1]

    # the released arrays: the mean of the replies the sites kept, weighted by their patients (SecAgg+ gives the
    # coordinator only the sum; its quantisation stays well inside 1e-6)
    run = json.loads((out / "coordinator" / "plan.json").read_text())["run"]
    kept = []
    for site in SITES:
        with np.load(out / "sites" / site / "replies" / f"{run}-round0001.npz") as z:
            kept.append(({k: z[k] for k in z.files}, p["sites"][site]["units"]))
    with np.load(out / "coordinator" / "final.npz") as z:
        assert sorted(z.files) == sorted(kept[0][0])
        for k in z.files:
            by_hand = sum(a[k].astype(np.float64) * n for a, n in kept) / sum(n for _, n in kept)
            np.testing.assert_allclose(z[k], by_hand, rtol=0, atol=1e-6)
        # and the sites did train: the release is not the initial arrays
        with np.load(out / "coordinator" / "initial.npz") as init:
            assert max(float(np.abs(z[k] - init[k]).max()) for k in z.files) > 0
