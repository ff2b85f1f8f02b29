import pytest
import torch

from conftest import TINY, tiny_bundle
from vlmtrain.config import load_model_config, validate
from vlmtrain.config.model import ModelConfig
from vlmtrain.model import build_model
from vlmtrain.model.inference import expand_image_tokens


def _sample(m, text_ids, n_images):
    ids = list(text_ids[:2]) + [m.image_token_id] * n_images + list(text_ids[2:])
    return expand_image_tokens(ids, m.image_token_id, m.num_image_tokens)


def test_scatter_0_1_2_images_per_sample_in_one_batch(tiny):
    m = tiny.model.eval()
    torch.manual_seed(1)
    samples = [_sample(m, [5, 6, 7, 8, 9], 0), _sample(m, [10, 11, 12], 1), _sample(m, [13, 14, 15, 16], 2)]
    pix = torch.randn(3, 3, 32, 32)  # 1 image for sample 1, 2 for sample 2, in slot order
    per_sample_pix = [None, pix[0:1], pix[1:3]]
    s_max = max(map(len, samples))
    ids = torch.full((3, s_max), tiny.tokenizer.pad_token_id)
    att = torch.zeros(3, s_max, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
    with torch.no_grad():
        embeds = m.embed(ids, pix)
        feats = m.encode_images(pix)  # [3, t, d]
        slots = ids == m.image_token_id
        # slot embeddings are the image features, in order
        torch.testing.assert_close(embeds[slots], feats.reshape(-1, feats.shape[-1]))
        # text positions keep their token embeddings
        tok_emb = m.llm.get_input_embeddings()(ids)
        torch.testing.assert_close(embeds[~slots], tok_emb[~slots])
        batch_logits = m(ids, pix, att).logits
        for i, s in enumerate(samples):
            alone = m(torch.tensor([s]), per_sample_pix[i]).logits[0]
            torch.testing.assert_close(batch_logits[i, : len(s)], alone, atol=1e-5, rtol=1e-5)


def test_slot_count_mismatch_is_a_clear_error(tiny):
    m = tiny.model
    ids = torch.tensor([[5] + [m.image_token_id] * (m.num_image_tokens - 1)])
    with pytest.raises(ValueError, match="image-token slots"):
        m(ids, torch.randn(1, 3, 32, 32))


def test_text_only_batch_without_pixels(tiny):
    out = tiny.model(torch.tensor([[5, 6, 7]]))
    assert out.logits.shape[:2] == (1, 3)


def test_gradients_reach_connector_and_llm_not_frozen_vision(tiny):
    m = tiny_bundle().model
    ids = torch.tensor([_sample(m, [5, 6, 7], 1)])
    m(ids, torch.randn(1, 3, 32, 32)).logits.sum().backward()
    assert all(p.grad is None for p in m.vision.parameters())
    assert all(p.grad is not None for p in m.connector.parameters())
    assert m.llm.get_input_embeddings().weight.grad is not None


LM_FAMILIES = {
    "llama": {},
    "qwen2": {},
    "gemma": {"head_dim": 16},
    "phi3": {"pad_token_id": 0},
    "smollm3": {},
}


@pytest.mark.parametrize("family", sorted(LM_FAMILIES))
def test_language_model_families(family):
    cfg = load_model_config(TINY).model_dump()
    cfg["llm"]["config"] = {"model_type": family, "hidden_size": 64, "intermediate_size": 128,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                            "vocab_size": 512, **LM_FAMILIES[family]}
    b = build_model(validate(ModelConfig, cfg))
    m = b.model
    ids = torch.tensor([_sample(m, [5, 6, 7], 1)])
    out = m(ids, torch.randn(1, 3, 32, 32))
    assert out.logits.shape == (1, ids.shape[1], m.llm.get_output_embeddings().weight.shape[0])
    assert m.generate(ids, torch.randn(1, 3, 32, 32), max_new_tokens=3).shape == (1, 3)


@pytest.mark.parametrize("vision", ["siglip", "clip"])
def test_vision_families_and_select(vision):
    cfg = load_model_config(TINY).model_dump()
    cfg["vision"]["config"]["model_type"] = vision
    cfg["vision"]["select"] = "all"
    m = build_model(validate(ModelConfig, cfg)).model
    expected = 16 + (1 if vision == "clip" else 0)  # CLIP keeps its CLS token with select=all
    assert m.vision.num_features == expected == m.num_image_tokens
    assert m.vision(torch.randn(2, 3, 32, 32)).shape == (2, expected, 64)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "phi3", "gpt_neox"])
def test_selective_head_equals_full_logits(family):
    """Logits only at supervised positions give the same loss, gradients and DPO log-probs as the full head."""
    from vlmtrain.data.chat import IGNORE
    from vlmtrain.train.dpo import selected_sequence_logps, sequence_logps
    from vlmtrain.train.objectives import next_token_loss_sum, prediction_mask, selected_token_loss_sum

    cfg = load_model_config(TINY).model_dump()
    extra = {"gemma": {"head_dim": 16}, "phi3": {"pad_token_id": 0}}.get(family, {})
    cfg["llm"]["config"] = {"model_type": family, "hidden_size": 64, "intermediate_size": 128,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 512, **extra}
    if family != "gpt_neox":
        cfg["llm"]["config"]["num_key_value_heads"] = 2
    torch.manual_seed(0)
    m = build_model(validate(ModelConfig, cfg)).model
    assert m.supports_selective_head == (family != "gpt_neox")  # gpt_neox exercises the fallback
    ids = torch.tensor([_sample(m, [5, 6, 7, 8, 9, 10], 1), _sample(m, [11, 12, 13, 14, 15, 16], 1)])
    labels = ids.clone()
    labels[:, : ids.shape[1] - 4] = IGNORE
    labels[1, -1] = IGNORE
    pix = torch.randn(2, 3, 32, 32)
    full_loss, _ = next_token_loss_sum(m(ids, pix).logits, labels)
    full_loss.backward()
    g_full = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    mask, targets = prediction_mask(labels)
    sel_logits = m(ids, pix, logits_mask=mask)
    assert sel_logits.shape == (int(mask.sum()), m.llm.get_output_embeddings().weight.shape[0])
    sel_loss = selected_token_loss_sum(sel_logits, targets)
    sel_loss.backward()
    torch.testing.assert_close(sel_loss, full_loss, atol=1e-5, rtol=1e-6)
    for n, p in m.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, g_full[n], atol=1e-6, rtol=1e-5, msg=n)
    with torch.no_grad():
        a, na = sequence_logps(m(ids, pix).logits, labels)
        b, nb = selected_sequence_logps(m(ids, pix, logits_mask=mask), targets, mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)
    assert torch.equal(na, nb)
