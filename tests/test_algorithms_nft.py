"""Properties of the DiffusionNFT layer: optimality weights, the implicit-policy loss (flow and
x0 forms), the KL term, the old-policy EMA schedule."""

from __future__ import annotations

import pytest
import torch

from glm_training.algorithms.nft import (
    OLD_POLICY_SCHEDULES,
    OldPolicySchedule,
    nft_loss,
    nft_loss_x0,
    nft_optimality_weights,
    old_policy_decay,
    optimality_weight,
    update_old_policy,
    x0_from_prediction,
)
from glm_training.algorithms.objectives import EpsilonObjective

SHAPE = (5, 2, 3, 4)  # B, C, H, W


def _flow_batch(seed: int, dtype: torch.dtype = torch.float64):
    """x0, eps, t (B,), x_t = (1 - t) x0 + t eps, and two different velocity predictions."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(SHAPE, generator=g, dtype=dtype)
    eps = torch.randn(SHAPE, generator=g, dtype=dtype)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.95], dtype=dtype)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
    v_theta = (eps - x0) + 0.3 * torch.randn(SHAPE, generator=g, dtype=dtype)
    v_old = (eps - x0) + 0.3 * torch.randn(SHAPE, generator=g, dtype=dtype)
    return x0, eps, t, x_t, v_theta, v_old


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _adaptive_velocity_loss(v: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample adaptively weighted SFT loss written in velocity space: since
    ``x_t - t v - x0 = t (target - v)``, ``mean(err_x0^2) / mean|err_x0| = t mse_v / mae_v``
    with the normaliser held constant."""
    d = _flat(v - target)
    return t**2 * d.pow(2).mean(1) / (t * d.detach().abs().mean(1))


# ---------------------------------------------------------------------------------------------
# optimality weights
# ---------------------------------------------------------------------------------------------

ADV = torch.tensor([-7.0, -5.0, -2.5, 0.0, 1.0, 5.0, 8.0])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("all", [0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0]),
        ("positive_only", [0.5, 0.5, 0.5, 0.5, 0.6, 1.0, 1.0]),
        ("negative_only", [0.0, 0.0, 0.25, 0.5, 0.5, 0.5, 0.5]),
        ("binary", [0.4, 0.4, 0.4, 0.5, 0.6, 0.6, 0.6]),
    ],
)
def test_optimality_weight_per_mode_on_hand_made_advantages(mode: str, expected: list[float]) -> None:
    r = optimality_weight(ADV, adv_clip_max=5.0, mode=mode)
    torch.testing.assert_close(r, torch.tensor(expected))
    assert r.dtype == torch.float32 and not r.requires_grad


