"""The grpo stage for composed VLMs: prompt records from chat shards, one GRPO step's gradient against a
hand-assembled one (the same seeded sampling done per completion by transformers' `generate`, each completion scored
alone, the advantages and the clipped objective written out by hand), the adapters-off reference of a LoRA stage,
and a 2-step `vlmtrain fit` that writes the rl block."""

import copy
import json
import os
import subprocess

import pytest
import torch
import yaml

from conftest import TINY, VLMTRAIN, tiny_bundle
from shard_fixtures import chat_record, png_bytes, write_shards
from vlmtrain.data.encode import decode_image
from vlmtrain.data.schema import RecordError, validate_record

IMG = {"type": "image"}


def char_reward(completions, **kwargs):
    """A reward with spread on a random model: characters of the completion's text."""
    return [float(len(c[0]["content"])) for c in completions]


# ---- prompt records ------------------------------------------------------------------------------------------
def test_chat_record_prompt_is_the_conversation_before_its_last_assistant_turn():
    from vlmtrain.data.prompts import prompt_messages

    rec = chat_record(3, n_images=1, turns=2)
    msgs, cols = prompt_messages(rec)
    assert msgs == rec["messages"][:-1] and msgs[-1]["role"] == "user"
    assert cols == {"answer": rec["messages"][-1]["content"][0]["text"]}
    # a record carrying its ground truth as a field needs no assistant turn (and passes the shard schema)
    rec = {"id": "s", "kind": "chat", "solution": "7", "meta": {"source": "x"},
           "messages": [{"role": "user", "content": [IMG, {"type": "text", "text": "How many?"}]}]}
    validate_record(rec, 1)
    msgs, cols = prompt_messages(rec)
    assert msgs == rec["messages"] and cols["solution"] == "7" and cols["meta"] == {"source": "x"}
    with pytest.raises(RecordError, match="malformed_turns"):  # SFT still needs its assistant turn
        validate_record({**rec, "solution": None}, 1)


def test_prompt_encoder_tokenizes_as_generation_and_rejects_over_length(tiny):
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.data.prompts import PromptEncoder, end_of_turn_ids

    tok, m = tiny.tokenizer, tiny.model
    rec = chat_record(1, n_images=1)
    images = [decode_image(png_bytes(1), "r1")]
    x = PromptEncoder(encoder_for(tiny, 64), max_completion_length=8)(rec, images)
    text = tok.apply_chat_template(rec["messages"][:1], tokenize=False, add_generation_prompt=True)
    expected = []
    for t in tok(text, add_special_tokens=False)["input_ids"]:
        expected += [t] * m.num_image_tokens if t == m.image_token_id else [t]
    assert x["input_ids"] == expected and tok.decode(x["input_ids"][-1:]) == "<|assistant|>"
    assert x["columns"]["answer"] == "zero one" and x["columns"]["image_resize"]["resized"] == [32, 32]
    n = len(expected)
    PromptEncoder(encoder_for(tiny, n + 8), 8)(rec, images)  # exactly fits
    with pytest.raises(RecordError, match="over_length"):
        PromptEncoder(encoder_for(tiny, n + 7), 8)(rec, images)
    assert tok.convert_ids_to_tokens(end_of_turn_ids(tok, m.image_token_id)) == ["<|end|>"]


# ---- one step against a hand-assembled one -------------------------------------------------------------------
def _batch(bundle, n_prompts=2):
    from vlmtrain.data.batching import collate
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.data.prompts import PromptEncoder

    enc = PromptEncoder(encoder_for(bundle, 128), 5)
    images = lambda i: [decode_image(png_bytes(10 * i + j), "r") for j in range(1 + i % 2)]  # noqa: E731
    xs = [enc(chat_record(i, n_images=1 + i % 2), images(i)) for i in range(n_prompts)]
    b = collate(xs, bundle.tokenizer.pad_token_id)
    b.update(columns=[x["columns"] for x in xs], prompts=[x["prompt"] for x in xs], ids=[x["id"] for x in xs])
    return b, xs


def _stage(loss_type, fields=None, **grpo):
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.train.presets import with_preset

    return StageConfig(**with_preset({
        "name": "g", "preset": "grpo", "data": {"train": [{"builtin": "digits-qa"}]},
        "grpo": {"num_generations": 3, "max_completion_length": 5, "beta": 0.04, "loss_type": loss_type,
                 "temperature": 0.9, "top_k": 50, "rewards": [{"fn": "test_grpo_stage:char_reward"}], **grpo},
        **(fields or {})}))


