"""Typed configuration: pydantic schemas, YAML loading, dotted overrides, one clear message per bad field.

Must not import torch at import time (the CLI's --help stays fast).
"""

from vlmtrain.config.load import load_model_config, load_yaml_with_overrides, parse_overrides, validate
from vlmtrain.config.model import (
    ConnectorConfig,
    ImageProcessorConfig,
    LLMConfig,
    ModelConfig,
    TokenizerConfig,
    VisionConfig,
)

__all__ = [
    "ConnectorConfig",
    "ImageProcessorConfig",
    "LLMConfig",
    "ModelConfig",
    "TokenizerConfig",
    "VisionConfig",
    "load_model_config",
    "load_yaml_with_overrides",
    "parse_overrides",
    "validate",
]
