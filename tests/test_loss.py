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
    assert (a.reward_real.item(), a.reward_gen.item(), a.margin.item(), a.accuracy) == pytest.approx(
        (0.5, -0.5, 1.0, 1.0))
    b = run(0.1, -20, -5, -18, -6, "logistic")
    assert (b.reward_real.item(), b.reward_gen.item(), b.margin.item(), b.accuracy) == pytest.approx(
        (-0.2, 0.1, -0.3, 0.0))


def test_policy_equal_to_opponent_gives_log2_and_a_tie():
    """At the start of an iteration the policy equals the opponent: u = 0, loss = log 2; the pair is a tie, left out
    of the accuracy (None: no informative pair) and counted in the tie share."""
    out = run(0.1, -7.0, -9.0, -7.0, -9.0, "logistic")
    assert out.losses.item() == pytest.approx(math.log(2))
    assert out.accuracy is None and out.tie.item() == 1.0 and out.correct.item() == 0.0
    assert run(0.1, -7.0, -9.0, -7.0, -9.0, "hinge").losses.item() == pytest.approx(1.0)


def test_ties_are_left_out_of_the_accuracy():
    """Four pairs, beta 0.1 (log-ratios real, generated in nats):
    A (+1, -1): margin 0.2, right.  B (-1, +1): margin -0.2, wrong.
    C (+0.5, +0.5): margin 0, a tie (the generated response is the real one).
    D (+0.0004, -0.0003): log-ratio gap 0.0007 <= TIE_NATS (0.001): float noise, a tie.
    Accuracy over the informative pairs: 1 right of 2 = 0.5 (counting ties as wrong gave 1 of 4 = 0.25); tie share
    2 of 4 = 0.5. With D's generated response marked identical too, nothing changes; marking A identical makes it a
    tie (accuracy 0 of 1)."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64)
    zero = t(0.0, 0.0, 0.0, 0.0)
    out = spin_loss(t(1.0, -1.0, 0.5, 0.0004), t(-1.0, 1.0, 0.5, -0.0003), zero, zero, 0.1)
    assert out.tie.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert out.correct.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert out.accuracy == pytest.approx(0.5)
    out.identical = torch.tensor([True, False, False, False])
    assert out.accuracy == pytest.approx(0.0) and out.tie.mean().item() == 0.75


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


# -- the objectives that keep the real responses' likelihood: apo_zero and dpop --------------------------------
@pytest.mark.parametrize("loss_type,dpop_lambda,expected_a,expected_b", [
    ("apo_zero", 50.0, 0.7550813, 1.0748132), ("dpop", 50.0, 0.3132617, 10.3000336), ("dpop", 1.0, 0.3132617, 0.9740770)])
def test_displacement_resistant_loss_values(loss_type, dpop_lambda, expected_a, expected_b):
    """Pairs A and B of the module docstring (A: log-ratios real +1, generated -1, beta 0.5; B: real -2, generated
    +1, beta 0.1).
    apo_zero = (1 - sigmoid(reward_real)) + sigmoid(reward_gen):
        A: (1 - sigmoid(0.5)) + sigmoid(-0.5) = 0.3775407 + 0.3775407 = 0.7550813
        B: (1 - sigmoid(-0.2)) + sigmoid(0.1) = 0.5498340 + 0.5249792 = 1.0748132
    dpop = log(1 + exp(-beta * (real - gen - lambda * max(0, -real)))), on the log-ratios:
        A: the real response rose (+1): no penalty, the logistic loss log(1 + e^-1) = 0.3132617
        B, lambda 50: u = 0.1 * (-2 - 1 - 50 * 2) = -10.3, log(1 + e^10.3) = 10.3 + log(1 + e^-10.3) = 10.3000336
        B, lambda 1:  u = 0.1 * (-3 - 1 * 2) = -0.5, log(1 + e^0.5) = 0.9740770"""
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    a = spin_loss(t(-10), t(-12), t(-11), t(-11), 0.5, loss_type, dpop_lambda=dpop_lambda)
    b = spin_loss(t(-20), t(-5), t(-18), t(-6), 0.1, loss_type, dpop_lambda=dpop_lambda)
    assert a.losses.item() == pytest.approx(expected_a, abs=1e-6)
    assert b.losses.item() == pytest.approx(expected_b, abs=1e-6)
    # rewards, log-ratios, margin and accuracy are the same for every loss type
    assert (a.logratio_real.item(), a.logratio_gen.item(), b.logratio_real.item(), b.logratio_gen.item()) == (
        1.0, -1.0, -2.0, 1.0)
    assert (b.reward_real.item(), b.reward_gen.item(), b.margin.item(), b.accuracy) == pytest.approx(
        (-0.2, 0.1, -0.3, 0.0))


def test_displacement_resistant_losses_at_the_start_of_an_iteration():
    """Policy = opponent: log-ratios 0; apo_zero = (1 - 1/2) + 1/2 = 1, dpop = log 2 (no penalty at 0)."""
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    assert spin_loss(t(-7), t(-9), t(-7), t(-9), 0.1, "apo_zero").losses.item() == pytest.approx(1.0)
    assert spin_loss(t(-7), t(-9), t(-7), t(-9), 0.1, "dpop").losses.item() == pytest.approx(math.log(2))


def test_lowering_both_responses_costs_nothing_only_under_the_logistic_loss():
    """Pair A with both log-ratios shifted down 2 nats (policy (-12, -14), opponent (-11, -11)): the margin stays
    1, so the logistic loss stays log(1 + e^-1) = 0.3132617 (the displacement it cannot see), while
    apo_zero: (1 - sigmoid(-0.5)) + sigmoid(-1.5) = 0.6224593 + 0.1824255 = 0.8048848 (> 0.7550813 unshifted), and
    dpop (lambda 50): u = 0.5 * (2 - 50 * 1) = -24, log(1 + e^24) = 24.0000000."""
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    shifted = lambda loss_type: spin_loss(t(-12), t(-14), t(-11), t(-11), 0.5, loss_type).losses.item()
    assert shifted("logistic") == pytest.approx(0.3132617, abs=1e-6)
    assert shifted("apo_zero") == pytest.approx(0.8048848, abs=1e-6)
    assert shifted("dpop") == pytest.approx(24.0, abs=1e-6)


def test_displacement_resistant_gradients_by_hand():
    """apo_zero, pair A: d/d policy_real = -beta * sigmoid'(0.5) = -0.5 * 0.6224593 * 0.3775407 = -0.1175019,
    d/d policy_gen = +beta * sigmoid'(-0.5) = +0.1175019; the real side's gradient does not depend on the
    generated response (the two terms are apart), unlike the logistic loss's.
    dpop, pair B, lambda 1 (real log-ratio -2 < 0, so u = beta * ((1 + lambda) * real - gen) + const):
    d/d policy_real = -sigmoid(-u) * beta * (1 + lambda) = -sigmoid(0.5) * 0.2 = -0.1244919,
    d/d policy_gen = +sigmoid(0.5) * 0.1 = +0.0622459."""
    def grads(pr, pg, orr, og, beta, loss_type, dpop_lambda=50.0):
        x = torch.tensor([pr], dtype=torch.float64, requires_grad=True)
        y = torch.tensor([pg], dtype=torch.float64, requires_grad=True)
        o = lambda v: torch.tensor([v], dtype=torch.float64)
        spin_loss(x, y, o(orr), o(og), beta, loss_type, dpop_lambda=dpop_lambda).losses.sum().backward()
        return x.grad.item(), y.grad.item()

    assert grads(-10, -12, -11, -11, 0.5, "apo_zero") == pytest.approx((-0.1175019, 0.1175019), abs=1e-6)
    # the generated response 8 nats lower: apo_zero's real-side gradient is unchanged; the logistic loss's, with
    # u = 0.5 * (1 + 9) = 5, falls to -0.5 * sigmoid(-5) = -0.0033464 (a wide margin stops it raising the real one)
    assert grads(-10, -20, -11, -11, 0.5, "apo_zero")[0] == pytest.approx(-0.1175019, abs=1e-6)
    assert grads(-10, -20, -11, -11, 0.5, "logistic")[0] == pytest.approx(-0.0033464, abs=1e-6)
    assert grads(-20, -5, -18, -6, 0.1, "dpop", 1.0) == pytest.approx((-0.1244919, 0.0622459), abs=1e-6)
    # where the real response rose, dpop is the logistic loss, gradients included
    assert grads(-10, -12, -11, -11, 0.5, "dpop") == pytest.approx(grads(-10, -12, -11, -11, 0.5, "logistic"))


@pytest.mark.parametrize("loss_type", ["apo_zero", "dpop"])
def test_displacement_resistant_gradcheck_with_the_anchor(loss_type):
    """Autograd against finite differences (float64), with the likelihood anchor on; the real log-ratios (+1, -1, -3)
    stay away from dpop's kink at 0."""
    o = lambda *v: torch.tensor(v, dtype=torch.float64)
    x = o(-10.0, -3.0, -9.0).requires_grad_()
    y = o(-12.0, -2.0, -7.0).requires_grad_()
    f = lambda a, b: spin_loss(a, b, o(-11.0, -2.0, -6.0), o(-11.0, -1.0, -8.0), 0.3, loss_type, sft_weight=0.7,
                               real_tokens=o(4.0, 2.0, 3.0), dpop_lambda=5.0).losses
    assert torch.autograd.gradcheck(f, (x, y))