def _hand_generate(vlm, xs, G, stop):
    """Keyed sampling done the plain way: every completion's images encoded in its own copy of the prompt
    (`VLM.embed` from pixels), transformers' `generate` on the embeddings with each completion's key (step 0 of a
    seed-0 run; the sampler itself is tested in test_grpo_sampler.py)."""
    from vlmtrain.train.grpo.generate import SamplingSettings
    from vlmtrain.train.grpo.sampler import NEUTRAL_WARPERS, KeyedSampler, completion_keys

    seqs = [x["input_ids"] for x in xs for _ in range(G)]
    s = max(map(len, seqs))
    ids = torch.tensor([[0] * (s - len(q)) + q for q in seqs])
    att = torch.tensor([[0] * (s - len(q)) + [1] * len(q) for q in seqs])
    pix = torch.cat([x["pixel_values"] for x in xs for _ in range(G)])
    keys = completion_keys(0, 0, [x["id"] for x in xs], G)
    vlm.eval()
    with torch.no_grad():
        out = vlm.llm.generate(inputs_embeds=vlm.embed(ids, pix), attention_mask=att, do_sample=True,
                               **NEUTRAL_WARPERS, logits_processor=[KeyedSampler(keys, SamplingSettings(0.9, 1.0, 50))],
                               max_new_tokens=5, eos_token_id=stop,
                               pad_token_id=0, suppress_tokens=[vlm.image_token_id])
    vlm.train()
    comps = []
    for row in out.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), None)
        comps.append(row if cut is None else row[:cut + 1])
    return comps


def _make_stopping_likely(vlm, xs, end: int, logit: float = 5.5) -> None:
    """Point the end-of-turn row of the LM head along the prompts' mean final hidden state, so a random model ends
    some completions early: completions of different lengths (padding, per-sequence token counts) in one group."""
    with torch.no_grad():
        h = torch.cat([vlm(torch.tensor([x["input_ids"]]), x["pixel_values"], output_hidden_states=True)
                       .hidden_states[-1][0] for x in xs]).mean(0)
        vlm.llm.lm_head.weight[end] = h * (logit / h.dot(h))


