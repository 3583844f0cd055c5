"""open_clip's CLIP BPE tokenizer without torch, for text towers run by OpenVINO.

Why not open_clip's own: `open_clip.tokenizer` imports torch (about 1.5 s here) only to return tensors, and
importing it runs open_clip's package import too (2 s more: torchvision, torch._dynamo). A `clipsearch search`
that embeds one query with OpenVINO would spend most of its time in those imports. This is open_clip's
SimpleTokenizer text path (itself OpenAI's CLIP tokenizer, MIT licence) over open_clip's own vocabulary file,
returning numpy. It covers SimpleTokenizer's default settings only ('lower' cleaning, no extra special tokens,
no reduction mask); the OpenVINO export checks it token for token against the model's open_clip tokenizer
before keeping a text tower (`matches_open_clip`), and tests compare it on real captions.
"""

from __future__ import annotations

import functools
import gzip
import html
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Sequence

import numpy as np

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"  # shipped inside the open_clip package
MERGES = 49152 - 256 - 2  # merges open_clip keeps from that file
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")


def open_clip_vocab_file() -> Path:
    """open_clip's BPE vocabulary file, found without importing open_clip (which would import torch)."""
    spec = find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the open_clip package is not installed")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / VOCAB_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{VOCAB_FILE} is missing from the open_clip package")


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters (BPE never sees whitespace)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _clean_lower(text: str) -> str:
    """open_clip's 'lower' cleaning: ftfy, HTML entities unescaped twice, whitespace collapsed, lower case."""
    import ftfy  # an open_clip dependency

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


class ClipTokenizer:
    """Texts -> int64 token ids [n, context_length], as open_clip's SimpleTokenizer() with default settings."""

    def __init__(self, context_length: int = 77, vocab_file: str | Path | None = None):
        import regex  # an open_clip dependency; \p{L} classes need it

        self.context_length = int(context_length)
        path = Path(vocab_file) if vocab_file else open_clip_vocab_file()
        lines = gzip.open(path).read().decode("utf-8").split("\n")[1:MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        self.byte_encoder = _bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.bpe_ranks = {merge: i for i, merge in enumerate(merges)}
        self.cache = {token: token for token in SPECIAL_TOKENS}
        self.pat = regex.compile("|".join(SPECIAL_TOKENS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                 regex.IGNORECASE)
        self.sot_token_id, self.eot_token_id = (self.encoder[t] for t in SPECIAL_TOKENS)

    def bpe(self, token: str) -> str:
        """The token's BPE pieces, space-separated (open_clip's SimpleTokenizer.bpe)."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        pieces = " ".join(word)
        self.cache[token] = pieces
        return pieces

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without the start and end tokens."""
        ids: list[int] = []
        for token in self.pat.findall(_clean_lower(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(token).split(" "))
        return ids

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """int64 [n, context_length]: start, tokens, end, zero padding; cut to length with the end token kept."""
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(ids) > self.context_length:
                ids = ids[:self.context_length]
                ids[-1] = self.eot_token_id
            out[row, :len(ids)] = ids
        return out


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word, word[1:]))


def matches_open_clip(tokenizer: Any) -> str:
    """Why an open_clip tokenizer is not one ClipTokenizer reproduces ('' when it is)."""
    from open_clip.tokenizer import SimpleTokenizer, _clean_lower as open_clip_clean_lower

    if type(tokenizer) is not SimpleTokenizer:
        return f"tokenizer {type(tokenizer).__name__} is not open_clip's SimpleTokenizer"
    if tokenizer.clean_fn is not open_clip_clean_lower or tokenizer.reduction_fn is not None:
        return "tokenizer has non-default cleaning or a reduction mask"
    ours = ClipTokenizer(tokenizer.context_length)
    if tokenizer.encoder != ours.encoder or tokenizer.pat.pattern != ours.pat.pattern:
        return "tokenizer vocabulary or pattern differs from open_clip's default"
    if not np.array_equal(tokenizer(list(PROBE_TEXTS)).numpy(), ours(PROBE_TEXTS)):
        return "tokenizer output differs from open_clip's on the probe texts"
    return ""


# Texts exercising cleaning (HTML entities, mojibake, odd whitespace), non-Latin scripts, numbers, contractions,
# special-token look-alikes, the empty string and truncation past the context.
PROBE_TEXTS = (
    "a photo of a dog",
    "",
    "  Two   DOGS\tplaying\nin the SNOW  ",
    "fish &amp; chips &amp;amp; peas",
    "cafÃ© au lait",
    "ein Hund im Schnee, Ølfabrik, café, naïve",
    "東京の夜景 and a 猫",
    "Москва зимой",
    "😀🐶 emoji dog",
    "it's 3:45pm, they're 2 kids & we'll see 100 km/h",
    "<start_of_text> literally <end_of_text>",
    "supercalifragilisticexpialidocious hyperparameterisation",
    " ".join(["a very long caption"] * 40),
)
