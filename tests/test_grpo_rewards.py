"""GRPO rewards and advantages against TRL 1.16's own `GRPOTrainer`: a real trainer around a tiny causal LM runs
`_generate_and_score_completions` (generation, reward calls, advantages) and vlmtrain scores the same completions.
Also: the shipped rewards on hand-made cases, the registry's errors, dynamic sampling."""

import asyncio
import math
import re
import sys
import textwrap

import pytest
import torch

from vlmtrain.errors import ConfigError, VlmtrainError
from vlmtrain.train.grpo import reward_fns as rf
from vlmtrain.train.grpo.advantages import (group_advantages, groups_with_spread, keep_groups, reward_metrics,
                                            weighted_rewards)
from vlmtrain.train.grpo.loss import mask_truncated
from vlmtrain.train.grpo.rewards import RewardSet, load_rewards, resolve_reward

G = 4
PROMPTS = [[{"role": "user", "content": "one two"}], [{"role": "user", "content": "three"}]]
INPUTS = ([{"prompt": PROMPTS[0], "answer": "seven", "boxes": [1, 2, 3, 4]}] * G
          + [{"prompt": PROMPTS[1], "answer": "B", "boxes": None}] * G)
SCRIPT: dict[str, list] = {}  # the scripted rewards the two functions below return
SEEN: dict[str, dict] = {}  # kwargs each function received, by caller


def scripted(prompts, completions, **kwargs):
    SEEN[SCRIPT["caller"]] = {"prompts": prompts, "completions": completions, **kwargs}
    return list(SCRIPT["sync"])


async def scripted_async(prompts, completions, answer, **kwargs):
    await asyncio.sleep(0)
    return list(SCRIPT["async"])


# TRL's documentation style (GRPOTrainer docs, "Using a custom reward function"), unchanged
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion[0]["content"])) for completion in completions]


def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def _tiny_trainer(reward_funcs, weights, **config):
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from vlmtrain.model.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(300)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id))
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = 4.0  # the end token is likely: some completions stop, others run to the limit
    model.lm_head.bias = torch.nn.Parameter(bias)
    args = GRPOConfig(output_dir=config.pop("output_dir"), per_device_train_batch_size=2 * G, num_generations=G,
                      max_completion_length=5, use_cpu=True, report_to=[], save_strategy="no",
                      reward_weights=weights, **config)
    return GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, processing_class=tok,
                       train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]))


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory):
    pytest.importorskip("trl")
    return _tiny_trainer([scripted, scripted_async], [1.0, 0.5], output_dir=str(tmp_path_factory.mktemp("trl")))


def _trl_score(trainer, sync, async_, scale_rewards):
    SCRIPT.update({"sync": sync, "async": async_, "caller": "trl"})
    trainer.scale_rewards = scale_rewards
    out = trainer._generate_and_score_completions([dict(x) for x in INPUTS])
    return out, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _ours(trl_seen, rewards: RewardSet, caller="vlmtrain"):
    """vlmtrain's reward call on the prompts, completions and columns TRL's trainer produced."""
    SCRIPT["caller"] = caller
    columns = {k: [x[k] for x in INPUTS] for k in ("answer", "boxes")}
    return rewards.score(trl_seen["prompts"], trl_seen["completions"], trl_seen["completion_ids"], columns)


