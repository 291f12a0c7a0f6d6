"""Preprocessing: a raw signal -> the tensor its tokenizer takes (docs/method.md sections 1 and 6).

Real files (readers.py) and the synthetic world (world.py) go through these same functions, so a
synthetic sample and a real one of a modality have the same layout and scale: CLIP's image
recipe, the log-mel front end of audio (16 kHz, 25 ms Hann window, 10 ms hop, 128 Slaney mel
bins, AST's normalisation), point clouds in the unit sphere, depth as standardised disparity, and
multichannel series standardised per channel.
"""

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SAMPLE_RATE = 16_000
WINDOW, HOP, N_FFT, N_MELS = 400, 160, 400, 128  # 25 ms Hann window, 10 ms hop, 128 mel bins
AUDIO_MEAN, AUDIO_STD = -4.2677393, 4.5689974  # AST's AudioSet log-mel statistics (used as (x - mean) / (2 std))
LOG_FLOOR = 1e-6  # just above the quantisation noise of 16-bit audio in one mel band


def resize_center_crop(x, size):
    """(C, H, W) float tensor -> (C, size, size): shortest side to `size` (bicubic, antialiased), centre crop.

    CLIP's recipe. The long side is first cut to its centre, the square plus the filter's reach on
    each side, so work and memory stay of the order of the output whatever the aspect ratio (a
    1 x 1500 strip is not first stretched to 224 x 336,000). Torch's antialiased bicubic stands in
    for Pillow's, so uint8 and float inputs (real files, synthetic renders) share one path.
    """
    h, w = x.shape[-2:]
    short = min(h, w)
    reach = math.ceil(2 * max(1.0, short / size)) + 1  # source pixels the bicubic filter reads past the square
    if h > short + 2 * reach:
        top = (h - short) // 2 - reach
        x, h = x[:, top:top + short + 2 * reach], short + 2 * reach
    if w > short + 2 * reach:
        left = (w - short) // 2 - reach
        x, w = x[:, :, left:left + short + 2 * reach], short + 2 * reach
    if short != size:
        scale = size / short
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


@functools.cache  # computed once per setting, on first use
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
    mel = mel_filter_bank() @ spec.abs().pow(2)  # (128, F)
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
    """Multichannel time series (channels, T) -> (channels, length) float32 for imu and eeg.

    Each channel is standardised over time, so that units (g or m/s^2, volts or microvolts) do not
    matter, then cropped from the start or zero-padded to `length`. readers.read_series puts a
    file's series in this layout; the synthetic world generates it so.
    """
    x = torch.as_tensor(np.asarray(arr, dtype=np.float32))
    if x.ndim != 2 or x.shape[0] != channels:
        raise ValueError(f"expected a ({channels}, T) series, got shape {tuple(x.shape)}")
    x = (x - x.mean(1, keepdim=True)) / (x.std(1, unbiased=False, keepdim=True) + 1e-6)
    return F.pad(x[:, :length], (0, max(0, length - x.shape[1])))


def resample(x, rate, new_rate=SAMPLE_RATE):
    """FFT resampling (ideal low-pass): keep the spectrum below both Nyquist frequencies, then invert."""
    if rate == new_rate or len(x) == 0:
        return torch.as_tensor(x, dtype=torch.float32)
    x = torch.as_tensor(x, dtype=torch.float64)
    n_new = max(1, round(len(x) * new_rate / rate))
    spectrum = torch.fft.rfft(x)[: n_new // 2 + 1]
    return (torch.fft.irfft(spectrum, n=n_new) * (n_new / len(x))).float()
