"""The `grpo:` section of a stage config: defaults are TRL's, bad values exit 2 with one line naming the field, a
section without the grpo objective (or the objective without a section) is refused rather than silently ignored,
and what the grpo stage does not run (DP-SGD, packing, multi-process strategies) exits 2 with its reason."""

import pytest
import yaml

from vlmtrain.cli.main import main
from vlmtrain.config.stage import REWARD_NAMES, GRPOConfig


def _fit(tmp_path, capsys, grpo: dict | None, **fields) -> tuple[int, list[str]]:
    stage = {"name": "g", "data": {"train": [{"builtin": "digits-qa"}]}, **fields}
    if grpo is not None:
        stage["grpo"] = grpo
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump(stage))
    rc = main(["fit", "--config", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, [ln for ln in err.splitlines() if ln.startswith("error:")]


GOOD = {"rewards": [{"fn": "accuracy"}]}


@pytest.mark.parametrize("change, message", [
    ({"num_generations": 1}, "grpo.num_generations: Input should be greater than or equal to 2"),
    ({"loss_type": "ppo"}, "grpo.loss_type: Input should be 'grpo', 'dr_grpo', 'dapo' or 'gspo'"),
    ({"scale_rewards": "std"}, "grpo.scale_rewards: Input should be 'group', 'batch' or 'none'"),
    ({"epsilon": 0.3, "epsilon_high": 0.2}, "grpo: epsilon_high (0.2) is below epsilon (0.3)"),
    ({"beta": -0.1}, "grpo.beta: Input should be greater than or equal to 0"),
    ({"top_p": 1.5}, "grpo.top_p: Input should be less than or equal to 1"),
    ({"temperature": 0}, "grpo.temperature: Input should be greater than 0"),
    ({"rewards": []}, "grpo.rewards: List should have at least 1 item"),
    ({"rewards": [{"fn": "acuracy"}]}, "grpo.rewards.0.fn: unknown reward 'acuracy'"),
    ({"rewards": [{"fn": "my mod:f"}]}, "grpo.rewards.0.fn: 'my mod:f' is not 'package.module:function'"),
    ({"rewards": [{"fn": "accuracy", "weight": "heavy"}]}, "grpo.rewards.0.weight: Input should be a valid number"),
    ({"rewards": [{"fn": "accuracy", "wieght": 2}]}, "grpo.rewards.0.wieght: unknown field"),
    ({}, "grpo: given but the objective is next_token; use preset: grpo"),  # valid: refused, not ignored
])
def test_bad_grpo_values_exit_2_naming_the_field(tmp_path, capsys, change, message):
    rc, lines = _fit(tmp_path, capsys, {**GOOD, **change})
    assert rc == 2
    assert len(lines) == 1, lines
    assert message in lines[0], lines[0]


DP = {"noise_multiplier": 1.0, "delta": 1e-5}


@pytest.mark.parametrize("grpo, fields, message", [
    (GOOD, {"preset": "grpo", "privacy": DP}, "privacy: DP-SGD is refused for the grpo objective: a completion's "
                                              "advantage depends on the rewards of its whole group"),
    (None, {"preset": "grpo"}, "grpo: the grpo objective needs a grpo section with at least one reward"),
    (GOOD, {"preset": "grpo", "rewards": [{"fn": "accuracy"}]}, "rewards: given both at the stage level and in "
                                                                "grpo.rewards"),
    (GOOD, {"preset": "grpo", "trainer": {"strategy": "deepspeed_zero3"}},
     "trainer.strategy: the grpo objective runs with single, ddp and fsdp, not deepspeed_zero3 yet"),
    ({**GOOD, "num_generations": 1}, {"preset": "grpo"}, "grpo.num_generations: Input should be greater than"),
])
def test_grpo_stage_refusals_exit_2_with_one_line(tmp_path, capsys, grpo, fields, message):
    rc, lines = _fit(tmp_path, capsys, grpo, **fields)
    assert rc == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_stage_level_rewards_are_the_grpo_sections():
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.train.presets import with_preset

    stage = StageConfig(**with_preset({"name": "g", "preset": "grpo", "data": {"train": [{"builtin": "digits-qa"}]},
                                       "rewards": [{"fn": "accuracy", "weight": 2.0}]}))
    assert stage.objective == "grpo" and stage.grpo.rewards[0].fn == "accuracy" and stage.grpo.rewards[0].weight == 2


def test_defaults_are_trl_grpo_config_defaults():
    pytest.importorskip("trl")
    from trl import GRPOConfig as TRLConfig

    ours = GRPOConfig(**GOOD)
    trl = TRLConfig.__dataclass_fields__
    for name in ("num_generations", "max_completion_length", "temperature", "top_p", "top_k", "loss_type", "beta",
                 "epsilon", "epsilon_high", "num_iterations", "scale_rewards", "mask_truncated_completions"):
        assert getattr(ours, name) == trl[name].default, name
    assert GRPOConfig(rewards=GOOD["rewards"], scale_rewards=False).scale_rewards == "none"  # TRL's boolean form


def test_shipped_reward_names_match_the_registry():
    from vlmtrain.train.grpo.reward_fns import SHIPPED
    from vlmtrain.train.grpo.rewards import load_rewards

    assert tuple(SHIPPED) == REWARD_NAMES
    # a validated section's rewards load as they are written
    cfg = GRPOConfig(rewards=[{"fn": "accuracy", "weight": 2.0},
                              {"fn": "length_penalty", "args": {"max_length": 64, "cache": 16}}])
    rs = load_rewards(cfg.rewards)
    assert rs.names == ["accuracy", "length_penalty"] and rs.weights.tolist() == [2.0, 1.0]


def test_memory_plan_counts_a_group_row_per_prompt():
    """`vlmtrain plan` sizes a grpo step's loss forward as one row per prompt holding its G completions (the
    activations grow with G) and says what it leaves out."""
    from conftest import TINY
    from vlmtrain.config import load_model_config
    from vlmtrain.config.stage import StageConfig
    from vlmtrain.plan import plan_stage
    from vlmtrain.train.presets import with_preset

    def plan(G):
        stage = StageConfig(**with_preset({"name": "g", "preset": "grpo", "data": {"train": [{"builtin": "x"}]},
                                           "rewards": [{"fn": "accuracy"}],
                                           "grpo": {"num_generations": G, "max_completion_length": 64}}))
        return plan_stage(stage, load_model_config(TINY), 24 * 2**30)

    small, large = plan(2), plan(8)
    assert large.parts["activations"] > small.parts["activations"]
    assert any("generation's KV cache" in n for n in large.notes)
