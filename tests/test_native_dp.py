"""DP-SGD on native transformers families (`vlmtrain.train.dp` + `train.dp_native`): per-record gradients
through Opacus equal gradients computed one record at a time (records with 0, 1 and 2 images in one Poisson batch);
one DP step equals DP-SGD computed by hand; refusals; the medical recipe from a native checkpoint end to end."""

import copy
import json
import subprocess

import pytest
import torch

from conftest import ROOT, VLMTRAIN
from dp_reference import hand_dp_step
from native_fixtures import checkpoint, model_config
from shard_fixtures import cycled_shards

DELTA = 1e-5
MAX_LEN = 256
# cycled_shards: record i has i % 3 images, so this batch mixes 0-, 1- and 2-image records
BATCH = (0, 1, 2, 4, 5)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("native-dp")


@pytest.fixture(scope="module")
def shards(root):
    cycled_shards(root / "shards", 6, per_shard=3)
    return root / "shards"


def stage_dict(model_dir, shards, connector=True, max_grad_norm=0.05):
    model = model_config(model_dir).model_dump(exclude_none=True, exclude_defaults=True)
    return {"name": "dp", "preset": "sft", "model": model,
            "train": {"vision": False, "connector": connector, "llm": "lora"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": [{"path": str(shards)}], "batch_size": 4, "num_workers": 0, "max_len": MAX_LEN},
            "optim": {"lr": 1e-2, "schedule": "constant", "warmup_ratio": 0.0},
            "privacy": {"noise_multiplier": 1.3, "delta": DELTA, "max_grad_norm": max_grad_norm},
            "trainer": {"max_steps": 2, "seed": 0}}


def make_stage(d):
    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.train.presets import with_preset

    return validate(StageConfig, with_preset(copy.deepcopy(d)))


def dp_setup(root, shards, family, tmp_path, **kw):
    """(stage, plan, DP module, plain-autograd copy of the model without Opacus hooks, encoded items, collate)."""
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.data.shards import Source
    from vlmtrain.train.dp import build_dp_training, poisson_collate
    from vlmtrain.train.freeze import apply_stage_trainability
    from vlmtrain.train.native import check_native_stage
    from vlmtrain.train.runner import load_stage_start

    stage = make_stage(stage_dict(checkpoint(root / "ck", family), shards, **kw))
    bundle = load_stage_start(stage, ROOT)
    apply_stage_trainability(bundle.model, stage.train)
    check_native_stage(stage, bundle)
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero, which would make A's gradient zero: give it values
        for n, p in bundle.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    bundle.model.train()  # as Lightning sets it; Opacus records activations in training mode only
    reference = copy.deepcopy(bundle.model)
    ds, plan, _, module = build_dp_training(stage, bundle, encoder_for(bundle, MAX_LEN), [Source(str(shards))],
                                            tmp_path)
    collate = poisson_collate(bundle.tokenizer.pad_token_id)
    items = [ds[j] for j in BATCH]
    assert [0 if x.get("pixel_values") is None else 1 for x in items] == [0, 1, 1, 1, 1]
    return stage, plan, module, reference, items, collate


def batches(items, collate) -> tuple[dict, list[dict]]:
    """(the Poisson batch of `items`, one batch per item)."""
    return collate(items)["micro"][0], [collate([x])["micro"][0] for x in items]


def one_at_a_time(reference, singles) -> list[dict]:
    """Each record's gradient from its own forward/backward (plain autograd, batch of one)."""
    from vlmtrain.train.dp import per_sample_losses

    out = []
    for one in singles:
        reference.zero_grad(set_to_none=True)
        per_sample_losses(reference, one).sum().backward()
        out.append({n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
                    for n, p in reference.named_parameters() if p.requires_grad})
    return out


def assert_grad_samples_equal(module, per_sample):
    got = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    assert got.keys() == per_sample[0].keys()
    for n, p in got.items():
        assert p.grad_sample.shape == (len(per_sample), *p.shape), n
        for i, g in enumerate(per_sample):  # relative to the tensor's norm: float32 sums in another order
            err = float((p.grad_sample[i] - g[n]).norm())
            assert err <= 1e-5 * float(g[n].norm()) + 1e-7, (n, i, err, float(g[n].norm()))


# ---- per-record gradients ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, connector", [
    ("qwen2_vl", True), ("qwen3_vl", True), ("idefics3", True), ("smolvlm", True), ("llava", True),
    ("llava_onevision", False)])
