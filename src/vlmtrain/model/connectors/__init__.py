"""Connector registry: readable ids → classes. Importing this package registers every built-in connector."""

from vlmtrain.model.connectors import ldp, mlp, pixel_shuffle, resamplers  # noqa: F401  (registration)
from vlmtrain.model.connectors.base import (CONNECTORS, Connector, build_connector, check_connector,
                                            register_connector)

__all__ = ["CONNECTORS", "Connector", "build_connector", "check_connector", "register_connector"]
