"""Tests for tokenizers.py: the modality tokenizers, their initialisation from CLIP's patch conv,
positional-embedding interpolation, farthest point sampling and kNN."""

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from modalities import MODALITIES, extended
from tokenizers import (DepthTokenizer, PointCloudTokenizer, TactileTokenizer, VideoTokenizer,
                        farthest_point_sampling, interpolate_positions, knn)

TOKENIZERS = {m: MODALITIES[m].tokenizer for m in extended()}

WIDTH, PATCH = 32, 8

# modality -> (small settings, input at the configured size, tokens, input of another size, tokens)
CASES = {
    "tactile": ({"image_size": 32}, (3, 32, 32), 16, (3, 48, 40), 30),
    "depth": ({"image_size": 32}, (1, 32, 32), 16, (1, 24, 24), 9),
    "video": ({"frames": 4, "image_size": 32}, (4, 3, 32, 32), 32, (5, 3, 24, 24), 27),
    "audio": ({"frames": 100}, (1, 128, 100), 12 * 9, (1, 128, 60), 12 * 5),
    "point": ({"points": 256, "groups": 16, "neighbours": 8}, (256, 3), 16, (100, 3), 16),
    "imu": ({"length": 200}, (6, 200), 20, (6, 150), 15),
    "eeg": ({"channels": 4, "length": 64}, (4, 64), 4, (4, 128), 8),
}


def patch_conv():
    torch.manual_seed(0)
    return torch.randn(WIDTH, 3, PATCH, PATCH) * 0.1


def make(modality):
    return TOKENIZERS[modality](patch_conv(), **CASES[modality][0])


def test_every_extended_modality_has_a_tokenizer():
    assert set(TOKENIZERS) == {"video", "audio", "point", "depth", "tactile", "imu", "eeg"}


@pytest.mark.parametrize("modality", sorted(CASES))
def test_tokens_at_configured_and_other_sizes(modality):
    _, shape, length, other_shape, other_length = CASES[modality]
    tokenizer = make(modality)
    assert tokenizer(torch.randn(2, *shape)).shape == (2, length, WIDTH)
    assert tokenizer(torch.randn(2, *other_shape)).shape == (2, other_length, WIDTH)


@pytest.mark.parametrize("modality", sorted(CASES))
def test_gradient_reaches_every_parameter_and_never_the_frozen_conv(modality):
    frozen = patch_conv().requires_grad_()  # would receive a gradient if a tokenizer used it in its graph
    tokenizer = TOKENIZERS[modality](frozen, **CASES[modality][0])
    assert all(p is not frozen for p in tokenizer.parameters())
    tokenizer(torch.randn(2, *CASES[modality][1])).square().sum().backward()
    for name, p in tokenizer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert frozen.grad is None


def test_tactile_starts_as_a_separate_copy_of_the_patch_conv():
    frozen = patch_conv()
    tokenizer = TactileTokenizer(frozen, image_size=32)
    assert torch.equal(tokenizer.conv.weight, frozen)
    with torch.no_grad():
        tokenizer.conv.weight.add_(1.0)
    assert torch.equal(frozen, patch_conv())


def test_depth_starts_as_the_image_conv_on_a_grey_image():
    tokenizer = make("depth")
    disparity = torch.randn(2, 1, 32, 32)
    grey = disparity.expand(-1, 3, -1, -1)
    expected = rearrange(F.conv2d(grey, patch_conv(), stride=PATCH), "b d h w -> b (h w) d")
    torch.testing.assert_close(tokenizer(disparity) - tokenizer.positional_embedding, expected)


@pytest.mark.parametrize("frames", [4, 1])
def test_video_of_a_still_image_gives_the_image_patch_tokens(frames):
    tokenizer = VideoTokenizer(patch_conv(), frames=4, image_size=32)
    with torch.no_grad():
        tokenizer.positional_embedding.zero_()
    image = torch.randn(2, 3, 32, 32)
    image_tokens = rearrange(F.conv2d(image, patch_conv(), stride=PATCH), "b d h w -> b (h w) d")
    tokens = tokenizer(image[:, None].expand(-1, frames, -1, -1, -1))
    torch.testing.assert_close(tokens, image_tokens.repeat(1, math.ceil(frames / 2), 1))


