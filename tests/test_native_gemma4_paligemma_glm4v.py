"""Gemma 4 (`gemma4`), PaliGemma (`paligemma`) and GLM-4.1V (`glm4v`) against transformers' own model and processor.

One tiny `save_pretrained` checkpoint per family per pytest run (module-scoped). Gemma 4: forward on a batch of 0/1/2-
image samples equals transformers' logits exactly; labels are the configured template's assistant spans (no official
template is vendored, so `chat_template:` is required, one exit-2 line otherwise); the audio tower is a frozen role
(frozen at build, a frozen row of the trainable table, counted by describe); packed rows keep samples apart (image
blocks bidirectional on sliding layers only); LoRA and QLoRA merge to the same logits.

PaliGemma (no chat template exists): samples are PaliGemmaProcessor(suffix=)'s own prefix + suffix, labels the suffix
only; the prefix's logits do not depend on the answer (it never enters the bidirectional block); forward equals
transformers' exactly; chat_template: and packing refused with one line; LoRA merges; an SFT stage trains.

GLM-4.1V / GLM-4.5V (no verbatim template offline: `chat_template:` required): forward equals transformers' exactly,
labels the configured template's assistant spans, packed rows keep samples apart, LoRA merges, GLM-4.5V's router loss
equals transformers' `aux_loss`. `describe` totals of the default configs: the whole-mapping walk
(tests/test_describe_all.py).
"""

from __future__ import annotations

import pytest
import torch

from native_fixtures import (USER_TEMPLATES, adapter_step, assert_merge_keeps_logits, assistant, checkpoint, model_config,
                             records, user)


def _args(b):
    from vlmtrain.train.module import model_extras

    return (b["input_ids"], b["pixel_values"], b["attention_mask"]), model_extras(b)


def encoded_records(bundle):
    from vlmtrain.data.batching import collate
    from vlmtrain.data.encode import encoder_for

    enc = encoder_for(bundle)
    samples = [enc(r, ims) for r, ims in records()]  # one image; text only (two turns); two images
    return samples, collate(samples, bundle.tokenizer.pad_token_id)


# ---- Gemma 4 -----------------------------------------------------------------------------------------------------

GEMMA4_TEMPLATE = USER_TEMPLATES["gemma4"]  # the test template in gemma4's layout (native_fixtures)


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
    _, b = encoded_records(gemma4)
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
    samples, _ = encoded_records(gemma4)
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


