"""CINEMA scorers: the five meta-action format and answer correctness, spec §4.

CINEMA has no public code; its paper names five meta-actions, Global (relations across all
images), Focus (details of key images), Hint (key points and pitfalls), Think (inference) and
Answer, emitted in a flexible order with Answer last. Unknowns are arguments [GAP]:

* tags: `<global>`, `<focus>`, `<hint>`, `<think>`, `<answer>` (lower case).
* format = 1 when the whole completion, surrounding whitespace aside, is a sequence of such
  blocks with nothing between them, no block nested in another, every block non-empty, Answer
  exactly once and last, at least `min_meta_actions` other blocks, and every action in
  `required_actions` present. Other actions may repeat, in any order.
* accuracy, on the last `<answer>` block (DOTALL): "mcq" compares the option letter, "numeric"
  the first number within a tolerance, "short" the text after lower-casing and dropping
  punctuation, articles and extra spaces (a list of acceptable answers is allowed).
* overall = accuracy_weight * accuracy + format_weight * format.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from typing import Any

from metaphorstar_jax.rewards.tags import as_text, last_tag_content

META_ACTIONS = ("global", "focus", "hint", "think", "answer")
ANSWER_ACTION = "answer"
ANSWER_TYPES = ("mcq", "numeric", "short")

_LEADING_LETTER = re.compile(r"^\s*(?:\(\s*([A-Za-z])\s*\)|([A-Za-z]))(?=$|[\s.:)\]])")
_LONE_CAPITAL = re.compile(r"\b([A-Z])\b")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCTUATION_TABLE = str.maketrans({c: " " for c in string.punctuation})


def meta_action_blocks(
  text: str, actions: Sequence[str] = META_ACTIONS
) -> list[tuple[str, str]] | None:
  """The completion as [(action, content), ...], or None if it is not only such blocks."""
  blocks, position, length = [], 0, len(text)
  openings = tuple(f"<{a}>" for a in actions)
  while True:
    while position < length and text[position].isspace():
      position += 1
    if position == length:
      return blocks
    if text[position] != "<":
      return None
    tag_end = text.find(">", position)
    action = text[position + 1 : tag_end] if tag_end != -1 else None
    if action not in actions:
      return None
    closing = f"</{action}>"
    close_at = text.find(closing, tag_end + 1)
    if close_at == -1:
      return None
    content = text[tag_end + 1 : close_at]
    if any(opening in content for opening in openings):
      return None  # a nested or unclosed block
    blocks.append((action, content))
    position = close_at + len(closing)


def meta_action_format(
  completion: Any,
  actions: Sequence[str] = META_ACTIONS,
  required_actions: Sequence[str] = (),
  min_meta_actions: int = 1,
) -> float:
  """1.0 if the completion follows the meta-action format (module doc), else 0.0."""
  blocks = meta_action_blocks(as_text(completion), actions)
  if not blocks or blocks[-1][0] != ANSWER_ACTION:
    return 0.0
  names = [name for name, _ in blocks]
  if names.count(ANSWER_ACTION) != 1 or len(blocks) - 1 < min_meta_actions:
    return 0.0
  if any(not content.strip() for _, content in blocks):
    return 0.0
  return 1.0 if all(action in names for action in required_actions) else 0.0


def extract_answer(completion: Any) -> str | None:
  """The stripped content of the last `<answer>` block, or None."""
  content = last_tag_content(as_text(completion), ANSWER_ACTION)
  return content.strip() if content is not None else None


def option_letter(answer: str) -> str | None:
  """The option letter an answer names: "B", "(B)", "B. text", else the first lone capital."""
  match = _LEADING_LETTER.match(answer)
  if match:
    return (match.group(1) or match.group(2)).upper()
  match = _LONE_CAPITAL.search(answer)
  return match.group(1) if match else None


def first_number(answer: str) -> float | None:
  """The first number written in the answer (thousands commas ignored), or None."""
  match = _NUMBER.search(answer.replace(",", ""))
  if not match:
    return None
  try:
    value = float(match.group())
  except ValueError:
    return None
  return value if math.isfinite(value) else None


def normalize_short_answer(text: Any) -> str:
  """Lower-cased, punctuation and articles dropped, whitespace collapsed."""
  text = as_text(text).lower().translate(_PUNCTUATION_TABLE)
  return " ".join(_ARTICLES.sub(" ", text).split())


def answer_correct(
  answer: str | None,
  ground_truth: Any,
  answer_type: str,
  numeric_rel_tol: float = 1e-6,
  numeric_abs_tol: float = 1e-9,
) -> bool:
  """Whether an extracted answer matches the ground truth for its answer type."""
  if answer is None:
    return False
  if answer_type == "mcq":
    letter = option_letter(answer)
    return letter is not None and letter == as_text(ground_truth).strip().upper()
  if answer_type == "numeric":
    value = first_number(answer)
    try:
      truth = float(ground_truth)
    except (TypeError, ValueError):
      return False
    return value is not None and math.isclose(
      value, truth, rel_tol=numeric_rel_tol, abs_tol=numeric_abs_tol
    )
  if answer_type == "short":
    candidates = ground_truth if isinstance(ground_truth, (list, tuple)) else [ground_truth]
    given = normalize_short_answer(answer)
    return bool(given) and any(given == normalize_short_answer(c) for c in candidates)
  return False


def cinema_reward(
  completion: Any,
  ground_truth: Any,
  answer_type: str,
  format_weight: float = 0.5,
  accuracy_weight: float = 1.0,
  required_actions: Sequence[str] = (),
  min_meta_actions: int = 1,
  numeric_rel_tol: float = 1e-6,
) -> dict[str, float]:
  """The CINEMA-style reward of one completion.

  Args:
    completion: the decoded response text.
    ground_truth: option letter ("mcq"), number ("numeric"), or text / list of texts ("short").
    answer_type: one of ANSWER_TYPES.
    format_weight, accuracy_weight: overall = accuracy_weight * accuracy + format_weight * format.
    required_actions, min_meta_actions: format requirements (module doc).
    numeric_rel_tol: relative tolerance of numeric answers.

  Returns:
    {"overall", "format", "accuracy"}, floats.
  """
  format_value = meta_action_format(completion, META_ACTIONS, required_actions, min_meta_actions)
  accuracy = float(
    answer_correct(extract_answer(completion), ground_truth, as_text(answer_type), numeric_rel_tol)
  )
  return {
    "overall": accuracy_weight * accuracy + format_weight * format_value,
    "format": format_value,
    "accuracy": accuracy,
  }
