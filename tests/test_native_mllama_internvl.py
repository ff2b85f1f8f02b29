"""Llama 3.2 Vision (`mllama`) and InternVL (`internvl`) against transformers' own model and processor.

One tiny checkpoint per pytest run (a `save_pretrained` folder, as a user's download would be; its cross-attention
gates are non-zero, as in a trained checkpoint, so the images really reach the LM). What is checked: vlmtrain's
forward equals transformers' logits exactly on a batch with images; the collator builds the batch transformers'
processor builds; text-only samples in a batch with images get their own (empty) image rows and equal their forward
alone; the official template + assistant-span labels with a fixed date; LoRA and QLoRA merges;
packing and DP-SGD refused with one line.

InternVL (one tiny checkpoint per pytest run, no chat template in it: none is vendored): forward on tile-indexed pixels
equals transformers' exactly, labels from the configured template's assistant spans, the exit-2 line without one,
LoRA on both towers merges, packed rows keep samples apart. `describe` on both default configs: the
whole-mapping walk (tests/test_describe_all.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from native_fixtures import USER_TEMPLATES, adapter_step, assert_merge_keeps_logits, checkpoint, model_config, records

EXTRAS = ("aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


@pytest.fixture(scope="session")
def mllama_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("native-mllama")
    checkpoint(root, "mllama")
    return root


@pytest.fixture
def bundle(mllama_root):
    from vlmtrain.model import build_model

    return build_model(model_config(checkpoint(mllama_root, "mllama")))


def _encode(bundle):
    from vlmtrain.data.encode import encoder_for

    enc = encoder_for(bundle)
    return enc, [enc(r, ims) for r, ims in records()]  # one image; text only (two turns); two images


def _args(b):
    from vlmtrain.train.module import model_extras

    return (b["input_ids"], b["pixel_values"], b["attention_mask"]), model_extras(b)


def _image_batch(bundle):
    from vlmtrain.data.batching import collate

    _, samples = _encode(bundle)
    return collate([samples[0], samples[2]], bundle.tokenizer.pad_token_id)


def test_forward_equals_transformers_logits_exactly(bundle):
    m = bundle.model
    b = _image_batch(bundle)
    (ids, pixels, mask), extras = _args(b)
    assert pixels.dim() == 6 and set(EXTRAS) <= set(extras)  # [b, images, tiles, c, h, w]
    assert int((ids == m.image_token_id).sum()) == 3  # one <|image|> token per image: tiles go by cross-attention
    m.eval()
    with torch.no_grad():
        ours = m(ids, pixels, mask, **extras).logits
        ref = m.hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, **extras).logits
    assert m.hf.config.model_type == "mllama"
    assert torch.equal(ours, ref)


def test_collated_image_batch_is_the_batch_transformers_processor_builds(bundle):
    """The per-sample processor outputs, collated, equal the processor's own batch of the same two conversations
    (image axis padded with transformers' values: pixels 0, aspect-ratio id 0, tile 0 of every slot marked)."""
    enc, _ = _encode(bundle)
    b = _image_batch(bundle)
    (rec1, ims1), _, (rec2, ims2) = records()
    texts = [enc.render(rec1["messages"]), enc.render(rec2["messages"])]
    ref = bundle.processor(text=texts, images=[ims1, ims2], padding=True, return_tensors="pt",
                           add_special_tokens=False)
    real = b["attention_mask"].bool()
    assert torch.equal(ref["attention_mask"].bool(), real)
    assert torch.equal(b["input_ids"][real], ref["input_ids"][real])
    for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(b[k], ref[k].to(b[k].dtype)), k
    assert torch.equal(b["cross_attention_mask"][real], ref["cross_attention_mask"][real].to(torch.long))


def test_text_only_samples_get_image_rows_and_equal_their_forward_alone(bundle):
    """A text-only sample beside image samples gets its row of every image tensor (empty: zero pixels, id 0, zero
    cross-attention mask). Its logits equal transformers' forward of it alone, which skips the cross-attention layers:
    vlmtrain zeroes the image states of rows without an image, because transformers un-masks fully masked
    cross-attention rows and the row would otherwise attend to the padding image (shown below)."""
    from vlmtrain.data.batching import collate

    m = bundle.model
    enc, samples = _encode(bundle)
    b = collate(samples, bundle.tokenizer.pad_token_id)
    n, s = b["input_ids"].shape
    assert b["pixel_values"].shape[:3] == (3, 2, 4) and b["aspect_ratio_ids"].shape == (3, 2)
    assert b["aspect_ratio_mask"].shape == (3, 2, 4) and b["cross_attention_mask"].shape == (3, s, 2, 4)
    assert not b["pixel_values"][1].any() and not b["aspect_ratio_ids"][1].any()
    assert not b["cross_attention_mask"][1].any()
    (ids, pixels, mask), extras = _args(b)
    m.eval()
    with torch.no_grad():
        ours = m(ids, pixels, mask, **extras).logits
        leaky = m.hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, **extras).logits
        for row in (1, 2):  # the text-only sample, and the sample with the batch's most images
            rec, ims = records()[row]
            alone = enc.process(enc.render(rec["messages"]), ims)
            want = m.hf(**{k: v for k, v in alone.items() if v is not None}).logits[0]
            k = want.shape[0]
            torch.testing.assert_close(ours[row, :k], want, rtol=0, atol=1e-5)
    # without the zeroed states the text-only row is not its forward alone (the gates are open: 0.5)
    k = len(samples[1]["input_ids"])
    assert float((leaky[1, :k] - ours[1, :k]).abs().max()) > 1e-3


