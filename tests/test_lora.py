"""LoRA through PEFT: counts, the freeze/LoRA interplay, adapter export, merge, exact resume, DPO without a copy."""

import copy
import json
import subprocess

import pytest
import torch
import yaml

from conftest import TINY, VLMTRAIN, tiny_bundle
from vlmtrain.config.load import validate
from vlmtrain.config.stage import LoRAConfig, StageConfig
from vlmtrain.data.batching import collate
from vlmtrain.errors import ConfigError
from vlmtrain.model.lora import apply_lora, lora_layers
from vlmtrain.train.freeze import apply_stage_trainability
from vlmtrain.train.presets import with_preset


def _stage(**over):
    base = {"name": "lora", "preset": "sft", "model": str(TINY), "train": {"llm": "lora"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "data": {"train": [{"builtin": "digits-qa"}],
                                                                     "batch_size": 8, "num_workers": 0, "max_len": 128},
            "optim": {"lr": 1e-2, "schedule": "constant", "warmup_ratio": 0.0},
            "trainer": {"max_steps": 4, "save_every_n_steps": 2, "log_every_n_steps": 1}}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return base


def test_trainable_counts_equal_peft_and_vision_is_not_hit():
    from peft import LoraConfig, get_peft_model

    bundle = tiny_bundle()
    names = apply_lora(bundle.model, LoRAConfig(r=4, alpha=8), llm=True, vision=False)
    assert names and all(n.startswith("llm.") for n in names)  # `q_proj` exists in CLIP too: untouched
    assert not [n for n, _ in lora_layers(bundle.model.vision)]
    stage = validate(StageConfig, with_preset(_stage()))
    table = apply_stage_trainability(bundle.model, stage.train)
    ref = get_peft_model(copy.deepcopy(tiny_bundle().model.llm),
                         LoraConfig(r=4, lora_alpha=8, target_modules=[n[len("llm."):] for n in names]))
    assert table["llm"]["trainable"] == ref.get_nb_trainable_parameters()[0]
    assert table["llm"]["mode"] == "lora" and table["vision"]["trainable"] == 0


def test_only_adapters_and_connector_get_gradients_and_change():
    from vlmtrain.train.module import VLMModule
    from test_train import _samples

    bundle = tiny_bundle(seed=3)
    stage = validate(StageConfig, with_preset(_stage()))
    apply_lora(bundle.model, stage.lora, llm=True, vision=False)
    apply_stage_trainability(bundle.model, stage.train)
    # LoRA B starts at zero, so A gets no gradient on the first step: move B off zero to test every adapter
    for _, m in lora_layers(bundle.model):
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.02)
    before = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    module = VLMModule(bundle, stage)
    module.accumulate_lm([collate(_samples(bundle, 4), bundle.tokenizer.pad_token_id)])
    opt = torch.optim.AdamW([p for p in bundle.model.parameters() if p.requires_grad], lr=1e-2)
    grads = {n for n, p in bundle.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    opt.step()
    changed = {n for n, p in bundle.model.named_parameters() if not torch.equal(p, before[n])}
    adapters = {n for n, _ in bundle.model.named_parameters() if "lora_" in n}
    connector = {n for n, _ in bundle.model.named_parameters() if n.startswith("connector.")}
    assert grads == changed == adapters | connector


def test_lora_without_lora_block_is_a_config_error():
    bad = _stage()
    del bad["lora"]
    with pytest.raises(ConfigError, match="'lora' needs a `lora:` block"):
        validate(StageConfig, with_preset(bad))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from vlmtrain.train.runner import fit_stage

    root = tmp_path_factory.mktemp("lora")
    fit_stage(validate(StageConfig, with_preset(_stage())), root / "full", root / "data")
    return root


def _ids_pix(m):
    torch.manual_seed(0)
    return torch.tensor([[5, 6] + [m.image_token_id] * m.num_image_tokens + [7, 8]]), torch.randn(1, 3, 32, 32)


def test_peft_adapter_export_and_merged_export_reproduce_the_trained_model(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from vlmtrain.train.artifacts import load_lora_stage

    run = lora_run / "full"
    assert (run / "adapter" / "adapter.safetensors").is_file()
    bundle, _ = load_lora_stage(run)
    m = bundle.model.eval()
    ids, pix = _ids_pix(m)
    with torch.no_grad():
        ours = m(ids, pix).logits
    r = subprocess.run([*VLMTRAIN, "export", str(run), "--format", "peft", "--out", str(tmp_path / "peft")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "peft" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["modules_to_save"] == ["multi_modal_projector"]
    assert ".peft.export-" not in json.dumps(cfg)  # paths name the final folder, never the staging one
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "peft" / "base")
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(base, tmp_path / "peft" / "adapter").eval()(
            input_ids=ids, pixel_values=pix).logits
    assert (peft_logits - ours).abs().max() <= 1e-5
    r = subprocess.run([*VLMTRAIN, "export", str(run), "--format", "hf-llava", "--out", str(tmp_path / "merged")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()(
            input_ids=ids, pixel_values=pix).logits
    assert (merged - ours).abs().max() <= 1e-5


def test_lora_resume_is_exact(lora_run):
    from safetensors.torch import load_file

    from vlmtrain.train.runner import fit_stage

    cut = lora_run / "cut"
    fit_stage(validate(StageConfig, with_preset(_stage(trainer={"max_steps": 2}))), cut, lora_run / "data")
    (cut / "summary.json").unlink()
    fit_stage(validate(StageConfig, with_preset(_stage())), cut, lora_run / "data", resume=True)
    a = load_file(lora_run / "full" / "adapter" / "adapter.safetensors")
    b = load_file(cut / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(x)["loss"] for x in (lora_run / "full" / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    lb = [json.loads(x)["loss"] for x in (cut / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    assert la == lb


def test_lora_dpo_uses_the_adapter_free_policy_as_reference(lora_run):
    from vlmtrain.train.runner import fit_stage

    stage = validate(StageConfig, with_preset(_stage(
        preset="dpo", name="dpo", train={"llm": "lora", "connector": False},
        data={"train": [{"builtin": "digits-pref"}]}, dpo={"reference": "adapters_off"},
        trainer={"max_steps": 2}, optim={"lr": 1e-3})))
    fit_stage(stage, lora_run / "dpo", lora_run / "data")
    rows = [json.loads(x) for x in (lora_run / "dpo" / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    # adapters start at B = 0: policy == reference, so the first loss is exactly -log σ(0) = log 2
    assert abs(rows[0]["loss"] - 0.6931471805599453) < 1e-6
    assert rows[0]["rewards/margins"] == 0.0
