"""Readers: one file -> the raw signal it holds (docs/method.md section 6), with Pillow, numpy and
the standard library only.

Images (anything Pillow decodes), WAV (8/16/24/32-bit PCM and float, mono or stereo, any rate),
point clouds (.npy, .npz, .txt/.xyz, ascii and binary .ply, .off), depth (16-bit PNG in millimetres
as NYU Depth v2 stores it, or in SUN RGB-D's bit-rotated layout; 8-bit PNG; .npy in metres), video (a folder of frames, an animated GIF/WebP, a .npy array) and time series
(.npy, .csv). A reader raises ValueError saying what is wrong with the file; manifest.ManifestDataset
adds the manifest, the line and the file to the message.
"""

import math
import struct
import wave
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageSequence

from preprocess import resample

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
    """Any image Pillow decodes -> RGB PIL image (palette, grey and alpha are converted).

    16- and 32-bit greyscale ("I;16", "I") would saturate at 255 in Pillow's RGB conversion: they
    are scaled to 8 bits by their type's range first (65535 for 16-bit, the largest value for 32-bit).
    """
    with Image.open(path) as img:
        if img.mode.startswith("I"):
            grey = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") else max(float(grey.max()), 1.0)
            return Image.fromarray(np.round(grey.clip(0, top) / top * 255).astype(np.uint8)).convert("RGB")
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
    if n == 0:
        raise ValueError("WAV file has 0 samples")
    if channels < 1 or rate < 1:
        raise ValueError(f"bad WAV header: {channels} channels at {rate} Hz")
    if len(raw) < n * channels * width:
        raise ValueError(f"truncated WAV file: header promises {n} frames, found {len(raw) // (channels * width)}")
    x = decode_samples(raw[:n * channels * width], tag, width, channels)
    return require_finite(x.mean(1)), rate


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
    """OFF mesh -> (V, 3) vertices (faces are ignored), the header's counts checked against the data.

    Layout: "OFF", then "V F E" (on the same line, as ModelNet's "OFF490 518 0" has it, or on the
    next), then V lines of x y z, then F face lines. '#' starts a comment.
    """
    lines = [words for line in Path(path).read_text(errors="replace").splitlines()
             if (words := line.split("#")[0].split())]
    if not lines or not lines[0][0].startswith("OFF"):
        raise ValueError("not an OFF file: 'OFF' header missing")
    counts = ([lines[0][0][3:]] if lines[0][0] != "OFF" else []) + lines[0][1:]
    body = lines[1:]
    if not counts:
        counts, body = (lines[1], lines[2:]) if len(lines) > 1 else ([], [])
    try:
        n_vertices, n_faces = int(counts[0]), int(counts[1])
    except (IndexError, ValueError):
        raise ValueError("bad OFF file: the header's vertex and face counts are missing") from None
    if n_vertices < 1:
        raise ValueError(f"bad OFF file: header says {n_vertices} vertices")
    if len(body) < n_vertices + n_faces:
        raise ValueError(f"truncated OFF file: header says {n_vertices} vertices and {n_faces} faces, "
                         f"the file has {len(body)} data lines")
    rows = body[:n_vertices]
    if any(len(row) != 3 for row in rows):
        k = next(k for k, row in enumerate(rows) if len(row) != 3)
        raise ValueError(f"bad OFF file: vertex {k} has {len(rows[k])} values, not 3 (is the vertex count right?)")
    try:
        return np.array(rows, dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"bad OFF file: {err}") from None


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


DEPTH_FORMATS = ("mm", "sunrgbd")  # how a 16-bit depth PNG stores depth (train.py's --depth-format)


