"""The federation on Flower's Deployment Engine over 127.0.0.1: SuperLink + 3 SuperNodes started and stopped by the
test (`vlmtrain fed run`), with the recipe's defaults: 3 sites, so Flower's SecAgg+ (the coordinator sees only the
sum). One shared federation (2 rounds of 2 local steps) carries every check, because each federation costs minutes
on 2 cores:

    round 1   the site VICTIM's SuperNode and the app processes under it are SIGKILLed by PID while it trains;
              the round aggregates the other two (quorum 2) and the coordinator stops after its checkpoint
    round 2   resumed with the multi-host commands, on 127.0.0.1: `vlmtrain fed certs`, `fed site-key` per site,
              `vlmtrain fed coordinator --resume` (a fresh SuperLink with those certificates and keys) and one
              `vlmtrain fed site` process per site (VICTIM restarted, its ledger intact)

Checked against independent references: Opacus' accountant for each site's ε, npy sizes of the model's own
trainable parameters for the masked vector on the wire and the allow-list, numpy's weighted mean of the sites' kept replies for
FedAvg, a site round recomputed in this process for the resume's bit-exactness, a centralised run (`vlmtrain run`)
for the held-out loss. In-process checks (coordinator quorum/skip/resume, strategies, ledger) are in test_fed.py,
SecAgg+ with every strategy and site-level DP in test_fed_secagg.py."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("flwr")
psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "recipes" / "medical-federated.yaml"
ROUNDS, LOCAL = 2, 2
SITES = ["hospital-eye-path", "hospital-general", "hospital-radiology"]
VICTIM = "hospital-eye-path"
# round_timeout_s bounds a round's wait for a reply that will not come (the killed site's); Flower answers a message
# to a node whose heartbeat stopped with an error reply before that
FAST = [f"federated.rounds={ROUNDS}", f"federated.local_steps={LOCAL}", "public.trainer.max_steps=10",
        "federated.round_timeout_s=600"]
pytestmark = pytest.mark.slow


def vlmtrain(*args, env=None, timeout=1800):
    return subprocess.run([sys.executable, "-m", "vlmtrain", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def kill_site_while_training(out: Path, site: str, driver: subprocess.Popen, timeout: float = 1800) -> list[int]:
    """Wait until `site`'s ClientApp has built its DP dataset (its log says so; training starts next), then SIGKILL
    the SuperNode and every process under it, each by PID. → the PIDs killed."""
    pid_file, log = out / "deploy" / "logs" / f"site-{site}.pid", out / "deploy" / "logs" / f"site-{site}.log"
    t_end = time.time() + timeout
    while time.time() < t_end:
        if pid_file.is_file() and log.is_file() and "records validated for Poisson sampling" in log.read_text():
            node = psutil.Process(int(pid_file.read_text()))
            procs = [node, *node.children(recursive=True)]
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    os.kill(p.pid, signal.SIGKILL)
            return [p.pid for p in procs]
        if driver.poll() is not None:
            raise AssertionError(f"the federation ended before {site} trained: {driver.stderr.read()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"{site} never started training within {timeout:.0f}s")


@pytest.fixture(scope="module")
def fed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fed") / "run"
    wire = out.parent / "wire"
    env = dict(os.environ, VLMTRAIN_FED_WIRE_LOG=str(wire))
    code = ("import sys, json; from vlmtrain.fed.run import run_loopback; "
            "s = run_loopback(sys.argv[1], sys.argv[2], sys.argv[3:], evaluate=False, "
            "plan_extra={'stop_after_round': 1}); print(json.dumps(s['status']))")
    driver = subprocess.Popen([sys.executable, "-c", code, str(RECIPE), str(out), *FAST], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        killed = kill_site_while_training(out, VICTIM, driver)
        stdout, stderr = driver.communicate(timeout=1800)
    finally:
        if driver.poll() is None:  # SIGTERM: the driver stops the SuperLink and SuperNodes it started
            driver.terminate()
            driver.wait(timeout=120)
    assert driver.returncode == 0 and stdout.strip().endswith('"stopped"'), stdout[-2000:] + stderr[-3000:]
    ckpt = out / "coordinator" / "checkpoint"
    round1 = json.loads((ckpt / "state.json").read_text())
    shutil.copy(ckpt / round1["arrays"], out.parent / "round1.npz")  # round 2's checkpoint replaces it
    sites = resume_with_coordinator_and_site_verbs(out, env)
    return SimpleNamespace(out=out, wire=wire, summary=json.loads((out / "summary.json").read_text()),
                           killed=killed, round1=round1, plan=json.loads((out / "coordinator" / "plan.json").read_text()),
                           site_procs=sites)


def resume_with_coordinator_and_site_verbs(out: Path, env: dict) -> list[subprocess.Popen]:
    """Round 2 as docs/federated.md's multi-host steps, every host being 127.0.0.1: certificates, site keys, the
    coordinator (registers the keys, waits for the sites), then each site's `fed site`. → the site processes,
    stopped by PID here once the coordinator is done."""
    keys, certs = out.parent / "keys", out.parent / "certs"
    assert vlmtrain("fed", "certs", "--out", certs, "--host", "127.0.0.1").returncode == 0
    for site in SITES:
        assert vlmtrain("fed", "site-key", "--out", keys, "--name", site).returncode == 0
    from vlmtrain.fed.deploy import free_port

    port = free_port()
    coord_log = open(out.parent / "coordinator.log", "w")
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "vlmtrain", "fed", "coordinator", str(RECIPE), "--out", str(out), "--resume",
         "--host", "127.0.0.1", "--port", str(port), "--tls-dir", str(certs),
         *[f"--site-key={s}={keys / (s + '.pub')}" for s in SITES], *FAST],
        stdout=coord_log, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    sites = []
    try:
        t_end = time.time() + 900
        while "waiting for 3 sites" not in (out.parent / "coordinator.log").read_text():  # keys registered
            assert coordinator.poll() is None and time.time() < t_end, (out.parent / "coordinator.log").read_text()
            time.sleep(1)
        for site in SITES:
            sites.append(subprocess.Popen(
                [sys.executable, "-m", "vlmtrain", "fed", "site", "--superlink", f"127.0.0.1:{port}", "--name", site,
                 "--site-dir", str(out / "sites" / site), "--base-model", str(out / "public" / "model"),
                 "--root-cert", str(certs / "ca.crt"), "--key", str(keys / (site + ".key"))],
                stdout=open(out.parent / f"site-{site}.log", "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                start_new_session=True))
        assert coordinator.wait(timeout=1800) == 0, (out.parent / "coordinator.log").read_text()[-4000:]
    finally:
        if coordinator.poll() is None:  # SIGTERM: it stops the SuperLink it started
            coordinator.terminate()
            coordinator.wait(timeout=120)
        for p in sites:  # each site's process group: the SuperNode and the ClientApp processes it started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=60)
    return sites


def kept_reply(out: Path, run: str, site: str, rnd: int) -> dict[str, np.ndarray]:
    with np.load(out / "sites" / site / "replies" / f"{run}-round{rnd:04d}.npz") as z:
        return {k: z[k] for k in z.files}


def ledger_entries(out: Path, site: str) -> list[dict]:
    ledger = json.loads((out / "sites" / site / "privacy_ledger.json").read_text())
    (entries,) = [d["entries"] for d in ledger["datasets"].values()]
    return entries


def test_summary_contract(fed_run):
    s = fed_run.summary
    f, p = s["federated"], s["privacy"]
    assert s["status"] == "completed" and s["flower"]["status"].startswith("finished:completed")
    assert f["rounds"] == ROUNDS == f["rounds_aggregated"] and f["strategy"] == "fedavg"
    assert sorted(f["sites"]) == SITES
    assert f["secure_aggregation"] is True and len(f["bytes_up_per_round"]) == ROUNDS  # SecAgg+: on by default
    assert f["transport"] == {"engine": "deployment", "tls": True, "supernode_auth": True, "host": "127.0.0.1"}
    assert set(p["sites"]) == set(f["sites"]) and p["epsilon"] == max(v["epsilon"] for v in p["sites"].values())
    assert p["delta"] == 1e-5


def test_site_killed_mid_round_the_round_aggregates_the_others_nothing_is_left_running(fed_run):
    """Round 1: VICTIM's SuperNode and its app processes were SIGKILLed while it trained. The round aggregated the two
    other sites (quorum 2) into exactly their weighted mean; VICTIM charged nothing and kept no reply for round 1;
    its ledger is whole and holds round 2 only (it rejoined after the restart); no process killed or started by the
    federation is still running."""
    out, run = fed_run.out, fed_run.plan["run"]
    h1, h2 = json.loads((out / "coordinator" / "checkpoint" / "state.json").read_text())["history"]
    assert h1["sent"] == 3 and [r["site"] for r in h1["replies"]] == [s for s in SITES if s != VICTIM]
    assert h1["aggregated"] and h2["aggregated"] and sorted(r["site"] for r in h2["replies"]) == SITES
    assert fed_run.round1["round"] == 1
    survivors = [(kept_reply(out, run, r["site"], 1), r["metrics"]["num-examples"]) for r in h1["replies"]]
    with np.load(out.parent / "round1.npz") as z:
        for k in z.files:
            by_hand = sum(a[k].astype(np.float64) * n for a, n in survivors) / sum(n for _, n in survivors)
            np.testing.assert_allclose(z[k], by_hand, rtol=0, atol=1e-6)
    assert not (out / "sites" / VICTIM / "replies" / f"{run}-round0001.npz").exists()
    assert [e["round"] for e in ledger_entries(out, VICTIM)] == [2]
    assert not list((out / "sites" / VICTIM).glob("*.tmp"))
    for site in SITES:
        if site != VICTIM:
            assert [e["round"] for e in ledger_entries(out, site)] == [1, 2]
    assert len(fed_run.killed) >= 2  # the SuperNode and the ClientApp process it had started
    for pid in fed_run.killed + [p.pid for p in fed_run.site_procs]:  # round 2's `fed site` processes: stopped
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    home = str(out)  # round 1's SuperNodes: OUT/deploy/flwr-home; round 2's `fed site`: OUT/sites/SITE/flwr-home
    for proc in psutil.process_iter():
        try:
            assert not proc.environ().get("FLWR_HOME", "").startswith(home), proc.cmdline()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue


def test_site_epsilon_equals_opacus_accountant_for_its_steps(fed_run):
    """σ from Opacus' get_noise_multiplier for the site's q over rounds × local steps; ε from Opacus' RDP accountant
    stepped once per DP step the site ran (VICTIM: round 2 only)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    for site, v in fed_run.summary["privacy"]["sites"].items():
        q = 16 / v["units"]  # dp-sft.data.batch_size / the site's patients
        assert abs(v["sample_rate"] - q) < 1e-12
        sigma = get_noise_multiplier(target_epsilon=3.8, target_delta=1e-5, sample_rate=q, steps=ROUNDS * LOCAL,
                                     accountant="rdp")
        assert abs(v["noise_multiplier"] - sigma) < 1e-9
        steps = LOCAL * (1 if site == VICTIM else ROUNDS)
        assert v["steps_this_run"] == steps
        acc = RDPAccountant()
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
        assert abs(v["epsilon"] - acc.get_epsilon(delta=1e-5)) <= 1e-6
        assert v["epsilon"] <= 3.8 + 1e-6


