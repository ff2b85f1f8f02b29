"""The privacy gate's rules one at a time, on small records made here: policy loading and hashing, consent and
locality, biometric and burned-in rules (with cleaned copies), metadata stripping of PNG/JPEG, ids that carry
PHI, the record's own names, UID consistency across files, patient groups, de-identification verification, the
output folder, and the builtin sample set. The whole sample set through the CLI: test_dicom_deid.py."""

import hashlib
import hmac
import io
import json
import shutil
import tarfile

import pytest

from vlmtrain.errors import ConfigError, VlmtrainError
from vlmtrain.privacy import dicom
from vlmtrain.privacy.gate import REASONS, GateReject, run_gate
from vlmtrain.privacy.policy import Policy, load_policy

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

from conftest import ROOT  # noqa: E402

BASE_POLICY = {"accepted_consent": ["research"]}


def _png(color=(200, 30, 30), size=(16, 16), **info) -> bytes:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for k, v in info.items():
        meta.add_text(k, v)
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def _jpeg_with_exif(artist: str) -> bytes:
    from PIL import Image

    im = Image.new("RGB", (16, 16), (10, 120, 10))
    exif = im.getexif()
    exif[0x013B] = artist  # Artist
    exif[0x9003] = "2023:03:14 10:15:00"  # DateTimeOriginal lives in the Exif IFD; Pillow keeps it in the base one
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def _dicom(dst, name="CT_small.dcm", **attrs):
    ds = pydicom.dcmread(get_testdata_file(name, download=False), force=True)
    dicom._ensure_transfer_syntax(ds)  # OT-PAL-8-face.dcm is an old file without file meta
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(dst, enforce_file_format=True)
    return ds


