"""Answer extraction and scoring for the paper's evaluation protocols (docs/method.md §5); pure Python.

Every benchmark is scored in two steps: pull the model's final answer out of the generated text, then
compare it with the gold answer.

- GSM8K: the number after the last "The answer is: " (else after "####") is compared numerically with
  the number after "#### " in the gold field (abs tolerance 1e-4 or rel 1e-6).
- MATH: the text after the last "The answer is: " (else the last \\boxed{...}) is compared with the
  gold's last \\boxed{...} after LaTeX normalisation, else by evaluating both as sympy expressions at a
  few points. Anything that raises while normalising or parsing counts as NOT equivalent (the authors'
  grader counts such crashes as correct; we do not).
- Commonsense (LLM-Adapters labels): the first match of the task's label vocabulary, exact match.
- reasoning-gym: the dataset's own `score_answer`, fed the text after "The answer is: ".

`accuracy_with_ci` turns a list of per-item verdicts into accuracy with a 95% Wilson interval.
Nothing here touches JAX or files.
"""

from __future__ import annotations

import cmath
import functools
import math
import random
import re
from typing import Any

# ---------------------------------------------------------------------------------------------------
# Numbers (GSM8K)
# ---------------------------------------------------------------------------------------------------

_ANSWER_MARKER_RE = re.compile(r"The answer is:?")
_MINUS_SIGNS = ("\u2212", "\u2013")  # unicode minus and en dash, both written by models as "-"

# An unsigned decimal: "1,234.5" (comma thousands), "12345", "0.5", ".5". (?!\d) keeps "1,2345" from
# reading as "1,234".
_UNSIGNED = r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?![\d])"
_FRAC_LATEX = rf"\\[dt]?frac\{{\s*-?{_UNSIGNED}\s*\}}\{{\s*-?{_UNSIGNED}\s*\}}|\\[dt]?frac\d\d"
# A number as it appears in running text: sign, optional currency, then a LaTeX fraction, "a/b" or a
# decimal. The trailing period of a sentence is not part of it.
_NUMBER_IN_TEXT_RE = re.compile(
    rf"-?(?:\\?\$)?\s?(?:{_FRAC_LATEX}|{_UNSIGNED}(?:/{_UNSIGNED})?)"
)


