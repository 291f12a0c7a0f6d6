"""Data: shared preprocessing, the real-data manifest reader, and mixed-dataset batching.

Top to bottom:
1. preprocessing used by both the real-data readers and the synthetic world (`world.py`), so a
   synthetic sample and a real one of the same modality have the same layout and scale;
2. prompt templates per modality (a label becomes a caption, METHOD.md section 4);
3. readers for the file formats of METHOD.md section 6 (Pillow, numpy and the stdlib only);
4. `ManifestDataset` over a JSON Lines manifest (section 6);
5. `MixedBatchSampler`, `MixedDataset` and `collate` for batches that mix datasets (section 3).
"""

import json
import math
import struct
import warnings
import wave
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageSequence

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SAMPLE_RATE = 16_000
WINDOW, HOP, N_FFT, N_MELS = 400, 160, 400, 128  # 25 ms Hann window, 10 ms hop, 128 mel bins
AUDIO_MEAN, AUDIO_STD = -4.2677393, 4.5689974  # AST's AudioSet log-mel statistics (used as (x - mean) / (2 std))
LOG_FLOOR = 1e-6  # just above the quantisation noise of 16-bit audio in one mel band


# ----------------------------------------------------------------------------------------------
# 1. Preprocessing shared with world.py
# ----------------------------------------------------------------------------------------------

def resize_center_crop(x, size):
    """(C, H, W) float tensor -> (C, size, size): shortest side to `size` (bicubic, antialiased), centre crop.

    CLIP's recipe. Torch's antialiased bicubic stands in for Pillow's, so uint8 and float inputs
    (real files, synthetic renders) share one path.
    """
    h, w = x.shape[-2:]
    if min(h, w) != size:
        scale = size / min(h, w)
        new_hw = (max(size, round(h * scale)), max(size, round(w * scale)))
        x = F.interpolate(x[None], size=new_hw, mode="bicubic", antialias=True, align_corners=False)[0]
        h, w = new_hw
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, top:top + size, left:left + size]


def normalize_image(img, size):
    """RGB image -> (3, size, size) float32, CLIP-normalised (OpenAI mean/std).

    `img`: PIL image, or an H x W x 3 uint8 array/tensor (0..255), or a float one (0..1).
    """
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    x = torch.as_tensor(np.array(img))  # a copy: Pillow and np.load arrays may be read-only
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    x = resize_center_crop(rearrange(x, "h w c -> c h w"), size).clamp(0.0, 1.0)
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    return ((x - mean[:, None, None]) / std[:, None, None]).contiguous()


def mel_filter_bank(n_mels=N_MELS, n_fft=N_FFT, sample_rate=SAMPLE_RATE):
    """(n_mels, n_fft // 2 + 1) triangular filters, equally spaced on the Slaney mel scale, 0 Hz to Nyquist.

    Slaney scale (linear below 1 kHz, logarithmic above; librosa's default), peak-1 triangles
    without area normalisation. Every one of the 128 filters covers at least one of the 201 FFT
    bins of n_fft = 400, which the HTK scale does not guarantee at low frequencies.
    """
    f_lin, mel_lin = 1000.0, 15.0  # 3 mel per 200 Hz up to 1 kHz
    log_step = math.log(6.4) / 27.0

    def hz_to_mel(f):
        return torch.where(f < f_lin, 3.0 * f / 200.0, mel_lin + torch.log(f.clamp(min=1e-9) / f_lin) / log_step)

    def mel_to_hz(m):
        return torch.where(m < mel_lin, 200.0 * m / 3.0, f_lin * torch.exp(log_step * (m - mel_lin)))

    top = hz_to_mel(torch.tensor(sample_rate / 2.0, dtype=torch.float64))
    edges = mel_to_hz(torch.linspace(0.0, float(top), n_mels + 2, dtype=torch.float64))  # (n_mels + 2,)
    bins = torch.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1, dtype=torch.float64)  # (n_freq,)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return torch.minimum(rising, falling).clamp(min=0.0).float()


MEL_FILTERS = mel_filter_bank()