def _npy_bytes(shape, dtype) -> int:
    buf = io.BytesIO()
    np.save(buf, np.zeros(tuple(shape), dtype), allow_pickle=False)
    return len(buf.getvalue())


def _masked_vector_bytes(plan) -> list[int]:
    """The npy buffers of SecAgg+'s masked vector for this stage, computed here from the model's own trainable
    parameters: Flower's weight factor (one int64), then one int64 per trainable value, array by array in name
    order — and no array for any frozen (base) weight."""
    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.fed.run import site_model

    model = site_model(Path(plan["base_model"]), validate(StageConfig, plan["stage"])).model
    trainable = dict(sorted((n, p) for n, p in model.named_parameters() if p.requires_grad))
    assert trainable and all(n.startswith("connector.") or "lora_" in n for n in trainable)
    return [_npy_bytes((1,), np.int64)] + [_npy_bytes(p.shape, np.int64) for p in trainable.values()]


# what a SecAgg+ reply may hold (Flower's secaggplus_mod: keys, encrypted shares, node ids, the masked vector;
# the legacy FitRes beside it: the site's weight, status and its allow-listed numbers)
SECAGG_KEYS = {"pk1", "pk2", "ctxts", "dsts", "masked_params", "nids", "shares"}
REPLY_RECORDS = {"secaggplus_configs", "fitres.metrics", "fitres.num_examples", "fitres.parameters", "fitres.status"}


