"""trainer.compile (train/compile.py): compiled decoder layers train like eager ones — same per-step losses and
final weights up to float reordering — on padded and on packed (varying-length, block-masked) batches."""

import json
import subprocess

import pytest
import yaml

from conftest import TINY, VLMTRAIN
from shard_fixtures import cycled_shards

pytestmark = pytest.mark.slow  # inductor compiles C++ kernels on first use (~30 s here)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    cycled_shards(root / "shards", 40, per_shard=10, max_turns=3)
    return root


def fit(root, name, mode, compile_):
    cfg = {"name": "sft", "preset": "sft", "model": str(TINY),
           "data": {"train": [{"path": str(root / "shards")}], "batch_size": 4, "num_workers": 0, "max_len": 128,
                    "mode": mode, "pack_len": 160},
           "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
           "trainer": {"max_steps": 5, "log_every_n_steps": 1, "compile": compile_}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([*VLMTRAIN, "fit", "--config", str(path), "--out", str(root / name)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.mark.parametrize("mode", ["plain", "pack"])
def test_compiled_layers_train_like_eager(shards, mode):
    from safetensors.torch import load_file

    fit(shards, f"eager-{mode}", mode, False)
    r = fit(shards, f"compiled-{mode}", mode, True)
    assert "torch.compile: 2 LLM decoder layers" in r.stderr
    a, b = losses(shards / f"eager-{mode}"), losses(shards / f"compiled-{mode}")
    assert len(a) == len(b) == 5 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, (a, b)
    wa = load_file(shards / f"eager-{mode}" / "model" / "model.safetensors")
    wb = load_file(shards / f"compiled-{mode}" / "model" / "model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-4


def test_compile_is_refused_where_untested(shards):
    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.errors import ConfigError

    cfg = {"name": "sft", "preset": "sft", "model": str(TINY), "data": {"train": [{"path": str(shards / "shards")}]},
           "trainer": {"compile": True, "strategy": "fsdp"}}
    with pytest.raises(ConfigError, match="trainer.compile: tested with single and ddp; not with fsdp"):
        validate(StageConfig, cfg)
