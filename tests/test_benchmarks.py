"""Tests for benchmarks/: fake trees in each official layout, with real file formats, become
manifests that manifest.ManifestDataset reads, with the official splits, labels and class order; a
tree that is not the layout is refused in one line; a smoke-trained run is evaluated on them."""

import csv
import json

import numpy as np
import pytest

from benchmarks import esc50, folder, modelnet40
from manifest import ManifestDataset
from test_readers import write_wav
from test_train import in_process

ESC_CLASSES = ["dog", "rooster", "chirping_birds"]


def fake_esc50(root, missing=()):
    """10 clips over 3 categories and 5 folds, 44.1 kHz mono 16-bit (0.2 s: the rate is what matters)."""
    (root / "meta").mkdir(parents=True)
    (root / "audio").mkdir()
    rows = []
    for k in range(10):
        target = k % 3
        name = f"{k % 5 + 1}-{1000 + k}-A-{target}.wav"
        if name not in missing:
            t = np.arange(8820) / 44100
            write_wav(root / "audio" / name, (0.3 * np.sin(2 * np.pi * 440 * (target + 1) * t))[:, None], 44100)
        rows.append({"filename": name, "fold": k % 5 + 1, "target": target, "category": ESC_CLASSES[target],
                     "esc10": "True", "src_file": 1000 + k, "take": "A"})
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_esc50_zero_shot_puts_every_clip_in_test_with_official_class_order(tmp_path):
    fake_esc50(tmp_path / "ESC-50")
    esc50.main([str(tmp_path / "ESC-50"), "--out", str(tmp_path / "out")])
    ds = ManifestDataset(tmp_path / "out" / "esc50.jsonl", split="test", audio_seconds=0.2)
    assert len(ds) == 10 and ds.modality == "audio" and ds[0]["input"].shape == (1, 128, 18)
    assert (tmp_path / "out" / "classes.txt").read_text().split("\n")[:3] == ["dog", "rooster", "chirping birds"]
    assert "{}" in (tmp_path / "out" / "prompts.txt").read_text()


def test_esc50_fold_k_is_the_test_split_and_missing_clips_are_skipped_with_a_reason(tmp_path, capsys):
    rows = fake_esc50(tmp_path / "ESC-50", missing=("1-1005-A-2.wav",))
    esc50.main([str(tmp_path / "ESC-50"), "--out", str(tmp_path / "out"), "--fold", "2"])
    lines = [json.loads(line) for line in (tmp_path / "out" / "esc50.jsonl").read_text().splitlines()]
    folds = {row["filename"]: row["fold"] for row in rows}
    for line in lines:
        assert line["split"] == ("test" if folds[line["path"].split("/")[-1]] == 2 else "train")
        assert line["label"] == ESC_CLASSES[int(line["path"][-5])].replace("_", " ")
    assert len(lines) == 9 and "1 files skipped" in capsys.readouterr().out
    assert "1-1005-A-2.wav: file is missing" in (tmp_path / "out" / "skipped.log").read_text()


def test_esc50_without_its_metadata_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "ESC-50" / "audio").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit:
        esc50.main([str(tmp_path / "ESC-50"), "--out", str(tmp_path / "out")])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}/ESC-50/meta/esc50.csv is missing: " \
                                              "ESC-50's metadata table meta/esc50.csv"


def fake_modelnet40(root):
    classes = ["airplane", "night_stand", "bathtub"]
    root.mkdir()
    (root / "modelnet40_shape_names.txt").write_text("\n".join(classes) + "\n")
    splits = {"train": [f"{c}_{k:04d}" for c in classes for k in (1, 2)], "test": [f"{c}_{k:04d}" for c in classes for k in (3,)]}
    rng = np.random.default_rng(0)
    for split, ids in splits.items():
        (root / f"modelnet40_{split}.txt").write_text("\n".join(ids) + "\n")
        for shape_id in ids:
            (root / shape_id.rsplit("_", 1)[0]).mkdir(exist_ok=True)
            np.savetxt(root / shape_id.rsplit("_", 1)[0] / f"{shape_id}.txt", rng.normal(size=(64, 6)), delimiter=",", fmt="%.6f")
    return splits


