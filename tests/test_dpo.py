"""DPO objective: parity with TRL 1.16 (called directly, no trainer built), hand-computed numbers, gradients."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vlmtrain.data.chat import IGNORE
from vlmtrain.train.dpo import DPO_LOSS_TYPES, DPOOutput, dpo_loss, sequence_logps

SEEDS = (0, 1, 2)
BETAS = (0.05, 0.1, 0.5, 2.0)


def random_logps(seed: int, b: int = 8):
    """Summed log-probs of plausible size; reference close to policy so that delta changes sign across pairs."""
    g = torch.Generator().manual_seed(seed)
    pc = -torch.empty(b).uniform_(20, 200, generator=g)
    pr = -torch.empty(b).uniform_(20, 200, generator=g)
    rc = pc + 5 * torch.randn(b, generator=g)
    rr = pr + 5 * torch.randn(b, generator=g)
    n_c = torch.randint(1, 60, (b,), generator=g)
    n_r = torch.randint(1, 60, (b,), generator=g)
    return pc, pr, rc, rr, n_c, n_r


# --------------------------------------------------------------------------------------------- TRL, called directly

@pytest.fixture(scope="module")
def trl_dpo():
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer

    return DPOTrainer._compute_loss  # plain function; `self` only needs the attributes it reads


class _Acc:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _trl_self(beta, loss_type, label_smoothing):
    """The attributes `DPOTrainer._compute_loss` reads, for reverse-KL DPO with precomputed reference log-probs."""
    return SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Acc(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        args=SimpleNamespace(discopop_tau=0.05),
    )


def _fake_fused_model(pc, pr, seq_len):
    """Stands in for the fused-LM-head forward: per-token log-probs whose row sums are the given sequence logps."""
    b2 = 2 * pc.shape[0]
    log_probs = torch.zeros(b2, seq_len - 1, dtype=pc.dtype)
    log_probs[:, 0] = torch.cat([pc, pr])  # sum over a row is exact: one non-zero entry

    def forward(**kwargs):
        assert kwargs["fused_lm_head"] is True
        return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(b2, seq_len - 1),
                               mean_logits=torch.zeros(b2, seq_len - 1),
                               is_top1=torch.zeros(b2, seq_len - 1, dtype=torch.bool))

    return forward


def trl_batch(compute_loss, pc, pr, rc, rr, n_c, n_r, beta, loss_type, label_smoothing=0.0):
    """TRL's (mean) loss and logged metrics for one batch; the completion mask carries n_c / n_r tokens."""
    seq_len = int(max(n_c.max(), n_r.max())) + 2
    completion_mask = torch.zeros(2 * pc.shape[0], seq_len, dtype=torch.long)
    for i, n in enumerate(torch.cat([n_c, n_r]).tolist()):
        completion_mask[i, 1:1 + n] = 1  # position 0 is prompt
    inputs = {"input_ids": torch.ones(2 * pc.shape[0], seq_len, dtype=torch.long),
              "attention_mask": torch.ones(2 * pc.shape[0], seq_len, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    fake = _trl_self(beta, loss_type, label_smoothing)
    loss = compute_loss(fake, _fake_fused_model(pc, pr, seq_len), inputs, False)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


def trl_per_pair(compute_loss, pc, pr, rc, rr, n_c, n_r, beta, loss_type, label_smoothing=0.0):
    """TRL reduces with a mean, so per-pair losses come from batches of one pair."""
    return torch.stack([
        trl_batch(compute_loss, pc[i:i + 1], pr[i:i + 1], rc[i:i + 1], rr[i:i + 1], n_c[i:i + 1], n_r[i:i + 1],
                  beta, loss_type, label_smoothing)[0]
        for i in range(pc.shape[0])
    ])


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_losses_match_trl(trl_dpo, loss_type):
    hinge_regions = set()
    for seed in SEEDS:
        pc, pr, rc, rr, n_c, n_r = random_logps(seed)
        for beta in BETAS:
            out = dpo_loss(pc, pr, rc, rr, beta, loss_type, chosen_n_tokens=n_c, rejected_n_tokens=n_r)
            expected = trl_per_pair(trl_dpo, pc, pr, rc, rr, n_c, n_r, beta, loss_type)
            torch.testing.assert_close(out.losses, expected, rtol=1e-6, atol=1e-6)
            # whole batch: TRL's mean loss and its logged reward metrics
            loss, metrics = trl_batch(trl_dpo, pc, pr, rc, rr, n_c, n_r, beta, loss_type)
            torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=1e-6)
            ours = out.metrics()
            for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
                assert ours[key] == pytest.approx(metrics[key], rel=1e-6, abs=1e-6), key
            if loss_type == "hinge":
                hinge_regions.update((out.losses > 0).tolist())
    if loss_type == "hinge":
        assert hinge_regions == {True, False}, "inputs must exercise both sides of the hinge"


def test_sigmoid_label_smoothing_is_cdpo(trl_dpo):
    """cDPO smoothing. TRL 1.16's `sigmoid` ignores label_smoothing; its `aot` branch applies exactly the cDPO
    formula to sort(policy logratios) - sort(ref logratios), which for one pair is delta itself. `aot` groups the
    subtraction as (pc - pr) - (rc - rr), so in float32 it differs by rounding (~1e-5 on logps ~ -200): that
    comparison runs in float64."""
    for seed in SEEDS:
        pc, pr, rc, rr, n_c, n_r = random_logps(seed)
        for beta in BETAS:
            for eps in (0.0, 0.1):
                out = dpo_loss(pc, pr, rc, rr, beta, "sigmoid", label_smoothing=eps)
                out64 = dpo_loss(pc.double(), pr.double(), rc.double(), rr.double(), beta, label_smoothing=eps)
                expected = trl_per_pair(trl_dpo, pc.double(), pr.double(), rc.double(), rr.double(), n_c, n_r,
                                        beta, "aot", eps)
                torch.testing.assert_close(out64.losses, expected, rtol=1e-12, atol=1e-12)
                delta = (pc - rc) - (pr - rr)
                closed = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
                torch.testing.assert_close(out.losses, closed, rtol=1e-6, atol=1e-6)
            # the documented divergence: TRL's own sigmoid with eps=0.1 is the unsmoothed loss
            plain = trl_per_pair(trl_dpo, pc, pr, rc, rr, n_c, n_r, beta, "sigmoid", 0.1)
            torch.testing.assert_close(plain, dpo_loss(pc, pr, rc, rr, beta).losses, rtol=1e-6, atol=1e-6)
            assert not torch.allclose(plain, dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.1).losses)


