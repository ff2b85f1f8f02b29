"""A grpo stage on 2 CPU ranks (gloo) against one process with the same global batch of prompts: every rank
completes its own prompts, each completion sampled from its own key (train/grpo/sampler.py), so the ranks together
must sample the completions one process samples, and the losses, the logged rewards and the final weights must agree
(≤1e-5). In the first step rank 0's prompts are text-only while rank 1's have images (under fsdp its tower runs a
blank image so the gathers pair up)."""

import json

import pytest
import torch
import yaml

from conftest import TINY
from shard_fixtures import chat_record, png_bytes, write_shards
from test_distributed import plain, torchrun, weights
from warm_torchrun import WARM

pytestmark = pytest.mark.slow
STEPS = 3
REWARDS = "def chars(completions, **kw):\n    return [float(len(c[0]['content'])) for c in completions]\n"


@pytest.fixture(scope="module")
def grpo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo-dist")
    samples = []
    for i in range(16):
        # stride split: rank r takes [2r, 2r + 2) of each global batch of 4, so rank 0's first prompts are text-only
        n = 0 if i in (0, 1) else 1
        samples.append((chat_record(i, n), [png_bytes(i)] * n))
    write_shards(root / "shards", samples, per_shard=8)
    (root / "dist_rewards.py").write_text(REWARDS)
    # a short SFT first, so that completions end at different lengths (the per-rank token counts differ)
    sft = {"name": "sft", "preset": "sft", "model": str(TINY),
           "data": {"train": [{"path": str(root / "shards")}], "batch_size": 4, "num_workers": 0, "max_len": 64},
           "optim": {"lr": 3e-3, "schedule": "constant", "warmup_ratio": 0.0},
           "trainer": {"max_steps": 40, "log_every_n_steps": 10, "save_every_n_steps": 100}}
    (root / "sft.yaml").write_text(yaml.safe_dump(sft))
    r = plain("fit", "--config", "sft.yaml", "--out", "sft", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    stage = {"name": "grpo", "preset": "grpo", "model": str(TINY), "init_from": str(root / "sft" / "model"),
             "rewards": [{"fn": "dist_rewards:chars"}],
             "grpo": {"num_generations": 3, "max_completion_length": 6, "beta": 0.04, "log_completions_every": 1},
             "data": {"train": [{"path": str(root / "shards")}], "batch_size": 4, "num_workers": 0, "max_len": 64,
                      "split": "stride", "shuffle_buffer": 1},
             "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
             "trainer": {"max_steps": STEPS, "log_every_n_steps": 1, "save_every_n_steps": 10}}
    (root / "stage.yaml").write_text(yaml.safe_dump(stage))
    r = plain("fit", "--config", "stage.yaml", "--out", "one", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def _rows(run) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


def _completions(run) -> list[tuple]:
    return sorted((c["step"], c["id"], c["completion"], c["reward"])
                  for c in map(json.loads, (run / "completions.jsonl").read_text().splitlines()))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_grpo_on_two_ranks_equals_one_process(grpo_data, strategy):
    r = torchrun(2, "fit", "--config", "stage.yaml", "--out", strategy, "--strategy", strategy, "data.batch_size=2",
                 cwd=grpo_data)
    assert r.returncode == 0, r.stderr[-4000:]
    one, two = grpo_data / "one", grpo_data / strategy
    # the same completions of the same prompts, every rank's written once
    assert _completions(two) == _completions(one) and len(_completions(one)) == STEPS * 4 * 3
    a, b = _rows(one), _rows(two)
    assert len(a) == len(b) == STEPS
    for key in ("loss", "rl/reward", "rl/reward_std", "rl/kl", "rl/completion_len_mean", "rl/zero_spread_fraction"):
        assert max(abs(x[key] - y[key]) for x, y in zip(a, b)) <= 1e-5, (key, [x[key] for x in a], [y[key] for y in b])
    assert any(row["rl/reward_std"] > 0 for row in a)  # the rewards have spread: the steps have a gradient
    assert all(1 < row["rl/completion_len_mean"] < 6 for row in a)  # some stop early: token counts differ
    wa, wb = weights(one), weights(two)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-5
    s = json.loads((two / "summary.json").read_text())
    assert s["steps"] == STEPS and s["samples"] == STEPS * 4 and s["rl"]["reward_mean"] > 0


ITERATIONS = ["grpo.num_iterations=2", "trainer.max_steps=6", "trainer.save_every_n_steps=1"]


@pytest.fixture(scope="module")
def iter_ref(grpo_data):
    """The uninterrupted one-process run with num_iterations 2, 6 steps."""
    ref = plain("fit", "--config", "stage.yaml", "--out", "iter-ref", *ITERATIONS, cwd=grpo_data)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return grpo_data / "iter-ref"


def test_sigkill_between_a_rollouts_iterations_then_resume_is_bit_identical(grpo_data, iter_ref):
    """num_iterations 2 (steps 1-2 train on window 1's rollout, 3-4 on window 2's, ...): the process is killed while
    step 4's checkpoint is being written, so the one it resumes from is step 3's, taken between window 2's two
    iterations. It carries that rollout, and the resumed run trains step 4 on it: weights bit-identical to the
    uninterrupted run, the same losses and the same completions."""
    import os

    from vlmtrain.train.checkpoint_io import read_checkpoint, resolve_last

    over = ITERATIONS
    env = {**os.environ, "VLMTRAIN_KILL_AT": "checkpoint_write#4"}
    killed = WARM.run(0, ["fit", "--config", "stage.yaml", "--out", "iter-killed", *over], env=env, cwd=grpo_data)
    assert killed.returncode == -9, killed.stderr[-3000:]
    ck = read_checkpoint(resolve_last(grpo_data / "iter-killed" / "checkpoints" / "last.ckpt"))
    assert ck["global_step"] == 3 and ck["vlmtrain"]["grpo_rollout"]["iteration"] == 0
    res = plain("fit", "--config", "stage.yaml", "--out", "iter-killed", "--resume", *over, cwd=grpo_data)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = iter_ref, grpo_data / "iter-killed"
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["loss"] for r in _rows(a)] == [r["loss"] for r in _rows(b)]
    assert _completions(a) == _completions(b) and {c[0] for c in _completions(a)} == {1, 3, 5}


def test_two_ranks_killed_between_iterations_resume_each_ranks_rollout(grpo_data, iter_ref):
    """The same kill under ddp: step 3's checkpoint holds both ranks' rollouts (gathered), each rank takes its own
    back, and the 2-rank run ends where the one-process run does (≤1e-5); another world size is refused."""
    import os

    over = [*ITERATIONS, "data.batch_size=2"]
    env = {**os.environ, "VLMTRAIN_KILL_AT": "checkpoint_write#4"}
    args = ["fit", "--config", "stage.yaml", "--out", "iter-ddp", "--strategy", "ddp", *over]
    killed = torchrun(2, *args, env=env, cwd=grpo_data)
    assert killed.returncode != 0
    refused = plain(*args[:-1], "--resume", cwd=grpo_data)  # one process, no strategy: the rollout is 2 ranks'
    assert refused.returncode == 1 and "generated by 2 ranks; resume it with 2 ranks, not 1" in refused.stderr
    res = torchrun(2, *args, "--resume", cwd=grpo_data)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _rows(iter_ref), _rows(grpo_data / "iter-ddp")
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) <= 1e-5 and len(a) == len(b) == 6
    wa, wb = weights(iter_ref), weights(grpo_data / "iter-ddp")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-5


