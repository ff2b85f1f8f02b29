"""`python -m bench phi [--quick]`: PHI recall per Safe Harbor type, precision, clinical terms kept and records
refused, for vlmtrain's report scrubber and, side by side on the same corpus, for PII/PHI libraries that install
offline from the package index. Corpus: `bench.phi_corpus` (seeded, labelled by character span).

Scoring (per side):
- a side may *refuse* a record (vlmtrain does, when a PHI label's value is not recognised): refused records are
  counted (`refused`) and left out of the other numbers, which are over the records the side kept;
- recall of a type: the share of its labelled spans whose every letter and digit is covered by the side's
  detections (a phone number with four digits left is a leak);
- precision: the share of detected spans that overlap a labelled identifier;
- clinical kept: the share of labelled clinical terms (eponyms, levels, measurements) no detection touches.
"""

from __future__ import annotations

import time
from collections import Counter

from bench import common
from bench import phi_names_geo as names_geo
from bench import phi_nocue_holdout as holdout
from bench.phi_corpus import STRUCTURED, TYPES, Record, make_corpus

N_RECORDS, N_QUICK = 1200, 30
# "own": the corpus the detectors were revised against (their leaks were read); "faker": a held-out corpus with a
# new seed whose phones, addresses, cities, SSNs, IPs, URLs, plates, VINs and people come from Faker's en_US
# formats, which were not read while writing the detectors.
CORPORA = {"own": 15, "faker": 2026}
# bench.phi_names_geo (a separate seeded generator): "names_geo" staff sign-offs with credentials + US geography,
# "nocue" names with no title, label, credential or relation (the lexicon's recall).
NAMES_GEO = {"names_geo": (2612, "cued"), "nocue": (2613, "nocue")}
# bench.phi_nocue_holdout: cue-less names on frames written apart from bench.phi_names_geo's, before the detector
# was changed for them (a check that rules fitted to "nocue" hold on other phrasings).
HOLDOUT = {"nocue_holdout": 2714}


class Refused(Exception):
    """The side declines to clean this record (it would be rejected, not kept)."""


class _Unavailable(Exception):
    """The side's library is installed but cannot run offline."""


# ---- sides: each is (name, factory) where factory() returns fn(record) -> list[(start, end)] --------------------

def _vlmtrain(with_known: bool):
    def make():
        from vlmtrain.privacy.phi import KnownIdentifiers, PhiScrubber, PhiUncleanable

        scrubber = PhiScrubber()

        def detect(rec: Record):
            known = KnownIdentifiers(names=[rec.patient_name], ids=[rec.patient_id]) if with_known else None
            try:
                result = scrubber.clean(rec.text, known)
            except PhiUncleanable:
                raise Refused from None
            return [(s, e) for s, e, _ in result.spans]
        return detect
    return make


def _scrubadub():
    import scrubadub

    scrubber = scrubadub.Scrubber()  # its default detectors: the ones that run without a download

    def detect(rec: Record):
        return [(f.beg, f.end) for f in scrubber.iter_filth(rec.text)]
    return detect


def _presidio():
    """Presidio's AnalyzerEngine with its predefined pattern recognizers; the NLP engine is spaCy's blank English
    pipeline (tokeniser only), since spaCy's trained models are not on the package index."""
    import tldextract
    from presidio_analyzer import AnalyzerEngine

    # Presidio's URL recognizer asks tldextract, which fetches the public suffix list over the network unless
    # told to use the snapshot it ships.
    import presidio_analyzer.predefined_recognizers as _rec  # noqa: F401
    tldextract.extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
    engine = _BlankSpacyEngine()
    analyzer = AnalyzerEngine(nlp_engine=engine, supported_languages=["en"])

    def detect(rec: Record):
        return [(x.start, x.end) for x in analyzer.analyze(rec.text, language="en")]
    return detect


def _BlankSpacyEngine():
    import spacy
    from presidio_analyzer.nlp_engine import SpacyNlpEngine

    class Blank(SpacyNlpEngine):
        def load(self):
            self.nlp = {"en": spacy.blank("en")}

    e = Blank(models=[{"lang_code": "en", "model_name": "blank"}])
    e.load()
    return e


def _philter():
    """philter-lite with the configuration it ships (regexes and safe lists from the UCSF Philter project). It
    part-of-speech tags with NLTK, whose tagger data is a separate download: without it the side cannot run."""
    import os

    import nltk
    import philter_lite

    filters = philter_lite.load_filters(os.path.join(os.path.dirname(philter_lite.__file__), "configs",
                                                     "philter_delta.toml"))
    try:
        nltk.pos_tag(["probe"])
    except LookupError:
        raise _Unavailable("needs NLTK's averaged_perceptron_tagger data, which is downloaded at run time, not "
                           "installed from the package index") from None

    def detect(rec: Record):
        include_map, _, _ = philter_lite.detect_phi(rec.text, patterns=filters)
        spans, start = [], None
        for i in range(len(rec.text) + 1):
            on = i < len(rec.text) and include_map.get(i) is False  # philter: False = do not include = PHI
            if on and start is None:
                start = i
            elif not on and start is not None:
                spans.append((start, i))
                start = None
        return spans
    return detect


