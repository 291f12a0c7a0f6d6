"""Tests for lora_moe.py: identity at initialisation, the frozen path, gradients, top-k routing,
per-modality routers, load-balance statistics, merge / unmerge, state-dict keys."""

import copy

import pytest
import torch

from clip import ViT
from lora_moe import LoRAMoELinear, add_lora_moe, routed

MODALITIES = ["audio", "depth"]


def tiny_vit():
    torch.manual_seed(0)
    return ViT(image_resolution=16, patch_size=8, width=32, layers=2, heads=4, output_dim=16).requires_grad_(False)


def adapted_vit(**settings):
    """(frozen ViT, a copy of it with LoRA-MoE in all four linears of every block, the adapters)."""
    frozen = tiny_vit()
    vit = copy.deepcopy(frozen)
    return frozen, vit, add_lora_moe(vit.transformer.resblocks, MODALITIES, **settings)


def randomise_B(adapters):
    with torch.no_grad():
        for adapter in adapters:
            adapter.lora_B.normal_(std=0.5)


def tiny_layer(**settings):
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 10)
    layer = LoRAMoELinear(linear.weight, linear.bias, MODALITIES, **settings)
    randomise_B([layer])
    return layer


def images():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_identity_at_initialisation_for_every_modality():
    frozen, vit, adapters = adapted_vit()
    for modality in [None, *MODALITIES]:
        with routed(adapters, modality):
            assert torch.equal(vit(images()), frozen(images()))


def test_modality_none_is_the_frozen_path():
    frozen, vit, adapters = adapted_vit()
    randomise_B(adapters)
    with routed(adapters, None):
        assert torch.equal(vit(images()), frozen(images()))
    with routed(adapters, "audio"):
        assert not torch.allclose(vit(images()), frozen(images()))