def test_wire_carries_only_masked_trainable_tensors_and_allowed_fields(fed_run):
    """On the replies as they left each ClientApp (SecAgg+, on by default with 3 sites): no array at all; the
    masked vector has exactly the shape of the stage's trainable parameters (connector + LoRA) as int64, nothing of
    a base weight; the only other values are SecAgg+'s protocol fields and the allow-listed numbers, site name and
    gate-report hash; no text, path, record or patient id anywhere."""
    from vlmtrain.data.shards import iter_shard
    from vlmtrain.fed.arrays import ALLOWED_METRICS, ALLOWED_SITE_INFO

    out, plan = fed_run.out, fed_run.plan
    vector = _masked_vector_bytes(plan)
    ids, groups = set(), set()
    for site in SITES:
        for url in sorted((out / "sites" / site / "shards").glob("*.tar")):
            for raw in iter_shard(str(url)):
                rec = json.loads(raw["json"])
                ids.add(rec["id"])
                groups.add(rec["meta"]["patient_group"])
    dumps = sorted(fed_run.wire.glob("*.json"))
    masked = 0
    for d in dumps:
        msg = json.loads(d.read_text())
        assert set(msg) <= REPLY_RECORDS and "secaggplus_configs" in msg, set(msg)
        assert all(rec["items"] == {} for rec in msg.values() if rec["type"] == "ArrayRecord")
        protocol = msg["secaggplus_configs"]["items"]
        assert set(protocol) <= SECAGG_KEYS, set(protocol)
        if "masked_params" in protocol:
            masked += 1
            assert [e["bytes"] for e in protocol["masked_params"]] == vector
            numbers = msg["fitres.metrics"]["items"]
            assert set(numbers) <= ALLOWED_METRICS | ALLOWED_SITE_INFO
            assert all(isinstance(v, float | int) for k, v in numbers.items() if k in ALLOWED_METRICS)
            for k in ALLOWED_SITE_INFO & set(numbers):
                v = numbers[k]
                assert "/" not in v and v not in ids and v not in groups and len(v) <= 64
        text = d.read_text()
        assert not any(i in text for i in ids) and not any(g in text for g in groups)
    assert masked == 2 + 3  # round 1 without the killed site, round 2 with all three


