"""Tests for manifest.py and data.py: manifests are checked at open and bad samples named or
skipped, labels become prompts, and batches mix datasets reproducibly, sharded across ranks."""

import json

import numpy as np
import pytest
import torch

import data
from manifest import ManifestDataset, SampleError
from test_readers import write_manifest


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ({"modality": "smell", "path": "x.npy", "label": "rose"}, "unknown modality 'smell'"),
    ({"modality": "point", "path": "x.npy"}, "neither 'text' nor 'label'"),
    ({"modality": "point", "path": "missing.npy", "label": "a"}, "missing.npy: path file does not exist"),
    ({"modality": "audio", "path": "x.npy", "label": "a"}, "one modality per manifest"),
])
def test_manifest_problems_raise_at_open(tmp_path, line, message):
    np.save(tmp_path / "x.npy", np.ones((10, 3)))
    path = write_manifest(tmp_path, [{"modality": "point", "path": "x.npy", "label": "a"}, line])
    with pytest.raises(SampleError, match=rf"set\.jsonl: line 2: .*{message}"):
        ManifestDataset(path)


def test_skip_mode_counts_logs_and_warns(tmp_path):
    np.save(tmp_path / "good.npy", np.ones((10, 3)) * np.arange(10)[:, None])
    np.save(tmp_path / "empty.npy", np.zeros((0, 3)))
    rows = [{"modality": "point", "path": "good.npy", "label": "a"}, "{oops",
            {"modality": "point", "path": "empty.npy", "label": "b"},
            {"modality": "point", "path": "gone.npy", "label": "c"}]
    with pytest.warns(UserWarning, match="skipped 3 bad samples"):
        ds = ManifestDataset(write_manifest(tmp_path, rows), on_bad="skip", points=16)
    assert len(ds) == 1 and ds.skipped == 3 and ds.class_names == ["a"]
    log = ds.bad_log.read_text()
    assert "line 2" in log and "line 3: empty.npy: point cloud has 0 points" in log and "line 4" in log
    with pytest.raises(SampleError, match=r"line 2: empty\.npy: point cloud has 0 points"):
        ManifestDataset(write_manifest(tmp_path, [rows[0], rows[2]]), points=16)[1]


# ---------- mixed batches ----------

def test_sampler_follows_size_power_alpha_and_is_deterministic():
    sizes = [1000, 100, 10]
    sampler = data.MixedBatchSampler(sizes, batch_size=64, alpha=0.5, seed=3)
    batches = [b for _, b in zip(range(200), sampler)]
    counts = np.bincount([d for b in batches for d, _ in b], minlength=3) / (200 * 64)
    expected = np.sqrt(sizes) / np.sqrt(sizes).sum()
    assert np.abs(counts - expected).max() < 0.02
    assert all(0 <= i < sizes[d] for b in batches for d, i in b)
    again = data.MixedBatchSampler(sizes, batch_size=64, alpha=0.5, seed=3)
    assert [b for _, b in zip(range(200), again)] == batches
    small = [i for b in batches for d, i in b if d == 2][:10]
    assert sorted(small) == list(range(10))  # a permutation is used up before any sample repeats


def test_sampler_state_round_trip_gives_the_next_batch():
    sampler = data.MixedBatchSampler([50, 7], batch_size=8, seed=1)
    stream = iter(sampler)
    for _ in range(13):
        next(stream)
    state = sampler.state_dict()
    expected = next(stream)
    restored = data.MixedBatchSampler([50, 7], batch_size=8, seed=1)
    restored.load_state_dict(state)
    assert next(iter(restored)) == expected


def test_ranks_are_disjoint_shards_of_the_global_batch():
    sizes = [40, 30]
    single = iter(data.MixedBatchSampler(sizes, batch_size=12, seed=5))
    ranks = [iter(data.MixedBatchSampler(sizes, batch_size=4, seed=5, rank=r, world_size=3)) for r in range(3)]
    for _ in range(5):
        shards = [next(r) for r in ranks]
        assert sum(shards, []) == next(single)
        assert len({pair for shard in shards for pair in shard}) == 12


def test_collate_positions_rebuild_batch_order():
    def sample(modality, shape, k, anchor=False, prior=False):
        return {"modality": modality, "input": torch.full(shape, float(k)), "text": f"t{k}", "label": k,
                "anchor_image": torch.full((3, 4, 4), float(k)) if anchor else None,
                "prior": torch.full((5,), float(k)) if prior else None}
    samples = [sample("audio", (1, 8, 6), 0, prior=True), sample("depth", (1, 4, 4), 1, anchor=True),
               sample("audio", (1, 8, 6), 2), sample("depth", (1, 4, 4), 3, prior=True),
               sample("audio", (1, 8, 6), 4, anchor=True, prior=True)]
    batch = data.collate(samples)
    order = torch.empty(5)
    for m, x in batch["inputs"].items():
        order[batch["index"][m]] = x.flatten(1)[:, 0]
    assert order.tolist() == [0, 1, 2, 3, 4] and batch["label"].tolist() == [0, 1, 2, 3, 4]
    assert batch["modality"] == ["audio", "depth", "audio", "depth", "audio"]
    assert batch["anchor_mask"].tolist() == [False, True, False, False, True]
    assert batch["anchor_image"][:, 0, 0, 0].tolist() == [1, 4]
    assert batch["prior_index"]["audio"].tolist() == [0, 4] and batch["prior"]["audio"][:, 0].tolist() == [0, 4]
    assert batch["prior_index"]["depth"].tolist() == [3]


