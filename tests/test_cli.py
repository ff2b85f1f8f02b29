import json
import subprocess

import pytest

from conftest import VLMTRAIN
from vlmtrain.cli.main import build_parser

VERBS = sorted(build_parser()._subparsers._group_actions[0].choices)


def test_top_level_help_lists_every_verb():
    r = subprocess.run([*VLMTRAIN, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for verb in VERBS:
        assert verb in r.stdout


@pytest.mark.parametrize("verb", VERBS)
def test_verb_help(verb):
    r = subprocess.run([*VLMTRAIN, verb, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"usage: vlmtrain {verb}" in r.stdout


def test_missing_model_folder_is_one_line_error(tmp_path):
    r = subprocess.run([*VLMTRAIN, "export", str(tmp_path / "nope"), "--format", "hf-llava", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == f"error: {tmp_path / 'nope'}: no such file or folder"


def test_demo_runs_learns_and_matches_transformers(tmp_path):
    """`make demo` runs `vlmtrain demo --out runs/demo`; here into a temp dir."""
    r = subprocess.run([*VLMTRAIN, "demo", "--out", str(tmp_path / "demo")], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert s["accuracy_after"] >= 0.5 > s["accuracy_before"] + 0.3  # chance is 10%
    assert s["transformers_check"]["same_text"] and s["transformers_check"]["max_abs_logit_diff"] <= 1e-5
    assert (tmp_path / "demo" / "hf-llava" / "config.json").is_file()
    assert "held-out accuracy" in r.stderr + r.stdout
