"""The memory planner (`vlmtrain plan`, `vlmtrain.plan`): contract, internal consistency, the per-layer
activation model against autograd's own saved tensors, LoRA counts against PEFT, and the 24 GiB recipes.

Whole-step peaks against measured CPU peaks are in `python -m bench plan` (docs/benchmarks.md); no timing here.
"""

import json
import subprocess

import pytest
import torch
from conftest import CONFIGS, ROOT, TINY, VLMTRAIN

from vlmtrain.config import load_model_config
from vlmtrain.config.stage import StageConfig
from vlmtrain.errors import ConfigError
from vlmtrain.model import build_model
from vlmtrain import plan as P
from vlmtrain.plan import composed
from vlmtrain.plan import core as C

LORA_RECIPE = CONFIGS / "recipes" / "lora-24gb.yaml"
QLORA_RECIPE = CONFIGS / "recipes" / "qlora-24gb.yaml"
GiB = 2**30


def stage_of(train, lora=None, **over) -> StageConfig:
    d = {"name": "s", "train": train, "lora": lora, "data": {"train": [{"builtin": "digits-qa"}]}}
    for k, v in over.items():
        d[k] = v
    return StageConfig.model_validate(d)


@pytest.fixture(scope="module")
def llava_stage():
    """The 24 GiB LoRA recipe's stage, its model config and the meta-built 7B (built once)."""
    [(stage, mcfg)] = P.load_plan_stages(LORA_RECIPE)
    return stage, mcfg, build_model(mcfg, device="meta").model


@pytest.fixture(scope="module")
def tiny_meta():
    return build_model(load_model_config(TINY), device="meta").model


# ---- contract ---------------------------------------------------------------------------------------------------

