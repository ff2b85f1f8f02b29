"""GRPO group scoring for composed VLMs: G completions after one prompt in one row, the images encoded once per group,
give every completion's per-token log-probs (and their gradients) as scoring each completion alone does — for Llama
and Qwen2 LMs, a one-image and a two-image prompt, completions that share first tokens, one a prefix of another."""

import pytest
import torch

from conftest import TINY, TINY_SIGLIP, tiny_bundle
from shard_fixtures import png_bytes
from vlmtrain.data.chat import IGNORE
from vlmtrain.data.encode import decode_image, encoder_for
from vlmtrain.train.grpo.scoring import collate_groups, group_token_logps

IMG = {"type": "image"}


def _t(x):
    return {"type": "text", "text": x}


def _prompt(bundle, enc, i, n_img, question):
    rec = {"id": f"g{i}", "kind": "chat", "messages": [
        {"role": "user", "content": [IMG] * n_img + [_t(question)]},
        {"role": "assistant", "content": [_t("seven")]}]}
    x = enc(rec, [decode_image(png_bytes(10 * i + k), rec["id"]) for k in range(n_img)])
    first = next(t for t, lab in enumerate(x["labels"]) if lab != IGNORE)  # the answer starts here
    return list(x["input_ids"][:first]), x["pixel_values"]


@pytest.fixture(scope="module", params=[TINY, TINY_SIGLIP], ids=["llama", "qwen2"])
def setup(request):
    bundle = tiny_bundle(request.param)
    enc = encoder_for(bundle, 512)
    prompts, pixels = zip(*[_prompt(bundle, enc, 0, 1, "What digit is this?"),
                            _prompt(bundle, enc, 1, 2, "Compare them.")])
    g = torch.Generator().manual_seed(0)
    vocab = bundle.model.llm.get_input_embeddings().weight.shape[0]
    ids = lambda n: [t for t in torch.randint(10, vocab, (n,), generator=g).tolist()  # noqa: E731
                     if t != bundle.model.image_token_id] or [11]
    base = ids(6)
    groups = [[base, base[:2] + ids(4), base[:1], ids(3)],  # shared first tokens; a prefix of another
              [ids(2), ids(7), base, ids(1)]]
    return bundle.model.eval(), list(prompts), torch.cat(pixels), groups


def _alone(vlm, prompt, pixels, completion):
    """Per-token log-probs of one completion scored in its own row."""
    ids = torch.tensor([prompt + completion])
    logits = vlm(ids, pixels).logits[0].float().log_softmax(-1)
    p = len(prompt)
    return logits[p - 1:p - 1 + len(completion)].gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_group_rows_score_like_each_completion_alone(setup):
    vlm, prompts, pixels, groups = setup
    seen = []
    hook = vlm.vision.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        rows = collate_groups(prompts, groups, pad_token_id=0, image_token_id=vlm.image_token_id)
        with torch.no_grad():
            logps, mask = group_token_logps(vlm, rows, pixels)
        grouped_images = sum(seen)
        seen.clear()
        n_img = [1, 2]
        with torch.no_grad():
            expected = [_alone(vlm, prompts[g], pixels[:1] if g == 0 else pixels[1:], c)
                        for g in range(2) for c in groups[g]]
    finally:
        hook.remove()
    assert grouped_images == 3  # each image once per group
    assert sum(seen) == sum(n * len(groups[g]) for g, n in enumerate(n_img))  # scored alone: once per completion
    assert rows.input_ids.shape[0] == 2
    for k, exp in enumerate(expected):
        n = len(exp)
        assert mask[k].sum() == n and not mask[k, n:].any()
        torch.testing.assert_close(logps[k, :n], exp, atol=1e-5, rtol=0)
        assert (logps[k, n:] == 0).all()


def test_group_gradients_equal_separate_rows(setup):
    vlm, prompts, pixels, groups = setup
    g = torch.Generator().manual_seed(1)
    rows = collate_groups(prompts, groups, pad_token_id=0)
    params = [p for p in vlm.parameters() if p.requires_grad]

    def grads(loss):
        vlm.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    logps, mask = group_token_logps(vlm, rows, pixels)
    weights = torch.randn(logps.shape, generator=g)
    ours = grads((logps * weights * mask).sum())
    sep = [_alone(vlm, prompts[gi], pixels[:1] if gi == 0 else pixels[1:], c) for gi in range(2) for c in groups[gi]]
    theirs = grads(sum((x * weights[k, :len(x)]).sum() for k, x in enumerate(sep)))
    assert any(o.abs().sum() > 0 for o in ours)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, atol=1e-5, rtol=1e-4)


def test_layout_refuses_image_tokens_in_completions(setup):
    vlm, prompts, _, groups = setup
    bad = [[[vlm.image_token_id]] + groups[0][1:], groups[1]]
    with pytest.raises(ValueError, match="image slots belong in the prompt"):
        collate_groups(prompts, bad, 0, vlm.image_token_id)


def test_features_encoded_for_generation_serve_the_loss(setup):
    """`image_embeds` (encoded once, e.g. for sampling) give the same log-probs as the pixels, with no tower run."""
    vlm, prompts, pixels, groups = setup
    rows = collate_groups(prompts, groups, pad_token_id=0)
    with torch.no_grad():
        feats = vlm.encode_images(pixels)
        seen = []
        hook = vlm.vision.register_forward_hook(lambda m, args, out: seen.append(1))
        try:
            a, _ = group_token_logps(vlm, rows, image_embeds=feats)
        finally:
            hook.remove()
        b, _ = group_token_logps(vlm, rows, pixels)
    assert not seen
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_generation_runs_each_prompt_once_and_continues_like_full_prompts(setup):
    """`VLM.generate_repeated`: the KV cache of each prompt computed once and repeated G = 3 times gives the logits
    transformers' `generate` computes on the G copies of the full left-padded prompts (≤ 1e-5 at every step, the
    same greedy tokens), and the LM runs 2 prefill rows instead of 6."""
    from vlmtrain.train.grpo.generate import left_pad

    vlm, prompts, pixels, _ = setup
    ids, att = left_pad(prompts, 0)
    G, kw = 3, dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True,
                    pad_token_id=0)
    rows = []
    hook = vlm.llm.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(tuple((kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds")
                                                   is not None else kwargs["input_ids"]).shape[:2])),
        with_kwargs=True)
    with torch.no_grad():
        feats = vlm.encode_images(pixels)
        try:
            ours = vlm.generate_repeated(ids, att, G, image_embeds=feats, **kw)
        finally:
            hook.remove()
        counts = [n for n in (1, 2) for _ in range(G)]  # the prompts' images, repeated per copy
        copies = torch.cat([feats[:1]] * G + [feats[1:]] * G)
        assert sum(counts) == copies.shape[0]
        theirs = vlm.generate(ids.repeat_interleave(G, 0), attention_mask=att.repeat_interleave(G, 0),
                              image_embeds=copies, **kw)
    # the prefill: one row per prompt, all but its last position; then G rows per prompt, one position at a time
    assert rows[0] == (2, ids.shape[1] - 1) and set(rows[1:]) == {(2 * G, 1)}
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.logits, theirs.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
