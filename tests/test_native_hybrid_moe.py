"""The newer native families (Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE) against transformers' own classes.

One tiny checkpoint per family per pytest run (`save_pretrained` folders, as a user's download would be). Per family:
vlmtrain's forward equals transformers' logits exactly on a batch with images, the checkpoint carries the official
template and labels come from the marked copy's assistant spans, and LoRA merges into the same model. `describe` on
each family's default config is checked against transformers' count by the whole-mapping walk
(tests/test_describe_all.py).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from native_fixtures import NEW_FAMILIES, adapter_step, assert_merge_keeps_logits, checkpoint, model_config, records


@pytest.fixture(scope="session")
def new_family_root(tmp_path_factory):
    return tmp_path_factory.mktemp("native-new")


@pytest.fixture(scope="session")
def bundles(new_family_root):
    """family → a builder of a fresh bundle from the session's one tiny checkpoint of that family."""
    from vlmtrain.model import build_model

    def build(family):
        return build_model(model_config(checkpoint(new_family_root, family)))

    return build


def _batch(bundle):
    """Padded batch of native_fixtures.records(): one image, text only (two turns), two images."""
    from vlmtrain.data.batching import collate
    from vlmtrain.data.encode import encoder_for

    enc = encoder_for(bundle)
    samples = [enc(r, ims) for r, ims in records()]
    return samples, collate(samples, bundle.tokenizer.pad_token_id)


def _args(b):
    from vlmtrain.train.module import model_extras

    return (b["input_ids"], b["pixel_values"], b["attention_mask"]), model_extras(b)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_forward_equals_transformers_logits_exactly(bundles, family):
    bundle = bundles(family)
    m = bundle.model
    _, b = _batch(bundle)
    (ids, pixels, mask), extras = _args(b)
    assert pixels is not None and int((ids == m.image_token_id).sum()) > 0
    m.eval()
    with torch.no_grad():
        ours = m(ids, pixels, mask, **extras).logits
        ref = m.hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, **extras).logits
    assert m.hf.config.model_type == family
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_checkpoint_carries_the_official_template_and_labels_are_the_assistant_spans(bundles, family):
    from vlmtrain.model.native.families import FAMILIES
    from vlmtrain.model.native.templates import official_template, training_template

    bundle = bundles(family)
    key = FAMILIES[family].template
    assert key == ("qwen3_vl" if family == "qwen3_vl_moe" else "qwen3_5")
    assert bundle.processor.chat_template == official_template(key)
    assert bundle.template == training_template(key)
    samples, _ = _batch(bundle)
    tok = bundle.tokenizer
    for (rec, _), s in zip(records(), samples):
        # the encoded text is what the official template renders (transformers' own apply_chat_template), with
        # each image's one placeholder expanded to its grid's tokens by the processor
        official = tok.apply_chat_template(rec["messages"], chat_template=official_template(key), tokenize=False)
        assert re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", tok.decode(s["input_ids"])) == official
        sup = tok.decode([t for t in s["labels"] if t != -100])
        answers = [p["text"] for m in rec["messages"] if m["role"] == "assistant" for p in m["content"]]
        think = "<think>\n\n</think>\n\n" if key == "qwen3_5" else ""  # Qwen3.5: the last answer's think block
        expected = "".join(a + "<|im_end|>\n" for a in answers[:-1]) + think + answers[-1] + "<|im_end|>\n"
        assert sup == expected


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_lora_trains_adapters_only_and_merges_to_the_same_model(bundles, family):
    from vlmtrain.config.stage import LoRAConfig
    from vlmtrain.model.lora import apply_lora

    m = bundles(family).model
    _, b = _batch(bundles(family))
    args, extras = _args(b)
    names = apply_lora(m, LoRAConfig(r=4), llm=True, vision=False)
    assert names and all(n.startswith("llm.model.layers.") for n in names)
    # the default targets reach both of Qwen3.5's token mixers: Gated DeltaNet (layer 0) and attention (layer 1)
    def mixer(layer: int) -> list[str]:  # adapted projections of the layer's token mixer (attention or DeltaNet)
        return sorted(n.rsplit(".", 1)[1] for n in names if n.startswith(f"llm.model.layers.{layer}.") and "attn." in n)

    if family.startswith("qwen3_5"):
        assert mixer(0) == ["in_proj_a", "in_proj_b", "in_proj_qkv", "in_proj_z", "out_proj"]
    assert mixer(1) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    # MoE: the fused expert tensors get adapters too (PEFT target_parameters), so the merge below covers them
    experts = {n.split(".")[-1] for n in names if ".mlp.experts." in n}
    assert experts == ({"gate_up_proj", "down_proj"} if family.endswith("moe") else set())
    trained = adapter_step(m, args, extras)
    assert trained and all("lora_" in n for n in trained)
    assert_merge_keeps_logits(m, args, extras)


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_packing_is_refused_for_linear_attention_with_one_line(new_family_root, tmp_path, family, capsys):
    """transformers' CPU Gated DeltaNet ignores packed-sample boundaries (its state and convolution window run over
    the whole row), so `vlmtrain fit` with `data.mode: pack` stops before any data is read: exit 2, one line."""
    import yaml

    from vlmtrain.cli.main import main

    cfg = {"name": "sft", "preset": "sft", "model": {"pretrained": str(checkpoint(new_family_root, family))},
           "data": {"train": [{"path": str(tmp_path / "no-shards")}], "mode": "pack", "num_workers": 0},
           "trainer": {"max_steps": 1}}
    path = tmp_path / "pack.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: data.mode: pack is refused for {family}: its Gated DeltaNet (linear attention) layers "
                      "carry a recurrent state and a convolution window across packed samples; use data.mode: plain "
                      "or group"]


