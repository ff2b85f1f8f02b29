"""DPO's shared-prompt layout (`collate_preference_shared`): one row per pair, prompt and images computed once. It
must score every sequence exactly as the classic layout (two padded rows per pair) does, and give the same DPO
gradients — for Llama and Qwen2, with 0/1/2 images, multi-turn prompts, answers that share their first tokens, and
one answer a prefix of the other."""

import copy

import pytest
import torch

from conftest import TINY, TINY_SIGLIP, tiny_bundle
from shard_fixtures import png_bytes
from vlmtrain.data.batching import collate_preference, collate_preference_shared
from vlmtrain.data.encode import decode_image, encoder_for


def _t(x):
    return {"type": "text", "text": x}


def records():
    img = {"type": "image"}
    prompts = [
        [{"role": "user", "content": [img, _t("What digit is this?")]}],
        [{"role": "user", "content": [img, img, _t("Compare them.")]},
         {"role": "assistant", "content": [_t("two and three")]}, {"role": "user", "content": [_t("Sum?")]}],
        [{"role": "user", "content": [_t("Say a number.")]}],  # text only
        [{"role": "user", "content": [img, _t("Name it.")]}],
    ]
    answers = [("seven", "one"), ("five in total", "five or six"), ("nine", "nine nine nine"),
               ("a handwritten four", "a handwritten nine")]
    out = []
    for i, (p, (c, r)) in enumerate(zip(prompts, answers)):
        n_img = sum(1 for m in p for part in m["content"] if part.get("type") == "image")
        rec = {"id": f"p{i}", "kind": "preference", "prompt": p,
               "chosen": [{"role": "assistant", "content": [_t(c)]}],
               "rejected": [{"role": "assistant", "content": [_t(r)]}]}
        out.append((rec, [png_bytes(10 * i + k) for k in range(n_img)]))
    return out


@pytest.fixture(scope="module", params=[TINY, TINY_SIGLIP], ids=["llama", "qwen2"])
def setup(request):
    bundle = tiny_bundle(request.param)
    enc = encoder_for(bundle, 512)
    samples = [enc(rec, [decode_image(b, rec["id"]) for b in imgs]) for rec, imgs in records()]
    pad, tok = bundle.tokenizer.pad_token_id, bundle.model.image_token_id
    return bundle, samples, collate_preference(samples, pad), collate_preference_shared(samples, pad, tok)


def _module(bundle):
    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.train.module import VLMModule
    from vlmtrain.train.presets import with_preset

    stage = validate(StageConfig, with_preset({"name": "dpo", "preset": "dpo", "model": str(TINY),
                                               "data": {"train": [{"builtin": "digits-pref"}]}}))
    return VLMModule(bundle, stage)


def test_layout_is_shorter_and_images_appear_once(setup):
    _, samples, classic, shared = setup
    assert shared["input_ids"].shape[0] == len(samples) == classic["input_ids"].shape[0] // 2
    assert shared["pixel_values"].shape[0] * 2 == classic["pixel_values"].shape[0]
    assert int(shared["attention_mask"][:, 0].diagonal(dim1=-2, dim2=-1).sum()) < int(classic["attention_mask"].sum())


def test_shared_rows_score_every_sequence_like_separate_rows(setup):
    bundle, _, classic, shared = setup
    m = _module(bundle)
    model = bundle.model.eval()
    with torch.no_grad():
        a, na = m._pair_logps(model, classic, m._dpo_inputs(classic))
        b, nb = m._pair_logps(model, shared, m._dpo_inputs(shared))
    assert torch.equal(na, nb) and (na > 0).all()
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a, b)


def test_dpo_gradients_equal_across_layouts(setup):
    bundle, _, classic, shared = setup
    grads = []
    for batch in (classic, shared):
        model = copy.deepcopy(bundle.model).train()
        for p in model.parameters():
            p.requires_grad_(True)
        m = _module(bundle)
        m.model = model
        m._ref = [copy.deepcopy(bundle.model).eval().requires_grad_(False)]
        with torch.no_grad():  # a policy that differs from the reference, so the loss has a gradient
            for p in model.llm.parameters():
                p.add_(0.01 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
        stats = m.accumulate_dpo([batch])
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, stats))
    (ga, sa), (gb, sb) = grads
    assert sa["loss"] == pytest.approx(sb["loss"], abs=1e-6) and sa["pairs"] == sb["pairs"] == 4
    assert ga.keys() == gb.keys() and len(ga) > 10
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-6, rtol=1e-4), n


def test_image_tokens_after_the_prefix_fall_back_to_the_classic_layout(setup):
    bundle, samples, _, _ = setup
    x = copy.deepcopy(samples[0])
    tok = bundle.model.image_token_id
    x["rejected"]["input_ids"] = x["rejected"]["input_ids"][:-1] + [tok]
    assert collate_preference_shared([x], bundle.tokenizer.pad_token_id, tok) is None
