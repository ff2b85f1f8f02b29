"""Stage and recipe configs: YAML + preset + dotted overrides → validated StageConfigs.

Imports no torch, Lightning or transformers: `vlmtrain fit/run` validate here first, so a config error exits 2
before the seconds of start-up those libraries cost (vlmtrain.train.runner re-exports both functions).
"""

from __future__ import annotations

from pathlib import Path

from vlmtrain.config.load import apply_overrides, load_yaml_with_overrides, parse_overrides, validate
from vlmtrain.config.stage import RecipeConfig, StageConfig
from vlmtrain.errors import ConfigError
from vlmtrain.train.presets import deep_merge, with_preset


def load_stage_config(path: str | Path, overrides: list[str] | None = None) -> StageConfig:
    data = load_yaml_with_overrides(path, overrides)
    data = with_preset(data)
    return validate(StageConfig, data, source=str(path))


def resolve_recipe(path: str | Path, out: str | Path, overrides: list[str] | None = None,
                   max_steps: int | None = None) -> list[StageConfig]:
    """Validate every stage of a recipe up front (a typo in the last stage fails before the first one trains).
    Overrides apply to every stage (`trainer.max_steps=5`) or one (`sft.optim.lr=1e-4`)."""
    path, out = Path(path), Path(out)
    recipe = validate(RecipeConfig, load_yaml_with_overrides(path), source=str(path))
    names = [s.get("name") for s in recipe.stages]
    if len(set(names)) != len(names) or None in names:
        raise ConfigError("stages: every stage needs a unique `name`", source=str(path))
    dots = parse_overrides(overrides or [])
    unknown = [d for d in dots if "." in d.split("=")[0] and d.split(".")[0] not in names
               and d.split(".")[0] not in StageConfig.model_fields]
    if unknown:
        raise ConfigError([f"override {d!r}: no stage or stage field named {d.split('.')[0]!r}" for d in unknown],
                          source=str(path))
    model_ref = recipe.model if isinstance(recipe.model, dict) else str((path.parent / recipe.model).resolve())
    stages, prev = [], None
    for i, st in enumerate(recipe.stages):
        name = st["name"]
        merged = with_preset(deep_merge(recipe.defaults, st))
        mine = [d for d in dots if not any(d.startswith(n + ".") for n in names)]
        mine += [d[len(name) + 1:] for d in dots if d.startswith(name + ".")]
        if max_steps is not None:
            mine.append(f"trainer.max_steps={max_steps}")
        merged = apply_overrides(merged, mine, source=str(path))
        if prev is None:
            merged.setdefault("model", model_ref)
        else:
            merged["model"] = None
            merged["init_from"] = str(out / prev / "model")
        stages.append(validate(StageConfig, merged, source=f"{path} (stage {name})", prefix=f"stages[{i}]"))
        prev = name
    return stages
