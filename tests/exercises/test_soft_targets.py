"""Exercise soft_targets: `caption_logits` and `soft_targets`, Eq. 4 (docs/method.md section 2)."""

import pytest
import torch
import torch.nn.functional as F

from losses import soft_targets

pytestmark = pytest.mark.soft_targets


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def test_matches_the_stored_targets(stored):
    case = stored("soft_targets")
    torch.testing.assert_close(soft_targets(case["t"], case["tau_s"]), case["y"], rtol=1e-5, atol=1e-6)


def test_rows_are_distributions_without_gradient():
    t = unit(6, 8).requires_grad_()
    y = soft_targets(t, 0.1)
    assert y.shape == (6, 6) and y.dtype == torch.float32 and not y.requires_grad
    torch.testing.assert_close(y.sum(-1), torch.ones(6))
    assert (y > 0).all()


def test_identical_captions_share_their_mass_exactly():
    torch.manual_seed(0)
    t = unit(9, 64)  # a size at which a plain t @ t.T rounds two equal rows differently
    t[8] = t[1]
    y = soft_targets(t, 0.02)
    assert torch.equal(y[1], y[8]) and torch.equal(y[:, 1], y[:, 8])  # bit for bit, not nearly
    assert y[1, 1].item() == pytest.approx(0.5, abs=1e-3)  # a small tau_s: the pair holds the mass


def test_temperature_moves_from_identity_to_uniform():
    t = unit(5, 8)
    torch.testing.assert_close(soft_targets(t, 1e-3), torch.eye(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(soft_targets(t, 1e4), torch.full((5, 5), 0.2), atol=1e-4, rtol=0)


def test_more_similar_captions_get_more_mass():
    t = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=-1)
    y = soft_targets(t, 0.1)
    assert y[0, 1] > y[0, 2] and y[2, 1] > y[2, 0]
