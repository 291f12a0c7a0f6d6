"""Exercise lora_expert: `LoRAMoELinear.add_expert_update` (Eq. 1) and `LoRAMoELinear.merge`
(docs/method.md section 1)."""

import pytest
import torch
import torch.nn.functional as F

from lora_moe import LoRAMoELinear

pytestmark = pytest.mark.lora_expert


def layer_from(case):
    weight, bias = torch.nn.Parameter(case["weight"].clone()), torch.nn.Parameter(case["bias"].clone())
    layer = LoRAMoELinear(weight, bias, ["audio"], experts=3, rank=2, top_k=2, alpha=4.0)
    with torch.no_grad():
        layer.lora_A.copy_(case["lora_A"])
        layer.lora_B.copy_(case["lora_B"])
    return layer


def update(layer, x, gates):
    """Eq. 1's sum alone: the layer's output minus the frozen linear's."""
    y = F.linear(x, layer.weight, layer.bias)
    return layer.add_expert_update(y, x, gates) - y


def test_matches_the_stored_output(stored):
    case = stored("lora_expert")
    layer = layer_from(case)
    y = F.linear(case["x"], layer.weight, layer.bias)
    torch.testing.assert_close(layer.add_expert_update(y, case["x"], case["gates"]), case["out"],
                               rtol=1e-5, atol=1e-6)


def test_zero_B_adds_nothing(stored):
    case = stored("lora_expert")
    layer = layer_from(case)
    with torch.no_grad():
        layer.lora_B.zero_()  # LoRA's initialisation: the adapted layer starts as the frozen one
    torch.testing.assert_close(update(layer, case["x"], case["gates"]), torch.zeros(4, 6))


def test_the_update_is_linear_in_the_gates_and_scaled_by_alpha_over_r(stored):
    case = stored("lora_expert")
    layer, x = layer_from(case), case["x"]
    g1, g2 = torch.rand(4, 3), torch.rand(4, 3)
    torch.testing.assert_close(update(layer, x, g1 + g2), update(layer, x, g1) + update(layer, x, g2),
                               rtol=1e-4, atol=1e-5)
    before = update(layer, x, g1)
    layer.scaling *= 2
    torch.testing.assert_close(update(layer, x, g1), 2 * before)


def test_an_unchosen_expert_gets_no_gradient(stored):
    case = stored("lora_expert")
    layer = layer_from(case)
    gates = torch.tensor([[0.0, 1.0, 0.0]]).expand(4, 3)  # every token routed to expert 1 alone
    update(layer, case["x"], gates).square().sum().backward()
    A, B = layer.lora_A.grad.view(3, 2, 5), layer.lora_B.grad.view(6, 3, 2)  # (E, r, in), (out, E, r)
    assert A[1].abs().sum() > 0 and B[:, 1].abs().sum() > 0
    assert A[[0, 2]].abs().sum() == 0 and B[:, [0, 2]].abs().sum() == 0
    assert layer.weight.grad is None and layer.bias.grad is None  # the frozen linear stays frozen


def test_merge_matches_the_stored_weight(stored):
    case = stored("lora_expert")
    layer = layer_from(case)
    layer.gate_sum[0] = case["gate_sum"].double()
    layer.token_count[0] = case["token_count"]
    layer.merge("audio")
    torch.testing.assert_close(layer.merged_weight, case["merged_weight"], rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.weight.detach(), case["weight"])  # W is CLIP's frozen weight: never changed


def test_merged_weight_gives_the_update_of_the_mean_gate(stored):
    """Folding in the expected update: the merged linear equals the routed layer run with every
    token at the mean gate gbar; the image path (modality None) keeps the frozen W; unmerge drops
    the merged weight."""
    case = stored("lora_expert")
    layer = layer_from(case)
    frozen = layer.weight.detach().clone()
    gbar = torch.tensor([0.2, 0.5, 0.3])
    layer.gate_sum[0], layer.token_count[0] = 10 * gbar.double(), 10.0
    x = torch.randn(7, 5)
    expected = F.linear(x, layer.weight, layer.bias) + update(layer, x, gbar.expand(7, 3)).detach()
    layer.merge("audio")
    layer.modality = "audio"  # merged: the plain linear with the merged weight
    torch.testing.assert_close(layer(x).detach(), expected, rtol=1e-5, atol=1e-5)
    layer.modality = None  # the image path: the frozen linear, bit for bit
    assert torch.equal(layer(x), F.linear(x, frozen, layer.bias))
    with pytest.raises(RuntimeError):
        layer.merge("audio")  # twice would add the update twice
    layer.unmerge()
    assert torch.equal(layer.weight.detach(), frozen) and layer.merged is None
