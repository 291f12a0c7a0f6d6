"""The synthetic multimodal world of docs/method.md section 5: C concepts seen through eight modalities.

Each concept is a 3D shape (named by it: "sphere", "cube", ...) with its own hue, surface texture,
sound, motion and neural response, all drawn per seed. A sample is generated from the concept plus
nuisances (pose, scale, proportions, lighting, clutter, noise, pitch and timing jitter) as the raw
signal a real file would hold: an RGB render, a depth map in metres, surface points, a waveform,
a 6-axis IMU trace, an EEG recording. data.SyntheticDataset then sends it through the same
preprocessing as a file read by readers.py, so synthetic and real samples share one path.

Top to bottom: the shapes (signed distances), the concepts (`World`), the sphere tracer that
renders image, depth and video frames, and one raw generator per modality,
`gen_<modality>(world, sizes, rngs, k)` -> (raw signals, raw anchor RGB images or None).
"""

import colorsys
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from einops import einsum, rearrange

from preprocess import SAMPLE_RATE

# ----------------------------------------------------------------------------------------------
# 1. Shapes: signed distance (or a bound on it) in the object's unit frame, p (..., 3) -> (...)
# ----------------------------------------------------------------------------------------------


def length(*xs):
    return torch.sqrt(sum(x * x for x in xs))


def box(p, half):
    q = p.abs() - p.new_tensor(half)
    outside = q.clamp(min=0)
    return length(outside[..., 0], outside[..., 1], outside[..., 2]) + q.amax(-1).clamp(max=0)


def extrude(radial, axial):
    """Exact distance from 2D distances to a profile (radial) and to a slab (axial): capped solids."""
    return torch.maximum(radial, axial).clamp(max=0) + length(radial.clamp(min=0), axial.clamp(min=0))


def torus(p, big, small):
    return length(length(p[..., 0], p[..., 1]) - big, p[..., 2]) - small


def star(p):
    r, angle = length(p[..., 0], p[..., 1]), torch.atan2(p[..., 1], p[..., 0])
    return torch.maximum(0.5 * (r - 0.3 - 0.17 * torch.cos(5 * angle)), p[..., 2].abs() - 0.12)


def pyramid(p):
    slope = lambda u: (0.7 * u.abs() + 0.5 * (p[..., 1] - 0.35)) / 0.8602  # a side plane through the apex
    return torch.maximum(torch.maximum(slope(p[..., 0]), slope(p[..., 2])), -p[..., 1] - 0.35)


# Canonical poses face the camera (-z): rings, stars and crosses lie in the xy plane.
SHAPES = {
    "sphere": lambda p: length(p[..., 0], p[..., 1], p[..., 2]) - 0.5,
    "cube": lambda p: box(p, (0.38, 0.38, 0.38)),
    "cylinder": lambda p: extrude(length(p[..., 0], p[..., 2]) - 0.3, p[..., 1].abs() - 0.5),
    "cone": lambda p: torch.maximum((length(p[..., 0], p[..., 2]) + 0.34 * p[..., 1] - 0.19) / 1.0562,
                                    -p[..., 1] - 0.5),
    "torus": lambda p: torus(p, 0.35, 0.13),
    "pyramid": pyramid,
    "prism": lambda p: torch.maximum(p[..., 0].abs() - 0.5, torch.maximum(
        0.866 * p[..., 2].abs() + 0.5 * p[..., 1] - 0.2, -p[..., 1] - 0.2)),  # a ridge lying along x
    "capsule": lambda p: length(p[..., 0], p[..., 1] - p[..., 1].clamp(-0.38, 0.38), p[..., 2]) - 0.17,
    "star": star,
    "cross": lambda p: torch.minimum(box(p, (0.5, 0.14, 0.14)), box(p, (0.14, 0.5, 0.14))),
    "ring": lambda p: extrude((length(p[..., 0], p[..., 2]) - 0.38).abs() - 0.07, p[..., 1].abs() - 0.15),
    "egg": lambda p: ((p / p.new_tensor([0.32, 0.48, 0.32])).norm(dim=-1) - 1.0) * 0.32,
    "dumbbell": lambda p: torch.minimum(length(p[..., 0].abs() - 0.35, p[..., 1], p[..., 2]) - 0.17,
                                        length(p[..., 1], p[..., 2]) - 0.07 + (p[..., 0].abs() - 0.35).clamp(min=0)),
    "arch": lambda p: torch.maximum(torus(p, 0.35, 0.12), -p[..., 1] - 0.05),
    "bowl": lambda p: torch.maximum((p.norm(dim=-1) - 0.45).abs() - 0.05, p[..., 1]),
    "disk": lambda p: extrude(length(p[..., 0], p[..., 1]) - 0.45, p[..., 2].abs() - 0.06),
}
CONCEPTS = list(SHAPES)