def test_optimality_weight_clip_scale_and_errors() -> None:
    torch.testing.assert_close(optimality_weight(torch.tensor([-1.0, 1.0, 3.0]), 2.5), torch.tensor([0.3, 0.7, 1.0]))
    with pytest.raises(ValueError, match=r"adv_mode must be one of \('all', 'positive_only'"):
        optimality_weight(ADV, 5.0, "one_only")
    with pytest.raises(ValueError, match="adv_clip_max"):
        optimality_weight(ADV, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        optimality_weight(torch.tensor([float("nan")]), 5.0)


def test_constant_reward_group_gets_r_one_half_masked_and_no_nan() -> None:
    rewards = torch.tensor([0.7, 0.7, 0.7, 1.0, 2.0, 3.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    r, valid, stats = nft_optimality_weights(rewards, groups, adv_clip_max=5.0, mode="all")
    assert torch.isfinite(r).all()
    assert torch.equal(r[:3], torch.full((3,), 0.5))
    assert valid.tolist() == [False, False, False, True, True, True]
    std = torch.tensor([1.0, 2.0, 3.0]).std(unbiased=False)
    adv = torch.tensor([-1.0, 0.0, 1.0]) / (std + 1e-4)
    torch.testing.assert_close(r[3:], adv / 5 / 2 + 0.5)
    torch.testing.assert_close(stats["zero_std_fraction"], torch.tensor(0.5))
    torch.testing.assert_close(stats["optimality_weight_mean"], r.mean())

    # the whole batch constant: every sample masked, the loss is 0 (no NaN) and so is its gradient
    r, valid, _ = nft_optimality_weights(torch.full((5,), 3.0), torch.tensor([0, 0, 1, 1, 1]))
    assert torch.equal(r, torch.full((5,), 0.5)) and not valid.any()
    x0, _, t, x_t, v_theta, v_old = _flow_batch(0)
    v_theta.requires_grad_(True)
    loss, metrics = nft_loss(v_theta, v_old, x0, x_t, t, r, mask=valid, kl_beta=1e-4, v_ref=v_old)
    loss.backward()
    assert loss == 0.0 and torch.equal(v_theta.grad, torch.zeros_like(v_theta))
    assert all(torch.isfinite(v).all() for v in metrics.values())


# ---------------------------------------------------------------------------------------------
# the flow-matching loss
# ---------------------------------------------------------------------------------------------


def test_r1_beta1_is_the_adaptively_weighted_sft_flow_loss_whatever_v_old() -> None:
    x0, eps, t, x_t, v_theta, v_old = _flow_batch(1)
    v_theta.requires_grad_(True)
    sft = _adaptive_velocity_loss(v_theta, eps - x0, t).mean()
    loss, metrics = nft_loss(v_theta, v_old, x0, x_t, t, r=1.0, nft_beta=1.0, adv_clip_max=5.0)
    torch.testing.assert_close(loss, 5.0 * sft)
    torch.testing.assert_close(metrics["unweighted_policy_loss"], sft.detach())
    torch.testing.assert_close(metrics["positive_loss"], sft.detach())
    # w_pos = mean|x0_pos - x0| = t * mae_v
    w_pos = t * _flat(v_theta - (eps - x0)).abs().mean(1)
    torch.testing.assert_close(metrics["positive_weight"], w_pos.mean().detach())
    # with beta = 1 the positive policy is v_theta itself, so v_old cannot matter
    other, _ = nft_loss(v_theta, v_old * -3.0 + 1.0, x0, x_t, t, r=torch.ones(5), nft_beta=1.0, adv_clip_max=5.0)
    torch.testing.assert_close(other, loss)


@pytest.mark.parametrize("nft_beta", [1.0, 0.1])
def test_theta_equal_old_gradient_is_2r_minus_1_times_sft_gradient(nft_beta: float) -> None:
    x0, eps, t, x_t, v_theta, _ = _flow_batch(2)
    r = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    v_theta.requires_grad_(True)
    loss, metrics = nft_loss(v_theta, v_theta.detach().clone(), x0, x_t, t, r, nft_beta=nft_beta, adv_clip_max=5.0)
    (grad_nft,) = torch.autograd.grad(loss, v_theta)
    sft = _adaptive_velocity_loss(v_theta, eps - x0, t).mean()
    (grad_sft,) = torch.autograd.grad(sft, v_theta)
    # (2r - 1) * adv_clip_max = the clipped advantage: -5, -2.5, 0, 2.5, 5
    scale = ((2 * r - 1) * 5.0)[:, None, None, None]
    torch.testing.assert_close(grad_nft, scale * grad_sft, rtol=1e-9, atol=1e-12)
    assert grad_nft[2].abs().max() < 1e-12  # r = 0.5: no signal
    assert grad_nft[4].abs().max() > 1e-3  # r = 1: plain SFT, pulled towards the sample
    torch.testing.assert_close(metrics["positive_loss"], metrics["negative_loss"])
    assert metrics["old_deviation"] == 0.0


def test_general_loss_matches_the_formula_in_velocity_space() -> None:
    x0, eps, t, x_t, v_theta, v_old = _flow_batch(3)
    beta, clip = 0.3, 2.0
    r = torch.tensor([0.1, 0.9, 0.5, 0.0, 0.7], dtype=torch.float64)
    loss, metrics = nft_loss(v_theta, v_old, x0, x_t, t, r, nft_beta=beta, adv_clip_max=clip)
    target = eps - x0
    l_pos = _adaptive_velocity_loss(beta * v_theta + (1 - beta) * v_old, target, t)
    l_neg = _adaptive_velocity_loss((1 + beta) * v_old - beta * v_theta, target, t)
    expected = ((r * l_pos + (1 - r) * l_neg) / beta).mean() * clip
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["negative_loss"], l_neg.mean())
    torch.testing.assert_close(metrics["old_deviation"], _flat(v_theta - v_old).pow(2).mean())
    # t may also come as (B, 1, 1, 1); r as a float applies to every sample
    same, _ = nft_loss(v_theta, v_old, x0, x_t, t[:, None, None, None], r, nft_beta=beta, adv_clip_max=clip)
    torch.testing.assert_close(same, loss)
    flat_r, _ = nft_loss(v_theta, v_old, x0, x_t, t, 0.9, nft_beta=beta, adv_clip_max=clip)
    torch.testing.assert_close(flat_r, ((0.9 * l_pos + 0.1 * l_neg) / beta).mean() * clip)


def test_kl_term_is_zero_at_the_reference_positive_elsewhere_and_weighted() -> None:
    x0, _, t, x_t, v_theta, v_old = _flow_batch(4)
    r = torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64)
    v_theta.requires_grad_(True)
    base, _ = nft_loss(v_theta, v_old, x0, x_t, t, r)
    same, metrics = nft_loss(v_theta, v_old, x0, x_t, t, r, kl_beta=0.5, v_ref=v_theta.detach().clone())
    assert metrics["kl"] == 0.0
    torch.testing.assert_close(same, base)

    v_ref = v_theta.detach() + 0.1 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    kl_beta = 0.5
    with_kl, metrics = nft_loss(v_theta, v_old, x0, x_t, t, r, kl_beta=kl_beta, v_ref=v_ref)
    kl = _flat(v_theta.detach() - v_ref).pow(2).mean()
    assert metrics["kl"] > 0
    torch.testing.assert_close(metrics["kl"], kl)
    torch.testing.assert_close(with_kl, base + kl_beta * kl)
    (g_kl,) = torch.autograd.grad(with_kl, v_theta)
    (g_base,) = torch.autograd.grad(base, v_theta)
    n = v_theta.numel()
    torch.testing.assert_close(g_kl - g_base, kl_beta * 2 * (v_theta.detach() - v_ref) / n)
    # given with kl_beta = 0 the KL is only logged
    logged, metrics = nft_loss(v_theta, v_old, x0, x_t, t, r, kl_beta=0.0, v_ref=v_ref)
    torch.testing.assert_close(logged, base)
    torch.testing.assert_close(metrics["kl"], kl)
    with pytest.raises(ValueError, match="kl_beta > 0 needs the reference"):
        nft_loss(v_theta, v_old, x0, x_t, t, r, kl_beta=1e-4)


def test_mask_leaves_samples_out_of_every_mean() -> None:
    x0, _, t, x_t, v_theta, v_old = _flow_batch(5)
    r = torch.tensor([0.2, 0.9, 0.5, 0.5, 1.0], dtype=torch.float64)
    v_ref = v_old + 0.05
    mask = torch.tensor([True, True, False, False, True])
    v_theta.requires_grad_(True)
    loss, metrics = nft_loss(v_theta, v_old, x0, x_t, t, r, kl_beta=0.1, v_ref=v_ref, mask=mask)
    sub, sub_metrics = nft_loss(
        v_theta[mask], v_old[mask], x0[mask], x_t[mask], t[mask], r[mask], kl_beta=0.1, v_ref=v_ref[mask]
    )
    torch.testing.assert_close(loss, sub)
    for key in ("positive_loss", "negative_loss", "positive_weight", "kl", "old_deviation", "optimality_weight_mean"):
        torch.testing.assert_close(metrics[key], sub_metrics[key])
    torch.testing.assert_close(metrics["valid_fraction"], torch.tensor(0.6, dtype=torch.float64))
    loss.backward()
    assert torch.equal(v_theta.grad[~mask], torch.zeros_like(v_theta.grad[~mask]))


def test_loss_is_float32_for_bf16_inputs_and_under_autocast() -> None:
    x0, _, t, x_t, v_theta, v_old = (x.to(torch.bfloat16) for x in _flow_batch(6))
    loss, metrics = nft_loss(v_theta, v_old, x0, x_t, t, 0.7)
    assert loss.dtype == torch.float32 and all(m.dtype == torch.float32 for m in metrics.values())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ac, _ = nft_loss(v_theta.float(), v_old.float(), x0.float(), x_t.float(), t.float(), 0.7)
    assert loss_ac.dtype == torch.float32
    torch.testing.assert_close(loss_ac, loss)


def test_loss_argument_errors_name_the_argument() -> None:
    x0, _, t, x_t, v_theta, v_old = _flow_batch(7)
    with pytest.raises(ValueError, match="nft_beta must be > 0"):
        nft_loss(v_theta, v_old, x0, x_t, t, 0.5, nft_beta=0.0)
    with pytest.raises(ValueError, match="v_old has shape"):
        nft_loss(v_theta, v_old[:, :1], x0, x_t, t, 0.5)
    with pytest.raises(ValueError, match=r"r \(optimality weight\) must lie in \[0, 1\]"):
        nft_loss(v_theta, v_old, x0, x_t, t, torch.tensor([0.5, 0.5, 1.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="t must be the flow time"):
        nft_loss(v_theta, v_old, x0, x_t, t * 1000, 0.5)
    with pytest.raises(ValueError, match=r"mask must have shape \(5,\)"):
        nft_loss(v_theta, v_old, x0, x_t, t, 0.5, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="kl_beta must be >= 0"):
        nft_loss(v_theta, v_old, x0, x_t, t, 0.5, kl_beta=-1.0)


# ---------------------------------------------------------------------------------------------
# epsilon / v-prediction families: x0 space
# ---------------------------------------------------------------------------------------------

ALPHAS_CUMPROD = torch.linspace(0.9991, 0.0047, 1000, dtype=torch.float64)  # SDXL-like range
TIMESTEPS = torch.tensor([10, 250, 500, 750, 990])


def _epsilon_batch(seed: int, prediction_type: str):
    """x0, eps, alpha_bar (B,), x_t of the DDPM forward process, and two model outputs."""
    objective = EpsilonObjective(ALPHAS_CUMPROD, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    eps = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    x_t = objective.add_noise(x0, eps, TIMESTEPS)
    target = objective.target(x0, eps, TIMESTEPS)
    out_theta = target + 0.2 * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    out_old = target + 0.2 * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return x0, eps, ALPHAS_CUMPROD[TIMESTEPS], x_t, target, out_theta, out_old


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_from_prediction_inverts_the_forward_process_and_commutes_with_mixing(prediction_type: str) -> None:
    x0, _, a, x_t, target, out_theta, out_old = _epsilon_batch(10, prediction_type)
    torch.testing.assert_close(x0_from_prediction(target, x_t, a, prediction_type), x0)
    x_th = x0_from_prediction(out_theta, x_t, a, prediction_type)
    x_old = x0_from_prediction(out_old, x_t, a, prediction_type)
    beta = 0.1
    # NFT's implicit policies formed on the outputs have exactly the mixed x0 predictions
    torch.testing.assert_close(
        x0_from_prediction(beta * out_theta + (1 - beta) * out_old, x_t, a, prediction_type),
        beta * x_th + (1 - beta) * x_old,
    )
    torch.testing.assert_close(
        x0_from_prediction((1 + beta) * out_old - beta * out_theta, x_t, a, prediction_type),
        (1 + beta) * x_old - beta * x_th,
    )
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        x0_from_prediction(target, x_t, a, "flow")
    with pytest.raises(ValueError, match="alpha_bar"):
        x0_from_prediction(target, x_t, torch.zeros(5), prediction_type)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_space_loss_equals_the_flow_loss_on_the_same_x0_predictions(prediction_type: str) -> None:
    """A DDPM x_t is a rescaled flow x_t: ``x_t / (sqrt(a) + sqrt(1 - a))`` is ``(1 - s) x0 + s eps``
    with ``s = sqrt(1 - a) / (sqrt(a) + sqrt(1 - a))``, and a model's x0 prediction defines the
    flow velocity ``eps_hat - x0_hat``. Fed those, nft_loss (mixing velocities) must give the
    loss and the gradient of nft_loss_x0 (mixing x0 predictions)."""
    x0, eps, a, x_t, _, out_theta, out_old = _epsilon_batch(11, prediction_type)
    r = torch.tensor([0.0, 0.3, 0.5, 0.8, 1.0], dtype=torch.float64)
    beta, clip = 0.1, 5.0
    sa, sb = a.sqrt()[:, None, None, None], (1 - a).sqrt()[:, None, None, None]

    def x0_form(out):
        x_th = x0_from_prediction(out, x_t, a, prediction_type)
        x_old = x0_from_prediction(out_old, x_t, a, prediction_type)
        return nft_loss_x0(x_th, x_old, x0, r, nft_beta=beta, adv_clip_max=clip)

    def flow_form(out):
        s = sb / (sa + sb)
        x_t_flow = x_t / (sa + sb)
        torch.testing.assert_close(x_t_flow, (1 - s) * x0 + s * eps)

        def velocity(o):
            x0_hat = x0_from_prediction(o, x_t, a, prediction_type)
            eps_hat = (x_t - sa * x0_hat) / sb
            return eps_hat - x0_hat

        v_th, v_old = velocity(out), velocity(out_old)
        return nft_loss(v_th, v_old, x0, x_t_flow, s.flatten(), r, nft_beta=beta, adv_clip_max=clip)

    out_a = out_theta.clone().requires_grad_(True)
    out_b = out_theta.clone().requires_grad_(True)
    loss_x0, m_x0 = x0_form(out_a)
    loss_flow, m_flow = flow_form(out_b)
    torch.testing.assert_close(loss_x0, loss_flow)
    for key in ("positive_loss", "negative_loss", "positive_weight", "negative_weight"):
        torch.testing.assert_close(m_x0[key], m_flow[key])
    loss_x0.backward()
    loss_flow.backward()
    torch.testing.assert_close(out_a.grad, out_b.grad)
    assert out_a.grad.abs().max() > 0


def test_x0_form_theta_equal_old_property_and_kl_on_raw_outputs() -> None:
    x0, _, a, x_t, target, out_theta, _ = _epsilon_batch(12, "epsilon")
    r = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    out = out_theta.clone().requires_grad_(True)
    x_th = x0_from_prediction(out, x_t, a)
    loss, _ = nft_loss_x0(x_th, x_th.detach().clone(), x0, r, nft_beta=0.1, adv_clip_max=5.0)
    (g_nft,) = torch.autograd.grad(loss, out)
    err = _flat(x0_from_prediction(out, x_t, a) - x0)
    sft = (err.pow(2).mean(1) / err.detach().abs().mean(1)).mean()
    (g_sft,) = torch.autograd.grad(sft, out)
    torch.testing.assert_close(g_nft, ((2 * r - 1) * 5.0)[:, None, None, None] * g_sft, rtol=1e-9, atol=1e-12)

    x_old = x0_from_prediction(target, x_t, a)
    base, _ = nft_loss_x0(x_th, x_old, x0, r)
    same, metrics = nft_loss_x0(x_th, x_old, x0, r, kl_beta=0.3, pred_theta=out, pred_ref=out.detach().clone())
    assert metrics["kl"] == 0.0
    torch.testing.assert_close(same, base)
    with_kl, metrics = nft_loss_x0(x_th, x_old, x0, r, kl_beta=0.3, pred_theta=out, pred_ref=target)
    kl = _flat(out.detach() - target).pow(2).mean()
    assert metrics["kl"] > 0
    torch.testing.assert_close(with_kl, base + 0.3 * kl)
    with pytest.raises(ValueError, match="pass both pred_theta and pred_ref"):
        nft_loss_x0(x_th, x_old, x0, r, kl_beta=0.3, pred_theta=out)
    with pytest.raises(ValueError, match="kl_beta > 0 needs"):
        nft_loss_x0(x_th, x_old, x0, r, kl_beta=0.3)


# ---------------------------------------------------------------------------------------------
# old policy
# ---------------------------------------------------------------------------------------------


def test_old_policy_decay_around_flat_and_at_the_cap() -> None:
    assert old_policy_decay(0, 75, 0.0075, 0.999) == 0.0
    assert old_policy_decay(74, 75, 0.0075, 0.999) == 0.0
    assert old_policy_decay(75, 75, 0.0075, 0.999) == 0.0
    assert old_policy_decay(76, 75, 0.0075, 0.999) == pytest.approx(0.0075)
    assert old_policy_decay(100, 75, 0.0075, 0.999) == pytest.approx(0.1875)
    assert old_policy_decay(208, 75, 0.0075, 0.999) == pytest.approx(0.9975)
    assert old_policy_decay(209, 75, 0.0075, 0.999) == 0.999
    assert old_policy_decay(5000, 75, 0.0075, 0.999) == 0.999

    linear = OLD_POLICY_SCHEDULES["linear_to_0.5"]
    assert (linear.flat, linear.rate, linear.cap) == (0, 0.001, 0.5)
    assert linear(0) == 0.0 and linear(1) == pytest.approx(0.001) and linear(250) == pytest.approx(0.25)
    assert linear(500) == pytest.approx(0.5) and linear(501) == 0.5 and linear(10_000) == 0.5
    strong = OLD_POLICY_SCHEDULES["flat75_to_0.999"]
    assert [strong(s) for s in (74, 75, 209)] == [0.0, 0.0, 0.999]

    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        old_policy_decay(-1, 0, 0.1, 0.5)
    with pytest.raises(ValueError, match="cap must lie in"):
        OldPolicySchedule(flat=0, rate=0.1, cap=1.5)
    with pytest.raises(ValueError, match="rate must be >= 0"):
        old_policy_decay(3, 0, -0.1, 0.5)


def test_update_old_policy_follows_the_schedule_in_place_without_grad() -> None:
    schedule = OldPolicySchedule(flat=2, rate=0.25, cap=0.6)
    g = torch.Generator().manual_seed(13)
    current = [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]
    old = [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]
    expected = [o.detach().double().clone() for o in old]
    decays = []
    for step in range(1, 8):
        with torch.no_grad():  # an "optimizer step" of the trained policy
            for p in current:
                p.add_(torch.randn(p.shape, generator=g))
        decay = schedule(step)
        decays.append(decay)
        update_old_policy(old, current, decay)
        expected = [decay * e + (1 - decay) * c.detach().double() for e, c in zip(expected, current, strict=True)]
        for o, e, c in zip(old, expected, current, strict=True):
            torch.testing.assert_close(o.detach(), e.float())  # float32 storage, float32 tolerance
            if decay == 0.0:  # before `flat` the old policy is an exact copy
                assert torch.equal(o, c)
        assert all(o.grad is None for o in old)
    assert decays == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.6, 0.6, 0.6])

    # name -> tensor mappings are matched by name, whatever their order
    old_map = {"b": torch.zeros(2), "a": torch.zeros(3)}
    update_old_policy(old_map, {"a": torch.ones(3), "b": torch.full((2,), 2.0)}, 0.25)
    assert old_map["a"].tolist() == [0.75] * 3 and old_map["b"].tolist() == [1.5] * 2
    # float32 storage keeps a decay-0.999 update that bf16 would round away
    tiny = [torch.ones(3)]
    update_old_policy(tiny, [torch.full((3,), 1.01)], 0.999)
    assert bool((tiny[0] > 1.0).all())

    with pytest.raises(ValueError, match=r"missing in old \['c'\]"):
        update_old_policy({"a": torch.zeros(1)}, {"a": torch.zeros(1), "c": torch.zeros(1)}, 0.5)
    with pytest.raises(ValueError, match="old policy has 1 tensors but the trained one has 2"):
        update_old_policy([torch.zeros(1)], [torch.zeros(1), torch.zeros(1)], 0.5)
    with pytest.raises(ValueError, match="has shape"):
        update_old_policy([torch.zeros(2)], [torch.zeros(3)], 0.5)
    with pytest.raises(ValueError, match=r"decay must lie in \[0, 1\]"):
        update_old_policy([torch.zeros(1)], [torch.zeros(1)], 1.5)
