"""The torch-free CLIP tokenizer gives open_clip's tokens exactly, and refuses tokenizers it does not reproduce."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from clipsearch.encoders.clip_tokenizer import PROBE_TEXTS, ClipTokenizer, matches_open_clip, open_clip_vocab_file

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def ours() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(scope="module")
def theirs():
    return open_clip.get_tokenizer("ViT-B-32")


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Strings mixing Latin, accented, CJK, Cyrillic, emoji, digits, punctuation, entities and odd whitespace."""
    rng = np.random.default_rng(seed)
    pieces = ["dog", "Café", "naïve", "東京", "猫", "Москва", "😀", "🐶", "42", "3.14", "don't", "we'll", "&amp;",
              "&lt;b&gt;", "Ã©", "\t", "\n", "  ", "!!", "...", "e-mail", "C++", "ß", "İstanbul", "ﬁle", "x²",
              "<end_of_text>", "\u200b", "\u00a0", "COVID-19", "RGB(255,0,0)", "a" * 30]
    return ["".join(str(p) + (" " if rng.random() < 0.6 else "") for p in rng.choice(pieces, size=rng.integers(0, 40)))
            for _ in range(n)]


def test_tokens_equal_open_clip_on_probe_and_random_texts(ours, theirs):
    texts = list(PROBE_TEXTS) + random_texts(300)
    got = ours(texts)
    assert got.dtype == np.int64 and got.shape == (len(texts), 77)
    np.testing.assert_array_equal(got, theirs(texts).numpy())


def test_tokens_equal_open_clip_on_real_captions(ours, theirs, shared_datasets):
    with open(shared_datasets / "flickr8k_train" / "captions.csv", newline="", encoding="utf-8") as f:
        captions = [row["caption"] for row in csv.DictReader(f)]
    assert len(captions) > 1000
    np.testing.assert_array_equal(ours(captions), theirs(captions).numpy())


def test_long_texts_are_cut_with_the_end_token_kept(ours, theirs):
    tokens = ours([" ".join(["word"] * 200), "a photo"])
    assert tokens[0, -1] == ours.eot_token_id and tokens[0, 0] == ours.sot_token_id and (tokens[0] != 0).all()
    assert list(tokens[1, :4]) == [ours.sot_token_id, *theirs.encode("a photo"), ours.eot_token_id][:4]
    short = ClipTokenizer(context_length=5)
    np.testing.assert_array_equal(short(["one two three four five six"]),
                                  theirs(["one two three four five six"], context_length=5).numpy())
    assert ours([]).shape == (0, 77)


def test_it_recognises_the_tokenizers_it_reproduces(theirs):
    from open_clip.tokenizer import SimpleTokenizer

    assert matches_open_clip(theirs) == ""
    assert "cleaning" in matches_open_clip(SimpleTokenizer(clean="canonicalize"))
    assert "reduction mask" in matches_open_clip(SimpleTokenizer(reduction_mask="simple"))
    assert "vocabulary" in matches_open_clip(SimpleTokenizer(additional_special_tokens=["<mask>"]))
    assert "not open_clip's SimpleTokenizer" in matches_open_clip(object())


def test_it_loads_without_torch_or_open_clip():
    script = (
        "import sys\n"
        "from clipsearch.encoders.clip_tokenizer import ClipTokenizer\n"
        "print(ClipTokenizer()(['a dog']).shape, [m for m in ('torch', 'open_clip') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 77) []"


def test_vocab_file_is_open_clips_own():
    assert open_clip_vocab_file().samefile(open_clip.tokenizer.default_bpe())
