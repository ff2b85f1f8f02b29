"""Build a native transformers VLM (+ its processor) from a NativeModelConfig, and save/load it as a folder.

- `pretrained: DIR_OR_ID` loads `AutoModelForImageTextToText` + the family's processor (weights when present
  locally or in the HF cache);
- `model_type` + `config` builds the architecture offline: random weights, or the `meta` device for `describe`
  and memory plans (no processor then, unless `pretrained` is also local).
A native stage's `model/` folder is the family's own transformers folder (`save_pretrained` of model and
processor, the processor carrying the official chat template) plus `vlmtrain_native.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import traceback
from pathlib import Path

import torch

from vlmtrain.config.model import NativeModelConfig
from vlmtrain.data.native_encode import GENERATION_TAG
from vlmtrain.errors import ConfigError, VlmtrainError
from vlmtrain.model.hf_parts import has_local_weights
from vlmtrain.model.native.families import family_for
from vlmtrain.model.native.vlm import NativeVLM

log = logging.getLogger(__name__)
NATIVE_MARKER = "vlmtrain_native.json"


def _hf_config(cfg: NativeModelConfig):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if cfg.config is not None:
        mt = cfg.model_type or cfg.config.get("model_type")
        if mt not in CONFIG_MAPPING:
            raise ConfigError(f"model_type: unknown transformers model_type {mt!r}")
        fields = {k: v for k, v in cfg.config.items() if k != "model_type"}
        try:
            return AutoConfig.for_model(mt, **fields)
        except Exception as e:  # transformers' validation (ValueError, TypeError, huggingface_hub's strict fields)
            raise ConfigError(f"model_type {mt!r}: transformers rejects this config ({_one_line(e)})") from None
    _refuse_remote_code(cfg.pretrained)
    try:
        # never transformers' interactive "run the custom code? [y/N]" prompt: remote code is refused above, and
        # for a Hub id that turns out to carry it, False makes transformers raise instead of asking
        hf_cfg = AutoConfig.from_pretrained(cfg.pretrained, trust_remote_code=False)
    except (OSError, ValueError) as e:
        if "custom code" in str(e):
            raise ConfigError(f"pretrained: {cfg.pretrained} is a remote-code checkpoint; vlmtrain builds "
                              "transformers' own classes only (use the family's transformers-format checkpoint, "
                              "often the one named -hf)") from None
        raise VlmtrainError(f"pretrained: cannot read the config of {cfg.pretrained!r} offline "
                            f"({str(e).splitlines()[0]}); give a local folder, or `model_type` + `config`") from None
    if cfg.model_type and cfg.model_type != hf_cfg.model_type:
        raise ConfigError(f"model_type: {cfg.model_type!r} but {cfg.pretrained} is {hf_cfg.model_type!r}")
    return hf_cfg


def _refuse_remote_code(pretrained) -> None:
    """A local folder whose config.json names its own code (`auto_map`) for a model_type transformers does not
    know: one line instead of transformers' prompt. (An `auto_map` beside a model_type transformers has is
    ignored: transformers' own class is built, as `trust_remote_code=False` does.)"""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(str(pretrained)) / "config.json"
    if not path.is_file():
        return
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # transformers says what is wrong with it
    mt, auto_map = data.get("model_type"), data.get("auto_map")
    if auto_map and mt not in CONFIG_MAPPING:
        entry = auto_map.get("AutoConfig") if isinstance(auto_map, dict) else None
        named = f" (config.json auto_map: {entry})" if isinstance(entry, str) else ""
        raise ConfigError(f"pretrained: {pretrained} is a remote-code checkpoint, model_type {mt!r}{named}; "
                          "vlmtrain builds transformers' own classes only (use the family's transformers-format "
                          "checkpoint, often the one named -hf)")


def _one_line(e: BaseException) -> str:
    """`Type: the message's first two lines`, on one line, at most 160 characters."""
    first = " ".join(line.strip() for line in str(e).strip().splitlines()[:2]).rstrip(".")
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _failing_frame(e: BaseException) -> str:
    """`file.py:line` of the innermost frame of the traceback (where transformers gave up)."""
    tb = traceback.extract_tb(e.__traceback__)
    return f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"


