"""Exercise conv_tokenizer: `ConvTokenizer.forward` (docs/method.md section 1)."""

import pytest
import torch

from tokenizers import ConvTokenizer

pytestmark = pytest.mark.conv_tokenizer


def tokenizer_from(case):
    tokenizer = ConvTokenizer(torch.nn.Conv2d(3, 8, 4, stride=4, bias=False), grid=(2, 2))
    with torch.no_grad():
        tokenizer.conv.weight.copy_(case["conv_weight"])
        tokenizer.positional_embedding.copy_(case["positional_embedding"])
    return tokenizer


def test_matches_the_stored_tokens(stored):
    case = stored("conv_tokenizer")
    tokens = tokenizer_from(case)(case["x"])
    assert tokens.shape == (2, 4, 8)  # (B, grid cells, width)
    torch.testing.assert_close(tokens, case["tokens"], rtol=1e-5, atol=1e-6)


def test_another_input_size_interpolates_the_positions(stored):
    case = stored("conv_tokenizer")
    tokens = tokenizer_from(case)(case["wider"])  # 8 x 12 pixels: a 2 x 3 grid
    assert tokens.shape == (1, 6, 8)
    torch.testing.assert_close(tokens, case["wider_tokens"], rtol=1e-5, atol=1e-6)


def test_a_blank_image_gives_the_positional_embedding(stored):
    tokenizer = tokenizer_from(stored("conv_tokenizer"))
    tokens = tokenizer(torch.zeros(3, 3, 8, 8))
    for row in tokens:  # the conv has no bias: each token is its cell's position alone
        torch.testing.assert_close(row, tokenizer.positional_embedding.detach())


def test_each_token_sees_its_own_patch_in_row_major_order(stored):
    tokenizer = tokenizer_from(stored("conv_tokenizer"))
    base = torch.randn(1, 3, 8, 8)
    for row in range(2):
        for col in range(2):
            x = base.clone()
            x[..., 4 * row:4 * row + 4, 4 * col:4 * col + 4] += 1.0  # change one 4 x 4 patch
            changed = (tokenizer(x) - tokenizer(base)).abs().amax(-1)[0] > 1e-6  # (4,) which tokens moved
            assert changed.tolist() == [i == 2 * row + col for i in range(4)]


def test_gradients_reach_the_conv_and_the_positions(stored):
    tokenizer = tokenizer_from(stored("conv_tokenizer"))
    tokenizer(torch.randn(2, 3, 8, 8)).square().sum().backward()
    assert tokenizer.conv.weight.grad.abs().sum() > 0
    assert tokenizer.positional_embedding.grad.abs().sum() > 0
