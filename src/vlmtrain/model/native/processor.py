"""The family's own transformers processor, also where its video half cannot be built.

Qwen2/2.5/3-VL, SmolVLM and LLaVA-OneVision processors hold a video processor, and transformers' video-processor
registry needs torchvision; without it the processor class refuses to construct although its image path needs no
torchvision (its image processors fall back to PIL). vlmtrain trains on images, so it builds the *same processor
class* with its video half left out (`image_only`): the image-token expansion, the family tensors and the chat
template all remain transformers' own code. With torchvision installed `AutoProcessor` is used as is.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import re
import sys
import types
from functools import lru_cache
from pathlib import Path

from vlmtrain.errors import ConfigError, VlmtrainError

log = logging.getLogger(__name__)


@lru_cache(maxsize=None)
def image_only(cls):
    """`cls` (a ProcessorMixin subclass) accepting `video_processor=None`: the only change is that the class check
    of a missing video processor is skipped. The subclass keeps the original's name, so `save_pretrained` writes
    the family's own `processor_class` and the saved folder loads with `AutoProcessor` where torchvision exists."""

    def check_argument_for_proper_class(self, attribute_name, arg):
        if attribute_name == "video_processor" and arg is None:
            return None
        return cls.check_argument_for_proper_class(self, attribute_name, arg)

    return type(cls.__name__, (cls,), {"check_argument_for_proper_class": check_argument_for_proper_class,
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__})


# Processors that transformers 5.23 marks `requires torchvision` only because their module imports a helper from the
# torchvision image processor's module, where the PIL image processor's module has the same function (same code):
# model_type → (model package, processor module, the torchvision module it imports, the PIL module that replaces it).
# Mistral 3: `processing_pixtral` imports `get_resize_output_image_size` for `_get_num_multimodal_tokens`.
_PIL_SIBLINGS = {"mistral3": ("pixtral", "processing_pixtral", "image_processing_pixtral",
                              "image_processing_pil_pixtral")}


@lru_cache(maxsize=None)
def pil_sibling_processor(model_type: str):
    """transformers' own processor module of `model_type` (`_PIL_SIBLINGS`), executed with its torchvision-only
    import served by the PIL image processor's module → the module. Nothing of the processor is rewritten: the
    file is transformers' installed source; only the sibling import resolves to the PIL twin of the helper."""
    pkg, proc_mod, tv_mod, pil_mod = _PIL_SIBLINGS[model_type]
    base = f"transformers.models.{pkg}"
    pil = importlib.import_module(f"{base}.{pil_mod}")
    shim = types.ModuleType(f"{base}.{tv_mod}")
    shim.__dict__.update({k: v for k, v in vars(pil).items() if not k.startswith("__")})
    name = f"{base}.{proc_mod}"
    spec = importlib.util.spec_from_file_location(name, str(Path(pil.__file__).with_name(f"{proc_mod}.py")))
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get(shim.__name__)
    sys.modules[shim.__name__] = shim
    sys.modules[name] = module  # auto_docstring reads the class's source file through its module
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop(shim.__name__, None)
        else:
            sys.modules[shim.__name__] = saved
    return module


def _torchvision_available() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def processor_class(model_type: str):
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if name is None:
        raise ConfigError(f"model_type {model_type!r}: transformers has no processor class for it; vlmtrain needs "
                          "one to train (describe works on meta)")
    if model_type in _PIL_SIBLINGS and not _torchvision_available():
        return getattr(pil_sibling_processor(model_type), name)
    return getattr(transformers, name)


def build_image_only(model_type: str, image_processor, tokenizer, chat_template: str | None = None, **kwargs):
    cls = processor_class(model_type)
    args = {"image_processor": image_processor, "tokenizer": tokenizer, "chat_template": chat_template, **kwargs}
    if "video_processor" in cls.get_attributes():
        args["video_processor"] = None
        cls = image_only(cls)
    return cls(**args)


def _init_kwargs(proc) -> dict:
    """The processor's own constructor arguments (not its sub-processors or template), as it holds them."""
    skip = {"self", "args", "kwargs", "chat_template", *proc.get_attributes()}
    return {k: getattr(proc, k) for k in inspect.signature(type(proc).__init__).parameters
            if k not in skip and hasattr(proc, k) and isinstance(getattr(proc, k), (str, int, float, bool, list))}


def save_processor(proc, out: str | Path) -> None:
    """`save_pretrained`, or for an image-only processor the layout of the families' published checkpoints:
    tokenizer files, `preprocessor_config.json` (the image processor, naming the processor class),
    `chat_template.jinja` and `processor_config.json` (the processor's own arguments)."""
    if getattr(proc, "video_processor", True) is not None:
        proc.save_pretrained(out)
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = type(proc).__name__
    proc.tokenizer._set_processor_class(name)
    proc.tokenizer.save_pretrained(out)
    proc.image_processor.save_pretrained(out)
    if isinstance(proc.chat_template, str):
        (out / "chat_template.jinja").write_text(proc.chat_template)
    # other sub-processors (Gemma 4's audio `feature_extractor`) nested by name, as transformers' own
    # processor_config.json nests them; `preprocessor_config.json` already holds the image processor
    nested = {a: json.loads(getattr(proc, a).to_json_string()) for a in proc.get_attributes()
              if a not in ("tokenizer", "image_processor", "video_processor") and getattr(proc, a, None) is not None}
    (out / "processor_config.json").write_text(json.dumps({"processor_class": name, **_init_kwargs(proc), **nested},
                                                          indent=2))