def test_checkpoint_carries_the_official_template_and_labels_are_the_assistant_spans(bundle):
    from vlmtrain.model.native.families import FAMILIES
    from vlmtrain.model.native.templates import official_template, training_template

    assert FAMILIES["mllama"].template == "mllama"
    assert bundle.processor.chat_template == official_template("mllama")
    assert bundle.template == training_template("mllama")
    _, samples = _encode(bundle)
    tok = bundle.tokenizer
    for (rec, _), s in zip(records(), samples):
        official = tok.apply_chat_template(rec["messages"], chat_template=official_template("mllama"),
                                           tokenize=False, date_string="26 Jul 2024")
        assert tok.decode(s["input_ids"]) == official  # one <|image|> per image: nothing expanded
        sup = tok.decode([t for t in s["labels"] if t != -100])
        answers = [p["text"] for m in rec["messages"] if m["role"] == "assistant" for p in m["content"]]
        assert sup == "".join(a + "<|eot_id|>" for a in answers)
    # the text-only record's system block carries the fixed date, not today's
    assert "Today Date: 26 Jul 2024\n\n" in tok.decode(samples[1]["input_ids"])


def _step_then_merge_equal(m, b, quantize: bool):
    from vlmtrain.config.stage import LoRAConfig
    from vlmtrain.model.lora import apply_lora
    from vlmtrain.model.quantize import quantize_llm_

    args, extras = _args(b)
    if quantize:
        assert quantize_llm_(m, torch.float32) > 0
    names = apply_lora(m, LoRAConfig(r=4, quantize="4bit" if quantize else None), llm=True, vision=False)
    # the default LM targets reach the cross-attention layer (layer 1) as well as the self-attention layers
    assert {n.rsplit(".", 1)[1] for n in names if n.startswith("llm.model.layers.1.cross_attn.")} == \
        {"q_proj", "k_proj", "v_proj", "o_proj"}
    trained = adapter_step(m, args, extras)
    assert any(".cross_attn." in n for n in trained) and all("lora_" in n for n in trained)
    assert_merge_keeps_logits(m, args, extras, dequantize=quantize)


def test_lora_trains_adapters_only_and_merges_to_the_same_model(bundle):
    _step_then_merge_equal(bundle.model, _image_batch(bundle), quantize=False)


def test_qlora_merges_to_the_same_model(bundle):
    _step_then_merge_equal(bundle.model, _image_batch(bundle), quantize=True)


def test_packing_is_refused_with_one_line(mllama_root, tmp_path, capsys):
    """Cross-attention image states are per row: packed samples would see each other's images. `vlmtrain fit` with
    `data.mode: pack` stops before any data is read: exit 2, one line."""
    import yaml

    from vlmtrain.cli.main import main

    cfg = {"name": "sft", "preset": "sft", "model": {"pretrained": str(checkpoint(mllama_root, "mllama"))},
           "data": {"train": [{"path": str(tmp_path / "no-shards")}], "mode": "pack", "num_workers": 0},
           "trainer": {"max_steps": 1}}
    path = tmp_path / "pack.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: data.mode: pack is refused for mllama: its cross-attention image states are per row, "
                      "not per sample, so packed samples would attend to each other's images; use data.mode: plain "
                      "or group"]


def test_dp_sgd_is_refused_for_mllama():
    from types import SimpleNamespace

    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.model.native.families import FAMILIES
    from vlmtrain.train.native import family_refusals
    from vlmtrain.train.presets import with_preset

    private = validate(StageConfig, with_preset({
        "name": "s", "preset": "sft", "model": {"pretrained": "/nowhere"}, "data": {"train": [{"path": "x"}]},
        "train": {"connector": False, "llm": "lora"}, "lora": {"r": 4},
        "privacy": {"noise_multiplier": 1.0, "delta": 1e-5}}))
    model = SimpleNamespace(family=FAMILIES["mllama"], model_type="mllama", llm=SimpleNamespace(config=None))
    assert [p.split(":")[0] for p in family_refusals(private, model)] == ["privacy"]


# ---- InternVL --------------------------------------------------------------------------------------------------------

INTERNVL_TEMPLATE = USER_TEMPLATES["internvl"]  # the test template in internvl's layout (native_fixtures)


@pytest.fixture(scope="session")
def internvl_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("native-internvl")
    checkpoint(root, "internvl")
    return root


@pytest.fixture
def internvl(internvl_root):
    from vlmtrain.model import build_model

    return build_model(model_config(checkpoint(internvl_root, "internvl"), chat_template=INTERNVL_TEMPLATE))


