import json
import subprocess

import pytest

from conftest import CONFIGS, TINY, VLMTRAIN

LLAVA_15_7B_HF_PARAMS = 7_063_427_072  # llava-hf/llava-1.5-7b-hf, as published


def describe_json(config, *extra):
    r = subprocess.run([*VLMTRAIN, "describe", "--config", str(config), "--json", *extra],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout  # exactly one JSON object on stdout
    return json.loads(lines[0])


def test_describe_llava_7b_on_meta_matches_real_count():
    out = describe_json(CONFIGS / "models" / "llava-1.5-7b.yaml")
    assert set(out) == {"params", "image_tokens"}
    assert set(out["params"]) == {"vision", "connector", "llm", "total"}
    p = out["params"]
    assert abs(p["total"] - LLAVA_15_7B_HF_PARAMS) / LLAVA_15_7B_HF_PARAMS < 0.01
    assert p["total"] == p["vision"] + p["connector"] + p["llm"]
    assert p["connector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # mlp2x_gelu, by hand
    assert out["image_tokens"] == 576  # (336 / 14)²


def test_describe_smolvlm_preset():
    out = describe_json(CONFIGS / "models" / "smolvlm-256m.yaml")
    assert out["image_tokens"] == 64  # (512/16)² / 4²
    assert out["params"]["connector"] == 768 * 16 * 576  # pixel shuffle ×4, bias-free projection


def test_describe_tiny_counts_equal_a_real_build(tiny):
    from vlmtrain.model import count_params

    out = describe_json(TINY)
    assert out["params"] == count_params(tiny.model)
    assert out["image_tokens"] == tiny.model.num_image_tokens


@pytest.mark.parametrize("override, tokens", [("connector.name=linear", 16), ("vision.select=all", 17)])
def test_describe_overrides(override, tokens):
    assert describe_json(TINY, override)["image_tokens"] == tokens
