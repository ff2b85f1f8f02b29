"""`python -m bench prep_medical [--quick]`: `vlmtrain prep medical` on 1,000 records, the way a user runs it
(subprocess, default policy with OCR and face detection on), wall time and the cost per image of each pixel
check (from privacy_report.json's `pixel_checks`).

Records: the offline sample set's images (`medical_samples.make_medical_samples`: CT, MR, CR, US, fundus and
histology photographs, a face photograph ...) cycled to 1,000 records, each with a report from the PHI
benchmark's corpus (`bench.phi_corpus`, so the text scrubber has identifiers to find) and the sample set's
consent, locality and flags, so the gate's reject paths run in proportion.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from bench.phi_corpus import make_corpus

N_RECORDS, N_QUICK, WORKERS = 1000, 30, 2


def make_source(root: Path, n: int) -> Path:
    from vlmtrain.privacy.medical_samples import make_medical_samples

    src = make_medical_samples(root / "src")
    base = []
    for line in (src / "records.jsonl").read_text().splitlines():
        try:
            base.append(json.loads(line))
        except json.JSONDecodeError:  # the sample set's deliberately broken line
            continue
    reports = make_corpus(n, seed=7)
    lines = []
    for i in range(n):
        rec = dict(base[i % len(base)])
        rec["id"] = f"rec-{i:05d}"
        if rec.get("report"):  # keep the sample set's missing-report case missing
            rec["report"] = reports[i].text
        lines.append(json.dumps(rec))
    (src / "records.jsonl").write_text("\n".join(lines) + "\n")
    return src


def run(quick: bool = False, out: str | None = None) -> dict:
    n = N_QUICK if quick else N_RECORDS
    with tempfile.TemporaryDirectory(prefix="bench-prep-medical-") as tmp:
        root = Path(tmp)
        src = make_source(root, n)
        policy = common.ROOT / "configs" / "privacy" / "default-policy.yaml"
        cmd = [sys.executable, "-m", "vlmtrain", "prep", "medical", "--src", str(src), "--policy", str(policy),
               "--out", str(root / "out"), "--workers", str(WORKERS), "--progress-every", "100"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"prep medical failed ({proc.returncode}): {proc.stderr[-2000:]}")
        report = json.loads((root / "out" / "privacy_report.json").read_text())
        shutil.rmtree(root / "out")
    counts, seconds = report["pixel_checks"]["counts"], report["pixel_checks"]["seconds"]
    per_image = {k: round(seconds[k] / counts[k], 3) for k in seconds if counts.get(k)}
    result = {"bench": "prep_medical", "quick": quick, "machine": common.machine(), "records": n,
              "workers": WORKERS, "wall_s": round(wall, 1), "records_per_s": round(n / wall, 2),
              "kept": report["kept"], "rejected_by_reason": report["rejected_by_reason"],
              "pixel_checks": report["pixel_checks"], "seconds_per_image": per_image,
              "progress_lines": [x for x in proc.stderr.splitlines() if x.strip()][-4:]}
    result["headline"] = {"records": n, "wall_s": result["wall_s"], "kept": result["kept"],
                          "ocr_s_per_image": per_image.get("ocr_scanned"),
                          "face_s_per_image": per_image.get("face_scanned")}
    common.save("prep_medical-quick" if quick else "prep_medical", result, out)
    return result
