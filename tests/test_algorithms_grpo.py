"""Properties of GRPO advantages, the clipped surrogate, KL terms and token GRPO (TRL semantics)."""

from __future__ import annotations

import math

import pytest
import torch

from glm_training.algorithms.grpo import (
    clipped_policy_loss,
    compute_advantages,
    flow_kl,
    k3_kl,
    token_grpo_loss,
)

# ---------------------------------------------------------------------------------------------
# property 5: advantages
# ---------------------------------------------------------------------------------------------

REWARDS = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 4.0])
GROUPS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])


def test_group_scaled_advantages_match_hand_computation() -> None:
    adv, valid, stats = compute_advantages(REWARDS, GROUPS, scale_rewards="group")
    s0 = math.sqrt(2 / 3)  # population std of (1, 2, 3)
    expected = [-1 / (s0 + 1e-4), 0.0, 1 / (s0 + 1e-4), 0.0, 0.0, 0.0, -2 / (2 + 1e-4), 2 / (2 + 1e-4)]
    torch.testing.assert_close(adv, torch.tensor(expected))
    assert valid.dtype == torch.bool
    assert valid.tolist() == [True, True, True, False, False, False, True, True]
    torch.testing.assert_close(stats["zero_std_fraction"], torch.tensor(3 / 8))
    torch.testing.assert_close(stats["reward_mean"], torch.tensor(25 / 8))
    torch.testing.assert_close(stats["reward_std"], REWARDS.std(unbiased=False))


def test_batch_and_none_scaled_advantages_match_hand_computation() -> None:
    batch_std = math.sqrt(sum((r - 25 / 8) ** 2 for r in REWARDS.tolist()) / 8)
    centered = [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -2.0, 2.0]
    adv, valid, _ = compute_advantages(REWARDS, GROUPS, scale_rewards="batch")
    torch.testing.assert_close(adv, torch.tensor([c / (batch_std + 1e-4) for c in centered]))
    adv, _, _ = compute_advantages(REWARDS, GROUPS, scale_rewards="none")
    torch.testing.assert_close(adv, torch.tensor(centered))
    assert valid.tolist() == [True, True, True, False, False, False, True, True]


def test_group_ids_need_not_be_contiguous() -> None:
    rewards = torch.tensor([1.0, 10.0, 3.0, 30.0])
    adv, valid, _ = compute_advantages(rewards, torch.tensor([7, 3, 7, 3]))
    torch.testing.assert_close(adv, torch.tensor([-1 / (1 + 1e-4), -10 / (10 + 1e-4), 1 / (1 + 1e-4), 10 / (10 + 1e-4)]))
    assert valid.all()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_constant_reward_groups_get_exactly_zero_and_are_masked(scale: str) -> None:
    # the float32 mean of three copies of this value is one ulp off it: "r - mean" is not 0,
    # only the exact all-equal test gives the required exact zero
    c = 0.4900934100151062
    assert (torch.full((3,), c).sum() / 3).item() != c
    rewards = torch.tensor([c, c, c, 0.7, 0.2, 0.3, 0.3], dtype=torch.float32)
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 3])  # group 2 has size 1, group 3 size 1
    adv, valid, stats = compute_advantages(rewards, groups, scale_rewards=scale)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[[0, 1, 2, 5, 6]], torch.zeros(5))
    assert valid.tolist() == [False, False, False, True, True, False, False]
    torch.testing.assert_close(stats["zero_std_fraction"], torch.tensor(5 / 7))
    # the whole batch constant
    adv, valid, stats = compute_advantages(torch.full((4,), 3.3), torch.tensor([0, 0, 1, 1]), scale_rewards=scale)
    assert torch.equal(adv, torch.zeros(4)) and not valid.any()
    assert stats["zero_std_fraction"] == 1.0 and torch.isfinite(stats["reward_std"])
    # a single sample
    adv, valid, _ = compute_advantages(torch.tensor([2.0]), torch.tensor([0]), scale_rewards=scale)
    assert torch.equal(adv, torch.zeros(1)) and not valid.any()


def test_advantages_are_clamped() -> None:
    # in a group of 64 with one outlier the z-score is sqrt(63) ~ 7.9
    rewards = torch.zeros(64)
    rewards[0] = 1000.0
    adv, _, _ = compute_advantages(rewards, torch.zeros(64, dtype=torch.long), adv_clip_max=5.0)
    assert adv[0] == 5.0
    torch.testing.assert_close(adv[1:], torch.full((63,), -1000 / 64 / (1000 * math.sqrt(63) / 64 + 1e-4)))
    adv, _, _ = compute_advantages(rewards, torch.zeros(64, dtype=torch.long), adv_clip_max=None)
    torch.testing.assert_close(adv[0], torch.tensor(math.sqrt(63)), rtol=1e-5, atol=1e-5)
    adv, _, _ = compute_advantages(torch.tensor([-100.0, 100.0]), torch.tensor([0, 0]), scale_rewards="none", adv_clip_max=2.5)
    assert adv.tolist() == [-2.5, 2.5]


