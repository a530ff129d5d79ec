"""metaphorstar_jax.rewards.cinema: the meta-action format and answer correctness."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaphorstar_jax.rewards import cinema

FULL = (
  "<global>Three frames of one street.</global>\n<focus>Image 2 shows the red car.</focus>"
  "<hint>Count cars, not bikes.</hint><think>Only image 2 has a car.</think><answer>B</answer>"
)


@pytest.mark.parametrize(
  "completion, valid",
  [
    (FULL, True),
    ("<think>short</think><answer>B</answer>", True),  # any subset of meta-actions
    (
      "<hint>h</hint><think>t</think><hint>again</hint><answer>B</answer>",
      True,
    ),  # any order, repeats
    ("  <focus>f</focus>\n\n<answer>B</answer>\n", True),  # whitespace around blocks is fine
    ("<answer>B</answer>", False),  # at least one meta-action before the answer
    ("<think>t</think>", False),  # no answer
    ("<answer>B</answer><think>t</think>", False),  # answer not last
    ("<think>t</think><answer>B</answer><answer>C</answer>", False),  # two answers
    ("So: <think>t</think><answer>B</answer>", False),  # text outside blocks
    ("<think>t</think> and <answer>B</answer>", False),
    ("<think><focus>f</focus></think><answer>B</answer>", False),  # nested
    ("<think>t<answer>B</answer>", False),  # unclosed
    ("<think> </think><answer>B</answer>", False),  # empty block
    ("<Think>t</Think><answer>B</answer>", False),  # tags are lower case
    ("<plan>p</plan><answer>B</answer>", False),  # not a meta-action
    ("", False),
  ],
)
def test_format(completion, valid):
  assert cinema.meta_action_format(completion) == float(valid)


def test_format_requirements():
  short = "<think>t</think><answer>B</answer>"
  assert cinema.meta_action_format(short, required_actions=("global",)) == 0.0
  assert (
    cinema.meta_action_format(FULL, required_actions=("global", "focus", "hint", "think")) == 1.0
  )
  assert cinema.meta_action_format(short, min_meta_actions=2) == 0.0
  assert cinema.meta_action_format("<answer>B</answer>", min_meta_actions=0) == 1.0


@pytest.mark.parametrize(
  "answer, truth, answer_type, correct",
  [
    ("B", "B", "mcq", True),
    ("(b)", "B", "mcq", True),
    ("B. The red car", "B", "mcq", True),
    ("The answer is C", "C", "mcq", True),
    ("C", "B", "mcq", False),
    ("none", "B", "mcq", False),
    ("3", 3, "numeric", True),
    ("3.0 cars", "3", "numeric", True),
    ("about 1,200", 1200, "numeric", True),
    ("-2.5", -2.5, "numeric", True),
    ("4", 3, "numeric", False),
    ("three", 3, "numeric", False),
    ("The Red Car.", "red car", "short", True),
    ("a red car", ["red car", "crimson car"], "short", True),
    ("blue car", "red car", "short", False),
    ("", "red car", "short", False),
    ("B", "B", "unknown", False),
  ],
)
def test_answer_correct(answer, truth, answer_type, correct):
  assert cinema.answer_correct(answer, truth, answer_type) is correct


def test_reward():
  assert cinema.cinema_reward(FULL, "B", "mcq") == {"overall": 1.5, "format": 1.0, "accuracy": 1.0}
  assert cinema.cinema_reward("<answer>B</answer>", "B", "mcq") == {
    "overall": 1.0,
    "format": 0.0,
    "accuracy": 1.0,
  }
  assert cinema.cinema_reward(FULL, "C", "mcq", format_weight=1.0)["overall"] == 1.0
  assert (
    cinema.cinema_reward("no tags: B", "B", "mcq")["accuracy"] == 0.0
  )  # the answer must be tagged
  last = "<think>t</think><answer>A</answer> later <answer>B</answer>"
  assert cinema.cinema_reward(last, "B", "mcq")["accuracy"] == 1.0  # the last answer counts


TEXT = st.one_of(
  st.text(max_size=300),
  st.lists(
    st.sampled_from(
      [
        "<global>",
        "</global>",
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "<",
        ">",
        " ",
        "B",
        "3",
        "\n",
        "<hint>",
        "</hint>",
      ]
    ),
    max_size=60,
  ).map("".join),
  st.builds(
    lambda piece, count: piece * count,
    st.sampled_from(["<think>", "<answer>1", "<", "9"]),
    st.integers(0, 5000),
  ),
)


@settings(max_examples=200, deadline=None)
@given(
  TEXT,
  st.sampled_from(["mcq", "numeric", "short", "x"]),
  st.sampled_from(["B", 3, "red", None, ["a"]]),
)
def test_never_raises(text, answer_type, truth):
  result = cinema.cinema_reward(text, truth, answer_type)
  assert set(result) == {"overall", "format", "accuracy"}
