"""metaphorstar_jax.rewards.math_grader: mathruler's grade_answer without sympy, LaTeX bounded."""

from __future__ import annotations

import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mathruler import grader as mathruler_grader  # the test extra pins the release EasyR1 uses

from metaphorstar_jax.rewards.math_grader import (
  grade_answer,
  normalize_answer,
  normalize_math_answer,
)

# (given, ground truth, equal): forms a model writes for a true/false or short answer.
TABLE = [
  ("T", "T", True),
  ("t", "T", True),
  (" T ", "T", True),
  ("T\n", "T", True),
  ("T.", "T", False),
  ("(T)", "T", True),
  ("[T]", "T", True),
  ("((T))", "T", True),
  ("{T}", "T", True),
  ("{{T}}", "T", True),
  ("$T$", "T", True),
  ("\\text{T}", "T", True),
  ("\\textbf{T}", "T", True),
  ("\\mathrm{T}", "T", True),
  ("\\boxed{T}", "T", True),
  ("\\(T\\)", "T", True),
  ("\\[T\\]", "T", True),
  ("\\left(T\\right)", "T", True),
  ("\\mathbf{T}", "T", False),
  ("\\textsf{T}", "T", False),
  ("True", "T", False),
  ("true", "T", False),
  ("F", "T", False),
  ("T, F", "T", False),
  ("T F", "T", False),
  ("T and T", "T", False),
  ("T or T", "T", False),
  ("x = T", "T", True),
  ("A: T", "T", False),
  ("**T**", "T", False),
  ('"T"', "T", False),
  ("T)", "T", False),
  ("TT", "T", False),
  ("T%", "T", True),
  ("T^\\circ", "T", True),
  ("T \\text{ points}", "T", True),
  ("", "T", False),
  ("f", "F", True),
  ("F.", "F", False),
  ("\\\\T", "T", True),
  ("0.5", "1/2", True),
  ("1/2", "\\frac{1}{2}", True),
  ("2/4", "1/2", False),
  ("1,000", "1000", True),
  ("3.0", "3", True),
  ("0.50", "0.5", True),
  ("5 days", "5", True),
  ("(1, 2)", "(1,2)", True),
  ("(1, 2)", "[1, 2]", False),
  ("inf", "T", False),
  ("nan", "T", False),
]


# LaTeX as pylatexenc turns it into text, inside mathruler's normaliser: symbol macros become
# their characters (then `\cdot` `*`, `\pi` `pi`, `\infty` `inf`), a bare `\frac` pylatexenc's
# `%s/%s`, bold digits plain digits, accents combining characters, and `\input` reads no file.
LATEX = [
  ("3 \\cdot 4", "3*4"),
  ("2 \\times 3", "2*3"),
  ("\\pi", "pi"),
  ("2\\pi", "2pi"),
  ("-\\infty", "-inf"),
  ("x \\le 3", "x≤3"),
  ("x \\geq 3", "x≥3"),
  ("x \\neq 1", "x≠1"),
  ("A \\cup B", "aub"),
  ("\\alpha", "α"),
  ("\\ldots", "…"),
  ("\\circ", "∘"),
  ("\\frac", "%s/%s"),
  ("\\frac{1}", "%s/%s1"),
  ("\\frac12", "1/2"),
  ("\\dfrac{3}{4}", "3/4"),
  ("1\\frac{1}{2}", "1+1/2"),
  ("\\sqrt2", "sqrt(2)"),
  ("2\\sqrt{3}", "2sqrt(3)"),
  ("\\mathbf{1}", "1"),
  ("\\mathbf{T}", "𝐓"),
  ("\\boldsymbol{T}", "t"),
  ("\\boldsymbol{1}", "1"),
  ("\\mathbb{R}", "ℝ"),
  ("\\hat{x}", "x\u0302"),
  ("\\vec{v}", "v\u20d7"),
  ("\\bar{x}", "x\u0305"),
  ("\\tilde{n}", "ñ"),
  ("\\'e", "é"),
  ("\\textsf{T}", ""),
  ("\\input{setup.py}", ""),
  ("\\frac{" * 5, "%s/%s" * 5),  # unclosed, but within the token budget
]


@pytest.mark.parametrize("answer, normalized", LATEX)
def test_latex_as_pylatexenc(answer, normalized):
  assert normalize_answer(answer) == normalized
  assert mathruler_grader._normalize(answer) == normalized


# What the converter that pylatexenc replaced got wrong, in grades.
LATEX_GRADES = [
  ("3 \\cdot 4", "3+4", False),
  ("\\pi", "\\infty", False),
  ("x \\le 3", "x \\geq 3", False),
  ("\\frac12", "12", False),
  ("1\\frac{1}{2}", "11/2", False),
  ("\\sqrt2", "2", False),
  ("\\hat{x}", "x", False),
  ("\\input{T}", "T", False),
  ("\\pi", "pi", True),
  ("-\\infty", "-inf", True),
  ("\\mathbf{1}", "1", True),
  ("\\boldsymbol{T}", "T", True),
  ("\\text{\\boldsymbol{F}}", "F", True),
]


@pytest.mark.parametrize("given_answer, truth, equal", TABLE + LATEX_GRADES)
def test_table(given_answer, truth, equal):
  assert grade_answer(given_answer, truth) is equal


@pytest.mark.parametrize("given_answer, truth, equal", TABLE + LATEX_GRADES)
def test_table_agrees_with_mathruler(given_answer, truth, equal):
  assert mathruler_grader.grade_answer(given_answer, truth) is equal