# Three names for each shape. Real datasets label one thing differently (ESC-50's "dog" is AudioSet's
# "Bark"), so each dataset of the world names each concept by one of these (World.vocabulary).
SYNONYMS = {
    "sphere": ("sphere", "ball", "orb"), "cube": ("cube", "box", "block"), "cylinder": ("cylinder", "tube", "drum"),
    "cone": ("cone", "funnel", "horn"), "torus": ("torus", "donut", "bagel"), "pyramid": ("pyramid", "tent", "spire"),
    "prism": ("prism", "wedge", "ridge"), "capsule": ("capsule", "pill", "lozenge"),
    "star": ("star", "starfish", "asterisk"), "cross": ("cross", "plus", "junction"), "ring": ("ring", "hoop", "band"),
    "egg": ("egg", "ovoid", "oval"), "dumbbell": ("dumbbell", "barbell", "weight"),
    "arch": ("arch", "bridge", "horseshoe"), "bowl": ("bowl", "basin", "dish"), "disk": ("disk", "coin", "plate"),
}

# Tactile textures: a height field from two phase maps a, b (orthogonal gratings of the concept's frequency).
TEXTURES = [
    lambda a, b: np.sin(a),                                   # grating
    lambda a, b: np.clip(np.sin(a) * np.sin(b), 0, None),     # bumps
    lambda a, b: 1.0 - np.abs(np.sin(a)),                     # sharp ridges
    lambda a, b: np.sin(a) + np.sin(b),                       # weave
    lambda a, b: np.tanh(3.0 * np.sin(a) * np.sin(b)),        # checker
]


# ----------------------------------------------------------------------------------------------
# 2. The concepts of one seed
# ----------------------------------------------------------------------------------------------