CASES = [  # (sync rewards, async rewards): None = the function does not apply to that completion
    ([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0], [None, None, None, None, 1.0, None, 0.5, None]),  # group 0: no spread
    ([0.0, 1.0, None, 3.0, 2.0, None, 2.0, 2.0], [1.0, None, None, -1.0, 0.0, None, 0.0, 0.0]),  # 2, 5: unscorable
    ([0.3, -1.2, 0.8, 2.5, 0.1, 0.1, 0.1, 0.1], [0.7, 0.7, 0.2, None, None, None, None, None]),  # group 1: no spread
]


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_and_reward_calls_match_trl(trl_trainer, scale_rewards):
    ours_set = load_rewards([{"fn": "test_grpo_rewards:scripted", "weight": 1.0},
                             {"fn": "test_grpo_rewards:scripted_async", "weight": 0.5}])
    assert ours_set.names == ["scripted", "scripted_async"]
    for sync, async_ in CASES:
        out, metrics = _trl_score(trl_trainer, sync, async_, scale_rewards)
        per_func = _ours(SEEN["trl"], ours_set)
        expected = torch.tensor([[math.nan if v is None else v for v in col] for col in (sync, async_)]).T
        torch.testing.assert_close(per_func, expected, equal_nan=True)
        adv = group_advantages(weighted_rewards(per_func, ours_set.weights), G, scale_rewards)
        torch.testing.assert_close(adv.advantages, out["advantages"], atol=1e-6, rtol=0)
        if scale_rewards != "batch":  # TRL's batch mode reports whether the whole batch has zero spread
            assert adv.zero_spread_fraction == pytest.approx(metrics["frac_reward_zero_std"])
        for name, value in reward_metrics(per_func, ours_set.weights, ours_set.names).items():
            assert value == pytest.approx(metrics[name], abs=1e-6, nan_ok=True), name
    # the keyword arguments TRL passes, and their values (trainer_state is TRL's TrainerState there)
    assert set(SEEN["vlmtrain"]) == set(SEEN["trl"])
    for key in ("prompts", "completions", "completion_ids", "answer", "boxes"):
        assert SEEN["vlmtrain"][key] == SEEN["trl"][key], key
    assert SEEN["vlmtrain"]["trainer_state"].global_step == SEEN["trl"]["trainer_state"].global_step


def test_trl_documentation_reward_functions_run_unchanged(tmp_path):
    """Functions written for TRL (its docs' custom rewards, and `trl.rewards.think_format_reward` by path) give
    vlmtrain the same rewards as they give TRL's trainer on the same completions."""
    pytest.importorskip("trl")
    from trl.rewards import think_format_reward

    trainer = _tiny_trainer([scripted, reward_len, format_reward_func, think_format_reward], [0.0, 1.0, 1.0, 1.0],
                            output_dir=str(tmp_path))
    _trl_score(trainer, [0.0] * 2 * G, [None] * 2 * G, "group")
    ours = load_rewards([{"fn": "test_grpo_rewards:scripted"}, {"fn": "test_grpo_rewards:reward_len"},
                         {"fn": "test_grpo_rewards:format_reward_func"}, {"fn": "trl.rewards:think_format_reward"}])
    per_func = _ours(SEEN["trl"], ours)
    for i, name in enumerate(["reward_len", "format_reward_func", "think_format_reward"], start=1):
        assert per_func[:, i].tolist() == list(trainer._logs["rewards"][name])[-2 * G:], name
    assert len(set(per_func[:, 1].tolist())) > 1  # completions of different lengths: not a constant


def test_mask_truncated_matches_trl(trl_trainer):
    trl_trainer.mask_truncated_completions = True
    torch.manual_seed(3)
    try:
        out, _ = _trl_score(trl_trainer, [0.0] * 2 * G, [None] * 2 * G, "group")
    finally:
        trl_trainer.mask_truncated_completions = False
    ids = SEEN["trl"]["completion_ids"]
    full = (torch.arange(out["completion_mask"].shape[1])[None] < torch.tensor([len(i) for i in ids])[:, None])
    stop = {trl_trainer.processing_class.eos_token_id, trl_trainer.processing_class.pad_token_id}
    ours = mask_truncated(full.long(), ids, stop)
    assert torch.equal(ours, out["completion_mask"])
    cut = (ours.sum(1) == 0)
    assert 0 < cut.sum() < len(ids), "the case should hold truncated and stopped completions"


def test_dynamic_sampling_drops_zero_spread_groups():
    nan = math.nan
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 2.0, 2.0, nan, 2.0, 1.0, nan, nan, nan])
    keep = groups_with_spread(rewards, G)
    assert keep.tolist() == [False, True, False, False]  # NaN (unscorable) does not count as spread
    ids = torch.arange(16)
    (kept,) = keep_groups(keep, G, ids)
    assert kept.tolist() == [4, 5, 6, 7]
    assert group_advantages(rewards, G).zero_spread.tolist() == [True, False, True, False]  # as TRL's metric