def test_bytes_up_equal_the_trainable_tensors(fed_run):
    """The payload a site uploads per round — SecAgg+'s masked vector as the coordinator received it — is one int64
    per trainable value plus the weight factor (npy buffers computed here with numpy from the model's parameter
    shapes); everything a site sent over the round's four exchanges, as the coordinator counted it, equals what the
    site's own wire log recorded leaving it."""
    f = fed_run.summary["federated"]
    vector = sum(_masked_vector_bytes(fed_run.plan))
    assert set(f["payload_bytes_per_site"].values()) == {vector}
    assert [len(r) for r in f["bytes_up_per_round"]] == [2, 3]
    sent: dict[str, int] = {}
    for d in fed_run.wire.glob("*.json"):
        site = d.name.rsplit("-", 1)[0]
        for rec in json.loads(d.read_text()).values():
            for v in rec["items"].values():
                for x in (v if isinstance(v, list) else [v]):
                    sent[site] = sent.get(site, 0) + (x["bytes"] if isinstance(x, dict) else 0)
    counted = {site: sum(r.get(site, 0) for r in f["bytes_up_per_round"]) for site in SITES}
    for site in SITES:  # the killed site also sent round 1's keys and shares, in a round it then missed
        assert sent[site] == counted[site] if site != VICTIM else sent[site] > counted[site], (site, sent, counted)
    for per_site in f["bytes_up_per_round"]:  # the masked vector + keys and shares (~2 KB for 3 sites)
        assert all(vector < b < vector + 16_384 for b in per_site.values()), per_site


