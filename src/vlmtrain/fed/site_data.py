"""Each site's own data: the medical cohort split over sites by patient, skewed by modality, gated at the site.

Why patients, not records, are split: a patient's records stay at one hospital, so the sites are patient-disjoint
and the released model's patient-level guarantee is the maximum of the sites' ε, not their sum.

Why each site runs the real privacy gate (`vlmtrain.privacy.gate.run_gate`) on its share: a site trains only on
shards with a passing gate report beside them (`check_gate_report`), and the report's hash travels in its replies.

Layout of a site directory:
    SITE/src/records.jsonl, SITE/src/images/*.png   the site's raw records (never leave the site)
    SITE/shards/                                    gated shards + manifest.json + privacy_report.json
    SITE/privacy_ledger.json                        the site's accountant (vlmtrain.fed.ledger)
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from vlmtrain.errors import VlmtrainError
from vlmtrain.privacy.medical_cohort import cohort_samples
from vlmtrain.privacy.medical_samples import SAMPLE_POLICY

REPORT = "privacy_report.json"


def assign_patients(samples, shares: dict[str, dict[str, float]], seed: int) -> dict[str, list]:
    """site → the samples of the patients it holds. A patient goes to one site, drawn with the site's share of the
    patient's first modality (shares of one modality need not sum to 1: they are normalised)."""
    rng = random.Random(seed)
    by_patient: dict[str, list] = {}
    for s in samples:
        by_patient.setdefault(s.record["meta"]["patient_group"], []).append(s)
    sites = list(shares)
    out: dict[str, list] = {site: [] for site in sites}
    for group in sorted(by_patient):
        recs = by_patient[group]
        modality = recs[0].record["meta"]["modality"]
        weights = [shares[site].get(modality, 0.0) for site in sites]
        if sum(weights) <= 0:
            raise VlmtrainError(f"federated.sites: no site takes modality {modality}")
        out[rng.choices(sites, weights=weights)[0]].extend(recs)
    return out


def _write_src(samples, src: Path) -> Path:
    """records.jsonl in the gate's input format (docs/privacy.md#the-gate) + one PNG per record."""
    (src / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for s in samples:
        rec = s.record
        (src / "images" / f"{rec['id']}.png").write_bytes(s.images[0][1])
        report = "".join(p["text"] for p in rec["messages"][-1]["content"] if p.get("type") == "text")
        lines.append(json.dumps({"id": rec["id"], "image": f"images/{rec['id']}.png", "report": report,
                                 "consent": "research", "locality": "federated",
                                 "patient_id": rec["meta"]["patient_group"], "modality": rec["meta"]["modality"],
                                 "body_part": rec["meta"]["body_part"]}))
    (src / "records.jsonl").write_text("\n".join(lines) + "\n")
    return src


def prepare_sites(root: str | Path, shares: dict[str, dict[str, float]], seed: int,
                  cohort: str = "medical-cohort") -> dict[str, Path]:
    """Split `cohort` over the sites and gate each share at `root/SITE/shards` (once). Returns site → site dir."""
    from vlmtrain.privacy.gate import run_gate
    from vlmtrain.privacy.policy import Policy
    from vlmtrain.train.sources import prepare_builtin

    root = Path(root)
    dirs = {site: root / site for site in shares}
    if all((d / "shards" / REPORT).is_file() for d in dirs.values()):
        return dirs
    prepare_builtin("medical-samples", root / "_cohort")  # the cohort's gated images: from the builtin cache if set
    split = assign_patients(cohort_samples(root / "_cohort", cohort), shares, seed)
    for site, samples in split.items():
        if len(samples) < 2:
            raise VlmtrainError(f"federated.sites.{site}: {len(samples)} records after the split; too few to train")
        src = _write_src(samples, dirs[site] / "src")
        run_gate(src, Policy.model_validate(SAMPLE_POLICY), dirs[site] / "shards", overwrite=True, shard_size=100)
    return dirs


def check_gate_report(shards: str | Path) -> str:
    """sha256 of the shards' gate report; refuses shards without a passing one (kept records, a policy hash)."""
    path = Path(shards) / REPORT
    if not path.is_file():
        raise VlmtrainError(f"{shards}: no {REPORT}: a site trains only on shards that passed the privacy gate "
                            "(`vlmtrain prep medical`)")
    raw = path.read_bytes()
    report = json.loads(raw)
    if not report.get("policy_hash") or not report.get("kept"):
        raise VlmtrainError(f"{path}: policy_hash/kept: the gate report does not show a passing gate run")
    return hashlib.sha256(raw).hexdigest()


def dataset_key(shards: str | Path) -> str:
    """The ledger's key for a site's dataset: sha256 over its sorted record ids. Stable when the same records are
    gated again (the patient-group HMAC may change with the gate's secret; the ids do not)."""
    from vlmtrain.data.shards import Source, iter_shard

    ids = []
    for url in Source(str(shards)).shard_urls():
        for raw in iter_shard(url):
            if "json" in raw:
                ids.append(json.loads(raw["json"])["id"])
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()