def parse_number(s: str) -> float | None:
    """Parse one number written the ways GSM8K answers are written; None if `s` is not a number.

    Accepts thousands separators ("1,234"), negatives, decimals, simple fractions ("3/4"), LaTeX
    fractions ("\\frac{3}{4}", "\\dfrac34"), currency and percent signs ("$5", "45%", "\\$5"), and a
    trailing period ("18."). Anything else (words, several numbers, "1e5") gives None.
    """
    text = s.strip()
    for minus in _MINUS_SIGNS:
        text = text.replace(minus, "-")
    for junk in ("\\$", "\\%", "\\!", "$", "%", "\u20ac", "\u00a3"):
        text = text.replace(junk, "")
    text = text.strip().rstrip(".").strip()
    sign = 1.0
    if text.startswith("-"):
        sign, text = -1.0, text[1:].lstrip()
    elif text.startswith("+"):
        text = text[1:].lstrip()
    if not text:
        return None

    def unsigned(part: str) -> float | None:
        part = part.strip()
        neg = part.startswith("-")
        part = part[1:] if neg else part
        if not re.fullmatch(_UNSIGNED, part):
            return None
        value = float(part.replace(",", ""))
        return -value if neg else value

    compact = re.fullmatch(r"\\[dt]?frac(\d)(\d)", text)
    braced = re.fullmatch(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", text)
    if compact or braced or "/" in text:
        if compact or braced:
            num_text, den_text = (compact or braced).groups()
        else:
            num_text, _, den_text = text.partition("/")
        numerator, denominator = unsigned(num_text), unsigned(den_text)
        if numerator is None or denominator is None or denominator == 0:
            return None
        return sign * numerator / denominator
    value = unsigned(text)
    return None if value is None else sign * value


def _first_number(text: str) -> str | None:
    match = _NUMBER_IN_TEXT_RE.search(text)
    return match.group(0).strip() if match else None


def extract_gsm8k_prediction(text: str) -> str | None:
    """The number (as written) after the LAST "The answer is:" / "The answer is", else after "####".

    Only the last marker counts: if the text after it holds no number, "####" is tried, and failing
    that the result is None (scored wrong).
    """
    for minus in _MINUS_SIGNS:
        text = text.replace(minus, "-")
    markers = list(_ANSWER_MARKER_RE.finditer(text))
    if markers:
        number = _first_number(text[markers[-1].end():])
        if number is not None:
            return number
    if "####" in text:
        return _first_number(text.rsplit("####", 1)[1])
    return None


def gsm8k_gold(answer_field: str) -> str:
    """The gold answer of a GSM8K `answer` field: the text after the last "####", stripped.

    Raises ValueError when the field has no "####".
    """
    if "####" not in answer_field:
        raise ValueError(f"GSM8K answer field has no '####': {answer_field[-80:]!r}")
    return answer_field.rsplit("####", 1)[1].strip()


def numbers_close(a: float, b: float) -> bool:
    """The GSM8K tolerance: |a - b| <= 1e-4, or <= 1e-6 relative to the gold `b`."""
    return abs(a - b) <= 1e-4 or abs(a - b) <= 1e-6 * abs(b)


def score_first_number(text: str, gold: str) -> bool:
    """True when the FIRST number written in ``text`` equals the numeric ``gold`` (GSM8K tolerance).

    A format-blind second scorer: an answer followed by extra text (a missing EOS) still counts, so a
    drop under exact match that this scorer does not show is a format change, not lost ability. A gold
    that is not a number scores False.
    """
    found, gold_value = _first_number(text), parse_number(gold)
    value = None if found is None else parse_number(found)
    return value is not None and gold_value is not None and numbers_close(value, gold_value)


def score_gsm8k(pred_text: str, gold: str) -> bool:
    """True when the number extracted from `pred_text` equals the number `gold` within tolerance.

    `gold` is the already-extracted gold answer (see `gsm8k_gold`); an unparseable gold is a data
    error and raises ValueError. No number in the prediction scores False.
    """
    gold_value = parse_number(gold)
    if gold_value is None:
        raise ValueError(f"GSM8K gold answer is not a number: {gold!r}")
    pred = extract_gsm8k_prediction(pred_text)
    pred_value = None if pred is None else parse_number(pred)
    return pred_value is not None and numbers_close(pred_value, gold_value)


# ---------------------------------------------------------------------------------------------------
# LaTeX answers (MATH)
# ---------------------------------------------------------------------------------------------------


def _braced_group(text: str, open_index: int) -> tuple[str, int] | None:
    """Content of the {...} group opening at `open_index` and the index after its "}"; None if open."""
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : i], i + 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} in `text`, nested braces respected.

    "\\boxed{\\frac{1}{2}}" gives "\\frac{1}{2}". The brace-less form "\\boxed 5" gives "5". An
    unclosed last box (a truncated generation) gives None.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest_start = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    rest = text[rest_start:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        group = _braced_group(rest, len(rest) - len(stripped))
        return None if group is None else group[0]
    if rest[:1] == " ":  # "\boxed 5": one token up to whitespace or "$"
        token = re.match(r"[^\s$]+", stripped)
        return token.group(0) if token else None
    return None


def extract_math_prediction(text: str) -> str | None:
    """The model's MATH answer: the rest of the line after the last "The answer is:", else last box.

    A box inside that rest is unwrapped ("The answer is: $\\boxed{5}$" gives "5"). None when the text
    has neither a marker nor a box.
    """
    markers = list(_ANSWER_MARKER_RE.finditer(text))
    if markers:
        tail = text[markers[-1].end():].strip()
        tail = tail.split("\n", 1)[0].strip()
        boxed = last_boxed(tail)
        if boxed is not None:
            return boxed
        if tail:
            return tail
    return last_boxed(text)


def _unwrap_command(s: str, command: str) -> str:
    """Replace every `command{X}` by X (nested braces respected); an unclosed group is left as is."""
    out, i = [], 0
    while True:
        j = s.find(command + "{", i)
        if j < 0:
            return "".join(out) + s[i:]
        group = _braced_group(s, j + len(command))
        if group is None:
            return "".join(out) + s[i:]
        out.append(s[i:j] + group[0])
        i = group[1]


def _fix_fracs(s: str) -> str:
    r"""\frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}, \frac{1}2 -> \frac{1}{2}."""
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*([a-zA-Z\d])\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*([a-zA-Z\d])", r"\\frac\1{\2}", s)
    return s


def normalize_latex(s: str) -> str:
    r"""Canonical text of a LaTeX answer, so that trivially different spellings compare equal.

    Removes "$", spaces (incl. "\!", "\,", "\;", "\ "), "\left"/"\right", "\displaystyle", degree
    marks (^\circ), percent signs, a trailing ".", a whole \boxed{...} wrapper, trailing "\text{...}"
    units ("5\text{ cm}" -> "5"; a lone "\text{Monday}" -> "Monday"), thousands commas ("1,000");
    rewrites \dfrac/\tfrac -> \frac, \frac12 -> \frac{1}{2}, \sqrt3 -> \sqrt{3}, "a/b" -> \frac{a}{b},
    ".5" -> "0.5", and "x=5" -> "5" (a short left-hand side). Values ("0.5" vs "\frac{1}{2}") are
    compared later by `math_equivalent`, not here.
    """
    s = s.strip().replace("\n", "")
    boxed = last_boxed(s) if s.startswith(("\\boxed", "\\fbox")) else None
    if boxed is not None:
        s = boxed
    for junk in ("\\!", "\\,", "\\;", "\\:", "\\ ", "\\displaystyle", "\\$", "$"):
        s = s.replace(junk, "")
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)  # keeps \rightarrow
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ", "", s)
    s = s.replace("\\%", "").replace("%", "")
    # Units: a \text{...}/\mbox{...} after something else is dropped; a lone one is unwrapped.
    for command in ("\\text", "\\textbf", "\\mbox", "\\mathrm"):
        match = re.search(re.escape(command) + r"\{[^{}]*\}\s*(?:\^\s*\{?\d\}?)?\s*\.?\s*$", s)
        if match and s[: match.start()].strip():
            s = s[: match.start()]
        s = _unwrap_command(s, command)
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = _fix_fracs(s)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+/\d+", s):
        numerator, denominator = s.split("/")
        s = f"\\frac{{{numerator}}}{{{denominator}}}"
        s = s.replace("\\frac{-", "-\\frac{")
    s = re.sub(r"(^|[^\d}])\.(\d)", r"\g<1>0.\2", s)
    if s.count("=") == 1 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    return s