def test_ipo_is_length_normalised_like_trl(trl_dpo):
    """TRL 1.16 divides each IPO log-ratio by its completion length; unit counts give the paper's formula."""
    pc, pr, rc, rr, n_c, n_r = random_logps(3)
    beta = 0.1
    normed = dpo_loss(pc, pr, rc, rr, beta, "ipo", chosen_n_tokens=n_c, rejected_n_tokens=n_r).losses
    ones = torch.ones_like(n_c)
    raw = dpo_loss(pc, pr, rc, rr, beta, "ipo", chosen_n_tokens=ones, rejected_n_tokens=ones).losses
    torch.testing.assert_close(raw, ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2)
    assert not torch.allclose(normed, raw)
    torch.testing.assert_close(normed, trl_per_pair(trl_dpo, pc, pr, rc, rr, n_c, n_r, beta, "ipo"),
                               rtol=1e-6, atol=1e-6)


# -------------------------------------------------------------------------------------------------- hand numbers

def test_hand_computed_tiny_case():
    t = lambda x: torch.tensor([x])  # noqa: E731
    pc, pr, rc, rr = t(-1.0), t(-3.0), t(-2.0), t(-2.5)  # chosen logratio 1, rejected -0.5, delta 1.5
    beta = 0.5  # beta * delta = 0.75
    out = dpo_loss(pc, pr, rc, rr, beta)
    assert out.losses.item() == pytest.approx(0.38687101, abs=1e-7)  # log(1 + e^-0.75)
    assert dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.1).losses.item() == pytest.approx(
        0.9 * 0.38687101 + 0.1 * 1.13687101, abs=1e-7)  # + 0.1 * log(1 + e^0.75)
    assert dpo_loss(pc, pr, rc, rr, beta, "hinge").losses.item() == pytest.approx(0.25, abs=1e-7)
    ipo = dpo_loss(pc, pr, rc, rr, beta, "ipo", chosen_n_tokens=t(2), rejected_n_tokens=t(4))
    assert ipo.losses.item() == pytest.approx(0.140625, abs=1e-7)  # (1/2 + 0.5/4 - 1/(2*0.5))^2
    for o in (out, ipo):  # rewards are never length-normalised
        assert o.chosen_rewards.item() == pytest.approx(0.5)
        assert o.rejected_rewards.item() == pytest.approx(-0.25)
        assert o.reward_margin.item() == pytest.approx(0.75)
        assert o.reward_accuracy.item() == 1.0


