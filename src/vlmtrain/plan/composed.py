"""The planner's geometry of a composed VLM (vlmtrain's own vision tower + connector + LLM): the shapes, parameter
counts and per-Linear trainability that `vlmtrain.plan.core`'s step model reads. Native families:
`vlmtrain.plan.families`."""

from __future__ import annotations

from vlmtrain.plan.core import LAYER_RE, ROLES, Geometry, stack_geo, stacks_geometry


def read_geometry(model, stage) -> Geometry:
    """Shapes, parameter counts and per-Linear trainability of `model` (a composed VLM, usually on meta) under
    `stage`. Native families: `vlmtrain.plan.families.native_geometry`."""
    from torch import nn

    layers = {}
    for part in ("llm", "vision"):
        for name, mod in getattr(model, part).named_modules():
            if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "layer") and len(mod):
                layers[part] = mod
                break
    llm = stack_geo(model.llm.config, layers["llm"][0], rotary=True)
    vis = stack_geo(model.vision.model.config, layers["vision"][0], rotary=False)
    n_layers_v = int(model.vision.model.config.num_hidden_layers)
    fl = model.vision.feature_layer
    image = dict(vision_used_layers=fl if fl >= 0 else n_layers_v + 1 + fl,
                 vision_tokens=model.vision.grid ** 2 + model.vision.prefix_tokens,
                 vision_feature_tokens=model.vision.num_features, image_size=model.vision.image_size,
                 image_tokens=model.num_image_tokens, connector_name=type(model.connector).registry_name,
                 connector_module=model.connector)
    return stacks_geometry(model, stage, llm, vis, layers, image, LAYER_RE, ROLES)
