"""Direct Preference Optimization losses: Diffusion-DPO (Wallace et al. 2023) and token DPO (TRL).

Both reduce to one number per preference pair, the *margin* ``logits`` by which the policy
prefers the winner more than the frozen reference does, fed through one loss family
(:func:`preference_loss`). The two wrappers only differ in how the margin is built.
Everything is computed in float32 (float64 stays float64): the margin is a difference of
differences of nearly equal numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from glm_training.algorithms.sde import compute_dtype, no_autocast

__all__ = ["DPO_LOSS_TYPES", "diffusion_dpo_loss", "preference_loss", "token_dpo_loss"]

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def preference_loss(
    logits: Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0
) -> Tensor:
    """Per-pair DPO loss from the un-scaled preference margin ``logits`` (> 0: winner preferred).

    * ``sigmoid`` (DPO; with ``label_smoothing`` = conservative DPO, which assumes that a
      fraction ``ls`` of the labels is flipped):
      ``-logsigmoid(beta l) (1 - ls) - logsigmoid(-beta l) ls``
    * ``hinge`` (SLiC): ``relu(1 - beta l)``
    * ``ipo`` (IPO, regresses the margin to ``1 / (2 beta)`` instead of pushing it to
      infinity): ``(l - 1 / (2 beta))^2``

    Same formulas and names as TRL's ``DPOTrainer``. Returns a tensor shaped like ``logits``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing!r}")
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise ValueError(
            f"label_smoothing is only defined for loss_type='sigmoid' (got loss_type={loss_type!r}); "
            "set label_smoothing to 0"
        )
    dtype = compute_dtype(logits)
    with no_autocast(logits.device):
        z = logits.to(dtype)
        if loss_type == "sigmoid":
            loss = -F.logsigmoid(beta * z) * (1 - label_smoothing)
            if label_smoothing > 0:
                loss = loss - F.logsigmoid(-beta * z) * label_smoothing
            return loss
        if loss_type == "hinge":
            return torch.relu(1 - beta * z)
        return (z - 1 / (2 * beta)) ** 2


def _implicit_accuracy(margin: Tensor) -> Tensor:
    """Fraction of pairs ranked right (margin > 0); ties count 1/2, so an untrained policy
    (policy == reference, margin exactly 0) scores exactly 0.5, i.e. chance."""
    return ((margin > 0).to(margin.dtype) + 0.5 * (margin == 0).to(margin.dtype)).mean()


def _check_pairs(names: tuple[str, ...], tensors: tuple[Tensor, ...]) -> None:
    shape = tensors[0].shape
    if len(shape) != 1:
        raise ValueError(f"{names[0]} must have shape (B,) (one value per pair), got {tuple(shape)}")
    for name, t in zip(names[1:], tensors[1:], strict=True):
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {names[0]} has {tuple(shape)}")


def diffusion_dpo_loss(
    policy_err_w: Tensor,
    policy_err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO loss from per-sample denoising errors (Wallace et al. 2023).

    Inputs are ``(B,)`` MSEs, the mean over C, H, W of ``||pred - target||^2`` for the winner
    (``w``) and loser (``l``) of each pair, noised with the *same* timestep and noise, for the
    policy and the frozen reference. A lower error is a higher ELBO, so the margin is::

        logits = -0.5 * ((err_w - err_l) - (ref_err_w - ref_err_l))
        inside = beta * logits        # the paper's "inside term", beta ~ 5000 for SDXL

    (diffusers' research script `train_diffusion_dpo.py` uses this same 0.5-factor form,
    ``scale_term = -0.5 * beta_dpo``, with its default ``beta_dpo`` 2500: a value ported from it
    keeps its meaning here unchanged; the paper trained SDXL with 5000).
    Epsilon, v and flow-matching (Flow-DPO, velocity target) models all use it unchanged.

    Returns:
        ``(mean loss, metrics)``; metrics (detached): ``implicit_acc`` (mean(inside > 0), ties
        1/2), ``reward_margin`` (mean inside), ``policy_mse_gap`` (mean err_w - err_l),
        ``ref_mse_gap`` (mean ref_err_w - ref_err_l).
    """
    names = ("policy_err_w", "policy_err_l", "ref_err_w", "ref_err_l")
    _check_pairs(names, (policy_err_w, policy_err_l, ref_err_w, ref_err_l))
    dtype = compute_dtype(policy_err_w, policy_err_l, ref_err_w, ref_err_l)
    with no_autocast(policy_err_w.device):
        policy_gap = policy_err_w.to(dtype) - policy_err_l.to(dtype)
        ref_gap = (ref_err_w.to(dtype) - ref_err_l.to(dtype)).detach()
        logits = -0.5 * (policy_gap - ref_gap)
        loss = preference_loss(logits, beta, loss_type, label_smoothing).mean()
        with torch.no_grad():
            inside = beta * logits.detach()
            metrics = {
                "implicit_acc": _implicit_accuracy(inside),
                "reward_margin": inside.mean(),
                "policy_mse_gap": policy_gap.detach().mean(),
                "ref_mse_gap": ref_gap.mean(),
            }
    return loss, metrics


def token_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO on sequence log-probs (sum of token log-probs of each completion), as TRL.

    ``logits = (pc - pr) - (rc - rr)``; implicit rewards ``beta (pc - rc)`` and
    ``beta (pr - rr)``; ``beta`` about 0.1.

    Returns:
        ``(mean loss, metrics)``; metrics (detached): ``implicit_acc`` (chosen reward >
        rejected reward, ties 1/2), ``reward_margin`` (mean chosen - rejected reward),
        ``chosen_reward``, ``rejected_reward`` (means), ``logp_gap`` (mean pc - pr).
    """
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    _check_pairs(names, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
    dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    with no_autocast(policy_chosen_logps.device):
        pc = policy_chosen_logps.to(dtype)
        pr = policy_rejected_logps.to(dtype)
        rc = ref_chosen_logps.to(dtype).detach()
        rr = ref_rejected_logps.to(dtype).detach()
        logits = (pc - pr) - (rc - rr)
        loss = preference_loss(logits, beta, loss_type, label_smoothing).mean()
        with torch.no_grad():
            chosen_reward = beta * (pc.detach() - rc)
            rejected_reward = beta * (pr.detach() - rr)
            margin = chosen_reward - rejected_reward
            metrics = {
                "implicit_acc": _implicit_accuracy(margin),
                "reward_margin": margin.mean(),
                "chosen_reward": chosen_reward.mean(),
                "rejected_reward": rejected_reward.mean(),
                "logp_gap": (pc.detach() - pr.detach()).mean(),
            }
    return loss, metrics