@pytest.mark.parametrize("normals", [False, True])
def test_modelnet40_lists_become_train_and_test_manifests(tmp_path, normals):
    splits = fake_modelnet40(tmp_path / "mn40")
    modelnet40.main([str(tmp_path / "mn40"), "--out", str(tmp_path / "out"), *(["--normals"] if normals else [])])
    channels = 6 if normals else 3
    assert (tmp_path / "out" / "settings.txt").read_text().strip() == f"--point-channels {channels}"
    for split, ids in splits.items():
        ds = ManifestDataset(tmp_path / "out" / "modelnet40.jsonl", split=split, points=32, point_channels=channels)
        assert len(ds) == len(ids) and ds[0]["input"].shape == (32, channels)
        assert sorted(ds.class_names) == ["airplane", "bathtub", "night stand"]
    assert (tmp_path / "out" / "classes.txt").read_text().splitlines() == ["airplane", "night stand", "bathtub"]


def test_modelnet40_without_its_lists_is_refused(tmp_path, capsys):
    fake_modelnet40(tmp_path / "mn40")
    (tmp_path / "mn40" / "modelnet40_test.txt").unlink()
    with pytest.raises(SystemExit):
        modelnet40.main([str(tmp_path / "mn40"), "--out", str(tmp_path / "out")])
    assert "modelnet40_test.txt is missing: the test list" in capsys.readouterr().err


def test_a_folder_tree_with_and_without_train_and_test(tmp_path):
    for layout in ("flat", "split"):
        root = tmp_path / layout
        for k, name in enumerate(["cat", "dog"] * 5):
            where = root / ("test" if k < 4 else "train") / name if layout == "split" else root / name
            where.mkdir(parents=True, exist_ok=True)
            np.save(where / f"{k}.npy", np.ones((20, 3)) * k)
        (root / ("train/cat" if layout == "split" else "cat") / "notes.md").write_text("not a point cloud")
        folder.main([str(root), "--modality", "point", "--out", str(tmp_path / f"out_{layout}"), "--test-fraction", "0.4"])
        manifest = tmp_path / f"out_{layout}" / f"{layout}.jsonl"
        sizes = {s: len(ManifestDataset(manifest, split=s, points=16)) for s in ("train", "test")}
        assert sizes == {"train": 6, "test": 4}, layout
        assert "notes.md: not a point file" in (tmp_path / f"out_{layout}" / "skipped.log").read_text()
    flat = [json.loads(line)["split"] for line in (tmp_path / "out_flat" / "flat.jsonl").read_text().splitlines()]
    folder.main([str(tmp_path / "flat"), "--modality", "point", "--out", str(tmp_path / "again"), "--test-fraction", "0.4"])
    assert [json.loads(line)["split"] for line in (tmp_path / "again" / "flat.jsonl").read_text().splitlines()] == flat


def test_a_smoke_run_evaluates_on_prepared_benchmarks(smoke, tmp_path):
    fake_esc50(tmp_path / "ESC-50")
    esc50.main([str(tmp_path / "ESC-50"), "--out", str(tmp_path / "esc")])
    fake_modelnet40(tmp_path / "mn40")
    modelnet40.main([str(tmp_path / "mn40"), "--out", str(tmp_path / "mn")])
    for prepared, manifest in ((tmp_path / "esc", "esc50.jsonl"), (tmp_path / "mn", "modelnet40.jsonl")):
        code, _, err = in_process("eval.py", "--ckpt", str(smoke / "ckpt.pt"), "--data", str(prepared / manifest),
                                  "--classes", f"@{prepared / 'classes.txt'}", "--prompts", f"@{prepared / 'prompts.txt'}")
        assert code == 0, err[-2000:]
        result = json.loads((smoke / "eval_data.json").read_text())[str(prepared / manifest)]
        assert result["chance"] == pytest.approx(1 / 3) and 0 <= result["zero_shot_top1"] <= 1
