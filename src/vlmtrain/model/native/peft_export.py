"""A native LoRA stage as PEFT's standard layout over the family's own transformers folder:

    out/base      the starting model (`AutoModelForImageTextToText.from_pretrained(out/base)`, with its processor)
    out/adapter   the adapters (+ a trained connector as `modules_to_save`), for
                  `PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(out/base), out/adapter)`

Module names move from vlmtrain's roles to transformers' paths through the shared modules themselves (the role
containers and the transformers model hold the same objects), so no per-family name table is needed here.
"""

from __future__ import annotations

import re
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
        state[_unwrapped(k)] = v.detach().cpu().clone()
    if base_connector is not None:
        for k, v in base_connector.state_dict().items():
            head, _, rest = k.partition(".")
            path = m.family.roles["connector"][head]
            state[f"{path}.{rest}" if rest else path] = v.detach().cpu().clone()
    return state


def export_native_peft(bundle, out: str | Path, base_connector=None) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vlmtrain.model.lora import adapter_state_dict, lora_layers, save_peft_adapter
    from vlmtrain.model.native.build import save_native_hf

    m = bundle.model
    layers = lora_layers(m)
    if not layers:
        raise VlmtrainError("export --format peft: this model has no LoRA adapters")
    names = _hf_names(m)
    ours_to_hf = {n: names[id(mod)] for n, mod in layers}
    connector_paths = _module_paths(m.hf, m.family.roles["connector"].values())
    if base_connector is not None and bare_connector_parameters(m):
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
    modules, parameters = _targets(layers, ours_to_hf)
    cfg = LoraConfig(r=adapter.out_features, lora_alpha=first.lora_alpha["default"], lora_dropout=0.0,
                     target_modules=modules, target_parameters=parameters or None,
                     use_dora=bool(first.use_dora.get("default", False)),
                     modules_to_save=connector_paths if base_connector is not None else None)
    peft_model = get_peft_model(AutoModelForImageTextToText.from_pretrained(out / "base"), cfg)
    _check_peft_kept_targets(peft_model.peft_config["default"], parameters, m.model_type)
    state = {}
    for k, v in adapter_state_dict(m).items():
        module, _, leaf = k.partition(".lora_")
        state[f"{ours_to_hf[module]}.lora_{leaf}"] = v
    if base_connector is not None:
        for k, v in m.connector.state_dict().items():
            head, _, rest = k.partition(".")
            state[f"{m.family.roles['connector'][head]}.{rest}"] = v.detach().cpu().clone()
    save_peft_adapter(peft_model, state, out / "adapter")
    return out


def _check_peft_kept_targets(loaded, parameters: list[str], model_type: str) -> None:
    """PEFT rewrites some configs when it wraps a transformers v5 model (`transformers_weight_conversion`: for
    model types whose MoE layout changed from v4, `gate_proj` / `up_proj` targets are read as the old per-expert
    names and mapped onto the fused `gate_up_proj` with doubled rank — GLM-4.5V's shared-expert projections trip it).
    Such an adapter would not load as trained, wherever it is loaded: refuse instead of writing it."""
    added = sorted(set(loaded.target_parameters or ()) - set(parameters))
    if added or loaded.rank_pattern:
        raise VlmtrainError(f"export --format peft: PEFT rewrites the adapter targets of {model_type} when it loads "
                            f"them (its transformers v4->v5 MoE conversion adds {added[:2] or 'a rank pattern'}), so "
                            "the adapter would not load as trained; use --format hf (merged)")


def _unwrapped(key: str) -> str:
    """A state-dict key without PEFT's wrappers: `q_proj.base_layer.weight` → `q_proj.weight`; fused experts nest
    one wrapper per adapted parameter (`experts.base_layer.base_layer.down_proj` → `experts.down_proj`)."""
    return re.sub(r"(\.base_layer)+\.", ".", key)


def _targets(layers, ours_to_hf: dict[str, str]) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) in transformers' names. A wrapper of a fused parameter (PEFT's
    ParamWrapper, `.parameter_name`) sits at its module's path plus one `.base_layer` per wrapper around it; PEFT
    nests the wrappers of one module in its own fixed order, so the rebuilt adapters get the same names."""
    modules, parameters = [], []
    for name, layer in layers:
        hf_name = ours_to_hf[name]
        if hasattr(layer, "parameter_name"):
            owner = re.sub(r"(\.base_layer)+$", "", hf_name)
            parameters.append(f"{owner}.{layer.parameter_name}")
        else:
            modules.append(hf_name)
    return sorted(modules), sorted(parameters)


def bare_connector_parameters(m) -> list[str]:
    """transformers paths of the connector's bare parameters (LLaVA-NeXT's `image_newline`): PEFT's
    `modules_to_save` carries modules only, so a stage that trained them exports merged (`--format hf`)."""
    # a path whose object is None (Gemma 4's default config has no vision tower, so no `embed_vision`) holds nothing
    return [p for p in _module_paths(m.hf, m.family.roles["connector"].values())
            if _get(m.hf, p) is not None and not hasattr(_get(m.hf, p), "parameters")]


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
