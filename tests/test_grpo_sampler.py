"""Keyed sampling (vlmtrain/train/grpo/sampler.py): draws follow softmax of the warped scores, a row's draws depend
on its key only (not on the rows beside it or on torch's global generator), and keys are the same in every
process."""

import subprocess
import sys

import torch

from vlmtrain.train.grpo.sampler import KeyedSampler, completion_keys


def test_draws_follow_the_softmax_of_the_scores():
    """20,000 rows, each its own key, on the same scores: the frequencies match torch.softmax within 4 standard
    errors, and a -inf token (filtered by top-k/top-p or suppressed) is never drawn."""
    scores = torch.tensor([[2.0, 0.5, -1.0, 1.0, float("-inf"), 0.0]])
    n = 20_000
    out = KeyedSampler(list(range(n)))(torch.zeros(n, 1, dtype=torch.long), scores.expand(n, -1).clone())
    assert ((out == 0).sum(1) == 1).all() and torch.isinf(out).sum() == n * 5  # one-hot: 0 there, -inf elsewhere
    freq = (out == 0).double().mean(0)
    p = torch.softmax(scores[0].double(), -1)
    assert freq[4] == 0
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (freq, p)


def test_a_rows_draws_depend_on_its_key_alone():
    """Row 'key 11' draws the same tokens over 5 steps alone and among other rows with other scores, whatever
    torch's global generator holds; another key draws otherwise."""
    torch.manual_seed(0)
    scores = torch.randn(5, 3, 50)  # [steps, rows, vocab]

    def draws(keys, rows):
        sampler = KeyedSampler(keys)
        return [int(sampler(None, scores[t, rows])[0].argmax()) for t in range(5)]

    torch.manual_seed(123)
    alone = draws([11], [0])
    torch.manual_seed(456)
    assert draws([11, 12, 13], [0, 1, 2]) == alone
    assert draws([12], [0]) != alone


def test_keys_are_the_same_in_any_process_and_differ_by_step_record_and_index():
    keys = completion_keys(0, 3, ["r1", "r2"], 4)
    code = "from vlmtrain.train.grpo.sampler import completion_keys; print(completion_keys(0, 3, ['r1', 'r2'], 4))"
    # another process with another string-hash salt (a resumed run): the same keys, so not Python's hash()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONHASHSEED": "12345", "PATH": ""})
    assert r.returncode == 0, r.stderr
    assert eval(r.stdout) == keys
    assert len(set(keys)) == 8 and all(0 <= k < 2**63 for k in keys)
    assert completion_keys(0, 4, ["r1"], 1) != keys[:1] and completion_keys(1, 3, ["r1"], 1) != keys[:1]