def test_gemma4_describe_of_the_folder_needs_no_template_and_shows_the_frozen_audio_row(gemma4_root, tmp_path,
                                                                                          capsys):
    """`describe` never renders a conversation: the folder is described without `chat_template:`; the audio role is
    its own row, said frozen, and the roles sum to transformers' parameter count."""
    import json

    from transformers import AutoModelForImageTextToText

    from vlmtrain.cli.main import main

    folder = checkpoint(gemma4_root, "gemma4")
    path = tmp_path / "m.yaml"
    path.write_text(f"pretrained: {folder}\n")
    assert main(["describe", "--config", str(path)]) == 0
    audio = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("audio")]
    assert len(audio) == 1 and audio[0].endswith("model.audio_tower, model.embed_audio  (frozen: no stage trains it)")
    assert main(["describe", "--config", str(path), "--json"]) == 0
    params = json.loads(capsys.readouterr().out)["params"]
    want = sum(p.numel() for p in AutoModelForImageTextToText.from_pretrained(folder).parameters())
    assert params["total"] == want == sum(v for k, v in params.items() if k != "total") and params["audio"] > 0


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
    _, b = encoded_records(gemma4)
    args, extras = _args(b)
    if quantize:
        assert quantize_llm_(m, torch.float32) > 0
    # the tower's projections are `Gemma4ClippableLinear` wrappers around `.linear`: the family's vision regex
    # (Family.vision_lora_target) replaces the default one, which ends at `_proj`
    names = apply_lora(m, LoRAConfig(r=4, quantize="4bit" if quantize else None), llm=True, vision=not quantize)
    assert any(n.startswith("llm.model.layers.1.self_attn.") for n in names)
    assert quantize or {n.rsplit(".", 2)[1] for n in names if n.startswith("vision.model.encoder.layers.0.")} == \
        {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not any(n.startswith("audio.") for n in names)
    trained = adapter_step(m, args, extras)
    assert trained and all("lora_" in n for n in trained)
    assert_merge_keeps_logits(m, args, extras, dequantize=quantize)


# ---- PaliGemma ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paligemma_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("native-paligemma")
    checkpoint(root, "paligemma")
    return root


@pytest.fixture
def paligemma(paligemma_root):
    from vlmtrain.model import build_model

    return build_model(model_config(checkpoint(paligemma_root, "paligemma")))


def _image_records():
    """The shared records PaliGemma takes: one user turn with its images and one answer (one and two images)."""
    return [(r, ims) for r, ims in records() if ims]


def _paligemma_batch(bundle):
    from vlmtrain.data.batching import collate
    from vlmtrain.data.encode import encoder_for

    enc = encoder_for(bundle)
    samples = [enc(r, ims) for r, ims in _image_records()]
    return enc, samples, collate(samples, bundle.tokenizer.pad_token_id)


def test_paligemma_samples_are_the_processors_prefix_and_suffix(paligemma):
    """No chat template: each sample is exactly what PaliGemmaProcessor(suffix=) builds for fine-tuning (image tokens +
    <bos> + prompt + newline, then answer + <eos> with token_type_ids 1), and the labels are the suffix alone."""
    from vlmtrain.data.schema import RecordError

    assert paligemma.template is None
    enc, samples, _ = _paligemma_batch(paligemma)
    proc, tok = paligemma.processor, paligemma.tokenizer
    for (rec, ims), s in zip(_image_records(), samples):
        prompt = rec["messages"][0]["content"][-1]["text"]
        answer = rec["messages"][1]["content"][0]["text"]
        ref = proc(text=["<image>" * len(ims) + prompt], images=[ims], suffix=[answer], return_tensors="pt")
        assert s["input_ids"] == ref["input_ids"][0].tolist()
        assert s["labels"] == ref["labels"][0].tolist()
        types = s["token_extras"]["token_type_ids"]
        assert types == ref["token_type_ids"][0].tolist()
        assert [t for t, y in zip(s["input_ids"], types) if y == 1] == [t for t in s["labels"] if t != -100]
        assert tok.decode([t for t in s["labels"] if t != -100]) == answer + "<eos>"
        assert tok.decode(s["input_ids"]).endswith(f"<bos>{prompt}\n{answer}<eos>")
    with pytest.raises(RecordError, match="malformed_turns"):  # text only, two exchanges: no template joins them
        enc(*records()[1])


def test_paligemma_answer_never_reaches_the_bidirectional_prefix(paligemma):
    """The prefix attends bidirectionally, the suffix causally: the prefix's logits are the same whatever the answer,
    and equal those of the generation prompt alone (the answer is not in the prefix block)."""
    from vlmtrain.data.batching import collate
    from vlmtrain.data.encode import encoder_for

    m, enc = paligemma.model, encoder_for(paligemma)
    rec, ims = _image_records()[0]
    other = {**rec, "messages": [rec["messages"][0], {"role": "assistant",
                                                      "content": [{"type": "text", "text": "nine nine"}]}]}
    m.eval()
    logits = []
    for r in (rec, other):
        b = collate([enc(r, ims)], paligemma.tokenizer.pad_token_id)
        (ids, pixels, mask), extras = _args(b)
        with torch.no_grad():
            logits.append(m(ids, pixels, mask, **extras).logits[0])
    prompt = enc.prompt_inputs(rec["messages"][:1], ims)
    with torch.no_grad():
        alone = m(prompt["input_ids"], prompt["pixel_values"], prompt["attention_mask"],
                  token_type_ids=prompt["token_type_ids"]).logits[0]
    n = alone.shape[0]
    assert torch.equal(logits[0][:n], logits[1][:n])
    torch.testing.assert_close(logits[0][:n], alone, rtol=0, atol=1e-5)
    # control: with the answer in the bidirectional block (all token_type_ids 0) the prefix would see it
    b = collate([enc(rec, ims)], paligemma.tokenizer.pad_token_id)
    (ids, pixels, mask), extras = _args(b)
    with torch.no_grad():
        leaky = m(ids, pixels, mask, token_type_ids=torch.zeros_like(extras["token_type_ids"])).logits[0]
    assert float((leaky[:n] - alone).abs().max()) > 1e-4


def test_paligemma_forward_equals_transformers_logits_exactly(paligemma):
    m = paligemma.model
    _, _, b = _paligemma_batch(paligemma)
    (ids, pixels, mask), extras = _args(b)
    assert set(extras) == {"token_type_ids"} and pixels.shape[0] == 3
    m.eval()
    with torch.no_grad():
        ours = m(ids, pixels, mask, **extras).logits
        ref = m.hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, **extras).logits
    assert torch.equal(ours, ref)


