"""Builtin datasets by name, the medical ones included: what a stage's `data.train` / `eval.data` entries and the
federated run's held-out set name.

`vlmtrain.data.builtin` makes the digits sets and keeps the one cache for every builtin; the medical sets are made
by the privacy gate (`vlmtrain.privacy.medical_samples`, `medical_cohort`), which sits above data, so this module,
above both, hands their makers to it.
"""

from __future__ import annotations

from pathlib import Path

from vlmtrain.data import builtin
from vlmtrain.privacy.medical_cohort import SIZES as COHORTS
from vlmtrain.privacy.medical_cohort import prepare_cohort_builtin


def _medical_samples(root: Path) -> Path:
    """radiographs/CT/MR/US + retina/histology through the privacy gate."""
    # imported here: the gate's libraries (pydicom, OCR) load only when a medical set is made
    from vlmtrain.privacy.medical_samples import prepare_medical_builtin

    return prepare_medical_builtin(root)


def _cohort(name: str) -> builtin.Maker:
    """Synthetic reports on the gated images (DP training and its audit)."""

    def make(root: Path) -> Path:
        return prepare_cohort_builtin(root, name)

    return make


def medical_makers() -> dict[str, builtin.Maker]:
    """name → maker for the builtins the privacy gate makes, in the order an unknown name's error lists them."""
    return {"medical-samples": _medical_samples, **{name: _cohort(name) for name in COHORTS}}


def prepare_builtin(name: str, root: str | Path) -> Path:
    """`root/name` made once (or copied from the builtin cache): any builtin, digits or medical."""
    return builtin.prepare_builtin(name, root, medical_makers())
