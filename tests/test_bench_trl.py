"""The SFT/DPO comparisons with TRL and the step anatomy run end to end in their smoke mode (`--quick`), the way a
user calls them, so `bench/` cannot rot. Timings are never asserted: only the output contract and the same-work
checks (both sides start from the same weights, see the same tokens and supervise the same positions)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


def _bench(name: str, tmp_path) -> tuple[dict, dict]:
    out = tmp_path / f"{name}.json"
    r = subprocess.run([sys.executable, "-m", "bench", name, "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), json.loads(out.read_text())


@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_bench_vs_trl_quick(name, tmp_path):
    head, full = _bench(name, tmp_path)
    assert head["vlmtrain_samples_per_s"] > 0 and head["peer_samples_per_s"] > 0
    assert head["ratio"] == pytest.approx(head["vlmtrain_samples_per_s"] / head["peer_samples_per_s"], rel=1e-12)
    assert head["peer"].startswith("trl.")
    assert set(head["gflops_per_s"]) >= {"vlmtrain", "trl"}
    assert full["quick"] and full["machine"]["cpu_count"]
    assert full["parity_first_batch"]["same_input_ids"] and full["parity_first_batch"]["same_supervised_positions"]
    executed = full["flops"]["executed_per_step"]
    for side in ("vlmtrain", "trl"):
        parts = executed[side]
        assert parts["vision"] > 0 and parts["connector"] > 0 and parts["llm"] > 0
        assert parts["vision"] + parts["connector"] + parts["llm"] == parts["total"]
    if name == "sft":
        assert head["packed_ratio"] == pytest.approx(
            head["vlmtrain_packed_samples_per_s"] / head["peer_samples_per_s"], rel=1e-12)
        assert full["flops"]["length_model"]["max_rel_error"] < 1e-6
        assert full["medians"]["vlmtrain_packed"]["padding_fraction"] < full["medians"]["vlmtrain"]["padding_fraction"]
        bf = head["bf16"]  # the same comparison in bf16 autocast on both sides
        assert bf["ratio"] == pytest.approx(bf["vlmtrain_samples_per_s"] / bf["peer_samples_per_s"], rel=1e-12)
        assert set(full["runs"]) == {"vlmtrain", "vlmtrain_packed", "trl", "vlmtrain_bf16", "vlmtrain_packed_bf16",
                                     "trl_bf16", "vlmtrain_packed_compiled", "vlmtrain_packed_bf16_compiled"}
        assert bf["packed_compiled_ratio"] == pytest.approx(
            bf["vlmtrain_packed_compiled_samples_per_s"] / bf["peer_samples_per_s"], rel=1e-12)


def test_bench_anatomy_quick(tmp_path):
    head, full = _bench("anatomy", tmp_path)
    shares = [head[f"{k}_share"] for k in ("data_wait", "loop", "forward", "backward", "optimizer")]
    assert all(s >= 0 for s in shares) and sum(shares) == pytest.approx(1.0, abs=1e-6)
    assert head["step_ms"] > 0 and head["samples_per_s"] > 0
    assert isinstance(head["data_wait_under_5pct"], bool)
    assert full["stage"]["data"]["batch_size"] == 32 and full["timed_steps"] == 10


def test_bench_dp_quick(tmp_path):
    head, full = _bench("dp", tmp_path)
    ratios = head["dp_over_plain_time_per_sample"]
    assert set(ratios) == {"connector", "lora"} and all(r > 0 for r in ratios.values())
    for side in ("connector/plain", "connector/dp", "lora/plain", "lora/dp"):
        assert full["medians"][side]["samples"] > 0 and full["medians"][side]["steps"] == full["timed_steps"]
    assert full["quick"] and full["privacy"]["delta"] == 1e-5
