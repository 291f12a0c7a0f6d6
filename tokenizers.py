"""Modality tokenizers (docs/method.md section 1, OneLLM style): one lightweight, trainable module
per extended modality turns its input into (B, L, width) tokens, its own learned positional
embedding already added, ready for the frozen ViT (`ViT.encode_tokens`).

Each is built as `cls(patch_conv, **settings)` from CLIP's frozen `visual.conv1.weight`
(width, 3, p, p), which gives the width, the patch size and, where shapes allow, the
initialisation. The image-like ones (`takes_clip_positions`: tactile, depth, video) also accept
`clip_positions`, CLIP's frozen `visual.positional_embedding` (1 + G*G, width), to start their
positional embedding from CLIP's instead of at random (encoder.UniAlign's `token_positions="clip"`):
then a tactile copy of an image, a grey image of a disparity map and a still video give exactly
CLIP's own patch tokens (conv + positions) at initialisation. Every tokenizer keeps its own copy:
the frozen tensors are never held, modified or part of the graph. Which tokenizer a modality uses
is decided in modalities.py.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat


INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


def interpolate_positions(pos, grid, new_grid):
    """(prod(grid), D) positional embedding on a 1-, 2- or 3-D grid -> (prod(new_grid), D), resampled.

    (Bi/tri)linear with align_corners=False, so cell centres map onto cell centres and the
    configured grid gives back the embedding unchanged.
    """
    pos = pos.T.reshape(1, -1, *grid)  # (1, D, *grid)
    pos = F.interpolate(pos, size=tuple(new_grid), mode=INTERPOLATION[len(grid)], align_corners=False)
    return rearrange(pos, "1 d ... -> (...) d")


def clip_patch_positions(clip_positions, grid):
    """CLIP's positional embedding (1 + G*G, width), the class token's first -> its G x G patch part
    resampled to a 2-D `grid` (`interpolate_positions`): (prod(grid), width), a detached copy."""
    patch = clip_positions.detach()[1:]
    side = math.isqrt(len(patch))
    if side * side != len(patch):
        raise ValueError(f"expected CLIP's (1 + G*G, width) positional embedding, got {tuple(clip_positions.shape)}")
    return interpolate_positions(patch, (side, side), grid).clone()


class ConvTokenizer(nn.Module):
    """Patches by a strided convolution + a learned positional embedding (std 0.02 at init) over the patch grid.

    `conv` maps (B, C, *input size) to (B, width, *grid); `grid` is the output grid of the
    configured input size. Another input size gives another grid, and the positional embedding is
    interpolated to it. The convolutions have no bias, like CLIP's conv1: the positional embedding
    already adds a learned vector to every token. `positions` (prod(grid), width), if given, is the
    embedding's start instead of random values (copied).
    """

    takes_clip_positions = False  # whether `clip_positions` may be given (the image-like tokenizers)

    def __init__(self, conv, grid, positions=None):
        super().__init__()
        self.conv, self.grid = conv, tuple(grid)
        shape = (math.prod(grid), conv.out_channels)
        if positions is not None and tuple(positions.shape) != shape:
            raise ValueError(f"positions of shape {tuple(positions.shape)} for a grid {self.grid} of width "
                             f"{conv.out_channels}: expected {shape}")
        self.positional_embedding = nn.Parameter(torch.randn(shape) * 0.02 if positions is None
                                                 else positions.detach().clone())

    def forward(self, x):
        """(B, C, *input size) -> (B, L, width): patches by the conv, flattened in row-major order of the
        grid (L = its cells), plus the positional embedding resampled to that grid."""
        x = self.conv(x)  # (B, width, *grid)
        pos = interpolate_positions(self.positional_embedding, self.grid, x.shape[2:])
        return rearrange(x, "b d ... -> b (...) d") + pos  # (B, L, width)


def conv_from(conv, weight):
    """`conv` with its weight set to a copy of `weight` (detached: the source stays frozen and untouched)."""
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv


class TactileTokenizer(ConvTokenizer):
    """Tactile image (B, 3, H, W) -> (B, (H/p)(W/p), width): Conv2d(3, width, p, stride p).

    Initialised as a copy of the image patch conv: a tactile sensor's picture is an RGB image.
    With `clip_positions`, the positional embedding starts as CLIP's (resampled to this grid), so
    at initialisation a tactile image is tokenized exactly as CLIP tokenizes it as an image.
    """

    takes_clip_positions = True

    def __init__(self, patch_conv, image_size=224, clip_positions=None):
        width, _, p, _ = patch_conv.shape
        conv = conv_from(nn.Conv2d(3, width, p, stride=p, bias=False), patch_conv)
        grid = (image_size // p, image_size // p)
        super().__init__(conv, grid, None if clip_positions is None else clip_patch_positions(clip_positions, grid))


class DepthTokenizer(ConvTokenizer):
    """Disparity map (B, 1, H, W) -> (B, (H/p)(W/p), width): Conv2d(1, width, p, stride p).

    Initialised from the image patch conv summed over RGB, so at initialisation a disparity map is
    tokenized exactly as the image conv sees it drawn as a grey image (the same value in R, G, B);
    with `clip_positions`, positions included (CLIP's, resampled to this grid).
    """

    takes_clip_positions = True

    def __init__(self, patch_conv, image_size=224, clip_positions=None):
        width, _, p, _ = patch_conv.shape
        conv = conv_from(nn.Conv2d(1, width, p, stride=p, bias=False), patch_conv.sum(1, keepdim=True))
        grid = (image_size // p, image_size // p)
        super().__init__(conv, grid, None if clip_positions is None else clip_patch_positions(clip_positions, grid))


class VideoTokenizer(ConvTokenizer):
    """Video (B, T, 3, H, W) -> (B, (T/2)(H/p)(W/p), width): Conv3d tubelets (2, p, p).

    Initialised by inflating the image conv (its weight / 2 at both time steps), so a static video
    gives the image's patch tokens. An odd last frame is repeated (a single image is a 2-frame
    tubelet). Positional embedding over (T/2, H/p, W/p); with `clip_positions` it starts as CLIP's
    spatial embedding (resampled to H/p x W/p) repeated at every time step, so a still video gives
    CLIP's image tokens, positions included, once per tubelet.
    """

    takes_clip_positions = True

    def __init__(self, patch_conv, frames=8, image_size=224, clip_positions=None):
        width, _, p, _ = patch_conv.shape
        conv = nn.Conv3d(3, width, (2, p, p), stride=(2, p, p), bias=False)
        conv = conv_from(conv, repeat(patch_conv / 2, "d c p q -> d c t p q", t=2))
        grid = ((frames + 1) // 2, image_size // p, image_size // p)
        positions = None
        if clip_positions is not None:
            positions = repeat(clip_patch_positions(clip_positions, grid[1:]), "hw d -> (t hw) d", t=grid[0])
        super().__init__(conv, grid, positions)

    def forward(self, video):
        if video.shape[1] % 2:
            video = torch.cat([video, video[:, -1:]], dim=1)
        return super().forward(rearrange(video, "b t c h w -> b c t h w"))


class AudioTokenizer(ConvTokenizer):
    """Log-mel (B, 1, 128, F) -> (B, 12 * ((F - 16) // 10 + 1), width): Conv2d(1, width, 16, stride 10).

    Overlapping 16 x 16 patches as AST; random initialisation (the image conv does not fit a
    spectrogram's patch shape). Positional embedding over the (mel, time) patch grid.
    """

    mel_bins = 128

    def __init__(self, patch_conv, frames=1024):
        conv = nn.Conv2d(1, patch_conv.shape[0], 16, stride=10, bias=False)
        super().__init__(conv, ((self.mel_bins - 16) // 10 + 1, (frames - 16) // 10 + 1))


class IMUTokenizer(ConvTokenizer):
    """IMU (B, 6, T) -> (B, T // kernel, width): Conv1d(6, width, kernel, stride kernel), random initialisation."""

    def __init__(self, patch_conv, length=2000, kernel=10):
        super().__init__(nn.Conv1d(6, patch_conv.shape[0], kernel, stride=kernel, bias=False), (length // kernel,))


class EEGTokenizer(ConvTokenizer):
    """EEG (B, C, T) -> (B, T // kernel, width): Conv1d(C, width, kernel, stride kernel), random initialisation."""

    def __init__(self, patch_conv, channels=16, length=256, kernel=16):
        super().__init__(nn.Conv1d(channels, patch_conv.shape[0], kernel, stride=kernel, bias=False),
                         (length // kernel,))


@torch.no_grad()
def farthest_point_sampling(xyz, n):
    """(B, N, 3) points -> (B, n) indices of n well-spread points, starting at point 0.

    Each step picks the point farthest from those already picked (first index on ties). The loop
    runs over the n picks; each pick is vectorised over the batch and the points.
    """
    b, num, _ = xyz.shape
    points = rearrange(xyz, "b n c -> b c n").contiguous()  # coordinates as rows: fast reductions
    picked = torch.zeros(b, n, dtype=torch.long, device=xyz.device)
    nearest = torch.full((b, num), math.inf, dtype=xyz.dtype, device=xyz.device)  # distance^2 to the picked set
    farthest = torch.zeros(b, 1, dtype=torch.long, device=xyz.device)
    for i in range(n):
        picked[:, i:i + 1] = farthest
        offset = points - points.gather(2, repeat(farthest, "b 1 -> b c 1", c=3))  # (B, 3, N)
        nearest = torch.minimum(nearest, (offset * offset).sum(1))
        farthest = nearest.argmax(1, keepdim=True)
    return picked


@torch.no_grad()
def knn(queries, xyz, k):
    """(B, G, 3) queries, (B, N, 3) points -> (B, G, k) indices of each query's k nearest points, nearest first."""
    return torch.cdist(queries, xyz).topk(k, dim=-1, largest=False).indices


class PointCloudTokenizer(nn.Module):
    """Point cloud (B, N, C) -> (B, G, width), C = `channels` (xyz, then e.g. rgb or normals).

    Farthest point sampling picks G = `groups` centres; each centre's k = `neighbours` nearest
    points, xyz relative to the centre (extra channels as they are), go through a shared point MLP
    and are max-pooled per group (a mini-PointNet, batch-norm free), then projected to the width.
    The positional embedding is an MLP of the centre's xyz, so any N needs no interpolation. With
    fewer than G (or k) points, every point is a centre (a neighbour).
    """

    hidden = 128  # point-feature width before the max-pool; the per-point MLP dominates the cost

    def __init__(self, patch_conv, points=8192, channels=3, groups=512, neighbours=32):
        super().__init__()
        if not 1 <= max(groups, neighbours) <= points:
            raise ValueError(f"groups ({groups}) and neighbours ({neighbours}) must be in 1..points ({points})")
        width, h = patch_conv.shape[0], self.hidden
        self.groups, self.neighbours = groups, neighbours
        self.point_mlp = nn.Sequential(nn.Linear(channels, h), nn.LayerNorm(h), nn.GELU(), nn.Linear(h, h))
        self.proj = nn.Linear(h, width)
        self.positional_embedding = nn.Sequential(nn.Linear(3, h), nn.GELU(), nn.Linear(h, width))

    def forward(self, points):
        b, n, _ = points.shape
        xyz = points[..., :3]
        batch = torch.arange(b, device=points.device)
        centres = xyz[batch[:, None], farthest_point_sampling(xyz, min(self.groups, n))]  # (B, G, 3)
        group = points[batch[:, None, None], knn(centres, xyz, min(self.neighbours, n))]  # (B, G, k, C)
        group = torch.cat([group[..., :3] - centres[:, :, None], group[..., 3:]], dim=-1)
        features = self.point_mlp(group).amax(dim=2)  # (B, G, hidden)
        return self.proj(features) + self.positional_embedding(centres)  # (B, G, width)
