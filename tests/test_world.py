"""Tests for world.py through data.SyntheticDataset: deterministic samples with the real-data layouts, held-out concepts, anchors,
captions, a file round trip through manifest.ManifestDataset (synthetic and real share one path), and the properties
of docs/method.md section 5 (own vocabularies and coverage, scarce captions, anchors of the sample's own instance,
a prior's draw apart from the run's)."""

import json
import struct

import numpy as np
import pytest
import torch

import data
import world
from manifest import ManifestDataset
from modalities import MODALITIES as REGISTRY
from preprocess import SAMPLE_RATE

SMALL = dict(concepts=4, image_size=16, frames=2, audio_seconds=0.25, points=64, imu_length=64, eeg_channels=8,
             eeg_length=64)
EXTENDED = ["video", "audio", "point", "depth", "tactile", "imu", "eeg"]
MODALITIES = ["image"] + EXTENDED


S = SMALL["image_size"]
LAYOUT = {"image": (3, S, S), "tactile": (3, S, S), "depth": (1, S, S), "video": (2, 3, S, S), "audio": (1, 128, 23),
          "point": (64, 3), "imu": (6, 64), "eeg": (8, 64)}  # docs/method.md section 1's table at the SMALL sizes


@pytest.fixture(scope="module")
def sets():
    return {m: data.SyntheticDataset(m, "train", 12, **SMALL) for m in MODALITIES}


@pytest.mark.parametrize("modality", MODALITIES)
def test_items_have_the_manifest_layout(sets, modality):
    ds = sets[modality]
    assert ds.modality == modality and ds.class_names == world.CONCEPTS[:4]
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"modality", "input", "text", "label", "anchor_image", "prior"}
        assert item["modality"] == modality and item["prior"] is None and item["text"] == ds.captions[i]
        assert tuple(item["input"].shape) == LAYOUT[modality] and item["input"].dtype == torch.float32
        assert torch.isfinite(item["input"]).all()
        assert isinstance(item["label"], int) and 0 <= item["label"] < 4
        has_anchor = modality in ("depth", "point", "audio", "video")
        assert (item["anchor_image"] is not None) == has_anchor
        if has_anchor:
            assert item["anchor_image"].shape == (3, S, S) and torch.isfinite(item["anchor_image"]).all()


def test_points_carry_unit_normals_and_fill_the_unit_sphere():
    ds = data.SyntheticDataset("point", "train", 4, **dict(SMALL, point_channels=6))
    for i in range(4):
        x = ds[i]["input"]
        assert x.shape == (64, 6)
        torch.testing.assert_close(x[:, :3].norm(dim=1).max(), torch.tensor(1.0))
        torch.testing.assert_close(x[:, 3:].norm(dim=1), torch.ones(64))


@pytest.mark.parametrize("modality", MODALITIES)
def test_deterministic_per_seed_and_index(sets, modality):
    again = data.SyntheticDataset(modality, "train", 12, **SMALL)
    other_seed = data.SyntheticDataset(modality, "train", 12, seed=1, **SMALL)
    shorter = data.SyntheticDataset(modality, "train", 5, **SMALL)
    for i in range(12):
        assert torch.equal(sets[modality][i]["input"], again[i]["input"])
        assert not torch.allclose(sets[modality][i]["input"], other_seed[i]["input"])
    for i in range(5):  # a sample does not depend on how many others the dataset holds
        assert torch.equal(sets[modality][i]["input"], shorter[i]["input"])


@pytest.mark.parametrize("modality", MODALITIES)
def test_train_and_test_splits_share_no_sample(sets, modality):
    test = data.SyntheticDataset(modality, "test", 12, **SMALL)
    for i in range(12):
        for j in range(12):
            assert not torch.allclose(sets[modality][i]["input"], test[j]["input"])


