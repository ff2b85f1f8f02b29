"""`configs/recipes/medical-dp.yaml` and `vlmtrain privacy audit` (membership inference + canary exposure), the way
a user runs them; the DP-vs-non-DP leakage comparison reported in docs/privacy.md; patient-level units."""

import json
import shutil
import subprocess

import pytest

from conftest import ROOT, VLMTRAIN

RECIPE = ROOT / "configs" / "recipes" / "medical-dp.yaml"


def _run(*args, timeout=900):
    r = subprocess.run([*VLMTRAIN, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow  # two CLI processes over the medical builtins: ~55 s, a fifth of `make test-fast` on its own
def test_medical_dp_recipe_runs_with_max_steps_and_audits(tmp_path):
    out = tmp_path / "run"
    _run("run", RECIPE, "--out", out, "--max-steps", 3)
    summary = json.loads((out / "dp-sft" / "summary.json").read_text())
    priv = summary["privacy"]
    assert {"epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "accountant"} <= set(priv)
    assert priv["steps"] == 3 and priv["delta"] == 1e-5 and priv["max_grad_norm"] == 0.7
    assert priv["epsilon"] <= 3.8 and priv["target_epsilon"] == 3.8
    assert priv["records"] == 404  # 400 cohort records + 4 canaries
    assert "privacy" not in json.loads((out / "public" / "summary.json").read_text())  # public stage: no DP

    res = json.loads(_run("privacy", "audit", out, "--json", "--max-records", 60).stdout.strip().splitlines()[-1])
    m = res["membership"]
    assert 0.0 <= m["auc"] <= 1.0 and m["members"] == 60 and m["non_members"] == 60
    items = res["canaries"]["items"]
    assert len(items) == 4 and all(1 <= c["rank"] <= 1000 and 0 <= c["exposure"] <= 9.97 for c in items)
    assert res["privacy"]["epsilon"] == priv["epsilon"]
    assert json.loads((out / "dp-sft" / "privacy_audit.json").read_text()) == res
    canaries = json.loads((out / "dp-sft" / "audit" / "canaries.json").read_text())
    assert len(canaries) == 4 and all(len(c["secret"]) == 3 for c in canaries)


def test_audit_without_audit_inputs_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    r = subprocess.run([*VLMTRAIN, "privacy", "audit", str(tmp_path / "empty")], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode != 0 and "no stage with audit inputs" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_dp_leaks_less_than_the_same_training_without_dp(tmp_path):
    """The recipe as shipped (ε = 3.8) against the same recipe with `dp-sft.privacy=null` (same data, steps, batch,
    LR, canaries): membership AUC closer to 0.5 and lower canary exposure under DP. Numbers in docs/privacy.md."""
    dp = tmp_path / "dp"
    _run("run", RECIPE, "--out", dp)
    nodp = tmp_path / "nodp"
    nodp.mkdir()
    for part in ("public", "data"):  # same public stage: resume skips it
        shutil.copytree(dp / part, nodp / part)
    _run("run", RECIPE, "--out", nodp, "--resume", "dp-sft.privacy=null")
    assert "privacy" not in json.loads((nodp / "dp-sft" / "summary.json").read_text())
    a_dp = json.loads(_run("privacy", "audit", dp, "--json").stdout.strip().splitlines()[-1])
    a_no = json.loads(_run("privacy", "audit", nodp, "--json").stdout.strip().splitlines()[-1])
    print("DP", a_dp["membership"], a_dp["canaries"]["exposure_mean"])
    print("no DP", a_no["membership"], a_no["canaries"]["exposure_mean"])
    assert abs(a_dp["membership"]["auc"] - 0.5) < abs(a_no["membership"]["auc"] - 0.5)
    assert a_dp["canaries"]["exposure_mean"] < a_no["canaries"]["exposure_mean"]


def test_patient_units_group_records(tmp_path):
    """unit: patient → one unit per meta.patient_group; each draw is one of that patient's records."""
    from itertools import islice

    from conftest import tiny_bundle
    from vlmtrain.data.builtin import _qa
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.data.shards import Source
    from vlmtrain.data.writer import write_shards
    from vlmtrain.errors import VlmtrainError
    from vlmtrain.train.dp import DPDataset

    samples = list(islice(_qa("train"), 30))
    for i, s in enumerate(samples):
        s.record["meta"] = {"patient_group": f"p{i // 3}"}  # 10 patients × 3 records
    write_shards(samples, tmp_path / "pat", "test", shard_size=10)
    enc = encoder_for(tiny_bundle(), 96)
    ds = DPDataset([Source(str(tmp_path / "pat"))], enc, unit="patient")
    assert len(ds) == 10 and ds.records == 30
    groups = {s.record["id"]: s.record["meta"]["patient_group"] for s in samples}
    for j in range(10):
        assert {groups[ds[j]["id"]] for _ in range(5)} == {f"p{j}"}
    assert len(DPDataset([Source(str(tmp_path / "pat"))], enc, unit="record")) == 30
    for s in samples:
        s.record.pop("meta")
    write_shards(samples, tmp_path / "nopat", "test", shard_size=10)
    with pytest.raises(VlmtrainError, match="no meta.patient_group"):
        DPDataset([Source(str(tmp_path / "nopat"))], enc, unit="patient")