def test_advantage_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"scale_rewards must be one of \('group', 'batch', 'none'\)"):
        compute_advantages(REWARDS, GROUPS, scale_rewards="global")
    with pytest.raises(ValueError, match="adv_clip_max"):
        compute_advantages(REWARDS, GROUPS, adv_clip_max=0.0)
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages(REWARDS, GROUPS[:3])
    with pytest.raises(ValueError, match="integer"):
        compute_advantages(REWARDS, GROUPS.float())
    with pytest.raises(ValueError, match="inf"):
        compute_advantages(torch.tensor([1.0, float("inf")]), torch.tensor([0, 0]))


# ---------------------------------------------------------------------------------------------
# property 3: clipped surrogate, on-policy ratio exactly 1
# ---------------------------------------------------------------------------------------------


def _log_prob_fn(theta: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Any differentiable per-sample log-prob: Gaussian log-density, averaged over dims."""
    return (-0.5 * (target - theta[:, None]) ** 2 - 0.5 * math.log(2 * math.pi)).mean(dim=1)


def test_on_policy_ratio_is_exactly_one_and_gradient_is_policy_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=gen).requires_grad_(True)
    target = torch.randn(6, 16, generator=gen)
    adv = torch.tensor([1.5, -0.5, 0.0, 2.0, -3.0, 0.7])
    logp = _log_prob_fn(theta, target)
    with torch.no_grad():
        old = _log_prob_fn(theta, target)
    loss, stats = clipped_policy_loss(logp, old, adv, epsilon=1e-4)
    assert stats["ratio_min"] == 1.0 and stats["ratio_max"] == 1.0 and stats["ratio_mean"] == 1.0
    assert stats["clip_fraction"] == 0.0
    torch.testing.assert_close(loss, -adv.mean())
    loss.backward()
    dlogp = (target - theta.detach()[:, None]).mean(dim=1)  # d logp_i / d theta_i
    torch.testing.assert_close(theta.grad, -adv * dlogp / 6)


def test_clipping_matches_hand_formula_and_zeroes_clipped_gradients() -> None:
    # ratios 1.5, 1.5, 0.5, 0.5, 1.1 with advantages +, -, -, +, +
    old = torch.zeros(5)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])).requires_grad_(True)
    adv = torch.tensor([2.0, -2.0, -1.0, 1.0, 1.0])
    loss, stats = clipped_policy_loss(logp, old, adv, epsilon=0.2)
    per = [-2.0 * 1.2, 2.0 * 1.5, 1.0 * 0.8, -1.0 * 0.5, -1.0 * 1.1]
    torch.testing.assert_close(loss, torch.tensor(sum(per) / 5))
    torch.testing.assert_close(stats["clip_fraction"], torch.tensor(2 / 5))
    torch.testing.assert_close(stats["high_clip_fraction"], torch.tensor(1 / 5))
    torch.testing.assert_close(stats["low_clip_fraction"], torch.tensor(1 / 5))
    torch.testing.assert_close(stats["ratio_max"], torch.tensor(1.5))
    torch.testing.assert_close(stats["ratio_min"], torch.tensor(0.5))
    loss.backward()
    # d/dlogp (-A r) = -A r; clipped entries (0 and 2) get no gradient
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 2.0 * 1.5, 0.0, -0.5, -1.1]) / 5)


def test_epsilon_high_widens_only_the_upper_clip() -> None:
    logp = torch.log(torch.tensor([1.25, 0.75]))
    adv = torch.tensor([1.0, -1.0])
    loss_sym, stats_sym = clipped_policy_loss(logp, torch.zeros(2), adv, epsilon=0.2)
    loss_asym, stats_asym = clipped_policy_loss(logp, torch.zeros(2), adv, epsilon=0.2, epsilon_high=0.28)
    torch.testing.assert_close(loss_sym, torch.tensor((-1.2 + 0.8) / 2))
    torch.testing.assert_close(loss_asym, torch.tensor((-1.25 + 0.8) / 2))
    assert stats_sym["clip_fraction"] == 1.0 and stats_asym["clip_fraction"] == 0.5


def test_mask_excludes_entries_and_all_masked_is_zero_not_nan() -> None:
    logp = torch.tensor([0.1, -0.2, 0.05, 3.0]).requires_grad_(True)
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -1.0, 2.0, 100.0])
    mask = torch.tensor([True, True, True, False])
    loss, stats = clipped_policy_loss(logp, old, adv, epsilon=10.0, mask=mask)
    expected, _ = clipped_policy_loss(logp[:3], old[:3], adv[:3], epsilon=10.0)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats["ratio_max"], torch.exp(torch.tensor(0.1)))
    loss, _ = clipped_policy_loss(logp, old, adv, epsilon=0.2, mask=torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert loss == 0.0 and torch.isfinite(logp.grad).all()


def test_per_step_log_probs_broadcast_per_sample_advantages() -> None:
    logp = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)) * 0.01
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, _ = clipped_policy_loss(logp, torch.zeros(3, 4), adv, epsilon=1.0)
    torch.testing.assert_close(loss, (-adv[:, None] * logp.exp()).mean())
    with pytest.raises(ValueError, match="old_log_prob"):
        clipped_policy_loss(logp, torch.zeros(3), adv, epsilon=0.2)
    with pytest.raises(ValueError, match="epsilon"):
        clipped_policy_loss(logp, torch.zeros(3, 4), adv, epsilon=-0.1)


def test_clipped_loss_is_float32_for_bf16_and_under_autocast() -> None:
    logp = torch.tensor([-1.0, -2.0], dtype=torch.bfloat16)
    loss, stats = clipped_policy_loss(logp, logp.clone(), torch.tensor([1.0, -1.0], dtype=torch.bfloat16), 1e-4)
    assert loss.dtype == torch.float32 and stats["ratio_mean"].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = clipped_policy_loss(logp, logp.clone(), torch.tensor([1.0, -1.0]), 1e-4)
    assert loss.dtype == torch.float32 and stats["ratio_max"] == 1.0


# ---------------------------------------------------------------------------------------------
# property 6: KL terms
# ---------------------------------------------------------------------------------------------


def test_flow_kl_is_zero_for_identical_means_and_matches_hand_value() -> None:
    mean = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(flow_kl(mean, mean.clone(), 0.3), torch.zeros(3))
    std = torch.tensor([0.5, 1.0, 2.0])
    kl = flow_kl(mean + 0.1, mean, std)
    torch.testing.assert_close(kl, 0.01 / (2 * std**2))
    # std broadcastable (B, 1, 1, 1), and std = 0 (deterministic step) gives 0, not NaN/inf
    kl = flow_kl(mean + 0.1, mean, torch.tensor([0.0, 1.0, 2.0]).view(3, 1, 1, 1))
    torch.testing.assert_close(kl, torch.tensor([0.0, 0.005, 0.00125]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert flow_kl(mean.bfloat16(), mean.bfloat16(), 0.3).dtype == torch.float32


def test_k3_kl_is_zero_when_equal_and_matches_formula() -> None:
    logp = torch.tensor([-1.0, -2.5, -0.3])
    assert torch.equal(k3_kl(logp, logp.clone()), torch.zeros(3))
    ref = torch.tensor([-1.5, -2.0, -0.3])
    d = ref - logp
    torch.testing.assert_close(k3_kl(logp, ref), torch.exp(d) - d - 1)
    assert (k3_kl(logp, ref) >= 0).all()


# ---------------------------------------------------------------------------------------------
# token GRPO
# ---------------------------------------------------------------------------------------------

LOGPS = torch.tensor([[-1.0, -0.5, -2.0, -0.1], [-0.3, -1.2, -0.7, -0.9]])
OLD = torch.tensor([[-1.1, -0.5, -1.9, -0.4], [-0.2, -1.0, -0.7, -2.0]])
ADV = torch.tensor([1.0, -0.5])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def _hand_per_token_loss(eps: float = 0.2) -> torch.Tensor:
    out = torch.zeros(2, 4)
    for i in range(2):
        for j in range(4):
            r = math.exp(LOGPS[i, j].item() - OLD[i, j].item())
            a = ADV[i].item()
            out[i, j] = max(-a * r, -a * min(max(r, 1 - eps), 1 + eps))
    return out


def test_token_grpo_loss_types_match_hand_aggregation() -> None:
    per = _hand_per_token_loss()
    m = MASK.float()
    expected = {
        "grpo": ((per * m).sum(1) / m.sum(1)).mean(),
        "bnpo": (per * m).sum() / m.sum(),
        "dr_grpo": (per * m).sum() / (2 * 6),
        "dapo": (per * m).sum() / m.sum(),
    }
    for loss_type, value in expected.items():
        loss, _ = token_grpo_loss(LOGPS, OLD, ADV, MASK, epsilon=0.2, loss_type=loss_type, max_completion_length=6)
        torch.testing.assert_close(loss, value, msg=loss_type)
    loss, _ = token_grpo_loss(LOGPS, OLD, ADV, MASK, epsilon=0.2, loss_type="dr_grpo")
    torch.testing.assert_close(loss, (per * m).sum() / (2 * 4))
    loss, _ = token_grpo_loss(LOGPS, OLD, ADV, MASK, epsilon=0.2, loss_type="dapo", num_items_in_batch=20)
    torch.testing.assert_close(loss, (per * m).sum() / 20)
    # grpo and bnpo really differ here (sequences of different lengths)
    assert not torch.isclose(expected["grpo"], expected["bnpo"])


def test_token_grpo_reuses_clipped_policy_loss() -> None:
    loss, stats = token_grpo_loss(LOGPS, OLD, ADV, MASK, epsilon=0.2, loss_type="bnpo")
    ref_loss, ref_stats = clipped_policy_loss(LOGPS, OLD, ADV, epsilon=0.2, mask=MASK.bool())
    torch.testing.assert_close(loss, ref_loss)
    for key in ("clip_fraction", "ratio_mean", "ratio_min", "ratio_max"):
        torch.testing.assert_close(stats[key], ref_stats[key])


def test_token_grpo_on_policy_and_kl_term() -> None:
    logp = LOGPS.clone().requires_grad_(True)
    loss, stats = token_grpo_loss(logp, None, ADV, MASK, epsilon=0.2)
    assert stats["ratio_min"] == 1.0 and stats["ratio_max"] == 1.0 and stats["clip_fraction"] == 0.0
    torch.testing.assert_close(loss, -ADV.mean())
    # KL: zero when ref == policy; otherwise beta * masked k3 added per token before aggregation
    _, stats = token_grpo_loss(LOGPS, OLD, ADV, MASK, 0.2, beta=0.04, ref_per_token_logps=LOGPS.clone())
    assert stats["kl"] == 0.0
    ref = LOGPS + 0.3
    base, _ = token_grpo_loss(LOGPS, OLD, ADV, MASK, 0.2, loss_type="grpo")
    with_kl, stats = token_grpo_loss(LOGPS, OLD, ADV, MASK, 0.2, beta=0.04, ref_per_token_logps=ref)
    k3 = math.exp(0.3) - 0.3 - 1
    torch.testing.assert_close(with_kl - base, torch.tensor(0.04 * k3))
    torch.testing.assert_close(stats["kl"], torch.tensor(k3))
    logged_only, _ = token_grpo_loss(LOGPS, OLD, ADV, MASK, 0.2, beta=0.0, ref_per_token_logps=ref)
    torch.testing.assert_close(logged_only, base)


def test_token_grpo_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"loss_type must be one of \('grpo', 'bnpo', 'dr_grpo', 'dapo'\)"):
        token_grpo_loss(LOGPS, OLD, ADV, MASK, 0.2, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        token_grpo_loss(LOGPS, OLD, ADV, MASK, 0.2, beta=0.1)
    with pytest.raises(ValueError, match="completion_mask"):
        token_grpo_loss(LOGPS, OLD, ADV, MASK[:, :3], 0.2)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        token_grpo_loss(LOGPS, OLD, ADV, MASK, 0.2, loss_type="grpo", num_items_in_batch=5)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_failed_sample_masks_its_whole_group(scale) -> None:
    """reward.on_error skip_group: a NaN reward voids its group; the others are as if it were absent."""
    rewards = torch.tensor([1.0, float("nan"), 3.0, 0.5, 2.0, 4.0, 4.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    advantages, valid, stats = compute_advantages(rewards, groups, scale)
    assert valid.tolist() == [False, False, True, True, True, True, True, True]
    assert advantages[:2].tolist() == [0.0, 0.0] and bool(torch.isfinite(advantages).all())
    alone, _, alone_stats = compute_advantages(rewards[2:], groups[2:], scale)
    assert torch.allclose(advantages[2:], alone)
    assert float(stats["failed_group_fraction"]) == pytest.approx(0.25)
    assert float(stats["reward_mean"]) == pytest.approx(float(alone_stats["reward_mean"]))
    all_failed, none_valid, _ = compute_advantages(torch.tensor([float("nan"), 1.0]), torch.tensor([0, 0]))
    assert all_failed.tolist() == [0.0, 0.0] and not none_valid.any()
