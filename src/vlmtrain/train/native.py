"""What a stage may ask of a native transformers VLM today, refused up front with one line per reason.

Each refusal names a feature built for the composed kind that the native kind does not have yet; the scale-out
work for native families lifts them one by one (packing: built, see `vlmtrain.model.native.vlm`, except for
families whose rows it cannot keep apart (`family_refusals`); FSDP2 and
DeepSpeed ZeRO-2/3: built for the families with a blank image (`Family.blank_image`); DP-SGD: built,
`vlmtrain.train.dp_native`, which refuses what it cannot privatise; compile: not yet).
"""

from __future__ import annotations

import logging

from vlmtrain.errors import ConfigError


def native_refusals(stage) -> list[str]:
    tr, d = stage.trainer, stage.data
    problems = []
    if d.anyres_pinpoints:
        problems.append("data.anyres_pinpoints: native families tile images with their own processor; remove it")
    if tr.compile:
        problems.append("trainer.compile: not available for native families yet")
    return problems


def packing_refusal(family, text_config) -> str:
    """Why packed rows would mix this model's samples ("" when they do not): the family row's reason, else any LM with
    linear-attention layers (a generic-map family), whose recurrent state the restarting position ids do not reset."""
    if family.no_packing:
        return family.no_packing
    if "linear_attention" in (getattr(text_config, "layer_types", None) or ()):
        return ("its linear-attention layers carry a recurrent state across packed samples; "
                "use data.mode: plain or group")
    return ""


def shared_prefix_refusal(model) -> str:
    """Why this NativeVLM's DPO pairs keep two full rows instead of shared-prefix rows ("" when they need not): the
    family row's reason, else an LM with linear-attention layers (a generic-map family: its recurrent state runs
    from one continuation into the next), else an attention implementation that takes no custom mask."""
    from vlmtrain.model.native.shared_prefix import MASKED_IMPLEMENTATIONS

    cfg = model.llm.config
    if model.family.shared_prefix:
        return model.family.shared_prefix
    if "linear_attention" in (getattr(cfg, "layer_types", None) or ()):
        return "its linear-attention layers carry a recurrent state from one continuation into the next"
    impl = getattr(cfg, "_attn_implementation", None) or "sdpa"
    if impl not in MASKED_IMPLEMENTATIONS:
        return f"its attention implementation {impl} takes no custom mask"
    return ""


def configure_shared_prefix(stage, model) -> None:
    """DPO with `dpo.share_prompt` (the default): chosen and rejected in one shared-prefix row per pair where the
    family allows it (`shared_prefix_refusal`), else two full rows, said once in the log."""
    if stage.objective != "dpo" or not stage.dpo.share_prompt:
        model.dpo_shared_prefix = False
        return
    reason = shared_prefix_refusal(model)
    model.dpo_shared_prefix = not reason
    if reason:
        logging.getLogger("vlmtrain.train").info("dpo.share_prompt: two rows per pair for %s: %s", model.model_type,
                                                 reason)


def family_refusals(stage, model) -> list[str]:
    """What the stage asks of this family (the built NativeVLM `model`) that it cannot do, one line per reason."""
    problems = []
    reason = packing_refusal(model.family, model.llm.config) if stage.data.mode == "pack" else ""
    if reason:
        problems.append(f"data.mode: pack is refused for {model.model_type}: {reason}")
    if stage.privacy is not None and model.family.router_aux_loss:
        # the router loss is one term over every token's routing in the batch (not a sum of per-record losses), and
        # per-record gradients of PEFT's fused-expert adapters are not verified under Opacus
        problems.append(f"privacy: DP-SGD is not available for {model.model_type} (mixture of experts): its router "
                        "load-balancing loss couples the records of a batch; train it without privacy")
    if stage.privacy is not None and model.family.batch_aligned_images:
        # the cross-attention k/v projections (LoRA targets) take the image states as `[b·images·tiles, ...]`, so
        # Opacus would read tiles as records; per-record gradients for them are not built
        problems.append(f"privacy: DP-SGD is not available for {model.model_type}: its cross-attention layers see "
                        "image tiles, not records, as rows; train it without privacy")
    if stage.objective == "grpo" and (reason := shared_prefix_refusal(model)):
        # a group's G completions are scored in one shared-prefix row
        problems.append(f"objective: grpo is not available for {model.model_type}: {reason}")
    elif stage.objective == "grpo" and model.family.prefix_suffix:
        problems.append(f"objective: grpo is not available for {model.model_type}: it has no chat template to "
                        "render a prompt with its generation prompt (a prefix and a suffix only)")
    if stage.trainer.router_aux_loss_coef is not None and not model.family.router_aux_loss:
        problems.append(f"trainer.router_aux_loss_coef: {model.model_type} has no mixture-of-experts router "
                        "loss in vlmtrain's objective; remove it")
    return problems


def configure_router_aux(stage, model) -> None:
    """The stage's weight of the MoE router loss over the checkpoint config's (`trainer.router_aux_loss_coef`)."""
    if stage.trainer.router_aux_loss_coef is not None and model.family.router_aux_loss:
        model.router_aux_loss_coef = float(stage.trainer.router_aux_loss_coef)


def check_native_stage(stage, bundle) -> None:
    from vlmtrain.train.dp_native import native_dp_refusals

    problems = native_refusals(stage) + family_refusals(stage, bundle.model) + native_dp_refusals(stage, bundle.model)
    strategy = stage.trainer.strategy
    # sharded ranks must all run the tower every step: a text-only batch runs a blank image (NativeVLM)
    if (strategy == "fsdp" or strategy.startswith("deepspeed")) and bundle.model.blank_image_inputs() is None:
        problems.append(f"trainer.strategy: {strategy} is not available for {bundle.model.model_type} yet "
                        "(no blank image defined for it, which sharded ranks run on text-only batches; use "
                        "single or ddp)")
    if problems:
        raise ConfigError(problems)
    configure_router_aux(stage, bundle.model)
    configure_shared_prefix(stage, bundle.model)
    if stage.trainer.vision_feature_cache_mb:
        logging.getLogger("vlmtrain.train").info("vision feature cache: off (a composed-model feature)")
