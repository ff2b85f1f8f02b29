"""Resolve what users pass as RUN_OR_CKPT: a recipe run dir, a stage run dir, a Lightning checkpoint, or a model
folder (vlmtrain or transformers Llava). Lives in the train room because it reads run directories; model folders
are delegated to `vlmtrain.model.io`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from vlmtrain.errors import VlmtrainError


def final_stage_dir(run: Path) -> Path:
    """The last stage of a recipe run: the completed stage that no other stage names as its parent."""
    stages = {}
    for p in sorted(run.iterdir()):
        if (p / "stage.json").is_file() and (p / "model").is_dir():
            stages[p.name] = json.loads((p / "stage.json").read_text())
    if not stages:
        raise VlmtrainError(f"{run}: no completed stage (stage.json + model/) inside")
    parents = {s["parent"]["name"] for s in stages.values() if s.get("parent")}
    leaves = [n for n in stages if n not in parents]
    if len(leaves) != 1:
        raise VlmtrainError(f"{run}: cannot tell the final stage among {sorted(leaves)}; pass a stage directory")
    return run / leaves[0]


def load_checkpoint_model(ckpt: Path):
    """Rebuild a stage's starting model and apply the checkpoint's trainable weights (a single-file or a sharded
    DCP checkpoint)."""
    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.train.runner import load_stage_start

    import yaml

    stage_dir = ckpt.parent.parent
    cfg_path = stage_dir / "config.yaml"
    if not cfg_path.is_file():
        raise VlmtrainError(f"{ckpt}: no {cfg_path} beside it; cannot rebuild the stage's model")
    stage = validate(StageConfig, yaml.safe_load(cfg_path.read_text()), source=str(cfg_path))
    bundle = load_stage_start(stage, stage_dir)
    from vlmtrain.train.checkpoint_io import read_checkpoint

    sd = read_checkpoint(ckpt)["state_dict"]
    weights = {k.removeprefix("model."): v for k, v in sd.items()}
    result = bundle.model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise VlmtrainError(f"{ckpt}: unexpected tensors {result.unexpected_keys[:3]}")
    from vlmtrain.model.lora import merge_lora_

    merge_lora_(bundle.model)  # a LoRA checkpoint becomes a plain (merged) model for export/eval/generate
    return bundle


def load_model_source(path: str | Path):
    path = Path(path)
    if not path.exists():  # before the model room's imports (torch, transformers): a typo fails at once
        raise VlmtrainError(f"{path}: no such file or folder")
    from vlmtrain.model.io import VLMTRAIN_CONFIG, load_any
    from vlmtrain.train.checkpoint_io import is_sharded

    if path.suffix == ".ckpt" and (path.is_file() or is_sharded(path)):
        return load_checkpoint_model(path)
    if path.is_dir() and not (path / VLMTRAIN_CONFIG).is_file() and not (path / "config.json").is_file():
        if (path / "model" / VLMTRAIN_CONFIG).is_file():
            return load_any(path / "model")
        return load_any(final_stage_dir(path) / "model")
    return load_any(path)


def load_lora_stage(path: str | Path):
    """A LoRA stage as (bundle with its trained, unmerged adapters and connector, the connector before training).
    `path`: a stage dir with adapter/, or a recipe run dir whose final stage trained LoRA."""
    import yaml
    from safetensors.torch import load_file

    from vlmtrain.config.load import validate
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.model.io import load_any
    from vlmtrain.model.lora import load_adapter_state
    from vlmtrain.train.runner import load_stage_start

    path = Path(path)
    stage_dir = path if (path / "adapter").is_dir() else final_stage_dir(path)
    if not (stage_dir / "adapter" / "adapter.safetensors").is_file():
        raise VlmtrainError(f"{stage_dir}: not a LoRA stage (no adapter/adapter.safetensors); "
                            "use --format hf-llava or vlmtrain")
    stage = validate(StageConfig, yaml.safe_load((stage_dir / "config.yaml").read_text()),
                     source=str(stage_dir / "config.yaml"))
    bundle = load_stage_start(stage, stage_dir)  # base weights + freshly initialised adapters
    base_connector = copy.deepcopy(bundle.model.connector)
    load_adapter_state(bundle.model, load_file(stage_dir / "adapter" / "adapter.safetensors"))
    if stage.lora.quantize:  # QLoRA: export the base the adapters were trained against, in full precision
        from vlmtrain.model.quantize import dequantize_

        dequantize_(bundle.model)
    trained = load_any(stage_dir / "model").model  # merged output: its connector is the trained one
    bundle.model.connector.load_state_dict(trained.connector.state_dict())
    return bundle, (base_connector if stage.train.connector else None)
