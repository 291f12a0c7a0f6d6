"""Tests for clip.py: OpenAI's checkpoint layout, loading, the ViT token entry point, the causal
text tower, the LoRA hook point and gradient checkpointing."""

import math

import pytest
import torch
from einops import rearrange
from torch import nn

from clip import CLIP, clip_from_openai_state_dict, load_openai_clip

# Two layers per tower, one head per 64 channels (OpenAI's rule, which a state dict cannot override).
TINY = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
            vision_heads=1, context_length=12, vocab_size=50, transformer_width=64, transformer_heads=1,
            transformer_layers=2)

BLOCK_KEYS = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
              "ln_1.weight", "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
              "mlp.c_proj.bias", "ln_2.weight", "ln_2.bias"]
OPENAI_KEYS = (
    ["visual.class_embedding", "visual.positional_embedding", "visual.proj", "visual.conv1.weight",
     "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias"]
    + [f"visual.transformer.resblocks.{i}.{k}" for i in range(2) for k in BLOCK_KEYS]
    + ["positional_embedding", "text_projection", "logit_scale", "token_embedding.weight",
       "ln_final.weight", "ln_final.bias"]
    + [f"transformer.resblocks.{i}.{k}" for i in range(2) for k in BLOCK_KEYS]
)


def tiny_clip(seed=0, **overrides):
    torch.manual_seed(seed)
    return CLIP(**{**TINY, **overrides}).eval()