SIDES = {
    "vlmtrain (+ record's name and id)": _vlmtrain(True),
    "vlmtrain (text only)": _vlmtrain(False),
    "scrubadub 2.0.1 (default detectors)": _scrubadub,
    "presidio-analyzer (pattern recognizers)": _presidio,
    "philter-lite (default config)": _philter,
}


# ---- scoring ---------------------------------------------------------------------------------------------------

def _covered(spans: list[tuple[int, int]], n: int) -> bytearray:
    mask = bytearray(n)
    for s, e in spans:
        mask[max(0, s):min(n, e)] = b"\x01" * (min(n, e) - max(0, s))
    return mask


def score(records: list[Record], detect) -> dict:
    found, total = Counter(), Counter()
    predicted = tp = clin = clin_kept = refused = 0
    t0 = time.perf_counter()
    for rec in records:
        try:
            spans = detect(rec)
        except Refused:
            refused += 1
            continue
        spans = [(s, e) for s, e in spans if rec.text[s:e].strip()]
        mask = _covered(spans, len(rec.text))
        for s, e, typ in rec.phi:
            total[typ] += 1
            if all(mask[i] for i in range(s, e) if rec.text[i].isalnum()):
                found[typ] += 1
        for s, e in spans:
            predicted += 1
            tp += any(s < pe and ps < e for ps, pe, _ in rec.phi)
        for s, e in rec.clinical:
            clin += 1
            clin_kept += not any(mask[s:e])
    seconds = time.perf_counter() - t0
    recall = {t: round(found[t] / total[t], 4) for t in TYPES if total[t]}
    all_found, all_total = sum(found.values()), sum(total.values())
    structured_found = sum(found[t] for t in STRUCTURED)
    structured_total = sum(total[t] for t in STRUCTURED)
    return {"recall": recall, "recall_all": round(all_found / max(all_total, 1), 4),
            "recall_structured": round(structured_found / max(structured_total, 1), 4),
            "leaked": {t: total[t] - found[t] for t in TYPES if total[t] - found[t]},
            "precision": round(tp / max(predicted, 1), 4), "clinical_kept": round(clin_kept / max(clin, 1), 4),
            "refused": refused, "refused_share": round(refused / len(records), 4), "records": len(records),
            "ms_per_record": round(1000 * seconds / len(records), 2)}


def run(quick: bool = False, out: str | None = None) -> dict:
    n = N_QUICK if quick else N_RECORDS
    corpora = {forms: make_corpus(n, seed, forms) for forms, seed in CORPORA.items()}
    corpora.update({name: names_geo.make_corpus(n, seed, kind) for name, (seed, kind) in NAMES_GEO.items()})
    corpora.update({name: holdout.make_corpus(n, seed) for name, seed in HOLDOUT.items()})
    sides: dict[str, dict] = {}
    for name, factory in SIDES.items():
        try:
            detect = factory()
        except ImportError as e:  # a benchmark-only library not installed: say so, do not fail the others
            sides[name] = {"error": f"not installed: {e.name or e}"}
            continue
        except _Unavailable as e:
            sides[name] = {"error": str(e)}
            continue
        sides[name] = {forms: score(records, detect) for forms, records in corpora.items()}
        for forms, r in sides[name].items():
            print(f"{name} [{forms}]: recall {r['recall_all']}, precision {r['precision']}, "
                  f"clinical kept {r['clinical_kept']}, refused {r['refused']}", flush=True)
    result = {"bench": "phi", "quick": quick, "machine": common.machine(), "corpora": {
        forms: {"records": len(records), "seed": _seed(forms),
                "identifiers": dict(sorted(Counter(t for r in records for _, _, t in r.phi).items())),
                "clinical_terms": sum(len(r.clinical) for r in records)} for forms, records in corpora.items()},
        "sides": sides, "libraries": _versions()}
    main = sides["vlmtrain (+ record's name and id)"]
    result["headline"] = {f"vlmtrain_{forms}_{k}": main[forms][k] for forms in corpora
                          for k in ("recall_all", "precision", "clinical_kept", "refused_share")}
    common.save("phi-quick" if quick else "phi", result, out)
    return result


def _seed(corpus: str) -> int:
    return CORPORA.get(corpus) or HOLDOUT.get(corpus) or NAMES_GEO[corpus][0]


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("scrubadub", "phonenumbers", "presidio-analyzer", "spacy", "philter-lite", "faker"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out

