import json
import os
import subprocess

import pytest
import torch
import yaml

from conftest import TINY, VLMTRAIN, tiny_bundle
from vlmtrain.config.load import validate
from vlmtrain.config.stage import StageConfig
from vlmtrain.data.batching import collate
from vlmtrain.data.chat import IGNORE
from vlmtrain.data.encode import SampleEncoder
from vlmtrain.train.freeze import apply_stage_trainability
from vlmtrain.train.module import VLMModule
from vlmtrain.train.presets import with_preset


def _stage(**over):
    base = {"name": "t", "preset": "sft", "model": str(TINY), "data": {"train": [{"path": "unused"}]}}
    base.update(over)
    return validate(StageConfig, with_preset(base))


def _samples(bundle, n):
    m = bundle.model
    enc = SampleEncoder(bundle.tokenizer, bundle.image_processor, m.image_token_id, m.num_image_tokens)
    from vlmtrain.data.builtin import _digits
    from PIL import Image
    import io

    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    out = []
    for k, (i, png, y) in zip(range(n), _digits("train")):
        reply = " ".join([words[y]] * (1 + k % 4))  # uneven supervised-token counts
        rec = {"id": str(i), "kind": "chat", "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": reply}]}]}
        out.append(enc(rec, [Image.open(io.BytesIO(png)).convert("RGB")]))
    return out


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_accumulation_equals_one_big_batch():
    bundle = tiny_bundle(seed=2)
    stage = _stage()
    apply_stage_trainability(bundle.model, stage.train)
    module = VLMModule(bundle, stage)
    samples = _samples(bundle, 10)
    pad = bundle.tokenizer.pad_token_id
    micro = [collate(samples[a:b], pad) for a, b in ((0, 1), (1, 4), (4, 6), (6, 10))]
    counts = [int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro]
    assert len(set(counts)) > 1  # uneven supervised-token counts
    module.accumulate_lm(micro)
    acc = _grads(bundle.model)
    bundle.model.zero_grad(set_to_none=True)
    module.accumulate_lm([collate(samples, pad)])
    big = _grads(bundle.model)
    assert acc.keys() == big.keys() and acc
    for k in acc:
        torch.testing.assert_close(acc[k], big[k], atol=1e-6, rtol=1e-5, msg=k)
    # the mean-of-means that peers use would differ
    bundle.model.zero_grad(set_to_none=True)
    from vlmtrain.train.objectives import next_token_loss_sum

    for b in micro:
        s, n = next_token_loss_sum(bundle.model(b["input_ids"], b["pixel_values"], b["attention_mask"]).logits,
                                   b["labels"])
        (s / n / len(micro)).backward()
    wrong = _grads(bundle.model)
    assert max((wrong[k] - big[k]).abs().max() for k in big) > 1e-4


def test_stage_refuses_contradictions():
    from vlmtrain.errors import ConfigError

    bundle = tiny_bundle()
    stage = _stage()
    # a connector without parameters cannot be "trained"
    bundle.model.connector._parameters.clear()
    for mod in bundle.model.connector.modules():
        mod._parameters.clear()
    with pytest.raises(ConfigError, match="train.connector: set to train but has no trainable parameters"):
        apply_stage_trainability(bundle.model, stage.train)


MINI_RECIPE = {
    "name": "mini",
    "model": str(TINY),
    "defaults": {
        "data": {"batch_size": 8, "num_workers": 2, "max_len": 128},
        "eval": {"data": {"builtin": "digits-eval"}, "max_samples": 24, "max_new_tokens": 3, "batch_size": 24},
        "trainer": {"log_every_n_steps": 2, "save_every_n_steps": 2},
    },
    "stages": [
        {"name": "align", "preset": "align", "data": {"train": [{"builtin": "digits-captions"}]},
         "trainer": {"max_steps": 4}},
        {"name": "sft", "preset": "sft", "data": {"train": [{"builtin": "digits-qa"}]}, "optim": {"lr": 1e-3},
         "trainer": {"max_steps": 4}},
        {"name": "dpo", "preset": "dpo", "data": {"train": [{"builtin": "digits-pref"}]}, "optim": {"lr": 1e-4},
         "trainer": {"max_steps": 2}},
    ],
}


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    from vlmtrain.train.runner import run_recipe

    root = tmp_path_factory.mktemp("mini")
    recipe = root / "mini.yaml"
    recipe.write_text(yaml.safe_dump(MINI_RECIPE))
    summaries = run_recipe(recipe, root / "run")
    return root, summaries


