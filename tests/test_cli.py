import json
import subprocess

import pytest

from conftest import ROOT, VLMTRAIN
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


@pytest.mark.slow
def test_demo_recipe_learns_and_exports(tmp_path):
    """What `make demo` runs: the demo recipe, then an export of the final stage to transformers Llava."""
    out = tmp_path / "demo"
    r = subprocess.run([*VLMTRAIN, "run", "configs/recipes/demo.yaml", "--out", str(out)], capture_output=True,
                       text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out evaluation" in r.stdout
    s = {n: json.loads((out / n / "summary.json").read_text()) for n in ("align", "sft", "dpo")}
    assert s["sft"]["eval_before"]["vqa_exact_match"] < 0.2  # chance is 10%
    assert s["sft"]["eval"]["vqa_exact_match"] >= 0.8
    assert s["sft"]["eval"]["answer_nll"] < s["sft"]["eval_before"]["answer_nll"]
    assert s["dpo"]["eval"]["vqa_exact_match"] >= s["dpo"]["eval_before"]["vqa_exact_match"]  # DPO does not hurt
    r = subprocess.run([*VLMTRAIN, "export", str(out), "--format", "hf-llava", "--out", str(out / "hf-llava")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (out / "hf-llava" / "config.json").is_file()


def test_readme_command_table_matches_the_cli():
    """Every command in the README's table exists, with every --option it shows."""
    import re

    rows = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("| `vlmtrain ")]
    assert len(rows) >= 10
    for row in rows:
        cmd = row.split("`")[1]
        words = [("llava" if w == "FORMAT" else w) for w in cmd.split()[1:]]  # prep FORMAT: one of its formats
        verb = [w for w in words[:2] if re.fullmatch(r"[a-z]+", w)]  # `privacy audit`, `data inspect`, `fit`
        r = subprocess.run([*VLMTRAIN, *verb, "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (cmd, r.stderr[-500:])
        for opt in re.findall(r"--[a-z][a-z-]*", cmd):
            assert opt in r.stdout, (cmd, opt)
