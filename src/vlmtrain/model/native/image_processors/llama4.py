"""Llama 4's image processor without torchvision: transformers 5.23's `Llama4ImageProcessor` re-stated over PIL
decoding (transformers' `PilBackend`) and torch ops (`tensor_ops`), because the original imports torchvision at
module level. Same outputs: `pixel_values [Σ tiles, c, s, s]` in bfloat16 (the original normalises in bf16) and
`aspect_ratios [images, 2]` (tile rows, columns); an image of more than one tile gets a global tile last.
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import lru_cache

import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import split_to_tiles
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import ImagesKwargs

from vlmtrain.model.native.image_processors import tensor_ops


class Llama4ImageProcessorKwargs(ImagesKwargs, total=False):
    max_patches: int  # most tiles per image (the tile grids tried are the factor pairs of 1..max_patches)
    resize_to_max_canvas: bool  # upscale to the largest canvas instead of the smallest that fits


@lru_cache(maxsize=8)
def supported_resolutions(max_num_chunks: int, tile: int) -> tuple[tuple[int, int], ...]:
    """(height, width) canvases of up to `max_num_chunks` tiles, in the original's order (by aspect ratio first
    seen, for chunk counts from the largest down)."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for chunks in range(max_num_chunks, 0, -1):
        for f in sorted({d for i in range(1, int(chunks ** 0.5) + 1) if chunks % i == 0 for d in (i, chunks // i)}):
            by_ratio[f / (chunks // f)].append((f, chunks // f))
    return tuple((h * tile, w * tile) for pairs in by_ratio.values() for h, w in pairs)


def best_fit(image_size: tuple[int, int], canvases: torch.Tensor, resize_to_max_canvas: bool) -> torch.Tensor:
    """The canvas `[2]` (height, width) to resize into: the smallest upscale that fits (the largest with
    `resize_to_max_canvas`), else the mildest downscale; ties go to the smallest area (the original's rule)."""
    h, w = image_size
    scales = torch.where(canvases[:, 0] / h > canvases[:, 1] / w, canvases[:, 1] / w, canvases[:, 0] / h)
    up = scales[scales >= 1]
    if len(up) > 0:
        chosen = torch.max(up) if resize_to_max_canvas else torch.min(up)
    else:
        chosen = torch.max(scales[scales < 1])
    fits = canvases[scales == chosen]
    return fits[torch.argmin(fits[:, 0] * fits[:, 1])] if len(fits) > 1 else fits[0]


def max_res_without_distortion(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The largest (height, width) of the image's aspect ratio inside `target`."""
    h, w = image_size
    th, tw = target
    if tw / w < th / h:
        return min(math.floor(h * (tw / w)), th), tw
    return th, min(math.floor(w * (th / h)), tw)


class Llama4ImageProcessorPil(PilBackend):
    """Saved as `Llama4ImageProcessor` (the checkpoints' name); loads their `preprocessor_config.json`."""

    resample = PILImageResampling.BILINEAR
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"height": 336, "width": 336}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    max_patches = 16
    resize_to_max_canvas = False
    valid_kwargs = Llama4ImageProcessorKwargs

    def _rescale_and_normalize(self, images: torch.Tensor, do_rescale, rescale_factor, do_normalize, image_mean,
                               image_std) -> torch.Tensor:
        """The original's override: rescale and normalise in bfloat16, as Llama 4's own preprocessing does."""
        if do_rescale and do_normalize:
            return tensor_ops.normalize(images.to(dtype=torch.bfloat16) * rescale_factor, image_mean, image_std)
        return tensor_ops.rescale_and_normalize(images, do_rescale, rescale_factor, do_normalize, image_mean,
                                                image_std)

    def _tiles(self, image: torch.Tensor, size, resample, max_patches: int, resize_to_max_canvas: bool,
               norm: tuple) -> tuple[torch.Tensor, list[int]]:
        """One uint8 image `[c, h, w]` → its tiles `[n, c, s, s]` and (rows, columns) of the tile grid."""
        canvases = torch.tensor(supported_resolutions(max_patches, size.height))
        hw = tuple(image.shape[-2:])
        target = best_fit(hw, canvases, resize_to_max_canvas)
        if resize_to_max_canvas:
            bound = target
        else:  # upscale only up to one tile side (the original's max_upscaling_size)
            bound = (min(max(hw[0], size.height), target[0]), min(max(hw[1], size.height), target[1]))
        new_h, new_w = max_res_without_distortion(hw, bound)
        x = tensor_ops.resize(image[None], (max(int(new_h), 1), max(int(new_w), 1)), resample)
        x = torch.nn.functional.pad(x, (0, int(target[1]) - x.shape[-1], 0, int(target[0]) - x.shape[-2]))
        x = self._rescale_and_normalize(x, *norm)
        rows, cols = int(target[0]) // size.height, int(target[1]) // size.width
        tiles = split_to_tiles(x, rows, cols)[0]
        if rows * cols > 1:
            whole = tensor_ops.resize(image[None], (size.height, size.width), resample)
            tiles = torch.cat([tiles, self._rescale_and_normalize(whole, *norm)], dim=0)
        return tiles, [rows, cols]

    def _preprocess(self, images: list, do_resize: bool, size, resample, do_rescale: bool, rescale_factor: float,
                    do_normalize: bool, image_mean, image_std, return_tensors=None, max_patches: int | None = None,
                    resize_to_max_canvas: bool | None = None, **kwargs) -> BatchFeature:
        if not do_resize:
            raise ValueError("Llama4 always resizes images to one of its supported resolutions; do_resize=False is "
                             "not supported")
        max_patches = self.max_patches if max_patches is None else max_patches
        to_max = self.resize_to_max_canvas if resize_to_max_canvas is None else resize_to_max_canvas
        norm = (do_rescale, rescale_factor, do_normalize, image_mean, image_std)
        out = [self._tiles(tensor_ops.to_tensor(im), size, resample, max_patches, to_max, norm) for im in images]
        tiles = [t for t, _ in out]
        ratios = [torch.tensor(r) for _, r in out]
        data = {"pixel_values": torch.cat(tiles, dim=0) if return_tensors else tiles,
                "aspect_ratios": torch.stack(ratios) if return_tensors else ratios}
        return BatchFeature(data=data, tensor_type=return_tensors)
