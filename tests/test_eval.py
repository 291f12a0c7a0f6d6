"""Tests for metrics.py and eval.py: retrieval counted by concept (an oracle scores 1, random scores
chance), exact chance levels, what connects each pair of modalities in training, and held-out concepts
scored apart."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as evaluation
import train
from metrics import ANCHOR, BINDING, TEXT, chance_recall_at, class_embeddings, concept_retrieval, connections, zero_shot


def concept_world(n_concepts=6, per_concept=20, captions_per_concept=3, dim=32, seed=0):
    """Items and captions around orthogonal concept directions: items (N, D) with their concepts,
    captions (G, D) with theirs, and the concept directions themselves."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(dim, n_concepts, generator=g)).Q.T  # (C, D) orthonormal
    concepts = [c for c in range(n_concepts) for _ in range(per_concept)]
    gallery_concepts = [c for c in range(n_concepts) for _ in range(captions_per_concept)]
    captions = F.normalize(directions[gallery_concepts] + 0.1 * torch.randn(len(gallery_concepts), dim, generator=g), dim=-1)
    return concepts, captions, gallery_concepts, directions


def test_an_oracle_embedding_retrieves_by_concept_perfectly_both_ways():
    concepts, captions, gallery_concepts, directions = concept_world()
    oracle = directions[concepts]  # each item embedded as its concept's text direction
    result = concept_retrieval(oracle, concepts, captions, gallery_concepts)
    assert result["x2t"]["R@1"] == 1.0 and result["t2x"]["R@1"] == 1.0


def test_random_embeddings_score_about_chance():
    """A random encoder: items and captions both embedded at random, so every ranking is random."""
    concepts, captions, gallery_concepts, _ = concept_world(per_concept=200)
    g = torch.Generator().manual_seed(5)
    random = F.normalize(torch.randn(len(concepts), captions.shape[1], generator=g), dim=-1)
    random_captions = F.normalize(torch.randn(*captions.shape, generator=g), dim=-1)
    result = concept_retrieval(random, concepts, random_captions, gallery_concepts)
    assert result["chance"]["x2t"]["R@1"] == pytest.approx(1 / 6)
    assert result["x2t"]["R@1"] == pytest.approx(1 / 6, abs=0.05)
    assert result["x2t"]["R@5"] == pytest.approx(result["chance"]["x2t"]["R@5"], abs=0.07)


def test_chance_recall_is_the_hypergeometric_count():
    positives = torch.zeros(1, 10, dtype=torch.bool)
    positives[0, :3] = True  # 3 positives among 10
    assert chance_recall_at(positives, 1) == pytest.approx(0.3)
    assert chance_recall_at(positives, 2) == pytest.approx(1 - math.comb(7, 2) / math.comb(10, 2))
    assert chance_recall_at(positives, 10) == 1.0


def test_top5_is_left_out_with_five_classes_or_fewer():
    z, labels = torch.eye(5), torch.arange(5)
    assert "top5" not in zero_shot(z, labels, torch.eye(5))
    assert zero_shot(torch.eye(6), torch.arange(6), torch.eye(6))["top5"] == 1.0


class Set:
    def __init__(self, anchored, captions):
        self.anchored, self.captions = anchored, captions


CONFIG = dict(beta=0.5, targets="soft", lambda_anchor=1.0)


def test_each_pair_is_named_by_what_connects_it_in_training():
    """Anchor images pair a modality with image (Eq. 8), L_xx binds two captioned modalities (Eq. 6),
    and everything else meets only through text: emergent. Each connection goes when its cause goes."""
    sets = {"audio": Set(True, ["the sound of a cube.", None]), "imu": Set(False, ["the motion of a cube."]),
            "depth": Set(True, [None, None])}
    links = connections(CONFIG, sets)
    pair = lambda a, b: links[frozenset((a, b))]
    assert pair("audio", "image") == ANCHOR and pair("imu", "image") == TEXT
    assert pair("audio", "imu") == BINDING
    assert pair("audio", "depth") == TEXT  # depth has no caption: L_xx never sees it
    assert connections({**CONFIG, "beta": 0.0}, sets)[frozenset(("audio", "imu"))] == TEXT
    assert connections({**CONFIG, "lambda_anchor": 0.0}, sets)[frozenset(("audio", "image"))] == TEXT
    hard = {**CONFIG, "targets": "hard"}  # one-hot targets bind only identical captions
    assert connections(hard, sets)[frozenset(("audio", "imu"))] == TEXT
    shared = {**sets, "imu": Set(False, ["the sound of a cube."])}
    assert connections(hard, shared)[frozenset(("audio", "imu"))] == BINDING