def log_mel(waveform, seconds):
    """16 kHz mono waveform (T,) -> normalised log-mel spectrogram (1, 128, F).

    Cropped (from the start) or zero-padded to `seconds`, so F depends only on the duration
    (98 frames for 1 s: no centre padding). Power spectrum of a 400-sample Hann window with a
    160-sample hop; log with a floor; AST's normalisation constants.
    """
    x = torch.as_tensor(waveform, dtype=torch.float32).flatten()
    n = round(seconds * SAMPLE_RATE)
    x = x[:n] - x[:n].mean() if len(x) else x
    x = F.pad(x, (0, n - len(x)))
    spec = torch.stft(x, N_FFT, hop_length=HOP, win_length=WINDOW, window=torch.hann_window(WINDOW),
                      center=False, return_complex=True)  # (n_freq, F)
    mel = MEL_FILTERS @ spec.abs().pow(2)  # (128, F)
    x = (mel.clamp(min=LOG_FLOOR).log() - AUDIO_MEAN) / (2.0 * AUDIO_STD)
    return rearrange(x, "m f -> 1 m f")


def normalize_points(arr, n, seed=0):
    """(N, C >= 3) points -> (n, C) float32: xyz centred on the mean, scaled into the unit sphere.

    Extra channels (rgb, normals) are kept unchanged. Resampling is deterministic per `seed`:
    n of the N points without replacement, or all N plus n - N repeats drawn with replacement.
    """
    pts = np.asarray(arr, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] < 3:
        raise ValueError(f"expected an (N, 3+) point array, got shape {pts.shape}")
    if len(pts) == 0:
        raise ValueError("point cloud has 0 points")
    if not np.isfinite(pts).all():
        raise ValueError(f"point cloud has a NaN or inf at row {int(np.nonzero(~np.isfinite(pts).all(1))[0][0])}")
    rng = np.random.default_rng(seed)
    if len(pts) >= n:
        keep = np.sort(rng.choice(len(pts), n, replace=False))
    else:
        keep = np.concatenate([np.arange(len(pts)), rng.choice(len(pts), n - len(pts), replace=True)])
    pts = pts[keep].copy()
    pts[:, :3] -= pts[:, :3].mean(0)
    radius = np.linalg.norm(pts[:, :3], axis=1).max()
    pts[:, :3] /= max(radius, 1e-12)
    return torch.from_numpy(pts).float()


def disparity(depth_m, min_depth=0.1):
    """Depth in metres (H, W) -> disparity (1, H, W), standardised per sample (zero mean, unit std).

    Disparity is 1 / max(depth, min_depth); missing depth (<= 0, NaN, inf) becomes 0 disparity,
    i.e. infinitely far. Per-sample standardisation keeps the scale of every depth camera alike.
    """
    d = torch.as_tensor(np.asarray(depth_m, dtype=np.float32))
    if d.ndim != 2:
        raise ValueError(f"expected an (H, W) depth map, got shape {tuple(d.shape)}")
    valid = torch.isfinite(d) & (d > 0)
    disp = torch.where(valid, 1.0 / d.clamp(min=min_depth).nan_to_num(posinf=1.0), torch.zeros_like(d))
    disp = (disp - disp.mean()) / (disp.std(unbiased=False) + 1e-6)
    return rearrange(disp, "h w -> 1 h w")


def normalize_series(arr, channels, length):
    """Multichannel time series (C, T) or (T, C) -> (channels, length) float32 for imu and eeg.

    The layout is decided by the configured channel count: (C, T) when the first axis has
    `channels` entries, otherwise (T, C) when the second does (so a square array reads as
    (C, T)). Cropped from the start or zero-padded to `length`, after each channel is
    standardised over time, so that units (g or m/s^2, volts or microvolts) do not matter.
    """
    x = torch.as_tensor(np.asarray(arr, dtype=np.float32))
    if x.ndim != 2 or channels not in x.shape:
        raise ValueError(f"expected a ({channels}, T) or (T, {channels}) series, got shape {tuple(x.shape)}")
    if x.shape[0] != channels:
        x = rearrange(x, "t c -> c t")
    x = (x - x.mean(1, keepdim=True)) / (x.std(1, unbiased=False, keepdim=True) + 1e-6)
    return F.pad(x[:, :length], (0, max(0, length - x.shape[1])))


# ----------------------------------------------------------------------------------------------
# 2. Prompt templates ({} = class name)
# ----------------------------------------------------------------------------------------------

PROMPTS = {
    "image": ["a photo of a {}.", "a picture of a {}.", "an image of a {}."],
    "video": ["a video of a {}.", "a clip of a {}.", "footage of a {}."],
    "audio": ["the sound of a {}.", "a recording of a {}.", "audio of a {}."],
    "point": ["a point cloud of a {}.", "a 3D model of a {}.", "a 3D scan of a {}."],
    "depth": ["a depth map of a {}.", "a depth image of a {}.", "a depth photo of a {}."],
    "tactile": ["the touch of a {}.", "a tactile image of a {}.", "the feel of a {}."],
    "imu": ["the motion of a {}.", "inertial readings of a {}.", "movement data of a {}."],
    "eeg": ["brain activity while seeing a {}.", "an EEG recording of a {}.", "the neural response to a {}."],
}


