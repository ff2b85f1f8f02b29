"""LFM2-VL's image processor without torchvision: transformers 5.23's `Lfm2VlImageProcessor` re-stated over PIL
decoding (transformers' `PilBackend`) and torch ops (`tensor_ops`), because the original imports torchvision at
module level. Same outputs: an image small enough is one tile resized to multiples of patch × downsample within the
token budget; a larger one is a grid of `tile_size` tiles (+ a thumbnail); every tile becomes patches
`[max_num_patches, patch² · c]` padded to the budget, with `pixel_attention_mask` and `spatial_shapes`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import split_to_tiles
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, PILImageResampling
from transformers.processing_utils import ImagesKwargs

from vlmtrain.model.native.image_processors import tensor_ops


class Lfm2VlImageProcessorKwargs(ImagesKwargs, total=False):
    downsample_factor: int
    do_image_splitting: bool
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    min_image_tokens: int
    max_image_tokens: int
    encoder_patch_size: int
    tile_size: int
    max_pixels_tolerance: float
    do_pad: bool
    return_row_col_info: bool


@lru_cache(maxsize=64)
def target_ratios(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(columns, rows) grids of min..max tiles by area, in the original's order (sorted over the same set)."""
    ratios = [(w, h) for n in range(min_tiles, max_tiles + 1) for w in range(1, n + 1) for h in range(1, n + 1)
              if min_tiles <= w * h <= max_tiles]
    return sorted(set(ratios), key=lambda x: x[0] * x[1])


