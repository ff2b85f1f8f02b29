"""Connector contract and registry.

A connector maps vision features `[b, n, d_v]` to `[b, t, d_lm]` LM embeddings; `num_tokens` is `t`, the number of
image-token slots the collator reserves per image.
"""

from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from vlmtrain.errors import ConfigError

CONNECTORS: dict[str, type["Connector"]] = {}


def register_connector(name: str) -> Callable[[type["Connector"]], type["Connector"]]:
    def deco(cls):
        if name in CONNECTORS:
            raise ValueError(f"connector {name!r} registered twice")
        CONNECTORS[name] = cls
        cls.registry_name = name
        return cls

    return deco


class Connector(nn.Module):
    """Base class. Subclasses take `(vision_dim, llm_dim, num_features, grid, **args)`.

    `grid` is the side of the square patch grid, or None when features are not a grid (CLS kept).
    """

    registry_name = ""
    needs_grid = False

    def __init__(self, vision_dim: int, llm_dim: int, num_features: int, grid: int | None):
        super().__init__()
        self.vision_dim, self.llm_dim, self.num_features, self.grid = vision_dim, llm_dim, num_features, grid

    @property
    def num_tokens(self) -> int:  # overridden by connectors that change the token count
        return self.num_features


def check_connector(name: str, args: dict) -> type[Connector]:
    """The registered class for `name`, once its name and argument names are known good (ConfigErrors naming
    `connector.*` otherwise); needs no dimensions, so a model build checks it before anything costly."""
    if name not in CONNECTORS:
        raise ConfigError(f"connector.name: unknown connector {name!r} (choose from: {', '.join(sorted(CONNECTORS))})")
    cls = CONNECTORS[name]
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p not in ("self", "vision_dim", "llm_dim", "num_features", "grid")]
    bad = [k for k in args if k not in allowed]
    if bad:
        raise ConfigError([f"connector.args.{k}: unknown argument for {name} (allowed: {', '.join(allowed) or 'none'})"
                           for k in bad])
    return cls


def build_connector(name: str, vision_dim: int, llm_dim: int, num_features: int, grid: int | None, args: dict):
    """Instantiate a registered connector; bad names/args become ConfigErrors naming `connector.*`."""
    cls = check_connector(name, args)
    if cls.needs_grid and grid is None:
        raise ConfigError(f"connector.name: {name} needs a square patch grid; set vision.select: drop_cls")
    try:
        return cls(vision_dim, llm_dim, num_features, grid, **args)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"connector.args: {name}: {e}") from None
