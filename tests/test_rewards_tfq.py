"""metaphorstar_jax.rewards.tfq: the TFQ-GRPO reward and TFQ-Bench / MCQ extraction.

The expected values are worked out by hand from the released rules (MetaphorStar
train/examples/reward_function/TFQ-GRPO_reward.py and evaluation/eval_TFQ.py, eval_MCQ.py;
specs/seed_methods.md §1.6, §1.8).
"""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaphorstar_jax.rewards import tfq

X = "<think>The image shows a clock melting over a branch.</think>"

# (completion, ground truth, format, accuracy)
REWARD_TABLE = [
  (f"{X} <answer>T</answer>", "T", 1, 1),
  (f"{X}<answer>F</answer>", "T", 1, 0),
  (f"Sure! {X}<answer>T</answer>", "T", 0, 1),  # leading text breaks the whole-response match
  (f"{X}<answer>T</answer>\n", "T", 0, 1),  # so does a trailing newline
  (f"{X}\n<answer>T</answer>", "T", 1, 1),
  ("<answer>T</answer>", "T", 0, 1),  # no <think>
  (X, "T", 0, 0),  # no answer: the whole text is graded
  ("T", "T", 0, 1),  # ... which can be right
  (" t ", "T", 0, 1),  # grade_answer ignores case
  (f"{X}<answer>t</answer>", "T", 1, 1),
  (f"{X}<answer>\nT\n</answer>", "T", 1, 0),  # the answer regex has no DOTALL: whole text graded
  (f"{X}<answer> T </answer>", "T", 1, 1),
  (f"{X}<answer>T.</answer>", "T", 1, 0),
  (f"{X}<answer>True</answer>", "T", 1, 0),
  (f"{X}<answer>(T)</answer>", "T", 1, 1),
  (f"{X}<answer>{{T}}</answer>", "T", 1, 1),
  (f"{X}<answer>\\text{{T}}</answer>", "T", 1, 1),
  (f"{X}<answer>$T$</answer>", "T", 1, 1),
  (f"{X}<answer>[T]</answer>", "T", 1, 1),
  (f"{X}<answer>**T**</answer>", "T", 1, 0),
  (f"{X}<answer>x = T</answer>", "T", 1, 1),  # the MATH normaliser drops a short "x ="
  (f"{X}<answer>T</answer><answer>F</answer>", "T", 1, 1),  # the first answer counts
  (f"{X}<answer>F</answer><answer>T</answer>", "T", 1, 0),
  (f"{X}<answer>\nF\n</answer> so <answer>T</answer>", "T", 1, 1),  # first one-line answer
  (f"{X}<answer>T</answer> extra", "T", 0, 1),
  ("<THINK>x</THINK><ANSWER>T</ANSWER>", "T", 0, 0),  # tags are case-sensitive
  (f"{X}<answer></answer>", "T", 1, 0),
  ("", "T", 0, 0),
  ("<think></think><answer>T</answer>", "T", 1, 1),  # empty thinking still matches
  ("<think>a</think>b<answer>T</answer>", "T", 1, 1),  # text between the blocks is allowed
  (f"{X}<answer>T, F</answer>", "T", 1, 0),
  (f"{X}<answer>Answer: T</answer>", "T", 1, 0),
  (f"{X}<answer>F</answer>", "F", 1, 1),
  (f"{X}<answer>f</answer>", "F", 1, 1),
  ("<think>\nmulti\nline\n</think>\n\n<answer>F</answer>", "F", 1, 1),
  (f"{X}<answer>T</answer></answer>", "T", 1, 1),
  ("<think>x<answer>T</answer></think>", "T", 0, 1),  # must end with </answer>
  (f"{X}<answer>T</answer>", " T\n", 1, 1),  # the ground truth is stripped
]


@pytest.mark.parametrize("completion, truth, expected_format, expected_accuracy", REWARD_TABLE)
def test_reward_table(completion, truth, expected_format, expected_accuracy):
  result = tfq.tfq_reward(completion, truth)
  assert result == {
    "overall": 0.5 * expected_accuracy + 0.5 * expected_format,
    "format": float(expected_format),
    "accuracy": float(expected_accuracy),
  }


def test_reward_table_is_large_enough():
  assert len(REWARD_TABLE) >= 30


def test_format_weight():
  assert tfq.tfq_reward(f"{X}<answer>T</answer>", "F", format_weight=0.3)[
    "overall"
  ] == pytest.approx(0.3)
  assert tfq.tfq_reward("T", "T", format_weight=0.3)["overall"] == pytest.approx(0.7)
  assert tfq.tfq_reward(f"{X}<answer>T</answer>", "T", format_weight=0.0)["overall"] == 1.0


def test_non_string_inputs():
  assert tfq.tfq_reward(b"<think>x</think><answer>T</answer>", "T")["overall"] == 1.0
  assert tfq.tfq_reward(None, "T")["overall"] == 0.0
  assert tfq.tfq_reward("<think>x</think><answer>T</answer>", None)["accuracy"] == 0.0


