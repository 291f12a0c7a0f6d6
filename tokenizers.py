"""Tokenizers: CLIP's byte-level BPE for text (the frozen text tower of METHOD.md section 1, and the
tiny CLIP of section 5, whose BPE is learned here from the synthetic captions), and one
convolutional tokenizer per extended modality (METHOD.md section 1 table).

Text, top to bottom: cleaning (the part of ftfy that CLIP relies on, then HTML unescaping,
whitespace collapse, lowercasing), pre-tokenisation into words, the byte <-> character map, and
`BPETokenizer`, which reads CLIP's merges file (`bpe_simple_vocab_16e6.txt.gz`) or learns its own.
On CLIP's file it gives the ids of OpenAI's `SimpleTokenizer` and `clip.tokenize`.
"""

import gzip
import html
import html.entities
import math
import re
import unicodedata
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

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
        count too), write them in CLIP's merges-file format to `path`, return the tokenizer.

        Plain BPE over word counts: count adjacent symbol pairs (weighted by how often the word
        occurs), merge the most frequent pair everywhere (ties: the smallest pair in string
        order), repeat. When every word is a single symbol before that, it stops there with a
        smaller vocabulary than asked for.
        """
        n_merges = vocab_size - 2 * len(BYTE_ENCODER) - len(SPECIAL)
        if n_merges < 0:
            raise ValueError(f"vocab_size={vocab_size} is less than the {vocab_size - n_merges} byte and "
                             "special symbols; it counts them as well as the merges")
        words = Counter(with_end_of_word(w) for text in texts for w in words_of(text))
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
        lines = ["#version: 0.2"] + [" ".join(pair) for pair in merges]
        Path(path).write_bytes(gzip.compress("\n".join(lines).encode("utf-8"), mtime=0))
        return cls(path)


# ----------------------------------------------------------------------------------------------
# Modality tokenizers (METHOD.md section 1, OneLLM style): one lightweight, trainable module per
# extended modality turns its input into (B, L, width) tokens, its own learned positional
# embedding already added, ready for the frozen ViT (`ViT.encode_tokens`). Each is built as
# `cls(patch_conv, **settings)` from CLIP's frozen `visual.conv1.weight` (width, 3, p, p), which
# gives the width, the patch size and, where shapes allow, the initialisation. Every tokenizer
# keeps its own copy: the frozen tensor is never held, modified or part of the graph.
# ----------------------------------------------------------------------------------------------

INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


def interpolate_positions(pos, grid, new_grid):
    """(prod(grid), D) positional embedding on a 1-, 2- or 3-D grid -> (prod(new_grid), D), resampled.

    (Bi/tri)linear with align_corners=False, so cell centres map onto cell centres and the
    configured grid gives back the embedding unchanged.
    """
    pos = pos.T.reshape(1, -1, *grid)  # (1, D, *grid)
    pos = F.interpolate(pos, size=tuple(new_grid), mode=INTERPOLATION[len(grid)], align_corners=False)
    return rearrange(pos, "1 d ... -> (...) d")


class ConvTokenizer(nn.Module):
    """Patches by a strided convolution + a learned positional embedding (std 0.02 at init) over the patch grid.

    `conv` maps (B, C, *input size) to (B, width, *grid); `grid` is the output grid of the
    configured input size. Another input size gives another grid, and the positional embedding is
    interpolated to it. The convolutions have no bias, like CLIP's conv1: the positional embedding
    already adds a learned vector to every token.
    """

    def __init__(self, conv, grid):
        super().__init__()
        self.conv, self.grid = conv, tuple(grid)
        self.positional_embedding = nn.Parameter(torch.randn(math.prod(grid), conv.out_channels) * 0.02)

    def forward(self, x):
        x = self.conv(x)  # (B, width, *grid)
        pos = interpolate_positions(self.positional_embedding, self.grid, x.shape[2:])
        return rearrange(x, "b d ... -> b (...) d") + pos  # (B, L, width)


def conv_from(conv, weight):
    """`conv` with its weight set to a copy of `weight` (detached: the source stays frozen and untouched)."""
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv


class TactileTokenizer(ConvTokenizer):
    """Tactile image (B, 3, H, W) -> (B, (H/p)(W/p), width): Conv2d(3, width, p, stride p).

    Initialised as a copy of the image patch conv: a tactile sensor's picture is an RGB image.
    """

    def __init__(self, patch_conv, image_size=224):
        width, _, p, _ = patch_conv.shape
        conv = conv_from(nn.Conv2d(3, width, p, stride=p, bias=False), patch_conv)
        super().__init__(conv, (image_size // p, image_size // p))


class DepthTokenizer(ConvTokenizer):
    """Disparity map (B, 1, H, W) -> (B, (H/p)(W/p), width): Conv2d(1, width, p, stride p).

    Initialised from the image patch conv summed over RGB, so at initialisation a disparity map is
    tokenized exactly as the image conv sees it drawn as a grey image (the same value in R, G, B).
    """

    def __init__(self, patch_conv, image_size=224):
        width, _, p, _ = patch_conv.shape
        conv = conv_from(nn.Conv2d(1, width, p, stride=p, bias=False), patch_conv.sum(1, keepdim=True))
        super().__init__(conv, (image_size // p, image_size // p))


class VideoTokenizer(ConvTokenizer):
    """Video (B, T, 3, H, W) -> (B, (T/2)(H/p)(W/p), width): Conv3d tubelets (2, p, p).

    Initialised by inflating the image conv (its weight / 2 at both time steps), so a static video
    gives the image's patch tokens. An odd last frame is repeated (a single image is a 2-frame
    tubelet). Positional embedding over (T/2, H/p, W/p).
    """

    def __init__(self, patch_conv, frames=8, image_size=224):
        width, _, p, _ = patch_conv.shape
        conv = nn.Conv3d(3, width, (2, p, p), stride=(2, p, p), bias=False)
        conv = conv_from(conv, repeat(patch_conv / 2, "d c p q -> d c t p q", t=2))
        super().__init__(conv, ((frames + 1) // 2, image_size // p, image_size // p))

    def forward(self, video):
        if video.shape[1] % 2:
            video = torch.cat([video, video[:, -1:]], dim=1)
        return super().forward(rearrange(video, "b t c h w -> b c t h w"))


class AudioTokenizer(ConvTokenizer):
    """Log-mel (B, 1, 128, F) -> (B, 12 * ((F - 16) // 10 + 1), width): Conv2d(1, width, 16, stride 10).

    Overlapping 16 x 16 patches as AST; random initialisation (the image conv does not fit a
    spectrogram's patch shape). Positional embedding over the (mel, time) patch grid.
    """

    mel_bins = 128

    def __init__(self, patch_conv, frames=1024):
        conv = nn.Conv2d(1, patch_conv.shape[0], 16, stride=10, bias=False)
        super().__init__(conv, ((self.mel_bins - 16) // 10 + 1, (frames - 16) // 10 + 1))


class IMUTokenizer(ConvTokenizer):
    """IMU (B, 6, T) -> (B, T // kernel, width): Conv1d(6, width, kernel, stride kernel), random initialisation."""

    def __init__(self, patch_conv, length=2000, kernel=10):
        super().__init__(nn.Conv1d(6, patch_conv.shape[0], kernel, stride=kernel, bias=False), (length // kernel,))


class EEGTokenizer(ConvTokenizer):
    """EEG (B, C, T) -> (B, T // kernel, width): Conv1d(C, width, kernel, stride kernel), random initialisation."""

    def __init__(self, patch_conv, channels=16, length=256, kernel=16):
        super().__init__(nn.Conv1d(channels, patch_conv.shape[0], kernel, stride=kernel, bias=False),
                         (length // kernel,))


@torch.no_grad()
def farthest_point_sampling(xyz, n):
    """(B, N, 3) points -> (B, n) indices of n well-spread points, starting at point 0.

    Each step picks the point farthest from those already picked (first index on ties). The loop
    runs over the n picks; each pick is vectorised over the batch and the points.
    """
    b, num, _ = xyz.shape
    points = rearrange(xyz, "b n c -> b c n").contiguous()  # coordinates as rows: fast reductions
    picked = torch.zeros(b, n, dtype=torch.long, device=xyz.device)
    nearest = torch.full((b, num), math.inf, dtype=xyz.dtype, device=xyz.device)  # distance^2 to the picked set
    farthest = torch.zeros(b, 1, dtype=torch.long, device=xyz.device)
    for i in range(n):
        picked[:, i:i + 1] = farthest
        offset = points - points.gather(2, repeat(farthest, "b 1 -> b c 1", c=3))  # (B, 3, N)
        nearest = torch.minimum(nearest, (offset * offset).sum(1))
        farthest = nearest.argmax(1, keepdim=True)
    return picked


@torch.no_grad()
def knn(queries, xyz, k):
    """(B, G, 3) queries, (B, N, 3) points -> (B, G, k) indices of each query's k nearest points, nearest first."""
    return torch.cdist(queries, xyz).topk(k, dim=-1, largest=False).indices


class PointCloudTokenizer(nn.Module):
    """Point cloud (B, N, C) -> (B, G, width), C = `channels` (xyz, then e.g. rgb or normals).

    Farthest point sampling picks G = `groups` centres; each centre's k = `neighbours` nearest
    points, xyz relative to the centre (extra channels as they are), go through a shared point MLP
    and are max-pooled per group (a mini-PointNet, batch-norm free), then projected to the width.
    The positional embedding is an MLP of the centre's xyz, so any N needs no interpolation. With
    fewer than G (or k) points, every point is a centre (a neighbour).
    """

    hidden = 128  # point-feature width before the max-pool; the per-point MLP dominates the cost

    def __init__(self, patch_conv, points=8192, channels=3, groups=512, neighbours=32):
        super().__init__()
        if not 1 <= max(groups, neighbours) <= points:
            raise ValueError(f"groups ({groups}) and neighbours ({neighbours}) must be in 1..points ({points})")
        width, h = patch_conv.shape[0], self.hidden
        self.groups, self.neighbours = groups, neighbours
        self.point_mlp = nn.Sequential(nn.Linear(channels, h), nn.LayerNorm(h), nn.GELU(), nn.Linear(h, h))
        self.proj = nn.Linear(h, width)
        self.positional_embedding = nn.Sequential(nn.Linear(3, h), nn.GELU(), nn.Linear(h, width))

    def forward(self, points):
        b, n, _ = points.shape
        xyz = points[..., :3]
        batch = torch.arange(b, device=points.device)
        centres = xyz[batch[:, None], farthest_point_sampling(xyz, min(self.groups, n))]  # (B, G, 3)
        group = points[batch[:, None, None], knn(centres, xyz, min(self.neighbours, n))]  # (B, G, k, C)
        group = torch.cat([group[..., :3] - centres[:, :, None], group[..., 3:]], dim=-1)
        features = self.point_mlp(group).amax(dim=2)  # (B, G, hidden)
        return self.proj(features) + self.positional_embedding(centres)  # (B, G, width)


TOKENIZERS = {
    "video": VideoTokenizer,
    "audio": AudioTokenizer,
    "point": PointCloudTokenizer,
    "depth": DepthTokenizer,
    "tactile": TactileTokenizer,
    "imu": IMUTokenizer,
    "eeg": EEGTokenizer,
}
