"""MetaphorStar scorers: the TFQ-GRPO training reward and the TFQ-Bench / MCQ answer extraction.

Training reward (MetaphorStar train/examples/reward_function/TFQ-GRPO_reward.py, spec §1.6):
  format   = 1 if the whole completion is `<think>...</think>...<answer>...</answer>` (DOTALL),
  accuracy = 1 if the first single-line `<answer>...</answer>` content (stripped; the whole
             stripped completion when there is none) grades equal to the ground truth under
             mathruler's grade_answer (so `t`, `{T}`, `(T)` count as `T`; `T.` or `True` do not),
  overall  = (1 - w) * accuracy + w * format, w = format_weight (0.5 in the release).

Evaluation (MetaphorStar evaluation/eval_TFQ.py and eval_MCQ.py, spec §1.8): the answer is the
stripped content of the last `<answer>...</answer>` (DOTALL); else, for TFQ, the letter after the
first `Answer:`, else the last standalone `T` or `F`; for MCQ, the letter after the first
`Answer:`. It is correct when it equals the ground truth ignoring case. An empty extraction counts
as an empty answer (and wrong).
"""

from __future__ import annotations

import re
from typing import Any

from metaphorstar_jax.rewards.math_grader import grade_answer
from metaphorstar_jax.rewards.tags import (
  as_text,
  first_tag_content_one_line,
  is_think_answer_format,
  last_tag_content,
)

_TFQ_ANSWER_LINE = re.compile(r"Answer:\s*([TF])")
_TFQ_STANDALONE = re.compile(r"\b(T|F)\b")
_MCQ_ANSWER_LINE = re.compile(r"Answer:\s*([A-Za-z])")


def format_score(completion: Any) -> float:
  """1.0 if the whole completion is `<think>...</think>...<answer>...</answer>`, else 0.0."""
  return 1.0 if is_think_answer_format(as_text(completion)) else 0.0


def training_answer(completion: Any) -> str:
  """The answer the training reward grades: first single-line <answer> content, stripped."""
  text = as_text(completion)
  content = first_tag_content_one_line(text, "answer")
  return content.strip() if content is not None else text.strip()


def accuracy_score(completion: Any, ground_truth: Any) -> float:
  """1.0 if the training answer grades equal to `ground_truth` (e.g. "T"), else 0.0."""
  if not isinstance(ground_truth, str):
    return 0.0
  return 1.0 if grade_answer(training_answer(completion), ground_truth.strip()) else 0.0


def tfq_reward(completion: Any, ground_truth: Any, format_weight: float = 0.5) -> dict[str, float]:
  """The TFQ-GRPO reward of one completion.

  Args:
    completion: the decoded response text (anything else is coerced to text).
    ground_truth: "T" or "F" (any string is graded the same way).
    format_weight: w in overall = (1 - w) * accuracy + w * format.

  Returns:
    {"overall", "format", "accuracy"}, floats; overall is in {0, w, 1 - w, 1}.
  """
  format_value = format_score(completion)
  accuracy_value = accuracy_score(completion, ground_truth)
  return {
    "overall": (1.0 - format_weight) * accuracy_value + format_weight * format_value,
    "format": format_value,
    "accuracy": accuracy_value,
  }


def extract_tfq_answer(completion: Any) -> str | None:
  """The TFQ-Bench answer: last <answer> content, else `Answer: T|F`, else last lone T/F."""
  text = as_text(completion)
  content = last_tag_content(text, "answer")
  if content is not None:
    return content.strip()
  match = _TFQ_ANSWER_LINE.search(text)
  if match:
    return match.group(1)
  letters = _TFQ_STANDALONE.findall(text)
  return letters[-1] if letters else None


def extract_mcq_answer(completion: Any) -> str | None:
  """The MCQ answer: last <answer> content, else the letter after the first `Answer:`."""
  text = as_text(completion)
  content = last_tag_content(text, "answer")
  if content is not None:
    return content.strip()
  match = _MCQ_ANSWER_LINE.search(text)
  return match.group(1) if match else None


def is_empty_answer(extracted: str | None) -> bool:
  """Whether an extraction counts as an empty answer (None or "")."""
  return not extracted


def answer_matches(extracted: str | None, ground_truth: Any) -> bool:
  """Evaluation correctness: a non-empty extraction equal to the ground truth ignoring case."""
  if is_empty_answer(extracted) or not isinstance(ground_truth, str):
    return False
  return extracted.lower() == ground_truth.lower()
