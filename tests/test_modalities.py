"""Tests for modalities.py: the registry is the one place that knows a modality; a new one registered
there is read, generated, tokenized, trained and evaluated with nothing else changed."""

import json

import numpy as np
import torch

import modalities
import preprocess
import readers
import tokenizers
import train
import world
from data import SyntheticDataset


def thermal_images(w, sizes, rngs, k):
    """A toy thermal camera: the brightness of the world's renders as a single-channel heat map."""
    renders, _ = world.gen_image(w, sizes, rngs, k)
    return [render.mean(-1) for render in renders], None


def heat_to_tensor(heat, sizes):
    x = torch.as_tensor(np.asarray(heat, dtype=np.float32))[None]  # (1, H, W)
    return preprocess.resize_center_crop((x - x.mean()) / (x.std() + 1e-6), sizes["image_size"])


THERMAL = modalities.Modality(
    read=lambda path, sizes: np.asarray(readers.read_image(path)).mean(-1),
    preprocess=heat_to_tensor,
    prompts=("a thermal image of a {}.", "a heat map of a {}."),
    tokenizer=tokenizers.DepthTokenizer,  # one channel, image-sized: the depth tokenizer fits
    settings=modalities.image_like,
    generate=thermal_images)


def test_every_extended_modality_has_what_the_code_needs():
    assert modalities.extended() == ["video", "audio", "point", "depth", "tactile", "imu", "eeg"]
    for name, spec in modalities.MODALITIES.items():
        assert spec.prompts and all("{}" in p for p in spec.prompts), name
        assert callable(spec.read) and callable(spec.preprocess), name


def test_a_registered_modality_is_trained_and_evaluated(monkeypatch, tmp_path):
    monkeypatch.setitem(modalities.MODALITIES, "thermal", THERMAL)
    assert "thermal" in modalities.extended()
    sample = SyntheticDataset("thermal", "train", 4, concepts=4, image_size=16)[0]
    assert sample["input"].shape == (1, 16, 16) and sample["text"].startswith(("a thermal", "a heat"))
    train.main(["--preset", "smoke", "--modalities", "thermal", "audio", "--out", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["unialign"]["zero_shot_top1"]) == {"thermal", "audio", "mean"}
    assert "thermal" in metrics["specialists"]["zero_shot_top1"] and "thermal->audio" in metrics["cross_modal"]