# LaTeX -> sympy. The converter below covers the common answer forms (\frac, \sqrt, ^, \cdot, \pi, ...);
# sympy's own parse_latex needs a pinned antlr4 runtime that may not be installed, and an answer we
# cannot convert is simply not equivalent.
_MAX_EXPR_CHARS = 400
_MAX_ABS_EXPONENT = 1e4
_FUNCTION_NAMES = {"sqrt", "log", "sin", "cos", "tan", "exp"}
_LATEX_WORDS = {
    "\\cdot": "*", "\\times": "*", "\\div": "/", "\\pi": " pi ", "\\infty": " oo ",
    "\\ln": " log", "\\log": " log", "\\sin": " sin", "\\cos": " cos", "\\tan": " tan", "\\exp": " exp",
}
_TOKEN_RE = re.compile(r"\s*(?:(\d+(?:\.\d+)?|\.\d+)|([A-Za-z]+)|(\*\*|[-+*/()]))")


def _replace_commands(s: str) -> str:
    r"""\frac{a}{b} -> ((a)/(b)), \sqrt[n]{a} -> ((a)**(1/(n))), \sqrt{a} -> sqrt(a), innermost first."""
    while True:
        match = re.search(r"\\frac\{|\\sqrt\[|\\sqrt\{", s)
        if match is None:
            return s
        start = match.start()
        if match.group(0) == "\\frac{":
            numerator = _braced_group(s, match.end() - 1)
            if numerator is None or numerator[1] >= len(s) or s[numerator[1]] != "{":
                raise ValueError("malformed \\frac")
            denominator = _braced_group(s, numerator[1])
            if denominator is None:
                raise ValueError("malformed \\frac")
            inner = f"(({_replace_commands(numerator[0])})/({_replace_commands(denominator[0])}))"
            s = s[:start] + inner + s[denominator[1]:]
        elif match.group(0) == "\\sqrt[":
            close = s.find("]", match.end())
            if close < 0 or close + 1 >= len(s) or s[close + 1] != "{":
                raise ValueError("malformed \\sqrt[n]")
            radicand = _braced_group(s, close + 1)
            if radicand is None:
                raise ValueError("malformed \\sqrt[n]")
            index = _replace_commands(s[match.end():close])
            inner = f"(({_replace_commands(radicand[0])})**(1/({index})))"
            s = s[:start] + inner + s[radicand[1]:]
        else:
            radicand = _braced_group(s, match.end() - 1)
            if radicand is None:
                raise ValueError("malformed \\sqrt")
            s = s[:start] + f"sqrt({_replace_commands(radicand[0])})" + s[radicand[1]:]