# ----------------------------------------------------------------------------------------------
# 3. Readers: a file -> a raw array. They raise ValueError saying what is wrong with the file;
#    ManifestDataset adds the manifest, line and file to the message.
# ----------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif"}


def load_npy(path):
    """An .npy array, never unpickling (a pickled .npy is refused)."""
    return np.load(path, allow_pickle=False)


def first_nonfinite(arr):
    """A message naming the first NaN or inf row of an array, or None when all values are finite."""
    arr = np.asarray(arr, dtype=np.float64)
    bad = ~np.isfinite(arr)
    if not bad.any():
        return None
    where = np.argwhere(bad)[0]
    kind = "NaN" if np.isnan(arr[tuple(where)]) else "inf"
    return f"{kind} at {'row' if arr.ndim > 1 else 'index'} {int(where[0])} (counting from 0)"


def require_finite(arr):
    if (problem := first_nonfinite(arr)) is not None:
        raise ValueError(problem)
    return arr


def read_image(path):
    """Any image Pillow decodes -> RGB PIL image (palette, grey and alpha are converted)."""
    with Image.open(path) as img:
        return img.convert("RGB")


# WAV: `wave` reads integer PCM; IEEE float and WAVE_FORMAT_EXTENSIBLE headers, which `wave`
# refuses in Python 3.11, are read from the RIFF chunks directly.
WAVE_FORMAT_PCM, WAVE_FORMAT_FLOAT, WAVE_FORMAT_EXTENSIBLE = 1, 3, 0xFFFE


def read_riff_wav(path):
    """(format tag, channels, sample rate, bytes per sample, sample bytes) from the RIFF chunks of a WAV file."""
    blob = Path(path).read_bytes()
    if len(blob) < 12 or blob[:4] != b"RIFF" or blob[8:12] != b"WAVE":
        raise ValueError("not a WAV file: RIFF header missing")
    fmt, data, pos = None, None, 12
    while pos + 8 <= len(blob):
        chunk_id, size = blob[pos:pos + 4], struct.unpack("<I", blob[pos + 4:pos + 8])[0]
        body = blob[pos + 8:pos + 8 + size]
        if chunk_id == b"fmt ":
            if len(body) < 16:
                raise ValueError("truncated WAV file: fmt chunk too short")
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == WAVE_FORMAT_EXTENSIBLE:
                if len(body) < 26:
                    raise ValueError("truncated WAV file: extensible fmt chunk too short")
                tag = struct.unpack("<H", body[24:26])[0]  # first two bytes of the sub-format GUID
            fmt = (tag, channels, rate, bits // 8)
        elif chunk_id == b"data":
            if len(body) < size:
                raise ValueError(f"truncated WAV file: data chunk promises {size} bytes, found {len(body)}")
            data = body
            break
        pos += 8 + size + (size & 1)  # chunks are padded to an even size
    if fmt is None or data is None:
        raise ValueError(f"truncated WAV file: no {'fmt' if fmt is None else 'data'} chunk")
    return (*fmt, data)


def decode_samples(raw, tag, width, channels):
    """Interleaved sample bytes -> (T, channels) float64 in [-1, 1]."""
    if tag == WAVE_FORMAT_FLOAT and width in (4, 8):
        x = np.frombuffer(raw, dtype=f"<f{width}").astype(np.float64)
    elif tag == WAVE_FORMAT_PCM and width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    elif tag == WAVE_FORMAT_PCM and width in (2, 4):
        x = np.frombuffer(raw, dtype=f"<i{width}").astype(np.float64) / 2.0 ** (8 * width - 1)
    elif tag == WAVE_FORMAT_PCM and width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        x = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)).astype(np.float64)
        x = np.where(x >= 2 ** 23, x - 2 ** 24, x) / 2.0 ** 23
    else:
        raise ValueError(f"unsupported WAV encoding: format tag {tag}, {8 * width}-bit")
    return rearrange(x, "(t c) -> t c", c=channels)


