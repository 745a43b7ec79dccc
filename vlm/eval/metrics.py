"""Per-question benchmark metrics, each reproducing the reference scorer its published numbers come from.

- `vqa_accuracy`: VQA v2 / VizWiz / TextVQA. A line-by-line Python 3 port of the official evaluator, GT-Vision-Lab/VQA,
  PythonEvaluationTools/vqaEvaluation/vqaEval.py at master (commit a013f00, "Fixed processing answers bug", 2021),
  quirks included; each quirk is marked `QUIRK` below.
- `anls`: DocVQA / InfographicVQA ANLS as the Robust Reading Competition evaluation script computes it per question
  (rrc.cvc.uab.es/?ch=17, downloads: "Infographics VQA Evaluation scripts"; the same per-question rule is in
  google-research/pix2struct, pix2struct/metrics.py `anls_metric`).
- `relaxed_accuracy`: ChartQA, after google-research/pix2struct, pix2struct/metrics.py `relaxed_correctness`
  (two documented deviations).
- `exact_match`: `.strip().lower()` equality against any answer.
- `vqa_exact_match`: equality against any answer after the VQA evaluator's answer normalisation; for benchmarks with
  a single reference answer (easy-VQA), where `vqa_accuracy` cannot score.

`score(name, prediction, answers)` calls any of them uniformly. Every function scores one question; a benchmark
number is the mean over questions (times 100 where the benchmark reports percentages).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

# ---------------------------------------------------------------------------------------------------------------------
# VQA accuracy (official evaluator)
# ---------------------------------------------------------------------------------------------------------------------

# Verbatim from the official `self.contractions` (120 entries). QUIRK: the keys "Id've", "I'dve", "Im" and "Ive" hold
# capitals but are looked up after `.lower()`, so they never fire: "im" stays "im" (it is NOT mapped to "i'm").
# QUIRK: "somebody'd" maps to "somebodyd" (reversed), and "let's", "she's" map to themselves; all kept as-is.
# fmt: off
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
# fmt: on

# QUIRK: only zero..ten, and "none" counts as a number word ("none" -> "0").
_MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = ("a", "an", "the")

# QUIRK: the official pattern is "(?!<=\d)(\.)(?!\d)". "(?!<=\d)" is a mistyped look-behind: it is a negative
# look-AHEAD for the two characters "<=" followed by a digit, which can never match in front of ".", so it is a no-op.
# The regex therefore deletes every "." that is not followed by a digit: "yes." -> "yes", "a.b" -> "ab", ".5" and
# "3.5" are kept, "5." -> "5".
# re.ASCII: the official script is Python 2, where a str pattern compiled without re.UNICODE has \d == [0-9]; Python 3
# would also match non-ASCII digits (e.g. Arabic-Indic). This reproduces the Python 2 run exactly.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)", re.ASCII)
# The official list, in order. Note "." and "'" are not in it (periods go through _PERIOD_STRIP; apostrophes are kept
# so contractions survive), and neither are ":", "#", "$", "%", "&", "*", "^", "|", "~".
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]

# QUIRK: the official code calls `self.periodStrip.sub("", outText, re.UNICODE)`, i.e. passes the flag value as the
# positional `count` argument. re.UNICODE == 32 (Python 2 and 3), so at most the first 32 periods are removed.
_PERIOD_STRIP_COUNT = int(re.UNICODE)  # == 32


def _process_punctuation(in_text: str) -> str:
    """Official `processPunctuation`."""
    out_text = in_text
    # QUIRK: the whole-string test for a digit,digit comma (e.g. "1,000") is evaluated for every symbol, so one such
    # comma anywhere makes *every* punctuation symbol be deleted instead of replaced by a space ("a-b 1,000" ->
    # "ab 1000"). Likewise, a symbol next to a space anywhere is deleted everywhere ("a -b-c" -> "a bc"); otherwise
    # it becomes a space ("a-b" -> "a b"). Both tests look at the ORIGINAL input, not the partially processed text.
    has_digit_comma = re.search(_COMMA_STRIP, in_text) is not None
    for p in _PUNCT:
        if (p + " " in in_text or " " + p in in_text) or has_digit_comma:
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return _PERIOD_STRIP.sub("", out_text, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(in_text: str) -> str:
    """Official `processDigitArticle`: lowercase, whitespace-split, number words -> digits, drop articles, expand
    contractions, join with single spaces (so runs of whitespace collapse and "the" alone becomes "")."""
    # The official code uses `self.manualMap.setdefault(word, word)`, which also inserts word -> word into the map;
    # that only ever adds identity entries, so `.get` gives the same result without the mutation.
    words = [_MANUAL_MAP.get(w, w) for w in in_text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (10 in VQA v2 / VizWiz / TextVQA), exactly as the
    official evaluator's `VQAEval.evaluate` computes one question's `avgGTAcc` (before its `round(100 * acc, 2)`).

    Steps, with the official quirks:
    1. Newlines and tabs become spaces and both ends are stripped, for the prediction and every answer.
    2. QUIRK: only if the answers are not all identical (`len(set(gtAnswers)) > 1`) are the answers AND the
       prediction normalised (`_process_punctuation`, then `_process_digit_article`). When all answers agree, nothing
       is normalised, so the comparison is exact and case-sensitive: answers ["2"] * 10 give "two" -> 0 and "2." -> 0.
    3. Leave-one-out: for each answer i, acc_i = min(1, #(other answers == prediction) / 3); the result is the mean.
       So k matching answers out of 10 give 0.3, 0.6, 0.9, 1.0 for k = 1, 2, 3, >= 4. QUIRK: the official code
       drops "the" answer by dict inequality (`item != gtAnsDatum`); VQA v2 answer dicts carry a unique `answer_id`,
       so that is exactly leave-one-out by position, which is what is done here. Consequence: with a single answer
       the score is always 0 (nothing is left to match).

    Not reproduced: the official code normalises the ground truth in place, so re-evaluating the same VQA object
    normalises it twice; this function is pure.

    Raises ValueError for an empty answer list (the official code would divide by zero).
    """
    if isinstance(answers, str):
        raise TypeError("answers must be a list of strings, not a single string")
    if len(answers) == 0:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    res_ans = _clean_whitespace(prediction)
    gt_answers = [_clean_whitespace(a) for a in answers]
    if len(set(gt_answers)) > 1:
        gt_answers = [_process_digit_article(_process_punctuation(a)) for a in gt_answers]
        res_ans = _process_digit_article(_process_punctuation(res_ans))
    gt_acc = []
    for i in range(len(gt_answers)):
        matching = sum(1 for j, a in enumerate(gt_answers) if j != i and a == res_ans)
        gt_acc.append(min(1, float(matching) / 3))
    # Same summation order and division as the official `float(sum(gtAcc)) / len(gtAcc)`: bit-identical floats.
    return float(sum(gt_acc)) / len(gt_acc)