# (completion, extracted answer, correct against the ground truth)
BENCH_TABLE = [
  ("<answer>T</answer>", "T", "T", True),
  ("<think>...</think><answer> F </answer>", "F", "F", True),
  ("<answer>T</answer> on second thought <answer>F</answer>", "F", "T", False),  # the last tag
  ("<answer>\nT\n</answer>", "T", "T", True),  # DOTALL, stripped
  ("<answer>t</answer>", "t", "T", True),  # case-insensitive comparison
  ("<answer>True</answer>", "True", "T", False),
  ("<answer></answer>", "", "T", False),  # an empty tag is an empty answer ...
  ("<answer></answer> Answer: T", "", "T", False),  # ... and stops the fallbacks
  ("<answer> </answer>", "", "T", False),
  ("Answer: F", "F", "F", True),
  ("Answer:T", "T", "T", True),
  ("Answer:\n  T", "T", "T", True),
  ("answer: T", "T", "T", True),  # lower-case label: falls to the standalone letter
  ("Answer: True", "T", "T", True),  # the label regex takes the first letter
  ("Answer: t", None, "T", False),  # letters are upper-case only in the fallbacks
  ("The statement is T", "T", "T", True),
  ("I think it is F, not T", "T", "F", False),  # the last standalone letter
  ("TF", None, "T", False),  # no word boundary between T and F
  ("It's true", None, "T", False),
  ("T.", "T", "T", True),
  ("(F)", "F", "F", True),
  ("Final: T\nActually F", "F", "F", True),
  ("", None, "T", False),
  ("<answer>T", "T", "T", True),  # unclosed tag: standalone T after '>'
  ("<ANSWER>F</ANSWER>", "F", "F", True),
  ("Answer: F\n<answer>T</answer>", "T", "F", False),  # tags win over the label
  ("A: T", "T", "T", True),
  ("<answer>[T]</answer>", "[T]", "T", False),
  ("<answer>T\nF</answer>", "T\nF", "T", False),
  ("Answer: F Answer: T", "F", "F", True),  # the first label
  ("TRUE", None, "T", False),
  ("F", "F", "f", True),  # the ground truth is lower-cased too
  ("<think>T</think>", "T", "T", True),
]


@pytest.mark.parametrize("completion, extracted, truth, correct", BENCH_TABLE)
def test_bench_extraction_table(completion, extracted, truth, correct):
  assert tfq.extract_tfq_answer(completion) == extracted
  assert tfq.answer_matches(tfq.extract_tfq_answer(completion), truth) is correct


def test_bench_table_is_large_enough():
  assert len(BENCH_TABLE) >= 30


@pytest.mark.parametrize(
  "completion, extracted",
  [
    ("<answer>B</answer>", "B"),
    ("<answer>A</answer><answer> c </answer>", "c"),
    ("Answer: c", "c"),
    ("Answer:\nE", "E"),
    ("<answer>B. Hope wins</answer>", "B. Hope wins"),
    ("The answer is B", None),  # no standalone-letter fallback for MCQ
    ("Answer: (B)", None),
    ("", None),
  ],
)
def test_mcq_extraction(completion, extracted):
  assert tfq.extract_mcq_answer(completion) == extracted


def test_mcq_correctness():
  assert tfq.answer_matches(tfq.extract_mcq_answer("Answer: c"), "C")
  assert not tfq.answer_matches(tfq.extract_mcq_answer("<answer>B. Hope</answer>"), "B")
  assert not tfq.answer_matches(None, "B") and tfq.is_empty_answer("")


# Arbitrary text: huge, empty, binary-looking, and tag soup.
PIECES = [
  "<think>",
  "</think>",
  "<answer>",
  "</answer>",
  "T",
  "F",
  "t",
  "\n",
  " ",
  "Answer:",
  "{",
  "}",
  "\\",
]
COMPLETIONS = st.one_of(
  st.text(max_size=300),
  st.binary(max_size=300).map(lambda data: data.decode("latin-1")),
  st.lists(st.sampled_from(PIECES), max_size=60).map("".join),
  st.builds(lambda piece, count: piece * count, st.sampled_from(PIECES), st.integers(0, 5000)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(COMPLETIONS, st.sampled_from(["T", "F", "", "tt", "\\frac{1}{2}"]))
def test_reward_never_raises(completion, truth):
  result = tfq.tfq_reward(completion, truth)
  assert set(result) == {"overall", "format", "accuracy"}
  assert result["overall"] in (0.0, 0.5, 1.0)
  tfq.extract_tfq_answer(completion)
  tfq.extract_mcq_answer(completion)


def test_adversarial_inputs_are_fast():
  nasty = [
    "<think>" + "</think><answer>" * 50_000,
    "<answer>" * 200_000,
    "<think>" + "</think>" * 100_000 + "<answer>" * 100_000 + "x",
    "Answer:" + " " * 500_000,
    "\\" * 300_000,
  ]
  start = time.perf_counter()
  for text in nasty:
    tfq.tfq_reward(text, "T")
    tfq.extract_tfq_answer(text)
  assert time.perf_counter() - start < 5.0
