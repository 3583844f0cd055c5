"""The search box's query language (parse_query) and the weighted vector mix (combine_vectors); no model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clipsearch.errors import QueryError
from clipsearch.search.query import (
    MAX_QUERY_CHARS,
    MAX_TERMS,
    ParsedQuery,
    QueryTerm,
    combine_vectors,
    parse_query,
)


def T(value, weight=1.0):
    """A text term."""
    return QueryTerm("text", value, weight)


def I(image_id, weight=1.0):
    """An image term."""
    return QueryTerm("image", image_id, weight)


def terms(query, **kwargs):
    return list(parse_query(query, **kwargs).terms)


def error(query, **kwargs) -> QueryError:
    with pytest.raises(QueryError) as info:
        parse_query(query, **kwargs)
    assert info.value.hint, "every query error says what to do next"
    return info.value


# --- the examples of the grammar --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query, expected",
    [
        ("beach -people", [T("beach"), T("people", -1)]),
        ("beach - people", [T("beach"), T("people", -1)]),
        ("beach   -   people", [T("beach"), T("people", -1)]),
        ("2:sunset + boat", [T("sunset", 2), T("boat")]),
        ("red car -blue sky", [T("red car"), T("blue sky", -1)]),
        ("red car + blue sky - green grass", [T("red car"), T("blue sky"), T("green grass", -1)]),
        ("+beach", [T("beach")]),
        ("+ beach -people", [T("beach"), T("people", -1)]),
        ("-people + beach", [T("people", -1), T("beach")]),
        ("like:42 + 2:sunset", [I(42), T("sunset", 2)]),
        ("beach -like:7", [T("beach"), I(7, -1)]),
        ("2:like:3", [I(3, 2)]),
    ],
)
def test_grammar_examples(query, expected):
    assert terms(query) == expected


def test_single_plain_text_is_one_term():
    parsed = parse_query("a dog on the beach")
    assert parsed.terms == (T("a dog on the beach"),)
    assert parsed.is_simple


# --- operators only start words ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    ["t-shirt", "black-and-white photo", "x+y", "C++ code", "a+b-c", "well-known re-used e-mail", "2-3 people", "5°C"],
)
def test_operators_inside_words_are_literal(query):
    assert terms(query) == [T(query)]


def test_hyphenated_words_in_added_and_subtracted_terms():
    assert terms("black-and-white t-shirt -x-ray photo") == [T("black-and-white t-shirt"), T("x-ray photo", -1)]


def test_operator_after_any_whitespace_counts():
    assert terms("beach\t-people\n+ boat") == [T("beach"), T("people", -1), T("boat")]
    assert terms("beach\u00a0-people") == [T("beach"), T("people", -1)]  # no-break space is whitespace


def test_unicode_minus_sign_subtracts_like_hyphen():
    # describe() writes U+2212, so its output pasted back into the box keeps the sign
    assert terms("beach −people") == [T("beach"), T("people", -1)]
    assert terms("beach − people") == [T("beach"), T("people", -1)]


def test_operator_right_after_closing_quote_is_literal():
    assert terms('"a"-b') == [T("a-b")]


# --- quotes -----------------------------------------------------------------------------------------------


def test_quoted_text_is_literal():
    assert terms('"rock - paper" + scissors') == [T("rock - paper"), T("scissors")]


def test_quotes_hide_weights_and_image_terms():
    assert terms('"2:sunset" + "like:42"') == [T("2:sunset"), T("like:42")]


def test_quotes_inside_a_term_are_removed_and_text_joined():
    assert terms('a "b + c" d -e') == [T("a b + c d"), T("e", -1)]


def test_weight_before_quoted_text():
    assert terms('beach -2:"rock - paper"') == [T("beach"), T("rock - paper", -2)]


def test_unterminated_quote_makes_the_rest_literal():
    assert terms('beach + "rock - paper + 2:x') == [T("beach"), T("rock - paper + 2:x")]


def test_typographic_quotes_work_like_straight_ones():
    assert terms("“rock - paper” + scissors") == [T("rock - paper"), T("scissors")]


def test_whitespace_inside_quotes_is_collapsed_too():
    assert terms('"  rock   -   paper  "') == [T("rock - paper")]


# --- weights ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "written, value",
    [("2", 2.0), ("0.5", 0.5), ("1.5", 1.5), (".5", 0.5), ("5.", 5.0), ("100", 100.0), ("0.01", 0.01), ("007", 7.0)],
)
def test_weight_values(written, value):
    assert terms(f"{written}:sunset") == [T("sunset", value)]
    assert terms(f"beach -{written}:sunset") == [T("beach"), T("sunset", -value)]


def test_weight_after_operator_and_space():
    assert terms("beach - 0.5:people + 1.5:boat") == [T("beach"), T("people", -0.5), T("boat", 1.5)]


def test_weight_on_multi_word_term():
    assert terms("3:red car -blue sky") == [T("red car", 3), T("blue sky", -1)]


@pytest.mark.parametrize("query", ["10:30", "meeting at 10:30", "10:30 meeting", "16:9 photo", "2.5:1 ratio", "1:1"])
def test_digit_after_colon_is_literal_text_not_a_weight(query):
    assert terms(query) == [T(query)]


def test_weight_then_non_digit_text_is_a_weight_even_if_it_looks_like_a_ratio():
    # documented ambiguity: "<number>:" followed by a non-digit is always a weight; quote to search literally
    assert terms("16:cats") == [T("cats", 16)]
    assert terms('"16:cats"') == [T("16:cats")]


@pytest.mark.parametrize("query", ["2: sunset", "2:", "beach 2:sunset", "note:sunset"])
def test_colon_not_at_term_start_or_before_space_is_literal(query):
    assert terms(query) == [T(" ".join(query.split()))]


@pytest.mark.parametrize("written", ["0", "0.0", "00", ".0"])
def test_zero_weight_is_an_error(written):
    e = error(f"beach -{written}:people")
    assert "weight" in e.message and "ignore" in e.message


@pytest.mark.parametrize("written", ["101", "100.5", "1000000", "9" * 400])
def test_weight_above_100_is_an_error(written):
    e = error(f"{written}:sunset")
    assert "too large" in e.message and "100" in e.message


@pytest.mark.parametrize("written", ["1,5", "3d", "1e3", "1.2.3", "1/2", "2x"])
def test_weight_that_is_not_a_number_is_an_error(written):
    e = error(f"beach + {written}:sunset")
    assert f"'{written}'" in e.message and "not a number" in e.message
    assert "double quotes" in e.hint


def test_negative_weight_is_two_operators_in_a_row():
    e = error("beach +-2:people")
    assert "two operators" in e.message and "positive" in e.hint


def test_weights_are_floats():
    (term,) = terms("2:sunset")
    assert isinstance(term.weight, float)


# --- image terms ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["like:5", "LIKE:5", "Like:5", "image:5", "IMAGE:5", "  like:5  ", "like:005"])
def test_image_term_spellings(query):
    assert terms(query) == [I(5)]


def test_image_id_is_an_int():
    (term,) = terms("like:42")
    assert term.value == 42 and isinstance(term.value, int)


def test_image_terms_mixed_with_texts():
    parsed = parse_query("like:1 + beach -image:2 + 0.5:like:3 - people")
    assert parsed.terms == (I(1), T("beach"), I(2, -1), I(3, 0.5), T("people", -1))
    assert parsed.images == [I(1), I(2, -1), I(3, 0.5)]
    assert parsed.texts == [T("beach"), T("people", -1)]


def test_image_only_queries():
    assert terms("like:3 -like:4") == [I(3), I(4, -1)]


@pytest.mark.parametrize("query", ["like:42 dogs", "like:abc", "image:sunset.jpg", "like:4x"])
def test_image_prefix_without_a_bare_id_is_an_error(query):
    e = error(query)
    assert "image term" in e.message and "like:42" in e.hint


def test_like_with_space_after_colon_is_text():
    assert terms("things I like: dogs") == [T("things I like: dogs")]
    assert terms("like: dogs") == [T("like: dogs")]


def test_absurdly_large_image_id_is_an_error():
    e = error("like:" + "9" * 30)
    assert "too large" in e.message


# --- whitespace and unicode -------------------------------------------------------------------------------


def test_whitespace_is_collapsed_and_trimmed():
    assert terms("   a \t dog\n\non   the  beach   -   \t people  ") == [T("a dog on the beach"), T("people", -1)]


@pytest.mark.parametrize(
    "query",
    ["🌅 sunset 🌊", "海辺の夕日", "café crème brûlée", "Ελλάδα", "кот на пляже", "شاطئ", "emoji 👨‍👩‍👧 family"],
)
def test_unicode_text(query):
    assert terms(query) == [T(query)]


def test_unicode_with_operators_and_weights():
    assert terms("2:海辺 -人々 + 🌅") == [T("海辺", 2), T("人々", -1), T("🌅")]


def test_unicode_digits_after_colon_keep_a_time_literal():
    assert terms("10:٣٠") == [T("10:٣٠")]


# --- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["", " ", "\t\n  ", '""', '"   "', "“”"])
def test_empty_query_is_an_error(query):
    assert "empty" in error(query).message


@pytest.mark.parametrize(
    "query, op",
    [("beach -", "-"), ("beach +", "+"), ("+", "+"), ("-", "-"), ("beach + - people", "+"), ('a + ""', "+")],
)
def test_operator_without_term_is_an_error(query, op):
    e = error(query)
    assert f"'{op}'" in e.message and "nothing after it" in e.message


@pytest.mark.parametrize("query", ["beach --people", "beach +-people", "--people", "beach -+people"])
def test_two_operators_in_a_row_are_an_error(query):
    assert "two operators" in error(query).message


def test_empty_quotes_as_a_term_are_an_error():
    assert "empty quotes" in error('"" + beach').message


@pytest.mark.parametrize("query", ["-people", "- people -cars", "-like:3", "-2:people - boats"])
def test_only_subtracted_terms_is_an_error(query):
    e = error(query)
    assert "nothing to look for" in e.message and "add something" in e.hint


def test_too_long_query_says_how_long_and_the_limit():
    e = error("x" * (MAX_QUERY_CHARS + 1))
    assert str(MAX_QUERY_CHARS + 1) in e.message and str(MAX_QUERY_CHARS) in e.message
    assert "77 tokens" in e.hint


def test_query_at_the_limit_is_fine():
    assert terms("x" * MAX_QUERY_CHARS) == [T("x" * MAX_QUERY_CHARS)]


def test_length_is_counted_after_trimming():
    assert terms(" " * 5000 + "beach" + " " * 5000) == [T("beach")]


@pytest.mark.parametrize("query", ["a " * 5000, "a -" * 3400, '"' * 10000 + "x", "🌅" * 10000, "+" * 10000])
def test_ten_kilobyte_query_is_an_error_not_a_crash(query):
    e = error(query)
    assert "characters long" in e.message


def test_custom_max_chars():
    assert "the most is 10" in error("a" * 11, max_chars=10).message
    assert terms("a" * 11, max_chars=11) == [T("a" * 11)]


def test_long_query_parses_when_allowed():
    query = " + ".join(["word"] * 2000)
    assert len(terms(query, max_chars=len(query), max_terms=2000)) == 2000


def test_more_than_max_terms_is_an_error():
    query = " + ".join(f"t{i}" for i in range(MAX_TERMS + 1))
    e = error(query)
    assert str(MAX_TERMS + 1) in e.message and str(MAX_TERMS) in e.message
    assert len(terms(" + ".join(f"t{i}" for i in range(MAX_TERMS)))) == MAX_TERMS


def test_custom_max_terms():
    assert "the most is 2" in error("a + b + c", max_terms=2).message
    assert len(terms("a + b + c", max_terms=3)) == 3


def test_error_is_a_query_error_with_exit_code_2():
    e = error("-people")
    assert isinstance(e, QueryError) and e.exit_code == 2 and "hint:" in str(e)


def test_non_string_query_is_a_type_error():
    with pytest.raises(TypeError):
        parse_query(None)  # type: ignore[arg-type]


# --- duplicates -------------------------------------------------------------------------------------------


def test_duplicate_terms_are_kept_not_merged():
    assert terms("cat + cat + 2:cat") == [T("cat"), T("cat"), T("cat", 2)]
    assert terms("like:3 -like:3 + like:3") == [I(3), I(3, -1), I(3)]


# --- ParsedQuery views, describe() and as_dict() ----------------------------------------------------------


@pytest.mark.parametrize(
    "query, simple",
    [
        ("sunset", True),
        ("red car at night", True),
        ("1:sunset", True),
        ("2:sunset", False),
        ("0.5:sunset", False),
        ("sunset + boat", False),
        ("sunset -boat", False),
        ("like:3", False),
        ("cat + cat", False),
    ],
)
def test_is_simple(query, simple):
    assert parse_query(query).is_simple is simple


@pytest.mark.parametrize(
    "query, understood",
    [
        ("2:sunset + boat -people", '2 × "sunset" + "boat" − "people"'),
        ("sunset", '"sunset"'),
        ("like:5", "image #5"),
        ("beach -like:7", '"beach" − image #7'),
        ("like:42 + 2:sunset", 'image #42 + 2 × "sunset"'),
        ("2:like:3", "2 × image #3"),
        ("beach -0.5:people + 1.5:boat", '"beach" − 0.5 × "people" + 1.5 × "boat"'),
        ("-people + beach", '− "people" + "beach"'),
        ("1.0:sunset", '"sunset"'),
        ('"rock - paper" + scissors', '"rock - paper" + "scissors"'),
        ("2:海辺 -🌅", '2 × "海辺" − "🌅"'),
    ],
)
def test_describe(query, understood):
    assert parse_query(query).describe() == understood


def test_describe_output_of_unweighted_texts_pasted_back_parses_the_same():
    parsed = parse_query('"rock - paper" + scissors − stone')
    assert parse_query(parsed.describe()) == parsed


def test_term_as_dict():
    assert T("sunset", 2).as_dict() == {"kind": "text", "text": "sunset", "weight": 2.0}
    assert I(5).as_dict() == {"kind": "image", "image_id": 5, "weight": 1.0}
    assert I(5, -0.5).as_dict() == {"kind": "image", "image_id": 5, "weight": -0.5}


def test_query_as_dict():
    parsed = parse_query("2:sunset + like:5 -people")
    assert parsed.as_dict() == {
        "terms": [
            {"kind": "text", "text": "sunset", "weight": 2.0},
            {"kind": "image", "image_id": 5, "weight": 1.0},
            {"kind": "text", "text": "people", "weight": -1.0},
        ],
        "understood": '2 × "sunset" + image #5 − "people"',
    }


def test_as_dict_is_json_ready():
    import json

    parsed = parse_query("2:海辺 + like:5 -people")
    assert json.loads(json.dumps(parsed.as_dict(), ensure_ascii=False)) == parsed.as_dict()


def test_parsed_query_and_terms_are_frozen_and_hashable():
    parsed = parse_query("a -b")
    with pytest.raises(AttributeError):
        parsed.terms = ()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        parsed.terms[0].weight = 3.0  # type: ignore[misc]
    assert hash(parsed) == hash(parse_query("a -b"))
    assert isinstance(parsed, ParsedQuery) and isinstance(parsed.terms, tuple)


def test_views_of_a_hand_built_query():
    parsed = ParsedQuery((I(1), T("x", -2.0)))
    assert parsed.images == [I(1)] and parsed.texts == [T("x", -2.0)] and not parsed.is_simple
    assert parsed.describe() == 'image #1 − 2 × "x"'


# --- combine_vectors --------------------------------------------------------------------------------------


def reference_combine(vectors, weights):
    """Brute force: normalise each row, weighted sum, normalise; float64 throughout."""
    total = [0.0] * len(vectors[0])
    for row, weight in zip(vectors, weights):
        norm = math.sqrt(sum(float(x) ** 2 for x in row))
        for j, x in enumerate(row):
            total[j] += weight * float(x) / norm
    norm = math.sqrt(sum(x * x for x in total))
    return np.array([x / norm for x in total])


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_combine_vectors_matches_brute_force(seed, dtype):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 6))
    vectors = (rng.normal(size=(n, 64)) * rng.uniform(0.1, 50, size=(n, 1))).astype(dtype)
    weights = list(rng.uniform(0.1, 3, size=n) * rng.choice([-1, 1], size=n))
    weights[0] = abs(weights[0]) + 1.0
    result = combine_vectors(vectors, weights)
    assert result.dtype == np.float32 and result.shape == (64,)
    np.testing.assert_allclose(result, reference_combine(vectors, weights), rtol=1e-5, atol=1e-6)
    assert abs(float(np.linalg.norm(result.astype(np.float64))) - 1.0) < 1e-6


def test_combine_single_vector_is_its_normalised_self():
    v = np.array([[3.0, 4.0]], dtype=np.float32)
    np.testing.assert_allclose(combine_vectors(v, [1.0]), [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(combine_vectors(v, [2.5]), [0.6, 0.8], rtol=1e-6)


def test_combine_normalises_rows_before_weighting():
    # a long vector must not outweigh a short one: only the weights set the mix
    v = np.array([[100.0, 0.0], [0.0, 0.01]])
    np.testing.assert_allclose(combine_vectors(v, [1.0, 1.0]), [2**-0.5, 2**-0.5], rtol=1e-6)
    np.testing.assert_allclose(combine_vectors(v, [3.0, 4.0]), [0.6, 0.8], rtol=1e-6)


def test_combine_subtracts():
    v = np.array([[1.0, 1.0], [0.0, 1.0]])
    np.testing.assert_allclose(combine_vectors(v, [2**0.5, -1.0]), [1.0, 0.0], atol=1e-7)


def test_combine_accepts_weights_from_a_parsed_query():
    rng = np.random.default_rng(0)
    parsed = parse_query("2:sunset + boat -0.5:people")
    vectors = rng.normal(size=(3, 16)).astype(np.float32)
    weights = [t.weight for t in parsed.terms]
    expected = reference_combine(vectors, weights)
    np.testing.assert_allclose(combine_vectors(vectors, weights), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        combine_vectors(vectors, np.array(weights)), combine_vectors(vectors, tuple(weights)), rtol=0, atol=0
    )


@pytest.mark.parametrize("scale", [1.0, 3.0, 1e-3, 1e4])
def test_terms_that_cancel_out_are_an_error(scale):
    v = np.random.default_rng(1).normal(size=(1, 512)).astype(np.float32)
    e = pytest.raises(QueryError, combine_vectors, np.vstack([v, v * 7]), [scale, -scale]).value
    assert "cancel out" in e.message and e.hint


def test_nearly_cancelling_terms_are_an_error():
    v = np.random.default_rng(2).normal(size=512)
    near = v + 1e-9 * np.random.default_rng(3).normal(size=512)
    with pytest.raises(QueryError, match="cancel out"):
        combine_vectors(np.stack([v, near]), [1.0, -1.0])


def test_three_terms_that_sum_to_zero_cancel_out():
    v = np.array([[1.0, 0.0], [-0.5, 3**0.5 / 2], [-0.5, -(3**0.5) / 2]])
    with pytest.raises(QueryError, match="cancel out"):
        combine_vectors(v, [1.0, 1.0, 1.0])


def test_small_but_real_difference_does_not_cancel():
    v = np.array([[1.0, 0.0], [1.0, 0.01]])
    np.testing.assert_allclose(combine_vectors(v, [1.0, -1.0]), reference_combine(v, [1.0, -1.0]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "vectors, weights",
    [
        ([[0.0, 0.0], [1.0, 0.0]], [1.0, 1.0]),  # a zero row has no direction
        ([[np.nan, 1.0]], [1.0]),
        ([[np.inf, 1.0]], [1.0]),
        ([[1.0, 0.0]], [math.inf]),
        ([[1.0, 0.0]], [math.nan]),
    ],
)
def test_non_finite_result_is_an_error_without_warnings(vectors, weights, recwarn):
    with pytest.raises(QueryError, match="not finite"):
        combine_vectors(np.array(vectors), weights)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize(
    "vectors, weights",
    [
        (np.zeros((0, 4)), []),
        (np.ones(4), [1.0]),
        (np.ones((2, 4)), [1.0]),
        (np.ones((2, 4)), [1.0, 1.0, 1.0]),
        (np.ones((1, 2, 4)), [1.0]),
    ],
)
def test_shape_mismatch_is_a_programming_error(vectors, weights):
    with pytest.raises(ValueError):
        combine_vectors(vectors, weights)


def test_combine_does_not_modify_its_input():
    v = np.array([[3.0, 4.0], [1.0, 0.0]], dtype=np.float32)
    before = v.copy()
    combine_vectors(v, [1.0, -0.5])
    np.testing.assert_array_equal(v, before)
