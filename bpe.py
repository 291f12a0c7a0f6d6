"""CLIP's byte-level BPE, the text tokenizer of the frozen text tower (docs/method.md section 1).

Top to bottom: cleaning (the part of ftfy that CLIP relies on, then HTML unescaping, whitespace
collapse, lowercasing), pre-tokenisation into words, the byte <-> character map, and
`BPETokenizer`, which reads CLIP's merges file (`bpe_simple_vocab_16e6.txt.gz`) or learns its own
from captions (the tiny anchor CLIP of docs/method.md section 5). On CLIP's file it gives the ids of
OpenAI's `SimpleTokenizer` and `clip.tokenize`.
"""

import gzip
import html
import html.entities
import re
import unicodedata
from collections import Counter
from pathlib import Path

import torch

SPECIAL = ("<|startoftext|>", "<|endoftext|>")
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
CLIP_MERGES = 49152 - 256 - 2  # OpenAI reads lines [1 : CLIP_MERGES + 1] of its merges file


# ----------------------------------------------------------------------------------------------
# Cleaning: OpenAI runs ftfy.fix_text, html.unescape twice, collapses whitespace and lowercases.
# ----------------------------------------------------------------------------------------------

def _html_entities():
    """ftfy's entity table: HTML5 names with ';', plus upper-cased lowercase names (&NTILDE; -> Ñ)."""
    table = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            table["&" + name] = char
            upper = "&" + name.upper()
            if name == name.lower() and html.unescape(upper) == upper:
                table[upper] = char.upper()
    return table


HTML_ENTITIES = _html_entities()
LIGATURES = "ĲĳŉǱǲǳǄǅǆǇǈǉǊǋǌﬀﬁﬂﬃﬄﬅﬆ"  # split into their compatibility decomposition (ﬁ -> fi)
CHARACTER_FIXES = str.maketrans(
    {c: "".join(chr(int(h, 16)) for h in unicodedata.decomposition(c).split()[1:]) for c in LIGATURES}
    | {i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)}  # full/half width
    | dict.fromkeys([0x02BC, *range(0x2018, 0x201C)], "'") | dict.fromkeys(range(0x201C, 0x2020), '"')
)
CONTROL_CHARS = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F,
                               *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)])


def _fix_segment(text, unescape):
    """ftfy's fixers, in ftfy's order, repeated until nothing changes."""
    while True:
        before = text
        if unescape:
            text = re.sub(r"&#?[0-9A-Za-z]{1,24};", _unescape_entity, text)
        text = re.sub("[\x80-\x9f]", _c1_as_windows_1252, text)
        text = text.translate(CHARACTER_FIXES)
        text = re.sub("[\ud800-\udbff][\udc00-\udfff]",
                      lambda m: m[0].encode("utf-16", "surrogatepass").decode("utf-16"), text)
        text = re.sub("[\ud800-\udfff]", "\ufffd", text)
        text = re.sub(r"\x1b\[[\d;]*[a-zA-Z]", "", text)  # terminal colour codes, before ESC is removed
        text = unicodedata.normalize("NFC", text.translate(CONTROL_CHARS))
        if text == before:
            return text


def _c1_as_windows_1252(match):
    """C1 control characters are almost always Windows-1252 bytes read as Latin-1 (\x92 -> ’)."""
    return match[0].encode("latin-1").decode("cp1252", "ignore") or match[0]


def _unescape_entity(match):
    entity = match[0]
    if entity in HTML_ENTITIES:
        return HTML_ENTITIES[entity]
    unescaped = html.unescape(entity) if entity.startswith("&#") else entity
    return entity if ";" in unescaped else unescaped


def fix_text(text):
    """The part of `ftfy.fix_text` (v6 defaults) that changes CLIP's ids on ordinary text.

    Covered: HTML entities (skipped from the first line holding a '<' on, as ftfy does), C1
    controls read as Windows-1252, Latin ligatures, full/half-width forms, curly quotes, surrogate
    pairs, terminal escapes, control characters, NFC. Not covered: mojibake repair (re-decoding
    text like "cafÃ©" as UTF-8) and ftfy's line-break normalisation, which the whitespace collapse
    makes irrelevant. ftfy fixes line by line, so we do too.
    """
    unescape, out = True, []
    for line in re.split(r"(?<=\n)", text):
        unescape = unescape and "<" not in line
        out.append(_fix_segment(line, unescape))
    return "".join(out)


def clean(text):
    """OpenAI's cleaning: ftfy, html.unescape twice, whitespace collapsed and stripped, lowercase."""
    return " ".join(html.unescape(html.unescape(fix_text(text))).split()).lower()


# ----------------------------------------------------------------------------------------------
# Pre-tokenisation: OpenAI's regex, written out as a scanner over Unicode categories.
# ----------------------------------------------------------------------------------------------

