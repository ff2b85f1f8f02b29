"""Shared-prefix rows on native families (`vlmtrain.data.prefix`, `vlmtrain.model.native.shared_prefix`): a prompt
and its images once, k continuations after it. Every continuation's log-prob equals transformers' own forward on
that sequence alone (k = 3, as GRPO's completions; 0/1/2 images of different sizes, multi-turn prompts, answers
sharing first tokens, one answer a prefix of another), and native DPO on shared rows gives the two-row loss and
gradients. Families whose sequences shared rows cannot score keep two rows, with the reason."""

from __future__ import annotations

import copy

import pytest
import torch

from native_fixtures import FAMILIES, IMG, assistant, checkpoint, image, model_config, user

PROMPTS = [  # (prompt turns, images, answers: the second shares the first's first word, the third is a prefix of it)
    ([user(IMG, "what digit is this")], [image(40, 30, 1)], ["seven", "seven or one", "seven or"]),
    ([user("hello there"), assistant("one two"), user("and then")], [], ["three", "four five", "three four"]),
    ([user(IMG, IMG, "compare them")], [image(64, 64, 2), image(30, 50, 3)], ["the same", "not the same", "same"]),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("native-prefix")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, root):
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.model import build_model

    bundle = build_model(model_config(checkpoint(root, request.param)))
    bundle.model.eval()
    return request.param, bundle, encoder_for(bundle)