def test_held_out_concepts_leave_only_the_extended_train_sets():
    held = ["cube", "cone"]
    labels = lambda ds: {ds.class_names[ds[i]["label"]] for i in range(len(ds))}
    for m in ["audio", "tactile"]:
        train = data.SyntheticDataset(m, "train", 16, held_out=held, **SMALL)
        assert train.class_names == world.CONCEPTS[:4] and labels(train) == {"sphere", "cylinder"}
        assert not any(name in c for c in train.captions for name in held)
        assert labels(data.SyntheticDataset(m, "test", 16, held_out=held, **SMALL)) == set(world.CONCEPTS[:4])
    assert labels(data.SyntheticDataset("image", "train", 16, held_out=held, **SMALL)) == set(world.CONCEPTS[:4])
    with pytest.raises(ValueError, match="not among"):
        data.SyntheticDataset("audio", "train", 4, held_out=["banana"], **SMALL)


def test_captions_use_the_templates(sets):
    for m in EXTENDED:
        ds = sets[m]
        for i in range(len(ds)):
            assert ds.captions[i] in {t.format(ds.class_names[ds[i]["label"]]) for t in REGISTRY[m].prompts}
    image = data.SyntheticDataset("image", "train", 40, **SMALL)
    used = {m for i in range(40) for m, templates in ((n, s.prompts) for n, s in REGISTRY.items())
            if image.captions[i] in {t.format(image.class_names[image[i]["label"]]) for t in templates}}
    assert len(used) >= 4  # the anchor text tower sees the caption forms of many modalities