def _alone_logps(vlm, prompt, pixels, completion):
    ids = torch.tensor([prompt + completion])
    logp = vlm(ids, pixels).logits[0].float().log_softmax(-1)
    p = len(prompt)
    return logp[p - 1:p - 1 + len(completion)].gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_one_step_gradient_equals_a_hand_assembled_step(loss_type):
    from vlmtrain.train.freeze import apply_stage_trainability
    from vlmtrain.train.grpo.module import GRPOModule

    bundle = tiny_bundle(TINY)
    vlm, G, eps, beta = bundle.model, 3, 0.2, 0.04
    ref = copy.deepcopy(vlm).eval()
    stage = _stage(loss_type)
    apply_stage_trainability(vlm, stage.train)  # the grpo preset: the LLM trains, tower and connector frozen
    module = GRPOModule(bundle, stage)
    with torch.no_grad():  # the policy moves away from its reference, so the KL term has a gradient
        for p in vlm.llm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch, xs = _batch(bundle)
    _make_stopping_likely(vlm, xs, module.stop_ids[0])
    seen = []  # images through the vision tower during the step: generation, reference and loss forward
    hooks = [tower.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
             for tower in (vlm.vision, module._ref[0].vision)]
    try:
        stats = module.accumulate({"micro": [batch]})
    finally:
        for hook in hooks:
            hook.remove()
    assert sum(seen) == 3  # 1 + 2 images, each encoded once for its G = 3 completions (frozen tower and connector)
    trainable = [(n, p) for n, p in vlm.named_parameters() if p.requires_grad]
    ours = {n: p.grad.clone() for n, p in trainable}
    vlm.zero_grad(set_to_none=True)

    comps = _hand_generate(vlm, xs, G, module.stop_ids)
    rows = module.rollouts[0]["rows"]
    assert [rows.targets[rows.out_index[:, 0] == k].tolist() for k in range(len(comps))] == comps
    assert len({len(c) for c in comps}) > 1 and any(c[-1] in module.stop_ids for c in comps)
    texts = bundle.tokenizer.batch_decode(comps, skip_special_tokens=True)
    rewards = torch.tensor([float(len(t)) for t in texts]).view(-1, G)
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
    per_seq, n_tokens = [], 0
    for k, c in enumerate(comps):
        x = xs[k // G]
        lp = _alone_logps(vlm, x["input_ids"], x["pixel_values"], c)
        with torch.no_grad():
            rlp = _alone_logps(ref, x["input_ids"], x["pixel_values"], c)
        ratio = torch.exp(lp - lp.detach())
        per_tok = -torch.min(ratio * adv[k], ratio.clamp(1 - eps, 1 + eps) * adv[k])
        per_tok = per_tok + beta * (torch.exp(rlp - lp) - (rlp - lp) - 1)
        per_seq.append(per_tok.sum() if loss_type == "dapo" else per_tok.mean())
        n_tokens += len(c)
    loss = sum(per_seq) / (n_tokens if loss_type == "dapo" else len(comps))
    loss.backward()
    assert stats["loss"] == pytest.approx(float(loss.detach()), abs=1e-6)
    assert stats["rl/reward"] == pytest.approx(float(rewards.mean()), abs=1e-5)
    assert any(float(p.grad.abs().max()) > 1e-4 for _, p in trainable)
    for n, p in trainable:
        torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


# ---- a 2-step stage through the CLI ---------------------------------------------------------------------------
def test_fit_two_steps_writes_rl_block_metrics_and_completions(tmp_path):
    long_q = {"role": "user", "content": [IMG, {"type": "text", "text": " ".join(["digit"] * 80)}]}
    samples = []
    for i in range(12):
        rec = chat_record(i, n_images=1)
        if i % 3 == 0:  # prompt longer than max_len - max_completion_length: rejected, never cut
            rec["messages"][0] = long_q
        samples.append((rec, [png_bytes(i)]))
    write_shards(tmp_path / "shards", samples, per_shard=6)
    (tmp_path / "myrewards.py").write_text("def chars(completions, answer, **kw):\n"
                                           "    return [float(len(c[0]['content'])) for c in completions]\n")
    stage = {"name": "grpo", "preset": "grpo", "model": str(TINY),
             "rewards": [{"fn": "myrewards:chars", "weight": 1.0}],
             "grpo": {"num_generations": 3, "max_completion_length": 4, "beta": 0.04, "num_iterations": 2,
                      "log_completions_every": 1},
             "data": {"train": [{"path": str(tmp_path / "shards")}], "batch_size": 2, "num_workers": 0,
                      "max_len": 64, "shuffle_buffer": 1},
             "trainer": {"max_steps": 2}}
    (tmp_path / "stage.yaml").write_text(yaml.safe_dump(stage))
    r = subprocess.run([*VLMTRAIN, "fit", "--config", "stage.yaml", "--out", "run"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    comps = [json.loads(ln) for ln in (run / "completions.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and [r["step"] for r in rows] == [1, 2]
    # num_iterations 2: step 2 trains again on step 1's rollout (no new generation, no new completions)
    assert {c["step"] for c in comps} == {1} and len(comps) == 2 * 3
    assert rows[1]["rl/generate_seconds"] == 0.0 and rows[0]["rl/generate_seconds"] > 0
    assert rows[0]["rl/reward"] == rows[1]["rl/reward"]
    # the rewards logged are the function's on the completions written (recomputed here from the text)
    assert all(c["rewards"]["chars"] == len(c["completion"]) == c["reward"] for c in comps)
    mean = sum(c["reward"] for c in comps) / len(comps)
    assert rows[0]["rl/reward"] == pytest.approx(mean, abs=1e-4)
    assert rows[0]["rewards/chars/mean"] == pytest.approx(mean, abs=1e-4)
    rl = summary["rl"]
    for key in ("reward_mean", "reward_std", "kl", "completion_len_mean", "entropy", "zero_spread_fraction",
                "completion_clipped_fraction", "generate_time_share"):
        assert rl[key] is not None, key
    assert rl["reward_mean"] == pytest.approx(mean, abs=1e-4) and rl["rewards"]["chars"] == pytest.approx(mean, 1e-4)
    assert 1 <= rl["completion_len_mean"] <= 4 and rl["kl"] >= 0
    # completions.png: a PNG the summary lists, drawn from completions.jsonl
    assert "completions.png" in summary["plots"]
    assert (run / "completions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # over-long prompts were counted and never trained on
    long_ids = {f"r{i}" for i in range(12) if i % 3 == 0}
    assert summary["skipped"].get("over_length", 0) >= 1 and not {c["id"] for c in comps} & long_ids


@pytest.mark.slow  # two tiny-model GRPO steps each (make test-fast keeps the hand-assembled step)
@pytest.mark.parametrize("quantize", [None, "4bit"], ids=["lora", "qlora"])
def test_lora_stage_reference_is_the_policy_with_adapters_off(quantize):
    """A LoRA or QLoRA grpo stage loads no second model: its reference log-probs are the base model's (a copy taken
    before the adapters were added, the NF4 base for QLoRA, each completion scored alone), and only adapter weights
    get gradients."""
    from vlmtrain.model.lora import apply_lora
    from vlmtrain.train.freeze import apply_stage_trainability
    from vlmtrain.train.grpo.module import GRPOModule

    bundle = tiny_bundle(TINY)
    if quantize:  # as the stage does before adding adapters (train/stage.py)
        from vlmtrain.model.quantize import quantize_llm_

        assert quantize_llm_(bundle.model, torch.float32) > 0
    base = copy.deepcopy(bundle.model).eval()
    stage = _stage("dapo", {"train": {"llm": "lora"},
                            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "quantize": quantize}})
    apply_lora(bundle.model, stage.lora, llm=True, vision=False)
    apply_stage_trainability(bundle.model, stage.train)
    with torch.no_grad():  # adapters that change the policy (LoRA's B starts at zero)
        for n, p in bundle.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    module = GRPOModule(bundle, stage)
    assert module.reference == "adapters_off" and module._ref == []
    batch, xs = _batch(bundle)
    torch.manual_seed(3)
    stats = module.accumulate({"micro": [batch]})
    ro, G = module.rollouts[0], 3
    comps = [ro["rows"].targets[ro["rows"].out_index[:, 0] == k].tolist() for k in range(2 * G)]
    for k, c in enumerate(comps):
        x = xs[k // G]
        with torch.no_grad():
            expected = _alone_logps(base, x["input_ids"], x["pixel_values"], c)
        torch.testing.assert_close(ro["ref"][k, :len(c)], expected, atol=1e-5, rtol=0)
    assert stats["rl/kl"] > 0  # the adapted policy differs from its reference
    grads = {n for n, p in bundle.model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)


def same_reward(completions, **kwargs):
    return [1.0 for _ in completions]


@pytest.mark.slow  # the loss-level equality of dropped groups is in the fast tier (test_grpo_loss.py)
@pytest.mark.parametrize("dynamic", [False, True], ids=["kept", "dropped"])
def test_dynamic_sampling_drops_groups_whose_rewards_all_agree(dynamic):
    """Every group's rewards equal (no advantage): without dynamic sampling the KL term (beta 0.04, a policy away
    from its reference) still trains every completion; with it the groups leave the loss, which is then 0 with no
    gradient."""
    from vlmtrain.train.freeze import apply_stage_trainability
    from vlmtrain.train.grpo.module import GRPOModule

    bundle = tiny_bundle(TINY)
    stage = _stage("grpo", dynamic_sampling=dynamic, rewards=[{"fn": "test_grpo_stage:same_reward"}])
    apply_stage_trainability(bundle.model, stage.train)
    module = GRPOModule(bundle, stage)
    with torch.no_grad():
        for p in bundle.model.llm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch, _ = _batch(bundle)
    stats = module.accumulate({"micro": [batch]})
    ro = module.rollouts[0]
    grads = [p.grad for p in bundle.model.parameters() if p.requires_grad and p.grad is not None]
    assert stats["rl/zero_spread_fraction"] == 1.0
    if dynamic:
        assert ro["kept"] == 0 and ro["mask"].sum() == 0 and stats["loss"] == 0.0
        assert all(g.abs().max() == 0 for g in grads)
    else:
        assert ro["kept"] == 6 and stats["loss"] > 0 and any(g.abs().max() > 0 for g in grads)
