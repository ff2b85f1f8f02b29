"""Protected health information (PHI) in report text: find it, replace it with category tags, or refuse the text.

    scrubber = PhiScrubber()
    result = scrubber.clean("Seen 03/14/2023 by Dr. Jane Roe, call 617-555-0123.", KnownIdentifiers(...))
    result.text    # "Seen [DATE] by Dr. [NAME], call [PHONE]."
    result.counts  # Counter({"DATE": 1, "NAME": 1, "PHONE": 1})

Three sources of detections, merged (overlaps become one span, tagged by the longest detection):

1. **scrubadub** (a maintained PII library that runs offline): e-mail addresses, phone numbers (Google's
   `phonenumbers` parser, so `(617) 555 0199` and `+44 20 7946 0958` are found but `5 mm` and `120/80` are not),
   URLs, US social security numbers, credit card numbers and username/password pairs. Its name detectors need
   NLTK corpora or spaCy/Stanford models that are downloaded at run time, so they are not used; Presidio's
   analyzer was not chosen for the same reason (its NER needs a downloaded spaCy model, and it pulls spaCy and
   tldextract, which fetches a suffix list over the network, for the few regexes that would be left).
2. **The record's own identifiers** (`KnownIdentifiers`): the patient's and staff names, the patient id,
   accession number and institution read from the DICOM header before de-identification and from the records
   file. Exact values the detectors below might miss are removed wherever they appear.
3. **Extra patterns** (`vlmtrain.privacy.phi_patterns`), for what scrubadub has no offline detector for, each
   written recall-first and so that clinical text stays intact (`tests/test_phi.py` lists both sides;
   `python -m bench phi` measures both on a generated corpus and on a held-out one in Faker's formats):
   - PHONE: the *shape* of a telephone number, valid or not (`(123) 555-0199`, `+1 617 555 0123`,
     `617.555.0123`, `555-0123`, `001-…x1234`, `+44 20 …`, trunk-zero `0248 966 3951`), anything number-shaped
     after a telephone label (phone, tel, cell, mobile, pager, fax, contact, call back, faxed to, reached … at),
     and what libphonenumber calls *possible* (not only *valid*);
   - DATE: numeric and month-name dates with a year in ≥10 forms (`03APR2016`, `22-SEP-83`, weekday prefixes,
     `the 14th of March`), and month/day without a year after a word that says a date follows (`Born 4/14`);
     `grade 2/4`, `pain 5/10`, `BP 120/80` and bare years stay;
   - AGE>89, ID (after ~60 record/account/plan/licence/device/vehicle labels; 6+ digit runs; codes mixing
     capitals and 4+ digits; SSN shapes; VINs), URL, IP (v4/v6, checked by `ipaddress`);
   - NAME: titles, labels (incl. `Family, Given`), `signed/read/… by`, `discussed/reviewed with`, relatives
     (`his daughter, Anna Roe`), a name before credentials (`, MD`/`, NP`), DICOM `FAMILY^GIVEN`, and with no cue
     at all `_dictionary_names`: pairs from name lists (Faker, the 1990 US Census in `names`, gender-guesser's
     given names) or of capitalised words no English dictionary holds (GCIDE in `english-words`);
   - ADDRESS: house number + street with a USPS suffix (+ unit, city, state, ZIP), `City, ST [ZIP]`, PO boxes,
     ZIP after a state or label, and US city names from GeoNames after `in`/`from`/`resides in`;
     LOCATION: named hospitals and clinics.
4. **What cannot be cleaned is refused** (`PhiUncleanable`): a known identifier that is still inside another
   token after replacement (`jsmith1234`), or a PHI label whose value no detector recognised (`DOB: the
   fourteenth of March`, `Name: john smith`) — the label says PHI follows, and its extent is unknown.

Guarantee and limit: every detection listed above is replaced; names that appear with no title, label,
relation, name pair or known value (a family name alone, `zork was seen`; a given name that is an English word
and in no list before a surname that is one too, `Juniper Underwood`) and invented towns with no state code are
not found — pattern-based scrubbing is
best-effort for free names, which is why the record's own names are passed in and why refusal exists.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files

from vlmtrain.privacy.phi_patterns import (PATTERNS, PLACE_SUFFIX, STATE_ANY, STATE_NAMES, TITLE, city_spans,
                                          phonenumbers_spans)

CATEGORIES = ("NAME", "DATE", "ID", "PHONE", "EMAIL", "URL", "IP", "ADDRESS", "ZIP", "LOCATION", "AGE>89")
TAG = {c: f"[{c}]" for c in CATEGORIES}
_TAG_RE = re.compile(r"\[(?:" + "|".join(re.escape(c) for c in CATEGORIES) + r")\]")

# scrubadub filth type → category
_SCRUBADUB = {"email": "EMAIL", "phone": "PHONE", "url": "URL", "social_security_number": "ID",
              "credit_card": "ID", "credential": "ID"}

# Values that DICOM test data and PACS exports put in name fields without naming anyone; removing them from
# reports would only damage text ("the patient").
_PLACEHOLDERS = {"patient", "name", "anonymous", "anonymized", "anonymised", "unknown", "none", "test", "na",
                 "n/a", "removed", "redacted", "mr", "mrs", "ms", "dr", "jr", "sr", "ii", "iii"}

# A PHI label whose value must have been replaced; `Name: none` and `Phone: n/a` are fine.
_LABELLED_PHI = re.compile(
    r"\b(?P<label>name|patient\s+name|pt\s+name|dob|d\.o\.b\.?|date\s+of\s+birth|birth\s*date|mrn|"
    r"medical\s+record\s+(?:number|no\.?)|ssn|social\s+security(?:\s+number)?|phone|tel(?:ephone)?|mobile|"
    r"cell(?:ular)?|pager|fax|contact(?:\s+(?:number|no\.?|#))?|emergency\s+contact|next\s+of\s+kin|"
    r"call(?:\s+back)?|e-?mail|address|addr\.?|home\s+address|mailing\s+address|zip(?:\s+code)?|"
    r"member\s+id|insurance\s+id|medicare\s+id|medicaid\s+(?:id|#)|account(?:\s+(?:number|no\.?))?|"
    r"acct\.?|licen[cs]e(?:\s+(?:number|no\.?))?|serial(?:\s+(?:number|no\.?))?|device\s+id|vin|plate)"
    r"\s*(?:[:#]\s*)+(?P<value>[^\n]*)", re.I)
_EMPTY_VALUES = re.compile(r"(?:none|n/?a|unknown|not\s+(?:provided|available|recorded|given)|withheld|redacted|"
                           r"-+)\b", re.I)
_TITLE_PREFIX = re.compile(rf"(?:{TITLE}\s*)")
# A state may stay (Safe Harbor removes only what is smaller), and so may the words that name a ZIP
_ADDRESS_LABELS = {"address", "addr", "addr.", "home address", "mailing address", "zip", "zip code"}
_ADDRESS_KEEP_PREFIX = re.compile(rf"^(?:{STATE_ANY}(?![\w])|(?i:zip(?:\s*\+\s*4)?(?:\s+code)?|postal\s+code)|"
                                  r"[\s,:#])+")


class PhiUncleanable(ValueError):
    """Text that cannot be cleaned with confidence. `detail` names what (never the PHI itself)."""

    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(detail)


@dataclass
class KnownIdentifiers:
    """Values known to identify this record's patient or staff (from the DICOM header before de-identification
    and from the records file). Names are person names in any form (`Smith^John`, `John Smith`)."""

    names: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    places: list[str] = field(default_factory=list)
    phones: list[str] = field(default_factory=list)

    def name_parts(self) -> list[tuple[str, ...]]:
        """Each name as its components (family, given, middle ...), placeholders and one-letter parts dropped."""
        out = []
        for n in self.names:
            parts = tuple(p for p in re.split(r"[\^,\s]+", n or "") if len(p.strip(".'-")) >= 2
                          and p.lower().strip(".") not in _PLACEHOLDERS)
            if parts:
                out.append(parts)
        return out


@dataclass
class CleanResult:
    """The cleaned text, the number of replacements per category, and the (start, end, category) spans of the
    input that were replaced."""

    text: str
    counts: Counter
    spans: list[tuple[int, int, str]] = field(default_factory=list)


# Faker's person providers for the languages most US patients' and staff's names come from, Latin script only
# (reports are written in it). Faker is maintained and ships its lists (US Census / SSA, national statistics
# offices) inside the package; names-dataset (730k first names, 983k last names) was tried and not chosen: a 55 MB
# wheel that takes several seconds and GBs of memory to load per process, and its lists hold most English words.
_NAME_LOCALES = ("en_US", "en_GB", "en_IE", "en_IN", "en_NG", "en_KE", "en_PK", "en_NZ", "en", "es_MX", "es_ES",
                 "es_CO", "es_AR", "pt_BR", "pt_PT", "fr_FR", "fr_CA", "de_DE", "it_IT", "nl_NL", "pl_PL", "vi_VN",
                 "yo_NG", "ig_NG", "ha_NG", "tw_GH", "sw", "zu_ZA", "tr_TR", "sv_SE", "no_NO", "da_DK", "fi_FI",
                 "ro_RO", "cs_CZ", "hu_HU", "ga_IE", "id_ID")
# Clinical eponyms that are also surnames or given names: a dictionary pair never starts with one ("Addison
# Disease"), nor ends with one before a clinical head noun ("Mark Wilson Disease"), so "Parkinson disease", "Bell
# palsy" and "Wilson disease" stay, while "Mark Wilson confirmed" is a name. Hand-written: no package lists
# medical eponyms.
EPONYMS = frozenset(w.lower() for w in (
    "Parkinson", "Bell", "Wilson", "Hodgkin", "Crohn", "Graves", "Addison", "Cushing", "Paget", "Barrett", "Colles",
    "Baker", "Foley", "Murphy", "Lyme", "Marfan", "Meckel", "Bankart", "Hill", "Sachs", "Jones", "Morton",
    "Schatzki", "Kerley", "Virchow", "Turner", "Alzheimer", "Hashimoto", "Ewing", "Wilms", "Swan", "Ganz",
    "Salter", "Harris", "Cooper", "Gerota", "Morrison", "Douglas", "Chiari", "Dandy", "Walker", "Osgood",
    "Schlatter", "Legg", "Calve", "Perthes", "Kienbock", "Hirschsprung", "Whipple", "Nissen", "Roux", "Tanner",
    "Gleason", "Fleischner", "Lisfranc", "Segond", "Down", "Klinefelter", "Charcot", "Raynaud", "Sjogren",
    "Kaposi", "Hamilton", "Glasgow", "Apgar", "Babinski", "Brown", "Sequard", "Guillain", "Barre", "Huntington",
    "Bartter", "Conn", "Horner", "Klatskin", "Krukenberg", "Mallory", "Weiss", "Monteggia", "Galeazzi", "Smith",
    "Bennett", "Rolando", "Boxer", "Maisonneuve", "Pott", "Tillaux", "Chance", "Jefferson", "Hangman", "Stener",
    "Baastrup", "Scheuermann", "Schmorl", "Bochdalek", "Morgagni", "Zenker", "Killian", "Boerhaave", "Budd",
    "Chiari", "Caroli", "Wolff", "Parkinson", "Tourette", "Bell", "Ménière", "Meniere", "Arnold", "Kawasaki",
    "Takayasu", "Wegener", "Still", "Reiter", "Behcet", "Gilbert", "Dubin", "Johnson", "Stevens", "Lou", "Gehrig",
    "Epstein", "Barr", "Fallot", "Ebstein", "Eisenmenger", "Kussmaul", "Cheyne", "Stokes", "Adams", "Trousseau",
    "Chvostek", "Homan", "Homans", "Kernig", "Brudzinski", "Lhermitte", "Romberg", "Trendelenburg", "Valsalva",
    "Mercedes", "Boston", "Bence", "Hurthle", "Reed", "Sternberg", "Langerhans", "Wernicke", "Korsakoff",
    "Broca", "Willis", "Sylvius", "Monro", "Luschka", "Magendie", "Galen", "Rathke", "Virchow", "Robin",
    "Pierre", "Treacher", "Collins", "Angelman", "Prader", "Willi", "Rett", "Noonan", "Edwards", "Patau"))


@lru_cache(maxsize=1)
def _name_lists() -> tuple[frozenset, frozenset]:
    """Lower-cased first and last names from Faker's person providers (`_NAME_LOCALES`) and first names from
    gender-guesser's `nam_dict.txt` (~46,000 given names of 50+ countries, Jörg Michael's list; its entries that are
    common English words, "Will", "The", are left out). Eponyms stay in: `_dictionary_names` decides on them."""
    first: set = {n for n in _gender_guesser_names() + _census("dist.female.first") + _census("dist.male.first")
                  if n.lower() not in _common_words()}
    last: set = set(_census("dist.all.last"))
    for loc in _NAME_LOCALES:
        try:
            prov = importlib.import_module(f"faker.providers.person.{loc}").Provider
        except ImportError:  # a locale a future Faker drops: the others still count
            continue
        for attr in ("first_names", "first_names_male", "first_names_female", "first_names_nonbinary"):
            first |= set(getattr(prov, attr, ()))
        last |= set(getattr(prov, "last_names", ()))

    def clean(names):
        folded = (_fold(n) for n in names)
        return frozenset(n for n in folded if len(n) >= 2 and n.isascii() and n.replace("-", "").
                         replace("'", "").isalpha())
    return clean(first), clean(last)


@lru_cache(maxsize=1)
def _surnames_and_eponyms() -> frozenset:
    return _name_lists()[1] | EPONYMS


def _fold(word: str) -> str:
    """Lower case without accents ("Inés" -> "ines"), the form the lists are looked up in."""
    return "".join(c for c in unicodedata.normalize("NFKD", word.lower()) if not unicodedata.combining(c))


def _census(filename: str) -> list[str]:
    """Names of the 1990 US Census lists shipped in the `names` package (0.3.0): 88,799 surnames, 5,163 given
    names, one per line, the name first."""
    return [line.split(None, 1)[0] for line in files("names").joinpath(filename).read_text().splitlines()
            if line.strip()]


def _gender_guesser_names() -> list[str]:
    """Given names in gender-guesser 0.4.0's `nam_dict.txt`: a fixed-width table whose name field is columns
    3-29 (`+` joins the parts of a compound name: `Mei+Lin`). Read directly: the package's Detector builds a
    per-country table for each lookup, far more than a membership test needs."""
    text = files("gender_guesser").joinpath("data", "nam_dict.txt").read_text(encoding="iso-8859-1")
    out = []
    for line in text.splitlines():
        if line.startswith("#") or len(line) < 30 or line[0] not in "MF?=1":
            continue
        out.append(line[3:29].strip().replace("+", "-"))
    return out


@lru_cache(maxsize=1)
def _english_words() -> frozenset:
    """Lower-cased words of the GNU Collaborative International Dictionary of English (`english-words`' gcide
    list, ~114,000 words). A capitalised word in it ("Physical", "Therapy", "Wound") is no evidence of a name; one
    outside it and outside the name lists ("Oluwaseun", "Przybylski") is."""
    from english_words import get_english_words_set  # optional: the privacy extra installs it

    return frozenset(get_english_words_set(["gcide"], alpha=True, lower=True))


@lru_cache(maxsize=1)
def _common_words() -> frozenset:
    """Common English words (Faker's en_US lorem list, ~1,000 words): a given name that is also one ("Will",
    "Hope", "Case") needs its family name in the lists too."""
    from faker.providers.lorem.en_US import Provider

    return frozenset(w.lower() for w in Provider.word_list)


# Words that make the capitalised word before them a disease, sign or structure: "Wilson Disease", "Bell Palsy"
_CLINICAL_HEAD = re.compile(
    r"[ \t]*(?i:disease|syndrome|palsy|sign|fracture|lesion|lymphoma|sarcoma|tumou?r|cyst|catheter|ring|node|"
    r"pouch|procedure|classification|score|scale|criteria|malformation|variant|injury|esophagus|thyroiditis|"
    r"neuroma|ligament|fascia|disorder|phenomenon|reflex|test|maneuver|manoeuvre|triad|lines?|stage|grade|"
    r"type|operation|repair|fundoplication|diverticulum|guidelines|anomaly|deformity|ulcer|canal|duct|gland|"
    r"body|bodies|cell|cells|nodes|protein|criterion|fistula|hernia|aneurysm|dementia|encephalopathy)\b")


def _is_family(word: str, last: frozenset) -> bool:
    """A family name in the lists, or a capitalised word no list knows that is not a common word or a state
    ("Castellanos", "Kaczmarek": most surnames are in no list)."""
    w = word.lower()
    return w in last or (w not in _common_words() and word.title() not in STATE_NAMES and len(w.strip("-'")) >= 3
                         and not _CLINICAL_HEAD.fullmatch(word))


# Letters of the Latin alphabets names are written in (Latin-1 and Extended-A: Inés, Wiśniewska, Ó Briain)
_UP, _LO = "A-ZÀ-ÖØ-ÞĀ-ſ", "a-zß-öø-ÿĀ-ſ"
_WORD = (rf"(?:Mc|Mac|O['’]|Ó[ \t]+)?[{_UP}](?:[{_LO}]+|[{_UP}]+)(?:[{_UP}][{_LO}]+)?"
         rf"(?:-(?:Mc|Mac|O['’])?[{_UP}{_LO}](?:[{_LO}]+|[{_UP}]+)(?:[{_UP}][{_LO}]+)?)?")
_INITIAL = r"[A-Z]\."
_PAIR = re.compile(rf"(?<![\w'’-])(?=({_WORD})\s+(?:{_INITIAL}\s+)?({_WORD})(?![\w]))")
_REVERSED_PAIR = re.compile(rf"\b(?=({_WORD}),\s*({_WORD})\b)")


# Clinical and English derivational word endings that GCIDE (a dictionary of 1913 and later additions) lacks
# words with ("Radiology", "Interventional", "Orthopedics", "Electronically"): only a word in no name list is
# tested, and names that end so ("Kelly", "Olive") are in the lists. Hand-written: no package lists medical
# vocabulary offline.
_CLINICAL_SUFFIX = re.compile(r"(?i).*(?:ology|ologic|ologist|ional|ation|ical|ics|iatry|iatric|itis|osis|ectomy|"
                              r"otomy|oscopy|ography|pathy|emia|plasty|ogram|ism|ment|ness|ility|ive|ous|ally|"
                              r"ically|ingly|edly)")


def _in_dictionary(w: str) -> bool:
    """`w` (lower case) or its stem is an English word: GCIDE lists headwords, not "results", "findings",
    "studies", "noted"."""
    words = _english_words()
    stems = {w, w[:-1] if w.endswith("s") else w, w[:-2] if w.endswith(("es", "ed")) else w,
             w[:-3] + "y" if w.endswith("ies") else w, w[:-1] if w.endswith("ed") else w,
             w[:-3] if w.endswith("ing") else w, w[:-3] + "e" if w.endswith("ing") else w}
    return any(x in words for x in stems)


def _unlisted_word(word: str, names: frozenset) -> bool:
    """A word that reads as a name part: in `names`, or in no English dictionary, common-word list, state or
    clinical-head list and without a clinical ending ("Oluwaseun", "Przybylski"). A double-barrelled word
    ("Haddadi-Baker") is one when any of its parts is."""
    parts = [p for p in re.split(r"[-\s]+", word) if p.strip("'’")]
    if len(parts) > 1:
        return any(_unlisted_word(p, names) for p in parts)
    w = _fold(word)
    if w in names:
        return True
    return (len(w.strip("-'’")) >= 2 and not _in_dictionary(w) and w not in _common_words()
            and word.title() not in STATE_NAMES and not _CLINICAL_HEAD.fullmatch(word)
            and not _CLINICAL_SUFFIX.fullmatch(w))


def _plain_word(word: str) -> bool:
    """A capitalised word that may be a given name: not a common word, eponym, state, clinical head or word with a
    clinical ending."""
    w = _fold(word)
    return (len(w) >= 2 and w not in _common_words() and w not in EPONYMS and word.title() not in STATE_NAMES
            and not _CLINICAL_HEAD.fullmatch(word) and not _CLINICAL_SUFFIX.fullmatch(w))


def _plain_family(word: str) -> bool:
    """A family name for a pair whose given name is an English word: in no dictionary (a listed surname that is a
    word, "Care", "Scale", would make "Wound Care reports" a person) and not an eponym (nor a part of a
    double-barrelled one: "Hill-Sachs", "Swan-Ganz")."""
    parts = [_fold(p) for p in word.split("-")]
    return not any(p in EPONYMS for p in parts) and _unlisted_word(word, frozenset())


# Where a person, not a disease or device, stands (general English syntax, not the corpora's frames): before a
# verb of reporting, agreeing or acting, an auxiliary, a possessive or "and"; after a preposition or verb that
# takes a person ("explained to", "by", "with", "for", "per", "from").
_SUBJECT_AFTER = re.compile(
    r"(?:['’]s\b|[ \t]+(?:and|was|is|has|had|will|would|can|could|should|may|might|did|does|do|were|are|"
    r"presents|presented|reports|reported|states|stated|denies|denied|agrees|agreed|confirmed|confirms|notes|"
    r"noted|requests|requested|asks|asked|feels|felt|declined|declines|prefers|preferred|underwent|returned|"
    r"returns|arrived|tolerated|called|reviewed|saw|signed|says|said|understands|consented|wishes|wants|"
    r"complains|describes|endorses|verbalized|verbalizes|received|remains|continues|lives|works)\b)")
_OBJECT_BEFORE = re.compile(r"\b(?i:by|to|with|for|per|from|and|or)[ \t]+$")


def _person_slot(text: str, start: int, end: int) -> bool:
    return bool(_SUBJECT_AFTER.match(text, end) or _OBJECT_BEFORE.search(text, max(0, start - 12), start))


def _dictionary_names(text: str) -> list[tuple[int, int]]:
    """`Given [M.] Family` where the given name is in the lists and the family name is too, or is a capitalised
    word no list knows (`_is_family`); `Given [M.] Family` where neither is in the lists but both read as name
    parts and neither as an English word (`_unlisted_word`: "Oluwaseun Oyelowo"); a given name that is an English
    word before such a family name where a person stands (`_person_slot`: "Juniper Okafor agrees"); `Family,
    Given` where both are in the lists (same case style). A pair never starts with an eponym, never ends in one
    before a clinical head noun ("Lionel Wilson Disease" is a disease), and is never a state or, unless the lists
    say so, a town ("Millbrook Falls")."""
    first, last = _name_lists()
    spans = []
    for m in _PAIR.finditer(text):
        a, b = m.group(1), m.group(2)
        if a.isupper() != b.isupper() or a.lower() in EPONYMS:
            continue
        if b.lower() in EPONYMS and _CLINICAL_HEAD.match(text, m.end(2)):
            continue
        if f"{a} {b}".title() in STATE_NAMES or b.title() in STATE_NAMES:  # "NORTH CAROLINA": a state
            continue
        if _fold(a) in first and (_fold(b) in last or (a.lower() not in _common_words() and _is_family(b, last))):
            spans.append((m.start(1), m.end(2)))
        elif PLACE_SUFFIX.fullmatch(b):  # "Millbrook Falls", "Cedar Hollow": a town, found as one
            continue
        elif not a.isupper() and _unlisted_word(a, first) and _unlisted_word(b, _surnames_and_eponyms()):
            # an eponym after a given name with no clinical head noun after it is a surname ("Sipho Colles")
            spans.append((m.start(1), m.end(2)))
        elif _plain_word(a) and _plain_family(b) and _person_slot(text, m.start(1), m.end(2)):
            # a given name that is also an English word and in no list ("Juniper", "Jarrah") before a family
            # name, where a person stands: "Juniper Okafor agrees", "explained to Jarrah Murphy"
            spans.append((m.start(1), m.end(2)))
    for m in _REVERSED_PAIR.finditer(text):
        a, b = m.group(1), m.group(2)
        if a.lower() in last and b.lower() in first and a.isupper() == b.isupper():
            spans.append((m.start(1), m.end(2)))
    return spans


# Safe Harbor (45 CFR 164.514(b)(2)(i)(B)): the first three digits of a ZIP code may stay where the area they
# name holds more than 20,000 people; HHS lists the 3-digit areas that hold fewer (2000 Census), which become 000.
# Hand-written: the list is a fixed table in the HHS de-identification guidance, in no package.
RESTRICTED_ZIP3 = frozenset(("036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831",
                             "878", "879", "884", "890", "893"))


def zip3_allowed(zip3: str) -> bool:
    """Whether the 3-digit ZIP area `zip3` may be kept (more than 20,000 people; 000 never names an area)."""
    return len(zip3) == 3 and zip3.isdigit() and zip3 != "000" and zip3 not in RESTRICTED_ZIP3


def _flex(value: str) -> str:
    """A literal value as a regex that tolerates any run of spaces/commas/carets between its words."""
    words = [re.escape(w) for w in re.split(r"[\s,^]+", value.strip()) if w]
    return r"[\s,^]+".join(words)


def _known_regexes(known: KnownIdentifiers) -> list[tuple[str, re.Pattern]]:
    out: list[tuple[str, re.Pattern]] = []
    for parts in known.name_parts():
        # Full forms first (longest spans), then each component on its own. Components of 4+ letters match in
        # any case; shorter ones only as written, so "Al" does not eat "et al".
        full = [" ".join(parts), " ".join(parts[1:] + parts[:1])]
        for f in full:
            out.append(("NAME", re.compile(rf"(?<![A-Za-z]){_flex(f)}(?![A-Za-z])", re.I)))
        for p in parts:
            flags = re.I if len(p) >= 4 else 0
            alts = {p, p.title(), p.upper()} if len(p) < 4 else {p}
            alt = "|".join(re.escape(a) for a in sorted(alts))
            out.append(("NAME", re.compile(rf"(?<![A-Za-z])(?:{alt})(?![A-Za-z])", flags)))
    for category, values in (("ID", known.ids), ("PHONE", known.phones)):
        for v in values:
            v = (v or "").strip()
            if len(v) >= 3 and v.lower() not in _PLACEHOLDERS:
                out.append((category, re.compile(rf"(?<![A-Za-z0-9]){re.escape(v)}(?![A-Za-z0-9])", re.I)))
    for v in known.places:
        v = (v or "").strip()
        if len(v) >= 4 and v.lower() not in _PLACEHOLDERS:
            out.append(("LOCATION", re.compile(rf"(?<![A-Za-z0-9]){_flex(v)}(?![A-Za-z0-9])", re.I)))
    return out


def _alnum(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


class PhiScrubber:
    """Finds PHI spans and replaces them with `[CATEGORY]` tags; see the module docstring for what and why."""

    def __init__(self, reject_unparsed_labels: bool = True, locale: str = "en_US", keep_zip3: bool = False):
        import scrubadub
        import scrubadub.detectors as det
        from scrubadub.detectors.catalogue import detector_catalogue

        self.reject_unparsed_labels = reject_unparsed_labels
        self.keep_zip3 = keep_zip3
        detectors = [det.EmailDetector, det.PhoneDetector, det.UrlDetector, det.CreditCardDetector,
                     det.CredentialDetector, detector_catalogue.get_all()["social_security_number"]]
        self._scrubber = scrubadub.Scrubber(detector_list=detectors, locale=locale)

    # ---- detection -------------------------------------------------------------------------------------------

    def spans(self, text: str, known: KnownIdentifiers | None = None) -> list[tuple[int, int, str]]:
        """Merged, non-overlapping (start, end, category) spans of PHI in `text`, in order."""
        found: list[tuple[int, int, str]] = []
        for f in self._scrubber.iter_filth(text):
            # MergedFilth (overlapping detections) carries the types of its parts
            types = [x.type for x in getattr(f, "filths", [f])]
            cat = next((_SCRUBADUB[t] for t in types if t in _SCRUBADUB), None)
            if cat == "EMAIL" and "@" not in f.text and not re.search(r"\bdot\b", f.text, re.I):
                # scrubadub also reads spelled-out addresses ("jo at host dot org"); without "dot" its "at"
                # form fires on plain prose ("seen at St. Mary's"), so only the full spelled-out form counts.
                continue
            if cat is not None:
                found.append((f.beg, f.end, cat))
        for p in PATTERNS:
            for m in p.regex.finditer(text):
                s, e = (m.span("v") if "v" in p.regex.groupindex and m.group("v") is not None else m.span())
                if e > s and (p.check is None or p.check(text[s:e])):
                    found.append((s, e, p.category))
        found += [(s, e, "NAME") for s, e in _dictionary_names(text)]
        found += [(s, e, "PHONE") for s, e in phonenumbers_spans(text)]
        found += [(s, e, "ADDRESS") for s, e in city_spans(text)]
        if known is not None:
            for cat, rx in _known_regexes(known):
                found += [(m.start(), m.end(), cat) for m in rx.finditer(text) if m.end() > m.start()]
        return _merge(found)

    # ---- cleaning --------------------------------------------------------------------------------------------

    def clean(self, text: str, known: KnownIdentifiers | None = None) -> CleanResult:
        """Replace every detected span by its tag; raise PhiUncleanable when PHI is known to remain."""
        spans = self.spans(text, known)
        out, pos, counts = [], 0, Counter()
        for s, e, cat in spans:
            out.append(text[pos:s])
            out.append(self._replacement(text[s:e], cat))
            counts[cat] += 1
            pos = e
        out.append(text[pos:])
        cleaned = "".join(out)
        self._check_residual(cleaned, known)
        return CleanResult(cleaned, counts, spans)

    def _replacement(self, value: str, cat: str) -> str:
        """The tag, or for a ZIP code standing alone under `keep_zip3` its first three digits (`021**`) when
        Safe Harbor allows them (`zip3_allowed`)."""
        if cat == "ZIP" and self.keep_zip3:
            digits = re.sub(r"\D", "", value)
            if len(digits) in (5, 9) and zip3_allowed(digits[:3]):
                return digits[:3] + "**"
        return TAG[cat]

    def _check_residual(self, cleaned: str, known: KnownIdentifiers | None) -> None:
        bare = _TAG_RE.sub(" ", cleaned)
        if known is not None:
            tokens = [_alnum(t) for t in re.findall(r"\S+", bare)]
            # An identifier glued into another token (`acc12345678x`, `jsmith`) escapes word-bounded matching.
            for v in [*known.ids, *known.phones]:
                nv = _alnum(v or "")
                if len(nv) >= 4 and any(c.isdigit() for c in nv) and any(nv in t for t in tokens):
                    raise PhiUncleanable("a record identifier remains inside another word")
            for parts in known.name_parts():
                if len(parts) < 2:
                    continue
                fam, giv = _alnum(parts[0]), _alnum(parts[1])
                for glued in (giv + fam, fam + giv, giv[:1] + fam, fam + giv[:1]):
                    if len(glued) >= 5 and any(glued in t for t in tokens):
                        raise PhiUncleanable("a patient or staff name remains inside another word")
        if self.reject_unparsed_labels:
            for m in _LABELLED_PHI.finditer(cleaned):
                value = _TITLE_PREFIX.sub("", m.group("value").strip(), count=1).strip()
                label = re.sub(r"\s+", " ", m.group("label").lower())
                if label in _ADDRESS_LABELS:
                    value = _ADDRESS_KEEP_PREFIX.sub("", value)
                if not value or value.startswith("[") or _EMPTY_VALUES.match(value):
                    continue
                raise PhiUncleanable(f"the value after the label '{label}' was not recognised as PHI it could "
                                     "replace")


def _merge(found: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Union overlapping spans; a merged span takes the category of its longest part (ties: CATEGORIES order),
    so a date inside an address stays part of the address."""
    order = {c: i for i, c in enumerate(CATEGORIES)}
    merged: list[tuple[int, int, str, int]] = []  # start, end, category, length of the category's span
    for s, e, c in sorted(found, key=lambda x: (x[0], -x[1])):
        if merged and s < merged[-1][1]:
            ms, me, mc, ml = merged[-1]
            best = (c, e - s) if (e - s, -order[c]) > (ml, -order[mc]) else (mc, ml)
            merged[-1] = (ms, max(me, e), best[0], best[1])
        else:
            merged.append((s, e, c, e - s))
    return [(s, e, c) for s, e, c, _ in merged]
