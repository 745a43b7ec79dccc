"""Hand-checked cases for vlm.eval.metrics, including the quirks of the official scorers."""

import pytest

from vlm.eval.metrics import (
    METRICS,
    anls,
    exact_match,
    levenshtein,
    relaxed_accuracy,
    score,
    vqa_accuracy,
    vqa_exact_match,
)


def varied(value: str, k: int = 3, other: str = "zzz") -> list[str]:
    """10 answers, `k` of them `value`: not all identical, so the official normalisation is applied."""
    return [value] * k + [other] * (10 - k)


# ---------------------------------------------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------------------------------------------


def test_vqa_identical_answers_exact():
    assert vqa_accuracy("2", ["2"] * 10) == 1.0


@pytest.mark.parametrize("prediction", ["two", "2.", "Two", "the 2", "(2)"])
def test_vqa_identical_answers_are_not_normalised(prediction):
    # All 10 answers identical -> the official code normalises neither side.
    assert vqa_accuracy(prediction, ["2"] * 10) == 0.0


def test_vqa_identical_answers_case_sensitive():
    assert vqa_accuracy("yes", ["Yes"] * 10) == 0.0
    assert vqa_accuracy("Yes", ["Yes"] * 10) == 1.0


def test_vqa_identical_answers_still_strip_newlines_tabs_and_ends():
    assert vqa_accuracy(" 2\n", ["2"] * 10) == 1.0
    assert vqa_accuracy("red\tcar", ["red car"] * 10) == 1.0


def test_vqa_number_words_map_to_digits_when_answers_vary():
    answers = ["two"] * 3 + ["2"] * 7
    assert vqa_accuracy("two", answers) == 1.0
    assert vqa_accuracy("2", answers) == 1.0


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (0, 0.0),
        (1, 0.3),  # (1 * 0 + 9 * 1/3) / 10
        (2, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
        (3, 0.9),  # (3 * 2/3 + 7 * 1) / 10
        (4, 1.0),  # every leave-one-out subset still has >= 3 matches
        (9, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_leave_one_out(k, expected):
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "answer"),
    [
        ("1,000", "1000"),  # digit,digit comma -> punctuation deleted, not spaced
        ("yes.", "yes"),  # trailing period stripped
        ("5.", "5"),  # ... also after a digit (the look-behind in periodStrip is a typo'd no-op)
        ("3.5", "3.5"),  # a period followed by a digit is kept
        ("a dog", "dog"),  # articles dropped
        ("The Dog", "dog"),
        ("dont", "don't"),  # contractions expanded
        ("Yes", "yes"),  # lowercased
        ("  red   car ", "red car"),  # whitespace collapsed
        ("an", "the"),  # articles only -> "" on both sides
        ("what?", "what"),  # question mark
        ("black-and-white", "black and white"),  # symbol without adjacent space -> space
        ("black - white", "black white"),  # symbol next to a space -> deleted (then spaces collapse)
        ("(5)", "5"),
        ("two dogs", "2 dogs"),
        ("none", "0"),  # "none" is a number word
        ("a-b", "b"),  # "-" -> " ", then "a" is an article
        ("1,000 dollars-ish", "1000 dollarsish"),  # one digit comma deletes every symbol in the string
        ("Yes\n", "yes"),
    ],
)
def test_vqa_normalisation(prediction, answer):
    assert vqa_accuracy(prediction, varied(answer)) == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("prediction", "answer"),
    [
        ("3.5", "35"),  # the period between digits is kept
        ("im", "i'm"),  # "Im" -> "I'm" in the official dict never fires after lower-casing
        ("2", "to"),
        ("cat", "cats"),  # no stemming
    ],
)
def test_vqa_normalisation_non_matches(prediction, answer):
    assert vqa_accuracy(prediction, varied(answer)) == 0.0


def test_vqa_period_strip_count_quirk():
    # periodStrip.sub("", text, re.UNICODE): the flag lands in `count`, so at most 32 periods are removed.
    answers = varied(".", other="no")  # "." normalises to ""
    assert vqa_accuracy("." * 32, answers) == pytest.approx(0.9)
    assert vqa_accuracy("." * 33, answers) == 0.0


def test_vqa_single_answer_is_always_zero():
    # Leave-one-out with one answer leaves nothing to match, exactly like the official code.
    assert vqa_accuracy("cat", ["cat"]) == 0.0


def test_vqa_other_answer_counts():
    # Any number of answers: leave-one-out over however many there are.
    assert vqa_accuracy("x", ["x", "x", "x", "y"]) == pytest.approx((3 * 2 / 3 + 1) / 4)
    assert vqa_accuracy("x", ["x", "y"]) == pytest.approx((0 + 1 / 3) / 2)


def test_vqa_bad_inputs():
    with pytest.raises(ValueError):
        vqa_accuracy("cat", [])
    with pytest.raises(TypeError):
        vqa_accuracy("cat", "cat")


def test_vqa_returns_float_in_range():
    for k in range(11):
        value = vqa_accuracy("x", ["x"] * k + ["y"] * (10 - k))
        assert isinstance(value, float)
        assert 0.0 <= value <= 1.0


# ---------------------------------------------------------------------------------------------------------------------
# ANLS
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("flaw", "lawn", 2), ("abc", "abc", 0), ("ab", "ba", 2)],
)
def test_levenshtein(a, b, d):
    assert levenshtein(a, b) == d
    assert levenshtein(b, a) == d


def test_anls_exact():
    assert anls("Denver Broncos", ["Denver Broncos"]) == 1.0


def test_anls_case_and_whitespace():
    assert anls("denver   BRONCOS", ["Denver Broncos"]) == 1.0
    assert anls("  Denver Broncos\n", ["Denver Broncos"]) == 1.0


