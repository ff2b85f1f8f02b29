"""Image processors that transformers 5.23 has only as torchvision classes, for environments without torchvision.

`PORTS` maps a model_type to its port; `vlmtrain.model.native.processor` loads the port where torchvision is
missing, and `AutoImageProcessor` (the original) where it is installed. Each port is checked against the original's
outputs on the same images (tests/fixtures/image_processors.npz, tests/test_native_image_processors.py).
"""

from __future__ import annotations


def ports() -> dict:
    """model_type → the port's class (imported on use: these import transformers' image utilities)."""
    from vlmtrain.model.native.image_processors.lfm2_vl import Lfm2VlImageProcessorPil
    from vlmtrain.model.native.image_processors.llama4 import Llama4ImageProcessorPil

    return {"llama4": Llama4ImageProcessorPil, "lfm2_vl": Lfm2VlImageProcessorPil}


PORTED = ("llama4", "lfm2_vl")
