"""torchvision's tensor image ops that transformers' torchvision-only image processors call, on torch alone.

torchvision does not import beside this project's torch 2.13.0+cpu, and Llama 4's and LFM2-VL's image processors
exist in transformers 5.23 only as torchvision classes. Their pixel values come from `torchvision.transforms.v2
.functional.resize` / `normalize` on uint8 tensors, which are thin wrappers over `torch.nn.functional.interpolate`
and tensor arithmetic. PIL's resize filters differ from torch's (a few uint8 levels; see tests/fixtures), so the
ports call the same torch kernels the wrappers call, re-stated here (why hand-written: the wrapper's package cannot
be imported). Checked against the torchvision processors' own outputs in tests/test_native_image_processors.py.
"""

from __future__ import annotations

import platform

import torch
from torch.nn.functional import interpolate

# PIL resample codes (transformers' PILImageResampling) → torch interpolate modes, as torchvision's InterpolationMode
_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _native_uint8(mode: str) -> bool:
    """torchvision 0.29's `_do_native_uint8_resize_on_cpu`: which modes interpolate uint8 without a float cast."""
    if mode == "bilinear":
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or \
            platform.machine() in ("aarch64", "arm64")
    return mode == "bicubic"


def resize(image: torch.Tensor, size: tuple[int, int], resample: int = 2, antialias: bool = True) -> torch.Tensor:
    """`[..., c, h, w]` → `[..., c, size[0], size[1]]`, as `torchvision.transforms.v2.functional.resize_image` on
    CPU (same dtype out: uint8 in, uint8 out)."""
    mode = _MODES[int(resample)]
    *lead, c, h, w = image.shape
    if (h, w) == tuple(size):
        return image
    dtype = image.dtype
    ok = [torch.float32, torch.float64] + ([torch.uint8] if mode == "nearest" or _native_uint8(mode) else [])
    x = image.reshape(-1, c, h, w)
    cast = dtype not in ok
    if cast:
        x = x.to(torch.float32)
    x = interpolate(x, size=list(size), mode=mode, align_corners=False if mode != "nearest" else None,
                    antialias=antialias if mode != "nearest" else False)
    if cast:
        if mode == "bicubic" and dtype == torch.uint8:
            x = x.clamp_(min=0, max=255)
        if not dtype.is_floating_point:
            x = x.round_()
        x = x.to(dtype)
    return x.reshape(*lead, c, *size)


def normalize(image: torch.Tensor, mean, std, inplace: bool = False) -> torch.Tensor:
    """`(image - mean) / std` per channel in the image's dtype (torchvision's `normalize_image`). In place, a
    1-channel image against 3-channel statistics raises as the original does (no silent broadcast to 3 channels)."""
    mean = torch.as_tensor(mean, dtype=image.dtype)
    std = torch.as_tensor(std, dtype=image.dtype)
    mean = mean.view(-1, 1, 1) if mean.ndim == 1 else mean
    std = std.view(-1, 1, 1) if std.ndim == 1 else std
    return (image.sub_(mean) if inplace else image.sub(mean)).div_(std)


def rescale_and_normalize(images: torch.Tensor, do_rescale: bool, rescale_factor: float, do_normalize: bool,
                          image_mean, image_std) -> torch.Tensor:
    """transformers' `TorchvisionBackend.rescale_and_normalize`: rescale folded into mean/std, in float32."""
    inplace = images.dtype != torch.float32  # the original normalises its float copy in place
    if do_rescale and do_normalize:
        mean = torch.tensor(image_mean) * (1.0 / rescale_factor)
        std = torch.tensor(image_std) * (1.0 / rescale_factor)
        return normalize(images.to(torch.float32), mean, std, inplace)
    if do_normalize:
        return normalize(images.to(torch.float32), image_mean, image_std, inplace)
    if do_rescale:
        return images * rescale_factor
    return images


def to_tensor(image) -> torch.Tensor:
    """A channel-first numpy image (what `PilBackend.process_image` returns) → a contiguous torch tensor."""
    import numpy as np

    return torch.from_numpy(np.ascontiguousarray(image))
