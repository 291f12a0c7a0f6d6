"""Exercise attention: `clip.attention`, softmax_j(q_i . k_j / sqrt(d)) v_j per head (docs/method.md section 1)."""

import pytest
import torch

from clip import attention

pytestmark = pytest.mark.attention


def test_matches_the_stored_outputs(stored):
    case = stored("attention")
    torch.testing.assert_close(attention(case["q"], case["k"], case["v"]), case["out"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention(case["q"], case["k"], case["v"], causal=True), case["causal_out"],
                               rtol=1e-5, atol=1e-6)


def test_equal_keys_average_the_values():
    q, v = torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)
    k = torch.ones(2, 3, 6, 4)  # every key alike: uniform weights
    out = attention(q, k, v)
    torch.testing.assert_close(out, v.mean(2, keepdim=True).expand_as(out))


def test_scores_are_scaled_by_the_square_root_of_the_head_size():
    """Two keys whose dot products with q differ by sqrt(d) * log 3: weights 3/4 and 1/4."""
    d = 16
    q = torch.zeros(1, 1, 1, d)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 2, d)
    k[..., 0, 0] = d ** 0.5 * torch.log(torch.tensor(3.0))
    v = torch.tensor([[[[1.0] * d, [0.0] * d]]])
    torch.testing.assert_close(attention(q, k, v), torch.full((1, 1, 1, d), 0.75))


def test_causal_queries_do_not_see_later_tokens():
    q, k, v = torch.randn(3, 1, 2, 7, 4).unbind(0)
    out = attention(q, k, v, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 4:], v2[:, :, 4:] = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)  # change tokens 4..6
    out2 = attention(q, k2, v2, causal=True)
    torch.testing.assert_close(out[:, :, :4], out2[:, :, :4])
    assert not torch.allclose(out[:, :, 4:], out2[:, :, 4:])
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])  # the first token sees only itself


def test_heads_are_independent_and_keys_unordered():
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    out = attention(q, k, v)
    order = torch.randperm(5)
    torch.testing.assert_close(attention(q, k[:, :, order], v[:, :, order]), out)  # a set of keys
    k2 = k.clone()
    k2[:, 1] = torch.randn(5, 4)  # another key in head 1 only
    torch.testing.assert_close(attention(q, k2, v)[:, 0], out[:, 0])
