"""`python -m bench faces [--quick]`: the gate's face check on faces and on medical images that hold none.

- faces: scikit-image's LFW subset (its 100 face crops, 25 x 25 grey, upscaled 4x with a replicated border so a
  detector sees the head's outline) and its `astronaut` photograph (colour);
- no faces: every image in pydicom's test files and the `pydicom-data` package that decodes (CT, MR, CR, US, NM,
  RT, SEG, secondary captures, JPEG/J2K variants), rendered to PNG bytes the way the gate renders a DICOM;
  scikit-image's medical samples (retina, microaneurysms, IHC, cells, the Shepp-Logan phantom); twelve synthetic
  grey images with noise and texture; two photographs without a person (scikit-image's `coffee` and `chelsea`);
  and LFW's 100 non-face crops.

Each image goes through `pixels.face_check` exactly as the gate calls it (PNG bytes decoded to RGB). Reported:
recall on faces, false faces per set, ms per image.
"""

from __future__ import annotations

import io
import time

import numpy as np

from bench import common


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = (255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-9)).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return np.ascontiguousarray(a[..., :3])


def _png_rgb(png: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))


def faces(quick: bool = False) -> dict[str, np.ndarray]:
    import cv2
    from skimage import data

    out = {"skimage-astronaut": _rgb(data.astronaut())}
    lfw = data.lfw_subset()[:100]  # the first 100 are faces, the last 100 are not
    for i, f in enumerate(lfw[:10] if quick else lfw):
        big = cv2.resize(_rgb(f), (100, 100), interpolation=cv2.INTER_CUBIC)
        out[f"lfw-{i:03d}"] = cv2.copyMakeBorder(big, 30, 30, 30, 30, cv2.BORDER_REPLICATE)
    return out


def dicom_images(quick: bool = False) -> dict[str, np.ndarray]:
    """Every test DICOM of pydicom and pydicom-data whose pixels render (as the gate renders them)."""
    import warnings

    from pydicom.data import get_testdata_files

    from vlmtrain.privacy import dicom

    out = {}
    files = sorted(set(get_testdata_files("*.dcm")))
    for path in files[:20] if quick else files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = dicom.read(path)
                png, _ = dicom.to_png(ds)
        except Exception:  # noqa: BLE001 - no pixel data, or a codec this install lacks: not an image here
            continue
        name = path.rsplit("/", 1)[-1]
        if getattr(ds, "Modality", "") in ("XC", "OT", "GM") and "face" in name.lower():
            continue  # OT-PAL-8-face.dcm is a photograph of a face: not a no-face image
        out[f"dicom-{name}"] = _png_rgb(png)
    return out


def other_no_faces() -> dict[str, dict[str, np.ndarray]]:
    import cv2
    from skimage import data

    medical = {f"skimage-{n}": _rgb(getattr(data, n)()) for n in ("retina", "microaneurysms", "immunohistochemistry",
                                                                   "cell", "shepp_logan_phantom")}
    r = np.random.default_rng(0)
    synth = {}
    for i in range(6):
        h, w = 256 + 64 * i, 320 + 32 * i
        yy, xx = np.mgrid[0:h, 0:w]
        body = 90 + 80 * np.exp(-(((xx - w / 2) / (w / 3)) ** 2 + ((yy - h / 2) / (h / 2.5)) ** 2))
        a = body + r.normal(0, 10 + 6 * i, (h, w))
        synth[f"synthetic-grey-{i}"] = _rgb(np.clip(a, 0, 255).astype(np.uint8))
        # low-frequency texture (blurred noise) plus fine noise, sigma 25: what Haar cascades fire on
        tex = cv2.GaussianBlur(r.normal(0, 60, (h, w)), (0, 0), 3 + i) + r.normal(0, 25, (h, w))
        synth[f"synthetic-texture-{i}"] = _rgb(np.clip(body + tex, 0, 255).astype(np.uint8))
    photos = {f"skimage-{n}": _rgb(getattr(data, n)()) for n in ("coffee", "chelsea")}
    lfw_non = {f"lfw-nonface-{i:03d}": cv2.resize(_rgb(f), (100, 100), interpolation=cv2.INTER_CUBIC)
               for i, f in enumerate(data.lfw_subset()[100:])}
    return {"skimage_medical": medical, "synthetic_grey": synth, "photos_without_people": photos,
            "lfw_non_faces": lfw_non}


def run(quick: bool = False, out: str | None = None) -> dict:
    from vlmtrain.privacy import pixels

    pixels.warm_up(faces=True, ocr=False)
    sets = {"faces": faces(quick), "dicom": dicom_images(quick), **other_no_faces()}
    result: dict = {"bench": "faces", "quick": quick, "machine": common.machine(),
                    "detector": pixels.FACE_DETECTOR, "sets": {}}
    for name, images in sets.items():
        found, t0, missed = [], time.perf_counter(), []
        for key, rgb in images.items():
            hit = bool(pixels.face_check(rgb))
            found.append(hit)
            if hit != (name == "faces"):
                missed.append(key)
        n = len(images)
        row = {"images": n, "with_face": int(sum(found)), "ms_per_image": round(1000 * (time.perf_counter() - t0)
                                                                                  / max(n, 1), 1)}
        row["recall" if name == "faces" else "false_faces"] = (round(sum(found) / n, 4) if name == "faces"
                                                               else int(sum(found)))
        row["wrong"] = missed
        result["sets"][name] = row
        print(f"{name}: {row}", flush=True)
    no_face = [r for k, r in result["sets"].items() if k != "faces"]
    result["headline"] = {"face_recall": result["sets"]["faces"]["recall"],
                          "no_face_images": sum(r["images"] for r in no_face),
                          "false_faces": sum(r["false_faces"] for r in no_face)}
    common.save("faces-quick" if quick else "faces", result, out)
    return result