def test_cli_json_contract_and_the_24gib_lora_recipe_fits():
    r = subprocess.run(VLMTRAIN + ["plan", "--config", str(LORA_RECIPE), "--gpu-memory", "24GiB", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out) == {"peak_gib", "fits", "max_micro_batch", "parts"}
    assert isinstance(out["peak_gib"], float) and isinstance(out["fits"], bool)
    assert isinstance(out["max_micro_batch"], int) and set(out["parts"]) == set(C.PART_NAMES)
    assert sum(out["parts"].values()) == pytest.approx(out["peak_gib"], rel=1e-9)
    print(f"\nlora-24gb.yaml: planned peak {out['peak_gib']:.2f} GiB of 24 GiB, largest micro-batch "
          f"{out['max_micro_batch']}; parts (GiB): "
          + ", ".join(f"{k} {v:.2f}" for k, v in out["parts"].items() if v))
    assert out["fits"] and out["peak_gib"] <= 24
    assert out["max_micro_batch"] >= 4  # the recipe's micro-batch


@pytest.mark.parametrize("bad", ["24 parsecs", "abc", "-3GiB", "0", "GiB"])
def test_bad_gpu_memory_exits_2_with_one_line(bad):
    r = subprocess.run(VLMTRAIN + ["plan", "--config", str(LORA_RECIPE), f"--gpu-memory={bad}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --gpu-memory:"), r.stderr
    assert r.stdout == ""


def test_parse_memory_units():
    assert P.parse_memory("24GiB") == 24 * 2**30
    assert P.parse_memory("24G") == 24 * 2**30
    assert P.parse_memory("24gib") == 24 * 2**30
    assert P.parse_memory("80GB") == 80 * 10**9
    assert P.parse_memory("512MiB") == 512 * 2**20
    assert P.parse_memory("1.5TiB") == int(1.5 * 2**40)
    assert P.parse_memory("25769803776") == 24 * 2**30
    with pytest.raises(ConfigError):
        P.parse_memory("24 GiBs")


# ---- consistency ------------------------------------------------------------------------------------------------

def _peak(geo, stage, **data):
    st = stage.model_copy(update={"data": stage.data.model_copy(update=data)})
    return sum(C.step_parts(geo, st, st.data.batch_size, P.PlanOptions())[0].values())


def test_parts_sum_to_peak_and_fits_matches(llava_stage):
    stage, mcfg, model = llava_stage
    plan = P.plan_stage(stage, mcfg, 24 * GiB, model=model)
    assert sum(plan.parts.values()) == plan.peak
    j = plan.to_json()
    assert sum(j["parts"].values()) == pytest.approx(j["peak_gib"], rel=1e-12)
    assert j["fits"] == (plan.peak <= 24 * GiB)
    geo = composed.read_geometry(model, stage)
    b = plan.max_micro_batch
    assert _peak(geo, stage, batch_size=b) <= 24 * GiB < _peak(geo, stage, batch_size=b + 1)


def test_monotonic_in_batch_and_sequence(llava_stage):
    stage, _, model = llava_stage
    for st in (stage, stage.model_copy(update={"trainer": stage.trainer.model_copy(
            update={"grad_checkpointing": False, "grad_accum": 1})})):
        geo = composed.read_geometry(model, st)
        by_batch = [_peak(geo, st, batch_size=b) for b in (1, 2, 3, 4, 8, 16)]
        by_len = [_peak(geo, st, max_len=s) for s in (256, 512, 1024, 2048, 4096)]
        assert all(x < y for x, y in zip(by_batch, by_batch[1:])), by_batch
        assert all(x < y for x, y in zip(by_len, by_len[1:])), by_len


def test_gradient_checkpointing_lowers_activations(llava_stage):
    stage, _, model = llava_stage
    off = stage.model_copy(update={"trainer": stage.trainer.model_copy(update={"grad_checkpointing": False})})
    on_parts, _ = C.step_parts(composed.read_geometry(model, stage), stage, 4, P.PlanOptions())
    off_parts, _ = C.step_parts(composed.read_geometry(model, off), off, 4, P.PlanOptions())
    assert on_parts["activations"] < off_parts["activations"] / 5
    assert sum(on_parts.values()) < sum(off_parts.values())


def test_frozen_llm_keeps_activations_only_when_something_below_trains(tiny_meta):
    """align (connector trains under a frozen LLM): the gradient flows through the LLM, so its blocks save
    activations; training nothing below or in the LLM (only the vision tower... off) leaves it graph-free."""
    align = stage_of({"vision": False, "connector": True, "llm": False})
    geo = composed.read_geometry(tiny_meta, align)
    acts = C.stack_activations(geo.llm, len(geo.llm.blocks), True, C.StepShape(2, 64, True),
                               C.PRECISIONS["32-true"], False, 0, 0.0, "cuda")
    none = C.stack_activations(geo.llm, len(geo.llm.blocks), False, C.StepShape(2, 64, True),
                               C.PRECISIONS["32-true"], False, 0, 0.0, "cuda")
    assert acts.saved > 0 and none.saved == 0


# ---- LoRA counts vs PEFT ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("lora,train", [
    ({"r": 8}, {"llm": "lora"}),
    ({"r": 4, "llm_target": r"llm\.model\.layers\.0\..*(q|v)_proj"}, {"llm": "lora"}),
    ({"r": 8, "dora": True}, {"llm": "lora"}),
    ({"r": 2}, {"vision": "lora", "llm": "lora"}),
])
def test_lora_param_count_equals_peft(tiny_meta, lora, train):
    from peft import LoraConfig, inject_adapter_in_model

    stage = stage_of({"vision": False, "connector": True, "llm": False, **train}, lora)
    n, tensors, _ = C.lora_param_count(tiny_meta, stage)
    lc = stage.lora
    targets = "|".join(f"(?:{t})" for t, on in ((lc.llm_target, stage.train.llm == "lora"),
                                                 (lc.vision_target, stage.train.vision == "lora")) if on)
    real = build_model(load_model_config(TINY)).model
    inject_adapter_in_model(LoraConfig(target_modules=targets, r=lc.r, lora_alpha=lc.alpha, use_dora=lc.dora), real)
    peft_params = [p for name, p in real.named_parameters() if "lora_" in name]
    assert n == sum(p.numel() for p in peft_params) == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert tensors == len(peft_params)
    assert n == composed.read_geometry(tiny_meta, stage).lora_params


