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

pytestmark = pytest.mark.slow
STEPS = 3
REWARDS = "def chars(completions, **kw):\n    return [float(len(c[0]['content'])) for c in completions]\n"


@pytest.fixture(scope="module")
def grpo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo-dist")
    samples = []
    for i in range(16):
        n = 0 if i in (0, 2) else 1  # stride split, 2 ranks × 2 prompts: rank 0's first prompts are text-only
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
