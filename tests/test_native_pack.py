"""Packing for native families: a packed row's per-sample logits equal each sample run alone, the packed loss
equals the padded batch's, Qwen's 3-D mRoPE ids are transformers' own per sample, and a `data.mode: pack` stage
trains a native checkpoint."""

from __future__ import annotations

import pytest
import torch

from native_fixtures import FAMILIES, IMG, assistant, checkpoint, image, model_config, records, user


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("native_pack")


def _records() -> list[tuple[dict, list]]:
    """The shared 0/1/2-image records plus a short text-only one and a one-image one of another size."""
    return [*records(),
            ({"id": "short", "kind": "chat", "messages": [user("hi"), assistant("yes")]}, []),
            ({"id": "wide", "kind": "chat", "messages": [user("read", IMG), assistant("four five")]},
             [image(60, 20, 4)])]


def _encoded(root, family):
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.model import build_model

    bundle = build_model(model_config(checkpoint(root, family)))
    enc = encoder_for(bundle)
    samples = {r["id"]: enc(r, ims) for r, ims in _records()}
    bundle.model.eval()
    return bundle, samples


# 3 samples (1 + 0 + 2 images), then 4 samples (0 + 1 + 0 + 1 images); rows of unequal length, so one ends in padding
ROWS = [["one", "text", "two"], ["short", "wide", "text", "one"]]


def _logits(model, batch, attention_mask):
    from vlmtrain.train.module import model_extras

    with torch.no_grad():
        return model(batch["input_ids"], batch.get("pixel_values"), attention_mask, batch.get("position_ids"),
                     **model_extras(batch)).logits


def _loss(model, batch, attention_mask) -> torch.Tensor:
    from vlmtrain.train.module import model_extras
    from vlmtrain.train.objectives import prediction_mask, selected_token_loss_sum

    mask, targets = prediction_mask(batch["labels"])
    with torch.no_grad():
        total = selected_token_loss_sum(model(batch["input_ids"], batch.get("pixel_values"), attention_mask,
                                              batch.get("position_ids"), logits_mask=mask, **model_extras(batch)),
                                        targets)
    return total / len(targets)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_logits_equal_each_sample_alone_and_loss_equals_padded(root, family):
    from vlmtrain.data.batching import collate, collate_packed

    bundle, samples = _encoded(root, family)
    model, pad = bundle.model, bundle.tokenizer.pad_token_id
    rows = [[samples[i] for i in row] for row in ROWS]
    packed = collate_packed(rows, pad)
    assert "attention_mask" not in packed and packed["pixel_values"] is not None
    logits = _logits(model, packed, None)
    for r, row in enumerate(ROWS):
        start = 0
        for sid in row:
            alone = collate([samples[sid]], pad)
            want = _logits(model, alone, alone["attention_mask"])[0]
            got = logits[r, start:start + want.shape[0]]
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"{family} row {r} sample {sid}")
            start += want.shape[0]

    # the same samples as a right-padded batch (attention_mask): same mean loss over the same supervised tokens
    flat = [samples[i] for row in ROWS for i in row]
    padded = collate(flat, pad)
    torch.testing.assert_close(_loss(model, packed, None), _loss(model, padded, padded["attention_mask"]),
                               rtol=1e-5, atol=1e-6)


def test_without_isolation_the_samples_see_each_other(root):
    """Control for the test above: the same packed row with one all-ones attention mask (no block-diagonal mask)
    changes the later samples' logits, so the equality is not vacuous."""
    from vlmtrain.data.batching import collate, collate_packed

    bundle, samples = _encoded(root, "gemma3")
    pad = bundle.tokenizer.pad_token_id
    packed = collate_packed([[samples["one"], samples["text"]]], pad)
    leaky = _logits(bundle.model, packed, torch.ones_like(packed["input_ids"]))
    n_first = len(samples["one"]["input_ids"])
    alone = collate([samples["text"]], pad)
    want = _logits(bundle.model, alone, alone["attention_mask"])[0]
    assert (leaky[0, n_first:n_first + want.shape[0]] - want).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_packed_mrope_ids_are_transformers_own_per_sample(root, family):
    """Rows 1–3 of the packed `[4, b, s]` ids equal the 3-D ids transformers computes for each sample in its own
    unpacked forward (`compute_3d_position_ids`); row 0 restarts at every sample."""
    from vlmtrain.data.batching import collate, collate_packed

    bundle, samples = _encoded(root, family)
    model, pad = bundle.model, bundle.tokenizer.pad_token_id
    packed = collate_packed([[samples[i] for i in ROWS[0]]], pad)
    ids = model.packed_mrope_positions(packed["input_ids"], packed["position_ids"], packed["mm_token_type_ids"],
                                       packed["image_grid_thw"])
    assert ids.shape == (4, 1, packed["input_ids"].shape[1])
    start = 0
    for sid in ROWS[0]:
        alone = collate([samples[sid]], pad)
        n = alone["input_ids"].shape[1]
        want = model.hf.model.compute_3d_position_ids(
            input_ids=alone["input_ids"], image_grid_thw=alone.get("image_grid_thw"), video_grid_thw=None,
            inputs_embeds=None, attention_mask=alone["attention_mask"], past_key_values=None,
            mm_token_type_ids=alone["mm_token_type_ids"])
        if want is None:  # text only: transformers falls back to plain 0..n-1 on all three axes
            want = torch.arange(n).expand(3, 1, n)
        assert torch.equal(ids[1:, :, start:start + n], want)
        assert torch.equal(ids[0, 0, start:start + n], torch.arange(n))
        start += n
    # a sample with images is not plain text positions (mRoPE is really in play)
    assert not torch.equal(ids[1, 0, :len(samples["one"]["input_ids"])], ids[2, 0, :len(samples["one"]["input_ids"])])


@pytest.mark.slow  # a Lightning run per family (~20 s each under load)
@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_packed_stage_runs_on_a_native_checkpoint(tmp_path, family):
    """`vlmtrain fit` with `data.mode: pack` on a native checkpoint trains (finite, logged losses; the family folder
    saved) with several samples per packed row: each step of 2 rows takes more than 2 samples."""
    import json
    import math

    import yaml

    from shard_fixtures import cycled_shards
    from vlmtrain.cli.main import main

    cycled_shards(tmp_path / "shards", 16, per_shard=8)  # 0/1/2 images, one or two exchanges
    cfg = {"name": "sft", "preset": "sft", "model": {"pretrained": str(checkpoint(tmp_path / "ck", family))},
           "data": {"train": [{"path": str(tmp_path / "shards")}], "batch_size": 2, "num_workers": 0,
                    "max_len": 256, "mode": "pack", "pack_len": 1024},
           "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
           "trainer": {"max_steps": 2, "log_every_n_steps": 1, "save_every_n_steps": 10}}
    path = tmp_path / "pack.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path), "--out", str(tmp_path / "run")]) == 0
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) for s in steps)
    assert all(round(s["samples_per_s"] * s["seconds"]) > 2 for s in steps)  # samples per step > its 2 rows
    assert (tmp_path / "run" / "model" / "config.json").is_file()
