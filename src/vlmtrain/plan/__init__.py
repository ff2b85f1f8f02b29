"""`vlmtrain plan`'s library: the peak memory of one training step of a stage on one GPU, from the config alone.

- `core`: the step model (what PyTorch keeps alive at each moment of a step) over a `Geometry`;
- `composed`: the geometry of a composed VLM; `families`: of a native transformers family;
- here: plan a stage (`plan_stage`) or a stage YAML / recipe (`plan_config`).

The planner sits above `vlmtrain.train` (it reads stage configs and recipes the way a run does, and refuses what
training refuses) and below the CLI.
"""

from __future__ import annotations

from pathlib import Path

from vlmtrain.errors import ConfigError
from vlmtrain.plan.composed import read_geometry
from vlmtrain.plan.core import MemoryPlan, PlanOptions, parse_memory, search_max_batch, step_parts
from vlmtrain.plan.families import native_geometry

__all__ = ["MemoryPlan", "PlanOptions", "load_plan_stages", "parse_memory", "plan_config", "plan_stage"]


def plan_stage(stage, model_cfg, gpu_memory: int, opts: PlanOptions | None = None, model=None) -> MemoryPlan:
    """Plan one stage. `model_cfg` is its ModelConfig; `model` an already built (meta) VLM to reuse."""
    from vlmtrain.model.builder import build_model

    opts = opts or PlanOptions()
    if model is None:
        model = build_model(model_cfg, device="meta").model
    if getattr(model, "kind", "composed") == "native":
        geo = native_geometry(model, stage, model_cfg, opts)
    else:
        geo = read_geometry(model, stage)
    parts, phase = step_parts(geo, stage, stage.data.batch_size, opts)
    notes = list(geo.notes)
    strategy = stage.trainer.strategy
    if (strategy == "fsdp" or strategy.startswith("deepspeed")) and opts.world_size == 1:
        notes.append(f"strategy {strategy} planned for 1 rank; pass --world-size N to shard over N GPUs")
    if stage.objective == "dpo":
        notes.append("DPO: logits term assumes every position is supervised (upper bound)")
    if stage.objective == "grpo":
        notes.append("GRPO: the loss forward is planned (a row per prompt with its G completions); generation's KV "
                     "cache and a frozen reference copy (beta > 0 without LoRA) are not in this plan")
    d = stage.data
    return MemoryPlan(stage=stage.name, micro_batch=d.batch_size,
                      seq_len=(d.pack_len or d.max_len) if d.mode == "pack" else d.max_len,
                      gpu_memory=gpu_memory, peak=sum(parts.values()), parts=parts, phase=phase,
                      max_micro_batch=search_max_batch(geo, stage, opts, gpu_memory), notes=notes)


# ---- configs: a stage YAML or a recipe ----------------------------------------------------------------------------

def load_plan_stages(path: str | Path, overrides: list[str] | None = None, stage_name: str | None = None):
    """[(StageConfig, ModelConfig)] to plan: a stage YAML gives one; a recipe (a YAML with `stages:`) gives the
    stage named `stage_name`, or every stage (the caller keeps the most memory-hungry)."""
    import yaml

    from vlmtrain.config.load import load_yaml_with_overrides
    from vlmtrain.train.recipe import load_stage_config, resolve_recipe
    from vlmtrain.train.stage import resolve_model

    path = Path(path)
    raw = load_yaml_with_overrides(path)
    if "stages" in raw:
        stages = resolve_recipe(path, Path("/nonexistent-plan-out"), overrides)
        model_ref = raw["model"] if isinstance(raw["model"], dict) else str(path.parent / raw["model"])
        model_cfg = resolve_model(model_ref, path.parent)
        if stage_name is not None:
            names = [s.name for s in stages]
            if stage_name not in names:
                raise ConfigError(f"--stage: no stage {stage_name!r} in {path} (stages: {', '.join(names)})")
            stages = [s for s in stages if s.name == stage_name]
        return [(s, model_cfg) for s in stages]
    if stage_name is not None:
        raise ConfigError(f"--stage: {path} is a stage config, not a recipe")
    stage = load_stage_config(path, overrides)
    if stage.model is not None:
        return [(stage, resolve_model(stage.model, path.parent))]
    if stage.init_from:
        from vlmtrain.config.load import validate
        from vlmtrain.config.model import ModelConfig
        from vlmtrain.model.io import VLMTRAIN_CONFIG

        native = Path(stage.init_from) / VLMTRAIN_CONFIG
        if native.is_file():
            return [(stage, validate(ModelConfig, yaml.safe_load(native.read_text()), source=str(native)))]
    raise ConfigError("model: the stage names no model config (give `model:`, or plan the recipe)", source=str(path))


def plan_config(path: str | Path, gpu_memory: int, overrides: list[str] | None = None,
                stage_name: str | None = None, opts: PlanOptions | None = None) -> MemoryPlan:
    """Plan a stage YAML, or a recipe's `stage_name` (default: its most memory-hungry stage)."""
    from vlmtrain.model.builder import build_model

    plans = []
    built: dict[str, object] = {}
    for stage, mcfg in load_plan_stages(path, overrides, stage_name):
        key = mcfg.model_dump_json()
        if key not in built:
            built[key] = build_model(mcfg, device="meta").model
        plans.append(plan_stage(stage, mcfg, gpu_memory, opts, model=built[key]))
    return max(plans, key=lambda pl: pl.peak)
