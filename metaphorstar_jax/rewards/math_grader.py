"""Answer equivalence as `mathruler.grader.grade_answer` decides it, without sympy.

EasyR1 reward functions (MetaphorStar's TFQ-GRPO among them, specs/seed_methods.md §1.6) call
`mathruler.grader.grade_answer(given, ground_truth)`. It says two answers agree when

  (a) the Hendrycks MATH normaliser maps both to the same string, or
  (b) mathruler's own normaliser (which also lower-cases, drops braces, `$`, units, ...) does, or
  (c) split into tuple elements, each pair is equal under `sympy.simplify` (guarded: at most two
      distinct letters, no `^{`), integers and unreduced fractions compared as strings.

This module reproduces (a) and (b) step for step, LaTeX in an answer turned into text by
pylatexenc as in mathruler, and (c) for everything except genuine algebra. It differs from
mathruler in two places, both so that a reward always returns:

  * sympy. mathruler hands the answer to `sympy_parser.parse_expr`, which runs it through Python's
    `eval`, then to `sympy.simplify`; `9**9**9` passes its guard and never returns. (sympy's LaTeX
    parser is no safer: `9^{9^{9}}` evaluates the power just the same.) Where mathruler would ask
    sympy, we accept two elements only when they are the same string after dropping redundant
    outer parentheses, or the same finite number. So `((T))` and `0.50` vs `0.5` agree as in
    mathruler, while `T+0` vs `T` or `2T/2` vs `T` (which sympy simplifies to equal) do not.
  * Bounded LaTeX. pylatexenc backtracks on unclosed groups: 18 nested `\\frac{` (108
    characters) take it about a minute, and each further level multiplies that. We give up on the
    LaTeX step, as mathruler does when pylatexenc raises, past a token budget linear in the
    answer's length, past 32 nested groups, or on an answer over 2,048 characters. Within those
    bounds the text is pylatexenc's own; past them mathruler may hang, or grade by how deep the
    caller's stack is.
"""

from __future__ import annotations

import math
import re

from pylatexenc import latexwalker
from pylatexenc.latex2text import LatexNodes2Text

