"""Exercise top_k_routing: `LoRAMoELinear.route`, Eq. 2 and the statistics Eq. 3 needs (docs/method.md section 1)."""

import pytest
import torch

from lora_moe import LoRAMoELinear

pytestmark = pytest.mark.top_k_routing


def layer_from(case, top_k=2):
    linear = torch.nn.Linear(5, 6)
    layer = LoRAMoELinear(linear.weight, linear.bias, ["audio", "depth"], experts=4, rank=2, top_k=top_k)
    with torch.no_grad():
        for router in layer.routers.values():  # both modalities' routers start as the stored one
            router.weight.copy_(case["router_weight"])
            router.bias.copy_(case["router_bias"])
    return layer


def test_matches_the_stored_gates_and_statistics(stored):
    case = stored("top_k_routing")
    layer = layer_from(case)
    gates = layer.route(case["x"], "audio")
    torch.testing.assert_close(gates, case["gates"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.stats["audio"]["f"].float(), case["f"])
    torch.testing.assert_close(layer.stats["audio"]["P"].detach(), case["P"], rtol=1e-5, atol=1e-6)


def test_k_gates_per_token_on_the_largest_router_scores(stored):
    case = stored("top_k_routing")
    layer = layer_from(case)
    x = torch.randn(3, 20, 5)
    gates = layer.route(x, "audio")
    assert gates.shape == (3, 20, 4)
    assert ((gates > 0).sum(-1) == 2).all()  # exactly k experts per token
    torch.testing.assert_close(gates.sum(-1), torch.ones(3, 20))  # renormalised over the k
    scores = layer.routers["audio"](x)
    chosen = scores.topk(2, dim=-1).indices
    assert ((gates > 0) == torch.zeros_like(gates, dtype=torch.bool).scatter(-1, chosen, True)).all()


def test_chosen_gates_keep_the_softmax_ratios(stored):
    """Renormalising over the top k keeps g_a / g_b = exp(s_a - s_b) for two chosen experts."""
    case = stored("top_k_routing")
    layer = layer_from(case, top_k=2)
    x = torch.randn(10, 5, dtype=torch.float32)
    gates, scores = layer.route(x, "audio"), layer.routers["audio"](x)
    top = scores.topk(2, dim=-1).indices
    ratio = gates.gather(-1, top[:, :1]) / gates.gather(-1, top[:, 1:])
    torch.testing.assert_close(ratio, (scores.gather(-1, top[:, :1]) - scores.gather(-1, top[:, 1:])).exp(),
                               rtol=1e-4, atol=1e-5)


def test_k_equal_to_E_is_dense_and_each_modality_has_its_own_router(stored):
    case = stored("top_k_routing")
    layer = layer_from(case, top_k=4)
    x = torch.randn(8, 5)
    assert (layer.route(x, "audio") > 0).all()
    with torch.no_grad():
        layer.routers["depth"].weight.mul_(-1)
    assert not torch.allclose(layer.route(x, "depth"), layer.route(x, "audio"))


def test_statistics_for_the_load_balance(stored):
    """f: the fraction of token->expert assignments per expert, no gradient; P: the mean softmax gate,
    differentiable; in training mode the gates are added to this modality's running sums."""
    case = stored("top_k_routing")
    layer = layer_from(case)
    layer.route(torch.randn(50, 5), "audio")
    f, P = layer.stats["audio"]["f"], layer.stats["audio"]["P"]
    assert f.shape == P.shape == (4,)
    assert f.sum().item() == pytest.approx(1.0) and P.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert not f.requires_grad and P.requires_grad
    assert layer.token_count[0] == 50 and layer.gate_sum[0].sum().item() == pytest.approx(50.0)
    layer.eval()
    layer.route(torch.randn(5, 5), "audio")
    assert layer.token_count[0] == 50  # inference does not count