def test_gradients_reach_experts_and_routers_never_frozen_weights():
    _, vit, adapters = adapted_vit()
    optimizer = torch.optim.SGD([p for p in vit.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        optimizer.zero_grad()
        with routed(adapters, "audio"):
            vit(images()).square().sum().backward()
        if step == 0:  # B = 0: only B gets a gradient
            assert all(a.lora_B.grad.abs().sum() > 0 for a in adapters)
            optimizer.step()
    for adapter in adapters:
        assert adapter.lora_A.grad.abs().sum() > 0
        assert adapter.lora_B.grad.abs().sum() > 0
        assert adapter.routers["audio"].weight.grad.abs().sum() > 0
        assert adapter.routers["depth"].weight.grad is None  # not this modality's router
    frozen = [p for n, p in vit.named_parameters() if "lora_" not in n and "routers" not in n]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    assert vit.transformer.resblocks[0].attn.in_proj_weight.grad is None


def test_top_k_routes_each_token_to_exactly_k_experts():
    layer = tiny_layer(experts=4, top_k=2)
    layer.modality = "audio"
    x = torch.randn(50, 12)
    gates = layer.route(x, "audio")
    assert ((gates > 0).sum(-1) == 2).all()
    assert torch.allclose(gates.sum(-1), torch.ones(50))
    y = layer(x)
    token = 0
    unselected, selected = (gates[token] == 0).nonzero()[0, 0], (gates[token] > 0).nonzero()[0, 0]
    for expert, changes in [(unselected, False), (selected, True)]:
        changed = copy.deepcopy(layer)
        with torch.no_grad():
            rows = slice(expert * layer.rank, (expert + 1) * layer.rank)
            changed.lora_A[rows] += 1.0
            changed.lora_B[:, rows] += 1.0
        assert torch.equal(changed(x)[token], y[token]) != changes


def test_k_equal_to_E_gives_dense_softmax_gates():
    layer = tiny_layer(experts=4, top_k=4)
    layer.modality = "depth"
    x = torch.randn(50, 12)
    softmax = layer.routers["depth"](x).softmax(-1)
    gates = layer.route(x, "depth")
    assert (gates > 0).all()
    assert torch.allclose(gates, softmax, atol=1e-6)


def test_load_balance_stats():
    layer = tiny_layer(experts=4, top_k=2)
    layer.modality = "audio"
    x = torch.randn(3, 20, 12)
    gates = layer.route(x, "audio")
    f, P = layer.stats["audio"]["f"], layer.stats["audio"]["P"]
    assert torch.allclose(f.sum(), torch.tensor(1.0))
    assert torch.allclose(f, (gates > 0).flatten(0, 1).float().sum(0) / (60 * 2))
    assert not f.requires_grad
    assert torch.allclose(P, layer.routers["audio"](x).softmax(-1).mean((0, 1)))
    (4 * (f * P).sum()).backward()  # Eq. 3
    assert layer.routers["audio"].weight.grad.abs().sum() > 0


def test_each_modality_has_its_own_router():
    layer = tiny_layer(experts=4, top_k=2)
    x = torch.randn(30, 12)
    outputs = {}
    for modality in MODALITIES:
        layer.modality = modality
        outputs[modality] = layer(x)
    assert not torch.allclose(outputs["audio"], outputs["depth"])
    layer.routers["depth"].load_state_dict(layer.routers["audio"].state_dict())
    assert torch.equal(layer(x), outputs["audio"])


@pytest.mark.parametrize("experts", [1, 4])
def test_merge_agrees_with_routing_when_routing_is_token_independent(experts):
    """E = 1, or routers with zero weights: the expected update is the update, so merging is exact."""
    frozen, vit, adapters = adapted_vit(experts=experts, top_k=min(2, experts))
    randomise_B(adapters)
    with torch.no_grad():
        for adapter in adapters:
            for router in (adapter.routers or {}).values():
                router.weight.zero_()
                router.bias.normal_()
    originals = [adapter.weight.clone() for adapter in adapters]
    with routed(adapters, "audio"), torch.no_grad():
        vit(images())  # training mode: gathers the gate statistics
        vit.eval()
        expected = vit(images())
    with routed(adapters, "depth"), torch.no_grad():
        depth = vit(images())
    for adapter in adapters:
        adapter.merge("audio")
    with torch.no_grad():
        with routed(adapters, "audio"):
            assert torch.allclose(vit(images()), expected, atol=1e-5)
        with routed(adapters, "depth"):  # another modality keeps its routing over the frozen W
            assert torch.equal(vit(images()), depth)
        with routed(adapters, None):  # the image path keeps the frozen W
            assert torch.equal(vit(images()), frozen(images()))
    for adapter, original in zip(adapters, originals):
        assert torch.equal(adapter.weight, original) and not torch.equal(adapter.merged_weight, original)
        adapter.unmerge()
        assert adapter.merged_weight is None and torch.equal(adapter.weight, original)
    assert torch.equal(vit.transformer.resblocks[0].attn.in_proj_weight, originals[0])


def test_clear_errors():
    layer = tiny_layer(experts=4, top_k=2)
    layer.modality = "eeg"
    with pytest.raises(KeyError, match="eeg"):
        layer(torch.randn(5, 12))
    with pytest.raises(RuntimeError, match="no routing statistics"):
        layer.merge("audio")
    with pytest.raises(KeyError, match="eeg"):
        layer.merge("eeg")
    layer.modality = "audio"
    layer(torch.randn(5, 12))
    layer.merge("audio")
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge("audio")
    with pytest.raises(ValueError, match="c_proj"):
        add_lora_moe(tiny_vit().transformer.resblocks, MODALITIES, targets=("qkv",))


def test_frozen_state_dict_keys_unchanged():
    frozen, vit, _ = adapted_vit()
    before, after = frozen.state_dict(), vit.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value)
    assert "transformer.resblocks.0.mlp.c_fc.weight" in after
    assert "transformer.resblocks.0.attn.in_proj_weight" in after
    new = set(after) - set(before)
    assert all(any(s in k for s in ("lora_", "routers", "gate_sum", "token_count", "attn.in_proj.")) for k in new)


def recorded_gates(adapters):
    """Wrap each adapter's route so that its gates are kept in a list per adapter."""
    gates = {id(adapter): [] for adapter in adapters}
    for adapter in adapters:
        route = adapter.route
        adapter.route = lambda x, m, route=route, keep=gates[id(adapter)]: keep.append(route(x, m)) or keep[-1]
    return gates


def test_block_scope_routes_every_linear_of_a_block_on_the_blocks_ln_1_input():
    _, vit, adapters = adapted_vit(experts=4, top_k=2, router_scope="block")
    randomise_B(adapters)
    gates = recorded_gates(adapters)
    block_inputs = []
    for block in vit.transformer.resblocks:
        block.register_forward_pre_hook(lambda module, args: block_inputs.append(args[0]))
    with routed(adapters, "depth"), torch.no_grad():
        vit(images())
    for k, block in enumerate(vit.transformer.resblocks):
        own = adapters[4 * k:4 * k + 4]  # in_proj, out_proj, c_fc, c_proj of block k
        assert all(a.routers is own[0].routers for a in own) and own[0].routers is not adapters[4 * k - 4].routers
        assert own[0].router_input.x is None  # the block's input is not kept after the block has run
        router = own[0].routers["depth"]
        with torch.no_grad():
            probs = router(block.ln_1.forward(block_inputs[k])).softmax(-1)  # forward: not through the hooks
        top, chosen = probs.topk(2, dim=-1)
        expected = torch.zeros_like(probs).scatter(-1, chosen, top / top.sum(-1, keepdim=True))
        for adapter in own:  # c_proj reads 128 features, out_proj the attention's output: same gates
            torch.testing.assert_close(gates[id(adapter)][0], expected)
    with pytest.raises(RuntimeError, match="block"):
        adapters[0].modality = "depth"
        adapters[0](torch.randn(5, 32))  # the linear alone: no block input to route on
    with pytest.raises(ValueError, match="router scope"):
        add_lora_moe(tiny_vit().transformer.resblocks, MODALITIES, router_scope="layer")


def test_block_scope_counts_one_router_per_modality_and_block():
    for scope, per_block in (("linear", 3 * (32 + 1) + (128 + 1)), ("block", 32 + 1)):
        _, vit, adapters = adapted_vit(experts=4, top_k=2, router_scope=scope)
        routers = {id(p): p.numel() for n, p in vit.named_parameters() if ".routers." in n}
        assert sum(routers.values()) == 2 * len(MODALITIES) * per_block * 4, scope  # blocks x modalities x (in + 1) x E
    assert adapted_vit(experts=1, top_k=1, router_scope="block")[2][0].routers is None  # E = 1: plain LoRA, no router