def test_rewards_detached_and_accuracy():
    pc = torch.tensor([-1.0, -5.0, -2.0, -4.0], requires_grad=True)
    pr = torch.tensor([-2.0, -1.0, -2.0, -4.0])
    ref = torch.zeros(4)
    out = dpo_loss(pc, pr, ref, ref, beta=0.1)
    assert isinstance(out, DPOOutput)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert out.losses.requires_grad and out.losses.shape == (4,)
    assert out.reward_correct.tolist() == [True, False, False, False]  # ties are not correct
    assert out.reward_accuracy.item() == 0.25
    torch.testing.assert_close(out.reward_margin, 0.1 * (pc.detach() - pr))


def test_bad_arguments():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="sigmoid.*ipo.*hinge"):
        dpo_loss(x, x, x, x, 0.1, "dpo")
    with pytest.raises(ValueError, match="n_tokens"):
        dpo_loss(x, x, x, x, 0.1, "ipo")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, 0.1, "hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, 0.1, "sigmoid", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, 0.0)
    with pytest.raises(ValueError, match=r"\[b\]"):
        dpo_loss(x, torch.zeros(4), x, x, 0.1)


# ----------------------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("beta", BETAS)
def test_sigmoid_gradient_is_analytic(beta):
    pc, pr, rc, rr, _, _ = random_logps(7)
    pc, pr, rc, rr = (t.clone().requires_grad_(True) for t in (pc, pr, rc, rr))
    dpo_loss(pc, pr, rc, rr, beta).losses.sum().backward()
    delta = ((pc - rc) - (pr - rr)).detach()
    g = beta * torch.sigmoid(-beta * delta)  # d loss / d delta = -g
    torch.testing.assert_close(pc.grad, -g)
    torch.testing.assert_close(pr.grad, g)
    torch.testing.assert_close(rc.grad, g)
    torch.testing.assert_close(rr.grad, -g)
    assert (g > 0).all()


def test_smoothed_and_ipo_gradients_are_analytic():
    pc, pr, rc, rr, n_c, n_r = random_logps(8)
    beta, eps = 0.1, 0.1
    delta = (pc - rc) - (pr - rr)
    p = pc.clone().requires_grad_(True)
    dpo_loss(p, pr, rc, rr, beta, label_smoothing=eps).losses.sum().backward()
    torch.testing.assert_close(p.grad, -beta * ((1 - eps) * torch.sigmoid(-beta * delta)
                                                - eps * torch.sigmoid(beta * delta)))
    p = pc.clone().requires_grad_(True)
    dpo_loss(p, pr, rc, rr, beta, "ipo", chosen_n_tokens=n_c, rejected_n_tokens=n_r).losses.sum().backward()
    avg = (pc - rc) / n_c - (pr - rr) / n_r
    torch.testing.assert_close(p.grad, 2 * (avg - 1 / (2 * beta)) / n_c)


# ----------------------------------------------------------------------------------------------- sequence_logps

def random_logits_labels(seed, b=4, s=23, v=50, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(b, s, v, generator=g)).to(dtype)
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[:, :5] = IGNORE  # prompt / image slots
    labels[0, 9:13] = IGNORE  # a masked span in the middle (second turn's user text)
    labels[1, -4:] = IGNORE  # right padding
    labels[3] = IGNORE  # fully masked row
    return logits, labels


def reference_loop(logits, labels):
    """Straightforward per-token loop in float64."""
    out, counts = [], []
    for row_logits, row_labels in zip(logits.double(), labels):
        total, n = torch.zeros((), dtype=torch.float64), 0
        for t in range(1, row_labels.shape[0]):
            if row_labels[t] != IGNORE:
                total = total + torch.log_softmax(row_logits[t - 1], -1)[row_labels[t]]
                n += 1
        out.append(total)
        counts.append(n)
    return torch.stack(out), torch.tensor(counts)


