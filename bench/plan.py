"""`python -m bench plan [--quick]` — the memory planner (`vlmtrain.plan`) against measured peaks.

Each config (a LLaVA-shaped VLM of ~80M parameters — tiny-clip-llama scaled up so that allocator noise is small
next to the numbers — under different stages, batches, sequence lengths, LoRA, checkpointing and precisions) runs
two real training steps in a fresh subprocess: vlmtrain's own `VLMModule.accumulate_lm` (forward, loss, backward),
gradient clipping, the AdamW `build_optimizer` makes, `zero_grad(set_to_none=True)` — Lightning's manual
optimisation step without the Trainer around it. bf16-mixed runs the whole step under `torch.autocast`, as
Lightning's precision plugin does; bf16-true casts the module to bf16. LoRA is injected with PEFT
(`inject_adapter_in_model`, the stage's target regex, r, alpha, dropout).

Measurement, CPU (the dev machine has no GPU): the peak of *allocated tensor bytes* during the second step (the
first creates AdamW's states), the CPU analogue of `torch.cuda.max_memory_allocated()`:

- profiler (the reported number): `torch.profiler.profile(profile_memory=True)` records every allocation and free
  of PyTorch's CPU allocator with its size; the running sum over step 2, plus the bytes live when it starts
  (parameters, buffers, optimizer states, the batch — counted from the objects), gives the exact peak.
  Checked: the running sum returns to ~0 at the end of the step.
- rss (cross-check, separate subprocess, no profiler): `ru_maxrss` minus the RSS just before the model is built,
  with `MALLOC_ARENA_MAX=1` and `MALLOC_MMAP_THRESHOLD_=65536` so large tensors are mmapped and returned on free.
  It also counts allocator slack and library buffers, so it reads a little higher; it is not the reference.

The planner is run with `device="cpu"` (fused AdamW as on CUDA, PyTorch's CPU dropout saves a float noise
tensor instead of a bool mask, no CUDA context). Its `cuda` plans differ only by those items.

With CUDA (not available on the dev machine; the code path is here for a GPU host) each config is also measured
with `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()` around step 2, and compared with the
CUDA plan minus its fixed context allowance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.common import ROOT, machine, save

# ~80M parameters: CLIP-style tower (112 px, 14 px patches → 64 patches + CLS, 6 layers, width 384), LLaVA-1.5's
# mlp2x_gelu projector, an 8-layer Llama (width 768, GQA 12/4 heads, SwiGLU 2048), 8,192 embedding rows.
MODEL = {
    "name": "plan-bench-80m",
    "vision": {"config": {"model_type": "clip", "image_size": 112, "patch_size": 14, "hidden_size": 384,
                          "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 6},
               "feature_layer": -2, "select": "drop_cls"},
    "connector": {"name": "mlp2x_gelu"},
    "llm": {"config": {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048,
                       "num_hidden_layers": 8, "num_attention_heads": 12, "num_key_value_heads": 4,
                       "max_position_embeddings": 2048, "vocab_size": 8192, "tie_word_embeddings": False}},
    "tokenizer": {"tiny_bpe_vocab": 512},
}
QUICK_MODEL = {**MODEL, "name": "plan-bench-quick",
               "vision": {**MODEL["vision"], "config": {**MODEL["vision"]["config"], "image_size": 28,
                                                        "patch_size": 7, "hidden_size": 64,
                                                        "intermediate_size": 128, "num_hidden_layers": 2,
                                                        "num_attention_heads": 2}},
               "llm": {"config": {**MODEL["llm"]["config"], "hidden_size": 128, "intermediate_size": 256,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "vocab_size": 1024}}}

LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
# name → stage fields (merged over an SFT stage of MODEL); varied: stage, batch, seq, LoRA, checkpointing, precision
CONFIGS = {
    "sft-full-b4-s256": {"data": {"batch_size": 4, "max_len": 256}},
    "sft-full-ckpt-b8-s256": {"data": {"batch_size": 8, "max_len": 256}, "trainer": {"grad_checkpointing": True}},
    "align-b8-s384": {"preset": "align", "data": {"batch_size": 8, "max_len": 384}},
    "lora-b4-s512": {"train": {"llm": "lora"}, "lora": LORA, "data": {"batch_size": 4, "max_len": 512}},
    "lora-ckpt-b8-s512": {"train": {"llm": "lora"}, "lora": LORA, "data": {"batch_size": 8, "max_len": 512},
                          "trainer": {"grad_checkpointing": True}},
    "sft-full-accum2-b2-s256": {"data": {"batch_size": 2, "max_len": 256}, "trainer": {"grad_accum": 2}},
    "sft-full-bf16true-b4-s256": {"data": {"batch_size": 4, "max_len": 256}, "trainer": {"precision": "bf16-true"}},
    "lora-bf16mixed-b4-s256": {"train": {"llm": "lora"}, "lora": LORA, "data": {"batch_size": 4, "max_len": 256},
                               "trainer": {"precision": "bf16-mixed"}},
    "pretrain-ckpt-b8-s256": {"preset": "pretrain", "data": {"batch_size": 8, "max_len": 256},
                              "trainer": {"grad_checkpointing": True}},
    "dpo-copy-b2-s256": {"preset": "dpo", "data": {"batch_size": 2, "max_len": 256}},
    "qlora-b4-s256": {"train": {"llm": "lora"}, "lora": {**LORA, "quantize": "4bit"},
                      "data": {"batch_size": 4, "max_len": 256}},
}
QUICK_CONFIGS = {"quick-lora-b2-s64": {"train": {"llm": "lora"}, "lora": LORA,
                                       "data": {"batch_size": 2, "max_len": 64}}}


def stage_dict(model: dict, fields: dict) -> dict:
    from vlmtrain.train.presets import deep_merge

    base = {"name": "bench", "preset": "sft", "model": model, "data": {"train": [{"builtin": "digits-qa"}]},
            "optim": {"lr": 1e-4, "weight_decay": 0.0}, "trainer": {"precision": "32-true"}}
    return deep_merge(base, fields)


def build_stage(model: dict, fields: dict):
    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.train.presets import with_preset

    return validate(StageConfig, with_preset(stage_dict(model, fields)))


def make_batch(b: int, s: int, n_img: int, image_token_id: int):
    """input_ids / labels / attention_mask [b, s]: one image (n_img slots) after a BOS, then text; the first half
    of the text is the prompt (unsupervised), the second half the answer; row 0 ends with 8 padding positions (so
    transformers builds its [b, 1, s, s] mask, as for real padded batches)."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 500, (b, s), generator=g)
    ids[:, 1:1 + n_img] = image_token_id
    labels = ids.clone()
    labels[:, :1 + n_img + (s - 1 - n_img) // 2] = -100
    att = torch.ones(b, s, dtype=torch.long)
    if b > 1:
        att[0, -8:] = 0
        labels[0, -8:] = -100
    return ids, labels, att


def supervised_fraction(b: int, s: int, n_img: int) -> float:
    """The planner's `supervised_fraction` of `make_batch`: supervised next-token targets / text positions."""
    _, labels, _ = make_batch(b, s, n_img, 0)
    return int((labels[:, 1:] != -100).sum()) / (b * (s - 1 - n_img))


def planned(model: dict, fields: dict, device: str = "cpu") -> dict:
    from vlmtrain.config.model import ModelConfig
    from vlmtrain.model import build_model
    from vlmtrain.plan import PlanOptions, plan_stage

    stage = build_stage(model, fields)
    meta = build_model(ModelConfig.model_validate(model), device="meta").model
    rows = stage.data.batch_size * (2 if stage.objective == "dpo" else 1)
    frac = supervised_fraction(rows, stage.data.max_len, meta.num_image_tokens)
    pl = plan_stage(stage, ModelConfig.model_validate(model), 1 << 50,
                    PlanOptions(device=device, supervised_fraction=frac), model=meta)
    return {"peak": pl.peak, "parts": pl.parts, "phase": pl.phase, "supervised_fraction": frac}


# ---- the measured side (runs in a subprocess) -----------------------------------------------------------------------

def _prepare(model: dict, fields: dict, device: str):
    """Model, optimizer, step function and batch for the stage, as the trainer would set them up."""
    import torch

    from vlmtrain.config.model import ModelConfig
    from vlmtrain.model import build_model
    from vlmtrain.train.module import VLMModule
    from vlmtrain.train.optim import build_optimizer

    torch.manual_seed(0)
    stage = build_stage(model, fields)
    bundle = build_model(ModelConfig.model_validate(model))
    m = bundle.model.train().requires_grad_(False)
    if stage.lora is not None and stage.lora.quantize:  # QLoRA: NF4 LLM Linears, as load_stage_start does
        from vlmtrain.model.quantize import quantize_llm_

        quantize_llm_(m, torch.bfloat16 if stage.trainer.precision.startswith("bf16") else torch.float32)
    if stage.lora is not None:
        from peft import LoraConfig, inject_adapter_in_model

        lc = stage.lora
        inject_adapter_in_model(LoraConfig(target_modules=lc.llm_target, r=lc.r, lora_alpha=lc.alpha,
                                           lora_dropout=lc.dropout, use_dora=lc.dora), m)
        for n, p in m.named_parameters():
            p.requires_grad_("lora_" in n)
    for part in ("vision", "connector", "llm"):
        if getattr(stage.train, part) is True:
            getattr(m, part).requires_grad_(True)
    if stage.trainer.grad_checkpointing:  # as fit_stage does
        m.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if stage.trainer.precision == "bf16-true":
        m.to(torch.bfloat16)
    m.to(device)
    module = VLMModule(bundle, stage)
    opt = build_optimizer(m, stage.optim)

    b, s = stage.data.batch_size, stage.data.max_len
    if stage.objective == "dpo":  # rows [0, b) chosen, [b, 2b) rejected, each with its image
        b *= 2
    ids, labels, att = make_batch(b, s, m.num_image_tokens, m.image_token_id)
    px = torch.randn(b, 3, m.vision.image_size, m.vision.image_size, generator=torch.Generator().manual_seed(1))
    micro = [{"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": att.to(device),
              "pixel_values": px.to(device)} for _ in range(stage.trainer.grad_accum)]
    autocast = stage.trainer.precision in ("bf16-mixed", "16-mixed")
    dev_type = "cuda" if str(device).startswith("cuda") else "cpu"

    accumulate = module.accumulate_dpo if stage.objective == "dpo" else module.accumulate_lm

    def step():
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=autocast):
            accumulate(micro)
            params = [p for grp in opt.param_groups for p in grp["params"]]
            torch.nn.utils.clip_grad_norm_(params, stage.optim.grad_clip or float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)

    return m, opt, step, micro, module


