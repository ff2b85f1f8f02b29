"""LFM2-VL (`lfm2_vl`) against transformers' own model and processor.

One tiny `save_pretrained` checkpoint per pytest run (module-scoped): an LFM2 LM of one gated short-convolution layer
and one attention layer, a SigLIP2 NaFlex tower. Its image processor exists in transformers 5.23 only for
torchvision; vlmtrain's port (`image_processors.lfm2_vl`) is checked against the torchvision original's outputs
(tests/fixtures/image_processors.npz) in tests/test_native_image_processors.py. Checked here: forward on 0/1/2-image
samples equals transformers' logits exactly; labels are the configured template's assistant spans (no official
template vendored: `chat_template:` required, one exit-2 line otherwise); packing is refused, with a control test
that measures the convolution's leak; LoRA and QLoRA merge to the same logits. `describe` of the default config:
tests/test_describe_all.py.
"""

from __future__ import annotations

import pytest
import torch

from native_fixtures import (USER_TEMPLATES, adapter_step, assert_merge_keeps_logits, checkpoint, encoded_batch,
                             model_config, records)

TEMPLATE = USER_TEMPLATES["lfm2_vl"]  # the test template in lfm2_vl's layout (native_fixtures)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("native-lfm2-vl")
    checkpoint(root, "lfm2_vl")
    return root


@pytest.fixture
def bundle(root):
    from vlmtrain.model import build_model

    return build_model(model_config(checkpoint(root, "lfm2_vl"), chat_template=TEMPLATE))



def test_forward_equals_transformers_logits_and_labels_are_the_assistant_spans(bundle):
    import re

    from vlmtrain.model.native.image_processors.lfm2_vl import Lfm2VlImageProcessorPil

    m = bundle.model
    assert type(bundle.processor.image_processor) is Lfm2VlImageProcessorPil
    samples, (ids, pixels, mask), extras = encoded_batch(bundle)
    assert set(extras) == {"pixel_attention_mask", "spatial_shapes"} and pixels.shape[0] == 3
    # one token per 2×2 patches of 8 px: each image's spatial shape halved
    assert int((ids == m.image_token_id).sum()) == int((extras["spatial_shapes"] // 2).prod(-1).sum())
    m.eval()
    with torch.no_grad():
        ours = m(ids, pixels, mask, **extras).logits
        ref = m.hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, **extras).logits
    assert torch.equal(ours, ref)
    tok = bundle.tokenizer
    for (rec, _), s in zip(records(), samples):
        rendered = tok.apply_chat_template(rec["messages"], chat_template=TEMPLATE, tokenize=False)
        text = re.sub(r"<\|image_start\|>(<image>)+<\|image_end\|>", "<image>", tok.decode(s["input_ids"]))
        assert text == rendered
        answers = [p["text"] for m in rec["messages"] if m["role"] == "assistant" for p in m["content"]]
        assert tok.decode([t for t in s["labels"] if t != -100]) == "".join(a + "<|im_end|>" for a in answers)


def test_without_a_chat_template_is_refused_with_one_line(root):
    from vlmtrain.errors import ConfigError
    from vlmtrain.model import build_model

    with pytest.raises(ConfigError) as e:
        build_model(model_config(checkpoint(root, "lfm2_vl")))
    assert e.value.exit_code == 2 and len(str(e.value).splitlines()) == 1
    assert str(e.value).startswith("chat_template: 'lfm2_vl' has no official template vendored in vlmtrain")


def test_packed_rows_leak_which_is_why_packing_is_refused(bundle):
    """The reason for the refusal, measured: in a packed row the first sample is exact and later ones are not (the
    short-convolution window reaches into the sample before). If transformers ever isolates them on CPU, this fails
    and the refusal (Family.no_packing) can go. The stage asking for packing gets one line."""
    from test_native_hybrid_moe import _packed_vs_alone
    from vlmtrain.cli.family_table import refusal, stage

    assert bundle.model.llm.config.layer_types[0] == "conv"
    diffs = _packed_vs_alone(bundle)
    assert diffs[0] <= 1e-5 and max(diffs[1:]) > 1e-4
    why = refusal(stage("sft", data={"mode": "pack"}), bundle)
    assert why.startswith("data.mode: pack is refused for lfm2_vl") and "convolution window" in why
    assert "\n" not in why


@pytest.mark.parametrize("quantize", [False, True], ids=["lora", "qlora"])
def test_lora_on_lm_and_tower_merges_to_the_same_model(bundle, quantize):
    """LoRA on the LM (its attention and the conv layer's projections) and the tower; merged == adapted logits."""
    from vlmtrain.config.stage import LoRAConfig
    from vlmtrain.model.lora import apply_lora
    from vlmtrain.model.quantize import quantize_llm_

    m = bundle.model
    _, args, extras = encoded_batch(bundle)
    if quantize:
        assert quantize_llm_(m, torch.float32) > 0
    names = apply_lora(m, LoRAConfig(r=4, quantize="4bit" if quantize else None), llm=True, vision=not quantize)
    assert any(n.startswith("llm.model.layers.1.self_attn.") for n in names)
    assert quantize or any(n.startswith("vision.model.encoder.layers.0.self_attn.") for n in names)
    trained = adapter_step(m, args, extras)
    assert trained and all("lora_" in n for n in trained)
    assert_merge_keeps_logits(m, args, extras, dequantize=quantize)