# ---------------------------------------------------------------------------------------------------------------------
# ANLS (DocVQA / InfographicVQA)
# ---------------------------------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (unit-cost insert / delete / substitute), two-row DP in O(len(a) * len(b)) time and
    O(min(len(a), len(b))) memory, after trimming the common prefix and suffix (which never changes the distance)."""
    if a == b:
        return 0
    start = 0
    end_a, end_b = len(a), len(b)
    while start < end_a and start < end_b and a[start] == b[start]:
        start += 1
    while end_a > start and end_b > start and a[end_a - 1] == b[end_b - 1]:
        end_a -= 1
        end_b -= 1
    a, b = a[start:end_a], b[start:end_b]
    if len(a) < len(b):
        a, b = b, a  # b is the shorter: the rows are len(b) + 1 long
    if not b:
        return len(a)
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _anls_normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: Sequence[str] | str, threshold: float = 0.5) -> float:
    """ANLS of one prediction, exactly as the RRC DocVQA / InfographicVQA evaluation script scores a question:

        NL_j  = lev(norm(answer_j), norm(prediction)) / max(len(answer_j.upper()), len(prediction.upper()))
        score = 1 - min_j NL_j,  set to 0 if score < threshold

    with norm(s) = " ".join(s.strip().lower().split()). Quirks of the official script, reproduced:
    - The distance is taken between the NORMALISED strings but divided by the length of the RAW strings
      (`len(answer.upper())`, `len(prediction.upper())`), so padding whitespace lowers NL: "helo   " vs "hello" is
      1 / 7, not 1 / 5. (`.upper()` only matters for characters such as "ß" -> "SS".)
    - The threshold is applied to the similarity with `<`, so NL == threshold exactly is KEPT: "ab" vs "ac" scores 0.5
      (the same boundary as pix2struct's `anls_metric`, `NL <= theta`). Only NL > threshold scores 0.
    - Both raw strings empty: length 0 -> NL 0 -> 1.0. An empty prediction against a non-empty answer -> 0.
    A single string is accepted as a one-answer list. Raises ValueError for an empty answer list.
    """
    if isinstance(answers, str):
        answers = [answers]
    if len(answers) == 0:
        raise ValueError("anls needs at least one ground-truth answer")
    det_answer = _anls_normalise(prediction)
    det_len = len(prediction.upper())
    values = []
    for answer in answers:
        dist = levenshtein(_anls_normalise(answer), det_answer)
        length = max(len(answer.upper()), det_len)
        values.append(0.0 if length == 0 else float(dist) / float(length))
    question_result = 1 - min(values)
    if question_result < threshold:
        question_result = 0.0
    return float(question_result)


# ---------------------------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy
# ---------------------------------------------------------------------------------------------------------------------


def _to_float(text: str) -> float | None:
    """pix2struct `_to_float`: a trailing "%" divides by 100 ("45%" -> 0.45); no thousands separators ("1,000" is
    not a number and falls back to string matching); anything Python's `float` accepts otherwise ("1e3", " 7 ")."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy (1.0 or 0.0), following google-research/pix2struct, pix2struct/metrics.py
    `relaxed_correctness` (the implementation behind the Pix2Struct / MatCha / DePlot ChartQA numbers):
    if both parse as numbers, |prediction - target| / |target| <= tolerance; otherwise case-insensitive equality.

    Percentages: "45%" parses as 0.45, so "45%" vs "0.45" -> 1.0 but "45" vs "45%" -> 0.0 (45 vs 0.45), as in
    pix2struct.

    Two deliberate deviations from pix2struct, both only widening what counts as equal:
    - Both strings are `.strip()`-ed first (pix2struct does not strip, so "45% " or "Yes\n" would fail there).
    - Target 0: pix2struct's guard `if prediction_float is not None and target_float:` treats 0.0 as false and falls
      back to string matching ("0.0" vs "0" -> wrong). Here a numeric zero target needs a numeric prediction exactly
      equal to 0 ("0.0", "-0", "0%" -> 1.0; "0.01" -> 0.0).
    """
    prediction = prediction.strip()
    target = target.strip()
    prediction_float = _to_float(prediction)
    target_float = _to_float(target)
    if prediction_float is not None and target_float is not None:
        if target_float == 0:
            return float(prediction_float == 0)
        return float(abs(prediction_float - target_float) / abs(target_float) <= tolerance)
    return float(prediction.lower() == target.lower())


# ---------------------------------------------------------------------------------------------------------------------
# Exact match
# ---------------------------------------------------------------------------------------------------------------------


def exact_match(prediction: str, answers: Sequence[str] | str) -> float:
    """1.0 if `prediction.strip().lower()` equals any answer's `.strip().lower()`, else 0.0 (also for no answers)."""
    if isinstance(answers, str):
        answers = [answers]
    pred = prediction.strip().lower()
    return float(any(pred == a.strip().lower() for a in answers))


def vqa_exact_match(prediction: str, answers: Sequence[str] | str) -> float:
    """1.0 if the prediction equals any answer once both are normalised as the official VQA evaluator normalises
    differing answers (step 2 of `vqa_accuracy`: whitespace, punctuation, case, articles, number words,
    contractions: "A circle." == "circle", "Two" == "2"), else 0.0 (also for no answers).

    For a benchmark with one reference answer (easy-VQA): there `vqa_accuracy` is 0 whatever the prediction (its
    leave-one-out leaves no answer to match), and the answer repeated ten times is matched without any normalisation
    (all answers agree), i.e. exactly and case-sensitively."""
    if isinstance(answers, str):
        answers = [answers]
    normalise = lambda text: _process_digit_article(_process_punctuation(_clean_whitespace(text)))
    pred = normalise(prediction)
    return float(any(pred == normalise(a) for a in answers))


# ---------------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------------

METRICS: dict[str, Callable[..., float]] = {
    "vqa_accuracy": vqa_accuracy,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
    "exact_match": exact_match,
    "vqa_exact_match": vqa_exact_match,
}


def score(metric_name: str, prediction: str, answers: Sequence[str] | str) -> float:
    """Score one prediction with `METRICS[metric_name]`, whatever shape the labels come in.

    A single string counts as a one-answer list. `relaxed_accuracy` takes one target (ChartQA has one label), so it
    gets `answers[0]` when given a list.
    """
    try:
        fn = METRICS[metric_name]
    except KeyError:
        raise ValueError(f"unknown metric {metric_name!r}; choose from {sorted(METRICS)}") from None
    answer_list = [answers] if isinstance(answers, str) else list(answers)
    if metric_name == "relaxed_accuracy":
        if not answer_list:
            raise ValueError("relaxed_accuracy needs a target")
        return fn(prediction, answer_list[0])
    return fn(prediction, answer_list)