def _internvl_batch(bundle):
    from vlmtrain.data.batching import collate
    from vlmtrain.data.encode import encoder_for

    enc = encoder_for(bundle)
    samples = [enc(r, ims) for r, ims in records()]
    return samples, collate(samples, bundle.tokenizer.pad_token_id)


def test_internvl_forward_on_tile_indexed_pixels_equals_transformers_exactly(internvl):
    """`pixel_values` hold every image's tiles (`crop_to_patches`: a grid + a thumbnail), concatenated over the
    batch; each tile becomes `image_seq_length` tokens, and the logits are transformers' own."""
    m = internvl.model
    _, b = _internvl_batch(internvl)
    (ids, pixels, mask), extras = _args(b)
    ip = internvl.processor.image_processor
    tiles = sum(int(ip(images=[im], return_tensors="pt")["num_patches"].sum()) for _, ims in records() for im in ims)
    assert pixels.shape[0] == tiles > 3  # more tiles than images
    assert int((ids == m.image_token_id).sum()) == 4 * tiles
    m.eval()
    with torch.no_grad():
        ours = m(ids, pixels, mask, **extras).logits
        ref = m.hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, **extras).logits
    assert torch.equal(ours, ref)


def test_internvl_labels_are_the_assistant_spans_of_the_configured_template(internvl):
    import re

    assert internvl.template == INTERNVL_TEMPLATE
    samples, _ = _internvl_batch(internvl)
    tok = internvl.tokenizer
    for (rec, _), s in zip(records(), samples):
        rendered = tok.apply_chat_template(rec["messages"], chat_template=INTERNVL_TEMPLATE, tokenize=False)
        # the processor wraps each image's placeholder as <img> + <IMG_CONTEXT> × (4 × tiles) + </img>
        assert re.sub(r"<img>(<IMG_CONTEXT>)+</img>", "<IMG_CONTEXT>", tok.decode(s["input_ids"])) == rendered
        answers = [p["text"] for m in rec["messages"] if m["role"] == "assistant" for p in m["content"]]
        assert tok.decode([t for t in s["labels"] if t != -100]) == "".join(a + "<|im_end|>" for a in answers)


def test_internvl_without_a_chat_template_is_refused_with_one_line(internvl_root, tmp_path, capsys):
    """No official InternVL template is vendored (none verifiable offline): without `chat_template:` (and a checkpoint
    whose template has no generation marks) `vlmtrain fit` stops with exit 2 and one line."""
    import yaml

    from vlmtrain.cli.main import main

    cfg = {"name": "sft", "preset": "sft", "model": {"pretrained": str(checkpoint(internvl_root, "internvl"))},
           "data": {"train": [{"path": str(tmp_path / "no-shards")}], "num_workers": 0}, "trainer": {"max_steps": 1}}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: chat_template: 'internvl' has no official template vendored in vlmtrain and the "
                      "checkpoint carries none (no chat_template.jinja / chat_template.json); set `chat_template:` in "
                      "the model config, with {% generation %} marks around assistant text"]


def test_internvl_lora_reaches_both_towers_and_merges_to_the_same_model(internvl):
    from vlmtrain.config.stage import LoRAConfig
    from vlmtrain.model.lora import apply_lora

    m = internvl.model
    _, b = _internvl_batch(internvl)
    args, extras = _args(b)
    names = apply_lora(m, LoRAConfig(r=4), llm=True, vision=True)
    # the split tower puts InternViT's `encoder.layer.N` at vision.model.layers.N (the default vision regex)
    assert {n.rsplit(".", 1)[1] for n in names if n.startswith("vision.model.layers.0.")} == \
        {"q_proj", "k_proj", "v_proj"}
    assert any(n.startswith("llm.model.layers.1.self_attn.") for n in names)
    adapter_step(m, args, extras)
    assert_merge_keeps_logits(m, args, extras)


def test_internvl_packed_rows_keep_samples_apart(internvl):
    """test_native_pack's packed rows (3 and 4 samples, 0-2 images each): each packed sample's logits equal it alone."""
    from test_native_hybrid_moe import _packed_vs_alone

    assert max(_packed_vs_alone(internvl)) <= 1e-5


@pytest.mark.parametrize("family", ["mllama", "internvl"])
def test_sft_stage_runs_on_mixed_image_and_text_batches(mllama_root, internvl_root, tmp_path, family):
    """`vlmtrain fit` (SFT, 2 steps, batches of 0/1/2-image records side by side) trains each family: finite losses
    logged. InternVL takes the test's template through `model.chat_template`."""
    import math

    import yaml

    from shard_fixtures import cycled_shards
    from vlmtrain.cli.main import main

    cycled_shards(tmp_path / "shards", 6, per_shard=6)
    root = mllama_root if family == "mllama" else internvl_root
    model = {"pretrained": str(checkpoint(root, family))}
    if family == "internvl":
        model["chat_template"] = INTERNVL_TEMPLATE
    cfg = {"name": "sft", "preset": "sft", "model": model,
           "data": {"train": [{"path": str(tmp_path / "shards")}], "batch_size": 3, "num_workers": 0},
           "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
           "trainer": {"max_steps": 2, "log_every_n_steps": 1, "save_every_n_steps": 10}}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path), "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