def test_mixed_dataset_through_a_dataloader(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(40, 3)))
    points = ManifestDataset(write_manifest(tmp_path, [{"modality": "point", "path": "x.npy", "label": "a"}] * 3),
                                  points=16)
    series = ManifestDataset(write_manifest(tmp_path, [{"modality": "eeg", "path": "x.npy", "label": "b"}] * 5,
                                                 name="eeg.jsonl"), eeg_channels=3, eeg_length=20)
    mixed = data.MixedDataset([points, series])
    loader = torch.utils.data.DataLoader(mixed, batch_sampler=data.MixedBatchSampler(mixed.sizes, 6),
                                         collate_fn=data.collate)
    batch = next(iter(loader))
    assert sum(len(i) for i in batch["index"].values()) == 6
    assert all(batch["inputs"][m].shape[1:] == {"point": (16, 3), "eeg": (3, 20)}[m] for m in batch["inputs"])


# ---------- manifests that are odd but legal, or wrong in ways that must be named ----------

def test_lines_split_on_newline_only_and_a_bom_is_accepted(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((10, 3)))
    rows = [{"modality": "point", "path": "x.npy", "text": "a cube\u2028 seen from above"},
            {"modality": "point", "path": "x.npy", "label": "b"}]
    (tmp_path / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode())
    ds = ManifestDataset(tmp_path / "m.jsonl", points=16)
    assert len(ds) == 2 and ds[0]["text"] == "a cube\u2028 seen from above"


def test_lines_without_split_belong_to_every_split_and_mixing_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((10, 3)))
    plain = [{"modality": "point", "path": "x.npy", "label": c} for c in "ab"]
    path = write_manifest(tmp_path, plain)
    assert len(ManifestDataset(path, split="train", points=16)) == 2
    assert len(ManifestDataset(path, split="test", points=16)) == 2
    mixed = write_manifest(tmp_path, [{**plain[0], "split": "train"}, plain[1]], name="mixed.jsonl")
    with pytest.raises(SampleError, match=r"mixed\.jsonl: line 2: no 'split', while other lines have one"):
        ManifestDataset(mixed, split="test", points=16)


@pytest.mark.parametrize("fields, message", [
    ({"label": ["a", "b"]}, "'label' must be a string or a number, got \\[\"a\", \"b\"\\]"),
    ({"text": "   "}, "'text' is only whitespace"),
    ({"label": "a", "path": None}, "no 'path' given"),
])
def test_wrong_fields_are_named_with_file_and_line(tmp_path, fields, message):
    np.save(tmp_path / "x.npy", np.ones((10, 3)))
    path = write_manifest(tmp_path, [{"modality": "point", "path": "x.npy", "label": "a"},
                                     {"modality": "point", "path": "x.npy", **fields}])
    with pytest.raises(SampleError, match=rf"set\.jsonl: line 2: {message}"):
        ManifestDataset(path)


def test_a_prior_of_another_size_is_named_when_the_line_is_read(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((10, 3)))
    np.save(tmp_path / "p5.npy", np.ones(5, dtype=np.float32))
    np.save(tmp_path / "p7.npy", np.ones(7, dtype=np.float32))
    path = write_manifest(tmp_path, [{"modality": "point", "path": "x.npy", "label": "a", "prior": "p5.npy"},
                                     {"modality": "point", "path": "x.npy", "label": "b", "prior": "p7.npy"}])
    with pytest.raises(SampleError, match=r"line 2: p7\.npy: prior has 7 values, the manifest's first prior has 5"):
        ManifestDataset(path)


def test_a_bad_file_given_by_absolute_path_is_reported(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 3)))
    absolute = str(tmp_path / "empty.npy")
    manifest_dir = tmp_path / "elsewhere"
    manifest_dir.mkdir()
    ds = ManifestDataset(write_manifest(manifest_dir, [{"modality": "point", "path": absolute, "label": "a"}]))
    with pytest.raises(SampleError, match=rf"line 1: {absolute}: point cloud has 0 points"):
        ds[0]


def test_a_missing_manifest_is_named(tmp_path):
    with pytest.raises(SampleError, match=r"nothing\.jsonl: no such manifest"):
        ManifestDataset(tmp_path / "nothing.jsonl")
