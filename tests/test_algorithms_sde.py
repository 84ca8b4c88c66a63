"""Properties of the stochastic sampling steps (Flow-GRPO SDE, DDPO DDIM) and their log-probs."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from glm_training.algorithms.sde import (
    SDEStep,
    ddim_step_with_logprob,
    flow_sde_step,
    gaussian_log_prob,
)

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# property 1: noise_level = 0 is the Euler ODE step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9), (0.7, 0.55), (0.2, 0.0)])
def test_noise_level_zero_is_euler_step_bitwise(sigma: float, sigma_next: float) -> None:
    x, v, noise = _randn(3, 4, 5, 5, seed=1), _randn(3, 4, 5, 5, seed=2), _randn(3, 4, 5, 5, seed=3)
    step = flow_sde_step(x, v, sigma, sigma_next, noise_level=0.0, noise=noise)
    # dt taken between the float32 sigmas, as a scheduler holding float32 sigmas does
    euler = x + v * (torch.tensor(sigma_next) - torch.tensor(sigma))
    assert torch.equal(step.prev_sample, euler)
    assert torch.equal(step.mean, euler)
    assert torch.equal(step.log_prob, torch.zeros(3))
    # also with a generator, and when scoring a stored sample
    drawn = flow_sde_step(x, v, sigma, sigma_next, 0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn.prev_sample, euler)
    scored = flow_sde_step(x, v, sigma, sigma_next, 0.0, prev_sample=euler + 1.0)
    assert torch.equal(scored.log_prob, torch.zeros(3))


def test_noise_level_zero_matches_diffusers_flow_match_euler() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(8)
    x, v = _randn(2, 4, 6, 6, seed=4), _randn(2, 4, 6, 6, seed=5)
    for i, t in enumerate(scheduler.timesteps):
        scheduler._step_index = i
        ref = scheduler.step(v, t, x, return_dict=False)[0]
        ours = flow_sde_step(x, v, scheduler.sigmas[i], scheduler.sigmas[i + 1], 0.0).prev_sample
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_per_sample_noise_level_zero_entries_are_deterministic_and_finite() -> None:
    x, v, noise = _randn(2, 3, 4, seed=6), _randn(2, 3, 4, seed=7), _randn(2, 3, 4, seed=8)
    v.requires_grad_(True)
    step = flow_sde_step(x, v, 0.8, 0.6, noise_level=torch.tensor([0.0, 0.7]), noise=noise)
    dt = torch.tensor(0.6) - torch.tensor(0.8)
    torch.testing.assert_close(step.prev_sample[0], (x + v * dt)[0], rtol=0, atol=0)
    assert step.log_prob[0] == 0 and step.log_prob[1] != 0
    step.log_prob.sum().backward()
    assert torch.isfinite(v.grad).all()
    assert torch.equal(v.grad[0], torch.zeros_like(v.grad[0]))
    assert v.grad[1].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# formulas by hand
# ---------------------------------------------------------------------------------------------


def test_flow_sde_mean_std_and_log_prob_match_hand_formulas() -> None:
    sigma, sigma_next, a = 0.6, 0.45, 0.7
    x, v, noise = _randn(2, 3, 4, seed=9), _randn(2, 3, 4, seed=10), _randn(2, 3, 4, seed=11)
    step = flow_sde_step(x, v, sigma, sigma_next, a, noise=noise)
    dt = sigma_next - sigma
    std = a * math.sqrt(sigma / (1 - sigma))
    mean = x * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    s = std * math.sqrt(-dt)
    torch.testing.assert_close(step.mean, mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(step.prev_sample, mean + s * noise, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(step.std.flatten(), torch.tensor([std]))
    torch.testing.assert_close(step.transition_std.flatten(), torch.tensor([s]))
    expected_lp = (-(noise**2) / 2 - math.log(s) - LOG_SQRT_2PI).mean(dim=(1, 2))
    torch.testing.assert_close(step.log_prob, expected_lp, rtol=1e-5, atol=1e-5)


def test_sigma_one_guard_uses_next_sigma_like_flow_grpo() -> None:
    x, v = _randn(2, 8, seed=12), _randn(2, 8, seed=13)
    step = flow_sde_step(x, v, 1.0, 0.9, 0.7, noise=torch.zeros(2, 8))
    expected_std = 0.7 * math.sqrt(1.0 / (1 - 0.9))
    torch.testing.assert_close(step.std.flatten(), torch.tensor([expected_std]))
    assert torch.isfinite(step.mean).all() and torch.isfinite(step.log_prob).all()
    # the v coefficient has (1 - sigma) = 0 at sigma = 1: mean = x (1 + std^2/2 dt) + v dt
    torch.testing.assert_close(step.mean, x * (1 + expected_std**2 / 2 * -0.1) + v * -0.1)


def test_gaussian_log_prob_matches_torch_distributions() -> None:
    x, mean = _randn(3, 2, 5, seed=14), _randn(3, 2, 5, seed=15)
    std = torch.tensor([0.3, 1.0, 2.5])
    expected = torch.distributions.Normal(mean, std.view(3, 1, 1)).log_prob(x).mean(dim=(1, 2))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected)
    torch.testing.assert_close(
        gaussian_log_prob(x, mean, 0.5), torch.distributions.Normal(mean, 0.5).log_prob(x).mean(dim=(1, 2))
    )


# ---------------------------------------------------------------------------------------------
# property 2: SDE marginals == ODE marginals on a Gaussian flow with analytic velocity
# ---------------------------------------------------------------------------------------------

MU0, S0 = 1.5, 0.5


def _analytic_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    """v(x, t) = E[eps - x0 | x_t = x] for x0 ~ N(MU0, S0^2), x_t = (1 - t) x0 + t eps."""
    var_t = (1 - t) ** 2 * S0**2 + t**2
    return (t - (1 - t) * S0**2) * (x - (1 - t) * MU0) / var_t - MU0


def _integrate(noise_level: float, steps: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    mid_index = steps // 2
    mid = x
    for i in range(steps):
        step = flow_sde_step(x, _analytic_velocity(x, sigmas[i]), sigmas[i], sigmas[i + 1], noise_level, generator=gen)
        x = step.prev_sample
        if i + 1 == mid_index:
            mid = x
    return x, mid, sigmas[mid_index]


def test_sde_matches_ode_marginals_on_gaussian_flow() -> None:
    n, steps = 20_000, 40
    ode_final, ode_mid, t_mid = _integrate(0.0, steps, n, seed=0)
    sde_final, sde_mid, _ = _integrate(0.7, steps, n, seed=0)

    # Monte-Carlo standard errors: mean S0/sqrt(n) = 0.0035, std S0/sqrt(2n) = 0.0025; the rest of
    # the tolerance is Euler discretisation (40 steps). A missing or halved score-correction
    # drift gives final std 0.98 / 0.66, a missing v-term mean 1.24: all far outside.
    for final in (ode_final, sde_final):
        assert abs(final.mean().item() - MU0) < 0.02
        assert abs(final.std().item() - S0) < 0.02
        for q in (0.1, 0.5, 0.9):
            z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(q)).item()
            assert abs(torch.quantile(final, q).item() - (MU0 + S0 * z)) < 0.03
    assert abs(sde_final.mean().item() - ode_final.mean().item()) < 0.02
    assert abs(sde_final.std().item() - ode_final.std().item()) < 0.02

    # intermediate marginal x_t ~ N((1 - t) MU0, (1 - t)^2 S0^2 + t^2) at t = 0.5. The SDE's first
    # step (sigma = 1, std guard) adds (a^2/2)^2 ~ 0.06 excess variance, independent of the step
    # count, that has not fully decayed at t = 0.5: 5% relative tolerance on the std.
    mean_t, std_t = (1 - t_mid) * MU0, math.sqrt((1 - t_mid) ** 2 * S0**2 + t_mid**2)
    for mid in (ode_mid, sde_mid):
        assert abs(mid.mean().item() - mean_t) < 0.02
        assert abs(mid.std().item() / std_t - 1) < 0.05
    # and the SDE really is stochastic: its paths differ from the ODE's
    assert (sde_final - ode_final).abs().mean() > 0.1


# ---------------------------------------------------------------------------------------------
# re-computation consistency and batch-size invariance (property 4)
# ---------------------------------------------------------------------------------------------


def test_log_prob_of_stored_sample_equals_sampling_log_prob() -> None:
    x, v = _randn(4, 3, 8, 8, seed=16), _randn(4, 3, 8, 8, seed=17)
    drawn = flow_sde_step(x, v, 0.75, 0.6, 0.7, generator=torch.Generator().manual_seed(3))
    scored = flow_sde_step(x, v, 0.75, 0.6, 0.7, prev_sample=drawn.prev_sample)
    assert torch.equal(scored.log_prob, drawn.log_prob)
    assert torch.equal(scored.prev_sample, drawn.prev_sample)
    # a different sample has a different (lower on average) log-prob
    other = flow_sde_step(x, v, 0.75, 0.6, 0.7, prev_sample=drawn.prev_sample + 0.5)
    assert (other.log_prob < drawn.log_prob).all()

    eps = _randn(4, 3, 8, 8, seed=18)
    drawn = ddim_step_with_logprob(eps, x, 0.3, 0.5, eta=1.0, generator=torch.Generator().manual_seed(4))
    scored = ddim_step_with_logprob(eps, x, 0.3, 0.5, eta=1.0, prev_sample=drawn.prev_sample)
    assert torch.equal(scored.log_prob, drawn.log_prob)


def test_log_prob_gradient_flows_through_prediction_only() -> None:
    x = _randn(2, 3, 4, seed=19)
    v = _randn(2, 3, 4, seed=20).requires_grad_(True)
    stored = _randn(2, 3, 4, seed=21).requires_grad_(True)
    step = flow_sde_step(x, v, 0.5, 0.4, 0.7, prev_sample=stored)
    step.log_prob.sum().backward()
    assert stored.grad is None
    assert v.grad is not None and v.grad.abs().sum() > 0
    # d logp / d v = (x_next - mean) / s^2 * dmean/dv / D, with dmean/dv = (1 + std^2 (1-sigma)/(2 sigma)) dt
    s2 = step.transition_std.flatten()[0].item() ** 2
    std2 = step.std.flatten()[0].item() ** 2
    dmean_dv = (1 + std2 * 0.5 / (2 * 0.5)) * -0.1
    expected = (stored.detach() - step.mean.detach()) / s2 * dmean_dv / 12
    torch.testing.assert_close(v.grad, expected, rtol=1e-4, atol=1e-6)


def test_flow_step_is_batch_size_invariant() -> None:
    n = 5
    x, v, noise = _randn(n, 4, 6, 6, seed=22), _randn(n, 4, 6, 6, seed=23), _randn(n, 4, 6, 6, seed=24)
    sigma = torch.tensor([1.0, 0.9, 0.5, 0.3, 0.1])
    sigma_next = torch.tensor([0.9, 0.7, 0.4, 0.1, 0.0])
    batched = flow_sde_step(x, v, sigma, sigma_next, 0.7, noise=noise)
    for i in range(n):
        single = flow_sde_step(x[i : i + 1], v[i : i + 1], sigma[i].item(), sigma_next[i].item(), 0.7, noise=noise[i : i + 1])
        torch.testing.assert_close(single.prev_sample, batched.prev_sample[i : i + 1], rtol=0, atol=0)
        torch.testing.assert_close(single.mean, batched.mean[i : i + 1], rtol=0, atol=0)
        torch.testing.assert_close(single.log_prob, batched.log_prob[i : i + 1], rtol=1e-7, atol=1e-7)


def test_per_sample_generators_make_sampling_batch_size_invariant() -> None:
    x, v = _randn(3, 2, 4, 4, seed=25), _randn(3, 2, 4, 4, seed=26)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(3)]
    batched = flow_sde_step(x, v, 0.8, 0.7, 0.7, generator=gens)
    for i in range(3):
        single = flow_sde_step(x[i : i + 1], v[i : i + 1], 0.8, 0.7, 0.7, generator=[torch.Generator().manual_seed(100 + i)])
        torch.testing.assert_close(single.prev_sample, batched.prev_sample[i : i + 1], rtol=0, atol=0)
        torch.testing.assert_close(single.log_prob, batched.log_prob[i : i + 1], rtol=1e-7, atol=1e-7)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    ddim_batched = ddim_step_with_logprob(v, x, 0.4, 0.6, 1.0, generator=gens)
    ddim_single = ddim_step_with_logprob(v[2:], x[2:], 0.4, 0.6, 1.0, generator=[torch.Generator().manual_seed(2)])
    torch.testing.assert_close(ddim_single.prev_sample, ddim_batched.prev_sample[2:], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# property 8: float32 log-probs under half precision inputs and autocast
# ---------------------------------------------------------------------------------------------


def _assert_fp32_step(step: SDEStep) -> None:
    for t in (step.prev_sample, step.log_prob, step.mean, step.std, step.transition_std):
        assert t.dtype == torch.float32


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_give_float32_log_probs(half: torch.dtype) -> None:
    x, v, noise = _randn(2, 3, 8, 8, seed=27), _randn(2, 3, 8, 8, seed=28), _randn(2, 3, 8, 8, seed=29)
    xh, vh = x.to(half), v.to(half)
    step = flow_sde_step(xh, vh, 0.5, 0.45, 0.7, noise=noise)
    _assert_fp32_step(step)
    # identical to computing from the fp32 upcast of the same values
    ref = flow_sde_step(xh.float(), vh.float(), 0.5, 0.45, 0.7, noise=noise)
    assert torch.equal(step.log_prob, ref.log_prob)
    ddim = ddim_step_with_logprob(vh, xh, 0.3, 0.4, 1.0, noise=noise)
    _assert_fp32_step(ddim)
    assert gaussian_log_prob(xh, vh, torch.tensor(0.5, dtype=half)).dtype == torch.float32


def test_log_probs_are_float32_under_cpu_autocast() -> None:
    x, v, noise = _randn(2, 3, 8, 8, seed=30), _randn(2, 3, 8, 8, seed=31), _randn(2, 3, 8, 8, seed=32)
    plain = flow_sde_step(x.bfloat16(), v.bfloat16(), 0.5, 0.45, 0.7, noise=noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # a real autocast-region prediction: matmul output is bf16
        w = torch.eye(8)
        v_auto = v.bfloat16().float() @ w
        assert v_auto.dtype == torch.bfloat16
        step = flow_sde_step(x.bfloat16(), v_auto, 0.5, 0.45, 0.7, noise=noise)
        ddim = ddim_step_with_logprob(v_auto, x.bfloat16(), 0.3, 0.4, 1.0, noise=noise)
    _assert_fp32_step(step)
    _assert_fp32_step(ddim)
    assert torch.equal(step.log_prob, plain.log_prob)


# ---------------------------------------------------------------------------------------------
# DDIM / DDPO
# ---------------------------------------------------------------------------------------------


def _sdxl_like_ddim(prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
def test_ddim_matches_diffusers_step(prediction_type: str, eta: float) -> None:
    scheduler = _sdxl_like_ddim(prediction_type)
    scheduler.set_timesteps(10)
    x, out = _randn(2, 4, 8, 8, seed=33), _randn(2, 4, 8, 8, seed=34)
    noise = _randn(2, 4, 8, 8, seed=35)
    for t in scheduler.timesteps:
        prev_t = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        a_t = scheduler.alphas_cumprod[t]
        a_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
        ref = scheduler.step(out, t, x, eta=eta, variance_noise=noise if eta > 0 else None).prev_sample
        ours = ddim_step_with_logprob(out, x, a_t, a_prev, eta, prediction_type, noise=noise)
        torch.testing.assert_close(ours.prev_sample, ref, rtol=1e-5, atol=1e-5)
        if eta == 0:
            assert torch.equal(ours.log_prob, torch.zeros(2))
            torch.testing.assert_close(ours.mean, ref, rtol=1e-5, atol=1e-5)
        else:
            sigma_t = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
            torch.testing.assert_close(ours.std.flatten(), torch.tensor([sigma_t]), rtol=1e-5, atol=1e-7)
            expected = (-(noise**2) / 2 - math.log(sigma_t) - LOG_SQRT_2PI).mean(dim=(1, 2, 3))
            torch.testing.assert_close(ours.log_prob, expected, rtol=1e-4, atol=1e-4)


def test_ddim_final_step_to_alpha_one_is_deterministic() -> None:
    x, eps = _randn(2, 3, 4, seed=36), _randn(2, 3, 4, seed=37)
    step = ddim_step_with_logprob(eps, x, 0.9, 1.0, eta=1.0, noise=_randn(2, 3, 4, seed=38))
    expected_x0 = (x - math.sqrt(0.1) * eps) / math.sqrt(0.9)
    torch.testing.assert_close(step.prev_sample, expected_x0)
    assert torch.equal(step.log_prob, torch.zeros(2))


# ---------------------------------------------------------------------------------------------
# argument errors
# ---------------------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        flow_sde_step(x, x, 0.5, 0.6, 0.7)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        flow_sde_step(x, x, 1.2, 0.6, 0.7)
    with pytest.raises(ValueError, match="noise_level"):
        flow_sde_step(x, x, 0.5, 0.4, -0.1)
    with pytest.raises(ValueError, match="sigma"):
        flow_sde_step(x, x, torch.tensor([0.5, 0.4, 0.3]), 0.2, 0.7)
    with pytest.raises(ValueError, match="velocity"):
        flow_sde_step(x, torch.zeros(2, 4), 0.5, 0.4, 0.7)
    with pytest.raises(ValueError, match="prev_sample"):
        flow_sde_step(x, x, 0.5, 0.4, 0.7, prev_sample=x, noise=x)
    with pytest.raises(ValueError, match="one generator per sample"):
        flow_sde_step(x, x, 0.5, 0.4, 0.7, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        ddim_step_with_logprob(x, x, 0.5, 0.6, 0.0, prediction_type="flow")
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(x, x, 0.5, 0.6, 1.5)
    with pytest.raises(ValueError, match="alpha_prod_t"):
        ddim_step_with_logprob(x, x, 1.0, 0.6, 0.5)
