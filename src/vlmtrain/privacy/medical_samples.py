"""An offline medical sample set in the `vlmtrain prep medical --src` layout, made by the code, so the gate (and
later DP training, `configs/recipes/medical-dp.yaml`) has real images to work on without any download.

    make_medical_samples(DIR)          # DIR/records.jsonl, DIR/images/*, DIR/policy.yaml
    prepare_medical_builtin(ROOT)      # the above in ROOT/medical-samples-src, gated into ROOT/medical-samples

Images come from packages:

- DICOM radiographs (CR), CT, MR, ultrasound (US), a segmentation (SEG) and a face photograph (OT) from
  pydicom's own test files and the `pydicom-data` package (read with `get_testdata_file(download=False)`: never
  fetched);
- a fundus photograph (`retina.jpg`), a retinal crop (`microaneurysms.png`), an immunohistochemistry slide
  (`ihc.png`) and two ordinary photographs (`astronaut.png`: a face; `camera.png`) bundled with scikit-image.

Every DICOM header is given a synthetic patient (name, MRN, birth date, address, phone, institution,
referring physician, accession number, study dates), and every report is synthetic text that plants the same
PHI in different styles next to clinical findings that must survive cleaning. Consent, locality, modality and
burned-in flags are mixed so that every gate reason has a case. `SAMPLES[i].expect` says what the gate should
decide for each record (a reason or "kept"); `tests/test_privacy_gate.py` checks it. All people are invented.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from datetime import date
from importlib import resources
from pathlib import Path

from vlmtrain.errors import VlmtrainError

HOSPITAL = "Saint Brigid General Hospital"
HOSPITAL_ADDRESS = "400 Cambridge Street, Boston, MA 02114"

# The policy the sample set is gated with (also written to DIR/policy.yaml).
SAMPLE_POLICY = {
    "accepted_consent": ["research", "broad-research"],
    "accepted_locality": ["local", "federated"],
    "modalities": ["CR", "DX", "CT", "MR", "OP", "SM"],
    "body_parts": ["CHEST", "HEAD", "ABDOMEN", "EXTREMITY", "EYE", "COLON"],
}


@dataclass(frozen=True)
class Patient:
    given: str
    family: str
    sex: str
    birth: date
    mrn: str
    phone: str
    email: str
    address: str
    referrer: tuple[str, str]  # (given, family)


PATIENTS = {
    "A": Patient("Eleanor", "Whitaker", "F", date(1931, 11, 4), "48213907", "617-555-0142",
                 "eleanor.whitaker@example.org", "14 Juniper Lane, Salem, MA 01970", ("Daniel", "Okafor")),
    "B": Patient("Marcus", "Delgado", "M", date(1967, 2, 15), "55102938", "(508) 555-0187",
                 "mdelgado@example.net", "220 Harbor View Road, Quincy, MA 02169", ("Siobhan", "Brennan")),
    "C": Patient("Priya", "Raman", "F", date(1985, 9, 22), "70311846", "781-555-0123",
                 "priya.raman@example.com", "9 Elm Street, Apt 3, Medford, MA 02155", ("Daniel", "Okafor")),
    "D": Patient("Harold", "Fitzgerald", "M", date(1928, 6, 30), "31987264", "617-555-0199",
                 "h.fitzgerald@example.org", "71 Beacon Street, Boston, MA 02108", ("Amara", "Nwosu")),
    "E": Patient("Sofia", "Marchetti", "F", date(1959, 4, 8), "66240175", "978-555-0110",
                 "sofia.marchetti@example.com", "5 Orchard Road, Lowell, MA 01852", ("Siobhan", "Brennan")),
}

FINDINGS = {
    ("CT", "CHEST"): ("A 5 mm nodule in the left lower lobe is unchanged. No pleural effusion. No acute fracture.",
                      "Stable 5 mm pulmonary nodule."),
    ("MR", "HEAD"): ("T2-weighted and FLAIR images show no acute infarct. The ventricles are normal in size.",
                     "No acute intracranial abnormality."),
    ("CR", "CHEST"): ("The lungs are clear. Heart size is normal. No pneumothorax.",
                      "No acute cardiopulmonary process."),
    ("CR", "EXTREMITY"): ("No acute fracture or dislocation. Mild degenerative change at the first "
                          "metatarsophalangeal joint.", "No acute osseous abnormality."),
    ("CT", "HEAD"): ("No intracranial hemorrhage. Gray-white differentiation is preserved.",
                     "No acute intracranial process."),
    ("MR", "ABDOMEN"): ("The liver is normal in size with a 12 mm simple cyst in segment 4.",
                        "Benign hepatic cyst."),
    ("OP", "EYE"): ("Fundus photograph: cup-to-disc ratio 0.4 with scattered microaneurysms.",
                    "Mild nonproliferative diabetic retinopathy."),
    ("SM", "COLON"): ("Immunohistochemistry shows strong cytoplasmic staining in the colonic glands, grade 2/3.",
                      "Staining pattern consistent with the control."),
}


@dataclass(frozen=True)
class Spec:
    """One record of the sample set. `source` is `dicom:NAME` (a pydicom/pydicom-data test file),
    `skimage:NAME` (a scikit-image bundled image), or `none` (the record names a file that is not there)."""

    id: str
    source: str
    expect: str  # "kept" or the gate's reason
    patient: str = "A"
    consent: str | None = "research"
    locality: str | None = "local"
    modality: str | None = None  # DICOM: written into the header; PNG/JPEG: the record's `modality`
    body_part: str | None = None
    study: date = date(2024, 3, 14)
    style: int = 0  # which report template plants the PHI
    burned_in: str | None = None  # DICOM BurnedInAnnotation to write
    extra: dict = field(default_factory=dict)  # more record fields (biometric, report override, ...)


SAMPLES: tuple[Spec, ...] = (
    # ---- kept ----
    Spec("ct-chest-01", "dicom:CT_small.dcm", "kept", "A", body_part="CHEST", style=0),
    Spec("mr-head-01", "dicom:MR_small.dcm", "kept", "B", body_part="HEAD", style=1, locality="federated"),
    Spec("cr-chest-01", "dicom:RG1_UNCR.dcm", "kept", "C", style=2, consent="Broad-Research"),
    Spec("cr-extremity-01", "dicom:RG3_UNCR.dcm", "kept", "B", style=0, study=date(2023, 11, 2)),
    Spec("ct-head-01", "dicom:693_UNCR.dcm", "kept", "A", body_part="HEAD", style=1, study=date(2024, 5, 2)),
    Spec("mr-abdomen-01", "dicom:MR-SIEMENS-DICOM-WithOverlays.dcm", "kept", "E", style=2),
    Spec("mr-head-02", "dicom:emri_small.dcm", "kept", "D", style=0, burned_in="NO"),
    Spec("fundus-01", "skimage:retina.jpg", "kept", "C", modality="OP", body_part="EYE", style=3),
    Spec("fundus-02", "skimage:microaneurysms.png", "kept", "D", modality="OP", body_part="EYE", style=3),
    Spec("ihc-01", "skimage:ihc.png", "kept", "E", modality="SM", body_part="COLON", style=3),
    # ---- rejected by the gate ----
    Spec("us-01", "dicom:US1_UNCR.dcm", "burned_in_annotation", "E", style=0),
    Spec("ct-chest-02", "dicom:CT_small.dcm", "burned_in_annotation", "B", body_part="CHEST", burned_in="YES"),
    Spec("face-01", "dicom:OT-PAL-8-face.dcm", "biometric", "D", style=1),
    Spec("photo-01", "skimage:astronaut.png", "biometric", "E", modality="XC", body_part="FACE", style=3),
    Spec("photo-02", "skimage:camera.png", "biometric", "B", modality="XC", body_part="EXTREMITY", style=3,
         extra={"biometric": True}),
    Spec("mr-head-03", "dicom:MR_small.dcm", "no_consent", "C", body_part="HEAD", consent="withdrawn"),
    Spec("ct-chest-03", "dicom:CT_small.dcm", "no_consent", "D", body_part="CHEST", consent=None),
    Spec("ct-chest-04", "dicom:CT_small.dcm", "not_local", "E", body_part="CHEST", locality="shared"),
    Spec("seg-01", "dicom:liver.dcm", "modality_not_allowed", "A", body_part="ABDOMEN"),
    Spec("mr-pelvis-01", "dicom:MR2_UNCR.dcm", "body_part_not_allowed", "C", body_part="PELVIS"),
    Spec("mr-head-04", "dicom:MR_truncated.dcm", "undecodable_image", "B", body_part="HEAD"),
    Spec("ct-head-02", "dicom:693_UNCR.dcm", "phi_uncleanable", "D", body_part="HEAD",
         extra={"report": "DOB: the fourth of November, nineteen twenty-eight. No intracranial hemorrhage."}),
    Spec("cr-chest-02", "none", "missing_image", "A"),
    Spec("ct-chest-05", "dicom:CT_small.dcm", "missing_field", "C", body_part="CHEST", extra={"report": None}),
)
# Lines that are not records of their own: a broken line and a repeated id (the writer rejects the repeat).
BAD_LINE = '{"id": "broken-01", "image": '
DUPLICATE_OF = "ct-chest-01"
EXPECTED_EXTRA = {"bad_json": 1, "duplicate_id": 1}


def expected_counts() -> dict[str, int]:
    """What the gate should report for the sample set: kept, and rejects per reason."""
    out: dict[str, int] = {}
    for s in SAMPLES:
        out[s.expect] = out.get(s.expect, 0) + 1
    for k, v in EXPECTED_EXTRA.items():
        out[k] = out.get(k, 0) + v
    return out


def _age(p: Patient, on: date) -> int:
    return on.year - p.birth.year - ((on.month, on.day) < (p.birth.month, p.birth.day))


def _report(spec: Spec, p: Patient, modality: str, body_part: str) -> str:
    """A synthetic report: the modality's findings with this patient's PHI planted in template `style`."""
    findings, impression = FINDINGS.get((modality, body_part), ("No acute abnormality.", "Normal study."))
    d = spec.study
    long_date = f"{d:%B} {d.day}, {d.year}"
    us_date = f"{d.month:02d}/{d.day:02d}/{d.year}"
    dob = f"{p.birth.month:02d}/{p.birth.day:02d}/{p.birth.year}"
    sex = {"F": "woman", "M": "man"}[p.sex]
    ref = f"{p.referrer[0]} {p.referrer[1]}"
    if spec.style == 0:
        return (f"{p.given} {p.family} (MRN {p.mrn}), DOB {dob}, a {_age(p, d)}-year-old {sex}, was seen on "
                f"{long_date} at {HOSPITAL}. Referring physician: Dr. {ref}.\nFindings: {findings}\n"
                f"Impression: {impression}\nQuestions: call {p.phone} or write to {p.email}.")
    if spec.style == 1:
        return (f"Patient: {p.family}, {p.given}. Acc# A{p.mrn[::-1]}. Exam {us_date}. Home address: "
                f"{p.address}.\n{findings} {impression}\nDictated by Dr. {p.referrer[1]} on {d.isoformat()}.")
    if spec.style == 2:
        return (f"{p.family.upper()}^{p.given.upper()} seen {d:%d %b %Y}; age {_age(p, d)}.\n{findings}\n"
                f"{impression} Results sent to {p.email}; patient phone {p.phone}.")
    return (f"{findings} {impression} Reviewed by Dr. {ref} on {long_date}. Patient {p.given} {p.family}, "
            f"MRN {p.mrn}.")


# ---- image sources ---------------------------------------------------------------------------------------

def _dicom_test_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        raise VlmtrainError(f"DICOM sample {name} is not installed: install vlmtrain[privacy] (pydicom-data)")
    return Path(path)


def _skimage_file(name: str) -> Path:
    try:
        path = resources.files("skimage.data") / name
    except ModuleNotFoundError:
        raise VlmtrainError("scikit-image is not installed: install vlmtrain[privacy]") from None
    if not path.is_file():
        raise VlmtrainError(f"scikit-image does not ship {name} in this version")
    return Path(str(path))


def _planted_dicom(spec: Spec, p: Patient, src: Path, dst: Path) -> tuple[str, str, bool]:
    """Copy a test DICOM with the synthetic patient written into its header; returns (modality, body part,
    whether the header was written: a file meant to be undecodable is copied byte for byte)."""
    import pydicom

    from vlmtrain.privacy.dicom import ensure_transfer_syntax

    ds = pydicom.dcmread(src, force=True)
    try:
        ds.PixelData  # noqa: B018 - a truncated file must stay truncated: copy its bytes unchanged
        truncated = False
    except Exception:
        truncated = True
    if truncated or spec.expect == "undecodable_image":
        shutil.copyfile(src, dst)
        return str(ds.get("Modality", "")), str(ds.get("BodyPartExamined", "")), False
    ensure_transfer_syntax(ds)
    d = spec.study.strftime("%Y%m%d")
    ds.PatientName = f"{p.family}^{p.given}"
    ds.PatientID = p.mrn
    ds.IssuerOfPatientID = "SBGH"
    ds.PatientBirthDate = p.birth.strftime("%Y%m%d")
    ds.PatientSex = p.sex
    ds.PatientAddress = p.address
    ds.PatientTelephoneNumbers = p.phone
    ds.OtherPatientIDs = f"X{p.mrn}"
    ds.InstitutionName = HOSPITAL
    ds.InstitutionAddress = HOSPITAL_ADDRESS
    ds.ReferringPhysicianName = f"{p.referrer[1]}^{p.referrer[0]}"
    ds.OperatorsName = "Lindqvist^Maja"
    ds.AccessionNumber = f"A{p.mrn[::-1]}"
    for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        setattr(ds, kw, d)
    ds.StudyTime = "101500"
    ds.StudyDescription = f"{p.family} follow-up"
    if spec.modality:
        ds.Modality = spec.modality
    if spec.body_part:
        ds.BodyPartExamined = spec.body_part
    if spec.burned_in:
        ds.BurnedInAnnotation = spec.burned_in
    ds.save_as(dst, enforce_file_format=True)
    return str(ds.get("Modality", "")), str(ds.get("BodyPartExamined", "")), True


def make_medical_samples(out: str | Path) -> Path:
    """Write the sample set (records.jsonl, images/, policy.yaml) into `out`, replacing an earlier one."""
    import yaml

    out = Path(out)
    images = out / "images"
    if images.exists():
        shutil.rmtree(images)
    images.mkdir(parents=True)
    lines = []
    for spec in SAMPLES:
        p = PATIENTS[spec.patient]
        kind, _, name = spec.source.partition(":")
        rec: dict = {"id": spec.id}
        if kind == "dicom":
            rel = f"images/{spec.id}.dcm"
            modality, body_part, planted = _planted_dicom(spec, p, _dicom_test_file(name), out / rel)
            if not planted and spec.body_part:  # the header could not be written: the record says it
                body_part = spec.body_part
                rec["body_part"] = body_part
        elif kind == "skimage":
            rel = f"images/{spec.id}{Path(name).suffix}"
            shutil.copyfile(_skimage_file(name), out / rel)
            modality, body_part = spec.modality or "", spec.body_part or ""
            rec.update({"modality": modality, "body_part": body_part})
        else:
            rel, modality, body_part = f"images/{spec.id}.dcm", "CR", "CHEST"
        rec.update({"image": rel, "report": _report(spec, p, modality.upper(), body_part.upper()),
                    "patient_id": p.mrn})
        if spec.consent is not None:
            rec["consent"] = spec.consent
        if spec.locality is not None:
            rec["locality"] = spec.locality
        for k, v in spec.extra.items():
            if v is None:
                rec.pop(k, None)
            else:
                rec[k] = v
        lines.append(json.dumps(rec, ensure_ascii=False))
        if spec.id == DUPLICATE_OF:
            lines.append(json.dumps(rec, ensure_ascii=False))
    lines.insert(3, BAD_LINE)
    (out / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "policy.yaml").write_text(
        "# The policy the vlmtrain medical sample set is gated with (see configs/privacy/default-policy.yaml)\n"
        + yaml.safe_dump(SAMPLE_POLICY, sort_keys=False), encoding="utf-8")
    return out


def prepare_medical_builtin(root: str | Path, name: str = "medical-samples") -> Path:
    """Make the sample set in `root/{name}-src` and gate it into shards in `root/{name}` (once: a finished
    earlier run is reused). Returns the shard folder."""
    from vlmtrain.privacy.gate import run_gate
    from vlmtrain.privacy.policy import Policy

    root = Path(root)
    out = root / name
    man = out / "manifest.json"
    if man.is_file() and json.loads(man.read_text()).get("samples"):
        return out
    from vlmtrain.privacy import pixels

    if not pixels.ocr_available():  # the gate would refuse every record (ocr_unavailable): say why up front
        raise VlmtrainError(f"{name}: the privacy gate OCRs every image and Tesseract is not installed "
                            "(Debian: apt-get install tesseract-ocr)")
    src = make_medical_samples(root / f"{name}-src")
    run_gate(src, Policy.model_validate(SAMPLE_POLICY), out, overwrite=True)
    return out