def clip_positions():
    """A CLIP-like positional embedding for a 32-pixel image in patches of 8: class token + 4 x 4 grid."""
    torch.manual_seed(5)
    return torch.randn(1 + 16, WIDTH)


def clip_image_tokens(image):
    """CLIP's own patch tokens of an image: its conv, flattened row-major, plus its positional embedding."""
    return rearrange(F.conv2d(image, patch_conv(), stride=PATCH), "b d h w -> b (h w) d") + clip_positions()[1:]


def test_with_clip_positions_a_tactile_copy_of_an_image_gives_exactly_clips_image_tokens():
    frozen = clip_positions().requires_grad_()
    tokenizer = TactileTokenizer(patch_conv(), image_size=32, clip_positions=frozen)
    image = torch.randn(2, 3, 32, 32)
    assert torch.equal(tokenizer(image), clip_image_tokens(image))
    tokenizer(image).sum().backward()
    assert frozen.grad is None and tokenizer.positional_embedding.grad is not None  # a trainable copy
    with torch.no_grad():
        tokenizer.positional_embedding.add_(1.0)
    assert torch.equal(frozen, clip_positions())


def test_with_clip_positions_a_grey_disparity_gives_clips_image_tokens():
    tokenizer = DepthTokenizer(patch_conv(), image_size=32, clip_positions=clip_positions())
    disparity = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(tokenizer(disparity), clip_image_tokens(disparity.expand(-1, 3, -1, -1)))


@pytest.mark.parametrize("frames", [4, 1])
def test_with_clip_positions_a_still_video_gives_clips_image_tokens_at_every_tubelet(frames):
    tokenizer = VideoTokenizer(patch_conv(), frames=4, image_size=32, clip_positions=clip_positions())
    image = torch.randn(2, 3, 32, 32)
    tokens = tokenizer(image[:, None].expand(-1, frames, -1, -1, -1))  # no positional embedding zeroed
    torch.testing.assert_close(tokens, clip_image_tokens(image).repeat(1, math.ceil(frames / 2), 1))


def test_clip_positions_are_resampled_to_another_grid_and_random_stays_the_default():
    tokenizer = TactileTokenizer(patch_conv(), image_size=48, clip_positions=clip_positions())  # a 6 x 6 grid
    expected = interpolate_positions(clip_positions()[1:], (4, 4), (6, 6))
    assert torch.equal(tokenizer.positional_embedding.detach(), expected)
    video = VideoTokenizer(patch_conv(), frames=6, image_size=48, clip_positions=clip_positions())
    assert torch.equal(video.positional_embedding.detach(), expected.repeat(3, 1))  # the same grid at each time
    default = TactileTokenizer(patch_conv(), image_size=32)
    assert default.positional_embedding.std() < 0.05  # today's start: random, std 0.02
    with pytest.raises(ValueError, match="positional embedding"):
        TactileTokenizer(patch_conv(), image_size=32, clip_positions=torch.randn(16, WIDTH))  # no class position


@pytest.mark.parametrize("grid", [(7,), (3, 5), (2, 3, 4)])
def test_positional_interpolation_is_identity_at_the_configured_grid(grid):
    pos = torch.randn(math.prod(grid), WIDTH)
    assert torch.equal(interpolate_positions(pos, grid, grid), pos)


def test_positional_interpolation_resamples_each_axis_separately():
    rows = torch.tensor([0.0, 1.0, 2.0])
    pos = rows[:, None, None].expand(3, 4, WIDTH).reshape(12, WIDTH)  # depends on the row only
    resized = interpolate_positions(pos, (3, 4), (6, 5)).reshape(6, 5, WIDTH)
    torch.testing.assert_close(resized, resized[:, :1].expand(6, 5, WIDTH))  # still constant along each row
    torch.testing.assert_close(resized[:, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.0]))


def brute_force_fps(xyz, n):
    chosen = [0]
    nearest = [math.inf] * len(xyz)
    for _ in range(n - 1):
        last = xyz[chosen[-1]].tolist()
        for j, p in enumerate(xyz.tolist()):
            nearest[j] = min(nearest[j], sum((a - b) ** 2 for a, b in zip(p, last)))
        chosen.append(max(range(len(xyz)), key=lambda j: (nearest[j], -j)))
    return chosen