@pytest.mark.parametrize("seed", SEEDS)
def test_sequence_logps_matches_reference_loop(seed):
    logits, labels = random_logits_labels(seed)
    logps, n = sequence_logps(logits, labels)
    ref, ref_n = reference_loop(logits, labels)
    assert logps.dtype == torch.float32 and n.tolist() == ref_n.tolist()
    assert n[3] == 0 and logps[3] == 0
    torch.testing.assert_close(logps.double(), ref, rtol=1e-6, atol=1e-5)
    logps64, _ = sequence_logps(logits.double(), labels)  # float64 stays float64: tight
    torch.testing.assert_close(logps64, ref, rtol=1e-12, atol=1e-10)


def test_sequence_logps_bf16_is_scored_in_fp32():
    logits, labels = random_logits_labels(5, dtype=torch.bfloat16)
    logps, _ = sequence_logps(logits, labels)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, sequence_logps(logits.float(), labels)[0], rtol=0, atol=0)


def test_sequence_logps_matches_trl_selective_log_softmax():
    pytest.importorskip("trl")
    from trl.trainer.utils import selective_log_softmax

    for seed in SEEDS:
        logits, labels = random_logits_labels(seed)
        shift = labels[:, 1:]
        per_token = selective_log_softmax(logits[:, :-1], shift.clamp(min=0)) * (shift != IGNORE)
        torch.testing.assert_close(sequence_logps(logits, labels)[0], per_token.sum(1), rtol=1e-6, atol=1e-5)


def test_sequence_logps_gradient_matches_log_softmax():
    logits, labels = random_logits_labels(4)
    a = logits.clone().requires_grad_(True)
    sequence_logps(a, labels)[0].sum().backward()
    b_ = logits.clone().requires_grad_(True)
    shift = labels[:, 1:]
    lp = torch.log_softmax(b_[:, :-1], -1).gather(-1, shift.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    (lp * (shift != IGNORE)).sum().backward()
    torch.testing.assert_close(a.grad, b_.grad)


def test_end_to_end_against_trl_fused_head(trl_dpo):
    """A real (tiny) causal LM through TRL's fused LM head and DPO loss vs. logits -> sequence_logps -> dpo_loss."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    b, s = 3, 17
    input_ids = torch.randint(0, 61, (2 * b, s))
    completion_mask = torch.zeros(2 * b, s, dtype=torch.long)
    for i, (start, end) in enumerate([(5, 17), (3, 10), (8, 17), (4, 15), (6, 12), (2, 17)]):
        completion_mask[i, start:end] = 1
    labels = input_ids.masked_fill(completion_mask == 0, IGNORE)
    with torch.no_grad():
        logps, n_tokens = sequence_logps(model(input_ids=input_ids).logits, labels)
    assert n_tokens.tolist() == completion_mask.sum(1).tolist()
    ref = logps + torch.randn(2 * b)  # stand-in reference model
    (pc, pr), (rc, rr), (n_c, n_r) = logps.chunk(2), ref.chunk(2), n_tokens.chunk(2)

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    with torch.no_grad():
        trl_token_logps = model(input_ids=input_ids, labels=labels, fused_lm_head=True).log_probs
    torch.testing.assert_close(logps, trl_token_logps.sum(1), rtol=1e-6, atol=1e-5)

    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "completion_mask": completion_mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    for loss_type in DPO_LOSS_TYPES:
        fake = _trl_self(0.1, loss_type, 0.0)
        fake.model = model
        with torch.no_grad():
            trl_loss = trl_dpo(fake, model, inputs, False)
        ours = dpo_loss(pc, pr, rc, rr, 0.1, loss_type, chosen_n_tokens=n_c, rejected_n_tokens=n_r)
        torch.testing.assert_close(ours.loss, trl_loss, rtol=1e-5, atol=1e-5)


def test_sequence_logps_shape_errors():
    with pytest.raises(ValueError, match="logits"):
        sequence_logps(torch.zeros(2, 5, 7), torch.zeros(2, 6, dtype=torch.long))
    assert math.isfinite(sequence_logps(torch.zeros(1, 3, 4), torch.full((1, 3), IGNORE))[0].item())
