"""Exercise load_balance: `load_balance_loss`, Eq. 3 (docs/method.md section 2)."""

import pytest
import torch

from losses import load_balance_loss

pytestmark = pytest.mark.load_balance


def test_matches_the_stored_value(stored):
    case = stored("load_balance")
    assert load_balance_loss(case["f"], case["P"]).item() == pytest.approx(case["loss"], rel=1e-6)


def test_uniform_routing_gives_one_and_collapse_gives_E():
    E = 8
    uniform = torch.full((E,), 1 / E)
    assert load_balance_loss(uniform, uniform).item() == pytest.approx(1.0)
    collapsed = torch.zeros(E)
    collapsed[3] = 1.0
    assert load_balance_loss(collapsed, collapsed).item() == pytest.approx(E)


def test_gradient_flows_to_the_mean_gate_only():
    f = torch.tensor([0.5, 0.3, 0.2, 0.0], requires_grad=True)
    P = torch.tensor([0.4, 0.3, 0.2, 0.1], requires_grad=True)
    load_balance_loss(f, P).backward()
    torch.testing.assert_close(P.grad, 4 * f.detach())  # d/dP_e of E * sum f_e P_e
    assert f.grad is None or (f.grad == 0).all()  # f counts assignments: not differentiable
