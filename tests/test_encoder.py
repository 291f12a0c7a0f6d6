"""Tests for encoder.py: UniAlign at initialisation is the frozen ViT, images and text take CLIP's
untouched path, training reaches exactly the trainable parts, router statistics come back from the
forward, and grad checkpointing recomputes with the same routing."""

import pytest
import torch
from torch import nn

from encoder import UniAlign
from test_clip import inputs, tiny_clip

UNIALIGN_INPUTS = {"depth": (1, 32, 32), "imu": (6, 40), "point": (64, 3)}
SETTINGS = {"depth": {"image_size": 32}, "imu": {"length": 40, "kernel": 8},
            "point": {"points": 64, "groups": 8, "neighbours": 8}}


def tiny_unialign(**kw):
    return UniAlign(tiny_clip(), list(UNIALIGN_INPUTS), SETTINGS, experts=3, rank=4, top_k=2, **kw)


def unialign_batch(seed=2):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(2, *shape, generator=g) for m, shape in UNIALIGN_INPUTS.items()}


def test_unialign_at_initialisation_is_the_frozen_vit_on_the_same_tokens():
    model = tiny_unialign()
    frozen = tiny_clip().visual  # same seed: the same weights, never adapted
    with torch.no_grad():
        for m, x in unialign_batch().items():
            z = model({m: x})[0][m]
            ref = nn.functional.normalize(frozen.encode_tokens(model.tokenizers[m](x)), dim=-1)
            assert torch.equal(z, ref), m


def test_images_and_text_take_the_untouched_clip_path():
    model, clip = tiny_unialign(), tiny_clip()
    with torch.no_grad():
        for p in model.parameters():  # make the adapters matter: they must still not touch images
            if p.requires_grad:
                p.add_(0.1)
        images, ids = inputs()
        out, stats = model({"image": images, "text": ids})
        assert stats == {}
        assert torch.equal(out["image"], nn.functional.normalize(clip.encode_image(images), dim=-1))
        assert torch.equal(out["text"], nn.functional.normalize(clip.encode_text(ids), dim=-1))


def test_a_training_step_reaches_tokenizers_experts_routers_and_no_frozen_weight():
    model = tiny_unialign()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(2):  # B starts at zero: the first step moves B, the second reaches A and the routers
        opt.zero_grad()
        loss = sum(z.sum() * (k + 1) for k, z in enumerate(model(unialign_batch())[0].values()))
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"tokenizers", "clip"}
    assert all(".lora_" in n or ".routers." in n for n, p in model.clip.named_parameters() if p.requires_grad)


