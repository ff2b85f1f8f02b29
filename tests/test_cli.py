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


def _saved_model(tmp_path):
    from conftest import tiny_bundle

    from vlmtrain.model.io import save_vlmtrain

    return save_vlmtrain(tiny_bundle(), tmp_path / "model")


def test_export_killed_midway_leaves_the_previous_export_whole_and_a_rerun_replaces_it(tmp_path, monkeypatch):
    """An export writes a hidden sibling and renames it into place: a failure (or kill) part-way leaves the earlier
    export untouched and no half folder; the next export replaces the earlier one whole (no stale files)."""
    from vlmtrain.cli.main import main
    from vlmtrain.model import io

    src, out = _saved_model(tmp_path), tmp_path / "export"
    assert main(["export", str(src), "--format", "vlmtrain", "--out", str(out)]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "stale.txt").write_text("left by an earlier export")
    real = io.save_vlmtrain

    def dies_part_way(bundle, folder):
        real(bundle, folder)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "save_vlmtrain", dies_part_way)
    with pytest.raises(OSError):
        main(["export", str(src), "--format", "vlmtrain", "--out", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "stale.txt"} == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    dead = subprocess.Popen(["true"])
    dead.wait()  # a SIGKILLed export's staging folder (its pid no longer runs) is cleared by the next export
    (tmp_path / f".export.export-{dead.pid}").mkdir()
    (tmp_path / f".export.export-{dead.pid}" / "config.json").write_text("{}")
    monkeypatch.setattr(io, "save_vlmtrain", real)
    assert main(["export", str(src), "--format", "vlmtrain", "--out", str(out)]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # stale.txt gone with the replaced folder
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    def records_its_folder(bundle, folder):  # as PEFT does: adapter_config.json names OUT/base
        from pathlib import Path

        folder = real(bundle, folder)
        (Path(folder) / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(Path(folder) / "base")}))
        return folder

    monkeypatch.setattr(io, "save_vlmtrain", records_its_folder)
    assert main(["export", str(src), "--format", "vlmtrain", "--out", str(out)]) == 0
    assert json.loads((out / "adapter_config.json").read_text()) == {"base_model_name_or_path": str(out / "base")}


@pytest.mark.slow  # three `vlmtrain export` processes: ~30 s
def test_export_sigkilled_while_writing_then_rerun_equals_an_uninterrupted_export(tmp_path):
    import os
    import signal
    import time

    src = _saved_model(tmp_path)
    ref = tmp_path / "ref"
    cmd = [*VLMTRAIN, "export", str(src), "--format", "vlmtrain", "--out"]
    assert subprocess.run([*cmd, str(ref)], capture_output=True, timeout=300).returncode == 0
    out = tmp_path / "out"
    proc = subprocess.Popen([*cmd, str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = tmp_path / f".out.export-{proc.pid}"
    deadline = time.monotonic() + 120
    while not staging.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)  # while the export writes its staging folder
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    if out.exists():  # the kill came after the rename: then it is the whole export, never a half folder
        assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in ref.iterdir()}
    assert subprocess.run([*cmd, str(out)], capture_output=True, timeout=300).returncode == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in ref.iterdir()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