def test_paligemma_refuses_a_chat_template_and_packing_with_one_line(paligemma_root):
    from vlmtrain.errors import ConfigError
    from vlmtrain.model import build_model
    from vlmtrain.model.native.families import FAMILIES

    with pytest.raises(ConfigError) as e:
        build_model(model_config(checkpoint(paligemma_root, "paligemma"), chat_template=GEMMA4_TEMPLATE))
    assert len(str(e.value).splitlines()) == 1 and "has no chat template" in str(e.value)
    assert "prompts would attend to each other" in FAMILIES["paligemma"].no_packing


def test_paligemma_lora_merges_to_the_same_model(paligemma):
    from vlmtrain.config.stage import LoRAConfig
    from vlmtrain.model.lora import apply_lora

    m = paligemma.model
    _, _, b = _paligemma_batch(paligemma)
    args, extras = _args(b)
    names = apply_lora(m, LoRAConfig(r=4), llm=True, vision=True)
    assert any(n.startswith("llm.model.layers.1.self_attn.") for n in names)
    assert any(n.startswith("vision.") for n in names)
    trained = adapter_step(m, args, extras)
    assert trained and all("lora_" in n for n in trained)
    assert_merge_keeps_logits(m, args, extras)


def test_paligemma_sft_stage_trains(paligemma_root, tmp_path):
    """`vlmtrain fit` (SFT, 2 steps, batches of 1- and 2-image records): finite losses logged, weights moved."""
    import json
    import math

    import yaml

    from shard_fixtures import chat_record, png_bytes, write_shards
    from vlmtrain.cli.main import main

    write_shards(tmp_path / "shards", [(chat_record(i, 1 + i % 2), [png_bytes(10 * i + j) for j in range(1 + i % 2)])
                                       for i in range(6)], per_shard=6)
    cfg = {"name": "sft", "preset": "sft", "model": {"pretrained": str(checkpoint(paligemma_root, "paligemma"))},
           "data": {"train": [{"path": str(tmp_path / "shards")}], "batch_size": 3, "num_workers": 0},
           "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
           "trainer": {"max_steps": 2, "log_every_n_steps": 1, "save_every_n_steps": 10}}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path), "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    stage = json.loads((tmp_path / "run" / "stage.json").read_text())
    assert stage["weights_sha256"]["start"]["llm"] != stage["weights_sha256"]["end"]["llm"]


# ---- GLM-4.1V / GLM-4.5V -----------------------------------------------------------------------------------------

GLM4V_TEMPLATE = USER_TEMPLATES["glm4v"]  # the test template in glm4v's layout (native_fixtures)


@pytest.fixture(scope="module")
def glm4v_root(tmp_path_factory):
    return tmp_path_factory.mktemp("native-glm4v")


def _glm4v(root, family: str):
    from vlmtrain.model import build_model

    return build_model(model_config(checkpoint(root, family), chat_template=GLM4V_TEMPLATE))