def _live_bytes(m, opt, micro, module) -> int:
    """Bytes of the tensors alive between steps: parameters, buffers, optimizer states, the batch, and the DPO
    reference copy."""
    import torch

    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()

    for mod in [m] + list(module._ref):
        for t in list(mod.parameters()) + list(mod.buffers()):
            add(t)
            qs = getattr(t, "quant_state", None)  # a 4-bit weight's absmax (and the double-quant's) live beside it
            while qs is not None:
                add(qs.absmax)
                add(qs.code)
                qs = getattr(qs, "state2", None)
    for state in opt.state.values():
        for t in state.values():
            add(t)
    for b in micro:
        for t in b.values():
            add(t)  # (native batches also carry a tuple of extra-key names: not a tensor, skipped)
    return sum(seen.values())


def measure(model: dict, fields: dict, method: str) -> dict:
    """Peak bytes of step 2 by `method`: profiler | rss | cuda."""
    import resource

    import torch

    torch.set_num_threads(2)
    if method == "rss":
        rss0 = _rss_now()
        m, opt, step, micro, module = _prepare(model, fields, "cpu")
        step()
        step()
        return {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0}
    if method == "cuda":
        m, opt, step, micro, module = _prepare(model, fields, "cuda")
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return {"peak": torch.cuda.max_memory_allocated()}
    return measure_prepared(*_prepare(model, fields, "cpu"))