def test_anls_one_edit_in_ten_chars():
    assert anls("0123456780", ["0123456789"]) == pytest.approx(0.9)


def test_anls_threshold():
    assert anls("abc", ["xyz"]) == 0.0  # NL = 1
    assert anls("abxyz", ["abcde"]) == 0.0  # NL = 0.6 > 0.5
    # Official script: similarity < threshold -> 0, so NL == 0.5 exactly is kept.
    assert anls("ac", ["ab"]) == pytest.approx(0.5)
    assert anls("abxy", ["abcd"]) == pytest.approx(0.5)
    assert anls("ac", ["ab"], threshold=0.6) == 0.0


def test_anls_max_over_answers():
    assert anls("12/15/89", ["xyz", "12/15/88"]) == pytest.approx(1 - 1 / 8)
    assert anls("Dr. Lobo", ["Dear Dr. Lobo", "Dr. Lobo"]) == 1.0


def test_anls_empty():
    assert anls("", [""]) == 1.0
    assert anls("  ", [""]) == 1.0
    assert anls("", ["abc"]) == 0.0
    assert anls("abc", [""]) == 0.0


def test_anls_raw_length_denominator_quirk():
    # Distance on normalised strings ("helo" vs "hello": 1), length on the raw ones (max(5, 7) = 7).
    assert anls("helo   ", ["hello"]) == pytest.approx(1 - 1 / 7)
    assert anls("helo", ["hello"]) == pytest.approx(0.8)


def test_anls_single_string_and_bad_inputs():
    assert anls("abc", "abc") == 1.0
    with pytest.raises(ValueError):
        anls("abc", [])


# ---------------------------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        ("10", "10.4", 1.0),  # 0.4 / 10.4 = 3.8%
        ("10", "11", 0.0),  # 1 / 11 = 9.1%
        ("105", "100", 1.0),  # exactly 5% is inside
        ("-10", "-10.2", 1.0),
        ("1e3", "1000", 1.0),
        ("45%", "0.45", 1.0),  # "45%" parses as 0.45 (pix2struct)
        ("45", "45%", 0.0),  # 45 vs 0.45
        ("45%", "45%", 1.0),
        ("1,000", "1000", 0.0),  # no thousands separators: string match "1,000" != "1000"
        ("1,000", "1,000", 1.0),
        ("ten", "10", 0.0),
        ("Yes", "yes", 1.0),
        (" Yes\n", "yes", 1.0),  # stripped (deviation from pix2struct)
        ("no", "yes", 0.0),
        ("0", "0", 1.0),
        ("0.0", "0", 1.0),  # target 0: numeric exact equality (pix2struct would string-compare -> 0)
        ("0%", "0", 1.0),
        ("0.01", "0", 0.0),
        ("zero", "0", 0.0),
    ],
)
def test_relaxed_accuracy(prediction, target, expected):
    assert relaxed_accuracy(prediction, target) == expected


def test_relaxed_accuracy_tolerance():
    assert relaxed_accuracy("10", "11", tolerance=0.1) == 1.0
    assert relaxed_accuracy("10.4", "10", tolerance=0.01) == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Exact match and registry
# ---------------------------------------------------------------------------------------------------------------------


def test_exact_match():
    assert exact_match("Paris ", ["london", "paris"]) == 1.0
    assert exact_match("Paris", "PARIS") == 1.0
    assert exact_match("Pari", ["paris"]) == 0.0
    assert exact_match("a dog", ["dog"]) == 0.0  # no article / punctuation normalisation
    assert exact_match("x", []) == 0.0


def test_vqa_exact_match_normalises_as_the_vqa_evaluator():
    assert vqa_exact_match("Circle.", ["circle"]) == 1.0  # case, trailing period
    assert vqa_exact_match(" a circle\n", "circle") == 1.0  # whitespace, article
    assert vqa_exact_match("Two", ["2"]) == 1.0 and vqa_exact_match("yes!", ["yes"]) == 1.0
    assert vqa_exact_match("circles", ["circle"]) == 0.0 and vqa_exact_match("no", ["yes"]) == 0.0
    assert vqa_exact_match("red", ["blue", "red"]) == 1.0 and vqa_exact_match("x", []) == 0.0
    # why one reference answer needs it: vqa_accuracy scores nothing against one answer, and against ten copies
    # of it compares without normalisation
    assert vqa_accuracy("circle", ["circle"]) == 0.0
    assert vqa_accuracy("circle", ["circle"] * 10) == 1.0 and vqa_accuracy("Circle.", ["circle"] * 10) == 0.0


def test_registry_and_score():
    assert set(METRICS) == {"vqa_accuracy", "anls", "relaxed_accuracy", "exact_match", "vqa_exact_match"}
    assert score("vqa_accuracy", "2", ["2"] * 10) == 1.0
    assert score("vqa_accuracy", "cat", varied("cat")) == pytest.approx(0.9)
    assert score("anls", "abc", "abc") == 1.0
    assert score("anls", "0123456780", ["0123456789"]) == pytest.approx(0.9)
    assert score("relaxed_accuracy", "10", ["10.4"]) == 1.0
    assert score("relaxed_accuracy", "10", ["11", "10"]) == 0.0  # only answers[0] is used
    assert score("relaxed_accuracy", "10", "10.4") == 1.0
    assert score("exact_match", "Paris", ("paris",)) == 1.0
    assert score("vqa_exact_match", "A triangle.", "triangle") == 1.0
    with pytest.raises(ValueError):
        score("bleu", "a", ["a"])
    with pytest.raises(ValueError):
        score("relaxed_accuracy", "a", [])
