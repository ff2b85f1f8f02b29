"""DP-SGD (`vlmtrain.train.dp`): the step against a hand-computed DP-SGD step, ε against Opacus' own accountant,
target-ε mode, empty Poisson batches, refusals, resume, and the summary contract."""

import copy
import json
import subprocess

import pytest
import torch

from conftest import ROOT, TINY, VLMTRAIN
from dp_reference import hand_dp_step

DELTA = 1e-5


def stage_dict(shards, **privacy):
    return {"name": "dp", "preset": "sft", "model": str(TINY),
            "train": {"vision": False, "connector": True, "llm": "lora"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": [{"path": str(shards)}], "batch_size": 8, "num_workers": 0, "max_len": 96},
            "optim": {"lr": 1e-2, "schedule": "constant", "warmup_ratio": 0.0},
            "privacy": {"noise_multiplier": 1.3, "delta": DELTA, "max_grad_norm": 0.7, **privacy},
            "trainer": {"max_steps": 6, "log_every_n_steps": 2, "save_every_n_steps": 3, "seed": 0}}


def make_stage(d):
    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.train.presets import with_preset

    return validate(StageConfig, with_preset(copy.deepcopy(d)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """200 digit QA records (one image each) as shards."""
    from itertools import islice

    from vlmtrain.data.builtin import _qa
    from vlmtrain.data.writer import write_shards

    out = tmp_path_factory.mktemp("dpdata") / "qa"
    write_shards(islice(_qa("train"), 200), out, "test", shard_size=50)
    return out


def _fit(stage_d, run_dir, resume=False):
    from vlmtrain.train.runner import fit_stage

    return fit_stage(make_stage(stage_d), run_dir, data_root=run_dir.parent / "data", resume=resume, base_dir=ROOT)


# ---- the step ---------------------------------------------------------------------------------------------------
def test_dp_step_equals_hand_computed_dp_sgd(shards, tmp_path):
    """One DP step through Opacus (hooks + DPOptimizer) equals DP-SGD computed by hand: per-sample gradients from
    separate plain-autograd runs, each clipped to C over all trainable tensors, summed, plus N(0, σ²C²) from the same
    seeded generator, divided by the expected batch size; then AdamW. Connector and LoRA A/B weights both checked
    (the Opacus + PEFT silent-corruption failure mode, Opacus #820, would break this)."""
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.data.shards import Source
    from vlmtrain.train.dp import build_dp_training, per_sample_losses, poisson_collate
    from vlmtrain.train.freeze import apply_stage_trainability
    from vlmtrain.train.runner import load_stage_start

    stage = make_stage(stage_dict(shards))
    bundle = load_stage_start(stage, ROOT)
    apply_stage_trainability(bundle.model, stage.train)
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero, which would make A's gradient zero: give it values
        for n, p in bundle.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    reference = copy.deepcopy(bundle.model)  # no Opacus hooks on this one
    ds, plan, _, module = build_dp_training(stage, bundle, encoder_for(bundle, 96), [Source(str(shards))],
                                            tmp_path)
    batch = poisson_collate(bundle.tokenizer.pad_token_id)([ds[j] for j in (0, 3, 7, 11, 19)])["micro"][0]

    # by hand
    names = [n for n, p in reference.named_parameters() if p.requires_grad]
    assert any(".connector." in f".{n}" or n.startswith("connector.") for n in names)
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    per_sample = []
    for i in range(len(batch["ids"])):
        one = {k: (v[i:i + 1] if k in ("input_ids", "labels", "attention_mask") else v) for k, v in batch.items()
               if k != "ids"}
        one["pixel_values"] = batch["pixel_values"][i:i + 1]
        reference.zero_grad(set_to_none=True)
        per_sample_losses(reference, one).sum().backward()
        per_sample.append({n: p.grad.detach().clone() for n, p in reference.named_parameters() if p.requires_grad})
    factors = hand_dp_step(reference, per_sample, plan, stage.optim, stage.trainer.seed)
    assert min(factors) < 1.0  # clipping is exercised, not bypassed
    assert all(float(g[n].abs().sum()) > 0 for g in per_sample for n in names if "lora_A" in n)
    by_param = dict(reference.named_parameters())
    expected_grad = {n: by_param[n].grad for n in names}

    # through vlmtrain + Opacus
    opt = module.configure_optimizers()["optimizer"]
    module.dp_backward(batch)
    opt.step()
    got = dict(module.model.named_parameters())
    for n in names:
        assert torch.allclose(got[n].grad, expected_grad[n], atol=1e-6, rtol=1e-4), n
        assert torch.allclose(got[n].detach(), by_param[n].detach(), atol=1e-6, rtol=1e-5), n
    # the step moved the LoRA A weights, and the accountant counted it
    assert len(module.accountant.history) == 1 and module.accountant.history[0][2] == 1


def test_empty_poisson_batch_is_a_noise_only_step(shards, tmp_path):
    from vlmtrain.data.encode import encoder_for
    from vlmtrain.data.shards import Source
    from vlmtrain.train.dp import build_dp_training, poisson_collate
    from vlmtrain.train.freeze import apply_stage_trainability
    from vlmtrain.train.runner import load_stage_start

    stage = make_stage(stage_dict(shards))
    bundle = load_stage_start(stage, ROOT)
    apply_stage_trainability(bundle.model, stage.train)
    _, plan, _, module = build_dp_training(stage, bundle, encoder_for(bundle, 96), [Source(str(shards))], tmp_path)
    empty = poisson_collate(bundle.tokenizer.pad_token_id)([])["micro"][0]
    opt = module.configure_optimizers()["optimizer"]
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    stats = module.dp_backward(empty)
    opt.step()
    gen = torch.Generator().manual_seed(stage.trainer.seed + 1)
    for group in opt.param_groups:
        for p in group["params"]:
            noise = torch.normal(mean=0, std=plan.noise_multiplier * plan.max_grad_norm, size=p.shape, generator=gen)
            assert torch.allclose(p.grad, noise / plan.expected_batch_size, atol=1e-7)
    assert stats["supervised_tokens"] == 0
    assert any(not torch.equal(before[n], p) for n, p in module.model.named_parameters() if p.requires_grad)
    assert module.accountant.history == [(plan.noise_multiplier, plan.sample_rate, 1)]


# ---- accounting -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_equals_opacus_accountant(shards, tmp_path, accountant):
    from opacus.accountants import create_accountant

    summary = _fit(stage_dict(shards, accountant=accountant), tmp_path / "run")
    priv = summary["privacy"]
    assert set(priv) >= {"epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps",
                         "accountant"}
    assert priv["steps"] == 6 and priv["accountant"] == accountant and priv["delta"] == DELTA
    assert priv["sample_rate"] == pytest.approx(8 / 200) and priv["noise_multiplier"] == 1.3
    acc = create_accountant(accountant)
    for _ in range(6):
        acc.step(noise_multiplier=1.3, sample_rate=8 / 200)
    assert abs(priv["epsilon"] - acc.get_epsilon(delta=DELTA)) <= 1e-6
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())["privacy"]
    assert on_disk == priv
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    eps = [r["privacy/epsilon"] for r in rows if "privacy/epsilon" in r]
    assert len(eps) == 3 and eps == sorted(eps) and eps[-1] == pytest.approx(priv["epsilon"])


def test_target_epsilon_ends_at_or_below_target(shards, tmp_path):
    d = stage_dict(shards, target_epsilon=3.8)
    del d["privacy"]["noise_multiplier"]
    d["trainer"]["max_steps"] = 8
    priv = _fit(d, tmp_path / "run")["privacy"]
    assert priv["target_epsilon"] == 3.8 and priv["steps"] == 8
    assert 3.8 - 0.05 <= priv["epsilon"] <= 3.8


def test_resume_keeps_the_accounting_and_the_trajectory(shards, tmp_path):
    """3 steps, then --resume to 6: same ε and same weights as 6 steps in one go (accountant history, sampler and
    noise generators travel in the checkpoint)."""
    from safetensors.torch import load_file

    straight = _fit(stage_dict(shards), tmp_path / "a")
    first = stage_dict(shards)
    first["trainer"]["max_steps"] = 3
    _fit(first, tmp_path / "b")
    resumed = _fit(stage_dict(shards), tmp_path / "b", resume=True)
    assert resumed["privacy"]["steps"] == 6
    assert resumed["privacy"]["epsilon"] == pytest.approx(straight["privacy"]["epsilon"], abs=1e-9)
    a = load_file(tmp_path / "a" / "adapter" / "adapter.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# ---- refusals ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"privacy": {"delta": None}}, "privacy.delta: required"),
    ({"privacy": {"target_epsilon": 3.0}}, "exactly one of noise_multiplier or target_epsilon"),
    ({"privacy": {"sampling": "shuffle"}}, "Poisson sampling"),
    ({"data": {"mode": "pack"}}, "packing puts several records in one row"),
    ({"train": {"vision": True}}, "train.vision: must be false under DP-SGD"),
    ({"trainer": {"grad_accum": 2}}, "trainer.grad_accum"),
    ({"trainer": {"strategy": "ddp"}}, "trainer.strategy"),
    ({"lora": {"dora": True}}, "DoRA"),
    ({"trainer": {"compile": True}}, "trainer.compile: not supported with Opacus"),
])
def test_refusals(shards, change, message):
    from vlmtrain.errors import ConfigError
    from vlmtrain.train.presets import deep_merge

    d = deep_merge(stage_dict(shards), change)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        make_stage(d)


def test_refusal_exits_2_from_the_cli(shards, tmp_path):
    import yaml

    d = stage_dict(shards)
    d["privacy"].pop("delta")
    cfg = tmp_path / "stage.yaml"
    cfg.write_text(yaml.safe_dump(d))
    r = subprocess.run([*VLMTRAIN, "fit", "--config", str(cfg), "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "privacy.delta: required" in r.stderr and "Traceback" not in r.stderr


def test_batch_size_must_be_below_the_dataset(shards, tmp_path):
    from vlmtrain.errors import VlmtrainError

    d = stage_dict(shards)
    d["data"]["batch_size"] = 200
    with pytest.raises(VlmtrainError, match="sample rate would be ≥ 1"):
        _fit(d, tmp_path / "run")