def test_packing_refusal_follows_the_family_row_and_linear_attention_layers():
    """The packing refusal is data: the family row's reason, or any LM with linear-attention layers (a generic-map
    family); Transformer-only families keep packing (their isolation: tests/test_native_pack.py)."""
    from types import SimpleNamespace

    from vlmtrain.model.native.families import FAMILIES, Family
    from vlmtrain.train.native import packing_refusal

    full = SimpleNamespace(layer_types=["full_attention"] * 2)
    hybrid = SimpleNamespace(layer_types=["linear_attention", "full_attention"])
    assert packing_refusal(FAMILIES["qwen3_5"], hybrid) == FAMILIES["qwen3_5"].no_packing != ""
    assert packing_refusal(FAMILIES["qwen3_5_moe"], hybrid) == FAMILIES["qwen3_5"].no_packing
    assert packing_refusal(FAMILIES["qwen3_vl_moe"], full) == ""
    assert packing_refusal(FAMILIES["qwen3_vl"], SimpleNamespace()) == ""
    assert "linear-attention" in packing_refusal(Family({}, ""), hybrid)


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5_moe"])
def test_router_aux_loss_equals_transformers_and_enters_the_objective(bundles, family):
    """The router load-balancing loss vlmtrain adds is transformers' own `aux_loss` for the same (padded, image)
    batch, and one LM step's objective is transformers' own MoE training loss, CE mean + coef·aux: same gradients."""
    from types import SimpleNamespace

    from vlmtrain.train.module import VLMModule

    bundle = bundles(family)
    m = bundle.model
    coef = m.hf.config.text_config.router_aux_loss_coef
    assert m.router_aux_loss_coef == coef > 0
    _, b = _batch(bundle)
    (ids, pixels, mask), extras = _args(b)
    m.train()  # dropout is 0 in these configs; training mode is where the objective runs
    ref = m.hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=b["labels"],
               output_router_logits=True, **extras)
    logits, router = m(ids, pixels, mask, router_aux=True, **extras)
    assert torch.equal(logits.logits, ref.logits)
    assert torch.equal(router.aux, ref.aux_loss) and router.aux > 0
    # per-expert token slots, counted here from transformers' own router logits: top-2 of each real token, per layer
    keep = mask.reshape(-1).bool()
    want_counts = sum(torch.bincount(r[keep].topk(2, dim=-1).indices.reshape(-1), minlength=4)
                      for r in ref.router_logits)
    assert router.expert_tokens.tolist() == want_counts.tolist()
    assert sum(want_counts.tolist()) == len(ref.router_logits) * 2 * int(keep.sum())

    m.zero_grad()
    ref.loss.backward()  # transformers: mean CE over the shifted labels + coef · aux_loss
    want = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    module = VLMModule(bundle, SimpleNamespace(objective="next_token", dpo=SimpleNamespace(reference="copy")))
    stats = module.accumulate_lm([b])
    assert stats["moe/router_aux_loss"] == pytest.approx(float(ref.aux_loss.detach()), rel=1e-6)
    assert stats["moe/expert_tokens"] == want_counts.tolist()
    got = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and any("mlp.gate" in n for n in got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    # without the router loss the router's gradient differs: the term really is in the objective
    m.zero_grad()
    m.router_aux_loss_coef = 0.0
    module.accumulate_lm([b])
    gate = next(n for n in want if n.endswith("mlp.gate.weight"))
    assert not torch.allclose(dict(m.named_parameters())[gate].grad, want[gate], rtol=1e-4, atol=1e-6)
    m.eval()


def test_stage_overrides_the_router_loss_weight_and_dense_families_refuse_it():
    from types import SimpleNamespace

    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.model.native.families import FAMILIES
    from vlmtrain.train.native import configure_router_aux, family_refusals
    from vlmtrain.train.presets import with_preset

    def stage(**trainer):
        return validate(StageConfig, with_preset({"name": "s", "preset": "sft", "model": {"pretrained": "/nowhere"},
                                                  "data": {"train": [{"path": "x"}]}, "trainer": trainer}))

    moe = SimpleNamespace(family=FAMILIES["qwen3_5_moe"], model_type="qwen3_5_moe", router_aux_loss_coef=0.001,
                          llm=SimpleNamespace(config=SimpleNamespace()))
    dense = SimpleNamespace(family=FAMILIES["qwen3_vl"], model_type="qwen3_vl", router_aux_loss_coef=0.0,
                            llm=SimpleNamespace(config=SimpleNamespace()))
    configure_router_aux(stage(), moe)
    assert moe.router_aux_loss_coef == 0.001  # null: the checkpoint config's weight
    configure_router_aux(stage(router_aux_loss_coef=0.02), moe)
    assert moe.router_aux_loss_coef == 0.02
    assert family_refusals(stage(router_aux_loss_coef=0.02), moe) == []
    assert [p.split(":")[0] for p in family_refusals(stage(router_aux_loss_coef=0.02), dense)] == \
        ["trainer.router_aux_loss_coef"]
    # DP-SGD: the router loss is not a sum of per-record losses
    private = validate(StageConfig, with_preset({
        "name": "s", "preset": "sft", "model": {"pretrained": "/nowhere"}, "data": {"train": [{"path": "x"}]},
        "train": {"connector": False, "llm": "lora"}, "lora": {"r": 4},
        "privacy": {"noise_multiplier": 1.0, "delta": 1e-5}}))
    assert [p.split(":")[0] for p in family_refusals(private, moe)] == ["privacy"]
    assert family_refusals(private, dense) == []


def test_moe_sft_stage_runs_and_logs_the_router_loss(new_family_root, tmp_path):
    """`vlmtrain fit` of a Qwen3.5-MoE checkpoint with a stage weight for the router loss trains, and each logged step
    carries the (unweighted) router loss `moe/router_aux_loss` and per-expert token counts next to a finite LM loss."""
    import math

    import yaml

    from shard_fixtures import cycled_shards
    from vlmtrain.cli.main import main

    cycled_shards(tmp_path / "shards", 8, per_shard=8)
    cfg = {"name": "sft", "preset": "sft", "model": {"pretrained": str(checkpoint(new_family_root, "qwen3_5_moe"))},
           "data": {"train": [{"path": str(tmp_path / "shards")}], "batch_size": 2, "num_workers": 0},
           "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
           "trainer": {"max_steps": 2, "log_every_n_steps": 1, "save_every_n_steps": 10,
                       "router_aux_loss_coef": 0.01}}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path), "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(rows) == 2
    for r in rows:
        # Switch loss with top-2 routing: 2 when perfectly balanced, at most 2·n_experts
        assert math.isfinite(r["loss"]) and 0 < r["moe/router_aux_loss"] < 8
        # per-expert token slots of the step: 4 experts, each token of the 2 MoE layers goes to 2 of them
        assert len(r["moe/expert_tokens"]) == 4 and sum(r["moe/expert_tokens"]) % 4 == 0


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5_moe"])
def test_expert_lora_trains_and_exports_as_a_peft_adapter_transformers_loads(bundles, family, tmp_path):
    """Fused experts `[E, 2·I, H]` / `[E, H, I]` get PEFT ParamWrapper adapters; after a step, the PEFT export
    (`target_parameters` in transformers' names) loaded by PEFT over transformers' own model gives vlmtrain's logits."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from vlmtrain.config.stage import LoRAConfig
    from vlmtrain.model.lora import apply_lora
    from vlmtrain.model.native.peft_export import export_native_peft

    bundle = bundles(family)
    m = bundle.model
    _, b = _batch(bundle)
    args, extras = _args(b)
    names = apply_lora(m, LoRAConfig(r=4), llm=True, vision=False)
    assert {n for n in names if ".experts." in n} == {f"llm.model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                                      for p in ("gate_up_proj", "down_proj")}
    expert_grads = [n for n in adapter_step(m, args, extras) if ".experts." in n]
    assert len(expert_grads) == 2 * 2 * 2  # layers × fused tensors × (lora_A, lora_B)
    with torch.no_grad():
        ours = m(*args, **extras).logits
    out = export_native_peft(bundle, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(out / "base"),
                                           out / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=args[0], pixel_values=args[1], attention_mask=args[2], **extras).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_dora_on_fused_experts_is_refused_with_the_way_out(bundles):
    from vlmtrain.config.stage import LoRAConfig
    from vlmtrain.errors import ConfigError
    from vlmtrain.model.lora import apply_lora

    m = bundles("qwen3_vl_moe").model
    with pytest.raises(ConfigError, match="llm_target_parameters: ''"):
        apply_lora(m, LoRAConfig(r=4, dora=True), llm=True, vision=False)
    assert len(apply_lora(m, LoRAConfig(r=4, dora=True, llm_target_parameters=""), llm=True, vision=False)) == 8


def test_qlora_over_both_token_mixers_and_experts_merges_to_the_same_model(bundles):
    """Qwen3.5-MoE QLoRA: the LM's linear layers (attention, Gated DeltaNet, shared expert) as NF4, adapters on them
    and on the fused experts (kept in full precision); after a step, dequantise + merge gives the same logits."""
    from vlmtrain.config.stage import LoRAConfig
    from vlmtrain.model.lora import apply_lora
    from vlmtrain.model.quantize import quantize_llm_

    bundle = bundles("qwen3_5_moe")
    m = bundle.model
    _, b = _batch(bundle)
    args, extras = _args(b)
    assert quantize_llm_(m, torch.float32) > 0
    names = apply_lora(m, LoRAConfig(r=4, quantize="4bit"), llm=True, vision=False)
    assert any(".linear_attn.in_proj_qkv" in n for n in names) and any(".experts." in n for n in names)
    adapter_step(m, args, extras)
    assert_merge_keeps_logits(m, args, extras, dequantize=True)


def test_dpo_policy_gets_the_router_loss_too(bundles):
    """DPO on an MoE family: the step's gradient is the DPO gradient plus coef · ∇(transformers' own `aux_loss` of
    the policy's forward on the same padded pair batch), the way TRL's DPO adds the router loss."""
    from types import SimpleNamespace

    from native_fixtures import IMG, assistant, image, user
    from vlmtrain.data.batching import collate_preference
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.train.module import VLMModule, model_extras

    bundle = bundles("qwen3_vl_moe")
    m = bundle.model
    enc = encoder_for(bundle)
    prefs = [({"id": "p1", "kind": "preference", "prompt": [user(IMG, "which digit")],
               "chosen": [assistant("seven")], "rejected": [assistant("one two three")]}, [image(40, 30, 4)]),
             ({"id": "p2", "kind": "preference", "prompt": [user("say a word")],
               "chosen": [assistant("yes")], "rejected": [assistant("no no")]}, [])]
    b = collate_preference([enc(r, ims) for r, ims in prefs], bundle.tokenizer.pad_token_id)
    stage = SimpleNamespace(objective="dpo", dpo=SimpleNamespace(reference="copy", beta=0.1, loss_type="sigmoid",
                                                                 label_smoothing=0.0))
    module = VLMModule(bundle, stage)
    m.train()

    def grads(coef: float) -> tuple[dict, dict]:
        m.zero_grad()
        m.router_aux_loss_coef = coef
        stats = module.accumulate_dpo([b])
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, stats

    with_aux, stats = grads(m.hf.config.text_config.router_aux_loss_coef)
    without, plain = grads(0.0)
    assert "moe/router_aux_loss" in stats and "moe/router_aux_loss" not in plain
    m.zero_grad()
    coef = m.hf.config.text_config.router_aux_loss_coef
    aux = m.hf(input_ids=b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"],
               output_router_logits=True, **model_extras(b)).aux_loss
    assert stats["moe/router_aux_loss"] == pytest.approx(float(aux.detach()), rel=1e-6)
    (coef * aux).backward()
    params = dict(m.named_parameters())
    assert with_aux.keys() == without.keys() and any(params[n].grad is not None for n in with_aux)
    for n in with_aux:  # parameters after the routers (final norm, head) get the same gradient either way
        extra = params[n].grad if params[n].grad is not None else torch.zeros_like(with_aux[n])
        torch.testing.assert_close(with_aux[n] - without[n], extra, rtol=1e-3, atol=1e-7, msg=n)
    m.eval()


def _packed_vs_alone(bundle) -> list[float]:
    """Max |logit difference| of each sample of test_native_pack's packed rows (3 and 4 samples, 0-2 images each)
    against the same sample run alone."""
    from test_native_pack import ROWS, _logits, _records
    from vlmtrain.data.batching import collate, collate_packed
    from vlmtrain.data.encode import encoder_for

    enc, pad = encoder_for(bundle), bundle.tokenizer.pad_token_id
    samples = {r["id"]: enc(r, ims) for r, ims in _records()}
    bundle.model.eval()
    logits = _logits(bundle.model, collate_packed([[samples[i] for i in row] for row in ROWS], pad), None)
    diffs = []
    for r, row in enumerate(ROWS):
        start = 0
        for sid in row:
            alone = collate([samples[sid]], pad)
            want = _logits(bundle.model, alone, alone["attention_mask"])[0]
            diffs.append(float((logits[r, start:start + want.shape[0]] - want).abs().max()))
            start += want.shape[0]
    return diffs


def test_qwen3_vl_moe_packed_rows_keep_samples_apart(bundles):
    """Qwen3-VL-MoE packs (Transformer layers only): each packed sample's logits equal it alone (≤1e-5)."""
    assert max(_packed_vs_alone(bundles("qwen3_vl_moe"))) <= 1e-5


