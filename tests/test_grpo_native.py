"""GRPO on native transformers families (Qwen2.5-VL: 3-D mRoPE; Gemma 3: bidirectional image blocks, sliding
layers; Qwen3-VL, Gemma 4, InternVL, GLM-4.1V, Mistral 3): G completions sampled by the family's own `generate` from left-padded
prompts of different lengths, each image encoded once per prompt, then scored on shared-prefix rows. Every
completion's per-token log-probs equal (a) transformers' own forward on prompt + completion alone, with its own mRoPE
ids for the whole sequence, and (b) the log-probs `generate` itself sampled from (its KV cache and its rope deltas):
so the completion positions continue the prompt's in both. A 2-step `vlmtrain fit` grpo stage on a tiny native
checkpoint writes the rl block (Qwen2.5-VL; Gemma 4 and Mistral 3 from folders carrying their own chat template)."""

from __future__ import annotations

import copy
import json
import os
import subprocess

import pytest
import torch
import yaml

from native_fixtures import IMG, assistant, download_folder, image, model_config, user

# Qwen's mRoPE and Gemma 3's image blocks, Qwen3-VL's deepstack features, Gemma 4's pooled patches beside a frozen audio
# tower, InternVL's tiles, GLM-4.1V's own rope index, Mistral 3's Pixtral grids; the last four from a folder with its
# own unmarked template
FAMILIES = ("qwen2_5_vl", "gemma3", "qwen3_vl", "gemma4", "internvl", "glm4v", "mistral3")
G = 3
PROMPTS = [  # (record, images): prompts of different lengths with 1, 2 and 0 images
    ({"id": "one", "kind": "chat", "messages": [user(IMG, "what digit is this"), assistant("seven")]},
     [image(40, 30, 1)]),
    ({"id": "two", "kind": "chat", "messages": [user(IMG, IMG, "compare the two of them please"),
                                                assistant("same")]}, [image(64, 64, 2), image(30, 50, 3)]),
    ({"id": "text", "kind": "chat", "messages": [user("hello"), assistant("hi")]}, []),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("grpo-native")


@pytest.fixture(scope="module", params=FAMILIES)
def rollout(request, root):
    """(model in float64, prompt samples, batch, image tensors, completions [r][G], generate's token log-probs,
    tower calls during generation)."""
    from vlmtrain.data.batching import collate
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.data.prompts import PromptEncoder
    from vlmtrain.model import build_model
    from vlmtrain.train.grpo.generate import SamplingSettings
    from vlmtrain.train.grpo.sampler import completion_keys
    from vlmtrain.train.grpo.native import (encode_images, image_inputs, native_stop_ids, prompt_token_extras,
                                            sample_native_groups)

    fam = request.param
    bundle = build_model(model_config(download_folder(root, fam)))
    m = copy.deepcopy(bundle.model).double().eval()  # float64: the comparison sees the layout, not rounding
    enc = PromptEncoder(encoder_for(bundle, 512), 6)
    samples = [enc(r, ims) for r, ims in PROMPTS]
    pad = bundle.tokenizer.pad_token_id
    batch = collate(samples, pad)
    prompts = [s["input_ids"] for s in samples]
    images = image_inputs(batch, dtype=torch.float64)
    heads, tower = [], []
    h1 = m.hf.lm_head.register_forward_hook(lambda mod, a, out: heads.append(out[:, -1].detach()))
    from vlmtrain.model.native.families import FAMILIES as TABLE

    # the tower's first part, which runs once per call of the tower
    vision = m.hf.get_submodule(next(iter(TABLE[fam].roles["vision"].values())))
    h2 = vision.register_forward_pre_hook(lambda mod, a: tower.append(1))
    try:
        with torch.no_grad():
            feats = encode_images(m, images)
            groups = sample_native_groups(m, prompts, prompt_token_extras(batch, prompts), images, feats, G,
                                          SamplingSettings(max_completion_length=6), pad,
                                          native_stop_ids(encoder_for(bundle), bundle.tokenizer,
                                                          m.hf.generation_config.eos_token_id),
                                          completion_keys(0, 0, [s["id"] for s in samples], G))
    finally:
        h1.remove()
        h2.remove()
    cap = getattr(m.llm.config, "final_logit_softcapping", None)
    steps = torch.stack(heads, 1)  # [r*G, steps, v]: the logits each sampled token was drawn from
    steps = torch.tanh(steps / cap) * cap if cap else steps
    gen_logps = steps.log_softmax(-1)
    return m, samples, batch, images, feats, groups, gen_logps, len(tower)


def _alone(m, sample: dict, completion: list[int]) -> torch.Tensor:
    """Per-token log-probs of one completion after its prompt, by transformers' own full forward on that sequence
    (its own 3-D mRoPE ids, masks and image merging)."""
    p = len(sample["input_ids"])
    ids = torch.tensor([sample["input_ids"] + completion])
    kw = {k: torch.tensor([v + [0] * len(completion)]) for k, v in sample["token_extras"].items()}
    if sample["pixel_values"] is not None:
        kw["pixel_values"] = sample["pixel_values"].double()
        kw |= {k: v.double() if v.is_floating_point() else v for k, v in sample["image_extras"].items()}
    logits = m.hf(input_ids=ids, **kw).logits[0, p - 1:p - 1 + len(completion)]
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_group_rows_score_like_each_completion_alone_and_like_generate(rollout):
    from vlmtrain.train.grpo.native import native_group_logps, prompt_token_extras
    from vlmtrain.train.grpo.scoring import collate_groups

    m, samples, batch, images, feats, groups, gen_logps, tower_calls = rollout
    assert tower_calls == 1  # the images encoded once for the 3 × G completions (generate reused the features)
    flat = [c for g in groups for c in g]
    assert len(flat) == len(samples) * G and all(flat) and any(len(c) > 1 for c in flat)
    prompts = [s["input_ids"] for s in samples]
    rows = collate_groups(prompts, groups, 0, m.image_token_id, prompt_token_extras(batch, prompts))
    with torch.no_grad():
        by_pixels, mask = native_group_logps(m, rows, images)
        by_features, _ = native_group_logps(m, rows, images, feats)
    assert rows.input_ids.shape[0] == len(samples)  # one row per prompt
    torch.testing.assert_close(by_features, by_pixels, rtol=0, atol=1e-9)
    for k, c in enumerate(flat):
        with torch.no_grad():
            alone = _alone(m, samples[k // G], c)
        torch.testing.assert_close(by_pixels[k, :len(c)], alone, rtol=0, atol=1e-5)
        drawn = gen_logps[k, :len(c)].gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        if m.model_type == "glm4v" and len(PROMPTS[k // G][1]) == 2:
            # transformers 5.23's GLM-4.1V generate (pixels or features alike) continues the two-image prompt of this
            # batch at other positions than its own full forward gives (log-probs up to 0.07 apart); scoring follows
            # the full forward, and sampling is what generate does
            assert not torch.allclose(by_pixels[k, :len(c)], drawn, rtol=0, atol=1e-5)
            continue
        torch.testing.assert_close(by_pixels[k, :len(c)], drawn, rtol=0, atol=1e-5)
        assert mask[k].sum() == len(c)


def test_native_families_with_a_reason_refuse_grpo_in_one_line():
    from types import SimpleNamespace

    from vlmtrain.config.stage import StageConfig
    from vlmtrain.model.native.families import FAMILIES as TABLE
    from vlmtrain.train.native import family_refusals, native_refusals
    from vlmtrain.train.presets import with_preset

    stage = StageConfig(**with_preset({"name": "g", "preset": "grpo", "data": {"train": [{"builtin": "digits-qa"}]},
                                       "rewards": [{"fn": "accuracy"}]}))
    assert native_refusals(stage) == []
    fam = TABLE["mllama"]
    model = SimpleNamespace(family=fam, model_type="mllama", llm=SimpleNamespace(config=SimpleNamespace()))
    assert family_refusals(stage, model) == [f"objective: grpo is not available for mllama: {fam.shared_prefix}"]


@pytest.mark.slow  # a `vlmtrain fit` process per family
@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma4", "mistral3"])  # the last two: folders with their own template
def test_fit_two_steps_on_a_native_checkpoint_writes_the_rl_block(root, tmp_path, family):
    from shard_fixtures import png_bytes, write_shards

    samples = [({"id": f"r{i}", "kind": "chat", "messages": [user(IMG, f"what digit is {i}"), assistant(str(i))]},
                [png_bytes(i)]) for i in range(4)]
    write_shards(tmp_path / "shards", samples, per_shard=4)
    stage = {"name": "grpo", "preset": "grpo", "model": {"pretrained": str(download_folder(root, family))},
             "rewards": [{"fn": "accuracy"}],
             "grpo": {"num_generations": 2, "max_completion_length": 3, "beta": 0.04, "log_completions_every": 1},
             "data": {"train": [{"path": str(tmp_path / "shards")}], "batch_size": 2, "num_workers": 0,
                      "max_len": 256, "shuffle_buffer": 1},
             "trainer": {"max_steps": 2}}
    (tmp_path / "stage.yaml").write_text(yaml.safe_dump(stage))
    from test_grpo_stage import VLMTRAIN

    r = subprocess.run([*VLMTRAIN, "fit", "--config", "stage.yaml", "--out", "run"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    comps = [json.loads(ln) for ln in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and [r["step"] for r in rows] == [1, 2]
    assert len(comps) == 2 * 2 * 2 and all(c["rewards"]["accuracy"] in (0.0, 1.0) for c in comps)
    rl = summary["rl"]
    assert rl["steps_logged"] == 2 and rl["kl"] is not None and rl["kl"] >= 0
    assert 1 <= rl["completion_len_mean"] <= 3 and rl["generate_time_share"] > 0


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "llava"])
def test_native_prompts_carry_the_processors_resize_for_box_rewards(root, family):
    """`image_resize` of a native prompt: Qwen2.5-VL's is transformers' own `smart_resize` of the image; Gemma 3's
    the processor's fixed size; LLaVA's CLIP center-crops (no rescaled whole image: no column). `box_iou` maps a
    box answered in that frame back to the original pixels."""
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.data.prompts import PromptEncoder
    from vlmtrain.model import build_model
    from vlmtrain.train.grpo.reward_fns import box_iou

    bundle = build_model(model_config(download_folder(root, family)))
    rec = {"id": "b", "kind": "chat", "messages": [user(IMG, "where is the digit"), assistant("[10, 10, 40, 30]")]}
    x = PromptEncoder(encoder_for(bundle, 4096), 4)(rec, [image(97, 61, 1)])
    resize = x["columns"].get("image_resize")
    ip = bundle.processor.image_processor
    if family == "llava":
        assert resize is None and ip.do_center_crop
        return
    if family == "qwen2_5_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        h, w = smart_resize(61, 97, factor=ip.patch_size * ip.merge_size, min_pixels=ip.size["shortest_edge"],
                            max_pixels=ip.size["longest_edge"])
    else:
        h, w = ip.size["height"], ip.size["width"]
    assert resize == {"original": [97, 61], "resized": [w, h]}
    sx, sy = w / 97, h / 61  # the original box [10, 10, 40, 30] as the model sees it
    seen = f"[{10 * sx:.3f}, {10 * sy:.3f}, {40 * sx:.3f}, {30 * sy:.3f}]"
    score = box_iou([[{"role": "assistant", "content": seen}]], boxes=[[10, 10, 40, 30]], image_resize=[resize])
    assert score[0] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl"])
def test_stop_ids_are_special_tokens_never_a_reply_s_text(root, family):
    """LLaVA's official templates put plain text after a reply (a space; LLaVA-NeXT's literal `<\\s> `): taken as a
    stop, it would end every completion at its first space. The stops are the special tokens only."""
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.model import build_model
    from vlmtrain.train.grpo.native import native_stop_ids

    bundle = build_model(model_config(download_folder(root, family)))
    tok = bundle.tokenizer
    stops = native_stop_ids(encoder_for(bundle), tok, bundle.model.hf.generation_config.eos_token_id)
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    assert stops and set(stops) <= special
    assert not set(stops) & set(tok(" seven or one <", add_special_tokens=False)["input_ids"])