@pytest.fixture(scope="module")
def held_out_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("held")
    train.main(["--preset", "smoke", "--modalities", "audio", "depth", "imu", "--held-out", "cube", "--coverage", "1",
                "--out", str(out)])
    return json.loads((out / "metrics.json").read_text()), out


def test_metrics_json_describes_itself(held_out_run):
    from world import World

    metrics, _ = held_out_run
    assert metrics["config"]["held_out"] == ["cube"] and metrics["config"]["preset"] == "smoke"
    assert metrics["classes"]["audio"] == World(4, 0).vocabulary("audio")  # the dataset's own names
    assert metrics["chance"]["audio"] == 0.25
    assert metrics["train_size"]["imu"] == 7 and metrics["train_captioned"]["audio"] == 10  # 48 * 0.15, 48 * 0.2
    pairs = metrics["cross_modal"]
    assert pairs["audio->image"]["connected_by"] == ANCHOR  # audio carries anchor images
    assert pairs["imu->image"]["connected_by"] == TEXT
    assert pairs["audio->imu"]["connected_by"] == BINDING
    assert set(pairs["audio->imu"]) >= {"r1", "chance", "connected_by"}
    assert set(metrics["emergent_r1"]) == {p for p, e in pairs.items() if e["connected_by"] == TEXT}
    assert metrics["unialign"]["emergent_mean"] == pytest.approx(
        sum(metrics["emergent_r1"].values()) / len(metrics["emergent_r1"]))
    assert metrics["unialign"]["zero_shot_top5"] == {}  # 4 classes: top-5 would always be 1
    assert set(metrics["unialign"]["own_anchor_r1"]) == {"audio", "depth"}
    assert set(metrics["prior"]["zero_shot_top1"]) == {"audio", "depth", "imu", "mean"}


def test_without_binding_and_anchors_every_pair_is_emergent(held_out_run, tmp_path):
    _, out = held_out_run
    for name in os.listdir(out):
        if name.startswith(("anchor", "bpe", "prior_", "specialist_")):
            shutil.copy(out / name, tmp_path / name)
    train.main(["--preset", "smoke", "--modalities", "audio", "depth", "imu", "--held-out", "cube", "--coverage", "1",
                "--beta", "0", "--lambda-anchor", "0", "--out", str(tmp_path)])
    pairs = json.loads((tmp_path / "metrics.json").read_text())["cross_modal"]
    assert {e["connected_by"] for e in pairs.values()} == {TEXT}


def test_held_out_concepts_are_scored_apart(held_out_run):
    metrics, out = held_out_run
    u = metrics["unialign"]
    for m in ("audio", "depth"):
        seen, held = u["seen_top1"][m], u["held_out_top1"][m]
        # a quarter of the test set is the held-out concept: the overall top-1 is their weighted mean
        assert u["zero_shot_top1"][m] == pytest.approx(0.75 * seen + 0.25 * held)
    assert "Held-out concepts (cube" in (out / "metrics.md").read_text()


def test_eval_cli_scores_a_manifest_against_typed_class_names(held_out_run, tmp_path):
    """`eval.py --ckpt RUN/ckpt.pt --data MANIFEST --classes ...`: real WAV files of the run's world."""
    from test_train import in_process

    from data import SyntheticDataset
    from test_readers import write_manifest, write_wav

    metrics, out = held_out_run
    sizes = {k: metrics["config"][k] for k in ("image_size", "audio_seconds")}
    world = SyntheticDataset("audio", "test", 8, concepts=4, seed=metrics["config"]["world_seed"], **sizes)
    rows = []
    for i in range(8):
        write_wav(tmp_path / f"{i}.wav", world.raw(i)[:, None] / 2, 16000)
        rows.append({"modality": "audio", "path": f"{i}.wav", "label": world.class_names[world[i]["label"]]})
    manifest = write_manifest(tmp_path, rows)
    classes = ["sphere", "cube", "cylinder", "cone", "banana"]
    code, out_text, err = in_process("eval.py", "--ckpt", str(out / "ckpt.pt"), "--data", str(manifest), "--classes", *classes)
    assert code == 0, err[-2000:]
    result = json.loads((out / "eval_data.json").read_text())[str(manifest)]
    assert result["samples"] == 8 and result["classes"] == 5 and result["chance"] == pytest.approx(0.2)
    assert "| audio | 8 | 5 | 0.200 |" in out_text
    code, _, err = in_process("eval.py", "--ckpt", str(out / "ckpt.pt"), "--data", str(manifest), "--classes", "sphere")
    assert code == 1 and "are not among the 1 class names given" in err
    assert "Traceback" not in err


