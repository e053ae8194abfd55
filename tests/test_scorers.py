"""Answer extraction and scoring (jtranspeft.eval.scorers); expected values written from the rules."""

import math

import pytest

from jtranspeft.eval import scorers
from jtranspeft.eval.scorers import (
    accuracy_with_ci,
    extract_commonsense_label,
    extract_gsm8k_prediction,
    extract_math_prediction,
    gsm8k_gold,
    last_boxed,
    math_equivalent,
    normalize_latex,
    parse_number,
    score_commonsense,
    score_gsm8k,
    score_math,
)

# --------------------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1,234", 1234.0),
        ("1,234,567.5", 1234567.5),
        ("-7", -7.0),
        ("0.25", 0.25),
        (".5", 0.5),
        ("3/4", 0.75),
        ("-3/4", -0.75),
        ("18.", 18.0),
        ("$5", 5.0),
        ("\\$12.50", 12.5),
        ("45%", 45.0),
        ("\\frac{1}{2}", 0.5),
        ("-\\frac{3}{4}", -0.75),
        ("\\dfrac{6}{4}", 1.5),
        ("\\frac34", 0.75),
    ],
)
def test_parse_number_accepted_forms(text, expected):
    assert parse_number(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "abc", "five", "1,23", "3/0", "1 2", "1e5"])
def test_parse_number_rejects_non_numbers(text):
    assert parse_number(text) is None


def test_gsm8k_last_answer_marker_wins():
    text = "First guess. The answer is: 12\nWait, recheck.\nThe answer is: 15"
    assert extract_gsm8k_prediction(text) == "15"
    assert score_gsm8k(text, "15")
    assert not score_gsm8k(text, "12")


def test_gsm8k_marker_without_colon_and_hash_fallback():
    assert extract_gsm8k_prediction("so The answer is 42.") == "42"
    assert extract_gsm8k_prediction("work...\n#### 7") == "7"
    # the last marker has no number: fall back to "####"
    assert extract_gsm8k_prediction("The answer is: unknown\n#### 9") == "9"


def test_gsm8k_first_number_after_marker():
    assert extract_gsm8k_prediction("The answer is: 1,234 dollars, not 5") == "1,234"
    assert extract_gsm8k_prediction("The answer is: -3") == "-3"
    assert extract_gsm8k_prediction("The answer is: \u22124") == "-4"


def test_gsm8k_thousands_fractions_negatives_decimals():
    assert score_gsm8k("The answer is: 1,234", "1234")
    assert score_gsm8k("The answer is: 1234", "1,234")
    assert score_gsm8k("The answer is: 3/4", "0.75")
    assert score_gsm8k("The answer is: \\frac{1}{2}", "0.5")
    assert score_gsm8k("The answer is: -12", "-12")
    assert not score_gsm8k("The answer is: 12", "-12")
    assert score_gsm8k("The answer is: 18.0", "18")
    assert score_gsm8k("The answer is: 18.", "18")
    assert score_gsm8k("The answer is: $18.00", "18")
    assert not score_gsm8k("The answer is: 18.1", "18")


def test_gsm8k_tolerance():
    assert score_gsm8k("The answer is: 0.33334", "0.33333")  # |diff| = 1e-5 < 1e-4
    assert not score_gsm8k("The answer is: 0.3335", "0.3333")  # |diff| = 2e-4
    assert score_gsm8k("The answer is: 123456789.5", "123456789.4")  # rel 8e-10


def test_gsm8k_no_answer_is_wrong():
    assert extract_gsm8k_prediction("I am not sure.") is None
    assert not score_gsm8k("I am not sure.", "3")
    assert not score_gsm8k("The answer is: many", "3")
    assert not score_gsm8k("", "0")


def test_gsm8k_gold():
    assert gsm8k_gold("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert gsm8k_gold("x\n#### 1,000") == "1,000"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no marker here")
    with pytest.raises(ValueError, match="not a number"):
        score_gsm8k("The answer is: 3", "three")


# ---------------------------------------------------------------------------------------- MATH


def test_last_boxed_nesting_and_last_wins():
    assert last_boxed("so $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\sqrt{\\frac{a}{b}}}") == "\\sqrt{\\frac{a}{b}}"
    assert last_boxed("first \\boxed{1} then \\boxed{2}") == "2"
    assert last_boxed("\\boxed{1} and \\fbox{x{y}z}") == "x{y}z"
    assert last_boxed("$\\boxed 5$") == "5"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{1} then truncated \\boxed{\\frac{1}{2}") is None


def test_extract_math_prediction():
    assert extract_math_prediction("... The answer is: 5\n") == "5"
    assert extract_math_prediction("The answer is: 1\nThe answer is: \\frac{2}{3}") == "\\frac{2}{3}"
    assert extract_math_prediction("The answer is: $\\boxed{7}$") == "7"
    assert extract_math_prediction("thus \\boxed{3} ... so \\boxed{4}") == "4"
    assert extract_math_prediction("no answer at all") is None


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("$\\frac{1}{2}$", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\tfrac12", "\\frac{1}{2}"),
        ("\\frac1{2}", "\\frac{1}{2}"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("5\\text{ cm}", "5"),
        ("\\text{Monday}", "Monday"),
        ("3\\!\\sqrt2", "3\\sqrt{2}"),
        ("1,000", "1000"),
        ("7.", "7"),
        ("x = 4", "4"),
        ("3/4", "\\frac{3}{4}"),
        ("\\boxed{6}", "6"),
    ],
)
def test_normalize_latex(raw, expected):
    assert normalize_latex(raw) == expected


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac12"),
        ("18.0", "18"),
        ("2\\sqrt{3}", "\\sqrt{12}"),
        ("\\frac{\\pi}{2}", "\\pi/2"),
        ("x+1", "1+x"),
        ("2x^2-1", "-1+2x^{2}"),
        ("(1, \\frac{1}{2})", "(1,0.5)"),
        ("\\sqrt[3]{8}", "2"),
        ("5\\text{ inches}", "5"),
    ],
)
def test_math_equivalent_true(pred, gold):
    assert math_equivalent(pred, gold)


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("\\frac{1}{3}", "0.333"),
        ("(1,2]", "(1,2)"),
        ("(1,2)", "(2,1)"),
        ("x+1", "x-1"),
        ("3", "4"),
        ("\\frac{1}{2", "\\frac{1}{2}"),  # unbalanced: cannot be parsed, so not equivalent
        ("\\unknowncommand{3}", "3"),
        (None, "3"),
    ],
)
def test_math_equivalent_false(pred, gold):
    assert not math_equivalent(pred, gold)


