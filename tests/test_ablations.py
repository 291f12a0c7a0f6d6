"""Tests for ablations.py: every variant is a valid train.py flag set changing only UniAlign's settings,
the matched controls have the ranks they claim, comparisons are paired over seeds with the verdict
rule of the report, and finished variants are reused while new ones get the seed's shared stages."""

import json
import statistics
import subprocess

import pytest

import ablations
import config


def test_every_variant_is_an_ordinary_train_py_flag_set_changing_only_unialign_settings():
    full = vars(config.get_args(["--preset", "course"]))
    changed = {}
    for key, (_, flags) in ablations.variants("course").items():
        args = vars(config.get_args(["--preset", "course", *flags]))
        changed[key] = {k: args[k] for k in full if args[k] != full[k]}
    assert changed == {"full": {}, "no_moe": {"experts": 1, "top_k": 1}, "shared_router": {"router": "shared"},
                       "block_router": {"router_scope": "block"},
                       "lora_params": {"experts": 1, "top_k": 1, "rank": 32},  # E * r = 4 * 8
                       "lora_compute": {"experts": 1, "top_k": 1, "rank": 16},  # k * r = 2 * 8
                       "hard_targets": {"targets": "hard"}, "no_xx": {"beta": 0.0}, "no_anchor": {"lambda_anchor": 0.0},
                       "no_prior": {"lambda_prior": 0.0}}
    assert all(set(keys) <= config.UNIALIGN_ONLY for keys in changed.values())  # so the shared stages are reused


def test_paired_differences_and_the_verdict_rule():
    # every seed agrees and the mean is far beyond 2 SE: holds
    d = ablations.paired([0.50, 0.52, 0.49], [0.60, 0.63, 0.58])
    assert d["mean"] == pytest.approx(-0.1) and d["agree"] == 3 and d["holds"]
    assert d["se"] == pytest.approx(statistics.stdev([-0.10, -0.11, -0.09]) / 3 ** 0.5)
    # unpaired, the spreads overlap; paired, the difference is the same every seed: it holds
    d = ablations.paired([0.50, 0.60, 0.70], [0.51, 0.61, 0.71])
    assert d["holds"] and d["mean"] == pytest.approx(-0.01)
    # one seed disagrees: within noise whatever the mean
    d = ablations.paired([0.50, 0.52, 0.61], [0.60, 0.63, 0.58])
    assert d["agree"] == 2 and not d["holds"] and ablations.verdict(d, -1) == "within noise"
    # far beyond 2 SE, but one seed of ten disagrees: within noise
    d = ablations.paired([0.5] * 9 + [0.61], [0.6] * 9 + [0.6])
    assert abs(d["mean"]) > 2 * d["se"] and d["agree"] == 9 and not d["holds"]
    # all agree but |mean| <= 2 SE
    d = ablations.paired([0.59, 0.50, 0.595], [0.60, 0.60, 0.60])
    assert d["agree"] == 3 and abs(d["mean"]) < 2 * d["se"] and not d["holds"]
    assert ablations.verdict(ablations.paired([0.7, 0.72], [0.6, 0.61]), -1) == "opposite"


def fake_metrics(top1, scarce, renamed):
    """A run's metrics.json: audio (2,000 training samples) and imu (300), each top-1 given."""
    return {"unialign": {"zero_shot_top1": {"audio": top1, "imu": scarce, "mean": (top1 + scarce) / 2},
                         "other_names_top1": {"audio": top1 - 0.1}, "own_anchor_r1": {"audio": {"r1": 0.3, "chance": 0.1}},
                         "held_out_top1": {"audio": 0.2}, "trainable_params": 1000,
                         "adapter_macs_per_token": {"routed": 10, "computed": 20}},
            "specialists": {"zero_shot_top1": {"audio": 0.5, "imu": 0.4, "mean": 0.45}, "trainable_params": 1200},
            "chance": {"audio": 0.1, "imu": 0.1, "mean": 0.1}, "train_size": {"audio": 2000, "imu": 300},
            "train_captioned": {"audio": 400, "imu": 300},
            "cross_modal": {"audio->imu": {"r1": 0.4, "chance": 0.1, "renamed_r1": renamed, "connected_by": "x"},
                            "audio->image": {"r1": 0.9, "chance": 0.2, "connected_by": "y"}}}


