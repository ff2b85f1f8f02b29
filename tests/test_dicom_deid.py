"""The gate's contract on the offline DICOM samples, run the way users run it (`vlmtrain prep medical` as a
subprocess): no PS3.15 basic-profile identifying attribute keeps its original value, UIDs are remapped to valid
UIDs, burned-in and no-consent records are rejected, counts add up, and nothing planted leaks into shards or
rejects.jsonl."""

import io
import json
import subprocess

import pytest

from conftest import VLMTRAIN
from vlmtrain.privacy import medical_samples as ms

pydicom = pytest.importorskip("pydicom")

# Attributes the sample maker fills with synthetic PHI; each must lose its original value.
IDENTIFYING = ["PatientName", "PatientID", "PatientBirthDate", "PatientAddress", "PatientTelephoneNumbers",
               "OtherPatientIDs", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
               "OperatorsName", "AccessionNumber", "StudyDescription", "StudyDate", "SeriesDate",
               "AcquisitionDate", "ContentDate", "StudyTime", "IssuerOfPatientID"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("medical")
    src = ms.make_medical_samples(root / "src")
    out = root / "shards"
    r = subprocess.run([*VLMTRAIN, "prep", "medical", "--src", str(src), "--policy", str(src / "policy.yaml"),
                        "--out", str(out), "--progress-every", "5"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    from vlmtrain.data.shards import iter_shard

    samples = {}
    for tar in sorted(out.glob("shard-*.tar")):
        for raw in iter_shard(str(tar)):
            assert "__error__" not in raw
            rec = json.loads(raw["json"])
            samples[rec["id"]] = raw
    return {"src": src, "out": out, "proc": r, "samples": samples,
            "manifest": json.loads((out / "manifest.json").read_text()),
            "report": json.loads((out / "privacy_report.json").read_text()),
            "rejects": [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]}


def _source(run, rid):
    return pydicom.dcmread(run["src"] / "images" / f"{rid}.dcm")


def _header(raw):
    d = json.loads(raw["dcm.json"])
    meta = d.pop("file_meta", {})
    return pydicom.Dataset.from_json(d), pydicom.Dataset.from_json(meta)


def _dicom_ids(run):
    return [s.id for s in ms.SAMPLES if s.expect == "kept" and s.source.startswith("dicom:")]


def test_counts_add_up_and_match_the_sample_set(run):
    man, rep = run["manifest"], run["report"]
    expected = ms.expected_counts()
    kept = expected.pop("kept")
    n_lines = len((run["src"] / "records.jsonl").read_text().splitlines())
    assert man["input_records"] == rep["input_records"] == n_lines
    assert man["samples"] == rep["kept"] == len(run["samples"]) == kept
    assert man["rejected"] == rep["rejected"] == len(run["rejects"]) == sum(expected.values())
    assert rep["kept"] + rep["rejected"] == rep["input_records"]
    assert rep["rejected_by_reason"] == man["rejected_by_reason"] == expected
    assert rep["policy_hash"].startswith("sha256:") and len(rep["policy_hash"]) == 7 + 64
    assert {"dicom-anonymizer", "pydicom", "scrubadub"} <= set(rep["libraries"])
    assert sum(rep["kept_by_image_type"].values()) == kept


def test_each_record_gets_the_expected_decision(run):
    decided = {r["id"]: r["reason"] for r in run["rejects"] if r["reason"] != "duplicate_id"}
    for s in ms.SAMPLES:
        if s.expect == "kept":
            assert s.id in run["samples"] and s.id not in decided, s.id
        else:
            assert decided.get(s.id) == s.expect and s.id not in run["samples"], s.id
    # the specific guarantees the issue names
    assert decided["us-01"] == decided["ct-chest-02"] == "burned_in_annotation"
    assert decided["mr-head-03"] == decided["ct-chest-03"] == "no_consent"
    assert decided["face-01"] == "biometric"


def test_progress_and_summary_lines(run):
    r = run["proc"]
    assert r.stdout.startswith("prep medical: kept 10 of 26 records, rejected 16 (")
    assert any(x.startswith("prep: ") and "rec/s" in x for x in r.stderr.splitlines())


def test_no_identifying_attribute_keeps_its_original_value(run):
    for rid in _dicom_ids(run):
        before = _source(run, rid)
        after, meta = _header(run["samples"][rid])
        assert after.PatientIdentityRemoved == "YES"
        assert after.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        for kw in IDENTIFYING:
            orig = before.get(kw)
            assert orig not in (None, ""), (rid, kw)  # planted, so the check below means something
            new = after.get(kw)
            assert new is None or str(new) != str(orig), (rid, kw, str(new))
        assert after.get("PatientBirthDate") in (None, "", "00010101")
        assert not [e for e in after.iterall() if e.tag.is_private], rid
        # Overlay Data and Overlay Comments are X in the profile (an overlay can hold burned-in text)
        assert not [e for e in after if e.tag.group & 0xFF00 == 0x6000 and e.tag.element in (0x3000, 0x4000)]
    overlays = [e for e in _source(run, "mr-abdomen-01") if e.tag.group & 0xFF00 == 0x6000 and e.tag.element == 0x3000]
    assert overlays  # the sample really had overlay data to remove


def _uids(ds):
    from pydicom.uid import UID_dictionary

    out = {}
    for el in ds.iterall():
        if el.VR == "UI" and el.value:
            for v in (el.value if isinstance(el.value, (list, pydicom.multival.MultiValue)) else [el.value]):
                if str(v) not in UID_dictionary:
                    out.setdefault(el.keyword or str(el.tag), set()).add(str(v))
    return out


def test_uids_are_remapped_to_valid_uids_consistently(run):
    from pydicom.uid import UID

    software = {"ImplementationClassUID", "CreatorVersionUID"}  # name software, not a patient or instance
    for rid in _dicom_ids(run):
        before = _source(run, rid)
        after, meta = _header(run["samples"][rid])
        old = {k: v for k, v in {**_uids(before), **_uids(before.file_meta)}.items() if k not in software}
        new = {k: v for k, v in {**_uids(after), **_uids(meta)}.items() if k not in software}
        assert {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"} <= set(old), rid
        all_old = set().union(*old.values())
        all_new = set().union(*new.values())
        assert not all_old & all_new, rid
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "MediaStorageSOPInstanceUID"):
            assert kw in new, (rid, kw)  # U in the profile: replaced, never dropped
        for kw in new:  # others may be removed with their sequence (X); what is left is a valid UID
            assert all(UID(u).is_valid for u in new[kw]), (rid, kw)
        # the file meta's instance UID follows the dataset's (same mapping)
        assert meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID


def test_images_are_rendered_and_trainable(run):
    from PIL import Image

    from vlmtrain.data.loader import parse_sample

    for rid, raw in run["samples"].items():
        rec, images = parse_sample(raw)  # what training reads: the dcm.json member does not disturb it
        assert rec["kind"] == "chat" and len(images) == 1 and images[0].mode == "RGB"
        assert set(raw) >= {"json", "img0.png"}
        assert ("dcm.json" in raw) == (rec["meta"]["image_type"] == "dicom")
        if rec["meta"]["image_type"] == "dicom":
            before = _source(run, rid)
            assert Image.open(io.BytesIO(raw["img0.png"])).size == (before.Columns, before.Rows)


def _planted():
    """Every planted identifying string, in the forms the reports and headers use."""
    out = {ms.HOSPITAL, ms.HOSPITAL_ADDRESS, "Lindqvist"}
    for p in ms.PATIENTS.values():
        out |= {p.given, p.family, p.mrn, p.mrn[::-1], p.phone, p.email, p.address.split(",")[0],
                p.birth.strftime("%Y%m%d"), f"{p.birth.month:02d}/{p.birth.day:02d}/{p.birth.year}",
                p.referrer[1]}
    return out


def test_nothing_planted_reaches_shards(run):
    planted = _planted()
    for rid, raw in run["samples"].items():
        texts = [raw["json"].decode(), raw.get("dcm.json", b"").decode()]
        for t in texts:
            leaks = [p for p in planted if p.lower() in t.lower()]
            assert not leaks, (rid, leaks)
        rec = json.loads(raw["json"])
        report = rec["messages"][1]["content"][0]["text"]
        assert report.count("[") >= 3  # tags where the PHI was
        assert "images/" not in raw["json"].decode()  # no source path (file names can carry names)


def test_clinical_findings_survive_cleaning(run):
    for s in ms.SAMPLES:
        if s.expect != "kept":
            continue
        rec = json.loads(run["samples"][s.id]["json"])
        report = rec["messages"][1]["content"][0]["text"]
        findings, impression = ms.FINDINGS[(rec["meta"]["modality"], rec["meta"]["body_part"])]
        assert findings in report and impression in report, s.id


def test_rejects_never_hold_report_text_or_names(run):
    text = (run["out"] / "rejects.jsonl").read_text()
    planted = _planted()
    assert not [p for p in planted if p.lower() in text.lower()]
    for f in ms.FINDINGS.values():
        assert f[0] not in text and f[1] not in text
    assert "fourth of November" not in text
    for r in run["rejects"]:
        assert set(r) <= {"id", "reason", "detail", "line"}


def test_patient_groups_link_one_patients_studies_only(run):
    by_patient = {}
    for s in ms.SAMPLES:
        if s.expect == "kept":
            g = json.loads(run["samples"][s.id]["json"])["meta"]["patient_group"]
            by_patient.setdefault(s.patient, set()).add(g)
    assert all(len(g) == 1 for g in by_patient.values())  # A's CT chest and CT head share a group
    groups = [next(iter(g)) for g in by_patient.values()]
    assert len(set(groups)) == len(groups)
    assert not any(p.mrn in g for p in ms.PATIENTS.values() for g in groups)
