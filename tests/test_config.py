import subprocess
import sys

import pytest

from conftest import CONFIGS, TINY, VLMTRAIN
from vlmtrain.config import load_model_config, parse_overrides
from vlmtrain.errors import ConfigError


def run_cli(*args):
    return subprocess.run([*VLMTRAIN, *args], capture_output=True, text=True, timeout=300)


def test_overrides_forms():
    assert parse_overrides(["a.b=1", "--c.d=2", "--e.f", "3"]) == ["a.b=1", "c.d=2", "e.f=3"]
    with pytest.raises(ConfigError):
        parse_overrides(["nonsense"])


def test_override_changes_field():
    cfg = load_model_config(TINY, ["connector.name=linear", "--vision.feature_layer", "-1"])
    assert cfg.connector.name == "linear" and cfg.vision.feature_layer == -1


def test_stage_file_with_model_reference(tmp_path):
    stage = tmp_path / "stage.yaml"
    stage.write_text(f"model: {TINY}\n")
    assert load_model_config(stage).name == "tiny-clip-llama"


@pytest.mark.parametrize(
    "override, field",
    [
        ("vision.feature_layr=2", "vision.feature_layr: unknown field"),
        ("vision.select=cls_only", "vision.select: Input should be 'drop_cls' or 'all'"),
        ("connector.name=mlp3x", "connector.name: unknown connector 'mlp3x'"),
        ("llm.config.hiden_size=8", "llm.config.hiden_size: unknown field for llama (did you mean hidden_size?)"),
        ("connector.args.scale_factor=2", "connector.args.scale_factor: unknown argument for mlp2x_gelu"),
    ],
)
def test_bad_config_exits_2_with_one_line_naming_field(override, field):
    r = run_cli("describe", "--config", str(TINY), override)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    assert field in lines[0]
    assert "Traceback" not in r.stderr


def test_feature_layer_out_of_range_exits_2():
    r = run_cli("describe", "--config", str(TINY), "vision.feature_layer=9")
    assert r.returncode == 2 and "vision.feature_layer" in r.stderr and "Traceback" not in r.stderr


def test_missing_and_malformed_files(tmp_path):
    r = run_cli("describe", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "config file not found" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("vision: [unclosed\n")
    r = run_cli("describe", "--config", str(bad))
    assert r.returncode == 2 and "invalid YAML (line" in r.stderr and str(bad) in r.stderr


@pytest.mark.parametrize("argv", [
    ["describe", "--config", str(TINY), "vision.select=cls_only"],
    ["run", str(CONFIGS / "recipes" / "demo.yaml"), "--out", "{tmp}/run", "sft.optim.lr=-1"],
    ["fit", "--config", str(CONFIGS / "recipes" / "demo.yaml"), "--out", "{tmp}/fit"],  # a recipe is no stage
    ["plan", "--config", str(CONFIGS / "recipes" / "demo.yaml"), "--gpu-memory=abc"],
], ids=["describe", "run", "fit", "plan"])
def test_config_errors_exit_2_before_torch_is_imported(argv, tmp_path):
    """Fast errors: a bad config is reported before torch, transformers or Lightning load (seconds of start-up)."""
    code = ("import sys; from vlmtrain.cli.main import main; rc = main(sys.argv[1:]); "
            "print(rc, sorted(m for m in ('torch', 'transformers', 'lightning') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, *(a.format(tmp=tmp_path) for a in argv)], capture_output=True,
                       text=True, timeout=120)
    assert r.stdout.split("\n")[-2] == "2 []", (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
