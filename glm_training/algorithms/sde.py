"""Stochastic sampling steps with per-step Gaussian log-probabilities (Flow-GRPO, DDPO).

GRPO on diffusion models needs a *stochastic* sampler whose every step is a Gaussian
transition ``x_next ~ N(mean_theta(x), s^2 I)``: then ``log p_theta(x_next | x)`` is a closed
form, differentiable in the model's prediction, and the policy ratio of PPO/GRPO is defined.

* :func:`flow_sde_step` is Flow-GRPO's reverse-time SDE for flow-matching models
  (``x_t = (1 - t) x0 + t eps``, velocity ``v = eps - x0``); it has the same marginals as
  the probability-flow ODE ``dx = v dt``.
* :func:`ddim_step_with_logprob` is DDPO's DDIM step with ``eta > 0`` for epsilon / v
  prediction models.

All arithmetic runs in float32 (float64 inputs stay float64) with autocast disabled, whatever
the input dtype: in bf16 the squared residual ``(x_next - mean)^2 / s^2`` with small ``s``
overflows or loses every significant digit, and the PPO ratio ``exp(logp - logp_old)`` then
is noise.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "SDEStep",
    "compute_dtype",
    "ddim_step_with_logprob",
    "flow_sde_std",
    "flow_sde_step",
    "gaussian_log_prob",
    "no_autocast",
    "per_sample",
]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

Scalar = float | Tensor
Generator = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class SDEStep:
    """Result of one stochastic sampling step.

    Attributes:
        prev_sample: ``x_next``, shape of the input sample, in the compute dtype (float32 for
            half inputs). Cast it to the model dtype for the next forward yourself, but store
            this tensor (not a bf16 copy) if you want the log-prob recomputed in training to be
            bitwise equal to ``log_prob``.
        log_prob: ``(B,)`` Gaussian log-density of ``prev_sample`` under ``N(mean,
            transition_std^2)``, averaged over the non-batch dims; zeros where the step is
            deterministic (``transition_std == 0``). Gradient flows through ``mean`` only.
        mean: the transition mean, shape of the sample.
        std: the diffusion coefficient broadcastable to the sample, shape ``(B, 1, ..., 1)``:
            ``a * sqrt(sigma / (1 - sigma))`` for the flow SDE (the ``std`` of Flow-GRPO's code
            and of its KL term), ``sigma_t(eta)`` for DDIM.
        transition_std: the std of the Gaussian transition, ``std * sqrt(-dt)`` for the flow SDE
            and ``std`` for DDIM. The exact KL between two such transitions divides by
            ``2 * transition_std^2``.
    """

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor
    transition_std: Tensor


# ---------------------------------------------------------------------------------------------
# helpers shared with grpo.py
# ---------------------------------------------------------------------------------------------


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 if any input is float64: never compute log-probs in half precision."""
    dtype = torch.float32
    for t in tensors:
        if isinstance(t, Tensor) and t.dtype == torch.float64:
            dtype = torch.float64
    return dtype


@contextlib.contextmanager
def no_autocast(device: torch.device) -> Iterator[None]:
    """Disable autocast for ``device`` so that float32 math stays float32 inside the block."""
    if torch.amp.is_autocast_available(device.type):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


def per_sample(value: Scalar, like: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    """Turn a float, 0-d tensor, ``(B,)`` tensor or ``(B, 1, ..., 1)`` tensor into a tensor
    broadcastable against ``like`` (shape ``(B, ...)``), on its device, in ``dtype``."""
    t = torch.as_tensor(value, device=like.device).to(dtype)
    if t.ndim == 0:
        return t.reshape((1,) * max(like.ndim, 1))
    if t.ndim == 1 and like.ndim >= 1:
        if t.shape[0] not in (1, like.shape[0]):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; expected a scalar or one value per sample "
                f"(batch size {like.shape[0]})"
            )
        return t.reshape((t.shape[0],) + (1,) * (like.ndim - 1))
    if t.ndim == like.ndim:
        try:
            torch.broadcast_shapes(t.shape, like.shape)
        except RuntimeError as err:
            raise ValueError(
                f"{name} of shape {tuple(t.shape)} does not broadcast against {tuple(like.shape)}"
            ) from err
        return t
    raise ValueError(
        f"{name} has shape {tuple(t.shape)}; expected a scalar, shape (B,) or a tensor with "
        f"{like.ndim} dims broadcastable to {tuple(like.shape)}"
    )