def pretokenize(text):
    """Split text into words as OpenAI's case-insensitive `regex` pattern does:

        <|startoftext|> | <|endoftext|> | 's|'t|'re|'ve|'m|'ll|'d | \\p{L}+ | \\p{N} | [^\\s\\p{L}\\p{N}]+

    i.e. at each position the special tokens, then a contraction, then a run of letters (category
    L*), one number character (N*: "2024" gives four words), or a run of anything else that is not
    whitespace. U+0345 (which case-folds to a letter) matches no branch under IGNORECASE, so
    OpenAI drops it; we treat it like whitespace. Categories are those of Python's `unicodedata`
    (Unicode 14 on Python 3.11); `regex` may know characters assigned since.
    """
    def kind(c):  # " " whitespace, "L" letter, "N" number, "." anything else
        category = unicodedata.category(c)[0]
        return " " if c.isspace() or c == "\u0345" else category if category in "LN" else "."

    words, i = [], 0
    while i < len(text):
        start, k = i, kind(text[i])
        fixed = [s for s in SPECIAL + CONTRACTIONS if text[i:i + len(s)].casefold() == s]  # as IGNORECASE: 'ſ is 's
        if fixed:
            i += len(fixed[0])
        else:
            i += 1
            while k in "L." and i < len(text) and kind(text[i]) == k:  # runs of letters or of others
                i += 1
        if fixed or k != " ":
            words.append(text[start:i])
    return words


def bytes_to_unicode():
    """CLIP's reversible map from the 256 bytes to printable characters, so BPE never sees
    whitespace or control characters: printable Latin-1 bytes stand for themselves, the others
    for U+0100 onwards. Its order is the order of the first 256 ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(c) for b, c in zip(printable + others, printable + list(range(256, 256 + len(others))))}


BYTE_ENCODER = bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}


def merge_pair(word, pair):
    """Symbols (tuple) -> symbols with every occurrence of `pair`, left to right, joined into one."""
    out, i = [], 0
    while i < len(word):
        if word[i:i + 2] == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def with_end_of_word(word):
    """A word's first split into symbols: its characters, the last one marked `</w>`."""
    return (*word[:-1], word[-1] + "</w>")


def words_of(text):
    """Cleaned, pre-tokenised words of a text, each as its byte characters (`BYTE_ENCODER`)."""
    return ["".join(BYTE_ENCODER[b] for b in word.encode("utf-8")) for word in pretokenize(clean(text))]


# ----------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------

class BPETokenizer:
    """CLIP's byte-level BPE. Ids: 256 byte symbols, the same 256 ending a word (`</w>`), one per
    merge in file order, then <|startoftext|> and <|endoftext|>: end-of-text is the largest id,
    which CLIP's text pooling (`argmax`) relies on."""

    def __init__(self, vocab_path):
        lines = gzip.decompress(Path(vocab_path).read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:CLIP_MERGES + 1] if line]  # line 0: version
        symbols = list(BYTE_ENCODER.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(SPECIAL)
        self.encoder = {symbol: i for i, symbol in enumerate(vocab)}
        self.decoder = vocab
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.cache = {s: (s,) for s in SPECIAL}

    @property
    def vocab_size(self):
        return len(self.decoder)

    @property
    def sot(self):
        return self.encoder[SPECIAL[0]]

    @property
    def eot(self):
        return self.encoder[SPECIAL[1]]

    def bpe(self, word):
        """Apply the known merge of lowest rank to the word's symbols until none applies."""
        if word not in self.cache:
            symbols = with_end_of_word(word)
            while len(symbols) > 1:
                pair = min(zip(symbols, symbols[1:]), key=lambda p: self.ranks.get(p, float("inf")))
                if pair not in self.ranks:
                    break
                symbols = merge_pair(symbols, pair)
            self.cache[word] = symbols
        return self.cache[word]

    def encode(self, text):
        return [self.encoder[symbol] for word in words_of(text) for symbol in self.bpe(word)]

    def decode(self, ids):
        text = "".join(self.decoder[i] for i in ids)
        return bytes(BYTE_DECODER[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts, context_length=77, truncate=False):
        """Texts -> (len(texts), context_length) LongTensor: <|startoftext|> ids <|endoftext|>, then zeros,
        as `clip.tokenize`. A text too long raises, unless `truncate`, which keeps the first
        context_length - 1 tokens and ends with <|endoftext|>."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), context_length, dtype=torch.long)  # (B, L)
        for row, text in zip(out, texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > context_length and not truncate:
                raise ValueError(f"text {text!r} is {len(ids)} tokens with start and end, more than "
                                 f"context_length={context_length}; shorten it or pass truncate=True")
            ids = ids[:context_length - 1] + [self.eot] if len(ids) > context_length else ids
            row[:len(ids)] = torch.tensor(ids)
        return out

    @classmethod
    def train(cls, texts, vocab_size, path):
        """Learn vocab_size - 514 merges from `texts` (512 byte symbols and the 2 special tokens
        count too), write them in CLIP's merges-file format to `path`, return the tokenizer."""
        n_merges = vocab_size - 2 * len(BYTE_ENCODER) - len(SPECIAL)
        if n_merges < 0:
            raise ValueError(f"vocab_size={vocab_size} is less than the {vocab_size - n_merges} byte and "
                             "special symbols; it counts them as well as the merges")
        words = Counter(with_end_of_word(w) for text in texts for w in words_of(text))
        lines = ["#version: 0.2"] + [" ".join(pair) for pair in learn_merges(words, n_merges)]
        Path(path).write_bytes(gzip.compress("\n".join(lines).encode("utf-8"), mtime=0))
        return cls(path)


def learn_merges(words, n_merges):
    """The BPE merge loop: {word as a tuple of symbols: count} -> up to n_merges pairs, in merge order.

    Count adjacent symbol pairs (weighted by how often the word occurs), merge the most frequent
    pair everywhere (ties: the smallest pair in string order), repeat. When every word is a single
    symbol before that, it stops there with fewer merges than asked for.
    """
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = {merge_pair(word, best): count for word, count in words.items()}
    return merges
