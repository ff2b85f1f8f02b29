"""Gemma 4 (`gemma4`), PaliGemma (`paligemma`) and GLM-4.1V (`glm4v`) against transformers' own model and processor.

One tiny `save_pretrained` checkpoint per family per pytest run (module-scoped). Gemma 4: forward on a batch of 0/1/2-
image samples equals transformers' logits exactly; labels are the configured template's assistant spans (no official
template is vendored, so `chat_template:` is required, one exit-2 line otherwise); the audio tower is a frozen role
(frozen at build, a frozen row of the trainable table, counted by describe); packed rows keep samples apart (image
blocks bidirectional on sliding layers only); LoRA and QLoRA merge to the same logits. `describe` totals of the default
configs: the whole-mapping walk (tests/test_describe_all.py).
"""

from __future__ import annotations

import pytest
import torch

from native_fixtures import adapter_step, assert_merge_keeps_logits, checkpoint, model_config, records


def _args(b):
    from vlmtrain.train.module import model_extras

    return (b["input_ids"], b["pixel_values"], b["attention_mask"]), model_extras(b)


def _encoded(bundle):
    from vlmtrain.data.batching import collate
    from vlmtrain.data.inspect import encoder_for

    enc = encoder_for(bundle)
    samples = [enc(r, ims) for r, ims in records()]  # one image; text only (two turns); two images
    return samples, collate(samples, bundle.tokenizer.pad_token_id)


# ---- Gemma 4 -----------------------------------------------------------------------------------------------------

# A user's template for the tests, written here in Gemma 4's turn layout (`<|turn>role` … `<turn|>`, images as
# `\n\n<|image|>\n\n`); not an official copy, which vlmtrain does not vendor: each model turn's text and <turn|> marked.
GEMMA4_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}{{ '<|turn>' + role + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{% for c in message['content'] %}{{ c['text'] }}"
    "{% endfor %}{{ '<turn|>' }}{% endgeneration %}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '\n\n<|image|>\n\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{{ '<turn|>' }}{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|turn>model\n' }}{% endif %}")


@pytest.fixture(scope="module")
def gemma4_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("native-gemma4")
    checkpoint(root, "gemma4")
    return root


@pytest.fixture
def gemma4(gemma4_root):
    from vlmtrain.model import build_model

    return build_model(model_config(checkpoint(gemma4_root, "gemma4"), chat_template=GEMMA4_TEMPLATE))


def test_gemma4_forward_equals_transformers_logits_exactly(gemma4):
    m = gemma4.model
    _, b = _encoded(gemma4)
    (ids, pixels, mask), extras = _args(b)
    assert pixels.shape[0] == 3 and set(extras) == {"image_position_ids", "mm_token_type_ids"}
    assert int((ids == m.image_token_id).sum()) == int((extras["mm_token_type_ids"] == 1).sum()) > 0
    m.eval()
    with torch.no_grad():
        ours = m(ids, pixels, mask, **extras).logits
        ref = m.hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, **extras).logits
    assert torch.equal(ours, ref)
    # the images reach the logits, and they attend bidirectionally: a causal mask over them gives other logits
    assert m.llm.config.use_bidirectional_attention == "vision"
    with torch.no_grad():
        causal = m.hf(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                      image_position_ids=extras["image_position_ids"]).logits
    assert float((causal - ref).abs().max()) > 1e-4


def test_gemma4_labels_are_the_assistant_spans_of_the_configured_template(gemma4):
    import re

    assert gemma4.template == GEMMA4_TEMPLATE
    samples, _ = _encoded(gemma4)
    tok = gemma4.tokenizer
    for (rec, _), s in zip(records(), samples):
        rendered = tok.apply_chat_template(rec["messages"], chat_template=GEMMA4_TEMPLATE, tokenize=False)
        # the processor expands each <|image|> into <|image> + soft tokens + <image|>
        assert re.sub(r"<\|image>(<\|image\|>)+<image\|>", "<|image|>", tok.decode(s["input_ids"])) == rendered
        answers = [p["text"] for m in rec["messages"] if m["role"] == "assistant" for p in m["content"]]
        assert tok.decode([t for t in s["labels"] if t != -100]) == "".join(a + "<turn|>" for a in answers)


def test_gemma4_without_a_chat_template_is_refused_with_one_line(gemma4_root):
    from vlmtrain.errors import ConfigError
    from vlmtrain.model import build_model

    with pytest.raises(ConfigError) as e:
        build_model(model_config(checkpoint(gemma4_root, "gemma4")))
    assert e.value.exit_code == 2 and len(str(e.value).splitlines()) == 1
    assert str(e.value).startswith("chat_template: 'gemma4' has no official template vendored in vlmtrain")


def test_gemma4_audio_tower_is_a_frozen_role_in_the_trainable_table(gemma4):
    from types import SimpleNamespace

    from vlmtrain.model import count_params
    from vlmtrain.train.freeze import apply_stage_trainability

    m = gemma4.model
    audio = dict(m.audio.named_parameters())
    assert audio and not any(p.requires_grad for p in audio.values())  # frozen at build
    assert {id(p) for p in m.audio.parameters()} == \
        {id(p) for mod in (m.hf.model.audio_tower, m.hf.model.embed_audio) for p in mod.parameters()}
    table = apply_stage_trainability(m, SimpleNamespace(vision=True, connector=True, llm=True))
    assert table["audio"] == {"trainable": 0, "frozen": sum(p.numel() for p in audio.values()), "mode": "frozen"}
    assert not any(p.requires_grad for p in audio.values())
    assert all(table[r]["trainable"] > 0 and table[r]["frozen"] == 0 for r in ("vision", "connector", "llm"))
    counts = count_params(m)
    assert counts["audio"] == table["audio"]["frozen"]
    assert counts["total"] == sum(p.numel() for p in m.hf.parameters())  # transformers' own count, audio included


def test_gemma4_packed_rows_keep_samples_apart(gemma4):
    """test_native_pack's packed rows (3 and 4 samples, 0-2 images each): each packed sample's logits equal it alone,
    with image blocks bidirectional on the sliding layer and the full-attention layer causal (as transformers)."""
    from test_native_hybrid_moe import _packed_vs_alone

    assert max(_packed_vs_alone(gemma4)) <= 1e-5


@pytest.mark.parametrize("quantize", [False, True], ids=["lora", "qlora"])
def test_gemma4_lora_on_both_towers_merges_to_the_same_model(gemma4, quantize):
    from vlmtrain.config.stage import LoRAConfig
    from vlmtrain.model.lora import apply_lora
    from vlmtrain.model.quantize import quantize_llm_

    m = gemma4.model
    _, b = _encoded(gemma4)
    args, extras = _args(b)
    if quantize:
        assert quantize_llm_(m, torch.float32) > 0
    # the tower's projections are `Gemma4ClippableLinear` wrappers around `.linear`: the default vision regex
    # (ending at `_proj`) does not reach them, a `lora.vision_target` naming `.linear` does
    cfg = LoRAConfig(r=4, quantize="4bit" if quantize else None,
                     vision_target=r"vision\.model\..*layers\.\d+\..*(q|k|v|o)_proj\.linear")
    names = apply_lora(m, cfg, llm=True, vision=not quantize)
    assert any(n.startswith("llm.model.layers.1.self_attn.") for n in names)
    assert quantize or any(n.startswith("vision.") for n in names)
    assert not any(n.startswith("audio.") for n in names)
    trained = adapter_step(m, args, extras)
    assert trained and all("lora_" in n for n in trained)
    assert_merge_keeps_logits(m, args, extras, dequantize=quantize)