def _sample_noise(
    shape: torch.Size, generator: Generator, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Standard normal noise. A list of generators draws each sample's noise from its own
    generator, so a rollout does not depend on how samples are batched."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(
            f"generator is a list of {len(generators)} generators but the batch has {shape[0]} "
            "samples; pass one generator per sample or a single generator"
        )
    return torch.stack(
        [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generators]
    ).to(device)


def _mean_over_non_batch(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def _check_same_shape(name: str, t: Tensor | None, like: Tensor) -> None:
    if t is not None and t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but sample has {tuple(like.shape)}")


# ---------------------------------------------------------------------------------------------
# Gaussian log-density
# ---------------------------------------------------------------------------------------------


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Scalar) -> Tensor:
    """Per-sample log N(x; mean, std^2), averaged over the non-batch dims, in float32.

    ``log p = -(x - mean)^2 / (2 std^2) - log(std) - log(sqrt(2 pi))``. Averaging (not summing)
    over pixels keeps the scale independent of the resolution, as Flow-GRPO and DDPO do, so the
    clip range ``epsilon`` means the same at every size. ``std`` must be > 0; it may be a float,
    ``(B,)`` or broadcastable to ``x``. For 1-D ``x`` the result is elementwise.
    """
    dtype = compute_dtype(x, mean, std if isinstance(std, Tensor) else x)
    with no_autocast(x.device):
        x = x.to(dtype)
        mean = mean.to(dtype)
        s = per_sample(std, x, "std", dtype)
        log_p = -((x - mean) ** 2) / (2.0 * s**2) - torch.log(s) - _LOG_SQRT_2PI
        return _mean_over_non_batch(log_p)


def _transition_log_prob(prev_sample: Tensor, mean: Tensor, transition_std: Tensor) -> Tensor:
    """Log-prob of a Gaussian step; exactly 0 for samples whose step is deterministic (std 0).

    The std is replaced by 1 where it is 0 before dividing, so neither the value nor the
    gradient becomes NaN there (``torch.where`` alone would still back-propagate 0 * inf).
    """
    deterministic = transition_std == 0
    safe_std = torch.where(deterministic, torch.ones_like(transition_std), transition_std)
    log_p = gaussian_log_prob(prev_sample.detach(), mean, safe_std)
    det_per_sample = deterministic.reshape(deterministic.shape[0], -1).all(dim=1)
    if det_per_sample.shape[0] == 1 and log_p.shape[0] != 1:
        det_per_sample = det_per_sample.expand(log_p.shape[0])
    return torch.where(det_per_sample, torch.zeros_like(log_p), log_p)


# ---------------------------------------------------------------------------------------------
# Flow matching: Flow-GRPO's SDE
# ---------------------------------------------------------------------------------------------


def flow_sde_std(sigma: Tensor, sigma_next: Tensor, noise_level: Tensor) -> Tensor:
    """Diffusion coefficient ``a * sqrt(sigma / (1 - sigma))`` of Flow-GRPO's SDE.

    At ``sigma == 1`` (pure noise, the first step of every schedule) the formula is infinite.
    Like flow_grpo, which substitutes ``sigmas[1]`` (the next-smaller sigma) into ``1 - sigma``
    there, we use ``1 - sigma_next`` for that step: identical numbers to the reference for
    the first step, and finite for any schedule that actually moves (``sigma_next < 1``).
    """
    one_minus = torch.where(sigma >= 1.0, 1.0 - sigma_next, 1.0 - sigma)
    return noise_level * torch.sqrt(sigma / one_minus)


