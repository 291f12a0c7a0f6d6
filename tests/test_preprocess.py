"""Tests for preprocess.py: the log-mel front end, CLIP's image recipe, point clouds in the unit sphere."""

import numpy as np
import torch

import preprocess


def test_log_mel_layout_and_every_filter_sees_a_bin():
    assert preprocess.log_mel(torch.zeros(16000), 1.0).shape == (1, 128, 98)
    assert (preprocess.mel_filter_bank().sum(1) > 0).all()
    assert torch.isfinite(preprocess.log_mel(torch.zeros(5), 1.0)).all()


def test_normalize_image_uint8_and_float_agree():
    img = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    a, b = preprocess.normalize_image(img, 32), preprocess.normalize_image(img / 255.0, 32)
    assert a.shape == (3, 32, 32) and torch.allclose(a, b, atol=1e-5)


def test_normalize_points_unit_sphere_and_deterministic():
    pts = np.random.default_rng(0).normal(size=(500, 6)) + 3.0
    a, b = preprocess.normalize_points(pts, 256, seed=1), preprocess.normalize_points(pts, 256, seed=1)
    assert a.shape == (256, 6) and torch.equal(a, b)
    assert a[:, :3].norm(dim=1).max() <= 1.0 + 1e-5
    assert preprocess.normalize_points(pts[:10], 64).shape == (64, 6)


def test_a_chirp_rises_along_the_time_axis_of_the_log_mel():
    """(1, 128 mel bins, frames): a tone sweeping up from 300 Hz to 4 kHz climbs the mel axis as time goes on."""
    t = torch.arange(16000) / 16000
    chirp = torch.sin(2 * torch.pi * (300 * t + (4000 - 300) / 2 * t ** 2))
    mel = preprocess.log_mel(chirp, 1.0)[0]  # (128, frames)
    assert mel.shape == (128, 98)
    peak = mel.argmax(0)  # the loudest mel bin of every frame
    assert (peak[1:] >= peak[:-1]).float().mean() > 0.95 and peak[-1] - peak[0] > 40
