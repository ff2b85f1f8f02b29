"""Layers import downwards only, and nothing in src/vlmtrain imports in a cycle.

import-linter's contracts of pyproject.toml (`[tool.importlinter]`: the layers, and acyclic siblings in every
package) are checked in-process; grimp's graph of the package is searched for module-level cycles (a module whose
import leads back to it) and package-level ones (two children of one package that import each other, through any
of their modules). A graph with one upward or cycle-closing import added shows the checks fail when they should.
"""

from __future__ import annotations

import copy
from pathlib import Path

import grimp
import pytest
from importlinter import api  # noqa: F401  (configures import-linter's settings, as its CLI does)
from importlinter.application import use_cases
from importlinter.contracts.acyclic_siblings import AcyclicSiblingsContract
from importlinter.contracts.layers import LayersContract

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("vlmtrain", cache_dir=None)


def _contract(cls, contract_id: str):
    opts = use_cases.read_user_options(str(PYPROJECT))
    raw = next(c for c in opts.contracts_options if c["id"] == contract_id)
    return cls(raw["name"], opts.session_options, raw)


def _module_cycles(g) -> list[tuple[str, str]]:
    """(importer, imported) pairs whose imported module leads back to the importer."""
    return sorted((m, i) for m in g.modules for i in g.find_modules_directly_imported_by(m)
                  if g.chain_exists(importer=i, imported=m))


def _package_cycles(g) -> dict[str, set]:
    """Package → the imports grimp would remove to make its children acyclic (empty for every package: no
    cycles between siblings, with each child standing for itself and all its descendants)."""
    packages = [m for m in g.modules if g.find_children(m)]
    return {p: breakers for p in sorted(packages) if (breakers := g.nominate_cycle_breakers(p))}


def test_import_linter_contracts_are_kept():
    """`lint-imports` on pyproject.toml, in-process; its report (printed) names the imports that break a contract."""
    assert use_cases.lint_imports(str(PYPROJECT), cache_dir=None, no_logo=True)


def test_grimp_finds_no_module_or_package_cycles(graph):
    assert len(graph.modules) > 100  # the whole package was read
    assert _module_cycles(graph) == []
    assert _package_cycles(graph) == {}


def test_an_upward_import_and_a_cycle_are_caught(graph):
    """The imports this layering removed, put back one at a time, break the contracts and show up as cycles."""
    upward = copy.deepcopy(graph)
    upward.add_import(importer="vlmtrain.data.builtin", imported="vlmtrain.privacy.medical_cohort")
    assert not _contract(LayersContract, "layers").check(upward, verbose=False).kept

    cyclic = copy.deepcopy(graph)
    cyclic.add_import(importer="vlmtrain.data.formats.items", imported="vlmtrain.data.formats.base")
    assert ("vlmtrain.data.formats.items", "vlmtrain.data.formats.base") in _module_cycles(cyclic)
    assert "vlmtrain.data.formats" in _package_cycles(cyclic)
    assert not _contract(AcyclicSiblingsContract, "acyclic").check(cyclic, verbose=False).kept
    assert _contract(AcyclicSiblingsContract, "acyclic").check(graph, verbose=False).kept
