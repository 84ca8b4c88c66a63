"""Properties of the DPO loss family, Diffusion-DPO and token DPO, against hand formulas."""

from __future__ import annotations

import math

import pytest
import torch

from glm_training.algorithms.dpo import diffusion_dpo_loss, preference_loss, token_dpo_loss

LOG2 = math.log(2.0)


def _logsigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


# ---------------------------------------------------------------------------------------------
# the loss family
# ---------------------------------------------------------------------------------------------

LOGITS = torch.tensor([-3.0, -0.2, 0.0, 0.4, 2.5], dtype=torch.float64)


@pytest.mark.parametrize("ls", [0.0, 0.1, 0.3])
def test_sigmoid_loss_matches_trl_formula(ls: float) -> None:
    beta = 0.7
    expected = [-_logsigmoid(beta * z) * (1 - ls) - _logsigmoid(-beta * z) * ls for z in LOGITS.tolist()]
    torch.testing.assert_close(preference_loss(LOGITS, beta, "sigmoid", ls), torch.tensor(expected, dtype=torch.float64))


def test_hinge_and_ipo_match_hand_formulas() -> None:
    beta = 0.5
    hinge = [max(0.0, 1 - beta * z) for z in LOGITS.tolist()]
    ipo = [(z - 1 / (2 * beta)) ** 2 for z in LOGITS.tolist()]
    torch.testing.assert_close(preference_loss(LOGITS, beta, "hinge"), torch.tensor(hinge, dtype=torch.float64))
    torch.testing.assert_close(preference_loss(LOGITS, beta, "ipo"), torch.tensor(ipo, dtype=torch.float64))


def test_loss_family_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"loss_type must be one of \('sigmoid', 'hinge', 'ipo'\), got 'kto'"):
        preference_loss(LOGITS, 0.1, "kto")
    with pytest.raises(ValueError, match="beta"):
        preference_loss(LOGITS, 0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(LOGITS, 0.1, "sigmoid", 0.7)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(LOGITS, 0.1, "hinge", 0.1)


# ---------------------------------------------------------------------------------------------
# property 7: Diffusion-DPO
# ---------------------------------------------------------------------------------------------


def test_policy_equal_to_reference_gives_log2_and_chance_accuracy() -> None:
    gen = torch.Generator().manual_seed(0)
    err_w, err_l = torch.rand(16, generator=gen), torch.rand(16, generator=gen)
    loss, metrics = diffusion_dpo_loss(err_w, err_l, err_w.clone(), err_l.clone(), beta=5000.0)
    assert abs(loss.item() - LOG2) < 1e-6
    assert metrics["implicit_acc"] == 0.5
    assert metrics["reward_margin"] == 0.0
    torch.testing.assert_close(metrics["policy_mse_gap"], (err_w - err_l).mean())
    torch.testing.assert_close(metrics["policy_mse_gap"], metrics["ref_mse_gap"])


def test_lower_winner_error_than_reference_lowers_loss() -> None:
    ref_w, ref_l = torch.tensor([0.30, 0.20, 0.25]), torch.tensor([0.28, 0.22, 0.25])
    loss, metrics = diffusion_dpo_loss(ref_w - 1e-3, ref_l, ref_w, ref_l, beta=5000.0)
    assert loss.item() < LOG2
    assert metrics["implicit_acc"] == 1.0 and metrics["reward_margin"] > 0
    # higher winner error than the reference: the opposite
    loss, metrics = diffusion_dpo_loss(ref_w + 1e-3, ref_l, ref_w, ref_l, beta=5000.0)
    assert loss.item() > LOG2 and metrics["implicit_acc"] == 0.0


def test_diffusion_dpo_matches_paper_inside_term_and_gradient_signs() -> None:
    beta = 2000.0
    pw = torch.tensor([0.10, 0.40, 0.21], dtype=torch.float64, requires_grad=True)
    pl = torch.tensor([0.12, 0.38, 0.20], dtype=torch.float64, requires_grad=True)
    rw = torch.tensor([0.11, 0.39, 0.2105], dtype=torch.float64)
    rl = torch.tensor([0.11, 0.39, 0.2000], dtype=torch.float64)
    inside = [-0.5 * beta * ((a - b) - (c - d)) for a, b, c, d in zip(pw.tolist(), pl.tolist(), rw.tolist(), rl.tolist())]
    loss, metrics = diffusion_dpo_loss(pw, pl, rw, rl, beta=beta)
    torch.testing.assert_close(loss, torch.tensor(sum(-_logsigmoid(z) for z in inside) / 3, dtype=torch.float64))
    torch.testing.assert_close(metrics["reward_margin"], torch.tensor(sum(inside) / 3, dtype=torch.float64))
    torch.testing.assert_close(metrics["implicit_acc"], torch.tensor(sum(z > 0 for z in inside) / 3, dtype=torch.float64))
    torch.testing.assert_close(metrics["ref_mse_gap"], (rw - rl).mean())
    assert not metrics["reward_margin"].requires_grad
    loss.backward()
    # minimising the loss lowers the winner's error and raises the loser's
    assert (pw.grad > 0).all() and (pl.grad < 0).all()
    # d loss / d err_w = 0.5 beta sigmoid(-inside) / B
    expected = [0.5 * beta / (1 + math.exp(z)) / 3 for z in inside]
    torch.testing.assert_close(pw.grad, torch.tensor(expected, dtype=torch.float64))


def test_diffusion_dpo_loss_types_use_the_shared_family() -> None:
    pw, pl = torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.1])
    rw, rl = torch.tensor([0.15, 0.25]), torch.tensor([0.15, 0.15])
    logits = -0.5 * ((pw - pl) - (rw - rl))
    for loss_type in ("hinge", "ipo"):
        loss, _ = diffusion_dpo_loss(pw, pl, rw, rl, beta=5.0, loss_type=loss_type)
        torch.testing.assert_close(loss, preference_loss(logits, 5.0, loss_type).mean())
    with pytest.raises(ValueError, match="ref_err_l"):
        diffusion_dpo_loss(pw, pl, rw, rl[:1], beta=5.0)


