"""A native LoRA stage as PEFT's standard layout over the family's own transformers folder:

    out/base      the starting model (`AutoModelForImageTextToText.from_pretrained(out/base)`, with its processor)
    out/adapter   the adapters (+ a trained connector as `modules_to_save`), for
                  `PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(out/base), out/adapter)`

Module names move from vlmtrain's roles to transformers' paths through the shared modules themselves (the role
containers and the transformers model hold the same objects), so no per-family name table is needed here.
"""

from __future__ import annotations

from pathlib import Path

from vlmtrain.errors import VlmtrainError


def _hf_names(m) -> dict[int, str]:
    return {id(mod): name for name, mod in m.hf.named_modules()}


def _base_state(m, base_connector) -> dict:
    """transformers-named base weights: adapters dropped, PEFT's `base_layer` unwrapped, the connector as it was
    before the stage trained it."""
    state = {}
    for k, v in m.hf.state_dict().items():
        if "lora_" in k:
            continue
        state[k.replace(".base_layer.", ".")] = v.detach().cpu().clone()
    if base_connector is not None:
        for k, v in base_connector.state_dict().items():
            head, _, rest = k.partition(".")
            path = m.family.roles["connector"][head]
            state[f"{path}.{rest}" if rest else path] = v.detach().cpu().clone()
    return state


def export_native_peft(bundle, out: str | Path, base_connector=None) -> Path:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForImageTextToText

    from vlmtrain.model.lora import adapter_state_dict, lora_layers
    from vlmtrain.model.native.build import save_native_hf

    m = bundle.model
    layers = lora_layers(m)
    if not layers:
        raise VlmtrainError("export --format peft: this model has no LoRA adapters")
    names = _hf_names(m)
    ours_to_hf = {n: names[id(mod)] for n, mod in layers}
    connector_paths = _module_paths(m.hf, m.family.roles["connector"].values())
    if base_connector is not None and any(not hasattr(_get(m.hf, p), "parameters") for p in connector_paths):
        raise VlmtrainError("export --format peft: this family's connector includes a bare parameter that PEFT's "
                            "modules_to_save cannot carry; use --format hf (merged)")
    out = Path(out)
    base = AutoModelForImageTextToText.from_config(m.hf.config)
    base.load_state_dict(_base_state(m, base_connector), strict=True)
    base.generation_config = m.hf.generation_config
    base_bundle = type(bundle)(type(m)(base, m.family, m.model_type), bundle.tokenizer, bundle.image_processor,
                               bundle.config, processor=bundle.processor, template=bundle.template)
    save_native_hf(base_bundle, out / "base")

    first = layers[0][1]
    adapter = first.lora_A["default"]
    cfg = LoraConfig(r=adapter.out_features, lora_alpha=first.lora_alpha["default"], lora_dropout=0.0,
                     target_modules=sorted(ours_to_hf.values()),
                     use_dora=bool(first.use_dora.get("default", False)),
                     modules_to_save=connector_paths if base_connector is not None else None)
    peft_model = get_peft_model(AutoModelForImageTextToText.from_pretrained(out / "base"), cfg)
    state = {}
    for k, v in adapter_state_dict(m).items():
        module, _, leaf = k.partition(".lora_")
        state[f"{ours_to_hf[module]}.lora_{leaf}"] = v
    if base_connector is not None:
        for k, v in m.connector.state_dict().items():
            head, _, rest = k.partition(".")
            state[f"{m.family.roles['connector'][head]}.{rest}"] = v.detach().cpu().clone()
    result = set_peft_model_state_dict(peft_model, {f"base_model.model.{k}": v for k, v in state.items()})
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if missing:
        raise VlmtrainError(f"export --format peft: adapter tensors not placed: {missing[:3]}")
    peft_model.save_pretrained(out / "adapter")
    return out


def _module_paths(root, paths) -> list[str]:
    """PEFT's `modules_to_save` takes modules, not containers: a ModuleList/ModuleDict (Qwen3-VL's deepstack
    mergers) is listed by its members."""
    from torch import nn

    out = []
    for p in paths:
        obj = _get(root, p)
        if isinstance(obj, (nn.ModuleList, nn.ModuleDict)):
            out.extend(f"{p}.{name}" for name, _ in obj.named_children())
        else:
            out.append(p)
    return out


def _get(root, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
