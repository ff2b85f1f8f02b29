"""Keyed sampling (vlmtrain/train/grpo/sampler.py): draws follow softmax of the warped scores, a row's draws depend
on its key only (not on the rows beside it or on torch's global generator), and keys are the same in every
process."""

import subprocess
import sys

import torch

from vlmtrain.train.grpo.generate import SamplingSettings
from vlmtrain.train.grpo.sampler import KeyedSampler, completion_keys

PLAIN = SamplingSettings()  # temperature 1, top-k and top-p off


def test_draws_follow_the_softmax_of_the_scores():
    """20,000 rows, each its own key, on the same scores: the frequencies match torch.softmax within 4 standard
    errors, and a -inf token (filtered by top-k/top-p or suppressed) is never drawn."""
    scores = torch.tensor([[2.0, 0.5, -1.0, 1.0, float("-inf"), 0.0]])
    n = 20_000
    out = KeyedSampler(list(range(n)), PLAIN)(torch.zeros(n, 1, dtype=torch.long), scores.expand(n, -1).clone())
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
        sampler = KeyedSampler(keys, PLAIN)
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


def test_draws_follow_the_stages_temperature_top_k_and_top_p():
    """temperature 0.5, top-k 3, top-p 0.9 on one row of scores: the frequencies match the softmax of the scores
    / 0.5 over the tokens top-k and then top-p keep (computed here by hand), the others never drawn."""
    scores = torch.tensor([[2.0, 0.5, -1.0, 1.0, 1.8, 0.0]])
    n = 20_000
    out = KeyedSampler(list(range(n)), SamplingSettings(temperature=0.5, top_p=0.9, top_k=3))(
        torch.zeros(n, 1, dtype=torch.long), scores.expand(n, -1).clone())
    freq = (out == 0).double().mean(0)
    z = scores[0].double() / 0.5
    top3 = z.topk(3).indices  # tokens 0, 4, 3
    p = torch.zeros_like(z)
    p[top3] = torch.softmax(z[top3], -1)
    order = p.argsort(descending=True)
    keep = torch.cumsum(p[order], 0) - p[order] < 0.9  # the smallest set whose mass reaches top_p
    q = torch.zeros_like(p)
    q[order[keep]] = p[order[keep]] / p[order[keep]].sum()
    assert (freq[q == 0] == 0).all() and (q > 0).sum() == 2
    assert ((freq - q).abs() <= 4 * (q * (1 - q) / n).sqrt() + 1e-12).all(), (freq, q)


def test_a_near_zero_temperature_through_generate_is_greedy():
    """Through transformers' `generate` (its processors first, the sampler last): temperature 1e-4 gives the greedy
    continuation for every key; temperature 1 gives others."""
    from conftest import tiny_bundle

    from vlmtrain.train.grpo.sampler import NEUTRAL_WARPERS

    lm = tiny_bundle().model.llm.eval()
    ids = torch.tensor([[5, 17, 42, 9]] * 8)
    kw = dict(max_new_tokens=6, pad_token_id=0, do_sample=True, **NEUTRAL_WARPERS)
    with torch.no_grad():
        greedy = lm.generate(ids, max_new_tokens=6, pad_token_id=0, do_sample=False)
        cold = lm.generate(ids, logits_processor=[KeyedSampler(list(range(8)), SamplingSettings(1e-4))], **kw)
        warm = lm.generate(ids, logits_processor=[KeyedSampler(list(range(8)), SamplingSettings(1.0))], **kw)
    assert torch.equal(cold, greedy)
    assert not torch.equal(warm, greedy)
