"""LoRA adapters through PEFT, injected in place into the composed VLM.

Targets are regexes over the VLM's own module names (`llm.model.layers.3.self_attn.q_proj`), so an LLM pattern can
never hit the vision tower's `q_proj` (a known PEFT trap with plain name lists). `inject_adapter_in_model` keeps the
VLM's attributes (`model.vision`, `model.llm`, ...) where they are, unlike wrapping the whole model in a PeftModel.
"""

from __future__ import annotations

import re
import sys
import warnings

import torch
from torch import nn

from vlmtrain.errors import ConfigError, VlmtrainError


def lora_regex(lora_cfg, llm: bool, vision: bool) -> str:
    pats = ([lora_cfg.llm_target] if llm else []) + ([lora_cfg.vision_target] if vision else [])
    return "|".join(f"(?:{p})" for p in pats)


def target_names(model: nn.Module, regex: str) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(regex, n)]


def target_parameter_names(model: nn.Module, regex: str) -> list[str]:
    """Names of parameters matching `regex` (full match) that no linear layer owns (fused 3-D expert tensors such
    as `llm.model.layers.N.mlp.experts.gate_up_proj [E, 2·I, H]`), in the model's parameter order."""
    if not regex:
        return []
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    return [n for n, p in model.named_parameters() if id(p) not in linear and re.fullmatch(regex, n)]


def peft_config(lora_cfg, regex: str | list, parameters: list[str] | None = None, dropout: float | None = None):
    """PEFT's LoraConfig: linear layers by `regex`, plus `parameters` (full names) through `target_parameters`."""
    from peft import LoraConfig

    return LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha,
                      lora_dropout=lora_cfg.dropout if dropout is None else dropout, target_modules=regex,
                      target_parameters=parameters or None, use_dora=lora_cfg.dora, bias="none")


def with_family_vision_target(model: nn.Module, lora_cfg):
    """`lora_cfg` with the native family's own regexes where the config leaves them at their defaults: the vision
    regex (`Family.vision_lora_target`: Gemma 4's tower wraps each projection's `nn.Linear` as `.linear`, which the
    default regex, ending at `_proj`, does not reach) and the fused-expert one (`Family.expert_lora_target`: Llama
    4's experts sit under `feed_forward`, not `mlp`). A target the config sets is kept."""
    family = getattr(model, "family", None)
    defaults = type(lora_cfg).model_fields
    update = {}
    for field, attr in (("vision_target", "vision_lora_target"), ("llm_target_parameters", "expert_lora_target")):
        target = getattr(family, attr, "")
        if target and getattr(lora_cfg, field) == defaults[field].default:
            update[field] = target
    return lora_cfg.model_copy(update=update) if update else lora_cfg


def apply_lora(model: nn.Module, lora_cfg, llm: bool, vision: bool) -> list[str]:
    """Inject adapters; returns the targeted module and parameter names. Adapter init draws from the torch RNG
    (seeded by the stage), so a resumed run rebuilds the same starting adapters before loading the checkpoint."""
    from peft import inject_adapter_in_model

    lora_cfg = with_family_vision_target(model, lora_cfg)
    regex = lora_regex(lora_cfg, llm, vision)
    names = target_names(model, regex)
    if llm and not any(n.startswith("llm.") for n in names):
        raise ConfigError(f"lora.llm_target: {lora_cfg.llm_target!r} matches no linear layer of the LLM")
    if vision and not any(n.startswith("vision.") for n in names):
        raise ConfigError(f"lora.vision_target: {lora_cfg.vision_target!r} matches no linear layer of the tower")
    parameters = target_parameter_names(model, lora_cfg.llm_target_parameters) if llm else []
    if parameters and lora_cfg.dora:
        raise ConfigError("lora.dora: PEFT's adapters on fused expert parameters (lora.llm_target_parameters) do not "
                          "support DoRA; set dora: false, or llm_target_parameters: '' to adapt no experts")
    inject_adapter_in_model(peft_config(lora_cfg, regex), model)
    if parameters:
        _inject_parameter_adapters(model, lora_cfg, parameters)
    return names + parameters


def _inject_parameter_adapters(model: nn.Module, lora_cfg, parameters: list[str]) -> None:
    """Adapters on fused parameters, into the same adapter ("default") as the linear ones. A second pass because
    PEFT's ParamWrapper refuses dropout: these adapters train without it, the linear ones keep `lora.dropout`."""
    from peft import inject_adapter_in_model

    with warnings.catch_warnings():  # "Already found a `peft_config`": intended, one adapter injected in two passes
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(peft_config(lora_cfg, [], parameters, dropout=0.0), model)


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if "peft.tuners.tuners_utils" not in sys.modules:
        # no module can be a PEFT layer before PEFT's layer classes exist; importing PEFT just to find none costs
        # ~2 s (it imports bitsandbytes, whose torch.compile'd kernels import torch._inductor)
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter on/off (off = the base model: DPO's reference without a second copy)."""
    for _, m in lora_layers(model):
        m.enable_adapters(enabled)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under VLM names without PEFT's adapter name (`...q_proj.lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def merge_lora_(model: nn.Module) -> int:
    """Fold adapters into their base weights and put the plain base layers back; returns layers merged."""
    layers = lora_layers(model)
    wrappers = {name for name, _ in layers}
    for name, m in layers:
        if _over_4bit(m):
            # a QLoRA layer whose NF4 base was dequantised (model.quantize.dequantize_): PEFT's merge would
            # re-quantise; add the adapter's delta to the full-precision base instead
            base = m.get_base_layer()
            if isinstance(base, nn.Linear) and base.weight.dtype.is_floating_point:
                base.weight.data += m.get_delta_weight(m.active_adapters[0]).to(base.weight.dtype)
            else:
                raise ValueError(f"{name}: dequantise the 4-bit base (model.quantize.dequantize_) before merging")
        else:
            m.merge()
        parent_name, _, child = name.rpartition(".")
        if parent_name in wrappers:
            # PEFT nests one ParamWrapper per targeted parameter of a module (fused experts: gate_up_proj inside
            # down_proj's wrapper); each merges its own delta, and the outermost puts back the innermost base
            continue
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.get_base_layer())
    return len(layers)


def _over_4bit(layer: nn.Module) -> bool:
    """PEFT's LoRA wrapper for a bitsandbytes 4-bit base (QLoRA)."""
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # peft defines it only when bitsandbytes is importable
        return False
    return isinstance(layer, Linear4bit)


def base_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as if it had no adapters (`q_proj.base_layer.weight` → `q_proj.weight`; nested
    wrappers of fused experts: `experts.base_layer.base_layer.down_proj` → `experts.down_proj`)."""
    return {re.sub(r"(\.base_layer)+\.", ".", k): v for k, v in module.state_dict().items() if "lora_" not in k}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    bad = [k for k in result.unexpected_keys if "lora_" in k]
    if bad:
        raise ValueError(f"adapter tensors do not fit this model: {bad[:3]}")


def save_peft_adapter(peft_model, state: dict[str, torch.Tensor], out) -> None:
    """Place `state` (transformers names of the wrapped model) into a PeftModel and save it to `out`; every adapter
    and modules_to_save tensor must land (PEFT addresses keys from its wrapper)."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, {f"base_model.model.{k}": v for k, v in state.items()})
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if missing:
        raise VlmtrainError(f"export --format peft: adapter tensors not placed: {missing[:3]}")
    peft_model.save_pretrained(out)
