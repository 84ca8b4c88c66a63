"""DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117): negative-aware fine-tuning on the forward process.

Online RL without log-probs. An *old* policy ``v_old`` (a frozen copy, e.g. a second LoRA adapter)
samples images with any deterministic solver; only the clean latents ``x0`` and their rewards are
kept. Each image gets an optimality weight ``r`` in [0, 1] from its group-normalised advantage.
The trained policy ``v_theta`` is then fitted on noised copies of those images through two
*implicit* policies that mix the trained and the old prediction::

    v_pos = beta * v_theta + (1 - beta) * v_old          # should fit good images
    v_neg = (1 + beta) * v_old - beta * v_theta          # its reflection about v_old: fits bad ones

so that pulling ``v_pos`` towards a good image and ``v_neg`` towards a bad one both move
``v_theta`` the right way, and by the reward-weighted amount. The loss is a flow-matching
regression in x0 space with an adaptive (no-grad) per-sample normaliser; after every optimizer
step the old policy follows the trained one as an EMA whose decay ramps up
(:func:`old_policy_decay`, :func:`update_old_policy`).

Useful identity (tested): when ``theta == old`` both implicit predictions equal ``v_theta`` and
the gradient of :func:`nft_loss` is ``(2 r - 1) * adv_clip_max = A_clipped`` times the gradient
of the adaptively weighted SFT loss on the sample: plain SFT on good images, zero at ``r = 0.5``
(average images and zero-std groups), gradient ascent on bad ones.

Conventions: flow matching ``x_t = (1 - t) x0 + t eps``, ``t`` in [0, 1] (1 = noise), velocity
``v = eps - x0``, so ``x0_hat = x_t - t v``. Epsilon / v-prediction families (SDXL) map their
output to ``x0_hat`` with :func:`x0_from_prediction` and use :func:`nft_loss_x0`: the map is
affine in the output with the mixing coefficients summing to one, so mixing outputs and mixing
x0 predictions are the same implicit policy.

All math runs in float32 (float64 stays float64) with autocast disabled, as the rest of
``algorithms/``: the implicit negative is a difference of two nearly equal predictions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from glm_training.algorithms.grpo import compute_advantages
from glm_training.algorithms.sde import compute_dtype, no_autocast, per_sample

__all__ = [
    "ADV_MODES",
    "OLD_POLICY_SCHEDULES",
    "OldPolicySchedule",
    "nft_loss",
    "nft_loss_x0",
    "nft_optimality_weights",
    "old_policy_decay",
    "optimality_weight",
    "update_old_policy",
    "x0_from_prediction",
]

ADV_MODES = ("all", "positive_only", "negative_only", "binary")
EPSILON_PREDICTION_TYPES = ("epsilon", "v_prediction")

# the adaptive normaliser is floored here (NVlabs' value): a perfect prediction must not divide by 0
_MIN_ADAPTIVE_WEIGHT = 1e-5


# ---------------------------------------------------------------------------------------------
# optimality weights
# ---------------------------------------------------------------------------------------------


def optimality_weight(advantages: Tensor, adv_clip_max: float = 5.0, mode: str = "all") -> Tensor:
    """Optimality weight ``r = clamp(A / adv_clip_max / 2 + 0.5, 0, 1)`` of each sample.

    ``A`` is first clamped to ``[-adv_clip_max, adv_clip_max]`` and then, by ``mode``:

    * ``all``: used as is (``r`` spans [0, 1]; ``A = 0`` gives 0.5);
    * ``positive_only``: negatives set to 0, so bad images only get ``r = 0.5`` (no push away);
    * ``negative_only``: positives set to 0 (only the push away from bad images);
    * ``binary``: ``sign(A)``, so ``r`` is ``0.5 +- 0.5 / adv_clip_max`` (and 0.5 at ``A = 0``):
      every good image counts the same, as NVlabs' ``adv_mode="binary"``.

    Returns a detached tensor shaped like ``advantages`` (float32, float64 stays float64).
    """
    if mode not in ADV_MODES:
        raise ValueError(f"nft adv_mode must be one of {ADV_MODES}, got {mode!r}")
    if not adv_clip_max > 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max!r}")
    dtype = compute_dtype(advantages)
    with no_autocast(advantages.device), torch.no_grad():
        a = advantages.detach().to(dtype)
        if not bool(torch.isfinite(a).all()):
            raise ValueError("advantages contain NaN or inf; check the rewards")
        a = a.clamp(-adv_clip_max, adv_clip_max)
        if mode == "positive_only":
            a = a.clamp(min=0.0)
        elif mode == "negative_only":
            a = a.clamp(max=0.0)
        elif mode == "binary":
            a = torch.sign(a)
        return (a / adv_clip_max / 2 + 0.5).clamp(0.0, 1.0)


def nft_optimality_weights(
    rewards: Tensor,
    group_ids: Tensor,
    adv_clip_max: float = 5.0,
    mode: str = "all",
    scale_rewards: str = "group",
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Rewards -> ``(r, valid, stats)``: GRPO's group-normalised advantages
    (:func:`~glm_training.algorithms.grpo.compute_advantages`, clamped to ``+-adv_clip_max``)
    turned into optimality weights by :func:`optimality_weight`.

    Members of a constant-reward group get ``A = 0``, so ``r = 0.5`` exactly, and
    ``valid = False``: pass ``valid`` as ``mask`` to the loss (as NVlabs does), otherwise these
    samples still pull ``v_theta`` towards ``v_old``. ``stats`` are those of
    ``compute_advantages`` plus ``optimality_weight_mean`` and ``advantage_abs_mean``.
    """
    advantages, valid, stats = compute_advantages(
        rewards, group_ids, scale_rewards=scale_rewards, adv_clip_max=adv_clip_max
    )
    r = optimality_weight(advantages, adv_clip_max, mode)
    stats = dict(stats, optimality_weight_mean=r.mean(), advantage_abs_mean=advantages.abs().mean())
    return r, valid, stats


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------