@pytest.mark.parametrize("family", ["glm4v", "glm4v_moe"])
def test_glm4v_forward_equals_transformers_logits_exactly(glm4v_root, family):
    """The image processor is transformers' PIL one (no torchvision); logits on 0/1/2-image samples are transformers'
    own, and the labels are the configured template's assistant spans, each followed by a supervised stop: the
    template writes no end-of-turn, so the next turn's `<|user|>` is supervised and a final reply gets the EOS
    appended (the tiny checkpoint's EOS is `<|user|>` too), as GLM-4's own fine-tuning does."""
    import re

    from transformers import Glm4vImageProcessorPil

    bundle = _glm4v(glm4v_root, family)
    assert type(bundle.processor.image_processor) is Glm4vImageProcessorPil
    m = bundle.model
    samples, b = encoded_records(bundle)
    (ids, pixels, mask), extras = _args(b)
    assert set(extras) == {"image_grid_thw", "mm_token_type_ids"}
    assert int((ids == m.image_token_id).sum()) == int(extras["image_grid_thw"].prod(-1).sum()) // 4
    m.eval()
    with torch.no_grad():
        ours = m(ids, pixels, mask, **extras).logits
        ref = m.hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, **extras).logits
    assert torch.equal(ours, ref)
    tok = bundle.tokenizer
    for (rec, _), s in zip(records(), samples):
        rendered = tok.apply_chat_template(rec["messages"], chat_template=GLM4V_TEMPLATE, tokenize=False)
        assert re.sub(r"(<\|image\|>)+", "<|image|>", tok.decode(s["input_ids"])) == rendered + "<|user|>"
        answers = [p["text"] for m in rec["messages"] if m["role"] == "assistant" for p in m["content"]]
        assert tok.decode([t for t in s["labels"] if t != -100]) == "".join(a + "<|user|>" for a in answers)


def test_a_reasoning_block_before_the_reply_still_gets_the_stop(glm4v_root):
    """GLM-4.5V-style templates write `<think></think>` before the reply's text and nothing after it: the probe reads
    what follows the text, so the reply still gets its supervised `<|user|>`."""
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.model import build_model

    think = GLM4V_TEMPLATE.replace("{% generation %}", "{% generation %}{{ '<think></think>\n' }}")
    bundle = build_model(model_config(checkpoint(glm4v_root, "glm4v_moe"), chat_template=think))
    enc = encoder_for(bundle)
    tok = bundle.tokenizer
    user_id = tok.convert_tokens_to_ids("<|user|>")
    assert user_id in enc.stop_ids and enc.reply_stop_id == user_id
    x = enc({"id": "t", "kind": "chat", "messages": [user("hi"), assistant("seven")]}, [])
    assert tok.decode([t for t in x["labels"] if t != -100]).endswith("seven<|user|>")


def test_glm4v_without_a_chat_template_is_refused_with_one_line(glm4v_root):
    from vlmtrain.errors import ConfigError
    from vlmtrain.model import build_model

    with pytest.raises(ConfigError) as e:
        build_model(model_config(checkpoint(glm4v_root, "glm4v")))
    assert len(str(e.value).splitlines()) == 1
    assert str(e.value).startswith("chat_template: 'glm4v' has no official template vendored in vlmtrain")


def test_glm4v_packed_rows_keep_samples_apart_and_lora_merges(glm4v_root):
    """Packed rows (3 and 4 samples; mRoPE positions per sample) equal each sample alone; LoRA on the LM and the
    connector's merger merges to the same logits."""
    from test_native_hybrid_moe import _packed_vs_alone
    from vlmtrain.config.stage import LoRAConfig
    from vlmtrain.model.lora import apply_lora

    bundle = _glm4v(glm4v_root, "glm4v")
    assert max(_packed_vs_alone(bundle)) <= 1e-5
    m = bundle.model
    _, b = encoded_records(bundle)
    args, extras = _args(b)
    names = apply_lora(m, LoRAConfig(r=4), llm=True, vision=False)
    assert any(n.startswith("llm.model.layers.1.self_attn.") for n in names)
    trained = adapter_step(m, args, extras)
    assert trained and all("lora_" in n for n in trained)
    assert_merge_keeps_logits(m, args, extras)