def _alone_tokens(model, s: dict, images: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(index in the sequence, log-prob) of each supervised token of one encoded sequence, by transformers' own full
    forward on that sequence alone."""
    ids = torch.tensor([s["input_ids"]])
    kw = {**_cast(images, model), **{k: torch.tensor([v]) for k, v in s.get("token_extras", {}).items()}}
    logits = model.hf(input_ids=ids, **kw).logits[0, :-1]
    tgt = torch.tensor(s["labels"][1:])
    keep = tgt != -100
    return keep.nonzero().flatten() + 1, logits[keep].log_softmax(-1).gather(-1, tgt[keep][:, None]).squeeze(-1)


def _alone_logp(model, s: dict, images: dict) -> torch.Tensor:
    """Summed log-prob of one encoded sequence's supervised tokens (`_alone_tokens`)."""
    return _alone_tokens(model, s, images)[1].sum()


def _image_inputs(sample: dict) -> dict:
    return {"pixel_values": sample["pixel_values"], **sample["image_extras"]} if sample["pixel_values"] is not None \
        else {}


def _cast(tree, model):
    """Floating tensors of an input (dict, list, tensor) in the model's dtype, the rest unchanged."""
    dtype = model.llm.get_input_embeddings().weight.dtype
    if isinstance(tree, dict):
        return {k: _cast(v, model) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_cast(v, model) for v in tree]
    return tree.to(dtype) if isinstance(tree, torch.Tensor) and tree.is_floating_point() else tree


def _groups(enc, k: int = 3, prompts: list = PROMPTS):
    """Per prompt the k encoded chat sequences (prompt + one answer each)."""
    out = []
    for i, (turns, imgs, answers) in enumerate(prompts):
        out.append([enc({"id": f"g{i}-{j}", "kind": "chat", "messages": turns + [assistant(a)]}, imgs)
                    for j, a in enumerate(answers[:k])])
    return out


def _score_rows(model, groups: list[list[dict]], pad: int) -> tuple[torch.Tensor, dict]:
    """Per-sequence log-probs `[k·b]` of the groups laid out in shared-prefix rows, through NativeVLM.forward."""
    from vlmtrain.data.batching import collate
    from vlmtrain.data.native_encode import TOKEN_EXTRAS
    from vlmtrain.data.prefix import common_prefix_len, shared_prefix_rows
    from vlmtrain.train.dpo import indexed_sequence_logps

    keys = tuple(sorted({k for g in groups for s in g for k in s["token_extras"]}))
    rows = shared_prefix_rows(groups, [common_prefix_len(g, keys) for g in groups], pad)
    firsts = _cast(collate([g[0] for g in groups], pad), model)  # the images once, in row order
    images = {k: firsts[k] for k in firsts.get("model_extras", []) if k not in TOKEN_EXTRAS}
    logits = model(rows["input_ids"], firsts.get("pixel_values"), None, rows["position_ids"],
                   logits_mask=rows["logits_index"], segments=rows["segments"], **images, **rows["token_extras"])
    rows["token_logps"] = logits.log_softmax(-1).gather(-1, rows["targets"][:, None]).squeeze(-1)  # [n]
    return indexed_sequence_logps(logits, rows["targets"], rows["seq_index"], rows["n_seq"])[0], rows


def test_each_continuation_scores_as_the_sequence_alone(family):
    """In float64, so that the comparison sees the layout, not float32 rounding (summed log-probs of ~80 nats
    differ by 1.5e-5 in float32 between any two shapes of the same matmuls; a wrong mask or position moves them by
    more than 1e-3)."""
    name, bundle, enc = family
    m = copy.deepcopy(bundle.model).double()
    if m.family.shared_prefix:
        pytest.skip(f"{name}: {m.family.shared_prefix}")
    groups = _groups(enc)
    with torch.no_grad():
        got, rows = _score_rows(m, groups, bundle.tokenizer.pad_token_id)
        alone = [_alone_tokens(m, g[j], _image_inputs(g[0])) for j in range(3) for g in groups]
    assert int((rows["segments"] == 0).sum()) > 3 * 8  # the prompts are shared, not only their first tokens
    assert rows["input_ids"].shape[1] < max(sum(len(s["input_ids"]) for s in g) for g in groups)
    torch.testing.assert_close(got, torch.stack([lp.sum() for _, lp in alone]), rtol=0, atol=1e-9)
    for seq, (where, lp) in enumerate(alone):  # per token too (GRPO's per-token ratios), in sequence order
        mine = rows["seq_index"] == seq
        assert torch.equal(rows["token_index"][mine], where)
        torch.testing.assert_close(rows["token_logps"][mine], lp, rtol=0, atol=1e-9)


def test_gemma3_sliding_window_counts_positions_not_row_indices(root):
    """With a window shorter than the rows, the second continuation's window must end where its own sequence's
    would (its row indices run further right than its positions)."""
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.model import build_model

    bundle = build_model(model_config(checkpoint(root, "gemma3")))
    m = bundle.model.eval().double()
    groups = _groups(encoder_for(bundle), k=2)
    with torch.no_grad():
        wide = torch.stack([_alone_logp(m, g[1], _image_inputs(g[0])) for g in groups])
        m.llm.config.sliding_window = 6
        narrow = torch.stack([_alone_logp(m, g[j], _image_inputs(g[0])) for j in range(2) for g in groups])
        got, _ = _score_rows(m, groups, bundle.tokenizer.pad_token_id)
    assert not torch.allclose(wide, narrow[len(groups):], atol=1e-3)  # the window does change the scores
    torch.testing.assert_close(got, narrow, rtol=0, atol=1e-9)


def _pref_samples(enc, prompts: list = PROMPTS) -> list[dict]:
    recs = []
    for i, (turns, imgs, answers) in enumerate(prompts):
        recs.append(({"id": f"p{i}", "kind": "preference", "prompt": turns, "chosen": [assistant(answers[0])],
                      "rejected": [assistant(answers[1 + i % 2])]}, imgs))
    return [enc(r, ims) for r, ims in recs]


def _dpo_module(bundle, path):
    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.train.module import VLMModule
    from vlmtrain.train.presets import with_preset

    stage = validate(StageConfig, with_preset({"name": "dpo", "preset": "dpo", "model": {"pretrained": str(path)},
                                               "data": {"train": [{"builtin": "digits-pref"}]}}))
    return VLMModule(bundle, stage)


def test_dpo_loss_and_gradients_equal_the_two_row_layout(family, root):
    name, bundle, enc = family
    if bundle.model.family.shared_prefix:
        pytest.skip(f"{name}: {bundle.model.family.shared_prefix}")
    _assert_dpo_layouts_agree(bundle, _pref_samples(enc), checkpoint(root, name))


def _assert_dpo_layouts_agree(bundle, samples: list[dict], path, router_aux_loss_coef: float | None = None) -> None:
    """Native DPO's loss and gradients on shared-prefix rows == on two rows per pair (the pairs of `samples`);
    `router_aux_loss_coef` overrides an MoE policy's router-loss weight."""
    from vlmtrain.data.batching import collate_preference, collate_preference_prefix

    pad = bundle.tokenizer.pad_token_id
    shared = collate_preference_prefix(samples, pad, bundle.model.image_token_id)
    assert shared is not None and shared["pixel_values"].shape[0] * 2 == collate_preference(samples, pad)[
        "pixel_values"].shape[0]
    results = []
    for batch in (collate_preference(samples, pad), shared):
        policy = copy.deepcopy(bundle.model).train()
        with torch.no_grad():  # a policy that differs from the reference, so the loss has a gradient
            for p in policy.llm.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        policy.requires_grad_(False)
        policy.llm.requires_grad_(True)
        m = _dpo_module(bundle, path)
        m.model = policy
        if router_aux_loss_coef is not None:
            policy.router_aux_loss_coef = router_aux_loss_coef
        stats = m.accumulate_dpo([batch])
        results.append((stats, {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}))
    (sa, ga), (sb, gb) = results
    assert sa["pairs"] == sb["pairs"] == len(samples)
    assert abs(sa["loss"] - sb["loss"]) <= 1e-6 and sa["loss"] != pytest.approx(0.6931, abs=1e-3)
    assert ga.keys() == gb.keys() and len(ga) > 5
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3", "llava"])
def test_eager_attention_takes_the_same_rows(root, name):
    """Eager attention adds the mask to the scores: create_causal_mask gives it the additive form."""
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.model import build_model

    bundle = build_model(model_config(checkpoint(root, name)))
    m = bundle.model.eval().double()
    m.hf.set_attn_implementation("eager")
    assert m.llm.config._attn_implementation == "eager"
    groups = _groups(encoder_for(bundle), k=2)
    with torch.no_grad():
        got, _ = _score_rows(m, groups, bundle.tokenizer.pad_token_id)
        want = torch.stack([_alone_logp(m, g[j], _image_inputs(g[0])) for j in range(2) for g in groups])
    # eager attention takes its softmax in float32 even for float64 scores (transformers' eager_attention_forward),
    # so the two shapes differ at float32 rounding here (measured ≤1.2e-7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def _dpo_stage(path, share: bool):
    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.train.presets import with_preset

    return validate(StageConfig, with_preset({"name": "dpo", "preset": "dpo", "model": {"pretrained": str(path)},
                                              "data": {"train": [{"builtin": "digits-pref"}]},
                                              "dpo": {"share_prompt": share}}))


def test_dpo_stage_puts_pairs_in_shared_rows_unless_switched_off(family, root):
    """`dpo.share_prompt` (default on) reaches the loader through the stage check, the model and its encoder."""
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.data.loader import LoaderConfig, _SlotPipeline
    from vlmtrain.train.native import configure_shared_prefix

    name, bundle, _ = family
    m = bundle.model
    try:
        for share in (True, False):
            configure_shared_prefix(_dpo_stage(checkpoint(root, name), share), m)
            enc = encoder_for(bundle)
            assert enc.shared_prefix_rows is share
            pipe = _SlotPipeline([], [], enc, LoaderConfig(), bundle.tokenizer.pad_token_id, 0, 1, None)
            batch = pipe._collate(_pref_samples(enc))
            assert batch["preference"] and ("segments" in batch) is share and bool(batch.get("shared_prompt")) is share
    finally:
        m.dpo_shared_prefix = False


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_5_moe", "mllama", "llama4"])
def test_families_that_cannot_share_a_prefix_keep_two_rows_and_say_why(name):
    from types import SimpleNamespace

    from vlmtrain.model.native.families import FAMILIES as ROWS
    from vlmtrain.train.native import configure_shared_prefix, shared_prefix_refusal

    model = SimpleNamespace(family=ROWS[name], llm=SimpleNamespace(config=SimpleNamespace()), model_type=name)
    reason = shared_prefix_refusal(model)
    assert reason == ROWS[name].shared_prefix
    assert any(why in reason for why in ("linear attention", "cross_attention_mask", "temperature taken from the row"))
    configure_shared_prefix(SimpleNamespace(objective="dpo", dpo=SimpleNamespace(share_prompt=True)), model)
    assert model.dpo_shared_prefix is False
    # an unlisted family is judged by its LM: linear-attention layers or a mask-less attention keep two rows
    generic = SimpleNamespace(family=ROWS["qwen2_vl"], llm=SimpleNamespace(config=SimpleNamespace(
        layer_types=["linear_attention", "full_attention"])))
    assert "recurrent state" in shared_prefix_refusal(generic)
    flash = SimpleNamespace(family=ROWS["qwen2_vl"], llm=SimpleNamespace(config=SimpleNamespace(
        _attn_implementation="flash_attention_2")))
    assert "flash_attention_2" in shared_prefix_refusal(flash)


# families beyond FAMILIES, each with what it needs to build: a user's chat template (none vendored) or none (PaliGemma)
OTHER_FAMILIES = ("qwen3_vl_moe", "internvl", "gemma4", "paligemma", "glm4v", "glm4v_moe", "mistral3")
# mixture-of-experts LMs run in float32: their experts' grouped matmul takes no float64
FLOAT32_ONLY = ("qwen3_vl_moe", "glm4v_moe")


@pytest.fixture(scope="module")
def other_family(root):
    """name → (bundle, prompts), each built once per module. PaliGemma takes one user turn with images (its
    prefix), so its prompts are the image ones."""
    from test_native_gemma4_paligemma_glm4v import GEMMA4_TEMPLATE, GLM4V_TEMPLATE
    from native_fixtures import USER_TEMPLATES
    from test_native_mllama_internvl import INTERNVL_TEMPLATE
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.model import build_model

    built: dict = {}

    def get(name: str):
        if name not in built:
            template = {"internvl": INTERNVL_TEMPLATE, "gemma4": GEMMA4_TEMPLATE, "glm4v": GLM4V_TEMPLATE,
                        "glm4v_moe": GLM4V_TEMPLATE, "mistral3": USER_TEMPLATES["mistral3"]}.get(name)
            bundle = build_model(model_config(checkpoint(root, name),
                                              **({"chat_template": template} if template else {})))
            bundle.model.eval()
            built[name] = bundle, [p for p in PROMPTS if p[1]] if name == "paligemma" else PROMPTS
        return built[name]

    return get


@pytest.mark.parametrize("name", OTHER_FAMILIES)
def test_the_other_listed_families_score_continuations_as_alone(other_family, name):
    """Shared-prefix rows (k = 3) of: the mixture-of-experts Qwen3-VL and GLM-4.5V (experts route each token alone:
    the row changes no routing), InternVL (tile-indexed images, a Qwen2 LM), Gemma 4 (image blocks on
    `mm_token_type_ids`, sliding layers only), PaliGemma (its prompt one bidirectional prefix block, 1-indexed
    positions, answers causal with token_type_ids 1), GLM-4.1V / 4.5V (mRoPE ids from their own
    `get_rope_index`) and Mistral 3 (Pixtral's per-image patch grids, merged 2×2). float64 (≤1e-9), float32 for the MoE LMs (≤1e-5)."""
    from vlmtrain.data.encode import encoder_for

    bundle, prompts = other_family(name)
    m = bundle.model if name in FLOAT32_ONLY else copy.deepcopy(bundle.model).double()
    assert not m.family.shared_prefix
    groups = _groups(encoder_for(bundle), k=3, prompts=prompts)
    with torch.no_grad():
        got, rows = _score_rows(m, groups, bundle.tokenizer.pad_token_id)
        alone = [_alone_tokens(m, g[j], _image_inputs(g[0])) for j in range(3) for g in groups]
    assert int((rows["segments"] == 0).sum()) > len(groups) * 8
    tol = 1e-5 if name in FLOAT32_ONLY else 1e-9
    torch.testing.assert_close(got, torch.stack([lp.sum() for _, lp in alone]).to(got.dtype), rtol=0, atol=tol)
    for seq, (where, lp) in enumerate(alone):
        mine = rows["seq_index"] == seq
        assert torch.equal(rows["token_index"][mine], where)
        torch.testing.assert_close(rows["token_logps"][mine], lp.to(got.dtype), rtol=0, atol=tol)


@pytest.mark.parametrize("name, change", [("gemma4", {"image_block_key": "token_type_ids"}),
                                          ("paligemma", {"prefix_suffix": False})])
def test_gemma4_and_paligemma_rules_are_what_makes_rows_equal(other_family, name, change):
    """Controls: Gemma 4's image blocks read from a key its batches lack (so images attend causally), or PaliGemma's
    prefix without its bidirectional block, move the shared rows' scores off the sequences alone, so the equality
    above rests on those rules. (PaliGemma's 1-indexed positions are not one: RoPE is relative, so positions from 0
    move its float64 scores by ≤4.2e-10 only; they are kept for transformers' own numbers.) (The sliding-only rule has no control here: the tiny Gemma 4's full-attention layer is its last, whose
    image-token outputs reach no scored token.)"""
    import dataclasses

    from vlmtrain.data.encode import encoder_for

    bundle, prompts = other_family(name)
    m = copy.deepcopy(bundle.model).double()
    groups = _groups(encoder_for(bundle), k=2, prompts=prompts)
    with torch.no_grad():
        want = torch.stack([_alone_logp(m, g[j], _image_inputs(g[0])) for j in range(2) for g in groups])
        m.family = dataclasses.replace(m.family, **change)
        got, _ = _score_rows(m, groups, bundle.tokenizer.pad_token_id)
    assert float((got - want).abs().max()) > 1e-3


def test_a_sliding_window_in_every_layer_keeps_continuations_as_alone(other_family):
    """Mistral's LM slides in every layer when its config sets `sliding_window` (no `layer_types`; Mistral 3's
    checkpoints set none). With a window of 8 positions, shorter than every prompt here, shared rows still equal each
    sequence alone (float64, ≤1e-9), and the window changes those scores, so it is in force."""
    from vlmtrain.data.encode import encoder_for

    bundle, prompts = other_family("mistral3")
    m = copy.deepcopy(bundle.model).double()
    assert getattr(m.llm.config, "layer_types", None) is None
    groups = _groups(encoder_for(bundle), k=3, prompts=prompts)
    with torch.no_grad():
        unwindowed = torch.stack([_alone_logp(m, g[j], _image_inputs(g[0])) for j in range(3) for g in groups])
        m.llm.config.sliding_window = 8
        got, _ = _score_rows(m, groups, bundle.tokenizer.pad_token_id)
        alone = torch.stack([_alone_logp(m, g[j], _image_inputs(g[0])) for j in range(3) for g in groups])
    torch.testing.assert_close(got, alone.to(got.dtype), rtol=0, atol=1e-9)
    assert float((alone - unwindowed).abs().max()) > 1e-3


def test_a_stray_sliding_window_key_does_not_slide_an_lm_that_never_reads_it(other_family):
    """GLM-4.1V's text config (like LlamaConfig) keeps a `sliding_window` key of a config.json without declaring
    it, and its forward never slides: shared rows still equal each sequence alone with a window of 8 set."""
    from vlmtrain.data.encode import encoder_for

    bundle, prompts = other_family("glm4v")
    m = copy.deepcopy(bundle.model).double()
    m.llm.config.sliding_window = 8
    groups = _groups(encoder_for(bundle), k=2, prompts=prompts)
    with torch.no_grad():
        got, _ = _score_rows(m, groups, bundle.tokenizer.pad_token_id)
        alone = torch.stack([_alone_logp(m, g[j], _image_inputs(g[0])) for j in range(2) for g in groups])
    torch.testing.assert_close(got, alone.to(got.dtype), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["gemma4", "paligemma", "glm4v", "glm4v_moe", "mistral3"])
def test_dpo_on_shared_rows_equals_two_rows_for_the_other_families(other_family, root, name):
    from vlmtrain.data.encode import encoder_for

    bundle, prompts = other_family(name)
    # GLM-4.5V with its router loss off: the router loss of a shared row counts the prompt's tokens once, two rows
    # count them twice, so with it on the objectives differ by design (measured: gradients 5.3e-6 apart, max 0.06)
    coef = 0.0 if bundle.model.family.router_aux_loss else None
    _assert_dpo_layouts_agree(bundle, _pref_samples(encoder_for(bundle), prompts), checkpoint(root, name), coef)