def test_group_advantages_by_hand():
    r = torch.tensor([0.0, 1.0, 2.0, 3.0])
    std = torch.tensor([0.0, 1.0, 2.0, 3.0]).std()  # Bessel-corrected, as TRL
    torch.testing.assert_close(group_advantages(r, 4, "none").advantages, r - 1.5)
    torch.testing.assert_close(group_advantages(r, 4, "group").advantages, (r - 1.5) / (std + 1e-4))
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        group_advantages(r, 3)


# ------------------------------------------------------------------------------------------------ shipped rewards

def chat(text):
    return [{"role": "assistant", "content": text}]


def test_accuracy_exact_match_and_numeric_tolerance():
    completions = ["Seven.", chat("<think>hmm</think><answer> 7 </answer>"), "The seven", "3.14159", "1,000",
                   "2.5", "seven apples", "x"]
    answer = ["seven", "7", "seven", "3.1416", "1000", "<answer>2.6</answer>", "seven", None]
    assert rf.accuracy(completions, answer=answer) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, None]
    assert rf.accuracy(["12"], solution=["<answer>12.0</answer>"]) == [1.0]
    assert rf.accuracy(["0.1"], answer=["0.1000001"], rel_tol=0.0, abs_tol=0.0) == [0.0]


def test_multiple_choice_letter():
    completions = ["B", "(C) a red car", "The answer is D.", "<answer>A.</answer>", "I think B", "a cat"]
    answer = ["B", "(C) red", "D", "A", "B", "A"]
    assert rf.multiple_choice(completions, answer=answer) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert rf.multiple_choice(["B"], answer=["seven"]) == [None]  # no letter in the ground truth


def test_think_answer_format():
    good = "<think>\nreasoning\n</think>\n<answer>7</answer>\n"
    bad = ["<answer>7</answer>", "<think>a</think>", "x <think>a</think><answer>7</answer>",
           "<think>a</think><answer>7</answer> trailing", "<think>a</think><think>b</think><answer>7</answer>"]
    assert rf.think_answer_format([good, chat(good), *bad]) == [1.0, 1.0] + [0.0] * len(bad)


def test_box_iou_in_original_coordinates():
    # the model saw a 2× downscaled image (200×100 → 100×50) and answers in its pixels
    resize = {"original": [200, 100], "resized": [100, 50]}
    completions = ["<answer>[10, 10, 30, 30]</answer>", "[10, 10, 30, 30]", "no box here", "[0, 0, 10, 10]"]
    truth = [[20, 20, 60, 60], [20, 20, 60, 60], [20, 20, 60, 60], None]
    out = rf.box_iou(completions, boxes=truth, image_resize=[resize, (200, 100, 100, 50), resize, resize])
    assert out == [1.0, 1.0, 0.0, None]
    # without the resize the same answer is compared in the wrong frame: IoU of [10,10,30,30] and [20,20,60,60]
    assert rf.box_iou(completions[:1], boxes=truth[:1]) == [pytest.approx(100 / (400 + 1600 - 100))]
    assert rf.box_iou(["(1, 2, 3, 4)"], answer=["[1, 2, 3, 4]"]) == [1.0]


def test_length_penalty_is_dapo_soft_overlong_and_matches_trl():
    pytest.importorskip("trl")
    from trl.rewards import get_soft_overlong_punishment

    ids = [[0] * n for n in (0, 5, 12, 16, 19, 20, 21, 40)]
    ours = rf.length_penalty(ids, max_length=20, cache=8)
    assert ours == get_soft_overlong_punishment(20, 8)(completion_ids=ids)
    assert ours[:2] == [0.0, 0.0] and ours[-2:] == [-1.0, -1.0]


# --------------------------------------------------------------------------------------------------- the registry