def test_export_writes_each_test_samples_embedding_with_its_label_and_path(held_out_run, tmp_path):
    from data import build_datasets
    from encoder import embed, load_run

    metrics, out = held_out_run
    counts = evaluation.export(str(out / "ckpt.pt"), str(tmp_path / "z.npz"))
    assert counts == {"audio": 24, "depth": 24, "imu": 24}
    saved = np.load(tmp_path / "z.npz")
    model, _, _, config = load_run(str(out))
    audio = build_datasets(config, "test", ["audio"])["audio"]
    z, labels = embed(model, audio, "cpu")
    assert np.array_equal(saved["audio/embeddings"], z.numpy()) and np.array_equal(saved["audio/labels"], labels.numpy())
    assert list(saved["audio/class_names"]) == metrics["classes"]["audio"]
    assert saved["audio/paths"][3] == "world:audio/test/3"
    with pytest.raises(evaluation.SampleError, match="use .npz"):
        evaluation.export(str(out / "ckpt.pt"), str(tmp_path / "z.npy"))


def test_merged_scores_each_modality_with_its_own_update_folded_in_and_leaves_the_routed_scores(held_out_run):
    from encoder import embed, load_run
    from data import build_datasets

    metrics, out = held_out_run
    merged = evaluation.evaluate(str(out), merged=True)
    assert merged["unialign"]["zero_shot_top1"] == metrics["unialign"]["zero_shot_top1"]  # each merge is undone
    model, clip, bpe, config = load_run(str(out))
    depth = build_datasets(config, "test", ["depth"])["depth"]
    z, labels = embed(model.merge("depth"), depth, "cpu")
    text = class_embeddings(clip, bpe, evaluation.MODALITIES["depth"].prompts, depth.class_names, "cpu")
    assert merged["unialign"]["merged_top1"]["depth"] == zero_shot(z, labels, text)["top1"]
    assert "UniAlign merged" in (out / "metrics.md").read_text()


@pytest.mark.parametrize("scope", ["linear", "block"])
def test_routing_entropy_is_the_entropy_of_what_each_router_reads(scope):
    """With dense routing (k = E) the gates are the routing distribution itself: routing_entropy's
    trained entropies are those of the gates `route` returns, per layer, whether a router reads its
    linear's input or its block's ln_1(x)."""
    from test_encoder import SETTINGS, UNIALIGN_INPUTS, tiny_clip
    from encoder import UniAlign

    model = UniAlign(tiny_clip(), list(UNIALIGN_INPUTS), SETTINGS, experts=3, rank=4, top_k=3, router_scope=scope).eval()
    with torch.no_grad():
        for adapter in model.adapters:
            for router in adapter.routers.values():
                router.weight.normal_()
    gates = {id(a): [] for a in model.adapters}
    for adapter in model.adapters:
        route = adapter.route
        adapter.route = lambda x, m, route=route, keep=gates[id(adapter)]: keep.append(route(x, m)) or keep[-1]
    g = torch.Generator().manual_seed(3)

    class Set:
        modality = "imu"

        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {"input": torch.randn(*UNIALIGN_INPUTS["imu"], generator=g)}

    with torch.no_grad():
        result = evaluation.routing_entropy(model, Set(), "cpu")
    entropy = lambda p: -(p * p.clamp_min(1e-12).log()).sum(-1).mean().item()
    per_adapter = [entropy(torch.cat([x.flatten(0, -2) for x in gates[id(a)]])) for a in model.adapters]
    per_layer = [sum(per_adapter[4 * k:4 * k + 4]) / 4 for k in range(len(per_adapter) // 4)]
    assert result["trained"] == pytest.approx(per_layer, rel=1e-4)
