"""The SPIN loss against numbers computed by hand.

Pair A: beta 0.5, policy (real, gen) = (-10, -12), opponent (real, gen) = (-11, -11)
    reward_real = 0.5 * (-10 + 11) = 0.5,  reward_gen = 0.5 * (-12 + 11) = -0.5,  margin u = 1.0
    logistic: log(1 + e^-1) = 0.3132617,  hinge: max(0, 1 - 1) = 0,  accuracy 1
Pair B: beta 0.1, policy (-20, -5), opponent (-18, -6)
    reward_real = 0.1 * -2 = -0.2,  reward_gen = 0.1 * 1 = 0.1,  margin u = -0.3
    logistic: log(1 + e^0.3) = 0.8543552,  hinge: max(0, 1.3) = 1.3,  accuracy 0
"""
import math

import pytest
import torch

from spin_lite.loss import spin_loss


def run(beta, pr, pg, orr, og, loss_type):
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    return spin_loss(t(pr), t(pg), t(orr), t(og), beta, loss_type)


@pytest.mark.parametrize("loss_type,expected_a,expected_b", [("logistic", 0.3132617, 0.8543552),
                                                             ("hinge", 0.0, 1.3)])
def test_loss_values(loss_type, expected_a, expected_b):
    a = run(0.5, -10, -12, -11, -11, loss_type)
    b = run(0.1, -20, -5, -18, -6, loss_type)
    assert a.losses.item() == pytest.approx(expected_a, abs=1e-6)
    assert b.losses.item() == pytest.approx(expected_b, abs=1e-6)


def test_rewards_margin_accuracy():
    a = run(0.5, -10, -12, -11, -11, "logistic")
    assert (a.reward_real.item(), a.reward_gen.item(), a.margin.item(), a.accuracy.item()) == pytest.approx(
        (0.5, -0.5, 1.0, 1.0))
    b = run(0.1, -20, -5, -18, -6, "logistic")
    assert (b.reward_real.item(), b.reward_gen.item(), b.margin.item(), b.accuracy.item()) == pytest.approx(
        (-0.2, 0.1, -0.3, 0.0))


def test_policy_equal_to_opponent_gives_log2_and_no_accuracy():
    """At the start of an iteration the policy equals the opponent: u = 0, loss = log 2, a tie counts as wrong."""
    out = run(0.1, -7.0, -9.0, -7.0, -9.0, "logistic")
    assert out.losses.item() == pytest.approx(math.log(2))
    assert out.accuracy.item() == 0.0
    assert run(0.1, -7.0, -9.0, -7.0, -9.0, "hinge").losses.item() == pytest.approx(1.0)


def test_gradient_pushes_real_up_and_generated_down():
    pr = torch.tensor([-10.0], requires_grad=True)
    pg = torch.tensor([-12.0], requires_grad=True)
    spin_loss(pr, pg, torch.tensor([-11.0]), torch.tensor([-11.0]), 0.5).losses.sum().backward()
    # d/d pr of log(1+exp(-u)) = -beta * sigmoid(-u) with u = 1: -0.5 * 0.2689414
    assert pr.grad.item() == pytest.approx(-0.5 * 0.2689414, abs=1e-6)
    assert pg.grad.item() == pytest.approx(0.5 * 0.2689414, abs=1e-6)


def test_large_margins_are_stable():
    out = run(1.0, 0.0, -1000.0, 0.0, 0.0, "logistic")
    assert out.losses.item() == 0.0
    out = run(1.0, -1000.0, 0.0, 0.0, 0.0, "logistic")
    assert out.losses.item() == pytest.approx(1000.0)


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type"):
        run(0.1, 0, 0, 0, 0, "sigmoid-ish")


def test_likelihood_anchor_by_hand():
    """Pair A with sft_weight 0.5 and a 4-token real response:
    nll_real = -(-10) / 4 = 2.5;  loss = log(1 + e^-1) + 0.5 * 2.5 = 0.3132617 + 1.25 = 1.5632617 (logistic),
    0 + 1.25 = 1.25 (hinge). Rewards and margin are the SPIN ones, unchanged by the anchor."""
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    for loss_type, expected in (("logistic", 1.5632617), ("hinge", 1.25)):
        out = spin_loss(t(-10), t(-12), t(-11), t(-11), 0.5, loss_type, sft_weight=0.5, real_tokens=t(4))
        assert out.losses.item() == pytest.approx(expected, abs=1e-6)
        assert out.nll_real.item() == pytest.approx(2.5)
        assert out.margin.item() == pytest.approx(1.0)
    off = spin_loss(t(-10), t(-12), t(-11), t(-11), 0.5, sft_weight=0.0, real_tokens=t(4))
    assert off.losses.item() == pytest.approx(0.3132617, abs=1e-6)


def test_likelihood_anchor_gradient():
    """d loss / d policy_real = -beta * sigmoid(-u) - sft_weight / |y| = -0.5 * 0.2689414 - 0.5 / 4;
    the generated side is untouched by the anchor: +beta * sigmoid(-u). Checked by autograd and gradcheck."""
    pr = torch.tensor([-10.0], dtype=torch.float64, requires_grad=True)
    pg = torch.tensor([-12.0], dtype=torch.float64, requires_grad=True)
    n = torch.tensor([4.0], dtype=torch.float64)
    o = torch.tensor([-11.0], dtype=torch.float64)
    spin_loss(pr, pg, o, o, 0.5, sft_weight=0.5, real_tokens=n).losses.sum().backward()
    assert pr.grad.item() == pytest.approx(-0.5 * 0.2689414 - 0.125, abs=1e-6)
    assert pg.grad.item() == pytest.approx(0.5 * 0.2689414, abs=1e-6)
    x = torch.tensor([-10.0, -3.0], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([-12.0, -2.0], dtype=torch.float64, requires_grad=True)
    f = lambda a, b: spin_loss(a, b, torch.tensor([-11.0, -4.0], dtype=torch.float64),
                               torch.tensor([-11.0, -1.0], dtype=torch.float64), 0.3, sft_weight=0.7,
                               real_tokens=torch.tensor([4.0, 2.0], dtype=torch.float64)).losses
    assert torch.autograd.gradcheck(f, (x, y))