def sunrgbd_millimetres(stored):
    """SUN RGB-D's 16-bit depth PNG values -> millimetres: the 16 bits rotated right by 3,
    (v >> 3) | (v << 13) modulo 2^16.

    This is how SUN RGB-D's own toolbox reads its depth maps, in readData/read3dPoints.m:
    `depthInpaint = bitor(bitshift(depthVis,-3), bitshift(depthVis,16-3)); depthInpaint =
    single(depthInpaint)/1000;` then `depthInpaint(depthInpaint > 8) = 8` (metres). The same
    rotation, without the clip, is SUN3D's `depthRead.m` (github.com/PrincetonVision/SUN3Dsfm);
    TUI-NICR's nicr-scene-analysis-datasets (datasets/sunrgbd/prepare_dataset.py) quotes the
    toolbox's lines and keeps v >> 3 clipped at 8,000 mm. Read as plain millimetres, such a file is
    8x too deep below 8.192 m, which the per-sample disparity standardisation would hide, and
    wrapped around beyond it (8x the depth modulo 65.536 m), which it would not. Here: the rotation
    alone, no clip at 8 m (a depth beyond 8 m is kept as the file gives it).
    """
    v = np.asarray(stored).astype(np.uint32)
    return ((v >> 3) | (v << 13)) & 0xFFFF


def read_depth_metres(path, png_format="mm"):
    """Depth file -> (H, W) depth in metres; 0 means missing.

    16-bit PNG: millimetres (`png_format="mm"`: NYU Depth v2, and most Kinect-style datasets), or
    SUN RGB-D's bit-rotated millimetres (`"sunrgbd"`, see `sunrgbd_millimetres`); 8-bit PNG: raw
    values (their scale is irrelevant after `disparity`'s standardisation; refused as "sunrgbd",
    whose maps are 16-bit); .npy: metres, whatever the format.
    """
    if png_format not in DEPTH_FORMATS:
        raise ValueError(f"unknown depth PNG format {png_format!r}; expected one of {list(DEPTH_FORMATS)}")
    if Path(path).suffix.lower() == ".npy":
        arr = np.squeeze(load_npy(path)).astype(np.float64)
    else:
        with Image.open(path) as img:
            if img.mode not in ("L", "I;16", "I;16B", "I;16L", "I"):
                raise ValueError(f"expected a single-channel 8- or 16-bit depth image, got mode {img.mode}")
            arr, scale = np.asarray(img), 1.0 if img.mode == "L" else 1000.0
        if png_format == "sunrgbd":
            if scale == 1.0 or arr.max(initial=0) > 0xFFFF:
                raise ValueError(f"a {'8' if scale == 1.0 else '32'}-bit depth image, but --depth-format sunrgbd: "
                                 "SUN RGB-D's depth maps are 16-bit")
            arr = sunrgbd_millimetres(arr)
        arr = arr.astype(np.float64) / scale
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


def read_series(path, channels):
    """Time series file -> (channels, T) float64, its orientation decided by the channel count.

    .csv: a header row, then one row per time step and one column per channel (rows are time,
    always, even when there are as many rows as channels). .npy: (C, T) when the first axis has
    `channels` entries, else (T, C) when the second has; a square array is read as (C, T), the way
    numpy arrays of signals are usually stored.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        arr = read_text_table(path, header=True)
        if arr.size and arr.shape[1] != channels:
            raise ValueError(f"CSV has {arr.shape[1]} columns, {channels} channels configured (rows are time)")
        arr = arr.T
    elif suffix == ".npy":
        arr = np.asarray(load_npy(path), dtype=np.float64)
        if arr.ndim != 2 or channels not in arr.shape:
            raise ValueError(f"expected a ({channels}, T) or (T, {channels}) array, got shape {arr.shape}")
        arr = arr if arr.shape[0] == channels else arr.T
    else:
        raise ValueError(f"unknown time series format '{Path(path).suffix}'")
    if arr.size == 0:
        raise ValueError("time series is empty")
    return require_finite(arr)


def read_prior(path):
    """A prior model's embedding (.npy, any shape holding P values) -> (P,) float32 tensor."""
    return torch.from_numpy(require_finite(load_npy(path)).astype(np.float32)).flatten()
