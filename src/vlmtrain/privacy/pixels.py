"""What the pixels show: faces (biometric identifiers) and burned-in text, found in the image the gate would
write to a shard (an 8-bit RGB PNG), so that what is checked is exactly what is kept.

    faces = find_faces(rgb)              # [(x, y, w, h)] boxes, [n, 4]
    words = read_text(rgb)               # [OcrWord(text, box, line)] from Tesseract
    rgb2 = blackout(rgb, boxes)          # the same image with the boxes filled black

Faces: OpenCV's Haar cascades that ship inside `opencv-python-headless` (no download): the frontal-face
`alt2` and `default` cascades propose boxes (recall-first), and a box is a face when the eye cascade finds an eye
in it or both face cascades found it (`find_faces` says why: Haar boxes alone fire on radiograph texture). Images are scaled so the long side is at most
`FACE_MAX_SIDE` pixels first (cost), which keeps faces down to about 4% of the long side.

Text: Debian's `tesseract-ocr` through `pytesseract`, run on two views of the image (`ocr_views`): the grey image,
denoised first when it is noisy, turned dark-on-light (radiology overlays are usually light on a dark image;
Tesseract reads dark on light best) and upscaled up to `OCR_MAX_UPSCALE` times so small overlay text nears the
height Tesseract expects; and its white top-hat binarised with Otsu's threshold. `ocr_available()` says whether
the binary is there; the gate refuses every record when it is not (it never passes pixels it could not read).
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass

import numpy as np

FACE_MAX_SIDE = 800
OCR_MIN_CONFIDENCE = 30  # Tesseract word confidence (0-100); lower words are noise on textured images
OCR_TARGET_SIDE = 1200   # images are upscaled (never downscaled) towards this long side ...
OCR_DESCRIPTION = ("tesseract psm 11 on two views: the grey image (non-local-means denoised when noisy), "
                   "dark-on-light, upscaled towards 1200 px; and its white top-hat binarised with Otsu")
OCR_DENOISE_ABOVE = 4.0  # estimated noise sigma (0-255) above which the image is denoised first
OCR_TOPHAT = 25          # top-hat kernel side, in input pixels: wider than a stroke of 40 px text
OCR_MAX_UPSCALE = 3.0    # ... by at most this factor (a 64 x 64 MR holds no readable text worth 20x the cost)


@dataclass(frozen=True)
class OcrWord:
    text: str
    box: tuple[int, int, int, int]  # x, y, w, h in the input image's pixels
    line: tuple[int, int, int, int]  # (pass, block, paragraph, line): words of one line share it


def gray(rgb: np.ndarray) -> np.ndarray:
    """[h, w, 3] uint8 RGB → [h, w] uint8 luminance."""
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


_local = threading.local()


_FACE_CASCADES = ("haarcascade_frontalface_alt2.xml", "haarcascade_frontalface_default.xml")
_EYE_CASCADE = "haarcascade_eye.xml"
FACE_DETECTOR = ("OpenCV Haar cascades frontalface_alt2 + frontalface_default, a box confirmed by an eye inside "
                 "it (haarcascade_eye) or by both cascades (IoU >= 0.5)")
FACE_AGREE_IOU = 0.5


def _cascades():
    """This thread's (face cascades, eye cascade): a CascadeClassifier is not safe to share between threads (the
    gate's workers are threads), and loading one costs ~50 ms, so each worker thread keeps its own."""
    import cv2

    if getattr(_local, "cascades", None) is not None:
        return _local.cascades
    cv2.setNumThreads(1)  # the gate's workers are the parallelism
    out = []
    for name in (*_FACE_CASCADES, _EYE_CASCADE):
        c = cv2.CascadeClassifier(cv2.data.haarcascades + name)
        if c.empty():
            raise RuntimeError(f"OpenCV cascade {name} did not load from {cv2.data.haarcascades}")
        out.append(c)
    _local.cascades = (tuple(out[:-1]), out[-1])
    return _local.cascades


def _iou(a, b) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / max(a[2] * a[3] + b[2] * b[3] - inter, 1)