@pytest.fixture(scope="module")
def native_data(tmp_path_factory):
    """A tiny Qwen2.5-VL checkpoint folder, 8 prompts (rank 0's first two text-only), and the one-process run."""
    from native_fixtures import IMG, assistant, download_folder, user

    root = tmp_path_factory.mktemp("grpo-dist-native")
    samples = []
    for i in range(8):
        n = 0 if i in (0, 1) else 1
        samples.append(({"id": f"r{i}", "kind": "chat", "messages": [user(*[IMG] * n, f"what digit is {i}"),
                                                                     assistant(str(i))]}, [png_bytes(i)] * n))
    write_shards(root / "shards", samples, per_shard=8)
    (root / "dist_rewards.py").write_text(REWARDS)
    stage = {"name": "grpo", "preset": "grpo", "model": {"pretrained": str(download_folder(root, "qwen2_5_vl"))},
             "rewards": [{"fn": "dist_rewards:chars"}],
             "grpo": {"num_generations": 2, "max_completion_length": 3, "beta": 0.04, "log_completions_every": 1},
             "data": {"train": [{"path": str(root / "shards")}], "batch_size": 4, "num_workers": 0, "max_len": 256,
                      "split": "stride", "shuffle_buffer": 1},
             "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
             "trainer": {"max_steps": 2, "log_every_n_steps": 1, "save_every_n_steps": 10}}
    (root / "stage.yaml").write_text(yaml.safe_dump(stage))
    r = plain("fit", "--config", "stage.yaml", "--out", "one", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_native_grpo_on_two_ranks_equals_one_process(native_data, strategy):
    """A native family's generate, image features and blank image on 2 ranks (under fsdp: registered as forward
    methods, so the sharded weights are gathered for them) sample and train what one process does."""
    r = torchrun(2, "fit", "--config", "stage.yaml", "--out", strategy, "--strategy", strategy, "data.batch_size=2",
                 cwd=native_data)
    assert r.returncode == 0, r.stderr[-4000:]
    one, two = native_data / "one", native_data / strategy
    assert _completions(two) == _completions(one) and len(_completions(one)) == 2 * 4 * 2
    a, b = _rows(one), _rows(two)
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) <= 1e-5 and len(a) == len(b) == 2
    assert any(row["rl/reward_std"] > 0 for row in a)
    wa, wb = weights(one), weights(two)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-5


def test_a_rank_left_without_prompts_skips_the_step_on_every_rank(tmp_path):
    """2 ranks × 2 prompts: every prompt of rank 1's first slice is over-length (rejected), so the loader hands it a
    placeholder batch with no prompt. Such a step is skipped on both ranks, with a warning, instead of one rank
    waiting for the other's collectives; training goes on with the next prompts."""
    long_q = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " ".join(["digit"] * 80)}]}
    samples = []
    for i in range(8):
        rec = chat_record(i, 1)
        if i in (2, 3):
            rec["messages"][0] = long_q
        samples.append((rec, [png_bytes(i)]))
    write_shards(tmp_path / "shards", samples, per_shard=8)
    (tmp_path / "dist_rewards.py").write_text(REWARDS)
    stage = {"name": "grpo", "preset": "grpo", "model": str(TINY), "rewards": [{"fn": "dist_rewards:chars"}],
             "grpo": {"num_generations": 2, "max_completion_length": 3},
             "data": {"train": [{"path": str(tmp_path / "shards")}], "batch_size": 2, "num_workers": 0,
                      "max_len": 64, "split": "stride", "shuffle_buffer": 1},
             "trainer": {"max_steps": 2, "log_every_n_steps": 1}}
    (tmp_path / "stage.yaml").write_text(yaml.safe_dump(stage))
    r = torchrun(2, "fit", "--config", "stage.yaml", "--out", "run", "--strategy", "ddp", cwd=tmp_path, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "a step's prompts skipped on every rank (1 so far)" in r.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["skipped"].get("over_length", 0) >= 2