def test_math_normalisation_crash_is_wrong(monkeypatch):
    def crash(_):
        raise RuntimeError("normaliser bug")

    monkeypatch.setattr(scorers, "normalize_latex", crash)
    assert not math_equivalent("\\frac{1}{2}", "0.5")
    assert not math_equivalent("5", "5")


def test_math_power_tower_is_refused_not_hung():
    assert not math_equivalent("9^{9^{9^{9}}}", "1")


def test_score_math_end_to_end():
    assert score_math("So x = 1/2. The answer is: \\frac{1}{2}", "0.5")
    assert score_math("so \\boxed{\\frac{1}{4}} wait \\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}")
    assert not score_math("I give up.", "\\frac{1}{2}")


# --------------------------------------------------------------------------------- commonsense


def test_commonsense_first_match_wins():
    assert extract_commonsense_label("the correct answer is answer2, not answer1", "arc_c") == "answer2"
    assert score_commonsense("answer2 ... answer1", "answer2", "arc_c")
    assert not score_commonsense("answer2 ... answer1", "answer1", "arc_c")


@pytest.mark.parametrize(
    "task, text, expected",
    [
        ("boolq", "the correct answer is True", "true"),
        ("boolq", "untrue? no: false", "false"),
        ("piqa", "solution2", "solution2"),
        ("siqa", "answer3.", "answer3"),
        ("obqa", "answer5", "answer5"),
        ("hellaswag", "ending4 fits best", "ending4"),
        ("winogrande", "option1", "option1"),
        ("hellaswag", "answer1", None),  # not in this task's vocabulary
        ("arc_e", "answer12", None),
        ("piqa", "no idea", None),
    ],
)
def test_commonsense_vocabularies(task, text, expected):
    assert extract_commonsense_label(text, task) == expected


def test_commonsense_no_label_is_wrong_and_unknown_task_raises():
    assert not score_commonsense("I don't know", "true", "boolq")
    with pytest.raises(ValueError, match="boolq"):
        extract_commonsense_label("true", "nonsense_task")


# ------------------------------------------------------------------------------- reasoning-gym


@pytest.fixture(scope="module")
def rg_entries():
    reasoning_gym = pytest.importorskip("reasoning_gym")
    return {name: reasoning_gym.create_dataset(name, size=1, seed=3)[0]
            for name in ("gsm_symbolic", "basic_arithmetic")}


@pytest.mark.parametrize("name", ["gsm_symbolic", "basic_arithmetic"])
def test_reasoning_gym_scores(rg_entries, name):
    entry = rg_entries[name]
    gold = entry["answer"]
    wrong = str(int(float(gold)) + 1000)
    assert scorers.score_reasoning_gym(f"Step by step...\nThe answer is: {gold}.", entry) == 1.0
    assert scorers.score_reasoning_gym(f"The answer is: {wrong}", entry) < 1.0


def test_reasoning_gym_answer_extraction():
    assert scorers.extract_reasoning_gym_answer("x\nThe answer is: 1 2 3.\nextra") == "1 2 3"
    assert scorers.extract_reasoning_gym_answer("<answer>a</answer> then <answer> b </answer>") == "b"
    assert scorers.extract_reasoning_gym_answer("  plain  ") == "plain"


# ------------------------------------------------------------------------------------ accuracy


def _wilson_by_hand(k, n, z=1.959963984540054):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = (z / (1 + z * z / n)) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_wilson_interval_known_counts():
    result = accuracy_with_ci([True] * 8 + [False] * 2)
    low, high = _wilson_by_hand(8, 10)
    assert result["n"] == 10 and result["n_correct"] == 8
    assert result["accuracy"] == pytest.approx(0.8)
    assert result["ci_low"] == pytest.approx(low) and result["ci_high"] == pytest.approx(high)
    # the textbook values for 8/10: (0.490, 0.943)
    assert result["ci_low"] == pytest.approx(0.4902, abs=1e-3)
    assert result["ci_high"] == pytest.approx(0.9433, abs=1e-3)


def test_wilson_interval_extremes():
    none_right = accuracy_with_ci([False] * 5)
    z2 = 1.959963984540054**2
    assert none_right["accuracy"] == 0.0
    assert none_right["ci_low"] == pytest.approx(0.0, abs=1e-12)
    assert none_right["ci_high"] == pytest.approx(z2 / (5 + z2))  # 0/n upper bound: z^2 / (n + z^2)
    all_right = accuracy_with_ci([True] * 5)
    assert all_right["ci_high"] == pytest.approx(1.0)
    assert all_right["ci_low"] == pytest.approx(5 / (5 + z2))
    with pytest.raises(ValueError):
        accuracy_with_ci([])
