"""vlmtrain's ports of image processors that transformers 5.23 has only for torchvision (`vlmtrain.model.native
.image_processors`) against the torchvision originals' own outputs.

tests/fixtures/image_processors.npz holds what transformers' torchvision classes returned for six deterministic images
(upscaled, downscaled, wide, tall, tiny, grey), written by tests/fixtures/make_image_processor_fixtures.py in a side
environment with torch 2.14.1 + torchvision 0.29.1 (torchvision does not import beside this project's torch): an
independent reference. The ports call the torch kernels torchvision's resize calls, so pixel values are equal, not
merely close.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURE = Path(__file__).parent / "fixtures" / "image_processors.npz"


@pytest.fixture(scope="module")
def ref():
    return np.load(FIXTURE)


def _run(cls, ref, family: str, i: int):
    from PIL import Image

    ip = cls(**json.loads(str(ref[f"{family}/config"])))
    return ip(images=[Image.fromarray(ref[f"{family}/{i}/image"])], return_tensors="pt")


def test_fixture_is_transformers_torchvision_output(ref):
    versions = json.loads(str(ref["versions"]))
    assert versions["transformers"] == "5.23.0" and versions["torchvision"].startswith("0.29.1")


@pytest.mark.parametrize("i", range(6))
def test_llama4_port_equals_the_torchvision_processor(ref, i):
    """Tiles (global tile included), their bfloat16 pixel values and the tile grid, exactly."""
    from vlmtrain.model.native.image_processors.llama4 import Llama4ImageProcessorPil

    out = _run(Llama4ImageProcessorPil, ref, "llama4", i)
    assert out["pixel_values"].dtype == torch.bfloat16  # the original normalises in bf16
    assert np.array_equal(out["aspect_ratios"].numpy(), ref[f"llama4/{i}/aspect_ratios"])
    assert np.array_equal(out["pixel_values"].float().numpy(), ref[f"llama4/{i}/pixel_values"])


@pytest.mark.parametrize("model_type, saved", [
    ("llama4", {"image_processor_type": "Llama4ImageProcessor", "size": {"height": 32, "width": 32},
                "max_patches": 4, "processor_class": "Llama4Processor"}),
    ("lfm2_vl", {"image_processor_type": "Lfm2VlImageProcessor", "tile_size": 32, "encoder_patch_size": 8,
                 "max_tiles": 4, "processor_class": "Lfm2VlProcessor"})])
def test_port_loads_a_published_folder_without_torchvision(model_type, saved, tmp_path):
    """A checkpoint's `preprocessor_config.json` naming the torchvision class loads as the port through
    `load_processor`'s image-processor step, and the port saves under the original's name."""
    from vlmtrain.model.native.image_processors import ports
    from vlmtrain.model.native.processor import _image_processor, torchvision_only_image_processor

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("the port is used where torchvision is missing")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(saved))
    ip = _image_processor(tmp_path, model_type, {})
    assert type(ip) is ports()[model_type]
    assert all(getattr(ip, k) == v for k, v in saved.items() if k not in ("image_processor_type", "processor_class"))
    assert json.loads(ip.to_json_string())["image_processor_type"] == saved["image_processor_type"]
    assert torchvision_only_image_processor(model_type) is None  # describe / families no longer refuse it


@pytest.mark.parametrize("i", range(6))
def test_lfm2_vl_port_equals_the_torchvision_processor(ref, i):
    """Tiles (grid + thumbnail for large images), padded patches, masks, spatial shapes and the grid, exactly; on
    the grey image both raise the same error (the original does not convert to RGB unless asked)."""
    from vlmtrain.model.native.image_processors.lfm2_vl import Lfm2VlImageProcessorPil

    if f"lfm2_vl/{i}/error" in ref:
        with pytest.raises(RuntimeError) as e:
            _run(Lfm2VlImageProcessorPil, ref, "lfm2_vl", i)
        assert str(e.value).splitlines()[0] == str(ref[f"lfm2_vl/{i}/error"])
        return
    out = _run(Lfm2VlImageProcessorPil, ref, "lfm2_vl", i)
    for key in ("pixel_values", "pixel_attention_mask", "spatial_shapes", "image_rows", "image_cols", "image_sizes"):
        want = ref[f"lfm2_vl/{i}/{key}"]
        got = np.asarray(out[key])
        assert got.shape == want.shape and np.array_equal(got, want), key
    assert ref["lfm2_vl/1/pixel_values"].shape[0] == 3  # the fixture splits: 1×2 tiles + a thumbnail