def test_anchor_is_a_render_of_the_same_object(sets):
    video = sets["video"]
    for i in range(len(video)):  # the video's anchor is its middle frame
        assert torch.equal(video[i]["anchor_image"], video[i]["input"][SMALL["frames"] // 2])
    depth = sets["depth"].raw(0)  # metres: the object stands in front of the back wall
    assert 1.5 < depth[depth > 0].min() < 3.5 and depth.max() > 4.0


def write_float_wav(path, x, rate):
    raw = np.asarray(x, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(raw)) + raw
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def test_raw_signals_written_to_files_read_back_identically(sets, tmp_path):
    """The synthetic raw signal, saved as a real file and read by ManifestDataset, gives the same input."""
    checks = {"audio": ("clip.wav", lambda path, x: write_float_wav(path, x, SAMPLE_RATE)),
              "depth": ("depth.npy", np.save), "point": ("points.npy", np.save), "eeg": ("eeg.npy", np.save)}
    for m, (name, write) in checks.items():
        ds = sets[m]
        write(tmp_path / name, ds.raw(3))
        manifest = tmp_path / f"{m}.jsonl"
        manifest.write_text(json.dumps({"modality": m, "path": name, "label": ds.class_names[ds[3]["label"]]}) + "\n")
        real = ManifestDataset(manifest, image_size=16, audio_seconds=0.25, points=64, eeg_channels=8,
                                    eeg_length=64)[0]
        torch.testing.assert_close(real["input"], ds[3]["input"], rtol=0, atol=1e-5)


def test_nearest_class_mean_baseline():
    def fake(n, shift):
        g = torch.Generator().manual_seed(n)
        return [{"input": torch.nn.functional.one_hot(torch.tensor(i % 3), 3).float() * 5 + torch.randn(3, generator=g)
                 + shift, "label": i % 3} for i in range(n)]
    assert data.nearest_class_mean_top1(fake(30, 0.0), fake(31, 0.0)) == 1.0
    assert data.nearest_class_mean_top1(fake(30, 0.0), [{"input": torch.zeros(3) + 5 * torch.eye(3)[1], "label": 0}]) == 0.0


TEN = dict(SMALL, concepts=10)


def test_each_dataset_covers_part_of_the_concepts_under_names_of_its_own():
    sets = {m: data.SyntheticDataset(m, "train", 14, vocabulary="own", coverage=0.7, **TEN) for m in EXTENDED}
    for ds in sets.values():
        assert len(ds.concepts) == 7 and ds.class_concepts == [world.CONCEPTS[k] for k in ds.concepts]
        assert all(name in world.SYNONYMS[concept] for name, concept in zip(ds.class_names, ds.class_concepts))
        for i in range(len(ds)):  # each caption uses the dataset's own name of the sample's concept
            assert ds.captions[i] in {t.format(ds.class_names[ds.labels[i]]) for t in REGISTRY[ds.modality].prompts}
    assert len({tuple(ds.concepts) for ds in sets.values()}) > 1  # datasets cover different concepts
    names = {c: {dict(zip(ds.class_concepts, ds.class_names)).get(c) for ds in sets.values()} - {None}
             for c in world.CONCEPTS[:10]}
    assert sum(len(n) > 1 for n in names.values()) >= 5  # and call many concepts by different names
    shared = data.SyntheticDataset("video", "train", 14, vocabulary="shared", coverage=0.7, **TEN)
    assert shared.class_names == shared.class_concepts  # the world without own vocabularies


def test_the_image_text_set_shows_every_concept_under_each_of_its_names():
    image = data.SyntheticDataset("image", "train", 300, vocabulary="own", coverage=0.7, **dict(TEN, image_size=8))
    assert image.concepts == list(range(10))
    for k, concept in enumerate(world.CONCEPTS[:10]):
        used = {name for name in world.SYNONYMS[concept] for i, c in enumerate(image.captions)
                if image.labels[i] == k and c.endswith(f" {name}.")}
        assert used == set(world.SYNONYMS[concept])


def test_only_the_set_fraction_of_anchored_training_samples_carries_a_caption():
    for m in EXTENDED:
        train = data.SyntheticDataset(m, "train", 20, caption_fraction=0.25, **SMALL)
        captioned = [c is not None for c in train.captions]
        expected = 5 if train.anchored else 20  # tactile, imu and eeg have no anchor image: all captioned
        assert sum(captioned) == expected and captioned == [i < expected for i in range(20)]
        assert all((train[i]["label"] >= 0) == captioned[i] for i in range(20))  # no caption, no label
        assert len(data.Captioned(train)) == expected
        test = data.SyntheticDataset(m, "test", 8, caption_fraction=0.25, **SMALL)
        assert None not in test.captions


def test_an_anchor_image_shows_its_own_samples_instance():
    """An anchored sample draws its scene first from its stream; its anchor renders that scene. A clean
    render of the sample's scene is close to its anchor, one of another instance of the concept is not,
    and the sample itself is of that instance: the points lie on its surface, the depth map is its depth."""
    size = SMALL["image_size"]
    for m in ("depth", "point", "video", "audio"):
        ds = data.SyntheticDataset(m, "train", 8, **SMALL)
        for i in range(8):
            k = ds.concepts[ds.labels[i]]
            own = world.scene(ds.world, k, ds.rng(i))
            other = world.scene(ds.world, k, ds.rng(i + 100))
            clean = lambda s: REGISTRY["image"].preprocess(world.render(ds.world.names[k], world.stack([s]), size)[0][0]
                                                           .numpy(), ds.sizes)
            if m == "video":  # the middle frame: the scene moved by the concept's bob
                assert torch.equal(ds[i]["anchor_image"], ds[i]["input"][SMALL["frames"] // 2])
                continue
            anchor = ds[i]["anchor_image"]
            assert (anchor - clean(own)).abs().mean() < 0.5 * (anchor - clean(other)).abs().mean(), (m, i)
            if m == "point":
                s = world.stack([own])
                xyz = torch.as_tensor(ds.raw(i)[:, :3], dtype=torch.float32)
                local = world.matvec(s["pose"][0].T, xyz - s["centre"][0]) / s["size"][0]
                assert world.SHAPES[ds.world.names[k]](local).abs().median() < 0.05
            if m == "depth":
                depth = world.render(ds.world.names[k], world.stack([own]), size)[1][0].numpy()
                raw, seen = ds.raw(i), ds.raw(i) > 0
                assert np.abs(raw[seen] / depth[seen] - 1).max() < 0.06


def test_the_priors_draw_shares_no_sample_with_the_runs():
    for m in ("audio", "imu"):
        prior = data.SyntheticDataset(m, "prior", 16, vocabulary="own", coverage=0.5, **SMALL)
        assert prior.concepts == list(range(4))  # every concept, whatever the run's datasets cover
        run = [data.SyntheticDataset(m, split, 16, **SMALL) for split in ("train", "test")]
        seen = {ds[i]["input"].numpy().tobytes() for ds in run for i in range(16)}
        assert not seen & {prior[i]["input"].numpy().tobytes() for i in range(16)}
