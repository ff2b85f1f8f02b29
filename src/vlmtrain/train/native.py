"""What a stage may ask of a native transformers VLM today, refused up front with one line per reason.

Each refusal names a feature built for the composed kind that the native kind does not have yet; the scale-out
work for native families (packing with mRoPE, FSDP2/ZeRO-3, DP-SGD, compile) lifts them one by one.
"""

from __future__ import annotations

from vlmtrain.errors import ConfigError


def native_refusals(stage) -> list[str]:
    tr, d = stage.trainer, stage.data
    problems = []
    if d.mode == "pack":
        problems.append("data.mode: pack is not available for native families yet (use plain or group)")
    if d.anyres_pinpoints:
        problems.append("data.anyres_pinpoints: native families tile images with their own processor; remove it")
    if tr.strategy not in ("auto", "single", "ddp"):
        problems.append(f"trainer.strategy: {tr.strategy} is not available for native families yet "
                        "(single or ddp)")
    if tr.compile:
        problems.append("trainer.compile: not available for native families yet")
    return problems


def check_native_stage(stage, bundle) -> None:
    from vlmtrain.privacy.dp_native import native_dp_refusals

    problems = native_refusals(stage) + native_dp_refusals(stage, bundle.model)
    if problems:
        raise ConfigError(problems)
    if stage.trainer.vision_feature_cache_mb:
        import logging

        logging.getLogger("vlmtrain.train").info("vision feature cache: off (a composed-model feature)")