def _check_nft_args(nft_beta: float, adv_clip_max: float, kl_beta: float) -> None:
    if not nft_beta > 0:
        raise ValueError(f"nft_beta must be > 0 (the paper uses 1.0 or 0.1), got {nft_beta!r}")
    if not adv_clip_max > 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max!r}")
    if not kl_beta >= 0:
        raise ValueError(f"kl_beta must be >= 0, got {kl_beta!r}")


def _check_like(name: str, t: Tensor | None, like: Tensor, like_name: str) -> None:
    if t is not None and t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {like_name} has {tuple(like.shape)}")


def _mean_dims(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def _sample_mask(mask: Tensor | None, batch: int, device: torch.device) -> Tensor:
    if mask is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    if mask.shape != (batch,):
        raise ValueError(f"mask must have shape ({batch},) (one flag per sample), got {tuple(mask.shape)}")
    return mask.to(device=device, dtype=torch.bool)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of per-sample ``x`` over ``mask``; 0 (still in the graph, zero gradient) if empty."""
    x = torch.where(mask, x, torch.zeros_like(x))
    return x.sum() / mask.sum().clamp(min=1).to(x.dtype)


def _adaptive_x0_loss(x0_pred: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample ``mean((x0_pred - x0)^2) / w`` with ``w = max(mean|x0_pred - x0|, 1e-5)``
    held constant (no grad): the normaliser makes the loss scale-free across timesteps and
    samples, ``(loss (B,), w (B,))``."""
    err = x0_pred - x0
    with torch.no_grad():
        w = _mean_dims(err.detach().abs()).clamp(min=_MIN_ADAPTIVE_WEIGHT)
    return _mean_dims(err**2) / w, w


def _nft_objective(
    x0_pos: Tensor,
    x0_neg: Tensor,
    x0: Tensor,
    r: Tensor | float,
    nft_beta: float,
    adv_clip_max: float,
    mask: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The part shared by the flow and the x0 form, from the two implicit x0 predictions."""
    loss_pos, w_pos = _adaptive_x0_loss(x0_pos, x0)
    loss_neg, w_neg = _adaptive_x0_loss(x0_neg, x0)
    r_b = per_sample(r, loss_pos, "r", loss_pos.dtype).detach()
    if bool(((r_b < 0) | (r_b > 1)).any()) or not bool(torch.isfinite(r_b).all()):
        raise ValueError("r (optimality weight) must lie in [0, 1]; build it with optimality_weight()")
    r_b = r_b.expand(loss_pos.shape)
    unweighted = _masked_mean((r_b * loss_pos + (1 - r_b) * loss_neg) / nft_beta, mask)
    # adv_clip_max restores the advantage scale: at theta == old the gradient is A times SFT's
    policy_loss = unweighted * adv_clip_max
    with torch.no_grad():
        metrics = {
            "policy_loss": policy_loss.detach(),
            "unweighted_policy_loss": unweighted.detach(),
            "positive_loss": _masked_mean(loss_pos.detach(), mask),
            "negative_loss": _masked_mean(loss_neg.detach(), mask),
            "positive_weight": _masked_mean(w_pos, mask),
            "negative_weight": _masked_mean(w_neg, mask),
            "optimality_weight_mean": _masked_mean(r_b, mask),
            "valid_fraction": mask.to(loss_pos.dtype).mean(),
        }
    return policy_loss, metrics


def _kl_term(
    pred: Tensor | None, pred_ref: Tensor | None, kl_beta: float, mask: Tensor, dtype: torch.dtype,
    metrics: dict[str, Tensor],
) -> Tensor | None:
    """``mean((pred - pred_ref)^2)`` over the valid samples, on the model's raw output; logged
    as ``kl`` whenever ``pred_ref`` is given, returned (for the loss) only when ``kl_beta > 0``."""
    if pred_ref is None:
        if kl_beta > 0:
            raise ValueError(
                "kl_beta > 0 needs the reference model's prediction (v_ref, or pred_theta and "
                "pred_ref for nft_loss_x0: the adapter-disabled base model); pass it or set kl_beta to 0"
            )
        return None
    kl = _masked_mean(_mean_dims((pred - pred_ref.detach().to(dtype)) ** 2), mask)
    metrics["kl"] = kl.detach()
    return kl if kl_beta > 0 else None


def nft_loss(
    v_theta: Tensor,
    v_old: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor | float,
    r: Tensor | float,
    nft_beta: float = 1.0,
    adv_clip_max: float = 5.0,
    kl_beta: float = 0.0,
    v_ref: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT loss for a flow-matching model (velocity prediction).

    With ``x0_pos = x_t - t v_pos``, ``x0_neg = x_t - t v_neg`` (see the module docstring)::

        L_pos = mean((x0_pos - x0)^2) / w_pos,   w_pos = max(mean|x0_pos - x0|, 1e-5)  (no grad)
        L_neg = same for x0_neg                                        (means per sample)
        loss  = mean_valid((r L_pos + (1 - r) L_neg) / nft_beta) * adv_clip_max
                + kl_beta * mean_valid(mean((v_theta - v_ref)^2))

    Args:
        v_theta: ``(B, ...)`` trained-policy velocity at ``(x_t, t)`` (with grad).
        v_old: same shape, old-policy velocity (detached here).
        x0: same shape, clean latents of the rollout images.
        x_t: same shape, ``(1 - t) x0 + t eps``.
        t: flow time in [0, 1], float, ``(B,)`` or ``(B, 1, ..., 1)``.
        r: optimality weights in [0, 1], float or ``(B,)`` (:func:`optimality_weight`).
        nft_beta: the paper's ``beta`` (1.0 or 0.1): how far the implicit policies sit from
            ``v_old``; the loss is divided by it so the gradient scale does not depend on it.
        adv_clip_max: the advantage clamp used for ``r`` (5 in the paper).
        kl_beta: weight of the KL-like penalty to the reference (1e-4 in the paper).
        v_ref: reference velocity (adapter disabled), needed when ``kl_beta > 0``; given with
            ``kl_beta == 0`` it is only logged.
        mask: ``(B,)`` bool; False samples (zero-std groups) are left out of every mean. An
            all-False mask gives loss 0 with zero gradient, not NaN.

    Returns:
        ``(loss, metrics)``; metrics (detached, means over valid samples): ``loss``,
        ``policy_loss`` (the NFT part), ``unweighted_policy_loss`` (without ``adv_clip_max``),
        ``positive_loss`` / ``negative_loss`` (``L_pos`` / ``L_neg``), ``positive_weight`` /
        ``negative_weight`` (``w_pos`` / ``w_neg``), ``optimality_weight_mean``,
        ``valid_fraction``, ``old_deviation`` (``mean((v_theta - v_old)^2)``) and, with
        ``v_ref``, ``kl``.
    """
    _check_nft_args(nft_beta, adv_clip_max, kl_beta)
    for name, tensor in (("v_old", v_old), ("x0", x0), ("x_t", x_t), ("v_ref", v_ref)):
        _check_like(name, tensor, v_theta, "v_theta")
    if v_theta.ndim < 1:
        raise ValueError("v_theta must have a batch dimension, shape (B, ...)")
    dtype = compute_dtype(v_theta, v_old, x0, x_t, t if isinstance(t, Tensor) else v_theta)
    with no_autocast(v_theta.device):
        v = v_theta.to(dtype)
        v_o = v_old.detach().to(dtype)
        x0_ = x0.detach().to(dtype)
        xt = x_t.detach().to(dtype)
        t_b = per_sample(t, v, "t", dtype).detach()
        if bool(((t_b < 0) | (t_b > 1)).any()):
            raise ValueError("t must be the flow time in [0, 1] (1 = pure noise)")
        valid = _sample_mask(mask, v.shape[0], v.device)
        v_pos = nft_beta * v + (1 - nft_beta) * v_o
        v_neg = (1 + nft_beta) * v_o - nft_beta * v
        loss, metrics = _nft_objective(xt - t_b * v_pos, xt - t_b * v_neg, x0_, r, nft_beta, adv_clip_max, valid)
        kl = _kl_term(v, v_ref, kl_beta, valid, dtype, metrics)
        if kl is not None:
            loss = loss + kl_beta * kl
        with torch.no_grad():
            metrics["old_deviation"] = _masked_mean(_mean_dims((v.detach() - v_o) ** 2), valid)
            metrics["loss"] = loss.detach()
    return loss, metrics


def x0_from_prediction(
    prediction: Tensor, x_t: Tensor, alpha_bar: Tensor | float, prediction_type: str = "epsilon"
) -> Tensor:
    """x0 implied by an epsilon- or v-prediction model at ``x_t = sqrt(a) x0 + sqrt(1 - a) eps``.

    * ``epsilon``: ``x0 = (x_t - sqrt(1 - a) eps_hat) / sqrt(a)``
    * ``v_prediction`` (``v = sqrt(a) eps - sqrt(1 - a) x0``): ``x0 = sqrt(a) x_t - sqrt(1 - a) v_hat``

    ``a`` is ``alphas_cumprod[timestep]`` of the family's DDPM scheduler: a float, ``(B,)`` or
    ``(B, 1, ..., 1)``, in (0, 1]. Both maps are affine in the prediction for fixed ``x_t`` and
    ``a``, so for coefficients summing to one (as the NFT mixes do) the x0 of a mixed output is
    the same mix of x0s. Gradient flows through ``prediction``; computed in float32.
    """
    if prediction_type not in EPSILON_PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type must be one of {EPSILON_PREDICTION_TYPES} (flow-matching families use "
            f"nft_loss directly), got {prediction_type!r}"
        )
    _check_like("x_t", x_t, prediction, "prediction")
    dtype = compute_dtype(prediction, x_t, alpha_bar if isinstance(alpha_bar, Tensor) else prediction)
    with no_autocast(prediction.device):
        pred = prediction.to(dtype)
        xt = x_t.detach().to(dtype)
        a = per_sample(alpha_bar, pred, "alpha_bar", dtype).detach()
        if bool(((a <= 0) | (a > 1)).any()):
            raise ValueError("alpha_bar (alphas_cumprod at the timestep) must lie in (0, 1]")
        if prediction_type == "epsilon":
            return (xt - (1 - a).sqrt() * pred) / a.sqrt()
        return a.sqrt() * xt - (1 - a).sqrt() * pred


def nft_loss_x0(
    x0_theta: Tensor,
    x0_old: Tensor,
    x0: Tensor,
    r: Tensor | float,
    nft_beta: float = 1.0,
    adv_clip_max: float = 5.0,
    kl_beta: float = 0.0,
    pred_theta: Tensor | None = None,
    pred_ref: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT loss from x0 predictions, for epsilon / v-prediction families (SDXL).

    ``x0_pos = beta x0_theta + (1 - beta) x0_old``, ``x0_neg = (1 + beta) x0_old - beta x0_theta``,
    then the same adaptive losses and combination as :func:`nft_loss`. Build ``x0_theta`` /
    ``x0_old`` from the two models' outputs at the same ``(x_t, timestep)`` with
    :func:`x0_from_prediction`. Why this is the same implicit policy: ``x0_hat`` is affine in the
    network output (``x0_hat = c1 x_t + c2 output``), and both mixes have coefficients summing to
    one, so ``x0_hat(beta out_theta + (1 - beta) out_old) = beta x0_theta + (1 - beta) x0_old``
    (likewise for the negative): the implicit epsilon (or v) policies of NFT give exactly these
    x0s. For flow models the same holds with ``x0_hat = x_t - t v``, which is why this function
    and :func:`nft_loss` agree on the same x0 predictions.

    ``pred_theta`` / ``pred_ref``: the raw outputs of the trained and reference (adapter
    disabled) model for the KL-like term ``kl_beta * mean((pred_theta - pred_ref)^2)``, taken in
    output space as NVlabs does for velocities; needed when ``kl_beta > 0``.

    Returns ``(loss, metrics)`` with the keys of :func:`nft_loss`; ``old_deviation`` is
    ``mean((x0_theta - x0_old)^2)`` here.
    """
    _check_nft_args(nft_beta, adv_clip_max, kl_beta)
    _check_like("x0_old", x0_old, x0_theta, "x0_theta")
    _check_like("x0", x0, x0_theta, "x0_theta")
    if (pred_theta is None) != (pred_ref is None):
        raise ValueError("pass both pred_theta and pred_ref (the KL term needs the two raw outputs), or neither")
    if pred_theta is not None:
        _check_like("pred_ref", pred_ref, pred_theta, "pred_theta")
    if x0_theta.ndim < 1:
        raise ValueError("x0_theta must have a batch dimension, shape (B, ...)")
    dtype = compute_dtype(x0_theta, x0_old, x0)
    with no_autocast(x0_theta.device):
        x_th = x0_theta.to(dtype)
        x_old = x0_old.detach().to(dtype)
        valid = _sample_mask(mask, x_th.shape[0], x_th.device)
        x0_pos = nft_beta * x_th + (1 - nft_beta) * x_old
        x0_neg = (1 + nft_beta) * x_old - nft_beta * x_th
        loss, metrics = _nft_objective(x0_pos, x0_neg, x0.detach().to(dtype), r, nft_beta, adv_clip_max, valid)
        pred = pred_theta.to(dtype) if pred_theta is not None else None
        kl = _kl_term(pred, pred_ref, kl_beta, valid, dtype, metrics)
        if kl is not None:
            loss = loss + kl_beta * kl
        with torch.no_grad():
            metrics["old_deviation"] = _masked_mean(_mean_dims((x_th.detach() - x_old) ** 2), valid)
            metrics["loss"] = loss.detach()
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# old policy: EMA of the trained one
# ---------------------------------------------------------------------------------------------


def old_policy_decay(step: int, flat: int, rate: float, cap: float) -> float:
    """EMA decay of the old policy after ``step`` optimizer steps: 0 for ``step < flat`` (the
    old policy is a copy of the trained one), else ``min((step - flat) * rate, cap)``.

    The old policy samples the rollouts; a decay that grows over training makes it lag further
    behind the trained policy once training is under way (more stable, as the paper's ablation
    shows), while early steps stay nearly on-policy. NVlabs evaluates it with the number of
    optimizer steps done so far (``global_step`` after the step).
    """
    if isinstance(step, bool) or int(step) != step or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if isinstance(flat, bool) or int(flat) != flat or flat < 0:
        raise ValueError(f"old-policy decay flat must be an integer >= 0, got {flat!r}")
    if not rate >= 0:
        raise ValueError(f"old-policy decay rate must be >= 0, got {rate!r}")
    if not 0 <= cap <= 1:
        raise ValueError(f"old-policy decay cap must lie in [0, 1], got {cap!r}")
    if step < flat:
        return 0.0
    return float(min((step - flat) * rate, cap))


@dataclass(frozen=True)
class OldPolicySchedule:
    """A named ``(flat, rate, cap)`` for :func:`old_policy_decay`; call it with the step."""

    flat: int
    rate: float
    cap: float

    def __post_init__(self) -> None:
        old_policy_decay(0, self.flat, self.rate, self.cap)  # validates the three values

    def __call__(self, step: int) -> float:
        return old_policy_decay(step, self.flat, self.rate, self.cap)


# The paper's two schedules (NVlabs' decay_type 1 and 2), named by what they do.
OLD_POLICY_SCHEDULES: dict[str, OldPolicySchedule] = {
    # decay rises from 0 by 0.001 per step and stays at 0.5 from step 500 on
    "linear_to_0.5": OldPolicySchedule(flat=0, rate=0.001, cap=0.5),
    # old == trained for 75 steps, then ramps by 0.0075 per step to 0.999 (from step 209 on)
    "flat75_to_0.999": OldPolicySchedule(flat=75, rate=0.0075, cap=0.999),
}


def _paired(old: Iterable[Tensor] | Mapping[str, Tensor], current: Iterable[Tensor] | Mapping[str, Tensor]):
    if isinstance(old, Mapping) or isinstance(current, Mapping):
        if not (isinstance(old, Mapping) and isinstance(current, Mapping)):
            raise TypeError("old_tensors and current_tensors must both be mappings or both be sequences")
        missing = sorted(set(current) - set(old))
        extra = sorted(set(old) - set(current))
        if missing or extra:
            raise ValueError(
                f"old and current parameters differ: missing in old {missing[:5]}, "
                f"not in current {extra[:5]}; both adapters must have the same modules"
            )
        return [(name, old[name], current[name]) for name in current]
    old_list, cur_list = list(old), list(current)
    if len(old_list) != len(cur_list):
        raise ValueError(
            f"old policy has {len(old_list)} tensors but the trained one has {len(cur_list)}; "
            "both adapters must have the same modules"
        )
    return [(str(i), o, c) for i, (o, c) in enumerate(zip(old_list, cur_list, strict=True))]


def update_old_policy(
    old_tensors: Iterable[Tensor] | Mapping[str, Tensor],
    current_tensors: Iterable[Tensor] | Mapping[str, Tensor],
    decay: float,
) -> None:
    """In place, without grad: ``old <- decay * old + (1 - decay) * current`` for each pair.

    Pass the old adapter's and the trained adapter's parameters in the same order, or two
    name -> tensor mappings (matched by name). ``decay = 0`` copies ``current`` exactly. The
    blend is computed in float32 (float64 stays float64) and written back in the old tensor's
    dtype; keep the old adapter in float32, since with decay 0.999 a bf16 copy would round
    each update away.
    """
    if not 0 <= decay <= 1:
        raise ValueError(f"decay must lie in [0, 1], got {decay!r}")
    pairs = _paired(old_tensors, current_tensors)
    with torch.no_grad():
        for name, old, cur in pairs:
            if old.shape != cur.shape:
                raise ValueError(
                    f"old-policy tensor {name} has shape {tuple(old.shape)} but the trained one has "
                    f"{tuple(cur.shape)}"
                )
            dtype = compute_dtype(old, cur)
            blended = old.detach().to(dtype) * decay + cur.detach().to(device=old.device, dtype=dtype) * (1 - decay)
            old.copy_(blended)