def load_processor(src: str | Path, model_type: str, overrides: dict | None = None):
    """The checkpoint's processor with `overrides` (e.g. `max_pixels`) applied to its image processor."""
    from transformers import AutoProcessor, AutoTokenizer

    overrides = dict(overrides or {})
    try:
        # trust_remote_code=False: transformers' own classes, never its interactive "run the custom code?" prompt
        proc = AutoProcessor.from_pretrained(src, trust_remote_code=False, **overrides)
    except (AttributeError, ImportError, ValueError, TypeError) as e:
        # the video half needs torchvision (see module doc); anything else is a real error
        if "video" not in str(e).lower() and "torchvision" not in str(e).lower() and \
                "_extra_content" not in str(e):
            raise VlmtrainError(f"{src}: cannot load the processor ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
        try:
            tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
            ip = _image_processor(src, model_type, overrides)
            template = tok.chat_template if isinstance(tok.chat_template, str) else None
            proc = build_image_only(model_type, ip, tok, chat_template=_saved_template(src) or template,
                                    **_saved_kwargs(src))
        except OSError as e2:
            raise VlmtrainError(f"{src}: cannot load tokenizer/image processor ({e2})") from None
        except (ImportError, ValueError) as e2:
            if "torchvision" not in str(e2).lower():
                raise VlmtrainError(f"{src}: cannot load the processor ({type(e2).__name__}: "
                                    f"{str(e2).splitlines()[0]})") from None
            raise ConfigError(_needs_torchvision(src, model_type, e2)) from None
    except OSError as e:
        raise VlmtrainError(f"{src}: cannot load the processor offline ({str(e).splitlines()[0]})") from None
    return proc


def _image_processor(src, model_type: str, overrides: dict):
    """The checkpoint's image processor: vlmtrain's port where transformers has only a torchvision class and
    torchvision is missing (`image_processors.PORTED`), else transformers' own through `AutoImageProcessor`."""
    from transformers import AutoImageProcessor

    from vlmtrain.model.native.image_processors import PORTED, ports

    if model_type in PORTED and not _torchvision_available():
        return ports()[model_type].from_pretrained(src, **overrides)
    return AutoImageProcessor.from_pretrained(src, trust_remote_code=False, **overrides)


def torchvision_only_image_processor(model_type: str) -> str | None:
    """The family's image processor class when transformers has it for torchvision only (no PIL variant) and
    vlmtrain has no port of it (`image_processors.PORTED`)."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    from vlmtrain.model.native.image_processors import PORTED

    if model_type in PORTED:
        return None
    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
    if isinstance(names, dict) and "pil" not in names and names.get("torchvision"):
        return names["torchvision"]
    return None


def _needs_torchvision(src, model_type: str, e: Exception) -> str:
    """One line naming the part that exists only for torchvision (the image processor, or the processor itself)."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    m = re.search(r"(\w+Processor) requires the Torchvision library", str(e), re.IGNORECASE)
    if m:
        part = f"its processor ({m.group(1)}) requires torchvision"
    else:
        names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) or {}
        name = names.get("torchvision") if isinstance(names, dict) else None
        part = f"its image processor{f' ({name})' if name else ''} exists only for torchvision"
    return f"pretrained: {src}: model_type {model_type!r}: {part}, which is not installed (pip install torchvision)"


def _saved_template(src) -> str | None:
    p = Path(src)
    for name in ("chat_template.jinja",):
        if (p / name).is_file():
            return (p / name).read_text()
    if (p / "chat_template.json").is_file():
        return json.loads((p / "chat_template.json").read_text()).get("chat_template")
    return None


def _saved_kwargs(src) -> dict:
    """The processor's saved constructor arguments; a nested feature extractor (Gemma 4's audio one) is rebuilt
    from its dict with the class it names (`feature_extractor_type`)."""
    import transformers

    p = Path(src) / "processor_config.json"
    if not p.is_file():
        return {}
    data = json.loads(p.read_text())
    # sub-processors are passed as objects; a `save_pretrained` processor_config.json may nest their dicts too
    out = {k: v for k, v in data.items() if k not in ("processor_class", "auto_map", "image_processor", "tokenizer",
                                                      "video_processor")}
    fe = out.get("feature_extractor")
    if isinstance(fe, dict) and isinstance(fe.get("feature_extractor_type"), str):
        out["feature_extractor"] = getattr(transformers, fe["feature_extractor_type"]).from_dict(fe)
    return out