def test_diffusion_dpo_is_float32_for_bf16_inputs_and_under_autocast() -> None:
    err = torch.tensor([0.3, 0.2], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = diffusion_dpo_loss(err, err.flip(0), err, err.flip(0), beta=5000.0)
    assert loss.dtype == torch.float32 and metrics["implicit_acc"].dtype == torch.float32
    assert abs(loss.item() - LOG2) < 1e-6


# ---------------------------------------------------------------------------------------------
# token DPO (TRL)
# ---------------------------------------------------------------------------------------------

PC = torch.tensor([-12.0, -30.5, -8.25], dtype=torch.float64)
PR = torch.tensor([-14.0, -29.0, -8.25], dtype=torch.float64)
RC = torch.tensor([-13.0, -30.0, -9.0], dtype=torch.float64)
RR = torch.tensor([-13.5, -30.0, -8.0], dtype=torch.float64)


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_token_dpo_matches_trl_sigmoid_by_hand(ls: float) -> None:
    beta = 0.1
    # logits = (pc - pr) - (rc - rr) = (2 - 0.5, -1.5 - 0, 0 - (-1)) = (1.5, -1.5, 1.0)
    logits = [1.5, -1.5, 1.0]
    per = [-_logsigmoid(beta * z) * (1 - ls) - _logsigmoid(-beta * z) * ls for z in logits]
    loss, metrics = token_dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=ls)
    torch.testing.assert_close(loss, torch.tensor(sum(per) / 3, dtype=torch.float64))
    chosen = [beta * 1.0, beta * -0.5, beta * 0.75]
    rejected = [beta * -0.5, beta * 1.0, beta * -0.25]
    torch.testing.assert_close(metrics["chosen_reward"], torch.tensor(sum(chosen) / 3, dtype=torch.float64))
    torch.testing.assert_close(metrics["rejected_reward"], torch.tensor(sum(rejected) / 3, dtype=torch.float64))
    torch.testing.assert_close(metrics["reward_margin"], torch.tensor(beta * sum(logits) / 3, dtype=torch.float64))
    torch.testing.assert_close(metrics["implicit_acc"], torch.tensor(2 / 3, dtype=torch.float64))
    torch.testing.assert_close(metrics["logp_gap"], (PC - PR).mean())


def test_token_dpo_hinge_ipo_and_reference_equality() -> None:
    beta = 0.1
    logits = [1.5, -1.5, 1.0]
    loss, _ = token_dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="hinge")
    torch.testing.assert_close(loss, torch.tensor(sum(max(0.0, 1 - beta * z) for z in logits) / 3, dtype=torch.float64))
    loss, _ = token_dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="ipo")
    torch.testing.assert_close(loss, torch.tensor(sum((z - 1 / (2 * beta)) ** 2 for z in logits) / 3, dtype=torch.float64))
    loss, metrics = token_dpo_loss(PC, PR, PC.clone(), PR.clone(), beta=beta)
    assert abs(loss.item() - LOG2) < 1e-12 and metrics["implicit_acc"] == 0.5


def test_token_dpo_gradient_raises_chosen_and_lowers_rejected() -> None:
    pc, pr = PC.clone().requires_grad_(True), PR.clone().requires_grad_(True)
    loss, _ = token_dpo_loss(pc, pr, RC, RR, beta=0.1)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    torch.testing.assert_close(pc.grad, -pr.grad)