# ---- the per-layer activation model vs autograd -----------------------------------------------------------------

def _saved_bytes(out: torch.Tensor, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd holds for `out`'s backward."""
    seen, stack, visited = {}, [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_"):
                try:
                    v = getattr(node, attr)
                except RuntimeError:
                    continue
                if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() not in exclude:
                    seen[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
        stack.extend(f for f, _ in node.next_functions)
    return sum(seen.values())


@pytest.mark.parametrize("part,train,lora,precision,mask,x_rg", [
    ("llm", {"connector": True, "llm": True}, None, "32-true", True, True),  # full fine-tuning
    ("llm", {"connector": True, "llm": False}, None, "bf16-true", True, True),  # frozen, gradient flows through
    ("llm", {"connector": False, "llm": "lora"}, {"r": 8}, "32-true", False, False),  # LoRA, nothing below trains
    ("llm", {"connector": True, "llm": "lora"}, {"r": 8}, "bf16-true", True, True),
    ("llm", {"connector": True, "llm": "lora"}, {"r": 8, "dora": True}, "32-true", False, True),
    ("llm", {"connector": True, "llm": True}, None, "bf16-mixed", True, True),  # autocast casts and copies
    ("llm", {"connector": True, "llm": "lora"}, {"r": 8}, "bf16-mixed", False, True),
    ("vision", {"vision": True, "connector": True}, None, "32-true", False, False),
    ("vision", {"vision": "lora", "connector": True}, {"r": 4, "dropout": 0.0}, "bf16-true", False, False),
])
def test_block_activation_model_matches_autograd(tiny_meta, part, train, lora, precision, mask, x_rg):
    """One transformer block of a real (tiny) model: the bytes autograd saves for backward equal the formula's
    (to a few 8-byte scalars per LoRA layer). Autocast's cached bf16 copies of trainable weights are saved by the
    matmuls too; the planner counts them once per step (`autocast_weight_copies`), added here per block."""
    from peft import LoraConfig, inject_adapter_in_model

    stage = stage_of(train, lora, trainer={"precision": precision})
    geo = composed.read_geometry(tiny_meta, stage)
    p = C.PRECISIONS[precision]
    torch.manual_seed(0)
    m = build_model(load_model_config(TINY)).model.train().requires_grad_(False)
    if stage.lora:
        lc = stage.lora
        inject_adapter_in_model(LoraConfig(target_modules=lc.llm_target if part == "llm" else lc.vision_target,
                                           r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, use_dora=lc.dora),
                                m)
        for name, prm in m.named_parameters():
            prm.requires_grad_("lora_" in name)
    for name in ("vision", "connector", "llm"):
        if getattr(stage.train, name) is True:
            getattr(m, name).requires_grad_(True)
    if precision == "bf16-true":
        m.to(torch.bfloat16)
    stack = geo.llm if part == "llm" else geo.vision
    b, s, idx = 3, 40, 1 if x_rg else 0
    x = torch.randn(b, s, stack.hidden, dtype=torch.float32 if p.resid == 4 else torch.bfloat16, requires_grad=x_rg)
    exclude = {q.untyped_storage().data_ptr() for q in m.parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p.autocast):
        if part == "llm":
            pe = m.llm.model.rotary_emb(x, torch.arange(s)[None])
            exclude |= {t.untyped_storage().data_ptr() for t in pe}  # cos/sin: shared by every block
            am = torch.ones(b, 1, s, s, dtype=torch.bool).tril() if mask else None
            out = m.llm.model.layers[idx](x, attention_mask=am, position_embeddings=pe, position_ids=None)
        else:
            out = m.vision.model.encoder.layers[idx](x, None)
        out = out[0] if isinstance(out, tuple) else out
        measured = _saved_bytes(out, exclude)
    sv, _ = C.block_saved(stack, idx, C._T("x", p.resid, x_rg), C.StepShape(b, s, mask), p,
                          stage.lora.r if stage.lora else 0, stage.lora.dropout if stage.lora else 0.0, "cpu")
    cache = 0
    if p.autocast:
        for spec in stack.blocks[idx].values():
            cache += {"full": spec.n_in * spec.n_out, "lora": stage.lora.r * (spec.n_in + spec.n_out) if stage.lora
                      else 0}.get(spec.kind, 0) * 2
    predicted = sv.total() + cache
    assert measured > 0
    assert 0 <= measured - predicted <= 8 * len(stack.blocks[idx]), (measured, predicted)


# ---- the 7B recipes ---------------------------------------------------------------------------------------------

def test_7b_lora_fits_24gib_and_full_finetuning_does_not(llava_stage):
    stage, mcfg, model = llava_stage
    lora = P.plan_stage(stage, mcfg, 24 * GiB, model=model)
    assert lora.fits
    full = stage.model_copy(update={"train": stage.train.model_copy(update={"llm": True}), "lora": None})
    plan_full = P.plan_stage(full, mcfg, 24 * GiB, model=model)
    assert not plan_full.fits and plan_full.max_micro_batch == 0
    # bf16-mixed full fine-tuning: fp32 weights + fp32 grads + 2 fp32 AdamW states = 16 bytes/param ≈ 112 GB
    mixed = full.model_copy(update={"trainer": full.trainer.model_copy(update={"precision": "bf16-mixed"})})
    plan_mixed = P.plan_stage(mixed, mcfg, 24 * GiB, model=model)
    n_train = sum(composed.read_geometry(model, mixed).trainable.values())  # LLM + projector: 6.76 B
    static = sum(plan_mixed.parts[k] for k in ("weights", "grads", "optimizer"))
    assert static >= 16 * n_train and plan_mixed.peak > 112e9  # (grad_accum 32: all gradients held)


def test_qlora_recipe_fits_with_a_4bit_base(llava_stage):
    _, mcfg, model = llava_stage
    [(q, _)] = P.load_plan_stages(QLORA_RECIPE)
    plan = P.plan_stage(q, mcfg, 24 * GiB, model=model)
    assert plan.fits and plan.parts["weights"] < 5 * GiB  # 6.5B NF4 Linears + bf16 embeddings, head, tower


def test_recipes_validate_and_a_recipe_plans_its_hungriest_stage(tmp_path):
    from vlmtrain.train.runner import resolve_recipe

    for path in (LORA_RECIPE, QLORA_RECIPE):
        [sft] = resolve_recipe(path, tmp_path / "run")
        assert sft.train.llm == "lora" and sft.lora.r == 128 and sft.lora.alpha == 256
        assert sft.data.train[0].path == "data/shards/llava-v1.5-mix665k"
    # a two-stage recipe: align (connector only) and sft (full LLM): without --stage the larger peak is reported
    demo = CONFIGS / "recipes" / "demo.yaml"
    stages = {s.name: P.plan_config(demo, 24 * GiB, stage_name=s.name, opts=P.PlanOptions()).peak
              for s, _ in P.load_plan_stages(demo)}
    assert P.plan_config(demo, 24 * GiB).peak == max(stages.values())
    with pytest.raises(ConfigError):
        P.plan_config(demo, 24 * GiB, stage_name="nope")


def test_bench_plan_quick_runs(tmp_path):
    """`python -m bench plan --quick`: planner vs a measured CPU step on a tiny config, end to end (no timing)."""
    import sys

    r = subprocess.run([sys.executable, "-m", "bench", "plan", "--quick", "--out", str(tmp_path / "p.json")],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads((tmp_path / "p.json").read_text())["rows"][0]
    assert row["measured"] > 0 and row["profiler_end_delta"] == 0
    assert abs(row["error_pct"]) < 15
