"""Report-text PHI: a table of cases — what is replaced by which tag, what must come through unchanged, and what
is refused — plus the record's own identifiers. See vlmtrain.privacy.phi for the detectors and why."""

import pytest

from vlmtrain.privacy.phi import KnownIdentifiers, PhiScrubber, PhiUncleanable


@pytest.fixture(scope="module")
def scrubber():
    return PhiScrubber()


# (text, expected cleaned text)
REPLACED = [
    # names: titles keep the title, labels keep the label
    ("Seen by Dr. Jane Roe today.", "Seen by Dr. [NAME] today."),
    ("Referring physician: Dr. Emily Chen.", "Referring physician: Dr. [NAME]."),
    ("Signed by: Robert Brown, MD", "Signed by: [NAME], MD"),
    ("Electronically signed by Alice Walker", "Electronically signed by [NAME]"),
    ("Patient John Smith was scanned.", "Patient [NAME] was scanned."),
    ("Smith, John presented with cough.", "[NAME] presented with cough."),
    ("Mrs. O'Brien tolerated the exam.", "Mrs. [NAME] tolerated the exam."),
    ("Film labelled DOE^JANE.", "Film labelled [NAME]."),
    # dates with a day or month element
    ("Exam 03/14/2023.", "Exam [DATE]."),
    ("Prior 2023-03-14 and 14.03.2022.", "Prior [DATE] and [DATE]."),
    ("Acquired 20230314.", "Acquired [DATE]."),
    ("Seen on March 14, 2023 and 4 Jan 2022.", "Seen on [DATE] and [DATE]."),
    ("Last imaged March 2021.", "Last imaged [DATE]."),
    ("Follow up 3/2024.", "Follow up [DATE]."),
    # record numbers
    ("MRN 48213907, Acc# A7093.", "MRN [ID], Acc# [ID]."),
    ("Patient ID: PX-99812.", "Patient ID: [ID]."),
    ("Ref 123456789 on file.", "Ref [ID] on file."),
    ("SSN 123-45-6789.", "SSN [ID]."),
    # contact details
    ("Call 617-555-0123 or (508) 555-0187.", "Call [PHONE] or [PHONE]."),
    ("Write to eleanor.whitaker@example.org.", "Write to [EMAIL]."),
    ("Portal: http://example.com/results", "Portal: [URL]"),
    # addresses and places
    ("Lives at 14 Juniper Lane, Salem, MA 01970.", "Lives at [ADDRESS]."),
    ("Home: 9 Elm Street, Apt 3, Medford, MA 02155", "Home: [ADDRESS]"),
    ("Mail to PO Box 4471.", "Mail to [ADDRESS]."),
    ("Transferred from St. Mary's Hospital.", "Transferred from [LOCATION]."),
    # ages over 89 (Safe Harbor)
    ("A 93-year-old woman.", "A [AGE>89] woman."),
    ("92 y/o male, aged 95.", "[AGE>89] male, aged [AGE>89]."),
    ("A nonagenarian with dyspnea.", "A [AGE>89] with dyspnea."),
]

# Clinical text that must come through byte for byte.
UNCHANGED = [
    "No acute fracture.",
    "T2-weighted images show a 5 mm nodule in the left lung.",
    "Left lung base atelectasis. Right lower lobe is clear.",
    "Grade 3/4 stenosis; pain 5/10.",
    "BP 120/80 mmHg, HR 72.",
    "Disc bulge at C5-6 and L4-L5.",
    "Lesion measures 1.5 x 2.0 x 3.2 cm; nodules 10-15 mm.",
    "Hounsfield units 40-60; follow-up in 3 months.",
    "A 45-year-old woman; age 89.",
    "Compared with the 2019 study.",
    "Parkinson disease. Graves disease. Hodgkin lymphoma.",
    "Iris and lens normal. May represent atelectasis.",
    "BI-RADS 4. Gleason 3+4=7. PI-RADS 5.",
    "Cup-to-disc ratio 0.4 with scattered microaneurysms.",
    "The patient tolerated the procedure. Patient Positioning was supine.",
    "Seen at the emergency department.",
    "Phone: n/a. Email: none.",
]

