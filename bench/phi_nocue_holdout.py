"""A held-out corpus of names with no cue at all, for `python -m bench phi` (corpus `nocue_holdout`).

Written before the cue-less name detector was changed for it, and without reading the sentence frames of
`bench.phi_names_geo`: its frames, given names, family names and clinical sentences below were fixed first, then
the detector was measured on it, so that rules fitted to the `nocue` corpus are checked on phrasings they were not
written against. Seeded: the same seed gives the same records.

A name here has no title, no label ("Patient:"), no credential and no relation word in front of it. Given names
and family names are drawn from many languages and include rare ones and family names that are also eponyms
(Graves, Addison, Cushing, Baker, Murphy); the clinical sentences use the same eponyms as terms that must stay,
and capitalised department names in subject position ("Physical Therapy reports") that are not people.

Labels: NAME (the whole name); clinical terms and department names are labelled as terms to keep. No record has
a known patient name or id, so the detector gets no help from the record's own identifiers.
"""

from __future__ import annotations

import random

from bench.phi_corpus import Record, _Builder

GIVEN = ("Anselm", "Oluwaseun", "Priyanka", "Haruto", "Marisol", "Teodor", "Aoife", "Kwame", "Svetlana", "Idris",
         "Lorelei", "Bongani", "Mei-Lin", "Thiago", "Ingrid", "Emeka", "Paloma", "Cormac", "Anahita", "Jarrah",
         "Zofia", "Tenzin", "Wren", "Ebere", "Fernando", "Kalani", "Soraya", "Bjorn", "Chidinma", "Rosalind",
         "Tariq", "Ayesha", "Lucian", "Nkechi", "Hamish", "Yesenia", "Kenji", "Ottilie", "Suresh", "Delphine",
         "Ravi", "Inés", "Hyun-woo", "Sunniva", "Mateo", "Folasade", "Caspian", "Thandiwe", "Ilse", "Arjun",
         "Niamh", "Baraka", "Elodie", "Sipho", "Magnolia", "Dagny", "Oisin", "Farida", "Quentin", "Linnea")
FAMILY = ("Achterberg", "Nwachukwu", "Ramaswamy", "Takahashi", "Villalobos", "Przybylski", "Ó Briain", "Mensah",
          "Kuznetsova", "Haddadi", "Fairweather", "Dlamini", "Chua", "Albuquerque", "Sandvik", "Eze", "Ocampo",
          "MacGillivray", "Farahani", "Tjandra", "Wiśniewska", "Dorji", "Ashdown", "Obi", "Quiroga", "Kahananui",
          "Rostami", "Halvorsen", "Okeke", "Pemberton", "Siddiqui", "Qureshi", "Vance", "Adebayo", "Strachan",
          "Benavides", "Morimoto", "Abernathy", "Venkataraman", "Lemaire", "Park", "Ferreira", "Jung", "Solberg",
          "Iglesias", "Oyelowo", "Thorne", "Mahlangu", "Brandt", "Gill",
          # family names that are also eponyms of terms in CLINICAL below
          "Graves", "Addison", "Cushing", "Baker", "Murphy", "Barrett", "Horner", "Paget", "Bowen", "Colles")
CLINICAL = ("Graves disease", "Addison disease", "Cushing syndrome", "Baker cyst", "Murphy sign", "Barrett esophagus",
            "Horner syndrome", "Paget disease of bone", "Bowen disease", "Colles fracture", "Meckel diverticulum",
            "Kaposi sarcoma", "Tourette syndrome", "Raynaud phenomenon", "Hashimoto thyroiditis", "Bell palsy",
            "Wilson disease", "Parkinson disease", "Crohn disease", "Hodgkin lymphoma", "Sjogren syndrome",
            "Barrett's esophagus", "Graves' orbitopathy", "Colles' fracture", "Baker's cyst")
DEPARTMENTS = ("Physical Therapy", "Interventional Radiology", "Social Work", "Case Management", "Pastoral Care",
               "Infectious Disease", "Wound Care", "Nuclear Medicine")
# Frames where a name stands with nothing that marks it as a name: subject position before a verb, after a
# preposition, in a possessive, in a list, at the end of a sentence.
NAME_FRAMES = ("{n} presents today for follow-up.", "Spoke with {n} by phone about the results.",
               "{n} reports less pain since the last visit.", "Results were reviewed with {n} and family.",
               "{n}'s symptoms began three days ago.", "The plan was explained to {n}, who agreed.",
               "{n} denies chest pain or dyspnea.", "Handed over to {n} at shift change.",
               "Per {n}, the pain is worse at night.", "{n} was seen in clinic and tolerated the exam well.",
               "Images were discussed with {n} before discharge.", "{n} states the swelling began after a fall.",
               "Transport arranged by {n}.", "Consent obtained from {n} after a discussion of risks.",
               "Questions from {n} were answered.", "{n} and {m} were both present at the bedside.",
               "Called back by {n} at 4 pm.", "Follow-up with {n} in six weeks.", "{n} would like a second opinion.",
               "{n} is a pleasant retired teacher.", "Message left for {n}.", "{n}, {m} and the team met today.")
CLINICAL_FRAMES = ("History of {t}.", "Findings are consistent with {t}.", "No evidence of {t}.",
                   "{T} was considered and excluded.", "Known {t}, stable on treatment.", "{T} is suspected.",
                   "Differential includes {t}.", "Prior imaging showed {t}.")
DEPARTMENT_FRAMES = ("{d} reports that the dressing was changed.", "{d} states the family agrees.",
                     "{d} was consulted.", "Referred to {d}.", "{d} presents the case at rounds.")


class HoldoutGenerator:
    """Seeded records: one or two cue-less names, clinical sentences with eponyms and department names."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def name(self) -> str:
        r = self.r
        given, family = r.choice(GIVEN), r.choice(FAMILY)
        form = r.random()
        if form < 0.2:
            return f"{given} {r.choice('ABCDEFGHJKLMNPRSTW')}. {family}"
        if form < 0.3:
            return f"{given} {family}-{r.choice(FAMILY)}"
        return f"{given} {family}"

    def _names(self, b: _Builder) -> None:
        frame = self.r.choice(NAME_FRAMES)
        head, rest = frame.split("{n}", 1)
        b.seq(head, (self.name(), "NAME"))
        if "{m}" in rest:
            mid, tail = rest.split("{m}", 1)
            b.seq(mid, (self.name(), "NAME"), tail)
        else:
            b.add(rest)

    def _clinical(self, b: _Builder) -> None:
        r = self.r
        if r.random() < 0.25:
            head, tail = r.choice(DEPARTMENT_FRAMES).split("{d}")
            b.seq(head, (r.choice(DEPARTMENTS), None, True), tail)
            return
        frame, term = r.choice(CLINICAL_FRAMES), r.choice(CLINICAL)
        if "{T}" in frame:
            head, tail = frame.split("{T}")
            term = term[0].upper() + term[1:]
        else:
            head, tail = frame.split("{t}")
        b.seq(head, (term, None, True), tail)

    def record(self, i: int) -> Record:
        rec = Record(id=f"holdout-{i:05d}")
        b = _Builder(rec)
        parts = [self._names] * self.r.randint(1, 2) + [self._clinical] * self.r.randint(1, 3)
        self.r.shuffle(parts)
        for k, part in enumerate(parts):
            if k:
                b.add(" ")
            part(b)
        b.done()
        return rec


def make_corpus(n: int, seed: int) -> list[Record]:
    """`n` labelled records, the same for the same seed."""
    g = HoldoutGenerator(seed)
    return [g.record(i) for i in range(n)]