def test_glm4v_moe_router_loss_equals_transformers_aux_loss(glm4v_root):
    """GLM-4.5V's experts are `num_local_experts` (`n_routed_experts`): the router loss vlmtrain adds is transformers'
    own `aux_loss` for the same padded image batch, weighted by the config's `router_aux_loss_coef`."""
    bundle = _glm4v(glm4v_root, "glm4v_moe")
    m = bundle.model
    assert m.router_aux_loss_coef == m.hf.config.text_config.router_aux_loss_coef > 0
    _, b = encoded_records(bundle)
    (ids, pixels, mask), extras = _args(b)
    # a trained checkpoint's score-correction bias, so the experts chosen differ from the router logits' top-k
    routers = [r for r in m.hf.modules() if hasattr(r, "e_score_correction_bias")]
    assert len(routers) == 1  # one MoE layer: the first is dense
    routers[0].e_score_correction_bias.copy_(torch.tensor([2.0, 0.0, 0.0, 2.0]))
    seen = []
    hook = routers[0].register_forward_hook(lambda _m, _i, out: seen.append(out[2]))  # the router's own choice
    m.eval()
    with torch.no_grad():
        ref = m.hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, output_router_logits=True, **extras)
        logits, router = m(ids, pixels, mask, router_aux=True, **extras)
    hook.remove()
    assert torch.equal(logits.logits, ref.logits)
    assert torch.equal(router.aux, ref.aux_loss) and router.aux > 0
    # per-expert token slots == the experts the router really chose for the real tokens (top-2 of 4)
    want = torch.bincount(seen[0][mask.reshape(-1).bool()].reshape(-1), minlength=4)
    assert router.expert_tokens.tolist() == want.tolist() and want[0] + want[3] == 2 * int(mask.sum())
    logits_top2 = torch.bincount(ref.router_logits[0][mask.reshape(-1).bool()].topk(2, -1).indices.reshape(-1),
                                 minlength=4)
    assert logits_top2.tolist() != want.tolist()  # the bias changed the choice: the logits' top-k would be wrong


def test_glm4v_peft_export_loads_over_transformers_and_glm4v_moe_is_refused(glm4v_root, tmp_path):
    """GLM-4.1V: the PEFT export (base folder + adapter) loads with PeftModel over transformers' model and gives the
    merged model's logits. GLM-4.5V: PEFT would rewrite its shared-expert gate/up targets into fused-expert ones when
    loading (its v4->v5 MoE conversion), so the export stops with one line instead of writing an adapter that would
    not load as trained."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from vlmtrain.config.stage import LoRAConfig
    from vlmtrain.errors import VlmtrainError
    from vlmtrain.model.lora import apply_lora, merge_lora_
    from vlmtrain.model.native.peft_export import export_native_peft

    for family in ("glm4v", "glm4v_moe"):
        bundle = _glm4v(glm4v_root, family)
        m = bundle.model
        _, b = encoded_records(bundle)
        args, extras = _args(b)
        apply_lora(m, LoRAConfig(r=4), llm=True, vision=False)
        adapter_step(m, args, extras)
        if family == "glm4v_moe":
            with pytest.raises(VlmtrainError) as e:
                export_native_peft(bundle, tmp_path / family)
            assert len(str(e.value).splitlines()) == 1 and "use --format hf" in str(e.value)
            continue
        export_native_peft(bundle, tmp_path / family)
        pm = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tmp_path / family / "base"),
                                       tmp_path / family / "adapter").eval()
        with torch.no_grad():
            merge_lora_(m)
            want = m(*args, **extras).logits
            got = pm(input_ids=args[0], pixel_values=args[1], attention_mask=args[2], **extras).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
