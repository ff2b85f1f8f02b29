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


@pytest.mark.slow  # 25 s (sft) and 15 s (dpo) in make test-fast on the 2-core box, 2026-12-07: over its 5-min budget
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


@pytest.mark.slow  # 40 s in make test-fast on the 2-core box, 2026-12-07
def test_bench_dp_quick(tmp_path):
    head, full = _bench("dp", tmp_path)
    ratios = head["dp_over_plain_time_per_sample"]
    assert set(ratios) == {"connector", "lora"} and all(r > 0 for r in ratios.values())
    for side in ("connector/plain", "connector/dp", "lora/plain", "lora/dp"):
        assert full["medians"][side]["samples"] > 0 and full["medians"][side]["steps"] == full["timed_steps"]
    assert full["quick"] and full["privacy"]["delta"] == 1e-5


def _native_bench(name: str, tmp_path) -> tuple[dict, dict]:
    out = tmp_path / f"{name}-native.json"
    r = subprocess.run([sys.executable, "-m", "bench", name, "--family", "qwen2_5_vl", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), json.loads(out.read_text())


@pytest.mark.slow  # 74 s (sft) and 90 s (dpo) on the shared 2-core box at load ~4, 2026-11-30
@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_bench_native_qwen_vs_trl_quick(name, tmp_path):
    """`--family qwen2_5_vl`: the JSON line contract, and both sides doing the same work on a Qwen2.5-VL model
    whose images get different image-token counts."""

    head, full = _native_bench(name, tmp_path)
    assert head["vlmtrain_samples_per_s"] > 0 and head["peer_samples_per_s"] > 0
    assert head["ratio"] == pytest.approx(head["vlmtrain_samples_per_s"] / head["peer_samples_per_s"], rel=1e-12)
    bf = head["bf16"]
    assert bf["ratio"] == pytest.approx(bf["vlmtrain_samples_per_s"] / bf["peer_samples_per_s"], rel=1e-12)
    assert head["peer"].startswith("trl.") and head["family"] == "qwen2_5_vl"
    work = full["same_work"]
    assert work["start_weights"]["all_equal"] and work["start_weights"]["tensors"] > 0
    first = work["first_batch"]
    assert first["same_input_ids"] and first["same_image_grid_thw"]
    assert len(set(first["image_tokens_per_image"])) > 1  # dynamic resolution: counts differ across images
    assert first["differing_supervised_positions"]["vlmtrain_only"]["count"] == 0
    for side in ("vlmtrain", "trl"):
        prof = full["profile_first_batch"][side]
        assert prof["vision_forward_s"] > 0 and prof["lm_forward_s"] > 0
        assert prof["vision_forward_s"] + prof["lm_forward_s"] < prof["step_s"]
    assert all(0 <= s < 1 for s in head["data_wait_share"].values())
    if name == "sft":
        assert first["same_supervised_positions"]
        if head["packed_refused"] is None:  # native packing accepted: the packed arms ran
            assert head["packed_ratio"] == pytest.approx(
                head["vlmtrain_packed_samples_per_s"] / head["peer_samples_per_s"], rel=1e-12)
        else:
            assert head["packed_ratio"] is None and "pack" in head["packed_refused"]
            assert set(full["runs"]) == {"vlmtrain", "trl", "vlmtrain_bf16", "trl_bf16"}
    else:
        # TRL's DPO completions end with the template's newline after <|im_end|>, which it scores too
        assert set(first["differing_supervised_positions"]["peer_only"]["tokens"]) <= {"\n"}
        # vlmtrain as shipped: one shared-prefix row per pair, scoring the same tokens as its two-row layout
        shared = work["shared_rows_first_batch"]
        assert shared["rows"] == full["pairs_per_step"] and shared["shared_row_tokens"] < shared["two_row_tokens"]
        assert shared["scored"] == first["vlmtrain_supervised"]
        assert head["two_rows_ratio"] == pytest.approx(
            head["vlmtrain_two_rows_samples_per_s"] / head["peer_samples_per_s"], rel=1e-12)


@pytest.mark.slow  # 17 s (composed) and about 30 s (qwen2_5_vl) on the shared 2-core box, 2026-12-07
@pytest.mark.parametrize("family", [None, "qwen2_5_vl"])
def test_bench_grpo_vs_trl_quick(family, tmp_path):
    """`python -m bench grpo [--family qwen2_5_vl] --quick`: the JSON line contract and the per-step profile; both
    sides generate exactly max_completion_length tokens per completion (the bench raises otherwise)."""
    out = tmp_path / "grpo.json"
    r = subprocess.run([sys.executable, "-m", "bench", "grpo", "--quick", "--out", str(out),
                        *(["--family", family] if family else [])],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    head, full = json.loads(r.stdout.strip().splitlines()[-1]), json.loads(out.read_text())
    assert head["vlmtrain_steps_per_s"] > 0 and head["peer_steps_per_s"] > 0
    assert head["ratio"] == pytest.approx(head["vlmtrain_steps_per_s"] / head["peer_steps_per_s"], rel=1e-12)
    assert head["peer"].startswith("trl.GRPOTrainer") and full["num_generations"] == 8
    for side in ("vlmtrain_profile_s", "peer_profile_s"):
        prof = head[side]
        assert prof["generate"] > 0 and prof["loss"] > 0 and prof["dt"] > prof["generate"]


def test_bench_family_only_for_sft_dpo(capsys):
    from bench.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["anatomy", "--family", "qwen2_5_vl"])
    assert e.value.code == 2 and "--family applies to dpo, grpo and sft only" in capsys.readouterr().err