_TEXT_WRAPPED = re.compile(r"^\\text\{(?P<text>.+?)\}$")
_UNITS = (
  "degree",
  "cm",
  "centimeter",
  "meter",
  "mile",
  "second",
  "minute",
  "hour",
  "day",
  "week",
  "month",
  "year",
  "foot",
  "feet",
  "inch",
  "yard",
)
_UNIT_PATTERNS = tuple(re.compile(rf"{unit}(es)?(s)? *(\^[0-9]+)?") for unit in _UNITS)
_DEGREE = re.compile(r"\^ *\\circ")
_THIN_SPACE = re.compile(",\\\\! *")
_MINUS_SPACE = re.compile("- *")
_MIXED_NUMBER = re.compile("([0-9]) +([0-9])")
_THOUSANDS_COMMA = re.compile(r"(\d)(,)(\d\d\d)($|\D)")
_FRACTION = re.compile(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$")
_UNSAFE_REGEXES = (re.compile(r"\^[0-9]+\^"), re.compile(r"\^[0-9][0-9]+"))
_UNSAFE_SUBSTRINGS = ("^{", "^(")
_TUPLE_CHARS = "()[]"
_MAX_SYMBOLS = 2  # mathruler refuses sympy on expressions with more distinct letters

# Bounds on the LaTeX step (module doc). Well-formed LaTeX reads at most two tokens a character;
# each unclosed group doubles what pylatexenc reads, so the fixed part lets some six through.
# Worst case, about a third of a second per answer on one CPU core.
_MAX_LATEX_CHARS = 2048  # a longer answer skips the step; no ground truth is near that long
_LATEX_TOKENS_PER_CHAR = 4
_LATEX_TOKENS_FIXED = 1024
# Nested groups, environments and math modes. Past some hundred levels pylatexenc hits Python's
# recursion limit, at a depth that depends on the caller's stack; this keeps the result fixed.
_MAX_LATEX_DEPTH = 32
# Built once: each costs a few hundred microseconds, and neither changes while converting.
_LATEX_CONTEXT = latexwalker.get_default_latex_context_db()
_LATEX_TO_TEXT = LatexNodes2Text()


class _Unnormalisable(Exception):
  """Raised where the Hendrycks normaliser raises; the caller then keeps the raw answer."""


# ---------------------------------------------------------------------------------------------
# (a) The Hendrycks MATH normaliser (mathruler/math_normalize.py).


def _remove_right_units(text: str) -> str:
  if "\\text{ " not in text:
    return text
  parts = text.split("\\text{ ")
  if len(parts) != 2:
    raise _Unnormalisable
  return parts[0]


def _fix_sqrt(text: str) -> str:
  if "\\sqrt" not in text:
    return text
  pieces = text.split("\\sqrt")
  fixed = pieces[0]
  for piece in pieces[1:]:
    if not piece:
      raise _Unnormalisable
    fixed += "\\sqrt" + (piece if piece[0] == "{" else "{" + piece[0] + "}" + piece[1:])
  return fixed


def _fix_fracs(text: str) -> str:
  pieces = text.split("\\frac")
  fixed = pieces[0]
  for piece in pieces[1:]:
    fixed += "\\frac"
    if not piece:
      raise _Unnormalisable
    if piece[0] == "{":
      fixed += piece
      continue
    if len(piece) < 2:
      return text
    numerator, second = piece[0], piece[1]
    if second != "{":
      fixed += "{" + numerator + "}{" + second + "}" + piece[2:]
    else:
      fixed += "{" + numerator + "}" + second + piece[2:]
  return fixed


def _fix_a_slash_b(text: str) -> str:
  parts = text.split("/")
  if len(parts) != 2:
    return text
  try:
    numerator, denominator = int(parts[0]), int(parts[1])
  except ValueError:
    return text
  if text != f"{numerator}/{denominator}":
    return text
  return "\\frac{" + str(numerator) + "}{" + str(denominator) + "}"


def _strip_math_string(text: str) -> str:
  text = text.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
  text = text.replace("tfrac", "frac").replace("dfrac", "frac")
  text = text.replace("\\left", "").replace("\\right", "")
  text = text.replace("^{\\circ}", "").replace("^\\circ", "")
  text = text.replace("\\$", "")
  text = _remove_right_units(text)
  text = text.replace("\\%", "").replace("%", "")
  text = text.replace(" .", " 0.").replace("{.", "{0.")
  if not text:
    return text
  if text[0] == ".":
    text = "0" + text
  sides = text.split("=")
  if len(sides) == 2 and len(sides[0]) <= 2:
    text = sides[1]
  text = _fix_sqrt(text)
  text = text.replace(" ", "")
  text = _fix_fracs(text)
  if text == "0.5":
    text = "\\frac{1}{2}"
  return _fix_a_slash_b(text)


def normalize_math_answer(answer: str | None) -> str | None:
  """The Hendrycks MATH answer normaliser; returns the stripped input where it would fail."""
  if answer is None:
    return None
  answer = answer.strip()
  match = _TEXT_WRAPPED.search(answer)
  if match is not None:
    answer = match.group("text").strip()
  try:
    return _strip_math_string(answer)
  except _Unnormalisable:
    return answer


# ---------------------------------------------------------------------------------------------
# (b) mathruler's own normaliser.


def _is_float(text: str) -> bool:
  try:
    float(text)
  except ValueError:
    return False
  return True


def _is_integral(value: float) -> bool:
  try:
    return abs(value - int(round(value))) <= 1e-7
  except (OverflowError, ValueError):
    return False


def _strip_thousands_commas(text: str) -> str:
  while True:
    stripped = _THOUSANDS_COMMA.sub("\\1\\3\\4", text)
    if stripped == text:
      return stripped
    text = stripped


def _text_is_int(text: str) -> bool:
  try:
    return _is_integral(float(_strip_thousands_commas(text)))
  except ValueError:
    return False


class _LatexTooComplex(Exception):
  """Raised by _BoundedWalker past its token budget or nesting depth."""


class _BoundedWalker(latexwalker.LatexWalker):
  """pylatexenc's parser, which gives up (raises _LatexTooComplex) past the bounds above."""

  def __init__(self, latex: str):
    super().__init__(latex, latex_context=_LATEX_CONTEXT)
    self._tokens_left = _LATEX_TOKENS_PER_CHAR * len(latex) + _LATEX_TOKENS_FIXED
    self._depth = 0

  def get_token(self, *args, **kwargs):
    self._tokens_left -= 1
    if self._tokens_left < 0:
      raise _LatexTooComplex
    return super().get_token(*args, **kwargs)

  def get_latex_nodes(self, *args, **kwargs):
    if self._depth >= _MAX_LATEX_DEPTH:
      raise _LatexTooComplex
    self._depth += 1
    try:
      return super().get_latex_nodes(*args, **kwargs)
    finally:
      self._depth -= 1


def _latex_to_text(latex: str) -> str | None:
  """pylatexenc's `LatexNodes2Text().latex_to_text(latex)`; None where it fails or is bounded."""
  if len(latex) > _MAX_LATEX_CHARS:
    return None
  try:
    nodes, _, _ = _BoundedWalker(latex).get_latex_nodes()
    return _LATEX_TO_TEXT.nodelist_to_text(nodes)
  except Exception:  # pylatexenc raises KeyError, TypeError, ... on malformed input; mathruler too
    return None


def _parse_latex(expr: str) -> str | None:
  """mathruler's `_parse_latex`: LaTeX to sympy-like text; None where the conversion fails."""
  expr = expr.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac")
  text = _latex_to_text(expr.replace("\\frac", " \\frac"))  # a mixed number 1\frac12 -> "1 1/2"
  if text is None:
    return None
  for symbol, name in (
    ("√", "sqrt"),
    ("π", "pi"),
    ("∞", "inf"),
    ("∪", "U"),
    ("·", "*"),
    ("×", "*"),
  ):
    text = text.replace(symbol, name)
  return text.strip()


def normalize_answer(expr: str | None) -> str | None:
  """mathruler's `_normalize`: units, `$`, braces and case dropped, integers canonicalised."""
  if expr is None:
    return None
  match = _TEXT_WRAPPED.search(expr)
  if match is not None:
    expr = match.group("text")
  expr = expr.replace("\\%", "%").replace("\\$", "$").replace("$", "").replace("%", "")
  expr = expr.replace(" or ", " , ").replace(" and ", " , ")
  expr = expr.replace("million", "*10^6").replace("billion", "*10^9").replace("trillion", "*10^12")
  for pattern in _UNIT_PATTERNS:
    expr = pattern.sub("", expr)
  expr = _DEGREE.sub("", expr)
  if expr and expr[0] == "{" and expr[-1] == "}":
    expr = expr[1:-1]
  expr = _THIN_SPACE.sub("", expr)
  if _is_float(expr) and _is_integral(float(expr)):
    expr = str(int(round(float(expr))))
  if "\\" in expr:
    text = _parse_latex(expr)
    expr = expr if text is None else text  # mathruler keeps the answer when pylatexenc fails
  expr = _MINUS_SPACE.sub("-", expr)
  expr = _MIXED_NUMBER.sub("\\1+\\2", expr)
  expr = expr.replace(" ", "").replace("{", "").replace("}", "").lower()
  if _text_is_int(expr):
    expr = str(int(float(expr.replace(",", ""))))
  return expr


# ---------------------------------------------------------------------------------------------
# (c) Element-wise comparison.


def _split_tuple(expr: str) -> list[str]:
  expr = _strip_thousands_commas(expr)
  if not expr:
    return []
  if (
    len(expr) > 2
    and expr[0] in _TUPLE_CHARS
    and expr[-1] in _TUPLE_CHARS
    and not any(c in expr[1:-1] for c in _TUPLE_CHARS)
  ):
    return [element.strip() for element in expr[1:-1].split(",")]
  return [expr]


def _sympy_would_try(expr: str) -> bool:
  letters = {c for c in expr.replace("sqrt", "").replace("frac", "") if c.isalpha()}
  if len(letters) > _MAX_SYMBOLS:
    return False
  if any(bad in expr for bad in _UNSAFE_SUBSTRINGS):
    return False
  return not any(pattern.search(expr) for pattern in _UNSAFE_REGEXES)


def _strip_outer_parentheses(expr: str) -> str:
  while len(expr) >= 2 and expr[0] == "(" and expr[-1] == ")":
    depth = 0
    for index, char in enumerate(expr):
      depth += (char == "(") - (char == ")")
      if depth == 0 and index < len(expr) - 1:
        return expr  # the first "(" closes before the end: "(a)+(b)"
    expr = expr[1:-1]
  return expr


def _equal_without_sympy(ground_truth: str, given: str) -> bool:
  if not _sympy_would_try(f"({ground_truth})-({given})"):
    return False
  # sympy parses a Python expression: whitespace, newlines included, does not matter.
  ground_truth, given = (
    "".join(_strip_outer_parentheses(e).split()) for e in (ground_truth, given)
  )
  if ground_truth and ground_truth == given:
    return True
  try:
    ground_truth_value, given_value = float(ground_truth), float(given)
  except ValueError:
    return False
  return math.isfinite(ground_truth_value) and ground_truth_value == given_value


def grade_answer(given_answer: str | None, ground_truth: str | None) -> bool:
  """Whether `given_answer` matches `ground_truth`, as mathruler.grader.grade_answer (module doc).

  Never raises; non-string inputs are not equal to anything.
  """
  if not isinstance(given_answer, str) or not isinstance(ground_truth, str):
    return False
  if normalize_math_answer(ground_truth) == normalize_math_answer(given_answer):
    return True
  ground_truth_normalized = normalize_answer(ground_truth)
  given_normalized = normalize_answer(given_answer)
  if ground_truth_normalized == given_normalized:
    return True
  if not given_normalized:
    return False
  ground_truth_elements = _split_tuple(ground_truth_normalized)
  given_elements = _split_tuple(given_normalized)
  if len(ground_truth_elements) > 1 and (
    ground_truth_normalized[0] != given_normalized[0]
    or ground_truth_normalized[-1] != given_normalized[-1]
  ):
    return False
  if len(ground_truth_elements) != len(given_elements):
    return False
  for truth, given in zip(ground_truth_elements, given_elements):
    if _FRACTION.search(truth) and _FRACTION.search(given):
      equal = truth == given  # unreduced fractions must match as written
    elif _text_is_int(truth) != _text_is_int(given):
      equal = False
    else:
      equal = _equal_without_sympy(truth, given)
    if not equal:
      return False
  return True
