"""Exercise mel_filter_bank: `preprocess.mel_filter_bank`, the audio front end (docs/method.md section 6)."""

import pytest
import torch

from preprocess import mel_filter_bank

pytestmark = pytest.mark.mel_filter_bank


def test_matches_the_stored_filters(stored):
    case = stored("mel_filter_bank")
    filters = mel_filter_bank(case["n_mels"], case["n_fft"], case["sample_rate"])
    assert filters.shape == (6, 17) and filters.dtype == torch.float32
    torch.testing.assert_close(filters, case["filters"], rtol=1e-5, atol=1e-6)


def test_triangles_between_0_and_1_with_rising_centres():
    filters = mel_filter_bank(40, 2048, 16000)
    assert filters.shape == (40, 1025)
    assert filters.min() >= 0 and filters.max() <= 1
    assert (filters.amax(1) > 0.9).all()  # peak-1 triangles, sampled near their peaks
    centres = filters.argmax(1)
    assert (centres[1:] > centres[:-1]).all()


def test_neighbouring_triangles_sum_to_one_between_the_first_and_last_centres():
    """Each filter's falling edge is the next one's rising edge."""
    filters = mel_filter_bank(40, 2048, 16000)
    centres = filters.argmax(1)
    inside = filters[:, centres[0] + 1:centres[-1]].sum(0)
    torch.testing.assert_close(inside, torch.ones_like(inside), atol=1e-5, rtol=0)


def test_slaney_scale_is_linear_below_1_khz():
    """Below 1 kHz the Slaney mel scale is linear: filters there are equally wide in Hz."""
    filters = mel_filter_bank(128, 4096, 16000)
    hz = torch.arange(filters.shape[1]) * 16000 / 4096
    centres = hz[filters.argmax(1)]
    low = centres[centres < 900]
    gaps = low[1:] - low[:-1]
    assert gaps.max() - gaps.min() <= 2 * 16000 / 4096  # equal up to the bin spacing
    high = centres[centres > 2000]
    assert (high[1:] - high[:-1])[-1] > 5 * gaps.mean()  # logarithmic above: much wider


def test_every_default_filter_covers_a_bin():
    assert (mel_filter_bank().sum(1) > 0).all()  # 128 filters over the 201 bins of n_fft = 400