def test_trainable_state_round_trip_and_counts():
    model = tiny_unialign()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    state = model.trainable_state_dict()
    assert not any(k.endswith(("in_proj_weight", "c_fc.weight", "conv1.weight")) for k in state)
    fresh = tiny_unialign()
    fresh.load_trainable_state_dict(state)
    batch = unialign_batch()
    with torch.no_grad():
        for m in batch:
            assert torch.equal(model.encode(m, batch[m])[0], fresh.encode(m, batch[m])[0])
    counts = model.count_trainable()
    assert counts["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # per block and modality, a router (in + 1) x E for in_proj, out_proj, c_fc (in = 64) and c_proj (in = 256)
    assert counts["routers"] == 2 * len(UNIALIGN_INPUTS) * (3 * (64 + 1) + (256 + 1)) * 3
    with pytest.raises(ValueError, match="does not fit"):
        UniAlign(tiny_clip(), ["depth"], SETTINGS).load_trainable_state_dict(state)


def test_router_statistics_per_modality_feed_the_balance_term():
    model = tiny_unialign()
    _, router_stats = model(unialign_batch())
    assert set(router_stats) == set(UNIALIGN_INPUTS)
    for stats in router_stats.values():
        assert len(stats) == 2 * 4  # blocks x targets
        assert all(torch.allclose(s["f"].sum(), torch.tensor(1.0)) and s["P"].requires_grad for s in stats)


@pytest.mark.parametrize("router_scope", ["linear", "block"])
def test_unialign_grad_checkpointing_recomputes_with_the_same_routing(router_scope):
    grads = []
    for checkpointing in (False, True):
        model = tiny_unialign(grad_checkpointing=checkpointing, router_scope=router_scope)
        with torch.no_grad():
            for adapter in model.adapters:
                adapter.lora_B.normal_()
        sum(z.sum() * (k + 1) for k, z in enumerate(model(unialign_batch())[0].values())).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_merging_a_modality_moves_neither_the_image_path_nor_the_other_modalities():
    """The adapters sit inside the CLIP copy whose blocks also encode images: merging depth's expected
    update must leave images (the anchor space) and imu bit for bit as they were."""
    model = tiny_unialign()
    with torch.no_grad():
        for adapter in model.adapters:
            adapter.lora_B.normal_()
    batch, (images, ids) = unialign_batch(), inputs()
    with torch.no_grad():
        model.train().encode("depth", batch["depth"])  # training mode: the gate statistics merge needs
        model.eval()
        encode = lambda: {"image": model.encode("image", images)[0], "text": model.encode("text", ids)[0],
                          **{m: model.encode(m, batch[m])[0] for m in ("imu", "depth")}}
        before = encode()
        model.merge("depth")
        merged = encode()
        assert model.encode("depth", batch["depth"])[1] == []  # no router ran: nothing for Eq. 3
        for m in ("image", "text", "imu"):
            assert torch.equal(merged[m], before[m]), m
        assert not torch.equal(merged["depth"], before["depth"])  # token-dependent routing: merging approximates
        state = model.trainable_state_dict()  # a checkpoint of a merged model holds no merged weight
        assert not any("merged" in k for k in state)
        model.load_trainable_state_dict(state)
        model.unmerge()
        assert torch.equal(model.encode("depth", batch["depth"])[0], before["depth"])
    with pytest.raises(KeyError, match="eeg"):
        model.merge("eeg")


def test_block_router_scope_counts_one_router_per_modality_and_block_and_round_trips():
    model = tiny_unialign(router_scope="block")
    counts = model.count_trainable()
    assert counts["routers"] == 2 * len(UNIALIGN_INPUTS) * (64 + 1) * 3  # blocks x modalities x (width + 1) x E
    assert counts["experts"] == tiny_unialign().count_trainable()["experts"]
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    fresh = tiny_unialign(router_scope="block")
    fresh.load_trainable_state_dict(model.trainable_state_dict())  # a block router under each adapter's keys
    batch = unialign_batch()
    with torch.no_grad():
        for m in batch:
            assert torch.equal(model.encode(m, batch[m])[0], fresh.encode(m, batch[m])[0])


def test_with_clip_token_positions_image_like_inputs_start_as_clips_images():
    """--token-positions clip: at initialisation a tactile copy of an image is encoded bit for bit as
    the image, a disparity map as its grey image. (A still video gives the image's tokens once per
    tubelet, test_tokenizers.py; its embedding differs, as the class token is then one key among
    twice as many.)"""
    model = UniAlign(tiny_clip(), ["tactile", *SETTINGS], {"tactile": {"image_size": 32}, **SETTINGS},
                     experts=3, rank=4, top_k=2, token_positions="clip")  # imu and point keep their own start
    images, _ = inputs()
    with torch.no_grad():
        image = model.encode("image", images)[0]
        assert torch.equal(model.encode("tactile", images)[0], image)
        grey = images[:, :1]
        torch.testing.assert_close(model.encode("depth", grey)[0], model.encode("image", grey.expand(-1, 3, -1, -1))[0],
                                   rtol=1e-4, atol=1e-5)
    default = tiny_unialign()  # random positions, today's default
    assert not torch.equal(default.tokenizers["depth"].positional_embedding, model.tokenizers["depth"].positional_embedding)
    with pytest.raises(ValueError, match="token_positions"):
        tiny_unialign(token_positions="learned")


def test_modalities_of_equal_token_counts_share_one_pass_each_routed_by_its_own_router():
    """depth (16 patches) and point (16 groups) go through the frozen blocks together, imu (5 tokens)
    alone: every row as if encoded alone, with its own modality's router statistics (Eq. 3)."""
    settings = {**SETTINGS, "point": {"points": 64, "groups": 16, "neighbours": 8}}
    model = UniAlign(tiny_clip(), list(UNIALIGN_INPUTS), settings, experts=3, rank=4, top_k=2).eval()
    with torch.no_grad():
        for adapter in model.adapters:
            adapter.lora_B.normal_()
            for router in adapter.routers.values():
                router.weight.normal_()
    passes = []
    model.clip.visual.transformer.register_forward_hook(lambda module, args, out: passes.append(len(args[0])))
    batch = {m: x[:2] for m, x in unialign_batch().items()}
    batch["point"] = torch.cat([batch["point"], unialign_batch(seed=5)["point"]])  # 2 depth, 4 point rows
    with torch.no_grad():
        z, stats = model(batch)
        assert sorted(passes) == [2, 6]  # imu alone; depth and point in one pass of 2 + 4 rows
        for m, x in batch.items():
            alone, alone_stats = model.encode(m, x)
            torch.testing.assert_close(z[m], alone, rtol=1e-5, atol=1e-6, msg=m)
            for s, t in zip(stats[m], alone_stats):
                torch.testing.assert_close(s["P"], t["P"], rtol=1e-5, atol=1e-6, msg=m)
                assert torch.equal(s["f"], t["f"]), m
