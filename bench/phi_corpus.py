"""A labelled PHI corpus made by code: radiology / clinical reports with every HIPAA Safe Harbor identifier type
planted in varied surface forms, next to clinical text that is *not* PHI (eponyms, capitalised terms,
measurements, vertebral levels, scores).

    records = make_corpus(n=1200, seed=15)
    r = records[0]
    r.text                      # the report
    r.phi                       # [(start, end, type)], character spans of every identifier
    r.clinical                  # [(start, end)], spans of clinical terms that must survive cleaning
    r.patient_name, r.patient_id  # what records.jsonl would carry for this record

Written before (and independently of) the detectors it measures: the surface forms come from how identifiers
are written in reports, requisitions and letters, not from any detector's patterns. Names are drawn from Faker's
*non-US* locales plus a hand list of surnames, so that the US census lists a detector may use are not the
source; numbers are random, valid or not (a Safe Harbor identifier is one whether or not it is assigned).
All people are invented. Types (what `r.phi` labels): see TYPES.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field

TYPES = ("NAME", "DATE", "AGE", "PHONE", "FAX", "EMAIL", "URL", "IP", "SSN", "MRN", "ACCESSION", "ACCOUNT",
         "HEALTH_PLAN", "LICENSE", "DEVICE", "VEHICLE", "ADDRESS", "CITY", "ZIP")
# Structured types (the goal: recall 1.0); NAME, ADDRESS and CITY are free text (goal 0.98).
STRUCTURED = tuple(t for t in TYPES if t not in ("NAME", "ADDRESS", "CITY"))

_LOCALES = ("en_GB", "en_IE", "en_AU", "en_IN", "de_DE", "fr_FR", "es_ES", "es_MX", "it_IT", "nl_NL", "pl_PL",
            "pt_BR", "sv_SE", "tr_TR", "vi_VN", "fil_PH", "en_NZ", "da_DK")
_EXTRA_SURNAMES = ("Okonkwo", "Adeyemi", "Raman", "Krishnamurthy", "Haddad", "Nakamura", "Ishikawa", "Oyelaran",
                   "Szymanski", "Abernathy", "Whitcombe", "Featherstone", "Lindqvist", "Mwangi", "Chukwu",
                   "Delacroix", "Vasquez-Ortega", "O'Sullivan", "McAllister", "Zorbaugh", "Quispe", "Tanaka",
                   "Nwosu", "Petrakis", "Yilmaz", "Bergstrom", "Achterberg", "Kowalczyk", "Sokolova", "Mbeki")
_EXTRA_GIVEN = ("Priya", "Oluwaseun", "Chidi", "Haruto", "Siobhan", "Ingrid", "Tomasz", "Mehmet", "Anjali",
                "Kwame", "Ximena", "Bronwyn", "Rafferty", "Solveig", "Thandiwe", "Aurelio", "Nkechi", "Yusuf")

_CITIES = (("Salem", "MA"), ("Worcester", "MA"), ("Framingham", "MA"), ("Springfield", "IL"), ("Dayton", "OH"),
           ("Tacoma", "WA"), ("Boise", "ID"), ("Macon", "GA"), ("Fresno", "CA"), ("Lowell", "MA"),
           ("Burlington", "VT"), ("Albany", "NY"), ("Erie", "PA"), ("Peoria", "IL"), ("Eugene", "OR"),
           ("Bangor", "ME"), ("Nashua", "NH"), ("Toledo", "OH"), ("Reno", "NV"), ("Duluth", "MN"),
           ("New Bedford", "MA"), ("Cedar Rapids", "IA"), ("Fort Collins", "CO"), ("Santa Rosa", "CA"),
           ("Ann Arbor", "MI"), ("Baton Rouge", "LA"), ("Sioux Falls", "SD"), ("Grand Junction", "CO"))
_STREETS = ("Juniper", "Maple", "Harbor View", "Old Mill", "Chestnut Hill", "Kingsley", "Magnolia", "Riverside",
            "Prospect", "Sycamore", "Lakeshore", "Quarry", "Orchard", "Wexford", "Beacon", "Cranberry", "Fairmont",
            "Larkspur", "Hawthorne", "Pinecrest", "Main", "Elm", "Washington", "Highland")
_SUFFIXES = ("Street", "St.", "St", "Avenue", "Ave", "Ave.", "Road", "Rd", "Lane", "Ln", "Drive", "Dr.", "Court",
             "Way", "Place", "Terrace", "Boulevard", "Blvd", "Circle", "Parkway", "Trail", "Pike", "Row")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_DOMAINS = ("example.org", "mail.example.com", "example.net", "clinic-example.org", "uhs.example.edu")

# Clinical text that must come through: eponyms and capitalised terms that look like names or places, scores,
# levels and measurements that look like numbers.
CLINICAL_TERMS = (
    "Crohn disease", "Hodgkin lymphoma", "Graves disease", "Baker cyst", "Parkinson disease", "Wilms tumor",
    "Alzheimer disease", "Bell palsy", "Barrett esophagus", "Addison disease", "Cushing syndrome", "Paget disease",
    "Hashimoto thyroiditis", "Meckel diverticulum", "Schatzki ring", "Zenker diverticulum", "Morton neuroma",
    "Colles fracture", "Salter-Harris II fracture", "Kerley B lines", "Virchow node", "Chiari I malformation",
    "Ewing sarcoma", "Kaposi sarcoma", "Bankart lesion", "Hill-Sachs defect", "Osgood-Schlatter disease",
    "Wilson disease", "Turner syndrome", "Marfan syndrome", "Down syndrome", "Hunter syndrome", "Lyme disease",
    "Klatskin tumor", "Whipple procedure", "Nissen fundoplication", "Roux-en-Y anastomosis", "Morison pouch",
    "Monteggia fracture", "Jones fracture", "Boerhaave syndrome", "Mallory-Weiss tear", "Budd-Chiari syndrome",
    "Fleischner criteria", "Bosniak IIF cyst", "Bosniak 3", "the MCA territory", "the left MCA", "the ACA", "the LAD",
    "the RCA", "the SVC", "the IVC", "the CBD", "L4-L5", "L5-S1", "C5-6", "C6-C7", "T12", "BI-RADS 4",
    "TI-RADS 3", "LI-RADS 5", "Lung-RADS 2", "PI-RADS 4", "BP 120/80", "BP 138/86 mmHg", "HR 72",
    "3.2 x 1.1 cm", "1.5 x 2.0 x 3.2 cm", "5 mm", "12 mm", "10-15 mm", "SUVmax 4.2", "EF 55%",
    "Gleason 3+4=7", "grade 2/4", "pain 5/10", "40-60 HU", "Stage IIIA", "ASA class II", "Series 3, image 45",
    "T2-weighted", "FLAIR", "DWI", "GCS 15", "the Ranson criteria", "Child-Pugh B", "NIHSS 4",
    "Glasgow Coma Scale", "Doppler", "Foley catheter", "Swan-Ganz catheter", "Hickman line", "Port-A-Cath",
    "Gleason 4+4=8", "Milan criteria", "Cobb angle 24 degrees", "Schmorl node", "Tanner stage 3",
)
_FINDINGS = (
    "The lungs are clear without focal consolidation.", "No pleural effusion or pneumothorax.",
    "Heart size is normal.", "There is mild degenerative change of the spine.", "No acute intracranial hemorrhage.",
    "Gray-white matter differentiation is preserved.", "The liver is mildly enlarged with diffuse steatosis.",
    "No free fluid in the pelvis.", "The kidneys are normal in size without hydronephrosis.",
    "Post-surgical changes are noted.", "Atherosclerotic calcification of the aorta.",
    "No suspicious osseous lesion.", "Mild bibasilar atelectasis.", "The appendix is normal.",
    "Small hiatal hernia.", "The gallbladder is distended without wall thickening.",
    "No acute fracture or dislocation.", "Soft tissues are unremarkable.", "Unchanged since the prior study.",
    "Impression: no acute cardiopulmonary process.", "Follow-up imaging in 6 months is suggested.",
    "Right lower lobe opacity may represent pneumonia.", "Left ventricular function is preserved.",
)
# Sentences that carry a clinical term; {t} is the term.
_CLINICAL_FRAMES = (
    "History of {t}.", "Findings are consistent with {t}.", "Known {t}, stable.", "No evidence of {t}.",
    "Compared with prior imaging, {t} is unchanged.", "Clinical question: {t}?", "Measurements: {t}.",
    "Assessment: {t}.", "Previously noted {t}.", "Consider {t} in the differential.",
)


@dataclass
class Record:
    """One labelled report. Spans index `text`."""

    id: str
    text: str = ""
    phi: list[tuple[int, int, str]] = field(default_factory=list)
    clinical: list[tuple[int, int]] = field(default_factory=list)
    patient_name: str = ""
    patient_id: str = ""


class _Builder:
    """Appends text pieces and remembers the spans of labelled ones."""

    def __init__(self, rec: Record):
        self.rec, self.parts, self.pos = rec, [], 0

    def add(self, s: str, label: str | None = None, clinical: bool = False) -> None:
        if label:
            self.rec.phi.append((self.pos, self.pos + len(s), label))
        if clinical:
            self.rec.clinical.append((self.pos, self.pos + len(s)))
        self.parts.append(s)
        self.pos += len(s)

    def seq(self, *items) -> None:
        """items: str (plain) or (str, label) or (str, None, True) for a clinical term."""
        for it in items:
            if isinstance(it, str):
                self.add(it)
            else:
                self.add(*it)

    def done(self) -> None:
        self.rec.text = "".join(self.parts)


class CorpusGenerator:
    """`forms="own"`: the surface forms written here. `forms="faker"`: the same report frames, but telephone
    numbers, street addresses, SSNs, IPs, URLs, e-mails, plates, VINs and people come from Faker's en_US
    providers, whose formats nobody on this project wrote (a held-out check on the detectors' forms)."""

    def __init__(self, seed: int, forms: str = "own"):
        from faker import Faker

        if forms not in ("own", "faker"):
            raise ValueError(f"forms: expected own or faker, got {forms!r}")
        self.forms = forms
        self.us = Faker("en_US")
        self.us.seed_instance(seed)
        self.r = random.Random(seed)
        self.fakers = []
        for i, loc in enumerate(_LOCALES):
            f = Faker(loc)
            f.seed_instance(seed * 1000 + i)
            self.fakers.append(f)

    # ---- people ----

    def _ascii(self, s: str) -> str:
        import unicodedata

        s = unicodedata.normalize("NFKD", s.translate(_TRANSLIT))
        return "".join(c for c in s if c.isascii() and (c.isalpha() or c in "'- ")).strip() or "Moreau"

    def person(self) -> tuple[str, str]:
        r = self.r
        if self.forms == "faker":
            return self.us.first_name(), self.us.last_name()
        if r.random() < 0.25:
            return r.choice(_EXTRA_GIVEN), r.choice(_EXTRA_SURNAMES)
        f = r.choice(self.fakers)
        given = self._ascii(f.first_name())
        # "van der Berg", "de la Cruz": the capitalised part is the surname a report would use
        caps = [w for w in f.last_name().split() if w[:1].isupper()]
        family = self._ascii(caps[-1] if caps else "Moreau")
        return given, family

    def name_form(self, given: str, family: str) -> str:
        r, mid = self.r, self.r.choice(string.ascii_uppercase)
        forms = [f"{given} {family}", f"{given} {mid}. {family}", f"{family}, {given}", f"{family.upper()}, "
                 f"{given.upper()}", f"{given.upper()} {family.upper()}", f"{given[0]}. {family}",
                 f"{family.upper()}^{given.upper()}", f"{family}, {given} {mid}.", f"{given} {family}"]
        return r.choice(forms)

    # ---- identifiers ----

    def digits(self, n: int) -> str:
        return "".join(self.r.choice(string.digits) for _ in range(n))

    def letters(self, n: int) -> str:
        return "".join(self.r.choice(string.ascii_uppercase) for _ in range(n))

    def date(self, with_year: bool = True) -> str:
        r = self.r
        y, m, d = r.randint(1925, 2025), r.randint(1, 12), r.randint(1, 28)
        mon, wd = _MONTHS[m - 1], r.choice(_WEEKDAYS)
        forms = [f"{m:02d}/{d:02d}/{y}", f"{m}/{d}/{y % 100:02d}", f"{y}-{m:02d}-{d:02d}", f"{d:02d}.{m:02d}.{y}",
                 f"{mon} {d}, {y}", f"{mon[:3]} {d} {y}", f"{d} {mon} {y}", f"{d:02d}-{mon[:3]}-{y}",
                 f"{d:02d}{mon[:3].upper()}{y}", f"{y}{m:02d}{d:02d}", f"{mon} {d}{_th(d)}",
                 f"the {d}{_th(d)} of {mon}", f"{m}/{d}", f"{mon[:3]}. {y}", f"{m:02d}-{d:02d}-{y}",
                 f"{y}/{m:02d}/{d:02d}", f"{wd}, {mon} {d}, {y}", f"{d}/{m}/{y}", f"{mon} {y}",
                 f"{d}-{mon[:3].upper()}-{y % 100:02d}"]
        if not with_year:
            forms = [f for f in forms if str(y) not in f]
        return r.choice(forms)

    def age(self) -> tuple[str, str]:
        """(text before, age phrase labelled AGE). Ages over 89 only."""
        a = self.r.randint(90, 104)
        return self.r.choice([("A ", f"{a}-year-old"), ("", f"{a} yo"), ("Patient is ", f"{a} years old"),
                              ("Age: ", f"{a}"), ("", f"{a} y/o"), ("Aged ", f"{a}"), ("", f"{a}yo"),
                              ("This ", f"{a} year old"), ("", f"{a}-yr-old"), ("Age ", f"{a}y")])

    def phone(self, international_ok: bool = True) -> str:
        r = self.r
        if self.forms == "faker":
            return self.us.phone_number()
        npa = r.choice([f"{r.randint(2, 9)}{self.digits(2)}", "555", "800", "123", "617", "212", "011",
                        f"{r.randint(2, 9)}{self.digits(2)}"])
        nxx, line = r.choice([f"{r.randint(2, 9)}{self.digits(2)}", "555", "123", self.digits(3)]), self.digits(4)
        forms = [f"({npa}) {nxx}-{line}", f"{npa}-{nxx}-{line}", f"{npa}.{nxx}.{line}", f"{npa} {nxx} {line}",
                 f"+1 {npa} {nxx} {line}", f"+1-{npa}-{nxx}-{line}", f"1-{npa}-{nxx}-{line}", f"{npa}{nxx}{line}",
                 f"({npa}){nxx}-{line}", f"{npa}-{nxx}-{line} ext. {self.digits(r.randint(2, 5))}",
                 f"{npa}-{nxx}-{line} x{self.digits(4)}", f"+1 ({npa}) {nxx}-{line}", f"{nxx}-{line}",
                 f"1 ({npa}) {nxx} {line}"]
        if international_ok:
            forms += [f"+44 20 {self.digits(4)} {self.digits(4)}", f"+44 7{self.digits(3)} {self.digits(6)}",
                      f"+33 1 {self.digits(2)} {self.digits(2)} {self.digits(2)} {self.digits(2)}",
                      f"+49 30 {self.digits(8)}", f"+61 2 {self.digits(4)} {self.digits(4)}",
                      f"+91 {self.digits(5)} {self.digits(5)}", f"0{self.digits(3)} {self.digits(3)} "
                                                                 f"{self.digits(4)}"]
        return r.choice(forms)

    def email(self, given: str, family: str) -> str:
        r = self.r
        if self.forms == "faker":
            return self.us.email()
        local = r.choice([f"{given}.{family}", f"{given[0]}{family}", f"{family}{self.digits(2)}",
                          f"{given}_{family[0]}", f"{given}{r.randint(1, 99)}"]).lower().replace("'", "")
        return f"{local}@{r.choice(_DOMAINS)}"

    def url(self) -> str:
        r = self.r
        if self.forms == "faker":
            return r.choice([self.us.uri(), self.us.url()])
        host = r.choice(["portal.example-health.org", "www.example-clinic.org", "mychart.example.edu",
                         "results.example.net", "images.example.com"])
        return r.choice([f"https://{host}/patient/{self.digits(7)}", f"http://{host}/viewer?study={self.digits(9)}",
                         f"www.example-clinic.org/p/{self.letters(3).lower()}{self.digits(5)}",
                         f"https://{host}/u/{self.letters(2).lower()}{self.digits(4)}", f"https://{host}"])

    def ip(self) -> str:
        r = self.r
        if self.forms == "faker":
            return r.choice([self.us.ipv4_public(), self.us.ipv4_private(), self.us.ipv6()])
        if r.random() < 0.15:
            return "fe80::" + ":".join(f"{r.randint(0, 65535):x}" for _ in range(3))
        return ".".join(str(r.randint(1, 254)) for _ in range(4))

    def ssn(self) -> str:
        if self.forms == "faker":
            return self.us.ssn()
        a, b, c = self.digits(3), self.digits(2), self.digits(4)
        return self.r.choice([f"{a}-{b}-{c}", f"{a} {b} {c}", f"{a}{b}{c}", f"{a}-{b}-{c}"])

    def mrn(self) -> str:
        r = self.r
        return r.choice([self.digits(r.randint(6, 10)), f"{self.letters(1)}{self.digits(7)}",
                         f"{self.digits(3)}-{self.digits(3)}-{self.digits(2)}", f"00{self.digits(6)}",
                         f"{self.letters(2)}-{self.digits(6)}", f"{self.digits(4)}-{self.digits(3)}"])

    def accession(self) -> str:
        r = self.r
        return r.choice([f"RAD-{r.randint(2015, 2025)}-{self.digits(6)}", f"{self.digits(2)}CT{self.digits(6)}",
                         self.digits(r.randint(5, 9)), f"A{self.digits(7)}", f"XR{self.digits(8)}",
                         f"{self.letters(3)}{self.digits(5)}"])

    def account(self) -> str:
        return self.r.choice([f"{self.digits(5)}-{self.digits(5)}", f"HB{self.digits(6)}", self.digits(9),
                              f"{self.digits(4)} {self.digits(4)} {self.digits(2)}", f"AC-{self.digits(7)}"])

    def health_plan(self) -> str:
        r = self.r
        return r.choice([f"{self.letters(3)}{self.digits(9)}",
                         f"{r.randint(1, 9)}{self.letters(2)}{r.randint(0, 9)}-{self.letters(2)}{r.randint(0, 9)}-"
                         f"{self.letters(2)}{self.digits(2)}", f"W{self.digits(9)}", f"{self.digits(9)}A",
                         f"BCB-{self.digits(4)}-{self.digits(3)}", f"{self.letters(1)}{self.digits(8)}"])

    def license(self) -> str:
        r = self.r
        return r.choice([f"{self.letters(2)}{self.digits(7)}", f"{self.letters(1)}{self.digits(3)}-"
                                                              f"{self.digits(4)}-{self.digits(4)}",
                         f"MD {self.digits(5)}", self.digits(10), f"{self.letters(1)}{self.digits(7)}",
                         f"RN{self.digits(6)}"])

    def device(self) -> str:
        r = self.r
        return r.choice([f"{self.letters(3)}{self.digits(6)}{self.letters(1)}", f"{self.digits(2)}X-{self.digits(4)}-"
                                                                                f"{self.digits(2)}",
                         f"(01){self.digits(14)}(21){self.digits(6)}", f"SN{self.digits(8)}",
                         f"{self.letters(2)}{self.digits(3)}-{self.letters(1)}{self.digits(4)}",
                         f"MDT-{self.letters(4)}{self.digits(2)}-{self.digits(6)}"])

    def vehicle(self) -> tuple[str, str]:
        r = self.r
        if self.forms == "faker":
            return r.choice([("license plate ", self.us.license_plate()), ("VIN ", self.us.vin())])
        vin_chars = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"
        vin = "".join(r.choice(vin_chars) for _ in range(17))
        return r.choice([("license plate ", f"{r.randint(1, 9)}{self.letters(3)}{self.digits(3)}"),
                         ("plate ", f"{self.letters(3)}-{self.digits(4)}"), ("VIN ", vin),
                         ("vehicle identification number ", vin), ("tag number ", f"{self.letters(2)} {self.digits(4)}")])

    def street(self) -> str:
        r = self.r
        if self.forms == "faker":
            return self.us.street_address()
        s = f"{r.randint(1, 9899)} {r.choice(['', '', 'N. ', 'South ', 'W. ', 'East '])}{r.choice(_STREETS)} " \
            f"{r.choice(_SUFFIXES)}"
        if r.random() < 0.3:
            s += r.choice([f", Apt {r.randint(1, 40)}{r.choice('ABCD')}", f" Unit {r.randint(1, 300)}",
                           f", Suite {r.randint(100, 900)}", f" #{r.randint(1, 99)}"])
        return r.choice([s, s, f"PO Box {r.randint(10, 9999)}", f"P.O. Box {r.randint(10, 9999)}", s])

    def city(self) -> tuple[str, str]:
        if self.forms == "faker":
            return self.us.city(), self.us.state_abbr(include_territories=False)
        return self.r.choice(_CITIES)

    def zip(self) -> str:
        if self.forms == "faker":
            return self.r.choice([self.us.zipcode(), self.us.zipcode_plus4()])
        z = self.digits(5)
        return z if self.r.random() < 0.7 else f"{z}-{self.digits(4)}"


_TRANSLIT = str.maketrans({"ı": "i", "ł": "l", "Ł": "L", "ø": "o", "Ø": "O", "đ": "d", "Đ": "D", "ß": "ss",
                           "æ": "ae", "Æ": "AE", "İ": "I"})


def _th(d: int) -> str:
    return "th" if 10 <= d % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")


# ---- sentence makers: each appends one sentence (with a trailing space) to the builder -------------------------

def _s_patient_header(g: CorpusGenerator, b: _Builder, rec: Record, given: str, family: str) -> None:
    r = g.r
    nm = g.name_form(given, family)
    label = r.choice(["Patient: ", "Name: ", "PATIENT NAME: ", "Pt: ", "Patient Name: ", "Re: "])
    b.seq(label, (nm, "NAME"), r.choice([" ", "\n"]))
    if r.random() < 0.8:
        b.seq(r.choice(["MRN: ", "MRN ", "Medical record number ", "MR# ", "Unit No. ", "Hospital #: "]),
              (rec.patient_id, "MRN"), r.choice(["  ", "\n", ". "]))
    if r.random() < 0.7:
        b.seq(r.choice(["DOB: ", "Date of birth: ", "D.O.B. ", "Born "]), (g.date(), "DATE"), "\n")


def _s_prose_name(g: CorpusGenerator, b: _Builder, given: str, family: str, title: str | None) -> None:
    r = g.r
    t = title or r.choice(["Mr.", "Ms.", "Mrs.", "Mx."])
    frames = [("", t + " ", (family, "NAME"), " was scanned in the supine position. "),
              ("", (f"{given} {family}", "NAME"), " presents with shortness of breath. "),
              ("", t + " ", (family, "NAME"), " tolerated the procedure well. "),
              ("", "Patient ", (f"{given} {family}", "NAME"), " returns for follow-up. "),
              ("", "Spoke with ", (f"{given} {family}", "NAME"), " regarding the results. "),
              ("", "The patient, ", (f"{given} {family}", "NAME"), ", reports worsening pain. "),
              ("", (f"{family.upper()} {given.upper()}", "NAME"), " was seen in clinic. ")]
    b.seq(*[x for x in r.choice(frames) if x != ""])


def _s_clinician(g: CorpusGenerator, b: _Builder) -> None:
    r = g.r
    gv, fm = g.person()
    nm = r.choice([f"{gv} {fm}", f"{gv[0]}. {fm}", f"{fm}", f"{gv} {r.choice(string.ascii_uppercase)}. {fm}"])
    frames = [("Electronically signed by ", "Dr. ", (nm, "NAME"), ", MD. "),
              ("Dictated by: ", (f"{gv} {fm}", "NAME"), ", MD\n"),
              ("Referring physician: Dr. ", (nm, "NAME"), ". "),
              ("Results discussed with Dr. ", (nm, "NAME"), " at the time of dictation. "),
              ("Attending: ", (f"{fm}, {gv}", "NAME"), "\n"),
              ("Read by ", (f"{gv} {fm}", "NAME"), ", DO. "),
              ("cc: Dr. ", (nm, "NAME"), "\n"),
              ("Reviewed with ", (f"{gv} {fm}", "NAME"), ", NP, who agrees with the plan. "),
              ("Technologist: ", (f"{gv} {fm}", "NAME"), ". "),
              ("Consult requested by Dr ", (fm, "NAME"), ". ")]
    b.seq(*r.choice(frames))


def _s_relative(g: CorpusGenerator, b: _Builder, family: str) -> None:
    r = g.r
    gv, fm = g.person()
    fm = r.choice([fm, family])
    rel = r.choice(["daughter", "son", "wife", "husband", "mother", "father", "sister", "brother", "niece",
                    "caregiver", "partner"])
    frames = [("Accompanied by her ", f"{rel}, ", (f"{gv} {fm}", "NAME"), ". "),
              ("History obtained from the patient's ", f"{rel} ", (f"{gv} {fm}", "NAME"), ". "),
              ("Emergency contact: ", (f"{gv} {fm}", "NAME"), f" ({rel}). "),
              ("Next of kin: ", (f"{fm}, {gv}", "NAME"), ". "),
              (f"His {rel}, ", (gv, "NAME"), ", was present. ")]
    b.seq(*r.choice(frames))


def _s_dates(g: CorpusGenerator, b: _Builder) -> None:
    r = g.r
    frames = [("Comparison: ", (g.date(), "DATE"), ". "), ("Exam date: ", (g.date(), "DATE"), "\n"),
              ("Compared with the study of ", (g.date(), "DATE"), ". "),
              ("Admitted on ", (g.date(), "DATE"), " and discharged ", (g.date(), "DATE"), ". "),
              ("Follow-up scheduled for ", (g.date(), "DATE"), ". "), ("Date of service ", (g.date(), "DATE"), ". "),
              ("Prior CT dated ", (g.date(), "DATE"), " showed a smaller lesion. "),
              ("Surgery on ", (g.date(), "DATE"), ". "), ("Last menstrual period ", (g.date(), "DATE"), ". "),
              ("Specimen collected ", (g.date(), "DATE"), " at 14:32. ")]
    b.seq(*r.choice(frames))


def _s_age(g: CorpusGenerator, b: _Builder) -> None:
    pre, a = g.age()
    b.seq(pre, (a, "AGE"), g.r.choice([" female with chest pain. ", " male, fall at home. ", ". ",
                                       " with progressive dyspnea. "]))


def _s_phone(g: CorpusGenerator, b: _Builder) -> None:
    r = g.r
    gv, fm = g.person()
    ph = g.phone()
    frames = [("Phone: ", (ph, "PHONE"), "\n"), ("Tel ", (ph, "PHONE"), ". "), ("Cell: ", (ph, "PHONE"), "\n"),
              ("Call back at ", (ph, "PHONE"), ". "), ("Please call ", (ph, "PHONE"), " with questions. "),
              ("Contact Dr. ", (fm, "NAME"), " at ", (ph, "PHONE"), ". "),
              ("Home phone ", (ph, "PHONE"), "; work ", (g.phone(), "PHONE"), ". "),
              ("Reached the patient at ", (ph, "PHONE"), ". "), ("Pager ", (ph, "PHONE"), ". "),
              ("Critical result called to the ED at ", (ph, "PHONE"), ". "),
              ("Mobile: ", (ph, "PHONE"), "\n"), ("Contact number ", (ph, "PHONE"), ". "),
              ("Reading room: ", (ph, "PHONE"), ". "), ("TEL. ", (ph, "PHONE"), "\n")]
    b.seq(*r.choice(frames))


def _s_fax(g: CorpusGenerator, b: _Builder) -> None:
    r = g.r
    fx = g.phone()
    b.seq(*r.choice([("Fax: ", (fx, "FAX"), "\n"), ("Please fax results to ", (fx, "FAX"), ". "),
                     ("F: ", (fx, "FAX"), "\n"), ("Fax number ", (fx, "FAX"), ". "), ("FAX ", (fx, "FAX"), "\n"),
                     ("Report faxed to ", (fx, "FAX"), " on request. ")]))


def _s_contact(g: CorpusGenerator, b: _Builder, given: str, family: str) -> None:
    r = g.r
    choice = r.randrange(3)
    if choice == 0:
        b.seq(r.choice(["Email: ", "E-mail ", "Send images to ", "Patient email "]),
              (g.email(given, family), "EMAIL"), ". ")
    elif choice == 1:
        b.seq(r.choice(["Images available at ", "Portal: ", "See ", "Viewer link: "]), (g.url(), "URL"), " . ")
    else:
        b.seq(r.choice(["Uploaded from workstation ", "Client IP ", "Study pushed from ", "Source host: "]),
              (g.ip(), "IP"), ". ")


def _s_numbers(g: CorpusGenerator, b: _Builder) -> None:
    r = g.r
    kind = r.choice(["SSN", "ACCESSION", "ACCOUNT", "HEALTH_PLAN", "LICENSE", "DEVICE", "VEHICLE", "MRN"])
    if kind == "SSN":
        b.seq(r.choice(["SSN: ", "Social Security number ", "SS# ", "SSN "]), (g.ssn(), "SSN"), ". ")
    elif kind == "ACCESSION":
        b.seq(r.choice(["Accession: ", "Acc# ", "Accession number ", "ACC ", "Order no. "]),
              (g.accession(), "ACCESSION"), r.choice([". ", "\n"]))
    elif kind == "ACCOUNT":
        b.seq(r.choice(["Account: ", "Acct#: ", "Billing account ", "Account number ", "Encounter "]),
              (g.account(), "ACCOUNT"), ". ")
    elif kind == "HEALTH_PLAN":
        b.seq(r.choice(["Member ID: ", "Medicare ID ", "Insurance ID: ", "Policy no. ", "Health plan number ",
                        "Medicaid # ", "Subscriber ID "]), (g.health_plan(), "HEALTH_PLAN"), ". ")
    elif kind == "LICENSE":
        b.seq(r.choice(["Driver's license ", "DEA number ", "License #: ", "NPI ", "Licence no. ",
                        "Medical license "]), (g.license(), "LICENSE"), ". ")
    elif kind == "DEVICE":
        b.seq(r.choice(["Pacemaker serial number ", "Device ID: ", "Implant S/N ", "UDI ", "Serial no. ",
                        "Pump serial "]), (g.device(), "DEVICE"), r.choice([" in place. ", ". "]))
    elif kind == "VEHICLE":
        pre, v = g.vehicle()
        b.seq("MVC; ", pre, (v, "VEHICLE"), " per EMS report. ")
    else:
        b.seq(r.choice(["Prior MRN ", "Outside MRN: ", "Old chart number "]), (g.mrn(), "MRN"), ". ")


def _s_address(g: CorpusGenerator, b: _Builder) -> None:
    r = g.r
    city, st = g.city()
    street, z = g.street(), g.zip()
    frames = [("Address: ", (street, "ADDRESS"), ", ", (city, "CITY"), f", {st} ", (z, "ZIP"), "\n"),
              ("Lives at ", (street, "ADDRESS"), " in ", (city, "CITY"), ". "),
              ("Home: ", (street, "ADDRESS"), ", ", (city, "CITY"), f" {st} ", (z, "ZIP"), ". "),
              ("Resides in ", (city, "CITY"), f", {st}. "), ("Transferred from an outside facility in ", (city, "CITY"),
                                                              ". "),
              ("ZIP code ", (z, "ZIP"), ". "), ("Mailing address ", (street, "ADDRESS"), ", ", (city, "CITY"),
                                                 f", {st} ", (z, "ZIP"), ". "),
              ("Found down at ", (street, "ADDRESS"), ". "), ("Patient from ", (city, "CITY"), f", {st}. ")]
    b.seq(*r.choice(frames))


def _s_clinical(g: CorpusGenerator, b: _Builder) -> None:
    r = g.r
    if r.random() < 0.35:
        b.add(r.choice(_FINDINGS) + " ")
        return
    frame = r.choice(_CLINICAL_FRAMES)
    pre, post = frame.split("{t}")
    b.seq(pre, (r.choice(CLINICAL_TERMS), None, True), post + " ")


def make_corpus(n: int = 1200, seed: int = 15, forms: str = "own") -> list[Record]:
    """`n` labelled reports, the same for the same seed and forms (see CorpusGenerator)."""
    g = CorpusGenerator(seed, forms)
    out = []
    for i in range(n):
        r = g.r
        rec = Record(id=f"phi-{i:05d}")
        given, family = g.person()
        rec.patient_name, rec.patient_id = f"{family}^{given}", g.mrn()
        b = _Builder(rec)
        b.add(r.choice(["CT CHEST WITH CONTRAST\n", "MRI BRAIN WITHOUT CONTRAST\n", "XR CHEST 2 VIEWS\n",
                        "US ABDOMEN COMPLETE\n", "CT ABDOMEN/PELVIS\n", "DISCHARGE SUMMARY\n", "CLINIC NOTE\n",
                        "MRI LUMBAR SPINE\n", "ECHOCARDIOGRAM REPORT\n", "PATHOLOGY REPORT\n"]))
        if r.random() < 0.7:
            _s_patient_header(g, b, rec, given, family)
        makers = [lambda: _s_prose_name(g, b, given, family, None), lambda: _s_clinician(g, b),
                  lambda: _s_relative(g, b, family), lambda: _s_dates(g, b), lambda: _s_age(g, b),
                  lambda: _s_phone(g, b), lambda: _s_fax(g, b), lambda: _s_contact(g, b, given, family),
                  lambda: _s_numbers(g, b), lambda: _s_numbers(g, b), lambda: _s_address(g, b)]
        chosen = r.sample(makers, r.randint(3, 6))
        clinical = [lambda: _s_clinical(g, b)] * r.randint(3, 6)
        seq = chosen + clinical
        r.shuffle(seq)
        for make in seq:
            make()
        _s_clinician(g, b)
        b.done()
        out.append(rec)
    return out
