"""Behaviour of one UniAlign training step, pinned down so that a broken step fails a test: rows stay
with their samples, the objective meets each row's own caption, anchor and prior at CLIP's
temperature, anchor images are encoded, every loss weight scales exactly its own term, and training
a tiny world improves zero-shot accuracy over the untrained model by a clear margin."""

import json

import pytest
import torch
import torch.nn.functional as F

import objectives
import train
from data import collate
from losses import soft_targets, unialign_loss
from test_clip import tiny_clip
from test_encoder import tiny_unialign

SIZES = {"depth": (1, 32, 32), "imu": (6, 40), "point": (64, 3)}


def mixed_batch(n=9, seed=0):
    """A collated batch whose samples interleave three modalities; depth samples carry anchor images."""
    g = torch.Generator().manual_seed(seed)
    order = ["imu", "depth", "point", "imu", "imu", "depth", "point", "depth", "imu"][:n]
    samples = [{"modality": m, "input": torch.randn(*SIZES[m], generator=g), "text": f"caption {k % 4}", "label": k % 4,
                "anchor_image": torch.randn(3, 32, 32, generator=g) if m == "depth" else None, "prior": None}
               for k, m in enumerate(order)]
    return samples, collate(samples)


def text_of(texts):
    table = F.normalize(torch.randn(9, 32, generator=torch.Generator().manual_seed(3)), dim=-1)
    return table[torch.tensor([int(t.split()[-1]) for t in texts])]


def test_grouped_embeddings_land_on_their_own_rows():
    """scatter_groups puts each modality's embeddings back where its samples were, row by row."""
    model = tiny_unialign()
    with torch.no_grad():
        for adapter in model.adapters:
            adapter.lora_B.normal_()
    samples, batch = mixed_batch()
    z, _ = model(batch["inputs"])
    grouped = objectives.scatter_groups(z, batch["index"], len(samples))
    for k, sample in enumerate(samples):
        alone, _ = model.encode(sample["modality"], sample["input"][None])
        torch.testing.assert_close(grouped[k], alone[0], rtol=1e-4, atol=1e-5, msg=f"row {k}")


def objective_parts(args, batch, clip):
    model = tiny_unialign()
    loss, parts = objectives.unialign_objective(clip, text_of, args)(model, batch)
    return loss, parts


def test_the_objective_meets_each_rows_own_caption_anchor_and_prior_at_clips_temperature():
    """unialign_objective on a hand-made batch equals Eq. 10 computed from each sample encoded alone,
    with its own caption (two depth rows have none), its own anchor image and its own prior, at
    tau = 1 / CLIP's logit scale (set to 1 / 0.05 here, apart from every other temperature)."""
    clip = tiny_clip()
    with torch.no_grad():
        clip.logit_scale.fill_(torch.log(torch.tensor(1 / 0.05)))
    model = tiny_unialign()
    with torch.no_grad():
        for adapter in model.adapters:
            adapter.lora_B.normal_()
    g = torch.Generator().manual_seed(7)
    samples, _ = mixed_batch()
    samples = [{**s, "text": None if k in (1, 7) else f"caption {k}", "prior": torch.randn(12, generator=g)}
               for k, s in enumerate(samples)]  # every caption distinct, depth rows 1 and 7 without one
    batch = collate(samples)
    args = train.get_args(["--preset", "smoke", "--lambda-bal", "0"])
    _, parts = objectives.unialign_objective(clip, text_of, args, {m: 12 for m in SIZES})(model, batch)
    with torch.no_grad():
        z = torch.cat([model.encode(s["modality"], s["input"][None])[0] for s in samples])
        captioned = torch.tensor([s["text"] is not None for s in samples])
        t = text_of([s["text"] for s in samples if s["text"] is not None])
        anchored = torch.tensor([s["anchor_image"] is not None for s in samples])
        v = torch.zeros_like(z)
        v[anchored] = F.normalize(clip.encode_image(torch.stack([s["anchor_image"] for s in samples
                                                                 if s["anchor_image"] is not None])), dim=-1)
        priors = [(rows, torch.stack([samples[k]["prior"] for k in rows.tolist()]))
                  for rows in (torch.tensor([k for k, s in enumerate(samples) if s["modality"] == m]) for m in SIZES)]
    _, expected = unialign_loss(z, t, 0.05, y=soft_targets(t, args.tau_s), caption_mask=captioned, beta=args.beta,
                                v=v, anchor_mask=anchored, tau_kd=args.tau_kd, gamma=args.gamma, lambda_anchor=1.0,
                                priors=priors, lambda_prior=1.0, lambda_bal=0.0)
    for term in ("xt", "xx", "anchor", "prior"):
        assert parts[term] == pytest.approx(expected[term], rel=1e-4, abs=1e-6), term


