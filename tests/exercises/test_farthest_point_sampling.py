"""Exercise farthest_point_sampling: `farthest_point_sampling` of the point-cloud tokenizer (docs/method.md section 1)."""

import pytest
import torch

from tokenizers import farthest_point_sampling

pytestmark = pytest.mark.farthest_point_sampling


def test_matches_the_stored_picks(stored):
    case = stored("farthest_point_sampling")
    picked = farthest_point_sampling(case["xyz"], case["n"])
    assert picked.dtype == torch.long and picked.shape == (2, case["n"])
    assert picked.tolist() == case["picked"].tolist()


def test_starts_at_point_zero_and_never_picks_twice():
    picked = farthest_point_sampling(torch.rand(3, 50, 3), 20)
    assert (picked[:, 0] == 0).all()
    assert all(len(set(row.tolist())) == 20 for row in picked)


def test_each_pick_is_the_point_farthest_from_those_before_it():
    xyz = torch.rand(2, 60, 3, dtype=torch.float64)
    picked = farthest_point_sampling(xyz, 15)
    for cloud, row in zip(xyz, picked):
        for i in range(1, 15):
            to_set = torch.cdist(cloud, cloud[row[:i]]).amin(-1)  # every point's distance to the picks so far
            assert to_set[row[i]] == to_set.max()


def test_picking_every_point_is_a_permutation():
    picked = farthest_point_sampling(torch.rand(1, 12, 3), 12)
    assert sorted(picked[0].tolist()) == list(range(12))


def test_picks_spread_over_a_cloud_dense_in_one_corner():
    """On a cloud that is dense in one corner, the picks cover the whole cube."""
    gen = torch.Generator().manual_seed(0)
    cloud = torch.cat([0.05 * torch.rand(1, 200, 3, generator=gen), torch.rand(1, 20, 3, generator=gen)], dim=1)
    picked = farthest_point_sampling(cloud, 8)[0]
    assert (picked >= 200).sum() >= 6  # most picks are outside the dense corner