class Src:
    """A records.jsonl folder built record by record."""

    def __init__(self, root):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.lines = []

    def add(self, rid, image_bytes=None, ext="png", report="No acute fracture.", consent="research", **fields):
        rec = {"id": rid, "report": report, **fields}
        if consent is not None:
            rec["consent"] = consent
        if image_bytes is not None:
            name = f"img-{len(self.lines)}.{ext}"
            (self.root / name).write_bytes(image_bytes)
            rec["image"] = name
        self.lines.append(json.dumps(rec))
        return rec

    def add_dicom(self, rid, name="CT_small.dcm", attrs=None, **fields):
        fname = f"img-{len(self.lines)}.dcm"
        _dicom(self.root / fname, name, **(attrs or {}))
        rec = {"id": rid, "image": fname, "report": fields.pop("report", "No acute fracture."),
               "consent": fields.pop("consent", "research"), **fields}
        self.lines.append(json.dumps(rec))

    def run(self, out, policy=None, **kw):
        (self.root / "records.jsonl").write_text("\n".join(self.lines) + "\n")
        pol = Policy.model_validate(policy or BASE_POLICY)
        man, rep = run_gate(self.root, pol, out, **kw)
        rejects = {r["id"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
        kept = {}
        for tar in sorted(out.glob("shard-*.tar")):
            with tarfile.open(tar) as tf:
                for m in tf.getmembers():
                    key, _, ext = m.name.partition(".")
                    kept.setdefault(key, {})[ext] = tf.extractfile(m).read()
        kept = {json.loads(v["json"])["id"]: v for v in kept.values()}
        return man, rep, rejects, kept


# ---- policy ------------------------------------------------------------------------------------------------

def test_default_policy_loads_with_documented_defaults():
    p = load_policy(ROOT / "configs" / "privacy" / "default-policy.yaml")
    assert p.accepted_consent == ["RESEARCH"] and p.burned_in.modalities == ["ES", "US"]
    assert p.biometric.photo_modalities == ["GM", "OT", "XC"] and p.biometric.unknown_body_part_is_face
    assert p.hash() == Policy.model_validate({**json.loads(p.canonical_json())}).hash()


def test_bad_policy_gives_one_line_per_field_naming_the_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("accepted_consent: []\nmodalitys: [CT]\nburned_in: {accept_cleaned: maybe}\n")
    with pytest.raises(ConfigError) as e:
        load_policy(f)
    assert e.value.source == str(f)
    assert sorted(x.split(":")[0] for x in e.value.problems) == ["accepted_consent", "burned_in.accept_cleaned",
                                                                 "modalitys"]
    f.write_text("modalities: [CT]\n")
    with pytest.raises(ConfigError, match="accepted_consent: Field required"):
        load_policy(f)


def test_policy_hash_ignores_spelling_but_not_meaning(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("accepted_consent: [research, broad]\nmodalities: [CT, MR]\n")
    b.write_text("modalities: [mr, ' ct']\naccepted_consent: [Broad, RESEARCH]\nprompt: Describe the findings.\n")
    assert load_policy(a).hash() == load_policy(b).hash()
    b.write_text("accepted_consent: [research, broad]\nmodalities: [CT, MR, US]\n")
    assert load_policy(a).hash() != load_policy(b).hash()


def test_cli_refuses_a_bad_policy_with_exit_2(tmp_path, capsys):
    from vlmtrain.cli.main import main

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "records.jsonl").write_text("")
    bad = tmp_path / "p.yaml"
    bad.write_text("accepted_consent: research\n")
    code = main(["prep", "medical", "--src", str(tmp_path / "src"), "--policy", str(bad), "--out",
                 str(tmp_path / "o")])
    assert code == 2
    assert "accepted_consent: Input should be a valid list" in capsys.readouterr().err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_gate_reasons_are_a_closed_vocabulary():
    with pytest.raises(ValueError, match="unknown gate reason"):
        GateReject("looks_fine", "")
    assert {"no_consent", "not_local", "biometric", "burned_in_annotation", "phi_uncleanable",
            "deid_failed"} <= set(REASONS)


# ---- record rules ------------------------------------------------------------------------------------------

def test_consent_and_locality(tmp_path):
    s = Src(tmp_path / "src")
    s.add("ok", _png(), consent=" Research ", locality="LOCAL")
    s.add("withdrawn", _png(), consent="withdrawn", locality="local")
    s.add("none", _png(), consent=None, locality="local")
    s.add("not-a-string", _png(), consent=["research"], locality="local")
    s.add("shared", _png(), locality="shared")
    s.add("no-locality", _png())
    _, rep, rejects, kept = s.run(tmp_path / "o", {"accepted_consent": ["research"],
                                                   "accepted_locality": ["local", "federated"]})
    assert set(kept) == {"ok"}
    assert {k: v["reason"] for k, v in rejects.items()} == {
        "withdrawn": "no_consent", "none": "no_consent", "not-a-string": "no_consent",
        "shared": "not_local", "no-locality": "not_local"}
    assert rep["rejected_by_reason"] == {"no_consent": 3, "not_local": 2}


def test_biometric_rules(tmp_path):
    s = Src(tmp_path / "src")
    s.add("face", _png(), modality="XC", body_part="face")
    s.add("photo-unknown-part", _png(), modality="XC")
    s.add("flagged", _png(), modality="OP", body_part="EYE", biometric=True)
    s.add("hand-photo", _png(), modality="XC", body_part="HAND")
    s.add("fundus", _png(), modality="OP", body_part="EYE")
    s.add_dicom("face-dicom", "OT-PAL-8-face.dcm")
    _, _, rejects, kept = s.run(tmp_path / "o")
    assert set(kept) == {"hand-photo", "fundus"}
    assert {k: v["reason"] for k, v in rejects.items()} == dict.fromkeys(
        ["face", "photo-unknown-part", "flagged", "face-dicom"], "biometric")
    # the policy decides what a face is
    s2 = Src(tmp_path / "src2")
    s2.add("photo-unknown-part", _png(), modality="XC")
    _, _, _, kept = s2.run(tmp_path / "o2", {**BASE_POLICY, "biometric": {"unknown_body_part_is_face": False}})
    assert set(kept) == {"photo-unknown-part"}


def test_burned_in_rules_and_cleaned_copies(tmp_path):
    s = Src(tmp_path / "src")
    s.add_dicom("flag-yes", attrs={"BurnedInAnnotation": "YES"})
    s.add_dicom("us-unmarked", attrs={"Modality": "US"})
    s.add_dicom("us-cleaned", attrs={"Modality": "US", "BurnedInAnnotation": "NO"})
    s.add_dicom("ct-plain")
    s.add("png-flagged", _png(), modality="CR", burned_in=True)
    s.add("png-us-cleaned", _png(), modality="US", burned_in=False)
    strict = {"accepted_consent": ["research"]}
    _, _, rejects, kept = s.run(tmp_path / "o", strict)
    assert set(kept) == {"ct-plain"}
    assert all(r["reason"] == "burned_in_annotation" for r in rejects.values()) and len(rejects) == 5
    _, _, rejects, kept = s.run(tmp_path / "o2", {**strict, "burned_in": {"accept_cleaned": True}})
    assert set(kept) == {"ct-plain", "us-cleaned", "png-us-cleaned"}
    assert set(rejects) == {"flag-yes", "us-unmarked", "png-flagged"}  # YES is never accepted


def test_allow_lists_and_image_types(tmp_path):
    s = Src(tmp_path / "src")
    s.add_dicom("ct", attrs={"BodyPartExamined": "CHEST"})
    s.add_dicom("mr-knee", "MR_small.dcm", attrs={"BodyPartExamined": "KNEE"})
    s.add("png-no-modality", _png(), body_part="CHEST")
    s.add("png-cr", _png(), modality="CR", body_part="chest")
    s.add("not-an-image", b"%PDF-1.4 not an image", ext="pdf", modality="CR", body_part="CHEST")
    s.add("missing", None, modality="CR", body_part="CHEST")
    pol = {**BASE_POLICY, "modalities": ["CT", "CR", "MR"], "body_parts": ["CHEST"]}
    _, _, rejects, kept = s.run(tmp_path / "o", pol)
    assert set(kept) == {"ct", "png-cr"}
    assert {k: v["reason"] for k, v in rejects.items()} == {
        "mr-knee": "body_part_not_allowed", "png-no-modality": "modality_not_allowed",
        "not-an-image": "undecodable_image", "missing": "missing_field"}
    _, _, rejects, kept = s.run(tmp_path / "o2", {**pol, "image_types": ["dicom"]})
    assert rejects["png-cr"]["reason"] == "image_type_not_allowed" and set(kept) == {"ct"}


def test_png_and_jpeg_metadata_is_dropped(tmp_path):
    from PIL import Image

    s = Src(tmp_path / "src")
    s.add("png", _png(Author="Quillon Zorbaugh", Comment="MRN 77123"))
    s.add("jpeg", _jpeg_with_exif("Quillon Zorbaugh"), ext="jpg")
    assert b"Zorbaugh" in (s.root / "img-0.png").read_bytes() and b"Zorbaugh" in (s.root / "img-1.jpg").read_bytes()
    _, rep, _, kept = s.run(tmp_path / "o")
    for rid, members in kept.items():
        data = members["img0.png"]
        assert b"Zorbaugh" not in data and b"77123" not in data and b"2023:03:14" not in data, rid
        im = Image.open(io.BytesIO(data))
        assert im.format == "PNG" and not im.info.get("exif") and not getattr(im, "text", {}), rid
    assert rep["kept_by_image_type"] == {"jpeg": 1, "png": 1}


def test_ids_with_phi_are_refused_without_repeating_them(tmp_path):
    s = Src(tmp_path / "src")
    s.add("jane.roe@example.org", _png())
    s.add("ct-03/14/2023", _png())
    s.add("CT-000123456", _png())  # a record number is what an id is for
    out = tmp_path / "o"
    _, _, rejects, kept = s.run(out)
    assert set(kept) == {"CT-000123456"}
    assert rejects == {"medical-0": {"id": "medical-0", "reason": "phi_in_id",
                                     "detail": "id: holds a name, date or contact detail", "line": 1},
                       "medical-1": {"id": "medical-1", "reason": "phi_in_id",
                                     "detail": "id: holds a name, date or contact detail", "line": 2}}
    text = (out / "rejects.jsonl").read_text()
    assert "jane" not in text.lower() and "2023" not in text


def test_records_own_names_and_ids_are_removed(tmp_path):
    s = Src(tmp_path / "src")
    s.add("r1", _png(), report="Zorbaugh presented after a fall; ref 77123. No acute fracture.",
          patient_name="Quillon Zorbaugh", patient_id="77123")
    s.add("r2", _png(), report="Name: quillon zorbaugh. No acute fracture.", patient_name="Quillon Zorbaugh")
    _, rep, rejects, kept = s.run(tmp_path / "o")
    rec = json.loads(kept["r1"]["json"])
    assert rec["messages"][1]["content"] == [{"type": "text", "text":
                                              "[NAME] presented after a fall; ref [ID]. No acute fracture."}]
    assert rec["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "Describe the findings."}]
    assert rec["meta"]["phi_tags"] == {"ID": 1, "NAME": 1}
    # the known name is found in any case, so the label's value is now a tag: kept, cleaned
    r2 = json.loads(kept["r2"]["json"])
    assert r2["messages"][1]["content"][0]["text"] == "Name: [NAME]. No acute fracture."
    assert rep["phi_replacements"] == {"ID": 1, "NAME": 2}
    assert not rejects


def test_uids_are_consistent_across_files_and_groups_follow_patients(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMTRAIN_PRIVACY_SECRET", "s3cret")
    s = Src(tmp_path / "src")
    # two instances of one study (same StudyInstanceUID) and a third file of another patient
    s.add_dicom("a1", attrs={"PatientID": "P-1", "SOPInstanceUID": "1.2.3.4.1", "StudyInstanceUID": "1.2.3.9"})
    s.add_dicom("a2", attrs={"PatientID": "P-1", "SOPInstanceUID": "1.2.3.4.2", "StudyInstanceUID": "1.2.3.9"})
    s.add_dicom("b1", attrs={"PatientID": "P-2", "SOPInstanceUID": "1.2.3.4.3"}, patient_id="rec-B")
    _, rep, _, kept = s.run(tmp_path / "o")
    hdr = {k: json.loads(v["dcm.json"]) for k, v in kept.items()}
    study = {k: h["0020000D"]["Value"][0] for k, h in hdr.items()}
    sop = {k: h["00080018"]["Value"][0] for k, h in hdr.items()}
    assert study["a1"] == study["a2"] != "1.2.3.9" and len(set(sop.values())) == 3
    groups = {k: json.loads(v["json"])["meta"]["patient_group"] for k, v in kept.items()}

    def expect(key):
        return hmac.new(b"s3cret", key.encode(), hashlib.sha256).hexdigest()[:16]

    # the DICOM PatientID (with its issuer) when the record has none; the record's patient_id first
    issuer = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False)).get("IssuerOfPatientID", "")
    assert groups["a1"] == groups["a2"] == expect(f"dicom-patient:{issuer}|P-1")
    assert groups["b1"] == expect("record-patient:rec-B")
    assert rep["patient_group_secret"] == "environment variable VLMTRAIN_PRIVACY_SECRET"
    # a second run maps UIDs afresh (runs cannot be linked through them) but keeps the keyed groups
    _, _, _, again = s.run(tmp_path / "o2")
    assert json.loads(again["a1"]["dcm.json"])["0020000D"]["Value"][0] != study["a1"]
    assert json.loads(again["a1"]["json"])["meta"]["patient_group"] == groups["a1"]


def test_without_secret_groups_are_random_per_run(tmp_path, monkeypatch):
    monkeypatch.delenv("VLMTRAIN_PRIVACY_SECRET", raising=False)
    s = Src(tmp_path / "src")
    s.add("x", _png(), patient_id="P-9")
    _, rep1, _, k1 = s.run(tmp_path / "o1")
    _, rep2, _, k2 = s.run(tmp_path / "o2")
    g1, g2 = (json.loads(k["x"]["json"])["meta"]["patient_group"] for k in (k1, k2))
    assert g1 != g2 and rep1["patient_group_secret"].startswith("random for this run")


def test_verification_catches_values_the_library_left(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    before = dicom._snapshot(ds, dicom._actions())
    with pytest.raises(dicom.DicomReject) as e:
        dicom.verify(ds, before)  # nothing was de-identified
    assert e.value.reason == "deid_failed"
    dicom.deidentify(ds)  # the real path verifies itself and passes
    # a UID hidden in a sequence the library leaves alone (not in Table E.1-1) is remapped all the same
    nested = pydicom.Dataset()
    nested.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    nested.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds2 = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds2.add_new(0x00091001, "SQ", pydicom.Sequence([nested]))  # private: removed with private tags
    ds2.add_new(0x00081115, "SQ", pydicom.Sequence([nested]))  # ReferencedSeriesSequence
    assert (0x0008, 0x1115) not in dicom._actions()
    dicom.deidentify(ds2)
    item = ds2[0x00081115].value[0]
    assert item.ReferencedSOPInstanceUID != "1.2.826.0.1.3680043.8.498.1"
    assert item.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and 0x00091001 not in ds2


def test_output_folder_refusal_and_overwrite(tmp_path):
    s = Src(tmp_path / "src")
    s.add("x", _png())
    out = tmp_path / "o"
    s.run(out)
    with pytest.raises(VlmtrainError, match="already holds a manifest.json"):
        s.run(out)
    (out / "notes.txt").write_text("mine")
    s.lines = []
    s.add("y", _png(), consent="no")
    s.add("z", _png())
    man, rep, rejects, kept = s.run(out, overwrite=True)
    assert set(kept) == {"z"} and rep["input_records"] == 2 and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "privacy_report.json").read_text())["kept"] == 1
    with pytest.raises(VlmtrainError, match="records.jsonl: not found"):
        run_gate(tmp_path, Policy.model_validate(BASE_POLICY), tmp_path / "o3")


def test_builtin_sample_set_is_made_and_reused(tmp_path):
    from vlmtrain.data.loader import parse_sample
    from vlmtrain.data.shards import iter_shard
    from vlmtrain.privacy.medical_samples import expected_counts, prepare_medical_builtin

    out = prepare_medical_builtin(tmp_path)
    man = json.loads((out / "manifest.json").read_text())
    assert man["samples"] == expected_counts()["kept"]
    stamp = (out / "manifest.json").stat().st_mtime_ns
    shutil.rmtree(tmp_path / "medical-samples-src")
    assert prepare_medical_builtin(tmp_path) == out and (out / "manifest.json").stat().st_mtime_ns == stamp
    recs = [parse_sample(raw)[0] for raw in iter_shard(str(next(out.glob("shard-*.tar"))))]
    assert {r["meta"]["modality"] for r in recs} == {"CT", "MR", "CR", "OP", "SM"}


# ---- workers -----------------------------------------------------------------------------------------------

def test_a_failing_worker_is_one_error_line_naming_the_record(tmp_path, monkeypatch, capsys):
    """A library that raises on one record (injected into the face scan, which runs inside the worker threads)
    refuses that record as gate_error with its id, prints one line naming it, and the other records are kept."""
    import threading

    from vlmtrain.privacy import pixels

    real, seen = pixels.find_faces, []

    def flaky(rgb):
        seen.append(threading.current_thread().name)
        if int(rgb[0, 0, 0]) == 77:  # the one poisoned image
            raise RuntimeError("native library failed on Jane Roe")  # a message that quotes a value
        return real(rgb)

    monkeypatch.setattr(pixels, "find_faces", flaky)
    src = Src(tmp_path / "src")
    for i in range(6):
        src.add(f"r{i}", _png(color=(77 if i == 3 else 20 + i, 90, 90), size=(32, 32)), modality="CR",
                body_part="CHEST")
    _, rep, rejects, kept = src.run(tmp_path / "out", {**BASE_POLICY, "ocr_burned_in": False}, workers=2)
    assert sorted(kept) == ["r0", "r1", "r2", "r4", "r5"]
    assert rejects == {"r3": {"id": "r3", "reason": "gate_error", "line": 4,
                              "detail": "record: RuntimeError while checking it (refused, not passed)"}}
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error on record" in ln]
    assert err == ["prep medical: error on record r3 (line 4): record: RuntimeError while checking it (refused, "
                   "not passed)"]
    assert "Jane" not in (tmp_path / "out" / "rejects.jsonl").read_text()
    assert rep["rejected_by_reason"] == {"gate_error": 1}
    assert all(n.startswith("prep") for n in seen)  # the scans ran in the worker threads


def test_native_libraries_are_imported_before_workers_start(monkeypatch):
    """Gate() loads cv2 (with cv2.data), the face model and Tesseract's bindings in the calling thread."""
    import sys

    from vlmtrain.privacy import gate as gate_mod
    from vlmtrain.privacy import pixels

    calls = []
    monkeypatch.setattr(pixels, "warm_up", lambda faces, ocr: calls.append((faces, ocr)))
    gate_mod.Gate(Policy.model_validate(BASE_POLICY), ROOT, b"k")
    assert calls == [(True, pixels.ocr_available())]
    monkeypatch.undo()
    pixels.warm_up(faces=True, ocr=True)
    assert "cv2" in sys.modules and hasattr(sys.modules["cv2"], "data")
    assert pixels._local.cascades  # this (main) thread's face model is loaded


def test_staff_names_and_geography_never_reach_a_shard_member(tmp_path):
    """Credentialed staff, sign-off lines, a cue-less name, towns and ZIP codes in every order: the shard bytes
    hold none of them (whole tar members are searched), the eponyms stay, and keep_zip3 leaves 973** only."""
    report = ("Known Parkinson disease and Bell palsy. Co-signed: Maribel Okafor RN. Technologist: Ana Ruiz "
              "RT(R). Desmond Castellanos confirmed the line. Lives in Quarry Bend, Oregon 97355; prior address "
              "ZIP 44966, Fenwick, NC and CEDAR HOLLOW OH 44109-2231.")
    leaks = [b"Okafor", b"Maribel", b"Ruiz", b"Castellanos", b"Quarry", b"97355", b"44966", b"Fenwick",
             b"CEDAR", b"44109"]
    for keep_zip3 in (False, True):
        src = Src(tmp_path / f"src{keep_zip3}")
        src.add("r1", _png(size=(32, 32)), report=report, modality="CR", body_part="CHEST")
        out = tmp_path / f"out{keep_zip3}"
        _, _, rejects, kept = src.run(out, {**BASE_POLICY, "phi": {"keep_zip3": keep_zip3}})
        assert not rejects and set(kept) == {"r1"}
        blob = b"".join(open(t, "rb").read() for t in out.glob("shard-*.tar"))
        assert not [w for w in leaks if w in blob]
        assert b"Parkinson disease" in blob and b"Bell palsy" in blob and b"Oregon" in blob
        assert (b"973**" in blob) == keep_zip3
