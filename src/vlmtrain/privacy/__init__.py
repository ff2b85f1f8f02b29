"""Privacy for medical data: the gate that decides what may become training data (`gate`, with `policy`,
`dicom` de-identification and `phi` text scrubbing) and the offline medical sample set (`medical_samples`).

Submodules import their libraries (pydicom, dicom-anonymizer, scrubadub) only when used, so importing
`vlmtrain.privacy` costs nothing. See docs/privacy.md.
"""