def test_registry_short_names_paths_args_and_weights():
    rs = load_rewards([{"fn": "accuracy", "weight": 2.0},
                       {"fn": "vlmtrain.train.grpo.reward_fns:length_penalty", "args": {"max_length": 4, "cache": 2}},
                       {"fn": "length_penalty", "args": {"max_length": 8, "cache": 2}}])
    assert rs.names == ["accuracy", "length_penalty", "length_penalty_2"]
    assert rs.weights.tolist() == [2.0, 1.0, 1.0]
    out = rs.score(["q", "q"], ["seven", "six"], [[1, 2, 3], [1] * 8], {"answer": ["seven", "seven"]})
    torch.testing.assert_close(out, torch.tensor([[1.0, -0.5, 0.0], [0.0, -1.0, -1.0]]))


BARRIER: dict = {}


async def ping(prompts, completions, **kwargs):
    BARRIER["ping"].set()
    await asyncio.wait_for(BARRIER["pong"].wait(), 5)  # only returns if pong runs at the same time
    return [1.0] * len(prompts)


async def pong(prompts, completions, **kwargs):
    BARRIER["pong"].set()
    await asyncio.wait_for(BARRIER["ping"].wait(), 5)
    return [2.0] * len(prompts)


class Logging:  # a callable object, as TRL allows
    def __call__(self, prompts, completions, log_extra, log_metric, **kwargs):
        log_extra("verdict", ["ok"] * len(prompts))
        log_metric("custom/score", 0.5)
        return [0.0] * len(prompts)


LOGGING = Logging()


def test_async_rewards_run_concurrently_and_logging_hooks_collect():
    rs = load_rewards([{"fn": "test_grpo_rewards:ping"}, {"fn": "test_grpo_rewards:pong"},
                       {"fn": "test_grpo_rewards:LOGGING"}])
    BARRIER.update(ping=asyncio.Event(), pong=asyncio.Event())
    assert rs.score(["p"] * 2, ["c"] * 2).tolist() == [[1.0, 2.0, 0.0]] * 2
    assert rs.extra_columns == {"verdict": ["ok", "ok"]} and rs.logged_metrics == {"custom/score": [0.5]}

    async def from_a_running_loop():  # a notebook: scoring is called while an event loop runs
        BARRIER.update(ping=asyncio.Event(), pong=asyncio.Event())
        return rs.score(["p"], ["c"]).tolist()

    assert asyncio.run(from_a_running_loop()) == [[1.0, 2.0, 0.0]]


def test_module_in_working_directory_is_found(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_cwd.py").write_text(textwrap.dedent("""
        async def shout(prompts, completions, **kwargs):
            return [float(c.isupper()) for c in completions]
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    rs = load_rewards([{"fn": "my_rewards_cwd:shout"}])
    assert rs.score(["p", "p"], ["HI", "hi"]).tolist() == [[1.0], [0.0]]


@pytest.mark.parametrize("spec, message", [
    ({"fn": "no_such_module_xyz:f"}, "grpo.rewards[0].fn: cannot import module 'no_such_module_xyz'"),
    ({"fn": "vlmtrain.train.grpo.reward_fns:nope"}, "grpo.rewards[0].fn: module 'vlmtrain.train.grpo.reward_fns' "
                                                    "has no 'nope'"),
    ({"fn": "accuracyy"}, "grpo.rewards[0].fn: unknown reward 'accuracyy'; give 'package.module:function' or one of"),
    ({"fn": "vlmtrain.train.grpo.reward_fns:SHIPPED"}, "is dict, not a function"),
    ({"fn": ":f"}, "is not 'package.module:function'"),
    ({"fn": "length_penalty", "args": {"max_len": 3}},
     "grpo.rewards[0].args: length_penalty has no parameter 'max_len'"),
])
def test_bad_reward_paths_are_one_config_error(spec, message):
    with pytest.raises(ConfigError) as e:
        load_rewards([spec])
    assert e.value.exit_code == 2 and len(e.value.problems) == 1
    assert message in e.value.problems[0]


def test_reward_output_errors_name_the_function():
    rs = RewardSet([])
    with pytest.raises(VlmtrainError, match="reward 'f' returned 1 values; expected a list of 2"):
        rs._check("f", [1.0], 2)
    with pytest.raises(VlmtrainError, match=r"reward 'f': value 1 is str \('1'\); expected a number or None"):
        rs._check("f", [1.0, "1"], 2)
    assert resolve_reward("accuracy") is rf.accuracy
