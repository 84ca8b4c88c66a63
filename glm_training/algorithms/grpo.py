"""GRPO: group-relative advantages, the PPO clipped surrogate, KL terms, token-level GRPO.

Shared by Flow-GRPO / DDPO (one log-prob per sample and denoising step) and token GRPO for
autoregressive policies (one log-prob per token, TRL semantics). All math in float32 (float64
inputs stay float64) with autocast disabled: the ratio ``exp(logp - logp_old)`` is taken of a
difference of two nearly equal numbers, which bf16 cannot resolve.
"""

from __future__ import annotations

import torch
from torch import Tensor

from glm_training.algorithms.sde import compute_dtype, no_autocast, per_sample

__all__ = [
    "ADVANTAGE_SCALES",
    "TOKEN_LOSS_TYPES",
    "clipped_policy_loss",
    "clipped_surrogate",
    "compute_advantages",
    "flow_kl",
    "k3_kl",
    "token_grpo_loss",
]

ADVANTAGE_SCALES = ("group", "batch", "none")
TOKEN_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


# ---------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------


def compute_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    scale_rewards: str = "group",
    adv_clip_max: float | None = 5.0,
    eps: float = 1e-4,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Group-relative advantages ``A_i = (r_i - mean_group(i)) / (std + eps)``, clamped.

    GRPO replaces a learned value baseline by the mean reward of the other samples drawn for
    the same prompt (the group). ``scale_rewards`` (TRL's name) picks the std: ``"group"``
    (std within the group, Flow-GRPO / DeepSeek), ``"batch"`` (one std over the whole batch,
    more robust when groups are small) or ``"none"`` (no division, Dr. GRPO: dividing by a
    small group std up-weights nearly-solved prompts).

    Stds are *population* stds (``unbiased=False``, as flow_grpo's ``np.std``): defined for
    groups of one, never NaN. TRL uses the unbiased std; the two differ by ``sqrt(G/(G-1))``.

    A group whose rewards are all exactly equal carries no signal: its members get advantage
    exactly 0 and ``valid = False`` (mask them out of the loss, or resample them as ms-swift's
    ``dynamic_sample`` does). Groups of size 1 are such groups.

    A NaN reward marks a failed sample (``reward.on_error: skip_group``): every member of its
    group gets advantage 0 and ``valid = False``, and the other groups' statistics ignore it.
    Infinite rewards are an error.

    Rewards must be gathered over all processes first when groups span processes.

    Args:
        rewards: ``(B,)`` scalar rewards (any float dtype).
        group_ids: ``(B,)`` integer group label per sample (e.g. prompt index); any values,
            members need not be contiguous.
        scale_rewards: ``"group"``, ``"batch"`` or ``"none"``.
        adv_clip_max: clamp advantages to ``[-adv_clip_max, adv_clip_max]``; None: no clamp.
        eps: added to the std before dividing.

    Returns:
        ``(advantages (B,) float32 (float64 stays float64), valid (B,) bool, stats)``, all
        detached, with stats
        ``zero_std_fraction`` (fraction of *samples* in zero-std groups, TRL's
        ``frac_reward_zero_std``), ``failed_group_fraction`` (fraction of *samples* in groups
        holding a NaN reward; with equal group sizes also the fraction of groups), and
        ``reward_mean`` and ``reward_std`` over the samples of the other groups.
    """
    if scale_rewards not in ADVANTAGE_SCALES:
        raise ValueError(f"scale_rewards must be one of {ADVANTAGE_SCALES}, got {scale_rewards!r}")
    if adv_clip_max is not None and not adv_clip_max > 0:
        raise ValueError(f"adv_clip_max must be > 0 or None (no clamp), got {adv_clip_max!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            "rewards and group_ids must both have shape (B,); got "
            f"{tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    if rewards.numel() == 0:
        raise ValueError("rewards is empty")
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")

    dtype = compute_dtype(rewards)
    with no_autocast(rewards.device), torch.no_grad():
        r = rewards.detach().to(dtype)
        if bool(torch.isinf(r).any()):
            raise ValueError("rewards contain inf; fix the reward function first")
        _, inverse = torch.unique(group_ids.to(r.device), return_inverse=True)
        n_groups = int(inverse.max()) + 1
        # Groups with a failed (NaN) sample: computed with 0 in its place, then masked entirely.
        failed_group = torch.zeros(n_groups, dtype=dtype, device=r.device).index_add_(
            0, inverse, torch.isnan(r).to(dtype)) > 0
        failed = failed_group[inverse]
        r = torch.where(failed, torch.zeros_like(r), r)
        counts = torch.zeros(n_groups, dtype=dtype, device=r.device).index_add_(
            0, inverse, torch.ones_like(r)
        )
        group_mean = torch.zeros(n_groups, dtype=dtype, device=r.device).index_add_(0, inverse, r) / counts
        centered = r - group_mean[inverse]
        group_var = (
            torch.zeros(n_groups, dtype=dtype, device=r.device).index_add_(0, inverse, centered**2) / counts
        )
        # "all rewards equal" decided exactly (max == min), not by a float std threshold
        group_max = torch.full((n_groups,), -torch.inf, dtype=dtype, device=r.device).scatter_reduce(
            0, inverse, r, reduce="amax"
        )
        group_min = torch.full((n_groups,), torch.inf, dtype=dtype, device=r.device).scatter_reduce(
            0, inverse, r, reduce="amin"
        )
        zero_std = (group_max == group_min)[inverse]

        if scale_rewards == "group":
            advantages = centered / (group_var.sqrt()[inverse] + eps)
        elif scale_rewards == "batch":
            kept = r[~failed]
            advantages = centered / ((kept.std(unbiased=False) if kept.numel() else r.new_zeros(())) + eps)
        else:
            advantages = centered
        if adv_clip_max is not None:
            advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
        invalid = zero_std | failed
        advantages = torch.where(invalid, torch.zeros_like(advantages), advantages)

        kept = r[~failed]
        nan = r.new_full((), float("nan"))
        stats = {
            "zero_std_fraction": (zero_std & ~failed).to(dtype).mean(),
            "failed_group_fraction": failed.to(dtype).mean(),
            "reward_mean": kept.mean() if kept.numel() else nan,
            "reward_std": kept.std(unbiased=False) if kept.numel() else nan,
        }
    return advantages, ~invalid, stats


# ---------------------------------------------------------------------------------------------
# clipped surrogate
# ---------------------------------------------------------------------------------------------


def _check_epsilons(epsilon: float, epsilon_high: float | None) -> float:
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    if epsilon_high is None:
        return epsilon
    if not epsilon_high >= 0:
        raise ValueError(f"epsilon_high must be >= 0 or None (same as epsilon), got {epsilon_high!r}")
    return epsilon_high


def clipped_surrogate(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    epsilon: float,
    epsilon_high: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Elementwise PPO clipped loss ``max(-A r, -A clip(r, 1 - eps, 1 + eps_high))``.

    ``r = exp(logp - logp_old)``; ``old_log_prob`` is detached. Inputs broadcast; computed in
    float32. Returns ``(loss, ratio, low_clipped, high_clipped)``, where ``low_clipped`` marks
    entries with ``r < 1 - eps`` and ``A < 0`` and ``high_clipped`` those with
    ``r > 1 + eps_high`` and ``A > 0``: exactly the entries whose gradient the clip zeroes.
    On-policy (``logp`` and ``logp_old`` bitwise equal) ``r`` is exactly 1.
    """
    eps_high = _check_epsilons(epsilon, epsilon_high)
    dtype = compute_dtype(log_prob, old_log_prob, advantages)
    with no_autocast(log_prob.device):
        logp = log_prob.to(dtype)
        adv = advantages.detach().to(dtype)
        ratio = torch.exp(logp - old_log_prob.detach().to(dtype))
        clipped = ratio.clamp(1 - epsilon, 1 + eps_high)
        loss = torch.maximum(-adv * ratio, -adv * clipped)
        low = (ratio < 1 - epsilon) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
    return loss, ratio, low, high


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over ``mask`` (bool, same shape); 0 (still in the graph) if it is empty."""
    x = torch.where(mask, x, torch.zeros_like(x))
    return x.sum() / mask.sum().clamp(min=1).to(x.dtype)


def _ratio_stats(ratio: Tensor, low: Tensor, high: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Clip/ratio statistics over the masked entries (over all entries if none is unmasked)."""
    with torch.no_grad():
        ratio = ratio.detach()
        sel = mask if bool(mask.any()) else torch.ones_like(mask)
        n = sel.sum().to(ratio.dtype)
        low_f = (low & sel).sum().to(ratio.dtype) / n
        high_f = (high & sel).sum().to(ratio.dtype) / n
        return {
            "clip_fraction": low_f + high_f,
            "low_clip_fraction": low_f,
            "high_clip_fraction": high_f,
            "ratio_mean": ratio[sel].mean(),
            "ratio_min": ratio[sel].min(),
            "ratio_max": ratio[sel].max(),
        }


def clipped_policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    epsilon: float,
    epsilon_high: float | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO/GRPO clipped objective for per-sample (per-step) log-probs (Flow-GRPO, DDPO).

    ``L = mean_{unmasked} max(-A r, -A clip(r, 1 - eps, 1 + eps_high))``, ``r = exp(logp -
    logp_old)``. Flow-GRPO uses a tiny ``eps`` (about 1e-4) because each step's log-prob is an
    average over all pixels, so ratios stay very close to 1. ``epsilon_high`` None means
    ``epsilon`` (symmetric; DAPO's clip-higher sets it larger).

    Args:
        log_prob: current-policy log-probs, e.g. ``(B,)`` or ``(B, T)`` for T trained steps.
        old_log_prob: rollout-policy log-probs, same shape (detached here).
        advantages: broadcastable to ``log_prob`` (``(B,)`` is unsqueezed for ``(B, T)``).
        mask: bool, broadcastable likewise; False entries (zero-std groups, padding) are left
            out of the mean. An all-False mask gives loss 0, not NaN.

    Returns:
        ``(loss, stats)`` with detached ``clip_fraction`` (``low_`` / ``high_`` parts too),
        ``ratio_mean``, ``ratio_min``, ``ratio_max`` over the unmasked entries.
    """
    if old_log_prob.shape != log_prob.shape:
        raise ValueError(
            f"old_log_prob has shape {tuple(old_log_prob.shape)} but log_prob has {tuple(log_prob.shape)}"
        )
    advantages = per_sample(advantages, log_prob, "advantages", advantages.dtype)
    loss, ratio, low, high = clipped_surrogate(log_prob, old_log_prob, advantages, epsilon, epsilon_high)
    if mask is None:
        full_mask = torch.ones(loss.shape, dtype=torch.bool, device=loss.device)
    else:
        full_mask = per_sample(mask, log_prob, "mask", torch.bool).expand(loss.shape)
    low, high = low.expand(loss.shape), high.expand(loss.shape)
    return _masked_mean(loss, full_mask), _ratio_stats(ratio.expand(loss.shape), low, high, full_mask)


# ---------------------------------------------------------------------------------------------
# KL terms
# ---------------------------------------------------------------------------------------------


def flow_kl(mean: Tensor, ref_mean: Tensor, std: float | Tensor) -> Tensor:
    """Per-sample KL between the policy's and the reference's Gaussian SDE transitions.

    ``KL = mean_{non-batch dims} ||mean - ref_mean||^2 / (2 std^2)``: the KL of two Gaussians
    with the same std differs only by their means. Passing ``SDEStep.std`` gives Flow-GRPO's
    code convention (the ``beta`` values it reports are tuned to it); pass
    ``SDEStep.transition_std`` for the exact KL of the discrete transitions (``1/(-dt)`` times
    larger). ``std`` is a float, ``(B,)`` or broadcastable to ``mean``. Where ``std == 0`` (a
    deterministic ODE step) the KL is returned as 0: nothing stochastic there to regularise.
    Result: ``(B,)`` float32 (float64 stays float64).
    """
    if ref_mean.shape != mean.shape:
        raise ValueError(f"ref_mean has shape {tuple(ref_mean.shape)} but mean has {tuple(mean.shape)}")
    dtype = compute_dtype(mean, ref_mean, std if isinstance(std, Tensor) else mean)
    with no_autocast(mean.device):
        m = mean.to(dtype)
        s = per_sample(std, m, "std", dtype)
        if bool((s < 0).any()):
            raise ValueError("std must be >= 0")
        zero = s == 0
        safe = torch.where(zero, torch.ones_like(s), s)
        kl = (m - ref_mean.detach().to(dtype)) ** 2 / (2 * safe**2)
        kl = torch.where(zero, torch.zeros_like(kl), kl)
        return kl.mean(dim=tuple(range(1, kl.ndim))) if kl.ndim > 1 else kl


def k3_kl(log_prob: Tensor, ref_log_prob: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(policy || ref), elementwise: ``exp(d) - d - 1``,
    ``d = ref - logp``. Unbiased, always >= 0, exactly 0 when ``logp == ref`` (TRL's GRPO KL)."""
    dtype = compute_dtype(log_prob, ref_log_prob)
    with no_autocast(log_prob.device):
        d = ref_log_prob.detach().to(dtype) - log_prob.to(dtype)
        return torch.exp(d) - d - 1


# ---------------------------------------------------------------------------------------------
# token GRPO (TRL semantics)
# ---------------------------------------------------------------------------------------------


def token_grpo_loss(
    per_token_logps: Tensor,
    old_per_token_logps: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    epsilon: float,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_per_token_logps: Tensor | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss on token log-probs, as TRL's ``GRPOTrainer._compute_loss``.

    Per token: ``l = max(-A r, -A clip(r, 1 - eps, 1 + eps_high)) + beta * k3_kl`` (the same
    clipped surrogate as :func:`clipped_policy_loss`), then aggregated by ``loss_type``:

    * ``grpo``: mean over each sequence's tokens, then mean over sequences (long answers
      weigh less per token: a length bias).
    * ``bnpo``: mean over all completion tokens of the batch.
    * ``dr_grpo``: ``sum / (B * max_completion_length)`` (Dr. GRPO: a constant normaliser,
      no length bias). ``max_completion_length`` None: the padded width ``T``.
    * ``dapo``: token-level mean; with ``num_items_in_batch`` (the completion-token count over
      all processes and accumulation steps, divided by the number of processes, as TRL) it is
      ``sum / num_items_in_batch`` so that accumulated micro-batches give the global token
      mean. Without it, identical to ``bnpo``.

    Args:
        per_token_logps: ``(B, T)`` current policy.
        old_per_token_logps: ``(B, T)`` rollout policy, or None for the first (on-policy)
            iteration: then ``per_token_logps.detach()`` is used, as TRL does, and the ratio is
            exactly 1.
        advantages: ``(B,)`` (one per sequence) or ``(B, T)``.
        completion_mask: ``(B, T)``, 1/True for completion tokens to train, 0 for padding.
        beta: KL coefficient; needs ``ref_per_token_logps`` when > 0.
        ref_per_token_logps: ``(B, T)`` reference policy; if given with ``beta == 0`` the KL is
            only logged.

    Returns:
        ``(loss, stats)``: ``clip_fraction`` (+ ``low_`` / ``high_``), ``ratio_mean/min/max``
        over completion tokens, and ``kl`` (masked token mean) when a reference is given.
    """
    if loss_type not in TOKEN_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {TOKEN_LOSS_TYPES}, got {loss_type!r}")
    if per_token_logps.ndim != 2:
        raise ValueError(f"per_token_logps must have shape (B, T), got {tuple(per_token_logps.shape)}")
    if completion_mask.shape != per_token_logps.shape:
        raise ValueError(
            f"completion_mask has shape {tuple(completion_mask.shape)} but per_token_logps has "
            f"{tuple(per_token_logps.shape)}"
        )
    for name, t in (("old_per_token_logps", old_per_token_logps), ("ref_per_token_logps", ref_per_token_logps)):
        if t is not None and t.shape != per_token_logps.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but per_token_logps has {tuple(per_token_logps.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    if beta > 0 and ref_per_token_logps is None:
        raise ValueError("beta > 0 needs ref_per_token_logps (the reference policy's token log-probs)")
    if max_completion_length is not None and max_completion_length <= 0:
        raise ValueError(f"max_completion_length must be > 0, got {max_completion_length!r}")
    if num_items_in_batch is not None and loss_type != "dapo":
        raise ValueError("num_items_in_batch is only used with loss_type='dapo'")

    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    adv = per_sample(advantages, per_token_logps, "advantages", advantages.dtype)
    per_token_loss, ratio, low, high = clipped_surrogate(
        per_token_logps, old_per_token_logps, adv, epsilon, epsilon_high
    )
    stats: dict[str, Tensor] = {}
    mask_bool = completion_mask.bool()
    mask = completion_mask.to(per_token_loss.dtype)
    if ref_per_token_logps is not None:
        kl = k3_kl(per_token_logps, ref_per_token_logps)
        if beta > 0:
            per_token_loss = per_token_loss + beta * kl
        stats["kl"] = _masked_mean(kl.detach(), mask_bool)

    masked_loss = torch.where(mask_bool, per_token_loss, torch.zeros_like(per_token_loss))
    batch, width = per_token_logps.shape
    if loss_type == "grpo":
        loss = (masked_loss.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked_loss.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        length = max_completion_length if max_completion_length is not None else width
        loss = masked_loss.sum() / (batch * length)
    else:  # dapo
        if num_items_in_batch is None:
            loss = masked_loss.sum() / mask.sum().clamp(min=1.0)
        else:
            normaliser = torch.as_tensor(num_items_in_batch, dtype=masked_loss.dtype, device=masked_loss.device)
            loss = masked_loss.sum() / normaliser.clamp(min=1.0)
    shape = per_token_loss.shape
    stats.update(_ratio_stats(ratio.expand(shape), low.expand(shape), high.expand(shape), mask_bool))
    return loss, stats