def _latex_to_python(s: str) -> str:
    """A sympy-parsable expression for a normalised LaTeX answer; ValueError if any part is unknown.

    The output holds only numbers, + - * / ** ( ), single-letter symbols, pi, oo and a few function
    names, so handing it to sympy's parser cannot run arbitrary code. Implicit products ("2x",
    "2\\sqrt{3}", "(a)(b)") get an explicit "*".
    """
    s = _replace_commands(s)
    # A brace-less exponent is one character or one command, as in LaTeX: 2^10 is 2^1 followed by 0.
    s = re.sub(r"\^\s*\{", "**{", s)
    s = re.sub(r"\^\s*(\\[A-Za-z]+|[A-Za-z\d])", r"**(\1)", s)
    for word, replacement in _LATEX_WORDS.items():
        s = s.replace(word, replacement)
    s = s.replace("{", "(").replace("}", ")")
    if "\\" in s or "^" in s:
        raise ValueError(f"unsupported LaTeX in {s!r}")

    tokens: list[tuple[str, str]] = []  # (kind, text); kinds: atom, func, op, open, close
    position = 0
    s = s.rstrip()
    while position < len(s):
        match = _TOKEN_RE.match(s, position)
        if match is None:
            raise ValueError(f"unsupported character in {s[position:]!r}")
        number, word, op = match.groups()
        position = match.end()
        if number:
            tokens.append(("atom", number))
        elif word:
            if word in _FUNCTION_NAMES:
                tokens.append(("func", word))
            elif word in ("pi", "oo"):
                tokens.append(("atom", word))
            else:  # "xy" is x*y
                tokens.extend(("atom", letter) for letter in word)
        else:
            tokens.append(("open" if op == "(" else "close" if op == ")" else "op", op))
    pieces: list[str] = []
    previous = None
    for kind, text in tokens:
        if previous in ("atom", "close") and kind in ("atom", "func", "open"):
            pieces.append("*")
        pieces.append(text)
        previous = kind
    return " ".join(pieces)


def _to_sympy(latex: str):
    """Parse a normalised LaTeX answer into an unevaluated sympy expression (raises on failure)."""
    import sympy
    from sympy.parsing.sympy_parser import parse_expr

    code = _latex_to_python(latex)
    if not code or len(code) > _MAX_EXPR_CHARS:
        raise ValueError("empty or too long to compare")
    names: dict[str, Any] = {letter: sympy.Symbol(letter) for letter in set(re.findall(r"\b[A-Za-z]\b", code))}
    names.update(i=sympy.I, pi=sympy.pi, oo=sympy.oo, sqrt=sympy.sqrt, log=sympy.log, sin=sympy.sin,
                 cos=sympy.cos, tan=sympy.tan, exp=sympy.exp)
    return parse_expr(code, local_dict=names, evaluate=False)