def flow_sde_step(
    sample: Tensor,
    velocity: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    noise: Tensor | None = None,
    generator: Generator = None,
    prev_sample: Tensor | None = None,
) -> SDEStep:
    """One reverse-time step of Flow-GRPO's marginal-preserving SDE, with its log-prob.

    With ``dt = sigma_next - sigma < 0`` and ``std = a * sqrt(sigma / (1 - sigma))``
    (``a = noise_level``, see :func:`flow_sde_std` for the ``sigma == 1`` guard)::

        mean   = x * (1 + std^2 / (2 sigma) * dt) + v * (1 + std^2 (1 - sigma) / (2 sigma)) * dt
        x_next = mean + std * sqrt(-dt) * noise

    The extra drift ``-std^2/2 * score`` (with the flow-matching score
    ``-(x + (1 - sigma) v) / sigma``) exactly compensates the injected noise, so the marginals
    are those of the ODE ``x_next = x + v * dt``. ``noise_level = 0`` gives that Euler step
    bitwise; its log-prob is undefined (a Dirac) and returned as 0, so deterministic steps of a
    windowed sampler (MixGRPO, Flow-GRPO-Fast) contribute nothing.

    Args:
        sample: ``x`` at ``sigma``, shape ``(B, ...)``.
        velocity: the model's (possibly CFG-guided) velocity prediction ``v``, same shape.
        sigma, sigma_next: current and next scheduler sigma in ``[0, 1]`` with
            ``0 <= sigma_next < sigma <= 1``; float, or tensor of shape ``(B,)``.
        noise_level: ``a >= 0`` (about 0.7; 0.9 for FLUX); float or ``(B,)`` tensor.
        noise: standard normal noise to use instead of drawing it.
        generator: a generator, or one per sample (batch-size-invariant rollouts).
        prev_sample: if given, nothing is sampled: the log-prob of this stored ``x_next`` is
            computed (how training re-evaluates stored rollouts under the current policy).

    Returns:
        :class:`SDEStep` (float32 for half-precision inputs).
    """
    _check_same_shape("velocity", velocity, sample)
    _check_same_shape("noise", noise, sample)
    _check_same_shape("prev_sample", prev_sample, sample)
    if prev_sample is not None and (noise is not None or generator is not None):
        raise ValueError("pass either prev_sample (to score a stored sample) or noise/generator, not both")
    if noise is not None and generator is not None:
        raise ValueError("pass either noise or generator, not both")

    dtype = compute_dtype(sample, velocity)
    with no_autocast(sample.device):
        x = sample.to(dtype)
        v = velocity.to(dtype)
        s = per_sample(sigma, x, "sigma", dtype)
        s_next = per_sample(sigma_next, x, "sigma_next", dtype)
        a = per_sample(noise_level, x, "noise_level", dtype)
        if bool((s > 1).any()) or bool((s_next < 0).any()) or bool((s_next >= s).any()):
            raise ValueError(
                "flow_sde_step needs 0 <= sigma_next < sigma <= 1 (sigma 1 = pure noise; "
                f"sampling goes down); got sigma={sigma!r}, sigma_next={sigma_next!r}"
            )
        if bool((a < 0).any()):
            raise ValueError(f"noise_level must be >= 0, got {noise_level!r}")

        dt = s_next - s
        std = flow_sde_std(s, s_next, a)
        mean = x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
        transition_std = std * torch.sqrt(-dt)

        if prev_sample is None:
            if noise is None:
                noise = _sample_noise(x.shape, generator, x.device, dtype)
            prev_sample = mean + transition_std * noise.to(dtype)
        else:
            prev_sample = prev_sample.to(dtype)
        log_prob = _transition_log_prob(prev_sample, mean, transition_std)
    return SDEStep(prev_sample, log_prob, mean, std, transition_std)