def _missing_package(e: ImportError, hf_cfg) -> str:
    """One line for an optional dependency a part of the model needs (timm for TimmWrapperModel towers)."""
    m = re.search(r"(\w+) requires the (\w+) library", str(e))
    part, package = (m.group(1), m.group(2)) if m else (None, getattr(e, "name", None) or "a package")
    if part and part.startswith("Timm") and getattr(hf_cfg, "vision_config", None) is not None:
        where = f"its vision tower ({part})"  # fast_vlm, perception_lm, gemma3n: timm image encoders
    else:
        where = f"its {part}" if part else "it"
    return (f"model_type {hf_cfg.model_type!r}: {where} needs {package}, which is not installed "
            f"(pip install {package})")


def _instantiate(cfg: NativeModelConfig, hf_cfg, device, load_weights: bool):
    from transformers import AutoModelForImageTextToText

    if load_weights and cfg.pretrained and has_local_weights(cfg.pretrained):
        try:
            # fp32 master weights: the stage's precision (bf16-mixed / bf16-true) decides compute dtypes
            return AutoModelForImageTextToText.from_pretrained(cfg.pretrained, config=hf_cfg, dtype=torch.float32)
        except ImportError as e:
            raise ConfigError(_missing_package(e, hf_cfg)) from None
        except (OSError, ValueError) as e:
            raise VlmtrainError(f"pretrained: cannot load {cfg.pretrained!r} ({str(e).splitlines()[0]})") from None
    try:
        with torch.device(device):
            return AutoModelForImageTextToText.from_config(hf_cfg)
    except ImportError as e:
        raise ConfigError(_missing_package(e, hf_cfg)) from None
    except Exception as e:  # the model's own __init__ on this config (None fields, sizes that do not divide, ...)
        if isinstance(e, ValueError) and "Unrecognized configuration class" in str(e):
            raise ConfigError(f"model_type {hf_cfg.model_type!r}: AutoModelForImageTextToText does not take "
                              f"{type(hf_cfg).__name__}") from None
        raise ConfigError(_cannot_build(e, hf_cfg)) from None


def _cannot_build(e: BaseException, hf_cfg) -> str:
    """Default configs that leave required fields None, or whose parts disagree (transformers' own failure)."""
    return (f"model_type {hf_cfg.model_type!r}: transformers cannot build it from this config ({_one_line(e)}, "
            f"{_failing_frame(e)}); set its fields under `config:` or use `pretrained:`")


def training_template(cfg: NativeModelConfig, model_type: str, family_template: str, processor) -> str:
    """The template labels are built with: the config's (generation-marked); else the checkpoint's own
    (`chat_template.jinja` of the download) when it is the family's official template, as vlmtrain's marked copy of
    it, and when it is another one (a fine-tune's, a vlmtrain export of a composed model, Idefics3-8B's under the
    SmolVLM family entry) as it is, read by prefix renders (`vlmtrain.data.native_encode`): a model is trained in
    the format it is served with; else, for a checkpoint with none, the family's official marked copy."""
    if cfg.chat_template:
        if not GENERATION_TAG.search(cfg.chat_template):
            raise ConfigError("chat_template: needs {% generation %} … {% endgeneration %} around assistant text")
        return cfg.chat_template
    own = getattr(processor, "chat_template", None) if processor is not None else None
    own = own if isinstance(own, str) and own.strip() else None
    if family_template:
        from vlmtrain.model.native.templates import official_template
        from vlmtrain.model.native.templates import training_template as marked

        if own is None or own.strip() == official_template(family_template).strip():
            return marked(family_template)
        _say_own_template(model_type, family_template, own)
        return own
    if own is not None:
        return own
    raise ConfigError(f"chat_template: {model_type!r} has no official template vendored in vlmtrain and the "
                      "checkpoint carries none (no chat_template.jinja / chat_template.json); set `chat_template:` in "
                      "the model config, with {% generation %} marks around assistant text")