def _bounded_value(expr, point: dict) -> complex:
    """Numeric value of `expr` at `point`; raises on towers like 9^(9^(9^9)) instead of hanging.

    Every power's exponent is evaluated first (bottom-up) and must stay below 1e4 in magnitude; the
    result must be a finite complex number.
    """
    import sympy

    def check(node) -> None:
        for child in node.args:
            check(child)
        if isinstance(node, sympy.Pow):
            exponent = complex(node.exp.evalf(15, subs=point))
            if not abs(exponent) < _MAX_ABS_EXPONENT:
                raise ValueError("exponent too large to evaluate safely")

    check(expr)
    value = complex(expr.evalf(20, subs=point))
    if not (cmath.isfinite(value)):
        raise ValueError("not a finite number")
    return value


def _values_agree(pred, gold) -> bool:
    """Same value at three deterministic random points of the free symbols (identity test)."""
    symbols = sorted(pred.free_symbols | gold.free_symbols, key=str)
    rng = random.Random(0)
    trials = 3 if symbols else 1
    for _ in range(trials):
        point = {symbol: rng.uniform(0.5, 2.5) for symbol in symbols}
        a, b = _bounded_value(pred, point), _bounded_value(gold, point)
        if not (abs(a - b) <= 1e-8 or abs(a - b) <= 1e-6 * abs(b)):
            return False
    return True


_BRACKETS = {"(": ")", "[": "]", "\\{": "\\}", "{": "}"}


def _split_top_level(s: str) -> list[str]:
    """Split on commas that are not inside (), [] or {}."""
    parts, depth, current = [], 0, []
    for char in s:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _sequence_parts(s: str) -> tuple[str, list[str]] | None:
    """("(", ["1", "2"]) for "(1,2)"; ("", [...]) for a bare "1,2"; None when there is no comma."""
    for open_, close in _BRACKETS.items():
        if s.startswith(open_) and s.endswith(close) and len(s) > len(open_) + len(close):
            inner = s[len(open_) : -len(close)]
            parts = _split_top_level(inner)
            if len(parts) > 1:
                return open_ + close, parts
    parts = _split_top_level(s)
    return ("", parts) if len(parts) > 1 else None


def _normalized_equivalent(pred: str, gold: str) -> bool:
    if pred == gold:
        return True
    pred_seq, gold_seq = _sequence_parts(pred), _sequence_parts(gold)
    if pred_seq is not None or gold_seq is not None:
        if pred_seq is None or gold_seq is None or pred_seq[0] != gold_seq[0]:
            return False
        if len(pred_seq[1]) != len(gold_seq[1]):
            return False
        return all(_normalized_equivalent(p, g) for p, g in zip(pred_seq[1], gold_seq[1]))
    return _values_agree(_to_sympy(pred), _to_sympy(gold))


def math_equivalent(pred: str | None, gold: str) -> bool:
    """Whether a MATH prediction equals the gold answer.

    Equal after `normalize_latex`, else (element-wise for tuples/intervals/lists with the same
    brackets) the same numeric value, at three fixed random points for answers with variables, of the
    sympy forms of both. Any exception while normalising, converting or evaluating, and a None
    prediction, mean NOT equivalent. The comparison is bounded: inputs over 400 characters after
    conversion and exponents above 1e4 are refused rather than simplified.
    """
    if pred is None:
        return False
    try:
        return _normalized_equivalent(normalize_latex(pred), normalize_latex(gold))
    except Exception:  # noqa: BLE001 -- a crash must never count as correct (see module docstring)
        return False


def score_math(pred_text: str, gold: str) -> bool:
    """`math_equivalent` of the answer extracted from `pred_text` and `gold` (the gold's boxed answer)."""
    return math_equivalent(extract_math_prediction(pred_text), gold)


# ---------------------------------------------------------------------------------------------------
# Commonsense (LLM-Adapters labels)
# ---------------------------------------------------------------------------------------------------