def measure_prepared(m, opt, step, micro, module) -> dict:
    """The profiler's peak of the second of two `step()`s plus the bytes live before it (see the module doc)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    base = _live_bytes(m, opt, micro, module)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = top = 0
    for e in events:
        live += e.nbytes()
        top = max(top, live)
    return {"peak": base + top, "base": base, "end_delta": live}


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _subprocess(model: dict, fields: dict, method: str) -> dict:
    env = dict(os.environ, MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-m", "bench.plan", "measure", method, json.dumps(model),
                        json.dumps(fields)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"measurement subprocess failed ({method}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(quick: bool = False, out: str | None = None) -> dict:
    import torch

    from vlmtrain.config.model import ModelConfig
    from vlmtrain.model import build_model, count_params

    model, configs = (QUICK_MODEL, QUICK_CONFIGS) if quick else (MODEL, CONFIGS)
    n_params = count_params(build_model(ModelConfig.model_validate(model), device="meta").model)["total"]
    rows = []
    for name, fields in configs.items():
        plan = planned(model, fields)
        prof = _subprocess(model, fields, "profiler")
        row = {"config": name, "planned": plan["peak"], "phase": plan["phase"], "parts": plan["parts"],
               "supervised_fraction": plan["supervised_fraction"],
               "measured": prof["peak"], "measured_base": prof["base"], "profiler_end_delta": prof["end_delta"],
               "error_pct": 100 * (plan["peak"] - prof["peak"]) / prof["peak"]}
        if not quick:
            row["rss"] = _subprocess(model, fields, "rss")["peak"]
        if torch.cuda.is_available():
            cplan = planned(model, fields, "cuda")
            cuda = _subprocess(model, fields, "cuda")["peak"]
            alloc_plan = cplan["peak"] - cplan["parts"]["cuda_context"]
            row.update(cuda_planned=alloc_plan, cuda_measured=cuda, cuda_error_pct=100 * (alloc_plan - cuda) / cuda)
        rows.append(row)
        print(f"{name:<28} planned {plan['peak'] / 2**20:9.1f} MiB  measured {prof['peak'] / 2**20:9.1f} MiB  "
              f"error {row['error_pct']:+6.1f}%  ({plan['phase']})", file=sys.stderr, flush=True)
    if not quick:  # native families (bench/plan_native.py): Qwen2.5-VL at several image sizes, Gemma 3 (Q)LoRA
        from bench.plan_native import rows as native_rows

        rows += native_rows()
    errs = [abs(r["error_pct"]) for r in rows]
    result = {"machine": machine(), "model": model["name"], "params": n_params, "rows": rows,
              "headline": {"configs": len(rows), "within_15pct": sum(e <= 15 for e in errs),
                           "max_abs_error_pct": max(errs), "mean_abs_error_pct": sum(errs) / len(errs)}}
    save("plan-quick" if quick else "plan", result, out)
    return result


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "measure":
        print(json.dumps(measure(json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[2])))
    else:
        print("usage: python -m bench plan [--quick]  (this module's `measure` entry is internal)", file=sys.stderr)
        sys.exit(2)