def test_each_loss_weight_changes_the_objective_by_exactly_its_term():
    clip = tiny_clip()
    _, batch = mixed_batch()
    base = train.get_args(["--preset", "smoke", "--lambda-anchor", "0", "--lambda-prior", "0", "--lambda-bal", "0",
                           "--beta", "0"])
    loss0, parts0 = objective_parts(base, batch, clip)
    assert loss0.item() == pytest.approx(parts0["xt"], rel=1e-6)
    for flag, term in (("--lambda-anchor", "anchor"), ("--lambda-bal", "bal"), ("--beta", "xx")):
        args = train.get_args(["--preset", "smoke", "--lambda-anchor", "0", "--lambda-prior", "0", "--lambda-bal", "0",
                               "--beta", "0", flag, "0.7"])
        loss, parts = objective_parts(args, batch, clip)
        assert parts[term] > 0, term
        assert loss.item() - loss0.item() == pytest.approx(0.7 * parts[term], rel=1e-4), flag


def test_the_prior_weight_scales_the_prior_term():
    clip = tiny_clip()
    samples, _ = mixed_batch()
    prior = torch.randn(len(samples), 12, generator=torch.Generator().manual_seed(4))
    batch = collate([{**s, "prior": prior[k]} for k, s in enumerate(samples)])
    dims = {m: 12 for m in SIZES}
    losses = {}
    for weight in ("0", "0.7"):
        args = train.get_args(["--preset", "smoke", "--lambda-prior", weight])
        losses[weight], parts = objectives.unialign_objective(clip, text_of, args, dims)(tiny_unialign(), batch)
    assert parts["prior"] > 0
    assert losses["0.7"].item() - losses["0"].item() == pytest.approx(0.7 * parts["prior"], rel=1e-4)


def test_anchor_images_are_encoded_by_the_frozen_image_tower():
    """The anchor term reads the anchor images: changing one changes it, and its teacher v is CLIP's image embedding."""
    clip = tiny_clip()
    samples, batch = mixed_batch()
    args = train.get_args(["--preset", "smoke"])
    _, parts = objective_parts(args, batch, clip)
    changed = collate([{**s, "anchor_image": -s["anchor_image"]} if s["anchor_image"] is not None else s
                       for s in samples])
    _, parts_changed = objective_parts(args, changed, clip)
    assert abs(parts["anchor"] - parts_changed["anchor"]) > 1e-3
    # with z equal to the anchor's own image embedding, the feature term of Eq. 8 vanishes
    z = F.normalize(clip.encode_image(batch["anchor_image"]), dim=-1).detach()
    from losses import anchor_distillation_loss
    cosine_free = anchor_distillation_loss(z, z, text_of(batch["text"]), args.tau_kd, gamma=1.0)
    assert cosine_free.item() == pytest.approx(0.0, abs=1e-5)


def test_a_tiny_world_learns_over_its_untrained_model(tmp_path):
    """End to end: one tiny world and anchor, UniAlign trained for 100 steps against 1 step."""
    import shutil
    flags = ["--preset", "smoke", "--concepts", "4", "--modalities", "imu", "eeg", "--n-train", "160", "--n-test", "48",
             "--anchor-steps", "60", "--specialist-steps", "1", "--prior", "none", "--lambda-prior", "0",
             "--batch-size", "32", "--warmup", "0"]
    trained, untrained = tmp_path / "trained", tmp_path / "untrained"
    train.main([*flags, "--steps", "100", "--out", str(trained)])
    untrained.mkdir()
    for stage in ["anchor.pt", "bpe.txt.gz", "specialist_imu.pt", "specialist_eeg.pt"]:
        shutil.copy(trained / stage, untrained / stage)
    train.main([*flags, "--steps", "1", "--out", str(untrained)])
    top1 = {out.name: json.loads((out / "metrics.json").read_text())["unialign"]["zero_shot_top1"]["mean"]
            for out in (trained, untrained)}
    assert top1["trained"] > top1["untrained"] + 0.2, top1
