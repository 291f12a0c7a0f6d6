"""Tests for bpe.py: CLIP's byte-level BPE.

Expected values are OpenAI's behaviour (SimpleTokenizer / clip.tokenize), checked by hand against
the reference while writing; the reference itself (ftfy, regex) is not a dependency.
"""

import gzip

import pytest
import torch

from bpe import BPETokenizer, clean, pretokenize

CAPTIONS = [f"{article} {kind} of a {colour} {shape}."
            for article, kind in [("a", "photo"), ("a", "depth map"), ("the", "sound")]
            for colour in ["red", "green", "blue"]
            for shape in ["cube", "sphere", "torus", "cone"]]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return BPETokenizer.train(CAPTIONS, 540, tmp_path_factory.mktemp("bpe") / "bpe.txt.gz")


@pytest.mark.parametrize("text, words", [
    ("it's 2024, they'LL see!!", ["it", "'s", "2", "0", "2", "4", ",", "they", "'LL", "see", "!!"]),
    ("don't 'll'd'x", ["don", "'t", "'ll", "'d", "'", "x"]),
    ("a.b...c !!'s", ["a", ".", "b", "...", "c", "!!'", "s"]),  # contractions only start a match
    ("привет мир 東京タワー مرحبا", ["привет", "мир", "東京タワー", "مرحبا"]),
    ("नमस्ते", ["नमस", "्", "त", "े"]),  # virama and vowel signs are marks, not letters
    ("٣4½ e\u0301", ["٣", "4", "½", "e", "\u0301"]),  # any number character is its own word
    ("👍🏽! ok", ["👍🏽!", "ok"]),
    ("<|endoftext|>x", ["<|endoftext|>", "x"]),
])
def test_pretokenize_follows_openai_regex(text, words):
    assert pretokenize(text) == words


def test_clean_does_what_ftfy_and_openai_do():
    text = "  Cafe\u0301 &amp;amp; “Quotes”\u00a0 ﬁne\n\nＡＢＣ\x1b[31m! it’S "
    assert clean(text) == "café & \"quotes\" fine abc! it's"


def test_training_merges_most_frequent_pair_first(tmp_path):
    # pairs: (l, o) x4; then (lo, w</w>) and (w, e) tie at 3, the smaller string wins; then (w, e)
    tok = BPETokenizer.train(["low low low lower newest newest"], 512 + 3 + 2, tmp_path / "bpe.txt.gz")
    lines = gzip.decompress((tmp_path / "bpe.txt.gz").read_bytes()).decode().split("\n")
    assert lines == ["#version: 0.2", "l o", "lo w</w>", "w e"]
    assert tok.encode("LOW") == [512 + 1]  # merge i has id 512 + i


def test_special_ids_come_last_and_eot_is_largest(bpe):
    assert bpe.vocab_size == 540
    assert (bpe.sot, bpe.eot) == (538, 539)
    assert all(i < bpe.eot for i in bpe.encode(" ".join(CAPTIONS) + " unseen words, ωmega!"))


@pytest.mark.parametrize("text, decoded", [
    ("A Photo of a CUBE.", "a photo of a cube . "),
    ("Ωmega, 3 blue tori!", "ωmega , 3 blue tori ! "),  # unseen characters fall back to bytes
])
def test_decode_inverts_encode(bpe, text, decoded):
    assert bpe.decode(bpe.encode(text)) == decoded


def test_round_trip_of_training_captions(bpe):
    for caption in CAPTIONS:
        assert bpe.decode(bpe.encode(caption)) == "".join(w + " " for w in pretokenize(clean(caption)))


def test_training_stops_when_every_word_is_one_symbol(tmp_path):
    tok = BPETokenizer.train(CAPTIONS, 5000, tmp_path / "bpe.txt.gz")
    assert tok.vocab_size < 5000 and tok.eot == tok.vocab_size - 1
    for caption in CAPTIONS:
        assert len(tok.encode(caption)) == len(pretokenize(clean(caption)))


def test_call_pads_like_clip_tokenize(bpe):
    out = bpe(["a red cube.", "the sound of a green sphere."], context_length=16)
    assert out.dtype == torch.long and out.shape == (2, 16)
    ids = bpe.encode("a red cube.")
    assert out[0].tolist() == [bpe.sot, *ids, bpe.eot] + [0] * (16 - len(ids) - 2)
    assert torch.equal(bpe("a red cube.", context_length=16), out[:1])
    assert out.argmax(-1).tolist() == [len(ids) + 1, len(bpe.encode("the sound of a green sphere.")) + 1]


def test_too_long_text_raises_or_truncates(bpe):
    text = "a red cube and a blue cone and a green torus"
    with pytest.raises(ValueError, match="a red cube and a blue cone"):
        bpe(text, context_length=6)
    out = bpe(text, context_length=6, truncate=True)
    assert out[0].tolist() == [bpe.sot, *bpe.encode(text)[:4], bpe.eot]


def test_written_file_reloads_to_the_same_tokenizer(bpe, tmp_path):
    path = tmp_path / "again.txt.gz"
    trained = BPETokenizer.train(CAPTIONS[::-1], 540, path)  # caption order does not matter
    reloaded = BPETokenizer(path)
    assert reloaded.decoder == trained.decoder == bpe.decoder
    assert reloaded.encode("the blue torus, ωmega") == bpe.encode("the blue torus, ωmega")
