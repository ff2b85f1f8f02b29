"""`python -m bench ocr [--quick]`: burned-in PHI on radiograph-like pixels, read by the gate's OCR.

Each image is a seeded radiograph-like background (a bright body on a dark field, 512 x 384) with Gaussian noise of
sigma 0-40 (on 0-255), and one overlay line of PHI drawn with Pillow's bundled font at 10-40 px, in light grey or
white, at the top-left or bottom-right — the way modalities burn names, dates and numbers in. An image counts as
caught when the gate's check (`Gate._burned_in_phi`: OCR, then the report scrubber on each line) flags it.
Clean images (the same backgrounds, no text) measure false rejects. Reported: recall per (sigma, size), overall,
false-reject rate, seconds per image.
"""

from __future__ import annotations

import time

import numpy as np

from bench import common

SIGMAS = (0, 10, 25, 40)
SIZES = (10, 14, 22, 30, 40)
LINES = ("Name: Jane Roe", "DOB 03/14/1931", "MRN 48213907", "ACC 2023118842 Mercy General Hospital",
         "ROE^JANE 14-MAR-2023")
INKS = ((200, 200, 200), (255, 255, 255))  # light grey, white
CORNERS = ("top-left", "bottom-right")


def background(rng: np.random.Generator, sigma: float, h: int = 384, w: int = 512) -> np.ndarray:
    """[h, w] float radiograph-like field: a bright ellipse (body) with soft ribs on a dark ground."""
    yy, xx = np.mgrid[0:h, 0:w]
    body = 30 + 120 * np.exp(-(((xx - w / 2) / (w / 3.2)) ** 2 + ((yy - h / 2) / (h / 2.4)) ** 2))
    ribs = 15 * np.sin(yy / 9.0) * (body > 80)
    return body + ribs + rng.normal(0, sigma, (h, w)) if sigma else body + ribs


def draw(field: np.ndarray, line: str, size: int, ink, corner: str) -> np.ndarray:
    """[h, w, 3] uint8: `field` with `line` drawn at `size` px in `ink`."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).convert("RGB")
    d, font = ImageDraw.Draw(im), ImageFont.load_default(size=size)
    x0, y0, x1, y1 = d.textbbox((0, 0), line, font=font)
    if corner == "top-left":
        xy = (8, 8)
    else:
        xy = (max(0, im.width - (x1 - x0) - 8), max(0, im.height - (y1 - y0) - 12))
    d.text(xy, line, fill=ink, font=font)
    return np.asarray(im)


def cases(quick: bool) -> list[tuple[int, int, str, tuple, str, int]]:
    out, k = [], 0
    for sigma in SIGMAS:
        for size in SIZES:
            for ink in INKS:
                for corner in CORNERS:
                    out.append((sigma, size, LINES[k % len(LINES)], ink, corner, k))
                    k += 1
    return out[::4] if quick else out


def run(quick: bool = False, out: str | None = None) -> dict:
    from vlmtrain.privacy import pixels
    from vlmtrain.privacy.gate import Gate
    from vlmtrain.privacy.phi import KnownIdentifiers
    from vlmtrain.privacy.policy import Policy

    if not pixels.ocr_available():
        raise SystemExit("bench ocr: tesseract-ocr is not installed")
    gate = Gate(Policy.model_validate({"accepted_consent": ["research"]}), ".", b"k")
    known = KnownIdentifiers()
    grid: dict = {}
    t0 = time.perf_counter()
    rows = cases(quick)
    for sigma, size, line, ink, corner, k in rows:
        rgb = draw(background(np.random.default_rng(k), sigma), line, size, ink, corner)
        caught = bool(gate._burned_in_phi(rgb, known))
        grid.setdefault(f"sigma={sigma}", {}).setdefault(f"{size}px", []).append(caught)
    text_seconds = time.perf_counter() - t0
    clean, t1 = [], time.perf_counter()
    for k in range(8 if quick else 40):
        clean.append(bool(gate._burned_in_phi(
            np.stack([np.clip(background(np.random.default_rng(1000 + k), SIGMAS[k % 4]), 0, 255)
                      .astype(np.uint8)] * 3, -1), known)))
    clean_seconds = time.perf_counter() - t1
    recall = {s: {z: round(sum(v) / len(v), 3) for z, v in row.items()} for s, row in grid.items()}
    allv = [c for row in grid.values() for v in row.values() for c in v]
    result = {"bench": "ocr", "quick": quick, "machine": common.machine(), "ocr": pixels.OCR_DESCRIPTION,
              "tesseract": pixels.tesseract_version(), "images_with_text": len(allv), "recall_grid": recall,
              "recall": round(sum(allv) / len(allv), 4), "clean_images": len(clean),
              "clean_false_rejects": int(sum(clean)), "false_reject_rate": round(sum(clean) / len(clean), 4),
              "seconds_per_image": round((text_seconds + clean_seconds) / (len(allv) + len(clean)), 3)}
    result["headline"] = {k: result[k] for k in ("recall", "false_reject_rate", "seconds_per_image")}
    print({k: v for k, v in result.items() if k not in ("machine", "headline")}, flush=True)
    common.save("ocr-quick" if quick else "ocr", result, out)
    return result
