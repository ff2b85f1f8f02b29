"""GRPO losses: loss, gradients and logged metrics equal TRL 1.16 `GRPOTrainer._compute_loss` (called directly on a
stand-in trainer that holds only the attributes it reads; TRL's own `_get_per_token_logps_and_entropies` runs on a
fake fused-head model that returns the test's per-token log-probs)."""

from collections import defaultdict
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from vlmtrain.train.grpo.loss import LOSS_TYPES, grpo_loss

B, G, P, T = 8, 4, 3, 6  # completions, generations per prompt, prompt tokens, completion tokens
MAX_COMPLETION = 7  # dr_grpo's constant normaliser (longer than any completion here, as in a real run)


@pytest.fixture(scope="module")
def trl_grpo():
    pytest.importorskip("trl")
    from trl.trainer.grpo_trainer import GRPOTrainer

    return GRPOTrainer


class _Acc:
    device = torch.device("cpu")
    num_processes = 1
    is_main_process = True

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    @staticmethod
    def autocast():
        return nullcontext()


def _trl_self(trainer_cls, loss_type, beta, epsilon, epsilon_high):
    """What `_compute_loss` reads; gspo is TRL's grpo loss with sequence-level importance sampling."""
    fake = SimpleNamespace(
        loss_type="grpo" if loss_type == "gspo" else loss_type,
        importance_sampling_level="sequence" if loss_type == "gspo" else "token",
        beta=beta, epsilon_low=epsilon, epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        top_entropy_quantile=1.0, aux_loss_enabled=False, off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False, max_completion_length=MAX_COMPLETION,
        current_gradient_accumulation_steps=1, model=SimpleNamespace(training=True), accelerator=_Acc(),
        state=SimpleNamespace(global_step=0), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1, report_to=[]),
    )
    fake._get_per_token_logps_and_entropies = (
        lambda *a, **k: trainer_cls._get_per_token_logps_and_entropies(fake, *a, **k))
    return fake


def _fused_model(logps, entropies):
    """Stands in for TRL's fused-LM-head forward: per-token log-probs over prompt + completion positions."""

    def forward(**kwargs):
        assert kwargs["fused_lm_head"] is True
        pad = torch.zeros(logps.shape[0], P, dtype=logps.dtype)
        return SimpleNamespace(log_probs=torch.cat([pad, logps], 1), entropy=torch.cat([pad, entropies], 1))

    return forward