# Divergence 1, sympy (module doc): mathruler simplifies these to the ground truth; we do not call
# sympy, whose parser evaluates the answer as Python.
ALGEBRA = ["T+0", "1*T", "2T/2", "T/1", "T*1", "T^{1}", "1T"]


@pytest.mark.parametrize("given_answer", ALGEBRA)
def test_documented_algebra_differences(given_answer):
  assert mathruler_grader.grade_answer(given_answer, "T") is True
  assert grade_answer(given_answer, "T") is False


def test_normalisers():
  assert normalize_math_answer("\\text{ 0.5 }") == "\\frac{1}{2}"
  assert normalize_math_answer("\\sqrt") == "\\sqrt"  # the original raises here and keeps the input
  assert normalize_answer("\\text{T}") == "t"
  assert normalize_answer("{5} cm") == "5"


def test_non_strings():
  assert grade_answer(None, "T") is False
  assert grade_answer("T", None) is False
  assert grade_answer(3, "3") is False


# Divergence 2, bounded LaTeX (module doc). Each of these keeps pylatexenc (and so mathruler) busy
# for minutes to forever, overflows its recursion, is long, or makes pylatexenc raise; each grades
# within a few seconds here. mathruler's `9**9**9` hang is sympy's.
PATHOLOGICAL = {
  "unclosed \\frac{": "\\frac{" * 20,
  "unclosed \\sqrt[": "\\sqrt[x" * 20,
  "unclosed math": "$\\frac{" * 15,
  "unclosed exponents": "x^{\\frac{" * 15,
  "deeper unclosed \\frac{": "\\frac{" * 40,
  "padding, then unclosed": "x" * 1800 + "\\frac{" * 20,
  "long padding, then unclosed": "x" * 200000 + "\\frac{" * 20,
  "deep braces": "{" * 20000 + "\\text{T}" + "}" * 20000,
  "deep environments": "\\begin{pmatrix}" * 5000,
  "unbalanced closers": "}" * 50000 + "\\cdot",
  "long LaTeX": "\\cdot " * 200000,
  "backslashes": "\\" * 100000,
  "thousands commas": "1," + "000," * 100000 + "000",
  "power tower": "9**9**9",
  "a KeyError in pylatexenc": "\\sqrt\\sqrt x",
}
SECONDS_TO_GRADE = 10.0


def _within(seconds, fn):
  """fn() on a fresh thread; fails the test if it has not returned after `seconds`."""
  outcome = []

  def call():
    try:
      outcome.append(fn())
    except Exception as error:  # reported below, not lost in the thread
      outcome.append(error)

  worker = threading.Thread(target=call, daemon=True)
  worker.start()
  worker.join(seconds)
  assert outcome, f"no answer after {seconds} s"
  assert not isinstance(outcome[0], Exception), repr(outcome[0])
  return outcome[0]


@pytest.mark.parametrize("answer", PATHOLOGICAL.values(), ids=PATHOLOGICAL.keys())
def test_pathological_answers_grade_promptly(answer):
  assert _within(SECONDS_TO_GRADE, lambda: grade_answer(answer, "T")) is False
  assert _within(SECONDS_TO_GRADE, lambda: grade_answer("T", answer)) is False


def test_bounded_latex_is_kept_as_written():
  # As mathruler keeps an answer on which pylatexenc raises: only braces and spaces go.
  assert normalize_answer("\\frac{" * 40) == "\\frac" * 40


def _at_stack_depth(frames, fn):
  return fn() if frames == 0 else _at_stack_depth(frames - 1, fn)


def test_deep_nesting_grades_the_same_at_any_stack_depth():
  # Unbounded, pylatexenc parses this near the top of the stack and overflows deeper down.
  nested = "\\text{" * 100 + "T" + "}" * 100
  frames = sys.getrecursionlimit() * 3 // 5
  assert grade_answer(nested, "T") is _at_stack_depth(frames, lambda: grade_answer(nested, "T"))


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=60), st.sampled_from(["T", "F", "1/2", "(1,2)", "5", "\\frac{3}{4}", ""]))
def test_never_raises(given_answer, truth):
  assert grade_answer(given_answer, truth) in (True, False)


LATEX_PIECES = [
  *("\\frac", "\\sqrt", "\\text", "\\mathbf", "\\boldsymbol", "\\hat", "\\begin{pmatrix}"),
  *("\\end{pmatrix}", "\\cdot", "\\pi", "\\le", "\\left(", "\\right)", "\\(", "\\)", "\\\\"),
  *("{", "}", "[", "]", "(", ")", "$", "^", "_", "&", ",", " ", "T", "x", "1", "2", "\\"),
]
latex_answers = st.lists(st.sampled_from(LATEX_PIECES), max_size=60).map("".join)


@settings(max_examples=300, deadline=None)
@given(latex_answers, st.sampled_from(["T", "F", "1/2", "\\frac{3}{4}", "\\pi"]))
def test_never_raises_on_latex(given_answer, truth):
  assert grade_answer(given_answer, truth) in (True, False)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(LATEX_PIECES), max_size=10).map("".join))
def test_short_latex_normalises_as_mathruler(answer):
  # Ten pieces stay inside the bounds, and pylatexenc returns promptly on them.
  assert normalize_answer(answer) == mathruler_grader._normalize(answer)
