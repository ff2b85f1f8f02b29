"""The per-file budget check (tests/file_budget.py) fails a session whose file runs over its budget, and only then.
Reference: pytest's own outcome of an inner session (pytester), with a file that sleeps a known time."""

import json

SLOW = """
import time

def test_sleeps():
    time.sleep(0.4)

def test_quick():  # instant: the file's time is the sum of its tests
    assert 1 + 1 == 2
"""


def _run(pytester, budget_s):
    pytester.makepyfile(test_slow=SLOW)
    table = pytester.path / "budget.json"
    table.write_text(json.dumps({"default_s": 100, "files": {"test_slow.py": budget_s}}))
    return pytester.runpytest_inprocess("-p", "file_budget", f"--file-budget={table}", "-p", "no:cacheprovider")


def test_a_file_over_its_budget_fails_the_session_and_is_named(pytester):
    result = _run(pytester, 0.2)
    result.assert_outcomes(passed=2)  # every test passed, the session still fails
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*file budget exceeded*", "test_slow.py: 0.* s > budget 0 s*"])


def test_a_file_within_its_budget_passes(pytester):
    result = _run(pytester, 5)
    assert result.ret == 0
    assert "file budget exceeded" not in result.stdout.str()


def test_an_unlisted_file_gets_the_default_and_off_turns_the_check_off(pytester):
    pytester.makepyfile(test_slow=SLOW)
    table = pytester.path / "budget.json"
    table.write_text(json.dumps({"default_s": 0.1, "files": {}}))
    assert pytester.runpytest_inprocess("-p", "file_budget", f"--file-budget={table}").ret == 1
    assert pytester.runpytest_inprocess("-p", "file_budget", "--file-budget=off").ret == 0