def rotation(axis, angle):
    """Rodrigues: unit axis (3,), angles (...) -> (..., 3, 3)."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.asarray(angle, dtype=np.float64)[..., None, None]
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def euler(yaw, pitch, roll):
    return rotation([0, 1, 0], yaw) @ rotation([1, 0, 0], pitch) @ rotation([0, 0, 1], roll)


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class World:
    """The C concepts of one seed, and what its datasets cover and call them.

    Every property of a concept is a seeded permutation of an evenly spread grid, so no two concepts
    share a value; per-sample jitter (`scene`, the generators) makes neighbours overlap. Each concept
    has three names (SYNONYMS) in an order drawn per world.
    """

    def __init__(self, concepts=10, seed=0):
        if not 2 <= concepts <= len(CONCEPTS):
            raise ValueError(f"concepts must be between 2 and {len(CONCEPTS)}, got {concepts}")
        rng, c = np.random.default_rng([seed, zlib.crc32(b"world")]), concepts
        self.seed = seed
        spread = lambda lo, hi: rng.permutation(np.geomspace(lo, hi, c))
        self.names = CONCEPTS[:c]
        self.hue = (rng.permutation(c) / c + rng.uniform()) % 1.0
        self.f0 = spread(160.0, 640.0)                    # Hz, fundamental
        self.stretch = rng.permutation(np.linspace(0.8, 1.25, c))  # partial m sits at m ** stretch * f0
        self.odd_only = rng.permutation(np.arange(c) % 2 == 0)
        self.pulse_rate = spread(2.5, 14.0)               # Hz, rhythm
        self.texture = rng.permutation(np.arange(c) % len(TEXTURES))
        self.texture_freq = spread(2.5, 7.0)              # cycles per tactile patch
        self.texture_angle = rng.uniform(0, np.pi, c)
        self.bob_freq = spread(0.7, 3.5)                  # Hz, translation
        self.bob_dir = unit(rng.normal(size=(c, 3)))
        self.spin = rng.permutation(np.linspace(0.6, 3.5, c)) * rng.choice([-1, 1], c)  # rad/s
        self.spin_axis = unit(rng.normal(size=(c, 3)))
        self.wobble_freq = spread(0.5, 2.5)               # Hz, oscillation of the spin
        self.eeg_freq = spread(5.0, 32.0)                 # Hz, oscillation bursts
        self.dipole = rng.uniform(-0.8, 0.8, (c, 2, 2))   # scalp positions of the burst's two poles
        self.synonyms = [[str(name) for name in rng.permutation(SYNONYMS[n])] for n in self.names]

    def dataset_rng(self, what, modality):
        return np.random.default_rng([self.seed, zlib.crc32(what.encode()), zlib.crc32(modality.encode())])

    def coverage(self, modality, fraction):
        """The concepts (sorted indices) the dataset of `modality` covers: round(fraction * C) of them,
        at least 2, drawn per world and modality, so datasets overlap in part (as ModelNet40 and
        ShapeNet share some classes and not others)."""
        n = min(len(self.names), max(2, round(fraction * len(self.names))))
        return sorted(int(k) for k in self.dataset_rng("coverage", modality).choice(len(self.names), n, replace=False))

    def vocabulary(self, modality, own=True):
        """The name the dataset of `modality` gives each concept: one of the concept's synonyms, drawn
        per world and modality; own=False: the shape's name, in every dataset."""
        if not own:
            return list(self.names)
        choice = self.dataset_rng("vocabulary", modality).integers(len(SYNONYMS["cube"]), size=len(self.names))
        return [self.synonyms[k][choice[k]] for k in range(len(self.names))]

    def topography(self, k, channels):
        """(channels,) weights of concept k's burst: + near one pole, - near the other; electrodes
        spread over a unit disc (a sunflower pattern, so any channel count works)."""
        n = np.arange(channels) + 0.5
        e = np.sqrt(n / channels)[:, None] * np.stack([np.cos(2.4 * n), np.sin(2.4 * n)], 1)  # (C, 2)
        bump = lambda centre: np.exp(-((e - centre) ** 2).sum(1) / 0.3)
        return bump(self.dipole[k, 0]) - bump(self.dipole[k, 1])

    def motion(self, k, t, rng):
        """Concept k's motion at times t (T,): spin angle, spin rate (rad/s), position (T, 3) in m and
        acceleration (T, 3) in m/s^2: a wobbling spin about the concept's axis and a sinusoidal bob."""
        wb, ww = 2 * np.pi * self.bob_freq[k], 2 * np.pi * self.wobble_freq[k]
        pb, pw = rng.uniform(0, 2 * np.pi, 2)
        angle = self.spin[k] * t + 0.6 * np.sin(ww * t + pw)
        rate = self.spin[k] + 0.6 * ww * np.cos(ww * t + pw)
        position = 0.15 * np.sin(wb * t + pb)[:, None] * self.bob_dir[k]
        return angle, rate, position, -wb ** 2 * position


# ----------------------------------------------------------------------------------------------
# 3. Rendering: a scene = the posed object, a few clutter balls and a tilted, patterned back wall
# ----------------------------------------------------------------------------------------------

FOCAL, TRACE_STEPS, CLUTTER = 1 / np.tan(np.radians(24)), 32, 3
BOUND = 0.8  # every shape lies within this radius of its frame's origin