def _say_own_template(model_type: str, family_template: str, own: str) -> None:
    """One line: the checkpoint ships a template other than the family's official one, and trains with it."""
    from vlmtrain.model.native.templates import official_template

    def digest(t: str) -> str:
        return hashlib.sha256(t.encode()).hexdigest()[:12]

    log.warning(f"{model_type}: training with the checkpoint's own chat template (sha256 {digest(own)}…), not the "
                f"official {family_template} one (sha256 {digest(official_template(family_template))}…): assistant "
                "turns read by prefix renders; set `chat_template:` (with {% generation %} marks) to choose another")


def build_native(cfg: NativeModelConfig, device: str | torch.device = "cpu", load_weights: bool = True):
    from vlmtrain.model.bundle import ModelBundle

    load_weights = load_weights and str(device) != "meta"
    hf_cfg = _hf_config(cfg)
    hf = _instantiate(cfg, hf_cfg, device, load_weights)
    family, listed = family_for(hf_cfg.model_type, hf)
    if not listed:
        log.info(f"{hf_cfg.model_type}: not a listed family; parts mapped by the generic rule")
    model = NativeVLM(hf, family, hf_cfg.model_type)
    processor = None
    if cfg.pretrained and Path(cfg.pretrained).is_dir() or has_local_weights(cfg.pretrained):
        from vlmtrain.model.native.processor import load_processor

        processor = load_processor(cfg.pretrained, hf_cfg.model_type, cfg.processor)
    elif str(device) != "meta":
        raise VlmtrainError(f"{cfg.name}: a native model needs its processor files (`pretrained:` folder) "
                            "to train; `model_type` + `config` alone only describe/plan on meta")
    if family.prefix_suffix and cfg.chat_template:
        raise ConfigError(f"chat_template: {hf_cfg.model_type!r} has no chat template; its samples are a prefix (the "
                          "user turn) and a suffix (the answer), as its processor builds them; remove chat_template")
    template = None
    if processor and not family.prefix_suffix:
        try:
            template = training_template(cfg, hf_cfg.model_type, family.template, processor)
        except ConfigError:
            if str(device) != "meta":
                raise
            # describe / plan on meta never render a conversation: a family that needs `chat_template:` (InternVL,
            # Gemma 4, GLM-4V) is still described from its checkpoint folder without one
    return ModelBundle(model, processor.tokenizer if processor else None,
                       processor.image_processor if processor else None, cfg, processor=processor,
                       template=template)


def save_native_hf(bundle, out: str | Path, official_template: bool = True) -> Path:
    """The family's own transformers folder: weights, config, processor + marker. The chat template written is the
    one the model trained with when that was the checkpoint's own (it is served as trained), else the family's
    official one."""
    from vlmtrain.model.native.processor import save_processor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = bundle.model
    m.hf.save_pretrained(out)
    proc = bundle.processor
    trained_with_own = isinstance(proc.chat_template, str) and proc.chat_template == bundle.template
    if official_template and m.family.template and not trained_with_own:
        from vlmtrain.model.native.templates import official_template as official

        proc.chat_template = official(m.family.template)
    save_processor(proc, out)
    (out / NATIVE_MARKER).write_text(json.dumps({"model_type": m.model_type, "training_template": bundle.template,
                                                 "processor": bundle.config.processor}, indent=2))
    return out


def is_native_folder(path: str | Path) -> bool:
    path = Path(path)
    if (path / NATIVE_MARKER).is_file():
        return True
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    mt = json.loads(cfg.read_text()).get("model_type")
    # A plain transformers Llava folder keeps importing into the composed kind (its historic path);
    # every other image-text-to-text family is native.
    return mt != "llava" and _is_image_text_to_text(mt)


def _is_image_text_to_text(model_type: str | None) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def load_native_folder(path: str | Path, device: str = "cpu"):
    path = Path(path)
    marker = json.loads((path / NATIVE_MARKER).read_text()) if (path / NATIVE_MARKER).is_file() else {}
    # a marked training template comes back as `chat_template:`; an unmarked one is the folder's own template
    marked = marker.get("training_template") if GENERATION_TAG.search(marker.get("training_template") or "") else None
    cfg = NativeModelConfig(name=path.name, pretrained=str(path), processor=marker.get("processor") or {},
                            chat_template=marked)
    return build_native(cfg, device=device)
