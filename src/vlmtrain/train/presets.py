"""The stage presets. A stage's own fields override these (deep merge), so a preset is only a default.

Learning rates follow LLaVA-1.5 (align 1e-3 on the projector; SFT 2e-5), ShareGPT4V-style full pretraining
(vision tower at a 10× lower rate), and TRL's DPO default scale (5e-7 for 7B; tiny configs override).
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "align": {
        "objective": "next_token",
        "train": {"vision": False, "connector": True, "llm": False},
        "optim": {"lr": 1e-3, "schedule": "cosine", "warmup_ratio": 0.03, "weight_decay": 0.0},
        "trainer": {"vision_feature_cache_mb": 1024},  # the tower is frozen: compute each image's features once
    },
    "pretrain": {
        "objective": "next_token",
        "train": {"vision": True, "connector": True, "llm": True},
        "optim": {"lr": 2e-5, "lr_groups": {"vision": 2e-6}, "schedule": "cosine", "warmup_ratio": 0.03},
    },
    "sft": {
        "objective": "next_token",
        "train": {"vision": False, "connector": True, "llm": True},
        "optim": {"lr": 2e-5, "schedule": "cosine", "warmup_ratio": 0.03},
    },
    "dpo": {
        "objective": "dpo",
        "train": {"vision": False, "connector": False, "llm": True},
        "optim": {"lr": 5e-7, "schedule": "cosine", "warmup_ratio": 0.1},
        "dpo": {"beta": 0.1, "loss_type": "sigmoid", "reference": "copy"},
    },
    # TRL 1.16's GRPOConfig defaults (lr 1e-6, linear decay, no warmup); the stage adds `grpo: {rewards: ...}`.
    # Every step is logged: a GRPO step is slow (generation) and its reward curve is the thing to watch.
    "grpo": {
        "objective": "grpo",
        "train": {"vision": False, "connector": False, "llm": True},
        "optim": {"lr": 1e-6, "schedule": "linear", "warmup_ratio": 0.0},
        "trainer": {"log_every_n_steps": 1},
    },
}


def deep_merge(base: dict, over: dict) -> dict:
    """`over` wins; nested mappings merge key by key; lists and scalars replace."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_preset(stage: dict) -> dict:
    preset = stage.get("preset")
    return deep_merge(PRESETS[preset], stage) if preset in PRESETS else stage