# -- the objectives against the vanishing advantage: tspin (T-SPIN) and space (SPACE) -------------------------------
def test_tspin_by_hand():
    """T-SPIN, eq. 7, reference-free (the opponent's log-probs do not enter): alpha (beta here) 1, history weight 0.1.
    Policy log-probs real -10, generated -12, proto -15; opponent -11, -11 (ignored).
        current advantage = 1 * (-10 - -12) = 2:   log(1 + e^-2) = 0.1269280
        historical        = 1 * (-12 - -15) = 3:   log(1 + e^-3) = 0.0485874, x 0.1 = 0.0048587
        loss = 0.1317867.  Without the proto responses (iteration 0): 0.1269280.
    Rewards are the policy's own log-probs x alpha: -10, -12; margin 2 (the current advantage), history 3."""
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    out = spin_loss(t(-10), t(-12), t(-11), t(-11), 1.0, "tspin", policy_proto=t(-15), history_weight=0.1)
    assert out.losses.item() == pytest.approx(0.1317867, abs=1e-6)
    assert (out.reward_real.item(), out.reward_gen.item(), out.margin.item(), out.history.item()) == (-10, -12, 2, 3)
    assert out.accuracy == 1.0
    # the opponent does not matter: reference-free
    other = spin_loss(t(-10), t(-12), t(-3), t(-40), 1.0, "tspin", policy_proto=t(-15), history_weight=0.1)
    assert other.losses.item() == out.losses.item()
    first = spin_loss(t(-10), t(-12), t(-11), t(-11), 1.0, "tspin")
    assert first.losses.item() == pytest.approx(0.1269280, abs=1e-6) and first.history is None


