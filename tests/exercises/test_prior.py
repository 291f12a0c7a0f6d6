"""Exercise prior: `prior_distillation_loss`, Eq. 9 (docs/method.md section 2)."""

import pytest
import torch
import torch.nn.functional as F

from losses import prior_distillation_loss

pytestmark = pytest.mark.prior


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def test_matches_the_stored_value(stored):
    case = stored("prior")
    assert prior_distillation_loss(case["z"], case["p"], case["tau_kd"]).item() == pytest.approx(case["loss"], rel=1e-5)


def test_a_student_with_the_priors_relations_has_zero_loss():
    p = 5 * torch.randn(6, 8)  # any scale: the prior is normalised
    assert prior_distillation_loss(F.normalize(p, dim=-1), p, 0.5).item() == pytest.approx(0.0, abs=1e-6)


def test_relational_so_any_prior_width_and_rotation_will_do():
    z, p = unit(6, 8), torch.randn(6, 32)
    rotation, _ = torch.linalg.qr(torch.randn(32, 32))
    loss = prior_distillation_loss(z, p, 0.5)
    assert prior_distillation_loss(z, p @ rotation, 0.5).item() == pytest.approx(loss.item(), rel=1e-4)
    assert prior_distillation_loss(z, 7 * p, 0.5).item() == pytest.approx(loss.item(), rel=1e-5)


def test_self_pairs_are_left_out():
    """softmax over j != i: pushing z_i onto itself changes nothing, so a student whose relations to
    the others match the prior's has zero loss however the diagonal would have scored."""
    p = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    z = p.clone()  # z_i . z_i = 1 and z_i . z_j = 0, as p
    assert prior_distillation_loss(z, p, 0.1).item() == pytest.approx(0.0, abs=1e-6)
    moved = F.normalize(torch.tensor([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    assert prior_distillation_loss(moved, p, 0.1).item() > 0.01


def test_the_prior_gets_no_gradient_and_fewer_than_two_is_zero():
    z, p = unit(5, 8).requires_grad_(), torch.randn(5, 12, requires_grad=True)
    prior_distillation_loss(z, p, 0.5).backward()
    assert z.grad.abs().sum() > 0 and p.grad is None
    one = unit(1, 8).requires_grad_()
    loss = prior_distillation_loss(one, torch.randn(1, 12), 0.5)
    assert loss.item() == 0.0 and loss.requires_grad