# Text the scrubber must refuse rather than guess at.
UNCLEANABLE = [
    "DOB: the fourth of November, nineteen twenty-eight.",
    "Name: john smith",
    "Address: Flat 3, the Old Mill.",
    "Phone: five five five, one two three four",
]


@pytest.mark.parametrize("text,expected", REPLACED)
def test_phi_is_replaced_by_its_category_tag(scrubber, text, expected):
    assert scrubber.clean(text).text == expected


@pytest.mark.parametrize("text", UNCHANGED)
def test_clinical_text_is_not_altered(scrubber, text):
    result = scrubber.clean(text)
    assert result.text == text and not result.counts


@pytest.mark.parametrize("text", UNCLEANABLE)
def test_uncleanable_text_is_refused(scrubber, text):
    with pytest.raises(PhiUncleanable) as e:
        scrubber.clean(text)
    assert "john" not in e.value.detail.lower() and "november" not in e.value.detail.lower()  # no PHI echoed


def test_uncleanable_labels_can_be_allowed_by_policy():
    lenient = PhiScrubber(reject_unparsed_labels=False)
    assert lenient.clean("Name: john smith").text == "Name: john smith"


def test_counts_per_category(scrubber):
    r = scrubber.clean("Dr. Jane Roe saw John Smith on 03/14/2023; call 617-555-0123.")
    assert r.text == "Dr. [NAME] saw [NAME] on [DATE]; call [PHONE]."
    assert dict(r.counts) == {"NAME": 2, "DATE": 1, "PHONE": 1}


def test_record_identifiers_are_removed_in_any_form(scrubber):
    """Names and ids read from the DICOM header / records file are found even where no pattern would be."""
    known = KnownIdentifiers(names=["Zorbaugh^Quillon"], ids=["77123"], places=["Acme Imaging"])
    text = ("Quillon Zorbaugh (ref 77123) at ACME IMAGING; zorbaugh was calm. Zorbaugh, Quillon re-scanned. "
            "No acute fracture.")
    assert scrubber.clean(text, known).text == (
        "[NAME] (ref [ID]) at [LOCATION]; [NAME] was calm. [NAME] re-scanned. No acute fracture.")
    # without being told, the invented name is not found: the known identifiers are what catches it
    assert "Zorbaugh" in scrubber.clean("Quillon Zorbaugh was calm.").text


def test_short_name_parts_match_only_as_written(scrubber):
    known = KnownIdentifiers(names=["Al^Ng"])
    assert scrubber.clean("Seen with Al Ng, as in Smith et al.", known).text == "Seen with [NAME], as in Smith et al."


def test_placeholder_names_do_not_erase_words(scrubber):
    known = KnownIdentifiers(names=["NAME^PATIENT^NAME", "Anonymized"])
    assert scrubber.clean("The patient is well.", known).text == "The patient is well."


@pytest.mark.parametrize("text", ["Contact qzorbaugh77@mail", "id acc77123x"])
def test_identifier_glued_into_another_word_is_refused_or_removed(scrubber, text):
    known = KnownIdentifiers(names=["Zorbaugh^Quillon"], ids=["77123"])
    try:
        cleaned = scrubber.clean(text, known).text
    except PhiUncleanable:
        return
    assert "77123" not in cleaned and "zorbaugh" not in cleaned.lower()


def test_glued_identifier_without_pattern_is_refused(scrubber):
    known = KnownIdentifiers(names=["Zorbaugh^Quillon"], ids=["77123"])
    with pytest.raises(PhiUncleanable):
        scrubber.clean("seen as qzorbaugh in the log", known)
    with pytest.raises(PhiUncleanable):
        scrubber.clean("token x77123y kept", known)