_FIVE_ANSWERS = ("answer1", "answer2", "answer3", "answer4", "answer5")
COMMONSENSE_LABELS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "siqa": _FIVE_ANSWERS,
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "arc_e": _FIVE_ANSWERS,
    "arc_c": _FIVE_ANSWERS,
    "obqa": _FIVE_ANSWERS,
}


@functools.cache
def _label_pattern(task: str) -> re.Pattern:
    if task not in COMMONSENSE_LABELS:
        raise ValueError(f"unknown commonsense task {task!r}; known: {sorted(COMMONSENSE_LABELS)}")
    alternatives = "|".join(COMMONSENSE_LABELS[task])
    # Word-ish boundaries so "answer12" is not answer1 and "untrue" is not true.
    return re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])", re.IGNORECASE)


def extract_commonsense_label(text: str, task: str) -> str | None:
    """The FIRST label of the task's vocabulary found in `text` (lower-cased), or None.

    Vocabularies (`COMMONSENSE_LABELS`): boolq true|false, piqa solution1|2, siqa/arc_e/arc_c/obqa
    answer1..5, hellaswag ending1..4, winogrande option1|2. Matching ignores case (LLM-Adapters is
    case-sensitive; models that write "True" are not penalised here) and needs the label to stand
    alone ("answer12" matches nothing). Unknown task -> ValueError.
    """
    match = _label_pattern(task).search(text)
    return match.group(0).lower() if match else None


def score_commonsense(text: str, gold: str, task: str) -> bool:
    """Exact match of the first label in `text` with `gold` (e.g. "answer2"); no label is wrong."""
    return extract_commonsense_label(text, task) == gold.strip().lower()


# ---------------------------------------------------------------------------------------------------
# reasoning-gym
# ---------------------------------------------------------------------------------------------------


@functools.cache
def _reasoning_gym_score_fn(dataset_name: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(dataset_name)


def extract_reasoning_gym_answer(text: str) -> str:
    """What `score_reasoning_gym` hands to the dataset's scorer.

    The rest of the line after the last "The answer is:" (stripped, one trailing "." removed) when the
    marker is present; else the content of the last <answer>...</answer> block (reasoning-gym's own
    prompt format); else the whole text stripped.
    """
    markers = list(_ANSWER_MARKER_RE.finditer(text))
    if markers:
        tail = text[markers[-1].end():].strip().split("\n", 1)[0].strip()
        return tail[:-1].rstrip() if tail.endswith(".") else tail
    blocks = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    if blocks:
        return blocks[-1].strip()
    return text.strip()


def score_reasoning_gym(answer_text: str, entry: dict) -> float:
    """The reasoning-gym reward in [0, 1] of a generation for one dataset entry.

    Delegates to `reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])`, the
    dataset's own `score_answer(answer, entry)`, with the answer taken by
    `extract_reasoning_gym_answer`. Some datasets give partial credit (e.g. gsm_symbolic gives 0.01
    for a wrong number); count an item correct only when the reward is 1.0.
    """
    score_fn = _reasoning_gym_score_fn(entry["metadata"]["source_dataset"])
    return float(score_fn(extract_reasoning_gym_answer(answer_text), entry))


# ---------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------

_Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def accuracy_with_ci(correct: list[bool]) -> dict:
    """Accuracy with its 95% Wilson score interval.

    Returns {"accuracy", "ci_low", "ci_high", "n", "n_correct"}; with p = k/n and z = 1.96,
    centre = (p + z^2/2n) / (1 + z^2/n), half-width = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2).
    An empty list raises ValueError.
    """
    n = len(correct)
    if n == 0:
        raise ValueError("accuracy_with_ci needs at least one scored item")
    k = sum(1 for c in correct if c)
    p = k / n
    z2 = _Z_95 * _Z_95
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = _Z_95 / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return {
        "accuracy": p,
        "ci_low": max(0.0, centre - half),
        "ci_high": min(1.0, centre + half),
        "n": n,
        "n_correct": k,
    }
