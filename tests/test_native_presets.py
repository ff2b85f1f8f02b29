"""Real-size native presets (configs/models/*.yaml) build on `meta` and count like the published checkpoints.

The model is built by transformers itself (`AutoConfig.for_model` + `AutoModelForImageTextToText.from_config` under
`torch.device("meta")`): no weights, no download. Counts are compared with the published totals below.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForImageTextToText

MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"

# Published parameter totals and where they come from.
# - Qwen/Qwen2.5-VL-7B-Instruct: 8,292,166,656 — model.safetensors.index.json metadata.total_size 16,584,333,312
#   bytes in bf16 (= ×2; the same byte count is asserted for merged Qwen2.5-VL-7B checkpoints in public training
#   scripts); "8.29B params" on the model page.
# - google/gemma-3-4b-it: 4,300,079,472 — "4.30B params" on the model page; google/medgemma-4b-it (same architecture)
#   model.safetensors.index.json total_size 8,600,158,944 bytes in bf16 (= ×2).
# - HuggingFaceTB/SmolVLM-256M-Instruct: 256,484,928 — "256M params" on the model page; this exact figure is the hand
#   count of the published shapes (see the YAML's comment), independent of transformers.
# - llava-hf/llava-onevision-qwen2-7b-ov-hf: "8.03B params" on the model page (only the rounded figure was available
#   offline; the meta build gives 8,030,807,584).
PUBLISHED = {
    "qwen2.5-vl-7b": 8_292_166_656,
    "gemma-3-4b": 4_300_079_472,
    "smolvlm-256m-native": 256_484_928,
    "llava-onevision-7b": 8_030_000_000,
}
PRETRAINED = {
    "qwen2.5-vl-7b": ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    "gemma-3-4b": ("google/gemma-3-4b-it", "gemma3", "Gemma3ForConditionalGeneration"),
    "smolvlm-256m-native": ("HuggingFaceTB/SmolVLM-256M-Instruct", "idefics3", "Idefics3ForConditionalGeneration"),
    "llava-onevision-7b": (
        "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        "llava_onevision",
        "LlavaOnevisionForConditionalGeneration",
    ),
}
# Where each role lives in the transformers 5.23 classes (longest matching prefix wins: Qwen's merger sits inside
# `model.visual`), and the parameters that sit in none of the containers.
ROLE_PREFIXES = {
    "qwen2_5_vl": {
        "vision": ("model.visual.",),
        "connector": ("model.visual.merger.",),
        "llm": ("model.language_model.", "lm_head."),
    },
    "gemma3": {
        "vision": ("model.vision_tower.",),
        "connector": ("model.multi_modal_projector.",),
        "llm": ("model.language_model.", "lm_head."),
    },
    "idefics3": {
        "vision": ("model.vision_model.",),
        "connector": ("model.connector.",),
        "llm": ("model.text_model.", "lm_head."),
    },
    "llava_onevision": {
        "vision": ("model.vision_tower.",),
        "connector": ("model.multi_modal_projector.",),
        "llm": ("model.language_model.", "lm_head."),
    },
}
OUTSIDE_ROLES = {"qwen2_5_vl": set(), "gemma3": set(), "idefics3": set(), "llava_onevision": {"model.image_newline"}}


def _load(name: str) -> dict:
    return yaml.safe_load((MODELS / f"{name}.yaml").read_text())


@pytest.fixture(scope="module", params=sorted(PUBLISHED))
def built(request):
    name = request.param
    preset = _load(name)
    config = AutoConfig.for_model(preset["model_type"], **preset["config"])
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return name, preset, model


def _role(prefixes: dict[str, tuple[str, ...]], param_name: str) -> str | None:
    matches = [(len(p), role) for role, ps in prefixes.items() for p in ps if param_name.startswith(p)]
    return max(matches)[1] if matches else None


def test_preset_names_its_checkpoint_and_class(built):
    name, preset, model = built
    pretrained, model_type, class_name = PRETRAINED[name]
    assert preset["name"] == name
    assert preset["pretrained"] == pretrained
    assert preset["model_type"] == model_type
    assert type(model).__name__ == class_name
    assert all(p.device.type == "meta" for p in model.parameters())


def test_parameter_count_is_within_one_percent_of_the_published_checkpoint(built):
    name, _, model = built
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    assert abs(total - PUBLISHED[name]) <= 0.01 * PUBLISHED[name], f"{name}: {total:,} vs {PUBLISHED[name]:,}"


def test_roles_partition_every_parameter(built):
    _, preset, model = built
    prefixes = ROLE_PREFIXES[preset["model_type"]]
    for role_prefixes in prefixes.values():
        for prefix in role_prefixes:
            model.get_submodule(prefix.rstrip("."))  # the container exists at that path
    outside = {n for n, _ in model.named_parameters() if _role(prefixes, n) is None}
    assert outside == OUTSIDE_ROLES[preset["model_type"]]
    per_role = {role: 0 for role in prefixes}
    for n, p in model.named_parameters():
        if (role := _role(prefixes, n)) is not None:
            per_role[role] += p.numel()
    assert all(count > 0 for count in per_role.values())


def test_smolvlm_split_matches_the_hand_count():
    """SigLIP-B/16 @512 + pixel-shuffle ×4 projection + SmolLM2-135M-shaped LM (vocab 49280, untied head)."""
    preset = _load("smolvlm-256m-native")
    config = AutoConfig.for_model(preset["model_type"], **preset["config"])
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    d, v, layers, ff, vocab = 576, 768, 30, 1536, 49280
    vision = (3 * 16 * 16 * v + v) + 1024 * v + 12 * (4 * (v * v + v) + 2 * v * 3072 + 3072 + v + 4 * v) + 2 * v
    connector = (v * 16) * d
    lm = vocab * d + layers * (2 * d * d + 2 * d * 192 + 3 * d * ff + 2 * d) + d + vocab * d
    counts = {"vision": 0, "connector": 0, "llm": 0}
    for n, p in model.named_parameters():
        counts[_role(ROLE_PREFIXES["idefics3"], n)] += p.numel()
    assert counts == {"vision": vision, "connector": connector, "llm": lm}
    assert vision + connector + lm == 256_484_928


# Presets of the newer families: `vlmtrain describe --json` (the CLI's own function) against the published figure at
# the precision it is published in, and against transformers' own model built from the same YAML on meta. Sources in
# each YAML's header; "llm" where the published figure is the language model's (Qwen3.5-9B's model card, its GGUF).
NEWER = {
    "qwen3-vl-30b-a3b": ("Qwen/Qwen3-VL-30B-A3B-Instruct", "qwen3_vl_moe", "total", "31.07"),
    "llama-3.2-11b-vision": ("meta-llama/Llama-3.2-11B-Vision", "mllama", "total", "10.7"),
    "qwen3.5-9b": ("Qwen/Qwen3.5-9B", "qwen3_5", "llm", "8.95"),
    "qwen3.5-35b-a3b": ("Qwen/Qwen3.5-35B-A3B", "qwen3_5_moe", "total", "35"),
    "internvl3.5-8b": ("OpenGVLab/InternVL3_5-8B-HF", "internvl", "total", "8.5"),
    # exact published totals (keras-hub's presets / the hub's safetensors total / a transformers load log)
    "mistral-small-3.1-24b": ("mistralai/Mistral-Small-3.1-24B-Instruct-2503", "mistral3", "total", "24.011361280"),
    "llama-4-scout-17b-16e": ("meta-llama/Llama-4-Scout-17B-16E-Instruct", "llama4", "total", "108.641793536"),
    "paligemma2-3b-224": ("google/paligemma2-3b-pt-224", "paligemma", "total", "3.032242416"),
    "gemma-4-e4b": ("google/gemma-4-E4B-it", "gemma4", "total", "7.941100832"),  # as transformers loads it
    "gemma-4-26b-a4b": ("google/gemma-4-26B-A4B-it", "gemma4", "total", "25.805933872"),  # ditto (public load logs)
    "glm-4.1v-9b": ("zai-org/GLM-4.1V-9B-Thinking", "glm4v", "total", "10.3"),  # 20.6 GB of bf16 weights
    "lfm2-vl-1.6b": ("LiquidAI/LFM2-VL-1.6B", "lfm2_vl", "total", "1.6"),
}


@pytest.mark.parametrize("name", sorted(NEWER))
def test_newer_family_preset_describes_as_published(name, capsys):
    import json
    import re

    from vlmtrain.cli.main import main

    pretrained, model_type, part, published = NEWER[name]
    preset = _load(name)
    assert (preset["name"], preset["pretrained"], preset["model_type"]) == (name, pretrained, model_type)
    assert main(["describe", "--config", str(MODELS / f"{name}.yaml"), "--json"]) == 0
    params = json.loads(capsys.readouterr().out)["params"]
    decimals = len(published.partition(".")[2])
    assert f"{params[part] / 1e9:.{decimals}f}" == published, (name, params)
    config = AutoConfig.for_model(model_type, **preset["config"])
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert params["total"] == sum(p.numel() for p in model.parameters())
    # the count the YAML's header states is the one it builds
    stated = re.search(r"Built on `meta`:\s*([\d,]+\d)", (MODELS / f"{name}.yaml").read_text())
    assert stated and int(stated.group(1).replace(",", "")) == params["total"], name
