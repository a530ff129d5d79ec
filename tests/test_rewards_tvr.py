"""metaphorstar_jax.rewards.tvr: STAR-R1 partial credit, penalties, parsing and TVR metrics."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaphorstar_jax.rewards import tvr

TRUTH = [(2, "color", "cyan"), (0, "size", "large")]


def wrap(answer: str) -> str:
  return f"<think>Compare the two images object by object.</think><answer>{answer}</answer>"


# (answer, matched credit, penalty, exact)
PARTIAL = [
  ("2.color.cyan; 0.size.large", 10.0, 0.0, 1),  # both right
  ("0.size.large; 2.color.cyan", 10.0, 0.0, 1),  # order does not matter
  ("2.color.cyan", 5.0, 0.0, 0),  # one missed
  ("2.color.red; 0.size.large", 6.5, 0.0, 0),  # index and attribute right: 1.5
  ("2.shape.cube; 0.size.large", 5.5, 0.0, 0),  # index right only: 0.5
  ("1.color.cyan; 3.size.large", 0.0, 0.0, 0),  # wrong objects
  ("2.color.cyan; 0.size.large; 1.shape.cube", 10.0, 1.0, 0),  # one extra change
  ("2.color.cyan; 2.color.cyan; 2.color.cyan", 5.0, 1.0, 0),  # repeats farm nothing
  ("", 0.0, 1.0, 0),  # nothing named: the inaction penalty
  ("no change", 0.0, 1.0, 0),
  (
    "2.color.red; 2.color.cyan",
    5.0,
    0.0,
    0,
  ),  # exact matches first; the red guess then has no partner
]


@pytest.mark.parametrize("answer, matched, penalty, exact", PARTIAL)
def test_partial_credit(answer, matched, penalty, exact):
  result = tvr.tvr_reward(wrap(answer), TRUTH)
  assert result["matched"] == matched
  assert result["penalty"] == penalty
  assert result["accuracy"] == exact
  assert result["format"] == 1.0
  assert result["overall"] == pytest.approx(1.0 + matched - penalty)


def test_penalties_and_weights_are_options():
  extra = wrap("2.color.cyan; 0.size.large; 1.shape.cube; 3.shape.cube")
  assert tvr.tvr_reward(extra, TRUTH, over_enumeration_penalty=0.25)["penalty"] == 0.5
  assert tvr.tvr_reward(wrap(""), TRUTH, empty_answer_penalty=3.0)["overall"] == -2.0
  assert tvr.tvr_reward(wrap("2.color.red"), TRUTH, index_attribute_match=2.0)["matched"] == 2.0
  assert tvr.tvr_reward(wrap("2.color.cyan"), TRUTH, format_weight=0.0)["overall"] == 5.0


def test_format():
  assert tvr.tvr_reward("2.color.cyan", TRUTH)["format"] == 0.0
  assert tvr.tvr_reward("2.color.cyan", TRUTH)["predicted"] == 0.0  # no <answer>: nothing read
  loose = "Sure. <think>x</think> then <answer>2.color.cyan</answer> done"
  assert tvr.tvr_reward(loose, TRUTH)["format"] == 0.0
  assert tvr.tvr_reward(loose, TRUTH, strict_format=False)["format"] == 1.0


@pytest.mark.parametrize(
  "text, triples",
  [
    ("2.color.cyan", [(2, "color", "cyan")]),
    ("(2, color, cyan), (0, 'size', 'large')", [(2, "color", "cyan"), (0, "size", "large")]),
    ("2: Colour = Cyan", [(2, "color", "cyan")]),
    ("change_color(2, cyan) change_size(0, 'large')", [(2, "color", "cyan"), (0, "size", "large")]),
    ("object 3 material metal", [(3, "material", "metal")]),
    ("1.5.color.red", []),  # a decimal is not an index
    ("2.colour.cyan\n3.shape.sphere", [(2, "color", "cyan"), (3, "shape", "sphere")]),
    ("nothing changed", []),
  ],
)
def test_parsing(text, triples):
  assert tvr.parse_transformations(text) == triples


def test_ground_truth_forms():
  assert tvr.as_triples([{"object": 2, "attribute": "Color", "value": "Cyan"}]) == [
    (2, "color", "cyan")
  ]
  assert tvr.as_triples([[1, "size", "small"]]) == [(1, "size", "small")]
  assert tvr.as_triples("2.color.cyan") == [(2, "color", "cyan")]
  assert tvr.as_triples([{"attribute": "size"}]) == []


OBJECTS = [
  {"color": "red", "shape": "cube", "size": "small", "material": "rubber"},
  {"color": "blue", "shape": "sphere", "size": "large", "material": "metal"},
  {"color": "gray", "shape": "cylinder", "size": "medium", "material": "glass"},
]


def test_state_metrics():
  truth = [(2, "color", "cyan"), (0, "size", "large")]
  right = tvr.score_transformations(truth[::-1], truth, OBJECTS)
  assert (
    right.correct and right.loose_correct and right.distance == 0 and right.step_difference == 0
  )
  one_wrong = tvr.score_transformations([(2, "color", "red"), (0, "size", "large")], truth, OBJECTS)
  assert (
    one_wrong.distance == 1 and one_wrong.normalized_distance == 0.5 and not one_wrong.loose_correct
  )
  # A no-op change (the object already had that value) leaves the final state right: loose only.
  detour = tvr.score_transformations([*truth, (1, "color", "blue")], truth, OBJECTS)
  assert detour.loose_correct and detour.correct and detour.step_difference == 1
  # An impossible step (no object 7) makes the answer loose-correct at best.
  invalid = tvr.score_transformations([*truth, (7, "color", "red")], truth, OBJECTS)
  assert invalid.loose_correct and not invalid.correct
  unknown_value = tvr.score_transformations(
    [*truth, (1, "color", "pink")], truth, OBJECTS, values=tvr.VALUES
  )
  assert not unknown_value.correct
  # Later steps override earlier ones, as in TVR.
  assert (
    tvr.score_transformations(
      [(2, "color", "red"), (2, "color", "cyan"), (0, "size", "large")], truth, OBJECTS
    ).distance
    == 0
  )
  # One-based numbering.
  assert tvr.score_transformations(
    [(3, "color", "cyan")], [(3, "color", "cyan")], OBJECTS, index_base=1
  ).correct


def test_state_metrics_without_objects():
  assert tvr.score_transformations([(2, "color", "cyan")], [(2, "color", "cyan")]).correct
  miss = tvr.score_transformations([(1, "color", "cyan")], [(2, "color", "cyan")])
  assert miss.distance == 2  # object 1 changed wrongly, object 2 not changed


TEXT = st.one_of(
  st.text(max_size=300),
  st.lists(
    st.sampled_from(
      [
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "2",
        ".",
        "color",
        "cyan",
        ";",
        " ",
        "(",
        ")",
        ",",
        "change_size",
        "99999999999",
        "\n",
      ]
    ),
    max_size=60,
  ).map("".join),
  st.builds(
    lambda piece, count: piece * count,
    st.sampled_from(["1.color.red;", "1 ", "<answer>", "9"]),
    st.integers(0, 3000),
  ),
)


@settings(max_examples=200, deadline=None)
@given(TEXT)
def test_never_raises(text):
  result = tvr.tvr_reward(text, TRUTH)
  assert set(result) == {"overall", "format", "matched", "penalty", "accuracy", "predicted"}
  answer = tvr.answer_text(text)
  tvr.score_transformations(
    tvr.parse_transformations(answer or ""), TRUTH, OBJECTS, values=tvr.VALUES
  )