def closest_grid(width: int, height: int, min_tiles: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """(columns, rows): the grid whose aspect ratio is closest to the image's; on a tie the later (larger) grid when
    the image covers more than half its area (the original's `find_closest_aspect_ratio`)."""
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in target_ratios(min_tiles, max_tiles):
        diff = abs(width / height - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def smart_size(height: int, width: int, factor_px: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) in multiples of `factor_px` (patch × downsample) with the pixel count in [min, max]."""
    h_bar = max(factor_px, round(height / factor_px) * factor_px)
    w_bar = max(factor_px, round(width / factor_px) * factor_px)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor_px, math.floor(height / beta / factor_px) * factor_px)
        w_bar = max(factor_px, math.floor(width / beta / factor_px) * factor_px)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor_px) * factor_px
        w_bar = math.ceil(width * beta / factor_px) * factor_px
    return h_bar, w_bar


def split_layout(h: int, w: int, o: dict) -> tuple[bool, int, int, tuple[int, int]]:
    """(split, rows, columns, the resized single-tile / thumbnail size) for an image of h × w under the options `o`:
    one tile within the token budget, or — when the image is more than `max_pixels_tolerance` times the budget — the
    grid of `tile_size` tiles closest to its aspect (the original's `resize_and_split`). Also what `vlmtrain plan`
    counts."""
    eps, df = o["encoder_patch_size"], o["downsample_factor"]
    unit = eps * df
    budget = o["max_image_tokens"] * eps ** 2 * df ** 2
    new_h, new_w = smart_size(h, w, unit, o["min_image_tokens"] * eps ** 2 * df ** 2, budget)
    too_large = max(eps, round(h / unit) * unit) * max(eps, round(w / unit) * unit) > budget * o["max_pixels_tolerance"]
    if too_large and not o["min_tiles"] == o["max_tiles"] == 1:
        cols, rows = closest_grid(w, h, o["min_tiles"], o["max_tiles"], o["tile_size"])
        return True, rows, cols, (new_h, new_w)
    return False, 1, 1, (new_h, new_w)


class Lfm2VlImageProcessorPil(PilBackend):
    """Saved as `Lfm2VlImageProcessor` (the checkpoints' name); loads their `preprocessor_config.json`."""

    downsample_factor = 2
    do_image_splitting = True
    min_tiles = 2
    max_tiles = 10
    use_thumbnail = True
    min_image_tokens = 64
    max_image_tokens = 256
    encoder_patch_size = 16
    tile_size = 512
    max_pixels_tolerance = 2.0
    do_resize = True
    size = {"height": 512, "width": 512}
    resample = PILImageResampling.BILINEAR
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_pad = True
    return_row_col_info = False
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    valid_kwargs = Lfm2VlImageProcessorKwargs
    model_input_names = ["pixel_values", "pixel_attention_mask", "spatial_shapes"]

    def _split(self, image: torch.Tensor, o: dict, resample) -> tuple[list[torch.Tensor], int, int, list[int]]:
        """One uint8 image `[c, h, w]` → (its tiles `[c, th, tw]`, rows, columns, the single-tile size [h, w])."""
        split, rows, cols, (new_h, new_w) = split_layout(*image.shape[-2:], o)
        if split:
            tile = o["tile_size"]
            big = tensor_ops.resize(image[None], (tile * rows, tile * cols), resample)
            tiles = list(split_to_tiles(big, num_tiles_height=rows, num_tiles_width=cols)[0])
            if o["use_thumbnail"] and cols * rows != 1:
                tiles.append(tensor_ops.resize(image[None], (new_h, new_w), resample)[0])
            return tiles, rows, cols, [new_h, new_w]
        return [tensor_ops.resize(image[None], (new_h, new_w), resample)[0]], 1, 1, [new_h, new_w]

    def _patches(self, tile: torch.Tensor, o: dict, norm: tuple) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """A uint8 tile `[c, th, tw]` → (patches `[max_num_patches, eps² · c]`, [th/eps, tw/eps], mask `[max]`)."""
        eps = o["encoder_patch_size"]
        x = tensor_ops.rescale_and_normalize(tile[None], *norm)
        _, c, th, tw = x.shape
        x = x.reshape(1, c, th // eps, eps, tw // eps, eps).permute(0, 2, 4, 3, 5, 1).reshape(1, -1, eps * eps * c)
        n = x.shape[1]
        mask = torch.ones((o["max_num_patches"],), dtype=torch.int32)
        if o["do_pad"] and o["max_num_patches"] > n:
            x = torch.nn.functional.pad(x, (0, 0, 0, o["max_num_patches"] - n))
            mask[n:] = 0
        return x[0], [th // eps, tw // eps], mask

    def _options(self, kwargs: dict) -> dict:
        """The call's options over the instance's (the original's kwargs), with its tile rules applied."""
        names = Lfm2VlImageProcessorKwargs.__annotations__
        o = {k: getattr(self, k) if kwargs.get(k) is None else kwargs[k] for k in names}
        if not o["do_image_splitting"]:
            o["min_tiles"] = o["max_tiles"] = 1
        elif o["min_tiles"] > o["max_tiles"]:
            raise ValueError("min_tiles must be less than or equal to max_tiles")
        tile_patches = (o["tile_size"] // o["encoder_patch_size"]) ** 2 if o["do_image_splitting"] else 0
        o["max_num_patches"] = max(o["max_image_tokens"] * o["downsample_factor"] ** 2, tile_patches)
        return o

    def _preprocess(self, images: list, resample, do_rescale: bool, rescale_factor: float, do_normalize: bool,
                    image_mean, image_std, return_tensors=None, **kwargs) -> BatchFeature:
        o = self._options(kwargs)
        norm = (do_rescale, rescale_factor, do_normalize, image_mean, image_std)
        pixels, masks, shapes, rows, cols, sizes = [], [], [], [], [], []
        for im in images:
            tiles, r, c, size = self._split(tensor_ops.to_tensor(im), o, resample)
            rows.append(r)
            cols.append(c)
            sizes.append(size)
            for tile in tiles:
                x, shape, mask = self._patches(tile, o, norm)
                pixels.append(x)
                shapes.append(shape)
                masks.append(mask)
        data = {"pixel_values": torch.stack(pixels)}
        if o["do_pad"]:
            data.update(pixel_attention_mask=torch.stack(masks), spatial_shapes=torch.tensor(shapes))
        if o["return_row_col_info"]:
            data.update(image_rows=rows, image_cols=cols, image_sizes=sizes)
        return BatchFeature(data=data, tensor_type=return_tensors)
