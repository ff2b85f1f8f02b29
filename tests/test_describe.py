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


# Published totals of the checkpoints the native presets describe (sources in tests/test_native_presets.py):
# safetensors total_size / 2 (bf16) for Qwen2.5-VL-7B-Instruct and Gemma-3-4B (MedGemma-4B's index), SmolVLM's
# hand count from its shapes, and llava-onevision-qwen2-7b-ov's model card figure (8.03 B).
NATIVE_PRESETS = {"qwen2.5-vl-7b": 8_292_166_656, "gemma-3-4b": 4_300_079_472,
                  "smolvlm-256m-native": 256_484_928, "llava-onevision-7b": 8_030_000_000}


@pytest.mark.parametrize("name", sorted(NATIVE_PRESETS))
def test_describe_native_presets_on_meta_match_published_counts(name, capsys):
    from vlmtrain.cli.main import main

    assert main(["describe", "--config", str(CONFIGS / "models" / f"{name}.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    assert set(out) == {"params", "image_tokens"} and set(out["params"]) == {"vision", "connector", "llm", "total"}
    p = out["params"]
    assert abs(p["total"] - NATIVE_PRESETS[name]) / NATIVE_PRESETS[name] < 0.01
    assert p["total"] == p["vision"] + p["connector"] + p["llm"]
    assert out["image_tokens"] > 0