def _has_eye(g: np.ndarray, box, eye) -> bool:
    """An eye (Haar eye cascade) in the upper 5/8 of a face box ([h, w] grey `g`), sized 1/10 to 1/2 of it."""
    x, y, w, h = box
    roi = g[y:y + h * 5 // 8, x:x + w]
    lo, hi = max(4, w // 10), max(5, w // 2)
    return len(eye.detectMultiScale(roi, scaleFactor=1.1, minNeighbors=3, minSize=(lo, lo), maxSize=(hi, hi))) > 0


def find_faces(rgb: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Face boxes (x, y, w, h) in `rgb` ([h, w, 3] uint8) pixels; empty when none.

    Candidates come from two frontal-face Haar cascades (recall-first); a candidate counts only when an eye is
    found inside it or the other cascade found the same box. Haar boxes alone fire on the texture of radiographs,
    cell images and noisy grey pictures (a CR radiograph read as 3 faces); there only one cascade fires and no eye
    is found. Grey level alone cannot decide it: a grey portrait (LFW's faces are grey) is still a face."""
    import cv2

    g = gray(rgb)
    scale = min(1.0, FACE_MAX_SIDE / max(g.shape))
    if scale < 1.0:
        g = cv2.resize(g, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    g = cv2.equalizeHist(g)
    faces, eye = _cascades()
    found = [[tuple(int(v) for v in b) for b in c.detectMultiScale(g, scaleFactor=1.1, minNeighbors=5,
                                                                    minSize=(24, 24))] for c in faces]
    boxes = []
    for i, cands in enumerate(found):
        others = [b for j, bs in enumerate(found) if j != i for b in bs]
        for b in cands:
            if any(_iou(b, o) >= FACE_AGREE_IOU for o in others) or _has_eye(g, b, eye):
                boxes.append(tuple(int(round(v / scale)) for v in b))
    return boxes


def face_check(rgb: np.ndarray) -> list[tuple[int, int, int, int]]:
    """What the gate calls: the confirmed face boxes (`find_faces`)."""
    return find_faces(rgb)


_warm_lock = threading.Lock()


def warm_up(faces: bool, ocr: bool) -> None:
    """Import every native library the checks use, once, in the calling (main) thread, before worker threads
    start. Two threads importing cv2 at the same moment can each see a half-initialised module (`module 'cv2'
    has no attribute 'data'`, seen in 1 of 3 cold runs with 2 workers); Python's import lock does not cover cv2's
    own bootstrap, which re-imports itself. Loading this thread's face model also checks that its file loads."""
    with _warm_lock:
        import cv2

        _ = cv2.data.haarcascades, cv2.CascadeClassifier, cv2.cvtColor
        if faces:
            _cascades()
        if ocr and ocr_available():
            import pytesseract

            pytesseract.get_tesseract_version()


def ocr_available() -> bool:
    try:
        import pytesseract  # noqa: F401
    except ImportError:
        return False
    return shutil.which("tesseract") is not None


def tesseract_version() -> str | None:
    if not ocr_available():
        return None
    import pytesseract

    return str(pytesseract.get_tesseract_version())


def noise_sigma(g: np.ndarray) -> float:
    """Gaussian noise level of a grey image ([h, w] uint8, 0-255 scale), J. Immerkaer's fast estimate (1996): the
    mean absolute response to a Laplacian-difference mask. Hand-written: three lines, and scikit-image's wavelet
    estimator needs PyWavelets."""
    import cv2

    mask = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    r = cv2.filter2D(g.astype(np.float32), -1, mask)[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2) * np.abs(r).mean() / 6)


def ocr_views(rgb: np.ndarray) -> tuple[float, list[np.ndarray]]:
    """(upscale factor, [views]) Tesseract reads, each [H, W] uint8 dark text on a light ground:

    0. the grey image, denoised with OpenCV's non-local means when it is noisy (fluoroscopy, ultrasound and
       low-dose images: Tesseract reads nothing through sigma ~25 noise), turned dark-on-light and upscaled;
    1. the same denoised image's white top-hat (bright strokes smaller than the kernel, the smooth anatomy under
       them removed), binarised with Otsu's threshold: light-grey overlay text on a bright body reads here."""
    import cv2

    g = gray(rgb)
    light_text = np.median(g) < 128  # mostly dark: overlay text is light on it
    sigma = noise_sigma(g)
    if sigma > OCR_DENOISE_ABOVE:
        g = cv2.fastNlMeansDenoising(g, None, h=float(np.clip(1.2 * sigma, 10, 45)), templateWindowSize=7,
                                     searchWindowSize=21)
    scale = min(OCR_MAX_UPSCALE, max(1.0, OCR_TARGET_SIDE / max(g.shape)))
    if scale > 1.0:
        g = cv2.resize(g, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    bright = g if light_text else 255 - g
    k = cv2.getStructuringElement(cv2.MORPH_RECT, (int(OCR_TOPHAT * scale),) * 2)
    _, binary = cv2.threshold(cv2.morphologyEx(bright, cv2.MORPH_TOPHAT, k), 0, 255,
                              cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return scale, [255 - bright, 255 - binary]


def read_text(rgb: np.ndarray) -> list[OcrWord]:
    """Words Tesseract reads in any of `ocr_views(rgb)` (`rgb`: [h, w, 3] uint8); boxes in `rgb`'s pixels."""
    import pytesseract

    scale, views = ocr_views(rgb)
    words: list[OcrWord] = []
    for n, img in enumerate(views):
        # psm 11: sparse text, no page layout — overlays are scattered labels, not paragraphs
        d = pytesseract.image_to_data(img, config="--psm 11", output_type=pytesseract.Output.DICT)
        for i, t in enumerate(d["text"]):
            t = t.strip()
            if not t or float(d["conf"][i]) < OCR_MIN_CONFIDENCE:
                continue
            box = tuple(int(round(d[k][i] / scale)) for k in ("left", "top", "width", "height"))
            words.append(OcrWord(t, box, (n, d["block_num"][i], d["par_num"][i], d["line_num"][i])))
    return words


def lines(words: list[OcrWord]) -> list[tuple[str, list[tuple[int, int, OcrWord]]]]:
    """Words grouped into text lines: (line text, [(start, end, word)]) with character offsets into the text."""
    by_line: dict = {}
    for w in words:
        by_line.setdefault(w.line, []).append(w)
    out = []
    for ws in by_line.values():
        ws.sort(key=lambda w: w.box[0])
        text, spans = "", []
        for w in ws:
            if text:
                text += " "
            spans.append((len(text), len(text) + len(w.text), w))
            text += w.text
        out.append((text, spans))
    return out


def blackout(rgb: np.ndarray, boxes: list[tuple[int, int, int, int]], pad: int = 2) -> np.ndarray:
    """A copy of `rgb` ([h, w, 3] uint8) with each (x, y, w, h) box, grown by `pad` pixels, filled black."""
    out = rgb.copy()
    h, w = out.shape[:2]
    for x, y, bw, bh in boxes:
        out[max(0, y - pad):min(h, y + bh + pad), max(0, x - pad):min(w, x + bw + pad)] = 0
    return out

