import pytest

from vlmtrain.data.chat import IGNORE, MaskError, encode_messages
from vlmtrain.model.chat_templates import TEMPLATES
from vlmtrain.model.tokenizer import build_tiny_tokenizer, embedding_rows


def test_tiny_bpe_is_deterministic_and_image_token_is_one_id(tiny):
    a, b = build_tiny_tokenizer(512), build_tiny_tokenizer(512)
    text = "What digit is this? seven <image> 12:30"
    assert a(text)["input_ids"] == b(text)["input_ids"]
    tok = tiny.tokenizer
    ids = tok("a <image> b", add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 1


def test_embedding_rows():
    assert embedding_rows(32001, 32000, 64) == 32064  # LLaVA-1.5
    assert embedding_rows(151665, 151936, 64) == 151936  # Qwen2 has spare rows: no resize


def test_assistant_only_supervision_decodes_to_assistant_text(tiny):
    tok, m = tiny.tokenizer, tiny.model
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit?"}]},
        {"role": "assistant", "content": "seven"},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "three"}]},
    ]
    enc = encode_messages(tok, msgs, m.image_token_id, m.num_image_tokens)
    assert enc.n_images == 2
    assert enc.input_ids.count(m.image_token_id) == 2 * m.num_image_tokens
    sup = [t for t in enc.labels if t != IGNORE]
    assert tok.decode(sup) == "seven<|end|>three<|end|>"
    assert all(lbl == IGNORE for t, lbl in zip(enc.input_ids, enc.labels) if t == m.image_token_id)


def test_no_assistant_turn_is_rejected_not_all_masked(tiny):
    with pytest.raises(MaskError, match="no assistant tokens"):
        encode_messages(tiny.tokenizer, [{"role": "user", "content": "hi"}], tiny.model.image_token_id, 16)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_marks_generation(name):
    assert "{% generation %}" in TEMPLATES[name] and "{% endgeneration %}" in TEMPLATES[name]


@pytest.mark.parametrize("name, supervised", [("chatml", "seven<|im_end|>"), ("llava_v1", "seven<|end|>"),
                                               ("vlmtrain_tiny", "seven<|end|>")])
def test_named_templates_supervise_only_the_reply(name, supervised):
    from conftest import tiny_bundle

    b = tiny_bundle(overrides=[f"tokenizer.chat_template={name}"])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit?"}]},
            {"role": "assistant", "content": "seven"}]
    enc = encode_messages(b.tokenizer, msgs, b.model.image_token_id, b.model.num_image_tokens)
    assert b.tokenizer.decode([t for t in enc.labels if t != IGNORE]).strip() == supervised
    assert enc.n_images == 1
