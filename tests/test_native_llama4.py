"""Llama 4 (`llama4`, Scout / Maverick) against transformers' own model and processor.

One tiny `save_pretrained` checkpoint per pytest run (module-scoped): a chunked-attention MoE layer (4 routed experts
fused as 3-D tensors, top-1, + a shared expert) and a full-attention NoPE dense layer, chunks of 16 tokens. Its image
processor exists in transformers 5.23 only for torchvision; vlmtrain's port (`image_processors.llama4`) is checked
against the torchvision original's outputs (tests/fixtures/image_processors.npz) in
tests/test_native_image_processors.py. Checked here: the top-level model has no `.model` / `.lm_head`, and
vlmtrain's forward (decoder hidden states off a hook, its own head) equals transformers' logits exactly; labels are
the configured template's assistant spans (no official template vendored: `chat_template:` required); packing is
refused, with a control test that measures why; LoRA on the LM, the fused experts and the tower, and QLoRA, merge to
the same logits. `describe` of the default config: tests/test_describe_all.py.
"""

from __future__ import annotations

import pytest
import torch

from native_fixtures import (USER_TEMPLATES, adapter_step, assert_merge_keeps_logits, checkpoint, encoded_batch,
                             model_config, records)

TEMPLATE = USER_TEMPLATES["llama4"]  # the test template in llama4's layout (native_fixtures)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("native-llama4")
    checkpoint(root, "llama4")
    return root


@pytest.fixture
def bundle(root):
    from vlmtrain.model import build_model

    return build_model(model_config(checkpoint(root, "llama4"), chat_template=TEMPLATE))



def test_forward_equals_transformers_logits_and_labels_are_the_assistant_spans(bundle):
    import re

    from vlmtrain.model.native.image_processors.llama4 import Llama4ImageProcessorPil

    m = bundle.model
    assert type(bundle.processor.image_processor) is Llama4ImageProcessorPil
    assert not hasattr(m.hf, "model") and not hasattr(m.hf, "lm_head")  # why Family.hidden_from exists
    samples, (ids, pixels, mask), extras = encoded_batch(bundle)
    # 40×30 → 1×2 tiles + global; 64×64 → 2×2 + global; 30×50 → 2×1 + global: 3 + 5 + 3 tiles of 4 tokens each
    assert pixels.shape == (11, 3, 32, 32) and pixels.dtype == torch.float32
    assert int((ids == m.image_token_id).sum()) == 11 * 4
    m.eval()
    with torch.no_grad():
        ours = m(ids, pixels, mask, **extras).logits
        ref = m.hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, **extras).logits
        sel = m(ids, pixels, mask, logits_mask=mask.bool(), **extras)  # the selective head: the same rows
    assert torch.equal(ours, ref)
    assert torch.equal(sel, ref[mask.bool()])
    tok = bundle.tokenizer
    for (rec, _), s in zip(records(), samples):
        rendered = tok.apply_chat_template(rec["messages"], chat_template=TEMPLATE, tokenize=False)
        assert re.sub(r"<\|image_start\|>.*?<\|image_end\|>", "<|image|>", tok.decode(s["input_ids"])) == rendered
        answers = [p["text"] for m in rec["messages"] if m["role"] == "assistant" for p in m["content"]]
        assert tok.decode([t for t in s["labels"] if t != -100]) == "".join(a + "<|eot|>" for a in answers)


def test_without_a_chat_template_is_refused_with_one_line(root):
    from vlmtrain.errors import ConfigError
    from vlmtrain.model import build_model

    with pytest.raises(ConfigError) as e:
        build_model(model_config(checkpoint(root, "llama4")))
    assert e.value.exit_code == 2 and len(str(e.value).splitlines()) == 1
    assert str(e.value).startswith("chat_template: 'llama4' has no official template vendored in vlmtrain")


def test_packing_is_refused_and_the_control_measures_why(bundle):
    """The refusal's reason, measured: packed samples after the first are off alone while the NoPE layers' row-index
    temperature is on, and equal alone (≤1e-5, chunked attention with 16-token chunks included) with it off. If
    transformers ever takes the temperature from position_ids, the first assertion fails and the refusal can go."""
    from test_native_hybrid_moe import _packed_vs_alone
    from vlmtrain.model.native.families import FAMILIES

    assert bundle.model.llm.config.attention_chunk_size == 16
    diffs = _packed_vs_alone(bundle)
    assert diffs[0] <= 1e-5 and max(diffs) > 1e-4
    for layer in bundle.model.hf.language_model.model.layers:
        layer.self_attn.attn_temperature_tuning = False
    assert max(_packed_vs_alone(bundle)) <= 1e-5
    assert "temperature taken from the row index" in FAMILIES["llama4"].no_packing


def test_pack_mode_stage_is_refused_with_one_line(bundle):
    from vlmtrain.cli.family_table import refusal, stage

    why = refusal(stage("sft", data={"mode": "pack"}), bundle)
    assert why.startswith("data.mode: pack is refused for llama4") and "\n" not in why


@pytest.mark.parametrize("quantize", [False, True], ids=["lora", "qlora"])
def test_lora_on_lm_experts_and_tower_merges_to_the_same_model(bundle, quantize):
    """The family's expert regex (`feed_forward.experts`) gives the fused 3-D expert tensors PEFT adapters
    (`target_parameters`); the LM's and the tower's linear layers get LoRA; merged == adapted logits."""
    from vlmtrain.config.stage import LoRAConfig
    from vlmtrain.model.lora import apply_lora
    from vlmtrain.model.quantize import quantize_llm_

    m = bundle.model
    _, args, extras = encoded_batch(bundle)
    if quantize:
        assert quantize_llm_(m, torch.float32) > 0
    names = apply_lora(m, LoRAConfig(r=4, quantize="4bit" if quantize else None), llm=True, vision=not quantize)
    assert any(n.startswith("llm.model.layers.1.self_attn.") for n in names)
    assert {n.rsplit(".", 1)[1] for n in names if ".feed_forward.experts." in n} == {"gate_up_proj", "down_proj"}
    assert quantize or any(n.startswith("vision.model.model.layers.0.self_attn.") for n in names)
    trained = adapter_step(m, args, extras)
    assert trained and all("lora_" in n for n in trained)
    assert_merge_keeps_logits(m, args, extras, dequantize=quantize)