# ---------------------------------------------------------------------------------------------
# Epsilon / v prediction: DDIM with eta > 0 (DDPO)
# ---------------------------------------------------------------------------------------------

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def ddim_step_with_logprob(
    model_output: Tensor,
    sample: Tensor,
    alpha_prod_t: Scalar,
    alpha_prod_t_prev: Scalar,
    eta: float,
    prediction_type: str = "epsilon",
    noise: Tensor | None = None,
    generator: Generator = None,
    prev_sample: Tensor | None = None,
) -> SDEStep:
    """One DDIM step (Song et al. eq. 12 and 16) with the Gaussian log-prob of its result (DDPO).

    ``a_t = alpha_prod_t`` (cumulative product of alphas at t), ``a_prev`` at the previous
    (less noisy) timestep; use the scheduler's ``final_alpha_cumprod`` after the last step::

        x0      = (x - sqrt(1 - a_t) eps) / sqrt(a_t)          (from eps / v / x0 prediction)
        sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
        mean    = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_t^2) eps
        x_prev  = mean + sigma_t * noise

    ``eta = 0`` is the deterministic DDIM step of diffusers' ``DDIMScheduler.step`` (with
    ``clip_sample=False``, which SDXL uses) and has log-prob 0; ``eta = 1`` is DDPM-like and
    is what DDPO trains with. ``prev_sample`` given: score that stored sample, draw nothing.
    """
    if prediction_type not in _PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}")
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM), got {eta!r}")
    _check_same_shape("model_output", model_output, sample)
    _check_same_shape("noise", noise, sample)
    _check_same_shape("prev_sample", prev_sample, sample)
    if prev_sample is not None and (noise is not None or generator is not None):
        raise ValueError("pass either prev_sample (to score a stored sample) or noise/generator, not both")
    if noise is not None and generator is not None:
        raise ValueError("pass either noise or generator, not both")

    dtype = compute_dtype(sample, model_output)
    with no_autocast(sample.device):
        x = sample.to(dtype)
        out = model_output.to(dtype)
        a_t = per_sample(alpha_prod_t, x, "alpha_prod_t", dtype)
        a_prev = per_sample(alpha_prod_t_prev, x, "alpha_prod_t_prev", dtype)
        if bool((a_t <= 0).any()) or bool((a_t >= 1).any()) or bool((a_prev <= 0).any()) or bool(
            (a_prev > 1).any()
        ):
            raise ValueError(
                "alpha_prod_t must be in (0, 1) and alpha_prod_t_prev in (0, 1]; "
                f"got alpha_prod_t={alpha_prod_t!r}, alpha_prod_t_prev={alpha_prod_t_prev!r}"
            )
        beta_t = 1 - a_t
        if prediction_type == "epsilon":
            pred_x0 = (x - beta_t**0.5 * out) / a_t**0.5
            pred_eps = out
        elif prediction_type == "v_prediction":
            pred_x0 = a_t**0.5 * x - beta_t**0.5 * out
            pred_eps = a_t**0.5 * out + beta_t**0.5 * x
        else:  # "sample"
            pred_x0 = out
            pred_eps = (x - a_t**0.5 * pred_x0) / beta_t**0.5

        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * variance.clamp(min=0) ** 0.5
        # clamp: with eta = 1 the bracket is 0 up to rounding, and sqrt(-tiny) would be NaN
        direction = (1 - a_prev - std**2).clamp(min=0) ** 0.5 * pred_eps
        mean = a_prev**0.5 * pred_x0 + direction

        if prev_sample is None:
            if noise is None:
                noise = _sample_noise(x.shape, generator, x.device, dtype)
            prev_sample = mean + std * noise.to(dtype)
        else:
            prev_sample = prev_sample.to(dtype)
        log_prob = _transition_log_prob(prev_sample, mean, std)
    return SDEStep(prev_sample, log_prob, mean, std, std)
