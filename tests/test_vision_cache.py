"""The frozen-tower feature cache (`trainer.vision_feature_cache_mb`, on in the align preset): from the second epoch
on, steps take their vision features from the cache, and training ends where it ends without the cache (to float
rounding: an image's features were computed within another batch)."""

from itertools import islice

import pytest
import torch

from conftest import ROOT, TINY


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    from vlmtrain.data.builtin import _captions
    from vlmtrain.data.writer import write_shards

    out = tmp_path_factory.mktemp("cap") / "captions"
    write_shards(islice(_captions(), 64), out, "test", shard_size=64)
    return out


def _fit(shards, run_dir, cache_mb):
    from safetensors.torch import load_file

    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.train.presets import with_preset
    from vlmtrain.train.runner import fit_stage

    stage = validate(StageConfig, with_preset({
        "name": "align", "preset": "align", "model": str(TINY),
        "data": {"train": [{"path": str(shards)}], "batch_size": 16, "num_workers": 0, "max_len": 64},
        "trainer": {"max_steps": 12, "log_every_n_steps": 4, "save_every_n_steps": 100,
                    "vision_feature_cache_mb": cache_mb}}))
    summary = fit_stage(stage, run_dir, base_dir=ROOT)
    return summary, load_file(run_dir / "model" / "model.safetensors")


def test_align_preset_turns_the_cache_on():
    from vlmtrain.train.presets import PRESETS

    assert PRESETS["align"]["trainer"]["vision_feature_cache_mb"] > 0


def test_cached_training_matches_uncached(captions, tmp_path):
    s_on, w_on = _fit(captions, tmp_path / "on", 64)
    s_off, w_off = _fit(captions, tmp_path / "off", 0)
    c = s_on["vision_feature_cache"]
    assert c["images"] == 64 and c["miss_steps"] == 4 and c["hit_steps"] == 8  # 3 epochs of 4 steps
    assert "vision_feature_cache" not in s_off
    assert w_on.keys() == w_off.keys()
    for k in w_on:
        assert torch.allclose(w_on[k], w_off[k], atol=1e-5, rtol=1e-4), k
    assert s_on["final_loss"] == pytest.approx(s_off["final_loss"], abs=1e-4)
