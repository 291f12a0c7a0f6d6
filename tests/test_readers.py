"""Tests for readers.py, through manifest.ManifestDataset: every file format of a modality gives the same
input, and a broken file is named with the reason."""

import json
import struct
import wave

import numpy as np
import pytest
import torch
from PIL import Image

import readers
from manifest import ManifestDataset, SampleError


# ---------- helpers writing files the tests read back ----------

def write_wav(path, x, rate, bits=16, float_format=False, extensible=False):
    """(T, channels) float in [-1, 1] -> WAV; integer PCM through `wave`, IEEE float as raw RIFF chunks
    (with `extensible`, in a WAVE_FORMAT_EXTENSIBLE fmt chunk whose sub-format GUID starts with tag 3)."""
    channels = x.shape[1]
    if float_format:
        raw = x.astype("<f4").tobytes()
        fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else 3, channels, rate, rate * channels * 4, channels * 4, 32)
        if extensible:
            fmt += struct.pack("<HHI", 22, 32, 0) + struct.pack("<H", 3) + bytes(14)
        body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(raw)) + raw
        path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
        return
    scale = 2.0 ** (bits - 1) - 1
    ints = np.round(x * scale).astype(np.int64).reshape(-1)
    if bits == 8:
        raw = (ints + 128).astype(np.uint8).tobytes()
    elif bits == 24:
        raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints)
    else:
        raw = ints.astype(f"<i{bits // 8}").tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(bits // 8)
        w.setframerate(rate)
        w.writeframes(raw)


def sine(rate, seconds=1.0, freq=440.0, amplitude=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t))[:, None]


def write_manifest(tmp_path, rows, name="set.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def write_ply(path, pts, binary):
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0", f"element vertex {len(pts)}",
              "property float x", "property float y", "property float z", "element face 0",
              "property list uchar int vertex_indices", "end_header"]
    head = ("\n".join(header) + "\n").encode()
    if binary:
        path.write_bytes(head + pts.astype("<f4").tobytes())
    else:
        path.write_bytes(head + "\n".join(" ".join(f"{v:.7g}" for v in p) for p in pts).encode() + b"\n")


def test_same_sine_in_every_wav_encoding_gives_the_same_log_mel(tmp_path):
    variants = {"pcm16.wav": dict(rate=16000, bits=16), "pcm8.wav": dict(rate=16000, bits=8),
                "pcm24.wav": dict(rate=16000, bits=24), "pcm32.wav": dict(rate=16000, bits=32),
                "float32.wav": dict(rate=16000, float_format=True), "cd.wav": dict(rate=44100, bits=16),
                "extensible.wav": dict(rate=22050, float_format=True, extensible=True)}
    for name, kw in variants.items():
        write_wav(tmp_path / name, sine(kw["rate"]), **kw)
    write_wav(tmp_path / "stereo.wav", np.repeat(sine(16000), 2, axis=1), 16000)
    names = [*variants, "stereo.wav"]
    ds = ManifestDataset(write_manifest(tmp_path, [{"modality": "audio", "path": n, "label": "tone"} for n in names]),
                              audio_seconds=1.5)
    mels = {n: ds[k]["input"] for k, n in enumerate(names)}
    ref = mels["pcm16.wav"]
    for n, m in mels.items():
        assert m.shape == (1, 128, 148) and torch.isfinite(m).all(), n
        if n != "pcm8.wav":
            assert (m - ref).abs().max() < 0.01, n
    loud = ref > 0.5  # 8-bit quantisation noise (-48 dB) lifts the quiet bins
    assert (mels["pcm8.wav"] - ref)[loud].abs().max() < 0.01