def scene(world, k, rng):
    """One random instance of concept k in a random scene (numpy parameters of `render`)."""
    hue = world.hue[k] + rng.uniform(-0.7, 0.7) / len(world.names)  # overlaps the neighbouring hues
    z, wall = rng.uniform(1.9, 2.6), rng.uniform(4.4, 6.0)
    clutter_z = rng.uniform(z + 0.7, wall - 0.3, CLUTTER)
    return {
        "pose": euler(rng.uniform(-0.9, 0.9), rng.uniform(-0.5, 0.5), rng.uniform(-0.3, 0.3)),
        "centre": np.array([rng.uniform(-0.35, 0.35) * z / 3, rng.uniform(-0.3, 0.3) * z / 3, z]),
        "size": rng.uniform(0.8, 1.2) * rng.uniform(0.9, 1.1, 3),
        "albedo": np.array(colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.45, 0.9), rng.uniform(0.55, 1.0))),
        "stripes": np.array([0.5 * world.texture_freq[k], rng.uniform(0, 2 * np.pi)]),
        "light": unit(np.array([rng.uniform(-1, 1), rng.uniform(-0.2, 1.2), -1.2])),
        "light_rgb": rng.uniform(0.6, 1.1) * rng.uniform(0.85, 1.0, 3),
        "ambient": rng.uniform(0.15, 0.4, 1),
        "wall": np.array([wall]),
        "wall_normal": unit(np.array([rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), 1.0])),
        "wall_rgb": rng.uniform(0.15, 0.75, (2, 1)) + rng.uniform(-0.15, 0.15, (2, 3)),
        "wall_pattern": np.concatenate([rng.uniform(1, 5, 2), rng.uniform(0, 2 * np.pi, 2)]),
        "clutter": np.stack([rng.uniform(-0.9, 0.9, CLUTTER) * clutter_z / 2.2,
                             rng.uniform(-0.9, 0.9, CLUTTER) * clutter_z / 2.2, clutter_z], 1),
        "clutter_radius": rng.uniform(0.12, 0.35, CLUTTER),
        "clutter_rgb": rng.uniform(0, 1, (CLUTTER, 3)),
        "noise": rng.uniform(0.01, 0.04, 1),  # pixel noise std
    }


def dot(a, b):
    """Sum over the last axis (3) in a fixed order: a sample's render never depends on its batch."""
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def matvec(m, v):
    """(..., 3, 3) @ (..., 3), in the fixed order of `dot`."""
    return dot(m, v[..., None, :])


def stack(scenes):
    return {key: torch.as_tensor(np.stack([s[key] for s in scenes]), dtype=torch.float32) for key in scenes[0]}


