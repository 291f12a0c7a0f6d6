"""Exercise binding: `soft_binding_loss`, Eq. 5-7 (docs/method.md section 2). The targets y are
given, so this exercise does not need soft_targets."""

import pytest
import torch
import torch.nn.functional as F

from losses import soft_binding_loss

pytestmark = pytest.mark.binding


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def test_matches_the_stored_values(stored):
    case = stored("binding")
    bind, parts = soft_binding_loss(case["z"], case["t"], case["y"], case["tau"], case["beta"])
    assert bind.item() == pytest.approx(case["bind"], rel=1e-5)
    assert parts["xt"] == pytest.approx(case["xt"], rel=1e-5)
    assert parts["xx"] == pytest.approx(case["xx"], rel=1e-5)
    assert parts["bind"] == pytest.approx(parts["xt"] + case["beta"] * parts["xx"], rel=1e-6)


def test_one_hot_targets_give_clips_symmetric_loss():
    """With Y = I and beta = 0, Eq. 5 is CLIP's loss: cross-entropy over rows and over columns."""
    z, t, tau = unit(6, 8), unit(6, 8), 0.07
    logits, labels = z @ t.T / tau, torch.arange(6)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    bind, parts = soft_binding_loss(z, t, torch.eye(6), tau, beta=0.0)
    assert bind.item() == pytest.approx(clip.item(), rel=1e-5)
    assert parts["xx"] == 0.0


def test_aligned_samples_bind_better_than_shuffled():
    t = unit(8, 16)
    y = torch.eye(8) * 0.9 + 0.1 / 8
    for beta in (0.0, 1.0):
        aligned = soft_binding_loss(t, t, y, 0.07, beta)[0]
        shuffled = soft_binding_loss(t.roll(1, dims=0), t, y, 0.07, beta)[0]
        assert aligned < shuffled - 1.0


def test_xx_pulls_together_samples_whose_targets_agree():
    """L_xx: sample 0's targets put mass on sample 1 (j != i); z_1 close to z_0 lowers it."""
    y = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    t = unit(3, 8)
    near = F.normalize(torch.stack([t[0], t[0] + 0.1 * t[1], t[2]]), dim=-1)
    far = F.normalize(torch.stack([t[0], -t[0], t[2]]), dim=-1)
    assert soft_binding_loss(near, t, y, 0.1, 1.0)[1]["xx"] < soft_binding_loss(far, t, y, 0.1, 1.0)[1]["xx"] - 1.0


def test_a_batch_of_one_has_no_xx_and_gradients_flow():
    z = unit(1, 8).requires_grad_()
    bind, parts = soft_binding_loss(z, unit(1, 8), torch.ones(1, 1), 0.07, beta=1.0)
    assert parts["xx"] == 0.0
    bind.backward()
    assert torch.isfinite(z.grad).all()
    z = unit(4, 8).requires_grad_()
    soft_binding_loss(z, unit(4, 8), torch.eye(4), 0.07, beta=0.5)[0].backward()
    assert z.grad.abs().sum() > 0
