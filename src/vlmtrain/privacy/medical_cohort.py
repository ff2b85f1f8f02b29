"""A synthetic training cohort for DP training and its audit (`builtin: medical-cohort`, `medical-cohort-holdout`).

The gated sample set (`medical-samples`) keeps 10 records: enough to show the gate, too few to measure membership
leakage (an AUC over 5 vs 5 records is noise). The cohort re-uses those 10 *gated* images (pixels that passed the
gate's checks and de-identification, downscaled to 96 px) with new synthetic reports written from a findings
vocabulary per modality, with record-specific details (sizes, locations, series/image numbers) that a model can
memorise: what membership inference and canaries detect. Reports contain no PHI by construction (no names,
dates, ids): they need no cleaning. Patients are synthetic groups of 1–3 records (`meta.patient_group`), so
`privacy.unit: patient` has something to group. Train and hold-out records come from the same generator with
different seeds: same distribution, disjoint records.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

from vlmtrain.data.schema import IMAGE_PART, Sample, text
from vlmtrain.data.writer import write_shards
from vlmtrain.privacy.medical_samples import prepare_medical_builtin

# name → (records, seed). `-public` plays the part of public report text (an open, de-identified corpus): the stage
# before DP fine-tuning learns the report language there, so DP only has to adapt, not learn from scratch.
SIZES = {"medical-cohort": (400, 1), "medical-cohort-holdout": (200, 2), "medical-cohort-public": (2000, 3)}
QUESTION = "Describe the findings."
SIDES = ["left", "right"]
VOCAB = {
    "CT": (["nodule", "ground-glass opacity", "hypodense lesion", "calcified granuloma"],
           ["upper lobe", "lower lobe", "middle lobe", "frontal lobe", "temporal lobe", "hepatic segment 6"]),
    "MR": (["T2 hyperintense focus", "simple cyst", "enhancing lesion", "area of restricted diffusion"],
           ["periventricular white matter", "hepatic segment 4", "basal ganglia", "renal cortex"]),
    "CR": (["opacity", "healed rib fracture", "small effusion", "degenerative change"],
           ["lung base", "costophrenic angle", "first metatarsal", "upper zone"]),
    "OP": (["microaneurysms", "hard exudates", "dot hemorrhages", "cotton-wool spot"],
           ["superior arcade", "inferior arcade", "macula", "optic disc margin"]),
    "SM": (["cytoplasmic staining", "nuclear staining", "membranous staining", "glandular atypia"],
           ["crypt bases", "surface epithelium", "lamina propria", "muscularis"]),
}
IMPRESSIONS = ["Likely benign; routine follow-up.", "Recommend follow-up in 6 months.",
               "Findings are stable compared with the prior study.", "Correlate clinically.",
               "No further imaging is needed."]


def _base_images(root: Path) -> list[dict]:
    """The gated medical-samples images (96 px PNG) with their modality."""
    from PIL import Image

    from vlmtrain.data.shards import Source, iter_shard

    shards = prepare_medical_builtin(root)
    out = []
    for url in Source(str(shards)).shard_urls():
        for raw in iter_shard(url):
            if "json" not in raw or "img0.png" not in raw:
                continue
            meta = json.loads(raw["json"]).get("meta") or {}
            im = Image.open(io.BytesIO(raw["img0.png"])).convert("RGB").resize((96, 96), Image.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            out.append({"png": buf.getvalue(), "modality": meta.get("modality", "CR"),
                        "body_part": meta.get("body_part", "")})
    return out


def _report(rng: random.Random, modality: str, body_part: str) -> str:
    findings, places = VOCAB.get(modality, VOCAB["CR"])
    n = rng.randint(1, 2)
    parts = []
    for _ in range(n):
        parts.append(f"{rng.choice(findings).capitalize()} measuring {rng.randint(2, 40)} mm in the "
                     f"{rng.choice(SIDES)} {rng.choice(places)}.")
    parts.append(f"Key image: series {rng.randint(1, 9)}, image {rng.randint(1, 240)}.")
    parts.append(rng.choice(IMPRESSIONS))
    return f"{modality} {body_part.lower()}: " + " ".join(parts)


def cohort_samples(root: Path, name: str) -> list[Sample]:
    n, seed = SIZES[name]
    rng = random.Random(f"{name}:{seed}")
    images = _base_images(root)
    samples, patient, left = [], 0, 0
    for i in range(n):
        if left == 0:  # a new synthetic patient with 1-3 records
            patient, left = patient + 1, rng.randint(1, 3)
        left -= 1
        img = rng.choice(images)
        rec = {"id": f"{name}-{i:04d}", "kind": "chat",
               "messages": [{"role": "user", "content": [IMAGE_PART, text(QUESTION)]},
                            {"role": "assistant", "content": [text(_report(rng, img["modality"], img["body_part"]))]}],
               "meta": {"modality": img["modality"], "body_part": img["body_part"], "synthetic": True,
                        "patient_group": hashlib.sha256(f"{name}:{patient}".encode()).hexdigest()[:16]}}
        samples.append(Sample(rec, [("png", img["png"])]))
    return samples


def prepare_cohort_builtin(root: str | Path, name: str) -> Path:
    out = Path(root) / name
    man = out / "manifest.json"
    if man.is_file() and json.loads(man.read_text()).get("samples"):
        return out
    write_shards(cohort_samples(Path(root), name), out, f"builtin:{name}", shard_size=100, overwrite=True)
    return out