def read_wav(path):
    """WAV file -> (mono float64 waveform (T,), sample rate). Channels are averaged."""
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw, tag = w.readframes(n), WAVE_FORMAT_PCM
    except wave.Error as err:
        if "unknown format" not in str(err):
            raise ValueError("not a WAV file: RIFF header missing" if "RIFF" in str(err) else f"bad WAV file: {err}")
        tag, channels, rate, width, raw = read_riff_wav(path)
        n = len(raw) // max(1, channels * width)
    except EOFError:
        raise ValueError("truncated WAV file: header incomplete") from None
    if channels < 1 or rate < 1:
        raise ValueError(f"bad WAV header: {channels} channels at {rate} Hz")
    if len(raw) < n * channels * width:
        raise ValueError(f"truncated WAV file: header promises {n} frames, found {len(raw) // (channels * width)}")
    x = decode_samples(raw[:n * channels * width], tag, width, channels)
    return require_finite(x.mean(1)), rate


def resample(x, rate, new_rate=SAMPLE_RATE):
    """FFT resampling (ideal low-pass): keep the spectrum below both Nyquist frequencies, then invert."""
    if rate == new_rate or len(x) == 0:
        return torch.as_tensor(x, dtype=torch.float32)
    x = torch.as_tensor(x, dtype=torch.float64)
    n_new = max(1, round(len(x) * new_rate / rate))
    spectrum = torch.fft.rfft(x)[: n_new // 2 + 1]
    return (torch.fft.irfft(spectrum, n=n_new) * (n_new / len(x))).float()


def read_audio(path, seconds):
    """WAV file -> 16 kHz mono waveform of at most `seconds` (cropped before resampling)."""
    x, rate = read_wav(path)
    return resample(x[: math.ceil(seconds * rate)], rate)


PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
             "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
             "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


def read_ply(path):
    """ASCII or binary PLY -> (N, C) columns x y z, then red green blue (in 0..1), then nx ny nz if present.

    Only the vertex element is read; it must come first (faces and other elements follow it).
    """
    blob = Path(path).read_bytes()
    end = blob.find(b"end_header")
    if not blob.startswith(b"ply") or end < 0:
        raise ValueError("not a PLY file: 'ply' magic or 'end_header' missing")
    header = blob[:end].decode("ascii", "replace").splitlines()
    body = blob[blob.index(b"\n", end) + 1:]
    fmt, count, props, element = None, None, [], None
    for line in header:
        words = line.split()
        if words[:1] == ["format"]:
            fmt = words[1]
        elif words[:1] == ["element"]:
            if element is None and words[1] != "vertex":
                raise ValueError(f"PLY element '{words[1]}' comes before 'vertex'; only vertex-first files are read")
            element = words[1]
            count = int(words[2]) if element == "vertex" else count
        elif words[:1] == ["property"] and element == "vertex":
            if words[1] == "list" or words[1] not in PLY_TYPES:
                raise ValueError(f"unsupported PLY vertex property: {' '.join(words[1:])}")
            props.append((words[2], PLY_TYPES[words[1]]))
    names = [name for name, _ in props]
    if count is None or not {"x", "y", "z"} <= set(names):
        raise ValueError("PLY file has no vertex element with x, y, z")
    if fmt == "ascii":
        rows = body.decode("ascii", "replace").split("\n")[:count]
        try:
            table = np.array([[float(v) for v in row.split()[: len(props)]] for row in rows], dtype=np.float64)
        except ValueError as err:
            raise ValueError(f"bad PLY vertex row: {err}") from None
        if count and table.shape != (count, len(props)):
            raise ValueError(f"truncated PLY file: {count} vertices of {len(props)} values expected")
        columns = {name: table[:, k] for k, name in enumerate(names)} if count else {n: np.zeros(0) for n in names}
    elif fmt in ("binary_little_endian", "binary_big_endian"):
        order = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(name, order + t) for name, t in props])
        if len(body) < count * dtype.itemsize:
            raise ValueError(f"truncated PLY file: {count} vertices of {dtype.itemsize} bytes expected")
        table = np.frombuffer(body[: count * dtype.itemsize], dtype=dtype)
        columns = {name: table[name].astype(np.float64) for name in names}
    else:
        raise ValueError(f"unsupported PLY format: {fmt}")
    colour_scale = 255.0 if dict(props).get("red") == "u1" else 1.0
    keep = [("x", 1.0), ("y", 1.0), ("z", 1.0)]
    keep += [(c, colour_scale) for c in ("red", "green", "blue") if c in columns]
    keep += [(c, 1.0) for c in ("nx", "ny", "nz") if c in columns]
    return np.stack([columns[name] / scale for name, scale in keep], axis=1)


