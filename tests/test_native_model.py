"""Native families: the roles cover the transformers model exactly, the forward (and its selective head) equals
transformers' own logits, loss and gradients, labels come from assistant spans only, LoRA hits only the LM."""

from __future__ import annotations

import pytest
import torch

from native_fixtures import FAMILIES, checkpoint, model_config, records


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("native")


def _bundle(root, family):
    from vlmtrain.model import build_model

    return build_model(model_config(checkpoint(root, family)))


def _batch(bundle):
    from vlmtrain.data.batching import collate
    from vlmtrain.data.encode import encoder_for

    enc = encoder_for(bundle)
    samples = [enc(r, ims) for r, ims in records()]
    return samples, collate(samples, bundle.tokenizer.pad_token_id)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_equals_transformers_and_selective_head_same_loss_and_grads(root, family):
    from vlmtrain.train.module import model_extras
    from vlmtrain.train.objectives import prediction_mask, selected_token_loss_sum

    bundle = _bundle(root, family)
    m = bundle.model
    _, b = _batch(bundle)
    extras = model_extras(b)
    assert b["pixel_values"] is not None
    m.eval()
    with torch.no_grad():
        ours = m(b["input_ids"], b["pixel_values"], b["attention_mask"], **extras).logits
        ref = m.hf(input_ids=b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"],
                   **extras).logits
    assert torch.equal(ours, ref)

    # loss and gradients of the selective head = transformers' full-head cross-entropy over the same tokens
    mask, targets = prediction_mask(b["labels"])
    m.zero_grad()
    sel = selected_token_loss_sum(m(b["input_ids"], b["pixel_values"], b["attention_mask"], logits_mask=mask,
                                    **extras), targets)
    sel.backward()
    g_sel = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    full = m.hf(input_ids=b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"],
                **extras).logits
    shift = b["labels"][:, 1:]
    ref_loss = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]).float(),
                                                 shift.reshape(-1), ignore_index=-100, reduction="sum")
    ref_loss.backward()
    torch.testing.assert_close(sel, ref_loss, rtol=1e-5, atol=1e-5)
    for n, p in m.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g_sel[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("family", FAMILIES)
def test_roles_partition_the_model_and_lora_targets_only_the_lm(root, family):
    from vlmtrain.config.stage import LoRAConfig
    from vlmtrain.model import count_params
    from vlmtrain.model.lora import apply_lora

    bundle = _bundle(root, family)
    m = bundle.model
    counts = count_params(m)
    assert counts["total"] == sum(p.numel() for p in m.hf.parameters())  # transformers' own count (ties once)
    assert min(counts["vision"], counts["connector"], counts["llm"]) > 0
    names = apply_lora(m, LoRAConfig(r=4), llm=True, vision=False)
    assert names and all(n.startswith("llm.model.layers.") for n in names)
    # the adapters are in the transformers forward too (the modules are shared)
    hf_lora = [n for n, mod in m.hf.named_modules() if hasattr(mod, "lora_A")]
    assert len(hf_lora) == len(names)


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_supervise_assistant_text_only_never_image_tokens(root, family):
    bundle = _bundle(root, family)
    tok, m = bundle.tokenizer, bundle.model
    samples, b = _batch(bundle)
    for (rec, ims), s in zip(records(), samples):
        ids, labels = s["input_ids"], s["labels"]
        n_img = ids.count(m.image_token_id)
        assert (n_img > 0) == bool(ims)
        assert all(lab == -100 for i, lab in zip(ids, labels) if i == m.image_token_id)
        sup = tok.decode([t for t in labels if t != -100])
        answers = [p["text"] for msg in rec["messages"] if msg["role"] == "assistant" for p in msg["content"]]
        for a in answers:
            assert a in sup
        for msg in rec["messages"]:
            if msg["role"] == "user":
                for p in msg["content"]:
                    if p.get("type") == "text":
                        assert p["text"] not in sup
        # nothing but the answers and the family's end-of-turn markup is supervised
        rest = sup
        for a in answers:
            rest = rest.replace(a, "", 1)
        assert len(rest.strip()) <= 40 * len(answers), rest


def test_over_length_record_is_rejected_not_truncated(root):
    from vlmtrain.data.native_encode import NativeSampleEncoder
    from vlmtrain.data.schema import RecordError

    bundle = _bundle(root, "qwen2_5_vl")
    rec, ims = records()[2]
    full = len(NativeSampleEncoder(bundle.processor, bundle.template, bundle.model.image_token_id)(rec, ims)
               ["input_ids"])
    enc = NativeSampleEncoder(bundle.processor, bundle.template, bundle.model.image_token_id, max_len=full - 1)
    with pytest.raises(RecordError) as e:
        enc(rec, ims)
    assert e.value.reason == "over_length"


def test_unknown_family_is_refused_naming_what_its_model_has():
    from vlmtrain.errors import ConfigError
    from vlmtrain.model.native.families import family_for

    odd = torch.nn.Module()
    odd.model = torch.nn.ModuleDict({"encoder": torch.nn.Linear(1, 1), "decoder": torch.nn.Linear(1, 1)})
    expected = (r"^model_type 'not_a_vlm': no native family map in vlmtrain and its parts are not at "
                r"model\.vision_tower\|.* \(Module has model\.\{encoder, decoder\}\)$")
    with pytest.raises(ConfigError, match=expected):
        family_for("not_a_vlm", odd)


def test_dynamic_resolution_gives_each_image_its_own_token_count(root):
    bundle = _bundle(root, "qwen2_5_vl")
    samples, _ = _batch(bundle)
    two = samples[2]
    grid = two["image_extras"]["image_grid_thw"]
    per_image = (grid.prod(-1) // 4).tolist()  # merge 2×2
    assert per_image[0] != per_image[1]
    assert two["input_ids"].count(bundle.model.image_token_id) == sum(per_image)


@pytest.mark.parametrize("family,quantize,dora", [("qwen2_5_vl", "4bit", False), ("gemma3", "4bit", False),
                                                   ("idefics3", None, True)])
def test_qlora_and_dora_train_adapters_only_and_merge_to_the_same_model(root, family, quantize, dora):
    from vlmtrain.config.stage import LoRAConfig
    from vlmtrain.model.lora import apply_lora, merge_lora_
    from vlmtrain.model.quantize import dequantize_, quantize_llm_
    from vlmtrain.train.module import model_extras

    bundle = _bundle(root, family)
    m = bundle.model
    _, b = _batch(bundle)
    if quantize:
        assert quantize_llm_(m, torch.float32) > 0
    apply_lora(m, LoRAConfig(r=4, dora=dora), llm=True, vision=False)
    m.requires_grad_(False)
    for n, p in m.named_parameters():
        p.requires_grad_("lora_" in n)
    args = (b["input_ids"], b["pixel_values"], b["attention_mask"])
    m(*args, **model_extras(b)).logits.float().pow(2).mean().backward()
    trained = [n for n, p in m.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)
    with torch.no_grad():  # one step so that the adapters are not the identity
        for n, p in m.named_parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad.sign()
    m.eval()
    with torch.no_grad():
        before = m(*args, **model_extras(b)).logits
        if quantize:
            dequantize_(m)
        merge_lora_(m)
        after = m(*args, **model_extras(b)).logits
    assert not any(hasattr(mod, "lora_A") for mod in m.hf.modules())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_data_inspect_counts_the_processor_image_tokens(root, tmp_path):
    from vlmtrain.data.builtin import prepare_builtin
    from vlmtrain.data.inspect import inspect_samples

    bundle = _bundle(root, "idefics3")  # image splitting: the count depends on the image, not on a constant
    shards = prepare_builtin("digits-qa", tmp_path)
    rows = list(inspect_samples(str(shards), bundle, n=2))
    assert len(rows) == 2
    for r in rows:
        assert r["images"] == 1
        assert r["image_slots"] == r["input_ids"].count(bundle.model.image_token_id) > 0
        assert r["supervised_text"].startswith(r["supervised_text"].split("<")[0]) and "What digit" not in \
            r["supervised_text"]


def test_native_stage_refuses_what_is_not_built_yet():
    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.train.native import native_refusals
    from vlmtrain.train.presets import with_preset

    stage = validate(StageConfig, with_preset({
        "name": "s", "preset": "sft", "model": {"pretrained": "/nowhere"},
        "data": {"train": [{"path": "x"}], "mode": "pack"}, "trainer": {"compile": True}}))
    problems = native_refusals(stage)
    assert not any(p.startswith("data.mode") for p in problems)  # packing is built (tests/test_native_pack.py)
    assert any(p.startswith("trainer.compile") for p in problems)
    assert not any(p.startswith("trainer.strategy") for p in problems)
    # sharded strategies: per family at build (tests/test_native_strategies.py)
    for strategy in ("fsdp", "deepspeed_zero2", "deepspeed_zero3"):
        st = validate(StageConfig, with_preset({"name": "s", "preset": "sft", "model": {"pretrained": "/nowhere"},
                                                "data": {"train": [{"path": "x"}]}, "trainer": {"strategy": strategy}}))
        assert native_refusals(st) == [], strategy


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_dpo_pair_logps_equal_each_sequence_scored_alone_by_transformers(root, family):
    """Chosen and rejected rows of a native DPO batch (padded together, images twice) give the log-probs that
    transformers gives each full sequence on its own."""
    from types import SimpleNamespace

    from vlmtrain.data.batching import collate_preference
    from vlmtrain.data.encode import encoder_for
    from native_fixtures import IMG, assistant, image, user
    from vlmtrain.train.module import VLMModule

    bundle = _bundle(root, family)
    enc = encoder_for(bundle)
    prefs = [({"id": "p1", "kind": "preference", "prompt": [user(IMG, "which digit")],
               "chosen": [assistant("seven")], "rejected": [assistant("one two three")]}, [image(40, 30, 4)]),
             ({"id": "p2", "kind": "preference", "prompt": [user("say a word")],
               "chosen": [assistant("yes")], "rejected": [assistant("no no")]}, [])]
    samples = [enc(r, ims) for r, ims in prefs]
    b = collate_preference(samples, bundle.tokenizer.pad_token_id)
    stage = SimpleNamespace(objective="next_token", dpo=SimpleNamespace(reference="copy"))
    module = VLMModule(bundle, stage)
    bundle.model.eval()
    with torch.no_grad():
        logps, _ = module._pair_logps(bundle.model, b, (b["input_ids"], b.get("pixel_values"),
                                                        b["attention_mask"], None))
        expected = []
        for side in ("chosen", "rejected"):
            for s in samples:
                ids = torch.tensor([s[side]["input_ids"]])
                labels = torch.tensor(s[side]["labels"])
                kw = {k: v for k, v in s.get("image_extras", {}).items()}
                kw.update({k: torch.tensor([v]) for k, v in s[side].get("token_extras", {}).items()})
                logits = bundle.model.hf(input_ids=ids, pixel_values=s["pixel_values"], **kw).logits[0, :-1]
                tgt = labels[1:]
                keep = tgt != -100
                expected.append(logits[keep].log_softmax(-1).gather(-1, tgt[keep][:, None]).sum())
    torch.testing.assert_close(logps, torch.stack(expected), rtol=1e-5, atol=1e-4)


def test_processor_overrides_bound_qwen_image_tokens(root):
    """`processor: {max_pixels: ...}` in the model config reaches the family's image processor."""
    from native_fixtures import image
    from vlmtrain.model import build_model

    tokens = {}
    for budget in (56 * 56, 112 * 112):
        b = build_model(model_config(checkpoint(root, "qwen2_5_vl"), processor={"max_pixels": budget}))
        grid = b.processor.image_processor([image(200, 120)], return_tensors="pt")["image_grid_thw"][0]
        tokens[budget] = int(grid.prod()) // 4
        assert int(grid.prod()) * 14 * 14 <= budget  # patches × patch area within the pixel budget
    assert tokens[56 * 56] < tokens[112 * 112]


def test_eval_answer_nll_equals_transformers_scoring_of_the_reference(root, tmp_path):
    """`answer_nll` (held-out, per record: -log p(reference answer tokens) / their count) recomputed from the
    transformers model's full logits on the reference conversation, averaged over the records."""
    import itertools

    from vlmtrain.data import builtin
    from vlmtrain.data.batching import collate
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.data.loader import parse_sample
    from vlmtrain.data.shards import iter_shard
    from vlmtrain.data.writer import write_shards
    from vlmtrain.train.evaluate import evaluate_native
    from vlmtrain.train.module import model_extras

    bundle = _bundle(root, "qwen2_5_vl")
    shards = tmp_path / "eval"
    write_shards(itertools.islice(builtin._qa("eval"), 3), shards, "builtin:digits-eval", shard_size=10)
    got = evaluate_native(bundle, str(shards), max_samples=10, max_new_tokens=1)
    enc = encoder_for(bundle)
    nlls = []
    for raw in iter_shard(str(shards / "shard-000000.tar")):
        rec, images = parse_sample(raw)
        b = collate([enc(rec, images)], bundle.tokenizer.pad_token_id)
        with torch.no_grad():
            logits = bundle.model.hf(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                                     attention_mask=b["attention_mask"], **model_extras(b)).logits[0].double()
        labels = b["labels"][0]
        pos = (labels[1:] != -100).nonzero()[:, 0]
        nlls.append(float(-logits[:-1].log_softmax(-1)[pos, labels[1:][pos]].mean()))
    assert got["eval_samples"] == len(nlls) == 3
    assert got["answer_nll"] == pytest.approx(sum(nlls) / 3, rel=1e-5)


def test_training_starts_in_train_mode_although_from_pretrained_gives_eval_mode(root):
    """transformers' from_pretrained returns eval-mode modules and Lightning keeps a model's mode: the stage module
    switches every submodule to training at train start (dropout, transformers' gradient checkpointing and Opacus
    all read `training`)."""
    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.train.module import VLMModule
    from vlmtrain.train.presets import with_preset

    bundle = _bundle(root, "gemma3")
    assert not bundle.model.hf.training  # the premise: loaded in eval mode
    stage = validate(StageConfig, with_preset({"name": "s", "preset": "sft", "model": {"pretrained": "/nowhere"},
                                               "data": {"train": [{"path": "x"}]}}))
    VLMModule(bundle, stage).on_train_start()
    assert all(m.training for m in bundle.model.hf.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_encoded_samples_equal_the_processors_own_apply_chat_template(root, family):
    """Train/serve parity of the tokens and pixels: each record (one image, text only, two images) encodes to the
    ids and pixel values that the family's processor makes when serving (`apply_chat_template` with the images in
    the messages). Caught LLaVA-OneVision's two-image sample: flat images gave each image its AnyRes tiles (160
    tokens) where serving gives one view per image (60 tokens). LLaVA-1.5's and LLaVA-NeXT's templates write no
    stop after a reply (a space; a literal `<\\s> `): training adds a supervised `</s>` after each reply, and is
    otherwise the served sequence token for token."""
    from transformers.processing_utils import ProcessorMixin

    from vlmtrain.data.encode import encoder_for

    bundle = _bundle(root, family)
    enc = encoder_for(bundle)
    # SmolVLM's own apply_chat_template only adds video defaults (it reads the video processor, which needs
    # torchvision); the base class's is the same for images
    apply = ProcessorMixin.apply_chat_template if family == "smolvlm" else type(bundle.processor).apply_chat_template
    for rec, ims in records():
        ours = enc(rec, ims)
        it = iter(ims)
        messages = [{**m, "content": [{**p, "image": next(it)} if p.get("type") == "image" else p
                                      for p in m["content"]]} for m in rec["messages"]]
        served = apply(bundle.processor, messages, tokenize=True, return_dict=True, return_tensors="pt")
        ids, labels, extra = ours["input_ids"], ours["labels"], []
        want = served["input_ids"][0].tolist()
        j = 0
        for k, t in enumerate(ids):  # `want` as a subsequence of `ids`; the rest is what training added
            if j < len(want) and t == want[j]:
                j += 1
            else:
                extra.append((t, labels[k]))
        assert j == len(want), rec["id"]
        replies = sum(m["role"] == "assistant" for m in rec["messages"])
        stop = bundle.tokenizer.eos_token_id
        assert extra == ([(stop, stop)] * replies if family in ("llava", "llava_next") else []), rec["id"]
        if ims:
            assert torch.equal(ours["pixel_values"], served["pixel_values"]), rec["id"]
        else:
            assert ours["pixel_values"] is None and served.get("pixel_values") is None


def test_a_checkpoint_with_another_chat_template_trains_with_it(root, tmp_path, caplog):
    """A checkpoint folder that ships the family's official template trains with vlmtrain's marked copy of it; one
    that ships another (a fine-tune's own, a composed model's export) trains with that one, as it is served, read by
    prefix renders, and says so in one line naming both hashes; export writes back the template each trained with."""
    import logging
    import shutil

    from vlmtrain.model import build_model
    from vlmtrain.model.native.templates import training_template

    own = tmp_path / "own"
    shutil.copytree(checkpoint(root, "qwen2_5_vl"), own)
    with caplog.at_level(logging.INFO, logger="vlmtrain.model.native.build"):
        official = build_model(model_config(own))
    assert official.template == training_template("qwen2_5_vl")
    assert not [r for r in caplog.records if "chat template" in r.getMessage()]
    text = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{{ c['text'] if c['type'] == 'text' "
            "else '<|vision_start|><|image_pad|><|vision_end|>' }}{% endfor %}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")
    (own / "chat_template.jinja").write_text(text)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vlmtrain.model.native.build"):
        bundle = build_model(model_config(own))
    [line] = [r.getMessage() for r in caplog.records if "chat template" in r.getMessage()]
    assert "training with the checkpoint's own chat template" in line and "not the official qwen2_5_vl" in line
    assert bundle.template == text
    from vlmtrain.data.encode import encoder_for

    x = encoder_for(bundle, 512).encode_conversation(
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "hello there"}]}], [])
    # the reply's tokens (BPE carries the space after "assistant:" in its first one), then the stop this template
    # never writes: the checkpoint's EOS `<|im_end|>`, supervised right after the reply
    assert bundle.tokenizer.decode([t for t in x["labels"] if t != -100]) == " hello there<|im_end|>"
    assert bundle.tokenizer.decode(x["input_ids"]).endswith("assistant: hello there<|im_end|>")
    # export writes the template each trained with: its own, or the official one
    from vlmtrain.model.native.build import save_native_hf
    from vlmtrain.model.native.templates import official_template

    assert (save_native_hf(bundle, tmp_path / "out-own") / "chat_template.jinja").read_text() == text
    assert ((save_native_hf(official, tmp_path / "out-official") / "chat_template.jinja").read_text()
            == official_template("qwen2_5_vl"))