def test_image_formats_sizes_and_modes_agree(tmp_path):
    yy, xx = np.mgrid[0:30, 0:45]
    rgb = np.stack([xx * 5, yy * 8, (xx + yy) * 3], axis=-1).astype(np.uint8)  # smooth, so JPEG keeps it
    for name in ("a.png", "a.bmp", "a.webp"):
        Image.fromarray(rgb).save(tmp_path / name, **({"lossless": True} if name.endswith("webp") else {}))
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=98)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "grey.png")
    files = ["a.png", "a.bmp", "a.webp", "a.jpg", "rgba.png", "grey.png"]
    ds = ManifestDataset(write_manifest(tmp_path, [{"modality": "image", "path": f, "text": "noise"} for f in files]),
                              image_size=16)
    images = [ds[k]["input"] for k in range(len(files))]
    assert all(x.shape == (3, 16, 16) for x in images)
    for k in (1, 2, 4):
        assert torch.allclose(images[k], images[0], atol=1e-5), files[k]
    assert (images[3] - images[0]).abs().mean() < 0.05  # JPEG is lossy


def test_wav_problems_are_named(tmp_path):
    write_wav(tmp_path / "ok.wav", sine(16000), 16000)
    blob = (tmp_path / "ok.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "fake.wav").write_bytes(b"this is not audio at all")
    path = write_manifest(tmp_path, [{"modality": "audio", "path": n, "text": "a tone"} for n in ("ok.wav", "cut.wav", "fake.wav")])
    ds = ManifestDataset(path, audio_seconds=1.0)
    with pytest.raises(SampleError, match=r"set\.jsonl: line 2: cut\.wav: truncated"):
        ds[1]
    with pytest.raises(SampleError, match=r"set\.jsonl: line 3: fake\.wav: not a WAV file: RIFF header missing"):
        ds[2]


def test_point_cloud_formats_agree(tmp_path):
    pts = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32)
    write_ply(tmp_path / "a.ply", pts, binary=False)
    write_ply(tmp_path / "b.ply", pts, binary=True)
    np.save(tmp_path / "c.npy", pts)
    np.savetxt(tmp_path / "d.txt", pts, delimiter=",", fmt="%.7g")
    np.savetxt(tmp_path / "e.xyz", pts, fmt="%.7g")
    (tmp_path / "f.off").write_text("OFF\n300 0 0\n" + "\n".join(" ".join(f"{v:.7g}" for v in p) for p in pts))
    files = ["a.ply", "b.ply", "c.npy", "d.txt", "e.xyz", "f.off"]
    ds = ManifestDataset(write_manifest(tmp_path, [{"modality": "point", "path": f, "label": "blob"} for f in files]),
                              points=128)
    ref = ds[0]["input"]
    assert ref.shape == (128, 3)
    for k in range(1, len(files)):
        assert torch.allclose(ds[k]["input"], ref, atol=1e-5), files[k]


def test_video_sources_agree_in_shape(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (6, 24, 30, 3), dtype=np.uint8)
    np.save(tmp_path / "clip.npy", frames)
    (tmp_path / "frames").mkdir()
    for k, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / "frames" / f"{k:03d}.png")
    images = [Image.fromarray(f) for f in frames]
    images[0].save(tmp_path / "clip.gif", save_all=True, append_images=images[1:], duration=40)
    ds = ManifestDataset(write_manifest(tmp_path, [{"modality": "video", "path": p, "label": "noise"}
                                                       for p in ("clip.npy", "frames", "clip.gif")]),
                              image_size=16, frames=4)
    videos = [ds[k]["input"] for k in range(3)]
    assert all(v.shape == (4, 3, 16, 16) for v in videos)
    assert torch.allclose(videos[0], videos[1], atol=1e-5)  # lossless PNG frames


def test_depth_png_millimetres_equals_npy_metres(tmp_path):
    depth_mm = np.random.default_rng(0).integers(500, 5000, (20, 28)).astype(np.uint16)
    Image.fromarray(depth_mm).save(tmp_path / "d.png")
    np.save(tmp_path / "d.npy", depth_mm / 1000.0)
    ds = ManifestDataset(write_manifest(tmp_path, [{"modality": "depth", "path": p, "label": "room"}
                                                       for p in ("d.png", "d.npy")]), image_size=16)
    a, b = ds[0]["input"], ds[1]["input"]
    assert a.shape == (1, 16, 16) and torch.allclose(a, b, atol=1e-4)


