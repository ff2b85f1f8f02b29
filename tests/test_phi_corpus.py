"""The PHI benchmark's corpus and scorer: seeded, labelled spans that hold what they say, every Safe Harbor type in
varied forms; the scorer's recall/precision checked on hand-made detections."""

import re
from collections import Counter

import pytest

from bench.phi import Refused, score
from bench.phi_corpus import CLINICAL_TERMS, TYPES, Record, make_corpus


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(1000, 15)


def test_corpus_is_seeded_and_large(corpus):
    again = make_corpus(1000, 15)
    assert [r.text for r in again] == [r.text for r in corpus]
    assert make_corpus(5, 16)[0].text != corpus[0].text
    assert len(corpus) >= 1000


def test_spans_are_in_bounds_disjoint_and_every_type_present(corpus):
    counts = Counter()
    for r in corpus:
        spans = sorted((s, e) for s, e, _ in r.phi) + sorted(r.clinical)
        for s, e in spans:
            assert 0 <= s < e <= len(r.text) and r.text[s:e].strip() == r.text[s:e]
        ordered = sorted(spans)
        assert all(a[1] <= b[0] for a, b in zip(ordered, ordered[1:])), r.id
        counts.update(t for _, _, t in r.phi)
    assert set(counts) == set(TYPES) and min(counts.values()) >= 80


def _shape(s: str) -> str:
    return re.sub(r"[a-z]+", "a", re.sub(r"[A-Z]+", "A", re.sub(r"\d+", "9", s)))


def test_surface_forms_are_varied(corpus):
    shapes = {t: {_shape(r.text[s:e]) for r in corpus for s, e, typ in r.phi if typ == t} for t in TYPES}
    assert len(shapes["DATE"]) >= 10 and len(shapes["PHONE"]) >= 10 and len(shapes["NAME"]) >= 8
    # phone labels and international forms are present
    text = "\n".join(r.text for r in corpus)
    for needle in ("Fax", "Cell", "Call back at", "Contact Dr.", "+44 ", "ext. ", "+1 "):
        assert needle in text
    terms = Counter(r.text[s:e] for r in corpus for s, e in r.clinical)
    assert {"Crohn disease", "Baker cyst", "L4-L5", "BP 120/80", "3.2 x 1.1 cm"} <= set(terms) <= set(CLINICAL_TERMS)


def test_score_counts_partial_cover_as_leak_and_refusals_apart():
    rec = Record("r1", text="Call 617-555-0123 about Crohn disease.", phi=[(5, 17, "PHONE")],
                 clinical=[(24, 37)])
    other = Record("r2", text="Nothing here.")
    whole = score([rec, other], lambda r: [(5, 17)] if r.id == "r1" else [])
    assert whole["recall"]["PHONE"] == 1.0 and whole["precision"] == 1.0 and whole["clinical_kept"] == 1.0
    partial = score([rec], lambda r: [(5, 12)])  # "0123" left
    assert partial["recall"]["PHONE"] == 0.0
    greedy = score([rec], lambda r: [(5, 17), (24, 30)])
    assert greedy["precision"] == 0.5 and greedy["clinical_kept"] == 0.0

    def refuse(r):
        raise Refused

    refused = score([rec, other], refuse)
    assert refused["refused"] == 2 and refused["refused_share"] == 1.0


@pytest.mark.slow  # a subprocess that loads spaCy for Presidio: ~30 s on an idle 2-core box
def test_bench_phi_quick_runs_every_installed_side(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, "-m", "bench", "phi", "--quick", "--out", str(tmp_path / "p.json")],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    full = json.loads((tmp_path / "p.json").read_text())
    assert set(full["corpora"]) == {"own", "faker", "names_geo", "nocue", "nocue_holdout"}
    assert full["corpora"]["own"]["records"] == 30
    for side in ("vlmtrain (+ record's name and id)", "scrubadub 2.0.1 (default detectors)",
                 "presidio-analyzer (pattern recognizers)"):
        assert 0.0 <= full["sides"][side]["own"]["recall_all"] <= 1.0, side
