"""Tests for cache.py: a cached world is bit-identical to a fresh one; a damaged, truncated or stale
entry is rebuilt with a message, never trusted; the key covers the settings and the code; two
builders of one entry take turns; a killed writer's temporary file is cleaned away."""

import os
import threading
import time

import pytest
import torch

import cache
import data

SMALL = dict(concepts=4, image_size=16, frames=2, audio_seconds=0.25, points=64, imu_length=64, eeg_channels=8,
             eeg_length=64)


def test_a_cached_world_is_bit_identical_to_a_fresh_one(tmp_path):
    for m in ("video", "audio", "point"):
        fresh = data.SyntheticDataset(m, "train", 10, cache=None, **SMALL)
        built = data.SyntheticDataset(m, "train", 10, cache=str(tmp_path), **SMALL)
        reused = data.SyntheticDataset(m, "train", 10, cache=str(tmp_path), **SMALL)
        assert (fresh.cache_use, built.cache_use, reused.cache_use) == ("built", "built", "reused")
        assert torch.equal(fresh.inputs, reused.inputs) and torch.equal(fresh.anchors, reused.anchors)
    other = data.SyntheticDataset("audio", "train", 10, cache=str(tmp_path), **dict(SMALL, seed=1))
    assert other.cache_use == "built"  # another world seed is another entry


def entry(folder):
    [path] = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".pt")]
    return path


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_a_damaged_entry_is_rebuilt_with_a_message(tmp_path, capsys, damage):
    first = data.SyntheticDataset("imu", "train", 6, cache=str(tmp_path), **SMALL)
    path = entry(tmp_path)
    raw = open(path, "rb").read()
    raw = {"truncate": raw[:len(raw) // 2], "flip": raw[:-10] + bytes([raw[-10] ^ 1]) + raw[-9:], "empty": b""}[damage]
    open(path, "wb").write(raw)
    again = data.SyntheticDataset("imu", "train", 6, cache=str(tmp_path), **SMALL)
    assert again.cache_use == "built" and "damaged" in capsys.readouterr().out
    assert torch.equal(first.inputs, again.inputs)
    assert data.SyntheticDataset("imu", "train", 6, cache=str(tmp_path), **SMALL).cache_use == "reused"


def test_a_stale_entry_is_rebuilt_and_the_key_covers_the_code(tmp_path, capsys, monkeypatch):
    calls = []
    build = lambda: calls.append(1) or {"x": torch.ones(2)}
    folder = str(tmp_path / "c")
    cache.cached(folder, "t", {"a": 1}, ["world.py"], build, "a test entry")
    path = entry(folder)
    from checkpoint import load_checkpoint, save_checkpoint
    stored = load_checkpoint(path)
    save_checkpoint({**stored, "material": {**stored["material"], "settings": {"a": 2}}}, path)  # another key's content
    content, how = cache.cached(folder, "t", {"a": 1}, ["world.py"], build, "a test entry")
    assert how == "built" and len(calls) == 2 and "stale" in capsys.readouterr().out
    source = tmp_path / "src"  # the same settings with other code are another entry
    source.mkdir()
    (source / "world.py").write_text("one version")
    monkeypatch.setattr(cache, "ROOT", source)
    assert cache.cached(folder, "t", {"a": 1}, ["world.py"], build, "x")[1] == "built"
    assert cache.cached(folder, "t", {"a": 1}, ["world.py"], build, "x")[1] == "reused"
    (source / "world.py").write_text("another version")
    assert cache.cached(folder, "t", {"a": 1}, ["world.py"], build, "x")[1] == "built"


def test_two_builders_of_one_entry_take_turns(tmp_path):
    """The second waits on the entry's lock while the first builds, then reads what the first saved."""
    calls, results = [], []

    def build():
        calls.append(1)
        time.sleep(0.3)
        return {"x": torch.arange(3)}

    threads = [threading.Thread(target=lambda: results.append(cache.cached(str(tmp_path), "t", {}, [], build, "x")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(how for _, how in results) == ["built", "reused"]


def test_a_killed_writers_temporary_file_is_removed_and_a_live_ones_kept(tmp_path):
    cache.cached(str(tmp_path), "t", {}, [], lambda: {"x": torch.ones(1)}, "x")
    path = entry(tmp_path)
    dead = 2 ** 22 + 12345  # above the default pid_max: no process has this pid
    open(f"{path}.tmp{dead}", "wb").write(b"half")
    open(f"{path}.tmp{os.getpid()}", "wb").write(b"a live writer's")
    assert cache.cached(str(tmp_path), "t", {}, [], lambda: {"x": torch.ones(1)}, "x")[1] == "reused"
    assert not os.path.exists(f"{path}.tmp{dead}") and os.path.exists(f"{path}.tmp{os.getpid()}")