def sunrgbd_layout(depth_mm):
    """Millimetres -> SUN RGB-D's stored 16-bit values: rotated left by 3, the inverse of its toolbox's read."""
    v = depth_mm.astype(np.uint32)
    return (((v << 3) | (v >> 13)) & 0xFFFF).astype(np.uint16)


def test_sunrgbd_depth_png_is_rotated_back_into_millimetres(tmp_path):
    depth_mm = np.random.default_rng(1).integers(500, 9500, (20, 28)).astype(np.uint16)  # some beyond 8.192 m
    depth_mm[0, 0] = 0  # missing stays missing
    Image.fromarray(sunrgbd_layout(depth_mm)).save(tmp_path / "sun.png")
    assert Image.open(tmp_path / "sun.png").mode.startswith("I;16")
    assert np.array_equal(readers.read_depth_metres(tmp_path / "sun.png", "sunrgbd"), depth_mm / 1000.0)
    as_mm, metres = readers.read_depth_metres(tmp_path / "sun.png"), depth_mm / 1000.0  # read as millimetres
    near, far = depth_mm < 8192, depth_mm >= 8192
    assert far.any() and np.allclose(as_mm[near], 8 * metres[near])  # 8x too deep below 8.192 m ...
    assert np.allclose(as_mm[far], 8 * metres[far] - 65.535)  # ... and wrapped around (mod 65.536 m) beyond
    np.save(tmp_path / "d.npy", depth_mm / 1000.0)
    manifest = write_manifest(tmp_path, [{"modality": "depth", "path": p, "label": "room"} for p in ("sun.png", "d.npy")])
    sun = ManifestDataset(manifest, image_size=16, depth_format="sunrgbd")
    assert torch.allclose(sun[0]["input"], sun[1]["input"], atol=1e-4)  # as the same depth in metres
    plain = ManifestDataset(manifest, image_size=16)
    assert not torch.allclose(plain[0]["input"], plain[1]["input"], atol=1e-2)  # standardisation does not hide it
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(tmp_path / "eight.png")
    with pytest.raises(ValueError, match="16-bit"):
        readers.read_depth_metres(tmp_path / "eight.png", "sunrgbd")
    with pytest.raises(ValueError, match="depth PNG format"):
        readers.read_depth_metres(tmp_path / "sun.png", "nyu")


def test_series_layout_by_channel_count_and_nan_row(tmp_path):
    x = np.random.default_rng(0).normal(size=(300, 6))
    (tmp_path / "t.csv").write_text("ax,ay,az,gx,gy,gz\n" + "\n".join(",".join(f"{v:.9g}" for v in r) for r in x))
    np.save(tmp_path / "c.npy", x.T)
    bad = x.copy()
    bad[4, 2] = np.nan
    (tmp_path / "nan.csv").write_text("a,b,c,d,e,f\n" + "\n".join(",".join(f"{v:.9g}" for v in r) for r in bad))
    ds = ManifestDataset(write_manifest(tmp_path, [{"modality": "imu", "path": p, "label": "walk"}
                                                       for p in ("t.csv", "c.npy", "nan.csv")]), imu_length=256)
    assert ds[0]["input"].shape == (6, 256)
    assert torch.allclose(ds[0]["input"], ds[1]["input"], atol=1e-5)
    with pytest.raises(SampleError, match=r"line 3: nan\.csv: NaN at row 5"):
        ds[2]


