"""Interop with transformers' `LlavaForConditionalGeneration` / `LlavaProcessor`.

Export: vision tower, projector and LM are copied module by module into a Llava built on the meta device (no
second copy of the weights in memory), then saved with `save_pretrained`. `mlp2x_gelu` maps 1:1 onto Llava's
projector; `linear` maps onto it exactly with `projector_hidden_act="linear"` and an identity `linear_2`.
Other connectors have no Llava equivalent and are refused with a message pointing to the native format.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmtrain.errors import VlmtrainError
from vlmtrain.model.lora import base_state_dict

LLAVA_CONNECTORS = ("linear", "mlp2x_gelu")


def _llava_config(bundle):
    from transformers import LlavaConfig

    m = bundle.model
    name = bundle.config.connector.name
    if name not in LLAVA_CONNECTORS:
        raise VlmtrainError(
            f"connector {name!r} has no transformers Llava equivalent (only {', '.join(LLAVA_CONNECTORS)}); "
            "export with --format vlmtrain instead"
        )
    vision_cfg = m.vision.model.config
    text_cfg = m.llm.config
    # Llava's "default" strategy drops exactly one CLS token; a tower without prefix tokens must use "full".
    strategy = "default" if (m.vision.select == "drop_cls" and m.vision.prefix_tokens == 1) else "full"
    if m.vision.select == "drop_cls" and m.vision.prefix_tokens > 1:
        raise VlmtrainError(f"vision tower has {m.vision.prefix_tokens} prefix tokens; Llava can drop only one")
    return LlavaConfig(
        vision_config=vision_cfg.to_dict(),
        text_config=text_cfg.to_dict(),
        image_token_id=m.image_token_id,
        image_seq_length=m.num_image_tokens,
        projector_hidden_act="gelu" if name == "mlp2x_gelu" else "linear",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=m.vision.feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_cfg, "tie_word_embeddings", False)),
    )


def _projector_state(bundle, connector=None) -> dict[str, torch.Tensor]:
    c = connector if connector is not None else bundle.model.connector
    if bundle.config.connector.name == "mlp2x_gelu":
        return {k: v.detach() for k, v in c.state_dict().items()}
    w, b = c.proj.weight.detach(), c.proj.bias.detach()
    d = w.shape[0]
    return {"linear_1.weight": w, "linear_1.bias": b,
            "linear_2.weight": torch.eye(d, dtype=w.dtype), "linear_2.bias": torch.zeros(d, dtype=w.dtype)}


def _copy_buffers(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    for name, buf in src.named_buffers():
        owner_path, _, leaf = name.rpartition(".")
        owner = dst.get_submodule(owner_path) if owner_path else dst
        persistent = leaf not in owner._non_persistent_buffers_set
        owner.register_buffer(leaf, buf.clone(), persistent=persistent)


def to_llava(bundle):
    """Return a `LlavaForConditionalGeneration` sharing nothing mutable with the bundle (tensors are assigned)."""
    from transformers import LlavaForConditionalGeneration

    cfg = _llava_config(bundle)
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(cfg)
    m = bundle.model
    # base_state_dict: a model carrying (unmerged) LoRA adapters exports its base weights
    llava.model.vision_tower.load_state_dict(base_state_dict(m.vision.model), strict=True, assign=True)
    llava.model.multi_modal_projector.load_state_dict(_projector_state(bundle), strict=True, assign=True)
    llava.model.language_model.load_state_dict(base_state_dict(m.llm.get_decoder()), strict=True, assign=True)
    llava.lm_head.load_state_dict(base_state_dict(m.llm.get_output_embeddings()), strict=True, assign=True)
    if cfg.tie_word_embeddings:
        llava.tie_weights()
    # Non-persistent buffers (rotary inv_freq, position ids) are not in state dicts: take them from our modules,
    # which are the same classes at the same relative paths.
    _copy_buffers(m.vision.model, llava.model.vision_tower)
    _copy_buffers(m.llm.get_decoder(), llava.model.language_model)
    left = [n for n, b in llava.named_buffers() if b.is_meta]
    if left:
        raise VlmtrainError(f"export: buffers not materialised: {', '.join(left[:5])}")
    llava.eval()
    return llava


def llava_processor(bundle):
    from transformers import LlavaProcessor

    m = bundle.model
    return LlavaProcessor(
        image_processor=bundle.image_processor,
        tokenizer=bundle.tokenizer,
        patch_size=m.vision.patch_size,
        vision_feature_select_strategy="default" if (m.vision.select == "drop_cls" and m.vision.prefix_tokens) else "full",
        chat_template=bundle.tokenizer.chat_template,
        image_token=bundle.config.image_token,
        num_additional_image_tokens=m.vision.prefix_tokens,
    )


def export_llava(bundle, out: str | Path) -> Path:
    out = Path(out)
    llava = to_llava(bundle)
    llava.save_pretrained(out)
    llava_processor(bundle).save_pretrained(out)
    return out


# vlmtrain module names → transformers Llava module names (for adapters)
_LLAVA_PREFIXES = (("llm.model.", "model.language_model."), ("llm.lm_head", "lm_head"),
                   ("vision.model.", "model.vision_tower."), ("connector.", "model.multi_modal_projector."))


def _to_llava_name(name: str) -> str:
    for ours, theirs in _LLAVA_PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise VlmtrainError(f"no Llava equivalent for module {name!r}")


def export_peft(bundle, out: str | Path, base_connector=None) -> Path:
    """A model carrying trained LoRA adapters → `out/base` (transformers Llava of the base weights) and
    `out/adapter` (PEFT's standard adapter format for that Llava), so that
    `PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(out/base), out/adapter)` reproduces the
    trained model. A trained connector travels as PEFT `modules_to_save` (as LLaVA does for its projector);
    `base_connector` is the connector before training (the base folder gets it)."""
    from peft import LoraConfig, get_peft_model

    from vlmtrain.model.lora import adapter_state_dict, lora_layers, save_peft_adapter

    m = bundle.model
    layers = [n for n, _ in lora_layers(m)]
    if not layers:
        raise VlmtrainError("export --format peft: this model has no LoRA adapters")
    lora_mod = dict(lora_layers(m))[layers[0]]
    out = Path(out)
    trained_connector = m.connector
    if base_connector is not None:
        m.connector = base_connector
    try:
        llava = to_llava(bundle)
    finally:
        m.connector = trained_connector
    llava.save_pretrained(out / "base")
    llava_processor(bundle).save_pretrained(out / "base")
    adapter = lora_mod.lora_A["default"]
    cfg = LoraConfig(r=adapter.out_features, lora_alpha=lora_mod.lora_alpha["default"],
                     lora_dropout=0.0, target_modules=[_to_llava_name(n) for n in layers],
                     use_dora=bool(lora_mod.use_dora.get("default", False)),
                     modules_to_save=["multi_modal_projector"] if base_connector is not None else None)
    peft_model = get_peft_model(llava, cfg)
    state = {_to_llava_name(k): v for k, v in adapter_state_dict(m).items()}
    if base_connector is not None:
        state.update({f"model.multi_modal_projector.{k}": v
                      for k, v in _projector_state(bundle, trained_connector).items()})
    save_peft_adapter(peft_model, state, out / "adapter")
    return out


def import_llava(path: str | Path, device: str = "cpu"):
    """Load a transformers Llava folder as a ModelBundle (connector `mlp2x_gelu`, or `linear` when exported so)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlmtrain.config.load import validate
    from vlmtrain.config.model import ModelConfig
    from vlmtrain.model.builder import build_model

    path = Path(path)
    llava = LlavaForConditionalGeneration.from_pretrained(path)
    proc = AutoProcessor.from_pretrained(path)
    lc = llava.config
    if not isinstance(lc.vision_feature_layer, int):
        raise VlmtrainError(f"{path}: multi-layer vision features are not supported")
    proj = llava.model.multi_modal_projector
    act = lc.projector_hidden_act
    connector = "mlp2x_gelu" if act == "gelu" else "linear" if act == "linear" else None
    if connector == "linear":
        w2 = proj.linear_2.weight
        if not (torch.equal(w2, torch.eye(w2.shape[0], dtype=w2.dtype)) and not proj.linear_2.bias.any()):
            connector = None
    if connector is None:
        raise VlmtrainError(f"{path}: projector act {act!r} does not map to a vlmtrain connector")
    vcfg = lc.vision_config.to_diff_dict() | {"model_type": lc.vision_config.model_type}
    tcfg = lc.text_config.to_diff_dict() | {"model_type": lc.text_config.model_type}
    for d in (vcfg, tcfg):
        for k in ("transformers_version", "architectures", "dtype"):
            d.pop(k, None)
    data = {
        "name": path.name,
        "vision": {"config": vcfg, "feature_layer": lc.vision_feature_layer,
                   "select": "drop_cls" if lc.vision_feature_select_strategy == "default" else "all"},
        "connector": {"name": connector},
        "llm": {"config": tcfg},
        "tokenizer": {"pretrained": str(path)},
        "image_processor": {"pretrained": str(path)},
        "image_token": proc.image_token,
    }
    cfg = validate(ModelConfig, data, source=str(path / "config.json"))
    bundle = build_model(cfg, device=device, load_weights=False, tokenizer=proc.tokenizer)
    m = bundle.model
    m.vision.model.load_state_dict(llava.model.vision_tower.state_dict(), strict=True)
    if connector == "mlp2x_gelu":
        m.connector.load_state_dict(proj.state_dict(), strict=True)
    else:
        m.connector.proj.load_state_dict({"weight": proj.linear_1.weight, "bias": proj.linear_1.bias})
    m.llm.get_decoder().load_state_dict(llava.model.language_model.state_dict(), strict=True)
    m.llm.get_output_embeddings().load_state_dict(llava.lm_head.state_dict(), strict=True)
    bundle.image_processor = proc.image_processor
    return bundle