def render(shape, s, size):
    """Render a batch of scenes of one shape (stacked `scene` dicts) from a pinhole camera at the
    origin looking down +z -> RGB (B, size, size, 3) in [0, 1] and depth along z (B, size, size) in m.

    Wall and clutter balls are intersected analytically; the object is sphere-traced in its own
    frame (p = o + t d, t in metres along the ray), starting where the ray enters its bounding
    sphere, and only for the rays that enter it.
    """
    v = (torch.arange(size) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(-v, v, indexing="ij")
    rays = F.normalize(torch.stack([x, y, torch.full_like(x, FOCAL)], -1), dim=-1).reshape(-1, 3)  # (P, 3)
    to_object = s["pose"].transpose(1, 2)  # (B, 3, 3)
    o = matvec(to_object, -s["centre"]) / s["size"]  # (B, 3) camera in the object frame
    d = matvec(to_object[:, None], rays) / s["size"][:, None]  # (B, P, 3)
    half_b, a = dot(d, o[:, None]), dot(d, d)
    disc = half_b ** 2 - a * (dot(o, o)[:, None] - BOUND ** 2)
    b, p = (disc > 0).nonzero(as_tuple=True)  # (N,) rays entering the bounding sphere
    root = disc[b, p].sqrt()
    t, t_exit = (-half_b[b, p] - root) / a[b, p], (-half_b[b, p] + root) / a[b, p]
    o_b, d_bp, scale = o[b], d[b, p], s["size"].amin(-1)[b]  # object distance * smallest scale <= metres
    live = torch.arange(len(b))
    for _ in range(TRACE_STEPS // 8):  # every 8 steps, stop tracing rays that converged or left the sphere
        o_l, d_l, sc, t_l = o_b[live], d_bp[live], scale[live], t[live]
        for _ in range(8):
            dist = SHAPES[shape](o_l + t_l[:, None] * d_l) * sc
            t_l = t_l + dist
        t[live] = t_l
        live = live[(dist > 1e-3) & (t_l < t_exit[live])]
    local = o_b + t[:, None] * d_bp  # (N, 3)
    hit = SHAPES[shape](local) * scale < 1e-2
    b, p, t, local = b[hit], p[hit], t[hit], local[hit]
    t_obj = torch.full(disc.shape, torch.inf).index_put((b, p), t)

    dc = dot(rays[:, None], s["clutter"][:, None])  # (B, P, K)
    t_balls = dc - (dc ** 2 - dot(s["clutter"], s["clutter"])[:, None] + s["clutter_radius"][:, None] ** 2).sqrt()
    t_balls, ball = t_balls.nan_to_num(torch.inf).min(-1)  # (B, P)
    t_wall = s["wall"] / dot(rays, s["wall_normal"][:, None])
    t, which = torch.stack([t_obj, t_balls, t_wall], -1).min(-1)  # which: 0 object, 1 clutter, 2 wall
    point = t[..., None] * rays  # (B, P, 3)

    ball_centre = s["clutter"].gather(1, ball[..., None].expand(-1, -1, 3))
    normal = torch.where((which == 1)[..., None], point - ball_centre, -s["wall_normal"][:, None])
    tetra = torch.tensor([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]], dtype=torch.float32)
    grad = sum(e * SHAPES[shape](local + 1e-3 * e)[:, None] for e in tetra) / s["size"][b]
    normal = F.normalize(normal.index_put((b, p), matvec(s["pose"][b], grad)), dim=-1)

    f, ph = s["wall_pattern"][:, None, :2], s["wall_pattern"][:, None, 2:]
    mix = 0.5 + 0.5 * torch.sin(f * point[..., :2] + ph).prod(-1, keepdim=True)
    albedo = s["wall_rgb"][:, None, 0] * mix + s["wall_rgb"][:, None, 1] * (1 - mix)
    albedo = torch.where((which == 1)[..., None], s["clutter_rgb"].gather(1, ball[..., None].expand(-1, -1, 3)), albedo)
    freq, phase = s["stripes"][b, :1], s["stripes"][b, 1:]
    albedo = albedo.index_put((b, p), s["albedo"][b] * (0.8 + 0.2 * torch.sin(2 * np.pi * freq * local[:, 1:2] + phase)))
    diffuse = dot(normal, s["light"][:, None])[..., None].clamp(min=0)
    rgb = albedo * (s["ambient"][:, None] + diffuse * s["light_rgb"][:, None])
    return rearrange(rgb, "b (h w) c -> b h w c", h=size), rearrange(t * rays[:, 2], "b (h w) -> b h w", h=size)


def render_scenes(w, sizes, k, scenes, noise_rngs):
    """Rendered RGB (B, H, W, 3) with sensor noise (the scene's level, per-sample noise streams) and depth."""
    rgb, depth = render(w.names[k], stack(scenes), sizes["image_size"])
    noise = np.stack([r.normal(0, s["noise"][0], rgb.shape[1:]) for r, s in zip(noise_rngs, scenes)])
    return (rgb.numpy() + noise).clip(0, 1).astype(np.float32), depth.numpy()


def surface_points(shape, s, rngs, n):
    """n points on each posed, stretched surface (B, n, 6: xyz in m, unit normals): uniform draws in
    the object's frame pulled onto the surface by Newton steps along the distance gradient."""
    p = torch.as_tensor(np.stack([r.uniform(-0.7, 0.7, (2 * n, 3)) for r in rngs]), dtype=torch.float32)
    eye = 1e-3 * torch.eye(3)
    for _ in range(6):
        d = SHAPES[shape](p)[..., None]
        grad = F.normalize(torch.stack([SHAPES[shape](p + e) - SHAPES[shape](p - e) for e in eye], -1), dim=-1)
        p = p - d * grad
    best = SHAPES[shape](p).abs().argsort(-1)[:, :n, None]  # the n closest to the surface
    p, grad = p.gather(1, best.expand(-1, -1, 3)), grad.gather(1, best.expand(-1, -1, 3))
    xyz = matvec(s["pose"][:, None], p * s["size"][:, None]) + s["centre"][:, None]
    normal = matvec(s["pose"][:, None], F.normalize(grad / s["size"][:, None], dim=-1))
    return torch.cat([xyz, normal], -1)


# ----------------------------------------------------------------------------------------------
# 4. Raw generators: (world, sizes, per-sample rngs, concept k) -> (raw signals, raw anchor RGB or None)
#    A sample with an anchor image draws its scene first from its stream, and the anchor renders
#    that scene: the anchor shows the sample's own instance (pose, size, colour, background).
# ----------------------------------------------------------------------------------------------

def gen_image(w, sizes, rngs, k):
    """Renders of the object in its scene, no anchor (the image-text set is the anchor's own data)."""
    return list(render_scenes(w, sizes, k, [scene(w, k, r) for r in rngs], rngs)[0]), None


def gen_depth(w, sizes, rngs, k):
    """Depth in metres with 1% multiplicative noise and 2% missing pixels (0), and its RGB view."""
    rgb, depth = render_scenes(w, sizes, k, [scene(w, k, r) for r in rngs], rngs)
    noisy = [z * r.normal(1, 0.01, z.shape) * (r.uniform(size=z.shape) > 0.02) for r, z in zip(rngs, depth)]
    return noisy, list(rgb)


def gen_point(w, sizes, rngs, k):
    """Surface points (+ normals) with 1 cm noise, and a render of the same posed object."""
    scenes = [scene(w, k, r) for r in rngs]
    pts = surface_points(w.names[k], stack(scenes), rngs, sizes["points"]).numpy()
    pts[..., :3] += np.stack([r.normal(0, 0.01, (sizes["points"], 3)) for r in rngs])
    return list(pts[..., :sizes["point_channels"]]), list(render_scenes(w, sizes, k, scenes, rngs)[0])


def gen_video(w, sizes, rngs, k):
    """T frames, 0.15 s apart, of the object moving with its concept's motion; the anchor is the middle frame."""
    frames = []
    for r in rngs:
        s = scene(w, k, r)
        angle, _, position, _ = w.motion(k, r.uniform(0, 2) + 0.15 * np.arange(sizes["frames"]), r)
        spin = rotation(w.spin_axis[k], angle - angle[sizes["frames"] // 2])  # (T, 3, 3); the middle frame is posed as an image
        frames += [dict(s, pose=s["pose"] @ spin[f], centre=s["centre"] + position[f]) for f in range(sizes["frames"])]
    rgb = render_scenes(w, sizes, k, frames, [r for r in rngs for _ in range(sizes["frames"])])[0]
    video = rearrange(rgb, "(b t) h w c -> b t h w c", t=sizes["frames"])
    return list(video), [v[sizes["frames"] // 2] for v in video]


def gen_audio(w, sizes, rngs, k):
    """The sound of the instance its anchor image shows (the render of the sample's own scene): the
    concept's tone pitched by the object's size (twice the size, an octave lower; +-1 semitone of
    jitter), stretched partials, odd-only or all, pulsing at the concept's rhythm (random onset,
    +-7% tempo), as loud as the object is near, over white noise."""
    n = round(sizes["audio_seconds"] * SAMPLE_RATE)
    t, m = (np.arange(n) / SAMPLE_RATE).astype(np.float32), np.arange(1, 9)
    scenes = [scene(w, k, r) for r in rngs]
    waves = []
    for r, s in zip(rngs, scenes):
        freqs = w.f0[k] / s["size"].mean() * 2 ** (r.uniform(-1, 1) / 12) * m ** w.stretch[k]
        amps = m ** -r.uniform(0.5, 1.2) * ((m % 2 == 1) | ~w.odd_only[k]) * (freqs < 0.45 * SAMPLE_RATE)
        phase = (2 * np.pi * freqs[:, None]).astype(np.float32) * t + r.uniform(0, 2 * np.pi, (8, 1)).astype(np.float32)
        tone = amps @ np.sin(phase)  # float32 sines: 10x faster than float64
        pulse = (0.5 + 0.5 * np.cos(2 * np.pi * (w.pulse_rate[k] * r.uniform(0.93, 1.07) * t + r.uniform()))) ** 2
        noise = r.normal(0, 10 ** r.uniform(-2.0, -0.7), n)
        level = 10 ** r.uniform(-1.2, -0.6) * (2.2 / s["centre"][2]) ** 2
        waves.append((level * (tone * pulse / amps.sum() + noise)).astype(np.float32))
    return waves, list(render_scenes(w, sizes, k, scenes, rngs)[0])


def gen_tactile(w, sizes, rngs, k):
    """A GelSight-like patch: the concept's texture (rotated +-0.4 rad, frequency +-10%, random phase)
    pressed in a random contact region, lit from three coloured directions at a random angle."""
    size = sizes["image_size"]
    v = (np.arange(size) + 0.5) / size - 0.5
    x, y = np.meshgrid(v, v)
    patches = []
    for r in rngs:
        angle, freq = w.texture_angle[k] + r.uniform(-0.4, 0.4), 2 * np.pi * w.texture_freq[k] * r.uniform(0.9, 1.1)
        u, v_ = x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)
        height = TEXTURES[w.texture[k]](freq * u + r.uniform(0, 2 * np.pi), freq * v_ + r.uniform(0, 2 * np.pi))
        centre, radius = r.uniform(-0.2, 0.2, 2), r.uniform(0.25, 0.5)
        contact = np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * radius ** 2))
        gy, gx = np.gradient(r.uniform(0.4, 1.0) * contact * (height + 2.0), 1.0 / size)
        lights = r.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3
        shade = gx[..., None] * np.cos(lights) + gy[..., None] * np.sin(lights)  # (H, W, 3)
        rgb = r.uniform(0.3, 0.6, 3) + 0.02 * r.uniform(0.5, 1.5) * shade + r.normal(0, 0.02, shade.shape)
        patches.append(rgb.clip(0, 1).astype(np.float32))
    return patches, None


def gen_imu(w, sizes, rngs, k):
    """Accelerometer (specific force, m/s^2) and gyroscope (rad/s) at 50 Hz, (6, T), of the concept's
    motion, from a sensor mounted +-0.4 rad off the body axes, with tempo jitter, noise and gyro bias."""
    series = []
    for r in rngs:
        t = r.uniform(0, 4) + np.arange(sizes["imu_length"]) / 50.0 * r.uniform(0.95, 1.05)
        angle, rate, _, acc = w.motion(k, t, r)
        body = euler(*r.uniform(-np.pi, np.pi, 3)) @ rotation(w.spin_axis[k], angle)  # (T, 3, 3) body -> world
        mount = euler(*r.uniform(-0.4, 0.4, 3))
        force = einsum(body @ mount, acc + [0, 9.81, 0], "t i j, t i -> t j")  # world -> sensor frame
        gyro = rate[:, None] * (mount.T @ w.spin_axis[k]) + r.normal(0, 0.05, 3)
        series.append(np.concatenate([force + r.normal(0, 0.3, force.shape), gyro + r.normal(0, 0.1, gyro.shape)], 1).T)
    return series, None


def gen_eeg(w, sizes, rngs, k):
    """(C, T) at 128 Hz: one burst of the concept's frequency (+-6%) with its dipole topography, at a
    random time and width, over pink noise per channel plus a common-mode drift."""
    c, n = sizes["eeg_channels"], sizes["eeg_length"]
    t = np.arange(n) / 128.0
    freqs = np.fft.rfftfreq(n, 1 / 128.0)
    pink = 1 / np.sqrt(np.maximum(freqs, 1.0))
    records = []
    for r in rngs:
        topo = w.topography(k, c) + r.normal(0, 0.15, c)
        centre, width = r.uniform(0.25, 0.75) * n / 128.0, r.uniform(0.08, 0.2)
        burst = np.exp(-0.5 * ((t - centre) / width) ** 2) * np.sin(2 * np.pi * w.eeg_freq[k] * r.uniform(0.94, 1.06) * t
                                                                       + r.uniform(0, 2 * np.pi))
        noise = np.fft.irfft(np.fft.rfft(r.normal(size=(c + 1, n)), axis=1) * pink, n, axis=1)
        records.append(r.uniform(1.5, 3.0) * topo[:, None] * burst + noise[:c] + r.uniform(0, 1.5) * noise[c:])
    return records, None