def test_farthest_point_sampling_matches_brute_force_and_spreads_points():
    torch.manual_seed(1)
    clouds = torch.randn(3, 200, 3, dtype=torch.float64)
    picked = farthest_point_sampling(clouds, 12)
    for cloud, indices in zip(clouds, picked):
        assert indices.tolist() == brute_force_fps(cloud, 12)
    # two tight clusters far apart: the second pick lands in the other cluster
    clusters = torch.cat([torch.randn(50, 3) * 0.01, torch.randn(50, 3) * 0.01 + 10.0])[None]
    assert farthest_point_sampling(clusters, 2)[0, 1] >= 50
    # spread: picked points are farther apart than random ones
    cloud = torch.rand(1, 2000, 3)
    spacing = torch.pdist(cloud[0, farthest_point_sampling(cloud, 64)[0]]).min()
    assert spacing > 2 * torch.pdist(cloud[0, :64]).min()


def test_knn_matches_a_brute_force_sort():
    torch.manual_seed(2)
    xyz, queries = torch.randn(2, 300, 3, dtype=torch.float64), torch.randn(2, 10, 3, dtype=torch.float64)
    found = knn(queries, xyz, 7)
    for b in range(2):
        for g in range(10):
            distances = [((xyz[b, j] - queries[b, g]) ** 2).sum().item() for j in range(300)]
            assert found[b, g].tolist() == sorted(range(300), key=distances.__getitem__)[:7]


def test_point_tokenizer_ignores_point_order_given_the_start_point():
    torch.manual_seed(3)
    tokenizer = PointCloudTokenizer(patch_conv(), points=256, channels=6, groups=16, neighbours=8)
    points = torch.cat([torch.randn(2, 256, 3), torch.rand(2, 256, 3)], dim=-1)  # xyz + rgb
    order = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(255)])  # FPS starts at point 0
    torch.testing.assert_close(tokenizer(points[:, order]), tokenizer(points))


def test_point_tokenizer_with_fewer_points_than_groups_uses_every_point():
    tokenizer = make("point")
    assert tokenizer(torch.randn(2, 5, 3)).shape == (2, 5, WIDTH)
    with pytest.raises(ValueError, match="groups"):
        PointCloudTokenizer(patch_conv(), points=64, groups=128)


def test_point_groups_see_only_local_shape_and_the_centre_only_through_the_positional_embedding():
    torch.manual_seed(4)
    tokenizer = PointCloudTokenizer(patch_conv(), points=256, groups=16, neighbours=8)
    with torch.no_grad():
        tokenizer.positional_embedding[-1].weight.zero_()  # positions now add a constant
    points = torch.randn(2, 256, 3)
    shift = torch.tensor([0.5, -0.25, 1.0])
    torch.testing.assert_close(tokenizer(points + shift), tokenizer(points), atol=1e-4, rtol=1e-4)


def test_audio_tokens_keep_time_and_frequency_on_their_axes():
    """A click at one frame changes only the tokens of the time patches covering it, in every mel row;
    a tone in one mel band changes only the tokens of the mel patches covering it, at every time."""
    tokenizer = make("audio")  # 128 mel bins x 100 frames -> 12 mel patches x 9 time patches
    silence = torch.zeros(1, 1, 128, 100)
    click, tone = silence.clone(), silence.clone()
    click[..., :, 50] = 1.0
    tone[..., 64, :] = 1.0
    with torch.no_grad():
        base = tokenizer(silence)
        assert torch.equal(base[0], tokenizer.positional_embedding)  # its (mel, time) grid, not resampled
        changed = {name: rearrange((tokenizer(x) - base).abs().sum(-1) > 1e-6, "1 (m t) -> m t", m=12)
                   for name, x in (("click", click), ("tone", tone))}
    covering = lambda position: [p for p in range(12) if 10 * p <= position < 10 * p + 16]
    assert changed["click"][:, covering(50)].all() and changed["click"].sum(0).nonzero().flatten().tolist() == covering(50)
    assert changed["tone"][covering(64), :9].all() and changed["tone"].sum(1).nonzero().flatten().tolist() == covering(64)
