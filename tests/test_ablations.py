"""Tests for ablations.py: every variant is a valid train.py flag set changing only its own setting,
results aggregate to mean +- std over seeds with noise marked, and finished variants are reused
while new ones get the seed's shared stages."""

import json
import subprocess

import pytest

import ablations
import config


def test_every_variant_is_an_ordinary_train_py_flag_set_changing_only_its_setting():
    full = vars(config.get_args(["--preset", "course"]))
    changed = {}
    for key, (_, flags) in ablations.VARIANTS.items():
        args = vars(config.get_args(["--preset", "course", *flags]))
        changed[key] = {k for k in full if args[k] != full[k]}
    assert changed == {"full": set(), "no_moe": {"experts", "top_k"}, "shared_router": {"router"},
                       "hard_targets": {"targets"}, "no_anchor": {"lambda_anchor"}, "no_prior": {"lambda_prior"}}
    assert all(keys <= config.UNIALIGN_ONLY for keys in changed.values())  # so the shared stages are reused


def fake_metrics(top1, emergent):
    return {"unialign": {"zero_shot_top1": {"audio": top1, "imu": top1 + 0.1, "mean": top1 + 0.05},
                         "emergent_mean": emergent, "trainable_params": 1000},
            "specialists": {"zero_shot_top1": {"audio": 0.5, "imu": 0.5, "mean": 0.5}, "trainable_params": 1200},
            "raw_baseline": {"zero_shot_top1": {"audio": 0.3, "imu": 0.3, "mean": 0.3}},
            "chance": {"audio": 0.1, "imu": 0.1, "mean": 0.1},
            "emergent": {"audio->imu": {"r1": emergent, "chance": 0.1, "paired_in_training": False},
                         "audio->image": {"r1": 0.9, "chance": 0.2, "paired_in_training": True}}}


def test_results_are_mean_and_std_over_seeds_with_noise_marked(tmp_path):
    values = {"full": (0.60, 0.64), "no_moe": (0.50, 0.52), "shared_router": (0.61, 0.62), "hard_targets": (0.6, 0.6),
              "no_anchor": (0.55, 0.57), "no_prior": (0.62, 0.66)}
    for key, per_seed in values.items():
        for seed, top1 in enumerate(per_seed):
            (tmp_path / f"seed{seed}" / key).mkdir(parents=True)
            (tmp_path / f"seed{seed}" / key / "metrics.json").write_text(json.dumps(fake_metrics(top1, top1 / 2)))
    rows, modalities = ablations.collect(str(tmp_path), [0, 1])
    assert modalities == ["audio", "imu"]
    full = rows["full UniAlign"]
    assert full["top1"]["audio"]["mean"] == pytest.approx(0.62) and full["top1"]["audio"]["std"] == pytest.approx(0.0283, abs=1e-4)
    assert rows["chance"]["emergent"]["mean"] == pytest.approx(0.1)  # unpaired pairs only
    assert rows["specialists (prior work)"]["params"] == 1200
    assert ablations.versus_full(rows["no MoE (one LoRA expert)"], full) == "-0.110"
    assert ablations.versus_full(rows["one shared router"], full) == "-0.005 (within noise)"
    table = ablations.table(rows, modalities, {"seeds": [0, 1], "preset": "course", "world_seed": 0})
    assert "| full UniAlign | 0.620 +- 0.028 | 0.720 +- 0.028 | **0.670 +- 0.028** |" in table


def test_a_finished_variant_is_reused_and_a_new_one_gets_the_shared_stages(tmp_path, monkeypatch):
    full, variant = tmp_path / "full", tmp_path / "no_moe"
    full.mkdir()
    for name in ("anchor.pt", "bpe.txt.gz", "specialist_audio.pt", "ckpt.pt", "metrics.json"):
        (full / name).write_text(name)
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: ran.append(command) or subprocess.CompletedProcess(command, 0))
    ablations.run_variant(["python", "train.py"], str(full))  # finished: metrics.json is there
    assert ran == []
    ablations.run_variant(["python", "train.py", "--experts", "1"], str(variant), str(full))
    assert ran == [["python", "train.py", "--experts", "1"]]
    assert sorted(p.name for p in variant.iterdir()) == ["anchor.pt", "bpe.txt.gz", "specialist_audio.pt", "train.log"]
