"""Exercise bpe_merges: `bpe.learn_merges`, the BPE merge loop behind CLIP's tokenizer (docs/method.md section 3)."""

import pytest

from bpe import learn_merges

pytestmark = pytest.mark.bpe_merges


def test_matches_the_stored_merges(stored):
    case = stored("bpe_merges")
    words = {tuple(symbols): count for symbols, count in case["words"]}
    assert learn_merges(words, case["n_merges"]) == [tuple(pair) for pair in case["merges"]]


def test_the_most_frequent_pair_first_counting_word_frequencies():
    words = {("l", "o", "w</w>"): 5, ("l", "o", "w", "e", "r</w>"): 2, ("n", "e", "w", "e", "s", "t</w>"): 6,
             ("w", "i", "d", "e", "s", "t</w>"): 3}
    # (e, s) and (s, t</w>) both occur 9 times: the smaller pair in string order wins the tie
    assert learn_merges(words, 3) == [("e", "s"), ("es", "t</w>"), ("l", "o")]


def test_a_merge_applies_to_every_occurrence_left_to_right():
    """After merging (a, a), "a a a" is "aa a", not "a aa": the next merge sees (aa, a</w>)."""
    merges = learn_merges({("a", "a", "a</w>"): 1}, 2)
    assert merges == [("a", "a"), ("aa", "a</w>")]


def test_stops_when_every_word_is_one_symbol():
    assert learn_merges({("h", "i</w>"): 3, ("o", "k</w>"): 1}, 10) == [("h", "i</w>"), ("o", "k</w>")]
    assert learn_merges({("h", "i</w>"): 3}, 0) == []