def test_fedavg_of_the_last_round_is_the_weighted_mean_of_the_sites_replies(fed_run):
    """final.npz = Σ n_k·w_k / Σ n_k over the sites' kept replies (on the sites' disks) of the last round."""
    out, run = fed_run.out, fed_run.plan["run"]
    total, acc = 0.0, None
    for site, v in fed_run.summary["privacy"]["sites"].items():
        arrays = {k: a.astype(np.float64) for k, a in kept_reply(out, run, site, ROUNDS).items()}
        n = float(v["units"])
        acc = {k: a * n for k, a in arrays.items()} if acc is None else {k: acc[k] + a * n for k, a in arrays.items()}
        total += n
    with np.load(out / "coordinator" / "final.npz") as z:
        for k in z.files:
            np.testing.assert_allclose(z[k], acc[k] / total, rtol=0, atol=1e-6)


def test_resumed_round_is_bit_exact_with_the_same_round_run_here(fed_run, tmp_path):
    """The coordinator stopped after round 1 and a new process resumed it. A site's round-2 reply from that
    resumed federation (fresh SuperLink, SuperNode and ClientApp processes) equals, bit for bit, the same round
    computed in this process from the round-1 checkpoint with a copy of the site's shards and an empty ledger —
    what an uninterrupted coordinator would have sent (test_fed.py checks the coordinator's own resume bit-exactly)."""
    from vlmtrain.fed.site import RoundRequest, Site

    out, plan, site = fed_run.out, fed_run.plan, "hospital-general"
    shutil.copytree(out / "sites" / site / "shards", tmp_path / site / "shards")
    with np.load(out.parent / "round1.npz") as z:
        global_arrays = {k: z[k] for k in z.files if not k.startswith("strategy:")}
    req = RoundRequest(run="recomputed", round=2, local_steps=LOCAL, total_steps=ROUNDS * LOCAL, stage=plan["stage"],
                       epsilon_budget=plan["epsilon_budget"], seed=plan["seed"])
    arrays, _, _ = Site(tmp_path / site, plan["base_model"], name=site).train_round(req, global_arrays)
    sent = kept_reply(out, plan["run"], site, 2)
    assert set(arrays) == set(sent)
    for k in sent:
        np.testing.assert_array_equal(arrays[k], sent[k], err_msg=k)


def test_privacy_report_and_status_verbs(fed_run):
    out, s = fed_run.out, fed_run.summary
    site = SITES[1]
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
    from vlmtrain.fed.run import heldout_loss
    from vlmtrain.model.io import load_any

    out, s = fed_run.out, fed_run.summary
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