def read_off(path):
    """OFF mesh -> (N, 3) vertices (faces are ignored). Accepts 'OFF' and the counts on one line."""
    words = [line.split("#")[0].split() for line in Path(path).read_text(errors="replace").splitlines()]
    tokens = [w for line in words for w in line]
    if not tokens or not tokens[0].startswith("OFF"):
        raise ValueError("not an OFF file: 'OFF' header missing")
    tokens = [tokens[0][3:]] + tokens[1:] if tokens[0] != "OFF" else tokens[1:]
    try:
        n = int(tokens[0])
        values = np.array(tokens[3: 3 + 3 * n], dtype=np.float64)
    except (IndexError, ValueError) as err:
        raise ValueError(f"bad OFF file: {err}") from None
    if len(values) != 3 * n:
        raise ValueError(f"truncated OFF file: {n} vertices expected")
    return values.reshape(n, 3)


def read_text_table(path, header=False):
    """Comma- or whitespace-separated numbers -> (rows, columns) float64; '#' starts a comment."""
    lines = Path(path).read_text(errors="replace").splitlines()[1 if header else 0:]
    rows = []
    for k, line in enumerate(lines, start=1):
        line = line.split("#")[0].replace(",", " ").strip()
        if not line:
            continue
        try:
            rows.append([float(v) for v in line.split()])
        except ValueError:
            raise ValueError(f"row {k} is not numeric: {line[:40]!r}") from None
        if len(rows[-1]) != len(rows[0]):
            raise ValueError(f"row {k} has {len(rows[-1])} values, the first row has {len(rows[0])}")
        if not all(math.isfinite(v) for v in rows[-1]):
            kind = "NaN" if any(map(math.isnan, rows[-1])) else "inf"
            raise ValueError(f"{kind} at row {k} (counting data rows from 1)")
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(rows[0]) if rows else 0)


def read_point_array(path):
    """Point cloud file (.npy, .npz, .txt, .xyz, .ply, .off) -> (N, C) float64 array."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        arr = load_npy(path)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            key = "points" if "points" in keys else keys[0] if len(keys) == 1 else None
            if key is None:
                raise ValueError(f".npz holds {keys}; name the point array 'points'")
            arr = archive[key]
    elif suffix in (".txt", ".xyz"):
        arr = read_text_table(path)
    elif suffix == ".ply":
        arr = read_ply(path)
    elif suffix == ".off":
        arr = read_off(path)
    else:
        raise ValueError(f"unknown point cloud format '{suffix}'")
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 2 or (len(arr) and arr.shape[1] < 3):
        raise ValueError(f"expected an (N, 3+) point array, got shape {arr.shape}")
    if len(arr) == 0:
        raise ValueError("point cloud has 0 points")
    return require_finite(arr)


def read_depth_metres(path):
    """Depth file -> (H, W) depth in metres. 16-bit PNG: millimetres; 8-bit PNG: raw values (scale is
    irrelevant after `disparity`'s standardisation); .npy: metres. 0 means missing."""
    if Path(path).suffix.lower() == ".npy":
        arr = np.squeeze(load_npy(path)).astype(np.float64)
    else:
        with Image.open(path) as img:
            if img.mode not in ("L", "I;16", "I;16B", "I;16L", "I"):
                raise ValueError(f"expected a single-channel 8- or 16-bit depth image, got mode {img.mode}")
            arr = np.asarray(img).astype(np.float64) / (1.0 if img.mode == "L" else 1000.0)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"expected an (H, W) depth map, got shape {arr.shape}")
    return arr


def uniform_indices(total, count):
    """`count` frame indices spread uniformly over `total` frames (the centre of each of `count` segments)."""
    if total < 1:
        raise ValueError("video has 0 frames")
    return [min(total - 1, int((k + 0.5) * total / count)) for k in range(count)]


def read_video_frames(path, count):
    """A folder of frames, an animated GIF/WebP, or a .npy (T, H, W, 3) -> `count` uniformly sampled frames."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return [read_image(files[k]) for k in uniform_indices(len(files), count)]
    if path.suffix.lower() == ".npy":
        arr = load_npy(path)
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"expected a (T, H, W, 3) video array, got shape {arr.shape}")
        return [require_finite(arr[k]) for k in uniform_indices(len(arr), count)]
    with Image.open(path) as img:
        wanted = uniform_indices(getattr(img, "n_frames", 1), count)
        frames = {k: f.convert("RGB") for k, f in enumerate(ImageSequence.Iterator(img)) if k in wanted}
    return [frames[k] for k in wanted]


def read_series(path):
    """Time series file -> 2-D float64 array: .npy as stored, .csv with a header row as (T, C)."""
    if Path(path).suffix.lower() == ".npy":
        arr = load_npy(path)
    elif Path(path).suffix.lower() == ".csv":
        arr = read_text_table(path, header=True)
    else:
        raise ValueError(f"unknown time series format '{Path(path).suffix}'")
    if np.asarray(arr).size == 0:
        raise ValueError("time series is empty")
    return require_finite(arr)


def read_prior(path):
    """A prior model's embedding (.npy, any shape holding P values) -> (P,) float32 tensor."""
    return torch.from_numpy(require_finite(load_npy(path)).astype(np.float32)).flatten()


