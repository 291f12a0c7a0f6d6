"""Tests for the flags of docs/method.md's choices that are ours (--router-scope, --token-positions,
--depth-format): which stages they shape (config.stage_settings), and that train.make_model hands
them to the model and the readers."""

import torch

import config
import train
from data import sizes_of
from test_clip import tiny_clip

FLAGS = ["--preset", "smoke", "--device", "cpu", "--router-scope", "block", "--token-positions", "clip",
         "--depth-format", "sunrgbd"]


def test_defaults_keep_todays_behaviour():
    args = config.get_args(["--preset", "smoke"])
    assert (args.router_scope, args.token_positions, args.depth_format) == ("linear", "random", "mm")


def test_router_scope_shapes_unialign_only_and_tokens_and_depth_the_specialists_too():
    args = config.get_args(FLAGS)
    anchor, specialist, unialign = (config.stage_settings(args, s) for s in ("anchor", "specialist", "unialign"))
    assert "router_scope" in unialign and "router_scope" not in specialist  # the specialists have no router (E = 1)
    for key in ("token_positions", "depth_format"):  # the specialists read and tokenize depth too; the anchor does not
        assert key in specialist and key in unialign and key not in anchor
    assert sizes_of(vars(args))["depth_format"] == "sunrgbd"  # what the depth reader gets (modalities.py)


def test_make_model_builds_what_the_flags_say():
    args = config.get_args(FLAGS)
    clip = tiny_clip()
    sets = {"depth": [{"input": torch.zeros(1, 32, 32)}], "imu": [{"input": torch.zeros(6, 40)}]}
    model, model_args = train.make_model(clip, ["depth", "imu"], sets, args, experts=2, top_k=1, rank=4)
    assert model_args["router_scope"] == "block" and model_args["token_positions"] == "clip"  # saved in checkpoints
    assert all(a.router_input is not None for a in model.adapters)
    assert torch.equal(model.tokenizers["depth"].positional_embedding, clip.visual.positional_embedding[1:])


def test_what_a_specialist_or_prior_model_is_built_from_shapes_those_stages():
    """--adapt picks the linears a specialist's and a prior model's LoRA sits in, so it shapes those
    stages: a specialist or cached prior made with other linears is not taken for this run's."""
    args = config.get_args(["--preset", "smoke", "--adapt", "in_proj", "c_fc"])
    clip, sets = tiny_clip(), {"imu": [{"input": torch.zeros(6, 40)}]}
    _, model_args = train.make_model(clip, ["imu"], sets, args, experts=1, top_k=1, rank=args.specialist_rank)
    assert model_args["targets"] == ("in_proj", "c_fc")
    for stage in ("prior", "specialist"):
        assert config.stage_settings(args, stage)["adapt"] == ["in_proj", "c_fc"], stage
    assert "adapt" not in config.stage_settings(args, "anchor")
