"""The gate's policy: which records may become training data at all (`configs/privacy/default-policy.yaml`).

A policy is YAML validated by pydantic; every bad field gets one `field: message` line (ConfigError, exit 2)
before any record is read. Its hash — sha256 of the canonical JSON of the *validated* policy, defaults filled
in — goes into `privacy_report.json`, so two YAML files that mean the same thing hash the same, and any change
to what is accepted changes the hash.

Codes (modalities, body parts, consent and locality values) are compared after `strip()` and upper-casing
(DICOM CS values are upper case; consent and locality strings are normalised the same way so that `Research`
and `research` are one value).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vlmtrain.config.load import load_yaml_with_overrides, validate


def norm(value: str) -> str:
    """The form codes are compared in: stripped, upper case."""
    return value.strip().upper()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _codes(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    out = [norm(v) for v in values]
    if any(not v for v in out):
        raise ValueError("empty string in list")
    return sorted(set(out))


class BiometricPolicy(_Strict):
    """Biometric identifiers (HIPAA Safe Harbor: full-face photographs, finger/retinal prints) are refused, not
    cleaned: no header or text scrubbing removes a face."""

    modalities: list[str] = Field(default_factory=list,
                                  description="modalities always treated as biometric")
    photo_modalities: list[str] = Field(default_factory=lambda: ["XC", "OT", "GM"],
                                        description="photographic modalities that can show a face")
    face_body_parts: list[str] = Field(default_factory=lambda: ["HEAD", "FACE"],
                                       description="a photograph of one of these body parts is biometric")
    unknown_body_part_is_face: bool = Field(True, description="a photograph with no body part is assumed to "
                                                              "show a face (it cannot be ruled out)")

    @field_validator("modalities", "photo_modalities", "face_body_parts")
    @classmethod
    def _normalise(cls, v):
        return _codes(v)


class BurnedInPolicy(_Strict):
    """Pixel data with text burned into it (names, dates on ultrasound or screen captures) cannot be cleaned
    by header de-identification, so it is refused."""

    modalities: list[str] = Field(default_factory=lambda: ["US", "ES"],
                                  description="modalities that usually carry burned-in annotations")
    secondary_capture: bool = Field(True, description="treat Secondary Capture SOP classes (screen grabs) as "
                                                      "burned-in")
    accept_cleaned: bool = Field(False, description="accept an image of the modalities above (or a secondary "
                                                    "capture) when it states it is clean: DICOM "
                                                    "BurnedInAnnotation = NO, or `burned_in: false` in the record "
                                                    "for PNG/JPEG — a copy cleaned by a pixel scrubber")

    @field_validator("modalities")
    @classmethod
    def _normalise(cls, v):
        return _codes(v)


class PhiPolicy(_Strict):
    reject_unparsed_labels: bool = Field(True, description="reject a report where a PHI label (Name:, DOB:, "
                                                           "MRN:, Phone:, Address: ...) is followed by a value "
                                                           "the detectors did not recognise")
    keep_zip3: bool = Field(False, description="replace a ZIP code that stands alone by its first three digits "
                                               "(`021**`) where Safe Harbor allows it (the 3-digit area holds "
                                               "more than 20,000 people); false: every ZIP code is removed")


class Policy(_Strict):
    accepted_consent: list[str] = Field(..., min_length=1,
                                        description="consent values that allow training (others are rejected)")
    accepted_locality: list[str] | None = Field(None, description="if set, records must carry `locality` with "
                                                                  "one of these values (e.g. local, federated)")
    modalities: list[str] | None = Field(None, description="allowed modalities (None: any)")
    body_parts: list[str] | None = Field(None, description="allowed body parts (None: any; a record without "
                                                           "a body part then passes only when this is None)")
    image_types: list[Literal["dicom", "png", "jpeg"]] = Field(default_factory=lambda: ["dicom", "png", "jpeg"],
                                                               min_length=1)
    biometric: BiometricPolicy = Field(default_factory=BiometricPolicy)
    burned_in: BurnedInPolicy = Field(default_factory=BurnedInPolicy)
    phi: PhiPolicy = Field(default_factory=PhiPolicy)
    # what the gate looks for in the pixels themselves (vlmtrain.privacy.pixels), whatever the metadata says
    reject_faces: bool = Field(True, description="run a face detector on every PNG/JPEG and every DICOM of "
                                                 "face_scan_modalities or a secondary capture; a face → "
                                                 "biometric_face")
    face_scan_modalities: list[str] = Field(default_factory=lambda: ["DOC", "ES", "GM", "OP", "OT", "SM", "XC"],
                                            description="DICOM photograph modalities scanned for faces "
                                                        "(radiographs are not: a chest film can read as a face)")
    ocr_burned_in: bool = Field(True, description="OCR every image; text the PHI detector flags → burned_in_phi "
                                                  "(with Tesseract missing, records are refused as "
                                                  "ocr_unavailable)")
    redact_burned_in: bool = Field(False, description="instead of refusing, black out the words that hold PHI, "
                                                      "OCR the result again and keep it only if nothing is found")
    secret_env: str = Field("VLMTRAIN_PRIVACY_SECRET", min_length=1,
                            description="environment variable holding the secret that keys patient-group "
                                        "hashes; unset: a random secret for this run only")
    prompt: str = Field("Describe the findings.", min_length=1,
                        description="the user turn that precedes each cleaned report")

    @field_validator("accepted_consent", "accepted_locality", "modalities", "body_parts", "face_scan_modalities")
    @classmethod
    def _normalise(cls, v):
        return _codes(v)

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def hash(self) -> str:
        return "sha256:" + hashlib.sha256(self.canonical_json().encode()).hexdigest()


def load_policy(path: str | Path, overrides: list[str] | None = None) -> Policy:
    """Read and validate a policy YAML; ConfigError names the file and every bad field."""
    data = load_yaml_with_overrides(path, overrides)
    return validate(Policy, data, source=str(path))