def test_per_record_gradients_equal_one_record_at_a_time(root, shards, tmp_path, family, connector):
    """Opacus' per-sample gradients (registered samplers + functorch), with the connector's image/patch rows summed
    per record, equal each record's gradient computed alone — for records with 0, 1 and 2 images."""
    _, _, module, reference, items, collate = dp_setup(root, shards, family, tmp_path, connector=connector)
    batch, singles = batches(items, collate)
    per_sample = one_at_a_time(reference, singles)
    module.dp_backward(batch)
    assert_grad_samples_equal(module, per_sample)
    if connector:  # the image-less record gets no connector gradient; the image records do
        conn = [n for n in per_sample[0] if n.startswith("connector.")]
        assert conn and all(float(per_sample[0][n].abs().sum()) == 0 for n in conn)
        assert all(any(float(g[n].abs().sum()) > 0 for n in conn) for g in per_sample[1:])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_dp_step_equals_hand_computed_dp_sgd(root, shards, tmp_path, family):
    """One DP step through vlmtrain + Opacus equals DP-SGD by hand: per-record gradients from separate plain-autograd
    runs (checked equal to Opacus' per-sample gradients first), each clipped to C over all trainable tensors,
    summed, plus N(0, σ²C²) from the same seeded generator, divided by the expected batch size; then AdamW.
    Qwen2.5-VL's merger (RMSNorm `ln_q` via functorch + MLP) and Gemma 3's projector (RMSNorm + the bare
    `mm_input_projection_weight`, functorch over the module) both train, beside LoRA A/B on the LM."""
    stage, plan, module, reference, items, collate = dp_setup(root, shards, family, tmp_path)
    batch, singles = batches(items, collate)
    per_sample = one_at_a_time(reference, singles)
    names = list(per_sample[0])
    assert any(n.startswith("connector.") for n in names)
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    if family == "gemma3":
        assert "connector.projector.mm_input_projection_weight" in names

    factors = hand_dp_step(reference, per_sample, plan, stage.optim, stage.trainer.seed)
    assert min(factors) < 1.0  # clipping is exercised, not bypassed
    by_param = dict(reference.named_parameters())
    expected_grad = {n: by_param[n].grad for n in names}

    opt = module.configure_optimizers()["optimizer"]
    module.dp_backward(batch)
    assert_grad_samples_equal(module, per_sample)
    opt.step()
    got = dict(module.model.named_parameters())
    for n in names:
        assert torch.allclose(got[n].grad, expected_grad[n], atol=1e-6, rtol=1e-4), n
        assert torch.allclose(got[n].detach(), by_param[n].detach(), atol=1e-6, rtol=1e-5), n
    assert module.accountant.history == [(plan.noise_multiplier, plan.sample_rate, 1)]


def test_text_only_batch_gives_the_connector_zero_per_record_gradients(root, shards, tmp_path):
    """A Poisson batch without images never runs the connector: its rows are zeros, so clipping and noise still
    cover every trainable tensor (Opacus would otherwise refuse the step)."""
    _, _, module, _, items, collate = dp_setup(root, shards, "qwen2_5_vl", tmp_path)
    text_only = collate([items[0], items[0]])["micro"][0]
    assert "pixel_values" not in text_only and text_only["input_ids"].shape[0] == 2
    opt = module.configure_optimizers()["optimizer"]
    module.dp_backward(text_only)
    conn = [p for n, p in module.model.named_parameters() if p.requires_grad and n.startswith("connector.")]
    assert conn and all(p.grad_sample.shape[0] == 2 and not p.grad_sample.any() for p in conn)
    opt.step()
    assert all(p.grad is not None and p.grad.any() for p in conn)  # noise only


# ---- refusals ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava_onevision", "llava_next"])
def test_bare_connector_parameter_is_refused_in_one_line(root, shards, family):
    from vlmtrain.errors import ConfigError
    from vlmtrain.train.freeze import apply_stage_trainability
    from vlmtrain.train.native import check_native_stage
    from vlmtrain.train.runner import load_stage_start

    stage = make_stage(stage_dict(checkpoint(root / "ck", family), shards))
    bundle = load_stage_start(stage, ROOT)
    apply_stage_trainability(bundle.model, stage.train)
    with pytest.raises(ConfigError, match=r"privacy: \w+'s connector parameter `image_newline` is a bare parameter"
                                          r".*train connector: false \(LoRA only\)") as e:
        check_native_stage(stage, bundle)
    assert str(e.value).count("\n") == 0


def test_unassignable_connector_rows_are_refused():
    from vlmtrain.errors import VlmtrainError
    from vlmtrain.train.dp_native import rows_to_records

    assert rows_to_records(8, torch.tensor([0, 4, 12]), "x").tolist() == [1, 1, 2, 2, 2, 2, 2, 2]
    with pytest.raises(VlmtrainError, match="connector.x has 7 input rows for 16 image tokens"):
        rows_to_records(7, torch.tensor([0, 4, 12]), "connector.x")


# ---- the recipe -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_medical_dp_native_recipe_end_to_end(root, tmp_path):
    """README's command with a tiny Gemma-3-shaped checkpoint folder (`write_tiny_checkpoint`): the builtin medical
    cohort goes through the privacy gate, the DP stage trains connector + LoRA, and summary.json's ε equals Opacus'
    accountant for the logged σ, q and steps."""
    from opacus.accountants import create_accountant

    ck = checkpoint(root / "ck", "gemma3")
    out = tmp_path / "run"
    r = subprocess.run([*VLMTRAIN, "run", "configs/recipes/medical-dp-native.yaml", "--out", str(out),
                        "--max-steps", "3", f"model.pretrained={ck}", "data.batch_size=8"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "data" / "medical-samples" / "privacy_report.json").read_text())
    assert report["kept"] > 0 and report["rejected"] > 0
    summary = json.loads((out / "dp-sft" / "summary.json").read_text())
    priv = summary["privacy"]
    assert summary["steps"] == 3 and priv["steps"] == 3 and priv["epsilon"] <= 3.8
    acc = create_accountant(priv["accountant"])
    for _ in range(3):
        acc.step(noise_multiplier=priv["noise_multiplier"], sample_rate=priv["sample_rate"])
    assert abs(priv["epsilon"] - acc.get_epsilon(delta=priv["delta"])) <= 1e-6
    saved = json.loads((out / "dp-sft" / "model" / "config.json").read_text())
    assert saved["model_type"] == "gemma3"
    assert (out / "dp-sft" / "adapter" / "adapter.safetensors").is_file()