def test_recipe_run_directory_contract(mini_run):
    root, summaries = mini_run
    run = root / "run"
    for name, steps in (("align", 4), ("sft", 4), ("dpo", 2)):
        d = run / name
        for f in ("summary.json", "metrics.jsonl", "stage.json", "checkpoints/last.ckpt", "loss.png", "config.yaml"):
            assert (d / f).is_file(), f"{name}/{f}"
        s = json.loads((d / "summary.json").read_text())
        for k in ("final_loss", "steps", "samples_per_s", "tokens_per_s", "skipped", "eval"):
            assert k in s, k
        assert s["steps"] == steps and s["skipped"] == {} and 0 <= s["eval"]["vqa_exact_match"] <= 1
        if name != "dpo":
            assert 0 < s["supervised_fraction"] < 0.5  # a few answer tokens among image slots and prompt
        rows = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == list(range(2, steps + 1, 2))
    ck = torch.load(run / "align" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    keys = set(ck["state_dict"])
    assert keys and all(k.startswith("model.connector.") for k in keys)  # align: trainable weights only
    assert ck["global_step"] == 4 and "data_cursor" in ck["vlmtrain"]


def test_stage_handoff_keeps_the_connector_and_frozen_modules(mini_run):
    root, _ = mini_run
    st = {n: json.loads((root / "run" / n / "stage.json").read_text()) for n in ("align", "sft", "dpo")}
    a, s, d = (st[n]["weights_sha256"] for n in ("align", "sft", "dpo"))
    assert a["end"]["connector"] != a["start"]["connector"]  # align trained the connector
    assert s["start"]["connector"] == a["end"]["connector"]  # ...and sft starts from exactly that
    assert a["start"]["vision"] == a["end"]["vision"] == s["end"]["vision"] == d["end"]["vision"]  # vision frozen
    assert a["start"]["llm"] == a["end"]["llm"]  # align: LLM frozen
    assert d["start"]["connector"] == d["end"]["connector"] == s["end"]["connector"]  # dpo preset: LLM only
    assert st["sft"]["parent"]["name"] == "align" and st["dpo"]["parent"]["name"] == "sft"
    assert st["align"]["trainable"]["vision"]["trainable"] == 0


def test_frozen_vision_gets_no_gradient():
    bundle = tiny_bundle()
    stage = _stage()
    apply_stage_trainability(bundle.model, stage.train)
    module = VLMModule(bundle, stage)
    module.accumulate_lm([collate(_samples(bundle, 3), bundle.tokenizer.pad_token_id)])
    assert all(p.grad is None for p in bundle.model.vision.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bundle.model.connector.parameters())


def test_resume_skips_completed_stages(mini_run):
    from vlmtrain.train.runner import run_recipe

    root, _ = mini_run
    before = {n: (root / "run" / n / "summary.json").stat().st_mtime_ns for n in ("align", "sft", "dpo")}
    run_recipe(root / "mini.yaml", root / "run", resume=True)
    after = {n: (root / "run" / n / "summary.json").stat().st_mtime_ns for n in ("align", "sft", "dpo")}
    assert before == after


def test_refuses_to_overwrite_a_run(mini_run):
    from vlmtrain.errors import VlmtrainError
    from vlmtrain.train.runner import run_recipe

    root, _ = mini_run
    with pytest.raises(VlmtrainError, match="already holds a run"):
        run_recipe(root / "mini.yaml", root / "run")


def test_eval_generate_export_accept_run_dirs(mini_run, tmp_path):
    root, summaries = mini_run
    run = root / "run"
    r = subprocess.run([*VLMTRAIN, "eval", str(run), "--data", str(run / "data" / "digits-eval"),
                        "--max-samples", "24", "--max-new-tokens", "3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["eval_samples"] == 24
    assert res["vqa_exact_match"] == pytest.approx(summaries[-1]["eval"]["vqa_exact_match"])
    r = subprocess.run([*VLMTRAIN, "export", str(run / "sft" / "checkpoints" / "last.ckpt"), "--format",
                        "hf-llava", "--out", str(tmp_path / "hf")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    from transformers import LlavaForConditionalGeneration

    from vlmtrain.model.io import load_any

    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    sft_model = load_any(run / "sft" / "model").model
    torch.testing.assert_close(llava.model.multi_modal_projector.linear_1.weight, sft_model.connector.linear_1.weight,
                               atol=0, rtol=0)


STAGE_FOR_RESUME = {
    "name": "sft", "preset": "sft", "model": str(TINY),
    "data": {"train": [{"builtin": "digits-qa"}], "batch_size": 4, "num_workers": 2, "max_len": 128,
             "shuffle_buffer": 16},
    "optim": {"lr": 1e-3},
    "trainer": {"max_steps": 40, "save_every_n_steps": 3, "log_every_n_steps": 1, "log_sample_ids": True},
}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    from kill_resume import kill_then_resume_matches

    cfg = tmp_path / "stage.yaml"
    cfg.write_text(yaml.safe_dump(STAGE_FOR_RESUME))
    kill_then_resume_matches(tmp_path, cfg, steps=40, kill_after=14, timeout=600)


def test_shipped_recipes_validate(tmp_path):
    from conftest import CONFIGS
    from vlmtrain.train.runner import resolve_recipe

    for recipe in sorted((CONFIGS / "recipes").glob("*.yaml")):
        stages = resolve_recipe(recipe, tmp_path / recipe.stem)
        assert stages and all(s.trainer.max_steps > 0 for s in stages)
    llava = resolve_recipe(CONFIGS / "recipes" / "llava-1.5-7b.yaml", tmp_path / "x")
    assert [s.name for s in llava] == ["align", "sft"]
    assert llava[0].optim.lr == 1e-3 and llava[0].train.llm is False and llava[1].train.llm is True
    assert llava[1].init_from == str(tmp_path / "x" / "align" / "model")


def test_recipe_override_errors_name_the_field(tmp_path):
    from conftest import CONFIGS

    r = subprocess.run([*VLMTRAIN, "run", str(CONFIGS / "recipes" / "demo.yaml"), "--out", str(tmp_path / "o"),
                        "sft.optim.lr=-1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "stages[1].optim.lr" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()  # nothing ran


def test_wandb_logger_runs_offline(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({**STAGE_FOR_RESUME, "trainer": {"max_steps": 2, "log_every_n_steps": 1,
                                                                    "wandb": True}}))
    r = subprocess.run([*VLMTRAIN, "fit", "--config", str(cfg), "--out", str(tmp_path / "run"), "--data-root",
                        str(tmp_path / "data")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-2000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "constant_with_warmup"])
@pytest.mark.parametrize("warmup_ratio, total", [(0.0, 7), (0.03, 100), (0.3, 10), (0.5, 4)])
def test_schedule_equals_transformers_get_scheduler(schedule, warmup_ratio, total):
    """train/optim.py writes transformers' four schedules out (importing them costs seconds of start-up): every
    step's learning rate, bit for bit, and the state_dict a checkpoint stores, against transformers' own."""
    import math

    from transformers import get_scheduler

    from vlmtrain.config.stage import OptimConfig
    from vlmtrain.train.optim import build_scheduler

    optim = OptimConfig(lr=3e-4, schedule=schedule, warmup_ratio=warmup_ratio)
    ours, theirs = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4) for _ in range(2))
    a = build_scheduler(ours, optim, total)
    b = get_scheduler(schedule, theirs, num_warmup_steps=math.ceil(warmup_ratio * total), num_training_steps=total)
    for _ in range(total + 2):
        assert a.get_last_lr() == b.get_last_lr()
        ours.step(), theirs.step(), a.step(), b.step()
    assert a.state_dict() == b.state_dict()
