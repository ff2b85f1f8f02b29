"""Per-file time budgets for the suite (a pytest plugin, loaded by conftest.py).

Every test file has a budget in seconds in `tests/suite_budget.json` (`files`), set from fresh-clone measurements on
the 2-core CI machine with headroom for load (DEVELOPERS.md, "Suite time"); a file not listed gets `default_s`. A
file's time is the sum of its tests' setup, call and teardown, so a module-scoped fixture counts where it is built
and a session-scoped one (a tiny checkpoint per family) in the first file that asks for it. When a file goes over
its budget the pytest run fails and the summary names the file, its seconds and its budget: a slow new test shows up
in the submission that adds it. Running a subset (`-k`, `-m "not slow"`, one file) only lowers the sums.

`--file-budget=PATH` reads another table; `--file-budget=off` (or `VLMTRAIN_FILE_BUDGET=off`) turns the check off.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest

DEFAULT_TABLE = Path(__file__).resolve().parent / "suite_budget.json"


def pytest_addoption(parser):
    parser.addoption("--file-budget", default=os.environ.get("VLMTRAIN_FILE_BUDGET", str(DEFAULT_TABLE)),
                     help="JSON table of per-file seconds ({'default_s': S, 'files': {'tests/x.py': S}}), or 'off'")
    parser.addoption("--file-times", default=None, help="write each file's measured seconds to this JSON file")


class FileBudget:
    def __init__(self, table: dict, times_out: str | None = None):
        self.times_out = times_out
        self.default = float(table.get("default_s", 60))
        self.files = {k: float(v) for k, v in table.get("files", {}).items()}
        self.spent: dict[str, float] = defaultdict(float)

    def budget(self, path: str) -> float:
        return self.files.get(path, self.default)

    def over(self) -> list[tuple[str, float, float]]:
        return sorted(((p, s, self.budget(p)) for p, s in self.spent.items() if s > self.budget(p)),
                      key=lambda r: r[1] - r[2], reverse=True)

    def pytest_collection_modifyitems(self, items):
        """Files with the largest budgets first, tests in their own order inside a file: with pytest-xdist's
        `--dist loadfile` the longest files start at once and the short ones fill in, instead of one long file
        starting last and running alone (longest-processing-time-first)."""
        order = {item: i for i, item in enumerate(items)}
        items.sort(key=lambda it: (-self.budget(it.nodeid.split("::", 1)[0]), order[it]))

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report):
        self.spent[report.nodeid.split("::", 1)[0]] += report.duration

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        if self.times_out and not hasattr(session.config, "workerinput"):
            spent = dict(sorted(((p, round(s, 1)) for p, s in self.spent.items()), key=lambda r: -r[1]))
            Path(self.times_out).write_text(json.dumps(spent, indent=1) + "\n")
        if self.over() and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        over = self.over()
        if not over:
            return
        terminalreporter.section("file budget exceeded", red=True)
        for path, spent, budget in over:
            terminalreporter.line(f"{path}: {spent:.1f} s > budget {budget:.0f} s "
                                  f"(tests/suite_budget.json; DEVELOPERS.md#suite-time)")


def pytest_configure(config):
    choice = config.getoption("--file-budget")
    if choice == "off":
        return
    path = Path(choice)
    if not path.is_file():
        raise pytest.UsageError(f"--file-budget: no such file {path}")
    budget = FileBudget(json.loads(path.read_text()), config.getoption("--file-times"))
    config.pluginmanager.register(budget, "vlmtrain-file-budget")