def test_labels_become_prompts_and_class_indices(tmp_path):
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(tmp_path / name)
    np.save(tmp_path / "p.npy", np.ones(5, dtype=np.float32))
    rows = [{"modality": "tactile", "path": "a.png", "label": "wood", "anchor_image": "b.png", "prior": "p.npy",
             "split": "train"},
            {"modality": "tactile", "path": "b.png", "label": "cloth", "split": "train"},
            {"modality": "tactile", "path": "a.png", "text": "rough bark", "split": "test"}]
    ds = ManifestDataset(write_manifest(tmp_path, rows), split="train", image_size=16)
    assert len(ds) == 2 and ds.modality == "tactile" and ds.class_names == ["cloth", "wood"]
    first = ds[0]
    assert first["label"] == 1 and "wood" in first["text"] and first["anchor_image"].shape == (3, 16, 16)
    assert first["prior"].shape == (5,) and ds[1]["prior"] is None
    test = ManifestDataset(write_manifest(tmp_path, rows), split="test", image_size=16)
    assert test[0]["label"] == -1 and test[0]["text"] == "rough bark"


# ---------- odd files ----------

def test_a_thin_strip_is_cropped_before_it_is_resized(monkeypatch):
    """Memory of the order of the output: a 1 x 1500 strip is not first stretched to 224 x 336,000."""
    import preprocess
    sizes, interpolate = [], preprocess.F.interpolate
    monkeypatch.setattr(preprocess.F, "interpolate", lambda x, **kw: sizes.append(kw["size"]) or interpolate(x, **kw))
    out = preprocess.normalize_image(np.full((1, 1500, 3), 128, np.uint8), 224)
    assert out.shape == (3, 224, 224)
    assert sizes and max(h * w for h, w in sizes) <= 8 * 224 * 224  # it was 224 x 336,000


def test_a_16_bit_grey_png_keeps_its_range(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")
    rgb = np.asarray(readers.read_image(tmp_path / "grey16.png"))
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb[..., 0])) > 200  # not saturated at 255
    assert np.all(np.diff(rgb[..., 0].reshape(-1).astype(int)) >= 0)  # the ramp still rises


def test_a_wav_without_samples_is_refused(tmp_path):
    write_wav(tmp_path / "empty.wav", np.zeros((0, 1)), 16000)
    with pytest.raises(ValueError, match="0 samples"):
        readers.read_wav(tmp_path / "empty.wav")


@pytest.mark.parametrize("text, message", [
    ("OFF\n4 0 0\n0 0 0\n1 0 0\n0 1 0\n", "header says 4 vertices and 0 faces, the file has 3 data lines"),
    ("OFF\n0 0 0\n1 0 0\n0 1 0\n", "header says 0 vertices"),
    ("OFF\n", "counts are missing"),
    ("OFF\n2 1 0\n0 0 0\n1 0 0\n", "header says 2 vertices and 1 faces, the file has 2 data lines"),
    ("OFF\n3 1 0\n0 0 0\n1 0 0\n3 0 1 2\n0 1 0\n", "vertex 2 has 4 values"),
])
def test_off_header_counts_are_checked_against_the_data(tmp_path, text, message):
    (tmp_path / "m.off").write_text(text)
    with pytest.raises(ValueError, match=message):
        readers.read_off(tmp_path / "m.off")


def test_off_faces_are_not_read_as_vertices(tmp_path):
    (tmp_path / "m.off").write_text("OFF3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n")  # counts on the OFF line, as ModelNet
    assert readers.read_off(tmp_path / "m.off").tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 0]]


def test_a_square_csv_keeps_rows_as_time_and_a_square_npy_is_channels_first(tmp_path):
    x = np.arange(36, dtype=np.float64).reshape(6, 6)  # as many time steps as channels
    (tmp_path / "s.csv").write_text("a,b,c,d,e,f\n" + "\n".join(",".join(str(v) for v in row) for row in x))
    np.save(tmp_path / "s.npy", x)
    assert np.array_equal(readers.read_series(tmp_path / "s.csv", 6), x.T)  # (channels, time)
    assert np.array_equal(readers.read_series(tmp_path / "s.npy", 6), x)
    (tmp_path / "wide.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="CSV has 3 columns, 6 channels configured"):
        readers.read_series(tmp_path / "wide.csv", 6)
