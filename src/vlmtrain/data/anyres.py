"""AnyRes tiling (LLaVA-NeXT): an image becomes a low-resolution base view plus tiles of a higher-resolution
canvas, each tile the vision tower's native size. The encoder expands one image part into `1 + tiles` image
parts, so the slots, masks and packing work unchanged.

Hand-written: LLaVA-NeXT's `select_best_resolution` / `divide_to_patches` live inside model-specific processors
(transformers' LlavaNext processor) that also fix the token layout; vlmtrain needs only the image split.
"""

from __future__ import annotations

from dataclasses import dataclass


def select_best_resolution(size: tuple[int, int], pinpoints: list[tuple[int, int]]) -> tuple[int, int]:
    """(width, height) of the pinpoint that keeps the most original pixels, then wastes the least canvas."""
    w, h = size
    best, best_eff, best_waste = pinpoints[0], -1, float("inf")
    for pw, ph in pinpoints:
        scale = min(pw / w, ph / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = pw * ph - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (pw, ph), eff, waste
    return best


@dataclass
class AnyResTiler:
    """`pinpoints`: candidate canvases (width, height), multiples of `tile`; `tile`: the tower's image size."""

    pinpoints: list[tuple[int, int]]
    tile: int
    include_base: bool = True

    def __post_init__(self):
        self.pinpoints = [tuple(p) for p in self.pinpoints]
        bad = [p for p in self.pinpoints if p[0] % self.tile or p[1] % self.tile]
        if bad:
            raise ValueError(f"anyres pinpoints {bad} are not multiples of the tile size {self.tile}")

    def __call__(self, image):
        """PIL image → [base, tile_1, ..., tile_k] (row-major tiles)."""
        from PIL import Image

        cw, ch = select_best_resolution(image.size, self.pinpoints)
        scale = min(cw / image.width, ch / image.height)
        nw, nh = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        canvas = Image.new("RGB", (cw, ch), (0, 0, 0))
        canvas.paste(image.resize((nw, nh), Image.BICUBIC), ((cw - nw) // 2, (ch - nh) // 2))
        tiles = [canvas.crop((x, y, x + self.tile, y + self.tile))
                 for y in range(0, ch, self.tile) for x in range(0, cw, self.tile)]
        return ([image] if self.include_base else []) + tiles
