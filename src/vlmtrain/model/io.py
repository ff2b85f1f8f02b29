"""vlmtrain's own model folder, and resolution of "a model source" (a vlmtrain folder, a transformers folder of a
native family, an HF Llava folder).

vlmtrain folder layout (any connector, reloads exactly; `save_vlmtrain` / `load_vlmtrain`):
    vlmtrain_model.yaml   the ModelConfig with inline HF configs (no hub ids needed to rebuild)
    model.safetensors     the VLM state dict
    tokenizer files, preprocessor_config.json
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from vlmtrain.errors import VlmtrainError

VLMTRAIN_CONFIG = "vlmtrain_model.yaml"


def resolved_config_dict(bundle) -> dict:
    """The bundle's ModelConfig with every part's HF config inlined, so the folder rebuilds offline."""
    m = bundle.model
    cfg = bundle.config.model_dump()
    vision_cfg = m.vision.model.config.to_diff_dict()
    vision_cfg["model_type"] = m.vision.model.config.model_type
    llm_cfg = m.llm.config.to_diff_dict()
    llm_cfg["model_type"] = m.llm.config.model_type
    for part, hf in (("vision", vision_cfg), ("llm", llm_cfg)):
        hf.pop("transformers_version", None)
        hf.pop("architectures", None)
        hf.pop("dtype", None)
        cfg[part]["config"] = hf
        cfg[part]["pretrained"] = None
    cfg["tokenizer"] = {"pretrained": ".", "chat_template": None,
                        "pad_vocab_to_multiple_of": cfg["tokenizer"]["pad_vocab_to_multiple_of"]}
    cfg["image_processor"] = {"pretrained": ".", "kwargs": {}}
    return cfg


def _plain_state_dict(model) -> dict:
    """Owned, contiguous CPU copies, one per distinct tensor: tied weights (embeddings = LM head) are kept once, as
    safetensors' `load_model` expects, and views into an engine's flat buffer (DeepSpeed ZeRO) become ordinary
    tensors."""
    seen: set[tuple] = set()
    out = {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().cpu().clone().contiguous()
    return out


def save_vlmtrain(bundle, out: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / VLMTRAIN_CONFIG).write_text(yaml.safe_dump(resolved_config_dict(bundle), sort_keys=False))
    save_file(_plain_state_dict(bundle.model), str(out / "model.safetensors"))
    bundle.tokenizer.save_pretrained(out)
    bundle.image_processor.save_pretrained(out)
    return out


def save_model_folder(bundle, out: str | Path) -> Path:
    """A stage's output folder: the family's own transformers folder for native models, vlmtrain's otherwise."""
    if bundle.native:
        from vlmtrain.model.native.build import save_native_hf

        return save_native_hf(bundle, out)
    return save_vlmtrain(bundle, out)


def load_vlmtrain(path: str | Path, device: str = "cpu"):
    from safetensors.torch import load_model

    from vlmtrain.config.load import validate
    from vlmtrain.config.model import ModelConfig
    from vlmtrain.model.builder import build_model

    path = Path(path)
    data = yaml.safe_load((path / VLMTRAIN_CONFIG).read_text())
    data["tokenizer"]["pretrained"] = str(path)
    data["image_processor"]["pretrained"] = str(path)
    cfg = validate(ModelConfig, data, source=str(path / VLMTRAIN_CONFIG))
    bundle = build_model(cfg, device=device, load_weights=False)
    load_model(bundle.model, str(path / "model.safetensors"), strict=True, device=str(device))
    return bundle


def detect_source(path: str | Path) -> str:
    """'vlmtrain' (vlmtrain's own folder) | 'hf-llava' | 'hf-native' (a transformers image-text-to-text folder:
    the native kind) for a folder; raise a clear error otherwise."""
    from vlmtrain.model.native.build import is_native_folder

    path = Path(path)
    if (path / VLMTRAIN_CONFIG).is_file():
        return "vlmtrain"
    if is_native_folder(path):
        return "hf-native"
    cfg = path / "config.json"
    if cfg.is_file():
        mt = json.loads(cfg.read_text()).get("model_type")
        if mt == "llava":
            return "hf-llava"
        raise VlmtrainError(f"{cfg}: model_type {mt!r} is not an image-text-to-text model vlmtrain can load")
    if not path.exists():
        raise VlmtrainError(f"{path}: no such file or folder")
    raise VlmtrainError(f"{path}: not a vlmtrain model folder ({VLMTRAIN_CONFIG}) nor a transformers Llava folder")


def load_any(path: str | Path, device: str = "cpu"):
    """Load a ModelBundle from a vlmtrain folder, a native family's transformers folder or a Llava folder."""
    kind = detect_source(path)
    if kind == "vlmtrain":
        return load_vlmtrain(path, device)
    if kind == "hf-native":
        from vlmtrain.model.native.build import load_native_folder

        return load_native_folder(path, device)
    from vlmtrain.model.hf_llava import import_llava

    return import_llava(path, device)
