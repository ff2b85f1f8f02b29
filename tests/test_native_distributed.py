"""Native families under torchrun (2 CPU ranks, gloo, DDP): equal to one process with the same global batch
(per-step losses and final weights ≤1e-5), on shards mixing text-only samples with one- and two-image ones."""

import pytest
import yaml

from native_fixtures import checkpoint
from shard_fixtures import cycled_shards
from test_distributed import STEPS, assert_same_run, plain, torchrun

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_native_ddp_two_ranks_equal_one_process(tmp_path, family):
    cycled_shards(tmp_path / "shards", 48, per_shard=8)
    cfg = {"name": "sft", "preset": "sft", "model": {"pretrained": str(checkpoint(tmp_path / "ck", family))},
           "data": {"train": [{"path": str(tmp_path / "shards")}], "batch_size": 4, "num_workers": 1,
                    "max_len": 256, "split": "stride", "shuffle_buffer": 8},
           "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
           "trainer": {"max_steps": STEPS, "save_every_n_steps": 2, "log_every_n_steps": 1}}
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump(cfg))
    cfg["data"]["batch_size"] = 2  # two ranks × 2 = the single process's 4
    cfg["trainer"]["strategy"] = "ddp"
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump(cfg))
    r = plain("fit", "--config", str(one), "--out", str(tmp_path / "ref"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(2, "fit", "--config", str(two), "--out", str(tmp_path / "ddp"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(tmp_path / "ref", tmp_path / "ddp")