def test_collect_pairs_each_variant_with_full_seed_by_seed(tmp_path):
    runs = {"full": [(0.60, 0.50, 0.40), (0.70, 0.52, 0.44)], "hard_targets": [(0.60, 0.50, 0.30), (0.71, 0.52, 0.33)]}
    for key, per_seed in runs.items():
        for seed, values in enumerate(per_seed):
            (tmp_path / f"seed{seed}" / key).mkdir(parents=True)
            (tmp_path / f"seed{seed}" / key / "metrics.json").write_text(json.dumps(fake_metrics(*values)))
    result = ablations.collect(str(tmp_path), [0, 1], list(runs))
    renamed = result["differences"]["hard_targets"]["renamed_r1"]
    assert renamed["per_seed"] == pytest.approx([-0.10, -0.11]) and renamed["holds"]
    top1 = result["differences"]["hard_targets"]["top1:audio"]
    assert top1["per_seed"] == pytest.approx([0.0, 0.01]) and not top1["holds"]
    assert result["rows"]["full"]["top1_scarce"]["mean"] == pytest.approx(0.51)  # imu is scarce: < half of 2,000
    # UniAlign's gain over the specialists: imu +0.10, +0.12; audio +0.10, +0.20 -> scarce minus rich 0.0, -0.08
    gain = result["differences"]["specialists"]["scarce_gain"]
    assert gain["per_seed"] == pytest.approx([0.0, -0.08])
    claims = {(c["variant"], c["measure"]): c for c in result["claims"]}
    assert claims[("hard_targets", "renamed_r1")]["holds"] and ablations.verdict(claims[("hard_targets", "renamed_r1")], -1) == "holds"
    text = ablations.report(result, {"full": "full UniAlign"}, {"preset": "course", "seeds": [0, 1], "world_seed": 0,
                                                                "held_out": ["cone"]})
    assert "-0.105 +- 0.005 (2/2) **holds**" in text and "audio 2000 (400), imu 300" in text


def test_summary_gives_each_modality_over_runs_and_pairs_unialign_with_the_specialists_run_by_run():
    runs = [fake_metrics(0.60, 0.50, 0.4), fake_metrics(0.64, 0.52, 0.4)]  # specialists: audio 0.5, imu 0.4
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in ablations.summary(runs).splitlines()
            if line.startswith("| ") and "---" not in line}
    audio, imu = rows["audio"], rows["imu"]
    assert audio[1:3] == ["2000 (400)", "0.100"] and imu[1] == "300"  # imu: every sample captioned
    assert audio[6] == f"**0.620 +- {statistics.stdev([0.60, 0.64]):.3f}**" and audio[5] == "0.500 +- 0.000"
    assert audio[7] == "+0.120 +- 0.020 (2/2) **holds** |"  # differences +0.10 and +0.14, paired
    assert imu[7] == "+0.110 +- 0.010 (2/2) **holds** |" and audio[3] == audio[4] == "-"  # no raw or prior block


def test_a_finished_variant_is_reused_and_a_new_one_gets_the_shared_stages(tmp_path, monkeypatch):
    full, variant = tmp_path / "full", tmp_path / "no_moe"
    full.mkdir()
    for name in ("anchor.pt", "bpe.txt.gz", "prior_audio.pt", "specialist_audio.pt", "ckpt.pt", "metrics.json"):
        (full / name).write_text(name)
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: ran.append(command) or subprocess.CompletedProcess(command, 0))
    ablations.run_variant(["python", "train.py"], str(full))  # finished: metrics.json is there
    assert ran == []
    ablations.run_variant(["python", "train.py", "--experts", "1"], str(variant), str(full))
    assert ran == [["python", "train.py", "--experts", "1"]]
    (variant / "ckpt.pt").write_text("an attempt stopped half-way")
    ablations.run_variant(["python", "train.py", "--experts", "1"], str(variant), str(full))
    assert ran[-1] == ["python", "train.py", "--experts", "1", "--resume"]
    assert sorted(p.name for p in variant.iterdir()) == ["anchor.pt", "bpe.txt.gz", "ckpt.pt", "prior_audio.pt",
                                                        "specialist_audio.pt", "train.log"]


def test_across_holds_a_claim_only_where_it_holds_on_every_world(tmp_path):
    def lab(world, anchored, prior):
        claims = [{"variant": "no_anchor", "measure": "top1_anchored", **ablations.paired(anchored, [0.5, 0.5, 0.5])},
                  {"variant": "no_prior", "measure": "top1_scarce", **ablations.paired(prior, [0.5, 0.5, 0.5])}]
        (tmp_path / f"w{world}").mkdir()
        (tmp_path / f"w{world}" / "ablations.json").write_text(json.dumps({"settings": {"world_seed": world},
                                                                           "claims": claims}))
        return str(tmp_path / f"w{world}")

    table = ablations.across([lab(0, [0.3, 0.31, 0.29], [0.4, 0.41, 0.39]), lab(1, [0.3, 0.32, 0.3], [0.45, 0.52, 0.5])])
    rows = {line.split(" | ")[1]: line for line in table.splitlines()[2:]}
    assert rows["top1_anchored"].endswith("| holds |") and rows["top1_anchored"].count(" holds") == 3
    assert rows["top1_scarce"].endswith("| on some worlds only |") and "within noise" in rows["top1_scarce"]