def inputs(batch=3, seed=1, context=12, vocab=50):
    """Random images and token ids; each row ends with end-of-text (the largest id), then padding 0."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=g)
    ids = torch.randint(1, vocab - 1, (batch, context), generator=g)
    eot = torch.arange(batch) + 3
    ids[torch.arange(batch), eot] = vocab - 1
    ids[torch.arange(context)[None] > eot[:, None]] = 0
    return images, ids


def embeddings(model, images, ids):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(ids)


def test_state_dict_keys_are_openai_layout():
    state = tiny_clip().state_dict()
    assert sorted(state) == sorted(OPENAI_KEYS)
    assert state["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 64, 64)
    assert state["visual.conv1.weight"].shape == (64, 3, 8, 8)
    assert state["visual.positional_embedding"].shape == ((32 // 8) ** 2 + 1, 64)
    assert state["visual.proj"].shape == state["text_projection"].shape == (64, 32)
    assert state["logit_scale"].item() == pytest.approx(math.log(1 / 0.07))


def test_round_trip_reproduces_configuration_and_outputs():
    model = tiny_clip(vision_width=128, vision_heads=2, vision_layers=3, transformer_layers=1)
    state = {k: v.half() for k, v in model.state_dict().items()}  # OpenAI releases fp16 weights
    state.update(input_resolution=32, context_length=12, vocab_size=50)  # OpenAI's int entries, ignored
    loaded = clip_from_openai_state_dict(state).eval()
    assert loaded.visual.conv1.weight.dtype == torch.float32
    assert (loaded.visual.image_resolution, loaded.visual.conv1.kernel_size, loaded.visual.output_dim) == (32, (8, 8), 32)
    assert (len(loaded.visual.transformer.resblocks), loaded.visual.transformer.resblocks[0].attn.heads) == (3, 2)
    assert (loaded.context_length, loaded.vocab_size, loaded.transformer.width, loaded.transformer.layers) == (12, 50, 64, 1)

    model.load_state_dict({k: v.float() for k, v in state.items() if isinstance(v, torch.Tensor)})  # same fp16-rounded weights
    images, ids = inputs()
    for ours, theirs in zip(embeddings(loaded, images, ids), embeddings(model, images, ids)):
        assert torch.equal(ours, theirs)


def test_forward_gives_scaled_cosine_logits():
    model = tiny_clip()
    images, ids = inputs()
    with torch.no_grad():
        per_image, per_text = model(images, ids)
        image, text = embeddings(model, images, ids)
    cosine = nn.functional.cosine_similarity(image[:, None], text[None], dim=-1)
    torch.testing.assert_close(per_image, cosine / 0.07)
    assert torch.equal(per_text, per_image.t())


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_torchscript_archive_and_state_dict_files_load(tmp_path):
    model = tiny_clip()
    images, ids = inputs()
    reference = embeddings(model, images, ids)
    torch.jit.trace(model, (images, ids)).save(str(tmp_path / "archive.pt"))  # the form OpenAI distributes
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    torch.save({"state_dict": model.state_dict(), "step": 7}, tmp_path / "wrapped.pt")
    for name in ["archive.pt", "plain.pt", "wrapped.pt"]:
        loaded = load_openai_clip(tmp_path / name).eval()
        for ours, theirs in zip(embeddings(loaded, images, ids), reference):
            assert torch.equal(ours, theirs), name


def test_bad_files_and_state_dicts_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_openai_clip(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_openai_clip(tmp_path / "junk.pt")

    state = tiny_clip().state_dict()
    del state["visual.ln_post.bias"], state["transformer.resblocks.1.mlp.c_fc.weight"]
    state["visual.extra"] = torch.zeros(1)
    with pytest.raises(KeyError) as error:
        clip_from_openai_state_dict(state)
    for key in ["visual.ln_post.bias", "transformer.resblocks.1.mlp.c_fc.weight", "visual.extra"]:
        assert key in str(error.value)

    resnet = {k: v for k, v in tiny_clip().state_dict().items() if not k.startswith("visual.")}
    resnet["visual.layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(ValueError, match="ResNet"):
        clip_from_openai_state_dict(resnet)


def test_vit_forward_is_conv1_then_encode_tokens():
    vit = tiny_clip().visual
    images, _ = inputs()
    with torch.no_grad():
        patches = rearrange(vit.conv1(images), "b d h w -> b (h w) d")  # (B, 16, 64)
        via_tokens = vit.encode_tokens(patches + vit.positional_embedding[1:])
        assert torch.equal(vit(images), via_tokens)


def test_text_embedding_ignores_tokens_after_end_of_text():
    model = tiny_clip()
    _, ids = inputs()
    after, before = ids.clone(), ids.clone()
    after[ids == 0] = 7  # the padding after each row's end-of-text
    before[:, 1] = 7
    with torch.no_grad():
        reference = model.encode_text(ids)
        torch.testing.assert_close(model.encode_text(after), reference, rtol=0, atol=1e-6)
        assert not torch.allclose(model.encode_text(before), reference, atol=1e-3)


def test_lora_hook_point_replaces_fused_qkv():
    model = tiny_clip()
    images, ids = inputs()
    image, text = embeddings(model, images, ids)
    attn = model.visual.transformer.resblocks[0].attn
    adapter = nn.Linear(64, 3 * 64)
    adapter.weight, adapter.bias = attn.in_proj_weight, attn.in_proj_bias
    attn.in_proj = adapter
    assert "visual.transformer.resblocks.0.attn.in_proj.weight" in model.state_dict()
    assert torch.equal(embeddings(model, images, ids)[0], image)  # same linear: same output
    with torch.no_grad():
        attn.in_proj_bias.add_(1.0)
    assert not torch.allclose(embeddings(model, images, ids)[0], image)  # the module is what runs now
    assert torch.equal(embeddings(model, images, ids)[1], text)


def test_grad_checkpointing_gives_same_outputs_and_gradients():
    images, ids = inputs()
    results = []
    for checkpointing in (False, True):
        model = tiny_clip().train()
        model.visual.transformer.grad_checkpointing = model.transformer.grad_checkpointing = checkpointing
        per_image, _ = model(images, ids)
        per_image.logsumexp(-1).sum().backward()
        results.append((per_image.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (out, grads), (out_ckpt, grads_ckpt) = results
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)