def _batch(seed):
    """Completions of varied length (one fully masked: a truncated completion under mask_truncated_completions),
    old log-probs off by up to ~0.5 nats (num_iterations > 1: ratios beyond both clip edges) and a reference."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 3, 1, 5, 0, 6, 2, 4])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    logps = -2 * torch.rand(B, T, generator=g)
    old = logps + 0.3 * torch.randn(B, T, generator=g)
    ref = logps + 0.4 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    adv[3] = 0.0
    ent = torch.rand(B, T, generator=g)
    return logps, old, ref, adv, mask, ent


def _trl_loss(trainer_cls, logps, old, ref, adv, mask, ent, loss_type, beta, epsilon, epsilon_high):
    fake = _trl_self(trainer_cls, loss_type, beta, epsilon, epsilon_high)
    inputs = {"prompt_ids": torch.ones(B, P, dtype=torch.long), "prompt_mask": torch.ones(B, P, dtype=torch.long),
              "completion_ids": torch.ones(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    if old is not None:
        inputs["old_per_token_logps"] = old
    loss = trainer_cls._compute_loss(fake, _fused_model(logps, ent), inputs)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradients_match_trl(trl_grpo, loss_type, beta):
    epsilon_high = 0.28 if loss_type == "dapo" else None  # DAPO's clip-higher
    for seed in range(3):
        logps, old, ref, adv, mask, ent = _batch(seed)
        for old_or_none in (old, None):  # num_iterations > 1, and the on-policy shortcut (old = logps.detach())
            ours_in = logps.clone().requires_grad_()
            trl_in = logps.clone().requires_grad_()
            out = grpo_loss(ours_in, old_or_none, ref, adv, mask, loss_type=loss_type, epsilon=0.2,
                            epsilon_high=epsilon_high, beta=beta, max_completion_length=MAX_COMPLETION,
                            entropies=ent)
            expected, trl_metrics = _trl_loss(trl_grpo, trl_in, old_or_none, ref, adv, mask, ent, loss_type, beta,
                                              0.2, epsilon_high)
            out.loss.backward()
            expected.backward()
            torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=0)
            torch.testing.assert_close(ours_in.grad, trl_in.grad, atol=1e-6, rtol=0)
            assert ours_in.grad.abs().sum() > 0  # the test would catch a detached loss
            names = ["entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
            names += ["kl"] if beta else []
            assert set(names) == set(out.metrics)
            for name in names:
                assert out.metrics[name].item() == pytest.approx(trl_metrics[name], abs=1e-6), name
    if old_or_none is None:
        assert out.metrics["clip_ratio/region_mean"] == 0  # ratios are exactly 1 on-policy


def test_clipping_is_exercised_and_epsilon_high_widens_it():
    """The test batches do clip (both edges), and clip-higher clips fewer positive-advantage tokens."""
    logps, old, ref, adv, mask, _ = _batch(0)
    i = int(((adv > 0) & (mask[:, 0] > 0)).nonzero()[0])
    old[i, 0] = logps[i, 0] - torch.log(torch.tensor(1.25))  # ratio 1.25: clipped at 1.2, not at 1.28
    sym = grpo_loss(logps, old, ref, adv, mask, loss_type="dapo", epsilon=0.2).metrics
    high = grpo_loss(logps, old, ref, adv, mask, loss_type="dapo", epsilon=0.2, epsilon_high=0.28).metrics
    assert sym["clip_ratio/low_mean"] > 0 and sym["clip_ratio/high_mean"] > 0
    assert high["clip_ratio/high_mean"] < sym["clip_ratio/high_mean"]
    assert high["clip_ratio/low_mean"] == sym["clip_ratio/low_mean"]


def test_on_policy_gradient_is_advantage_weighted_logp():
    """Hand-derived: with old = logps and beta = 0, the dapo gradient w.r.t. each token's log-prob is
    -A_i / n_tokens (the ratio's derivative is 1 at the sampling policy)."""
    logps, _, _, adv, mask, _ = _batch(1)
    x = logps.clone().requires_grad_()
    grpo_loss(x, None, None, adv, mask, loss_type="dapo").loss.backward()
    expected = -adv[:, None] * mask / mask.sum()
    torch.testing.assert_close(x.grad, expected.float(), atol=1e-7, rtol=0)


def test_bad_arguments_are_refused():
    logps, old, _, adv, mask, _ = _batch(0)
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'"):
        grpo_loss(logps, old, None, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="beta > 0 needs ref_logps"):
        grpo_loss(logps, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="dr_grpo needs max_completion_length"):
        grpo_loss(logps, old, None, adv, mask, loss_type="dr_grpo")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dropped_groups_leave_the_loss_as_if_never_scored(loss_type):
    """Dynamic sampling: rows with an all-zero mask and `num_sequences` = the kept rows give the loss and gradients
    of the kept rows alone (dapo: `num_items` their tokens), with a KL term that would otherwise count the dropped."""
    torch.manual_seed(0)
    logps = torch.randn(B, T, dtype=torch.float64, requires_grad=True)
    ref = logps.detach() + 0.1 * torch.randn(B, T, dtype=torch.float64)
    adv = torch.randn(B, dtype=torch.float64)
    mask = torch.ones(B, T)
    mask[:, -2:] = torch.tensor([[1, 0]] * (B // 2) + [[0, 0]] * (B // 2))
    keep = torch.tensor([True] * G + [False] * G)  # the second group dropped (its rewards all equal)
    kw = dict(loss_type=loss_type, beta=0.04, max_completion_length=MAX_COMPLETION)
    full = grpo_loss(logps, None, ref, adv, mask * keep[:, None], num_items=float((mask * keep[:, None]).sum()),
                     num_sequences=int(keep.sum()), **kw).loss
    (g_full,) = torch.autograd.grad(full, logps)
    kept = grpo_loss(logps[keep], None, ref[keep], adv[keep], mask[keep], num_items=float(mask[keep].sum()), **kw).loss
    (g_kept,) = torch.autograd.grad(kept, logps)
    torch.testing.assert_close(full, kept, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_full, g_kept, rtol=0, atol=1e-12)
    assert g_full[~keep].abs().max() == 0 and g_full[keep].abs().max() > 0
