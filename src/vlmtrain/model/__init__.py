"""Model room: vision towers, the connector registry, LM loading, VLM composition, HF export/import.

Knows nothing about stages, files of training data, or Lightning.
"""

from vlmtrain.model.builder import build_model
from vlmtrain.model.bundle import ModelBundle, count_params
from vlmtrain.model.connectors import CONNECTORS, build_connector, register_connector
from vlmtrain.model.vlm import VLM

__all__ = ["CONNECTORS", "VLM", "ModelBundle", "build_connector", "build_model", "count_params", "register_connector"]