# ----------------------------------------------------------------------------------------------
# 4. The manifest dataset (METHOD.md section 6)
# ----------------------------------------------------------------------------------------------

class SampleError(ValueError):
    """A sample that cannot be used; the message names the manifest, the line, the file and the problem."""


READ_ERRORS = (ValueError, OSError, EOFError, wave.Error, struct.error, zipfile.BadZipFile,
               Image.DecompressionBombError)


class ManifestDataset(torch.utils.data.Dataset):
    """One dataset = one JSON Lines manifest of ONE modality (a manifest mixing modalities is an error).

    Each line: {"modality", "path", "text" and/or "label", optional "anchor_image", "prior",
    "split"}; paths are relative to the manifest's folder. With `split`, only lines carrying that
    split are kept. A label without text becomes a caption through PROMPTS; `class_names` are the
    sorted labels and `label` indexes them (-1 when a line has none).

    on_bad="raise": the manifest is checked at open (JSON, fields, modality, files exist) and a
    file that cannot be decoded raises SampleError when it is read.
    on_bad="skip": every sample is also read once at open, so that a bad one is dropped before
    indices are handed out; skipped lines are counted in `skipped`, written with their reason to
    `bad_log` (default: next to the manifest, `<name>.skipped.log`) and announced in a warning.

    Sizes: images, tactile, depth and video frames at `image_size`; audio cropped or padded to
    `audio_seconds`; `points` points with `point_channels` columns (3 = xyz, 6 = xyz + rgb or
    normals); `frames` video frames; imu and eeg as (channels, length), read as (C, T) when the
    first axis has the configured channel count, else as (T, C) (a .csv is always rows = time).
    """

    def __init__(self, path, split=None, on_bad="raise", bad_log=None, image_size=224, audio_seconds=10.0,
                 points=8192, point_channels=3, frames=8, imu_channels=6, imu_length=2000,
                 eeg_channels=16, eeg_length=256, seed=0):
        if on_bad not in ("raise", "skip"):
            raise ValueError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
        self.path, self.split, self.seed = Path(path), split, seed
        self.image_size, self.audio_seconds, self.frames = image_size, audio_seconds, frames
        self.points, self.point_channels = points, point_channels
        self.series_shape = {"imu": (imu_channels, imu_length), "eeg": (eeg_channels, eeg_length)}
        self.modality, self.entries, bad = None, [], []
        for line_no, line in enumerate(self.path.read_text().splitlines(), start=1):
            try:
                entry = self.check_line(line, line_no)
                if entry is not None and on_bad == "skip":
                    self.load(entry)
            except SampleError as err:
                if on_bad == "raise":
                    raise
                bad.append(str(err))
                continue
            if entry is not None:
                self.modality = self.modality or entry["modality"]
                self.entries.append(entry)
        self.skipped, self.bad_log = len(bad), None
        if bad:
            self.bad_log = Path(bad_log) if bad_log else self.path.with_name(self.path.name + ".skipped.log")
            self.bad_log.write_text("\n".join(bad) + "\n")
            warnings.warn(f"{self.path}: skipped {len(bad)} bad samples; reasons in {self.bad_log}")
        if not self.entries:
            raise SampleError(f"{self.path}: no usable samples" + (f" with split '{split}'" if split else ""))
        self.class_names = sorted({e["label"] for e in self.entries if e["label"] is not None})
        self.class_index = {name: k for k, name in enumerate(self.class_names)}
        templates = PROMPTS[self.modality]
        self.captions = [e["text"] or templates[i % len(templates)].format(e["label"]) for i, e in enumerate(self.entries)]

    def error(self, line_no, message, file=None):
        return SampleError(f"{self.path}: line {line_no}: " + (f"{file}: " if file else "") + message)

    def check_line(self, line, line_no):
        """A manifest line -> entry dict with resolved paths, None for a blank line or another split."""
        if not line.strip():
            return None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise self.error(line_no, f"not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise self.error(line_no, "expected a JSON object")
        if self.split is not None and record.get("split") != self.split:
            return None
        modality = record.get("modality")
        if modality not in READERS:
            raise self.error(line_no, f"unknown modality {modality!r}; expected one of {sorted(READERS)}")
        if self.modality not in (None, modality):
            raise self.error(line_no, f"modality '{modality}' in a manifest of '{self.modality}': "
                                      "one modality per manifest")
        text, label = record.get("text"), record.get("label")
        if not text and label in (None, ""):
            raise self.error(line_no, "neither 'text' nor 'label' given")
        if text is not None and not isinstance(text, str):
            raise self.error(line_no, f"'text' must be a string, got {type(text).__name__}")
        if "path" not in record:
            raise self.error(line_no, "no 'path' given")
        entry = {"line": line_no, "modality": modality, "text": text,
                 "label": None if label in (None, "") else str(label)}
        for key in ("path", "anchor_image", "prior"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise self.error(line_no, f"'{key}' must be a string path, got {record[key]!r}")
            entry[key] = None if record.get(key) is None else self.path.parent / record[key]
            if entry[key] is not None and not entry[key].exists():
                raise self.error(line_no, f"{key} file does not exist", record[key])
        return entry

    def load(self, entry):
        """entry -> (input, anchor image or None, prior or None); any read problem becomes a SampleError."""
        file = entry["path"]
        try:
            x = PREPROCESS[entry["modality"]](self, READERS[entry["modality"]](self, file))
            if not torch.isfinite(x).all():
                raise ValueError("preprocessing produced NaN or inf")
            file = entry["anchor_image"]
            anchor = None if file is None else normalize_image(read_image(file), self.image_size)
            file = entry["prior"]
            prior = None if file is None else read_prior(file)
        except READ_ERRORS as err:
            raise self.error(entry["line"], str(err), file.relative_to(self.path.parent)) from err
        return x, anchor, prior

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        entry = self.entries[i]
        x, anchor, prior = self.load(entry)
        label = entry["label"]
        return {"modality": self.modality, "input": x, "text": self.captions[i],
                "label": -1 if label is None else self.class_index[label], "anchor_image": anchor, "prior": prior}


def preprocess_points(ds, arr):
    if arr.shape[1] < ds.point_channels:
        raise ValueError(f"point cloud has {arr.shape[1]} channels, {ds.point_channels} configured")
    return normalize_points(arr[:, : ds.point_channels], ds.points, ds.seed)


# modality -> (dataset, file) -> the raw signal: RGB image, frames, depth in metres, 16 kHz
# waveform, points, time series. Synthetic samples (world.py) are generated in this form.
READERS = {
    "image": lambda ds, file: read_image(file),
    "tactile": lambda ds, file: read_image(file),
    "depth": lambda ds, file: read_depth_metres(file),
    "video": lambda ds, file: read_video_frames(file, ds.frames),
    "audio": lambda ds, file: read_audio(file, ds.audio_seconds),
    "point": lambda ds, file: read_point_array(file),
    "imu": lambda ds, file: read_series(file),
    "eeg": lambda ds, file: read_series(file),
}

# modality -> (dataset, raw signal) -> the tensor its tokenizer takes; shared by real and synthetic
# data. Adding a modality = one reader, one entry here and one in READERS.
PREPROCESS = {
    "image": lambda ds, x: normalize_image(x, ds.image_size),
    "tactile": lambda ds, x: normalize_image(x, ds.image_size),
    "depth": lambda ds, x: resize_center_crop(disparity(x), ds.image_size),
    "video": lambda ds, x: torch.stack([normalize_image(frame, ds.image_size) for frame in x]),
    "audio": lambda ds, x: log_mel(x, ds.audio_seconds),
    "point": preprocess_points,
    "imu": lambda ds, x: normalize_series(x, *ds.series_shape["imu"]),
    "eeg": lambda ds, x: normalize_series(x, *ds.series_shape["eeg"]),
}


# ----------------------------------------------------------------------------------------------
# 5. Batches that mix datasets (METHOD.md section 3)
# ----------------------------------------------------------------------------------------------

class MixedBatchSampler:
    """Endless batches of (dataset_index, sample_index) pairs mixing datasets.

    Each slot of a batch picks dataset d with probability size_d^alpha / sum_e size_e^alpha; the
    sample comes from a shuffled permutation of dataset d, reshuffled each time it is used up. Every
    rank draws the same global batch of batch_size * world_size slots and keeps its own slice, so
    ranks see disjoint samples. Batch b's dataset draws depend only on (seed, b) and the k-th
    permutation of d only on (seed, d, k), so the state is the batch number: `load_state_dict`
    replays the cheap dataset draws of earlier batches to restore the per-dataset positions.
    """

    def __init__(self, sizes, batch_size, alpha=0.5, seed=0, rank=0, world_size=1):
        if not sizes or min(sizes) < 1:
            raise ValueError(f"every dataset needs at least one sample, got sizes {list(sizes)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.sizes, self.batch_size, self.alpha, self.seed = list(sizes), batch_size, alpha, seed
        self.rank, self.world_size = rank, world_size
        weights = np.asarray(self.sizes, dtype=np.float64) ** alpha
        self.probs = weights / weights.sum()
        self.batch, self.drawn, self.permutations = 0, np.zeros(len(sizes), dtype=np.int64), {}

    def dataset_draws(self, b):
        """Dataset index of every slot of global batch b."""
        rng = np.random.default_rng([self.seed, 0, b])
        return rng.choice(len(self.sizes), self.batch_size * self.world_size, p=self.probs)

    def sample_index(self, d, k):
        """The k-th draw from dataset d: position k mod size in its (k div size)-th shuffle."""
        cycle, position = divmod(int(k), self.sizes[d])
        if self.permutations.get(d, (None,))[0] != cycle:
            self.permutations[d] = (cycle, np.random.default_rng([self.seed, 1, d, cycle]).permutation(self.sizes[d]))
        return int(self.permutations[d][1][position])

    def __iter__(self):
        while True:
            global_batch = []
            for d in self.dataset_draws(self.batch):
                global_batch.append((int(d), self.sample_index(d, self.drawn[d])))
                self.drawn[d] += 1
            self.batch += 1
            yield global_batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def settings(self):
        return {"sizes": self.sizes, "batch_size": self.batch_size, "alpha": self.alpha, "seed": self.seed,
                "world_size": self.world_size}

    def state_dict(self):
        """The number of batches yielded so far, with the settings it is valid for."""
        return {"batch": self.batch, **self.settings()}

    def load_state_dict(self, state):
        """Continue at batch state['batch'] (pass the number of batches consumed when a DataLoader prefetches)."""
        if {k: state[k] for k in self.settings()} != self.settings():
            raise ValueError(f"sampler state was saved with {({k: state[k] for k in self.settings()})}, "
                             f"this sampler has {self.settings()}")
        self.batch = state["batch"]
        self.drawn = sum((np.bincount(self.dataset_draws(b), minlength=len(self.sizes)) for b in range(self.batch)),
                         np.zeros(len(self.sizes), dtype=np.int64))


class MixedDataset(torch.utils.data.Dataset):
    """Several datasets indexed by the (dataset_index, sample_index) pairs of MixedBatchSampler."""

    def __init__(self, datasets):
        self.datasets = list(datasets)
        self.sizes = [len(ds) for ds in self.datasets]

    def __len__(self):
        return sum(self.sizes)

    def __getitem__(self, pair):
        d, i = pair
        return self.datasets[d][i]


def collate(samples):
    """Sample dicts of a mixed batch -> one batch dict, inputs grouped by modality.

    `index[m]` (and `prior_index[m]`) hold the batch positions of modality m's rows, so that
    per-modality embeddings scatter back into batch order: z[index[m]] = encode(inputs[m]).
    """
    modality = [s["modality"] for s in samples]
    groups = {m: [k for k, name in enumerate(modality) if name == m] for m in dict.fromkeys(modality)}
    with_prior = {m: [k for k in rows if samples[k]["prior"] is not None] for m, rows in groups.items()}
    with_prior = {m: rows for m, rows in with_prior.items() if rows}
    anchor_mask = torch.tensor([s["anchor_image"] is not None for s in samples], dtype=torch.bool)
    return {
        "inputs": {m: torch.stack([samples[k]["input"] for k in rows]) for m, rows in groups.items()},
        "index": {m: torch.tensor(rows, dtype=torch.long) for m, rows in groups.items()},
        "modality": modality,
        "text": [s["text"] for s in samples],
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "anchor_image": torch.stack([s["anchor_image"] for s in samples if s["anchor_image"] is not None])
        if anchor_mask.any() else None,
        "anchor_mask": anchor_mask,
        "prior": {m: torch.stack([samples[k]["prior"] for k in rows]) for m, rows in with_prior.items()},
        "prior_index": {m: torch.tensor(rows, dtype=torch.long) for m, rows in with_prior.items()},
    }
