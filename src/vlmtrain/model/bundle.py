"""What both model kinds build: `ModelBundle` (the module and how to feed it) and `count_params`.

The composed builder (`vlmtrain.model.builder`, which also dispatches a NativeModelConfig to the native one) and
the native builder (`vlmtrain.model.native.build`) both import this module, and it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmtrain.config.model import ModelConfig
from vlmtrain.model.vlm import VLM


@dataclass
class ModelBundle:
    """What a stage, an export or `generate` needs: the module and how to feed it."""

    model: VLM  # or a NativeVLM (vlmtrain.model.native): same roles and forward contract
    tokenizer: Any  # None when built on meta without a locally available tokenizer
    image_processor: Any
    config: ModelConfig  # or a NativeModelConfig
    processor: Any = None  # native kind: the family's processor (expands image tokens, family tensors)
    template: str | None = None  # native kind: the generation-marked chat template labels are built with

    @property
    def native(self) -> bool:
        return self.processor is not None or getattr(self.model, "kind", "composed") == "native"


def count_params(model: VLM) -> dict[str, int]:
    """Parameters per module (shared/tied tensors counted once), as `describe` prints them."""
    seen: set[int] = set()
    out = {}
    frozen = tuple(getattr(getattr(model, "family", None), "frozen_roles", None) or ())  # Gemma 4's audio tower
    for name in ("vision", "connector", "llm", *frozen):
        n = 0
        for p in getattr(model, name).parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        out[name] = n
    out["total"] = sum(out.values())
    return out
