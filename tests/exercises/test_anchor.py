"""Exercise anchor: `anchor_distillation_loss`, Eq. 8 (docs/method.md section 2)."""

import pytest
import torch
import torch.nn.functional as F

from losses import anchor_distillation_loss

pytestmark = pytest.mark.anchor


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def test_matches_the_stored_value(stored):
    case = stored("anchor")
    loss = anchor_distillation_loss(case["z"], case["v"], case["t"], case["tau_kd"], case["gamma"])
    assert loss.item() == pytest.approx(case["loss"], rel=1e-5)


def test_a_student_equal_to_its_teacher_has_zero_loss():
    v, t = unit(4, 8), unit(6, 8)
    assert anchor_distillation_loss(v.clone(), v, t, 0.5, gamma=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_gamma_weighs_one_minus_the_mean_cosine():
    z, v, t = unit(4, 8), unit(4, 8), unit(6, 8)
    gap = anchor_distillation_loss(z, v, t, 0.5, gamma=1.0) - anchor_distillation_loss(z, v, t, 0.5, gamma=0.0)
    assert gap.item() == pytest.approx(1 - (z * v).sum(-1).mean().item(), rel=1e-5)


def test_the_kl_part_compares_text_distributions():
    """A student giving the same similarities to every text as its teacher has no KL, even if it
    points elsewhere: with gamma = 0 only the distribution over texts matters."""
    t = torch.eye(4)[:3]  # three orthonormal texts in 4-D
    v = F.normalize(torch.tensor([[1.0, 0.5, 0.0, 0.2]]), dim=-1)
    z = F.normalize(torch.tensor([[1.0, 0.5, 0.0, -0.2]]), dim=-1)  # same dot products with every text
    assert anchor_distillation_loss(z, v, t, 0.5, gamma=0.0).item() == pytest.approx(0.0, abs=1e-6)
    assert anchor_distillation_loss(z, v, t, 0.5, gamma=1.0).item() > 0.01


def test_the_teacher_gets_no_gradient_and_empty_is_zero():
    z, v = unit(3, 8).requires_grad_(), unit(3, 8).requires_grad_()
    anchor_distillation_loss(z, v, unit(5, 8), 0.5, gamma=0.5).backward()
    assert z.grad.abs().sum() > 0 and v.grad is None
    empty = torch.zeros(0, 8, requires_grad=True)
    loss = anchor_distillation_loss(empty, torch.zeros(0, 8), unit(5, 8), 0.5, gamma=0.5)
    assert loss.item() == 0.0 and loss.requires_grad