def test_qwen3_5_packed_rows_leak_which_is_why_packing_is_refused(bundles):
    """The reason for the refusal, measured: in a packed Qwen3.5 row the first sample is exact and later ones are
    not (the Gated DeltaNet state and convolution window carry over). If transformers ever isolates them on CPU,
    this fails and the refusal (Family.no_packing) can go."""
    diffs = _packed_vs_alone(bundles("qwen3_5"))
    assert diffs[0] <= 1e-5 and max(diffs[1:]) > 1e-3


def test_trainable_table_says_how_many_expert_parameters_train(bundles):
    """LoRA on an MoE LM: the llm row counts the expert adapters among its trainable parameters (PEFT's lora_A
    `[r·E, in]` / lora_B `[out, r·E]` per fused tensor); full fine-tuning counts the fused tensors themselves."""
    from types import SimpleNamespace

    from vlmtrain.config.stage import LoRAConfig
    from vlmtrain.model.lora import apply_lora
    from vlmtrain.train.freeze import apply_stage_trainability

    m = bundles("qwen3_vl_moe").model
    cfg = m.llm.config
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    full = apply_stage_trainability(m, SimpleNamespace(vision=False, connector=False, llm=True))
    assert full["llm"]["experts_trainable"] == cfg.num_hidden_layers * e * (2 * i * h + h * i)
    assert "experts_trainable" not in full["vision"]
    apply_lora(m, LoRAConfig(r=4), llm=True, vision=False)
    table = apply_stage_trainability(m, SimpleNamespace(vision=False, connector=False, llm="lora"))
    r = 4 * e  # PEFT's ParamWrapper: one rank-r pair per expert, stacked
    per_layer = (r * h + 2 * i * r) + (r * i + h * r)  # gate_up_proj [E, 2I, H], down_proj [E, H, I]
    assert table["llm"]["experts_trainable"] == cfg.num_hidden_layers * per_layer
    assert 0 < table["llm"]["experts_trainable"] < table["llm"]["trainable"]