def test_tspin_gradient_by_hand_and_gradcheck():
    """d/d real = -alpha sigmoid(-2) = -0.1192029; d/d proto = +0.1 alpha sigmoid(-3) = +0.0047426;
    d/d generated = +alpha sigmoid(-2) - 0.1 alpha sigmoid(-3) = 0.1192029 - 0.0047426 = 0.1144603: the generated
    response is pushed down by the current advantage and up by the historical one, as the paper's Theorem 1 says."""
    x, y, z = (torch.tensor([v], dtype=torch.float64, requires_grad=True) for v in (-10.0, -12.0, -15.0))
    o = torch.tensor([-11.0], dtype=torch.float64)
    spin_loss(x, y, o, o, 1.0, "tspin", policy_proto=z, history_weight=0.1).losses.sum().backward()
    assert (x.grad.item(), y.grad.item(), z.grad.item()) == pytest.approx((-0.1192029, 0.1144603, 0.0047426), abs=1e-6)
    f = lambda a, b, c: spin_loss(a, b, o.expand(2), o.expand(2), 0.7, "tspin", policy_proto=c, history_weight=0.3,
                                  sft_weight=0.2, real_tokens=torch.tensor([3.0, 5.0], dtype=torch.float64)).losses
    args = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in ([-10.0, -4.0], [-12.0, -3.0], [-9.0, -6.0])]
    assert torch.autograd.gradcheck(f, args)


def test_space_by_hand():
    """SPACE: -log sigma_mu(r_real) - mu log sigma_{1/mu}(-r_gen), sigma_mu(x) = 1 / (1 + mu e^-x); rewards the
    log-ratios x beta (1: the paper's). Pair A: r_real = +1, r_gen = -1.
        mu 1: log(1 + e^-1) + log(1 + e^-1) = 2 x 0.3132617 = 0.6265234
        mu 2: -log(1 / (1 + 2 e^-1)) = log(1.7357589) = 0.5514447;
              sigma_{1/2}(1) = 1 / (1 + 0.5 e^-1) = 0.8446376: -2 log 0.8446376 = 0.3376952;  loss 0.8891400
    The two terms are apart: lowering both log-ratios by 2 (r_real -1, r_gen -3) changes the loss (mu 1:
    log(1 + e) + log(1 + e^-3) = 1.3132617 + 0.0485874 = 1.3618491), where the logistic loss of their gap would not."""
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    assert spin_loss(t(-10), t(-12), t(-11), t(-11), 1.0, "space").losses.item() == pytest.approx(0.6265234, abs=1e-6)
    assert spin_loss(t(-10), t(-12), t(-11), t(-11), 1.0, "space", space_mu=2.0).losses.item() == pytest.approx(
        0.8891400, abs=1e-6)
    assert spin_loss(t(-12), t(-14), t(-11), t(-11), 1.0, "space").losses.item() == pytest.approx(1.3618491, abs=1e-6)


def test_space_gradient_by_hand_and_gradcheck():
    """mu 1, pair A: d/d real = -sigmoid(-1) = -0.2689414 (up, whatever the generated response does);
    d/d generated = +sigmoid(-1) = +0.2689414."""
    x, y = (torch.tensor([v], dtype=torch.float64, requires_grad=True) for v in (-10.0, -12.0))
    o = torch.tensor([-11.0], dtype=torch.float64)
    spin_loss(x, y, o, o, 1.0, "space").losses.sum().backward()
    assert (x.grad.item(), y.grad.item()) == pytest.approx((-0.2689414, 0.2689414), abs=1e-6)
    f = lambda a, b: spin_loss(a, b, torch.tensor([-11.0, -4.0], dtype=torch.float64),
                               torch.tensor([-11.0, -1.0], dtype=torch.float64), 0.5, "space", space_mu=3.0).losses
    assert torch.autograd.gradcheck(f, tuple(torch.tensor(v, dtype=torch.float64, requires_grad=True)
                                             for v in ([-10.0, -3.0], [-12.0, -2.0])))
