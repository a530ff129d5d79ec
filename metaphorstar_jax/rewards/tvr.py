"""STAR-R1 scorers for transformation-driven visual reasoning (TVR), spec §3.

STAR-R1's code is unreleased (its repository holds a README only), so the reward follows the
paper's description and every unknown is an argument with a documented default:

  overall = format_weight * format + matched - penalties

* format: 1 if the completion is `<think>...</think>...<answer>...</answer>` (strict: nothing
  before or after, as MetaphorStar's check; `strict_format=False` only needs the two blocks in
  order).
* matched: each predicted (object index, attribute, value) triple earns at most one ground-truth
  transformation, best tier first: 5.0 for index, attribute and value; 1.5 for index and
  attribute; 0.5 for index only. Tiers are assigned greedily over the whole answer, exact matches
  first, each ground-truth triple used once. [GAP: the paper's matching order is not given.]
* penalties [GAP: magnitudes unknown]: `over_enumeration_penalty` per predicted triple beyond the
  number of real transformations, and `empty_answer_penalty` when the answer names no
  transformation (missing, empty, or "no change") although some happened.

Triples are read from the first `<answer>...</answer>` block (DOTALL) in any of the notations
`2.color.cyan` (the CVPR paper's), `(2, color, cyan)`, `2: color = cyan`, `change_color(2, cyan)`
(Reason-RFT's TRANCE format); case is ignored.

The TVR metrics follow hughplay/TVR src/evaluation: apply the predicted transformations to the
initial objects and compare with the target final state. `distance` counts differing (object,
attribute) values, `loose_correct` is distance 0, `correct` also needs every step to be valid
(here: an existing object, a known attribute and, when a vocabulary is given, a known value;
TRANCE's geometric overlap and out-of-view checks need 3-D positions we do not have).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from metaphorstar_jax.rewards.tags import all_tag_contents, as_text, is_think_answer_format

ATTRIBUTES = ("color", "shape", "size", "material")
# The TRANCE/CLEVR vocabulary (Reason-RFT's TRANCE prompt lists the same values).
VALUES = {
  "color": ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow"),
  "shape": ("cube", "sphere", "cylinder"),
  "size": ("small", "medium", "large"),
  "material": ("rubber", "metal", "glass"),
}

_ATTRIBUTE_ALTERNATIVES = "color|colour|shape|size|material|position"
_SEPARATOR = r"(?:\s*[.,:=]\s*|\s+)"
_TRIPLE = re.compile(
  rf"change_(?P<fattr>{_ATTRIBUTE_ALTERNATIVES})\s*\(\s*['\"]?(?P<fidx>\d+)['\"]?\s*,\s*['\"]?"
  rf"(?P<fval>[a-z_]+)['\"]?\s*\)"
  rf"|(?<![\w.])['\"]?(?P<idx>\d+)['\"]?{_SEPARATOR}['\"]?(?P<attr>{_ATTRIBUTE_ALTERNATIVES})['\"]?"
  rf"{_SEPARATOR}['\"]?(?P<val>[a-z_]+)",
  re.IGNORECASE,
)

Triple = tuple[int, str, str]


def _canonical_attribute(name: str) -> str:
  name = name.lower()
  return "color" if name == "colour" else name


def parse_transformations(text: Any) -> list[Triple]:
  """All (object index, attribute, value) triples in `text`, in order, lower-cased."""
  triples = []
  for match in _TRIPLE.finditer(as_text(text)):
    if match.group("fattr"):
      index, attribute, value = match.group("fidx"), match.group("fattr"), match.group("fval")
    else:
      index, attribute, value = match.group("idx"), match.group("attr"), match.group("val")
    if len(index) > 9:  # an index this long is garbage, not an object
      continue
    triples.append((int(index), _canonical_attribute(attribute), value.lower()))
  return triples


def as_triples(transformations: Any) -> list[Triple]:
  """Ground truth as triples: accepts [(index, attribute, value)], [{"object"|"index"|"obj",
  "attribute"|"attr", "value"}] or a string in any answer notation."""
  if isinstance(transformations, str):
    return parse_transformations(transformations)
  triples = []
  for item in transformations or ():
    if isinstance(item, Mapping):
      index = item.get("object", item.get("index", item.get("obj")))
      attribute, value = item.get("attribute", item.get("attr")), item.get("value")
    elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 3:
      index, attribute, value = item
    else:
      continue
    try:
      triples.append((int(index), _canonical_attribute(str(attribute)), str(value).lower()))
    except (TypeError, ValueError):
      continue
  return triples


def answer_text(completion: Any) -> str | None:
  """Content of the first `<answer>...</answer>` block (DOTALL), or None."""
  contents = all_tag_contents(as_text(completion), "answer")
  return contents[0] if contents else None


def match_tiers(predicted: Sequence[Triple], target: Sequence[Triple]) -> tuple[int, int, int]:
  """(#full, #index+attribute, #index-only) matches, greedy by tier, each target used once."""
  unused_predicted = list(range(len(predicted)))
  unused_target = list(range(len(target)))
  counts = []
  for key in (lambda t: t, lambda t: t[:2], lambda t: t[0]):
    matched = 0
    for p in list(unused_predicted):
      for t in unused_target:
        if key(predicted[p]) == key(target[t]):
          unused_predicted.remove(p)
          unused_target.remove(t)
          matched += 1
          break
    counts.append(matched)
  return counts[0], counts[1], counts[2]


def tvr_reward(
  completion: Any,
  transformations: Any,
  format_weight: float = 1.0,
  full_match: float = 5.0,
  index_attribute_match: float = 1.5,
  index_match: float = 0.5,
  over_enumeration_penalty: float = 1.0,
  empty_answer_penalty: float = 1.0,
  strict_format: bool = True,
) -> dict[str, float]:
  """The STAR-R1 reward of one completion (module doc).

  Args:
    completion: the decoded response text.
    transformations: the ground-truth changes (see `as_triples`).
    format_weight, full_match, index_attribute_match, index_match: the reward's weights.
    over_enumeration_penalty: subtracted per predicted triple beyond the true count.
    empty_answer_penalty: subtracted when nothing is predicted but something changed.
    strict_format: whole-completion format match (else the two blocks in order suffice).

  Returns:
    {"overall", "format", "matched", "penalty", "accuracy", "predicted"}; accuracy is 1 when the
    predicted triples equal the true ones as a multiset.
  """
  text = as_text(completion)
  target = as_triples(transformations)
  answer = answer_text(text)
  predicted = parse_transformations(answer) if answer is not None else []
  if strict_format:
    format_value = float(is_think_answer_format(text))
  else:
    think_end = text.find("</think>", text.find("<think>") + 1) if "<think>" in text else -1
    format_value = float(
      think_end != -1 and answer is not None and text.find("<answer>", think_end) != -1
    )
  full, index_attribute, index_only = match_tiers(predicted, target)
  matched = full * full_match + index_attribute * index_attribute_match + index_only * index_match
  penalty = over_enumeration_penalty * max(0, len(predicted) - len(target))
  if not predicted and target:
    penalty += empty_answer_penalty
  exact = collections.Counter(predicted) == collections.Counter(target)
  return {
    "overall": format_weight * format_value + matched - penalty,
    "format": format_value,
    "matched": matched,
    "penalty": penalty,
    "accuracy": float(exact),
    "predicted": float(len(predicted)),
  }


# ---------------------------------------------------------------------------------------------
# TVR metrics.


@dataclasses.dataclass(frozen=True)
class TransformationScore:
  """TVR's per-sample result (hughplay/TVR eval_tensor_results)."""

  distance: float  # attribute values that differ from the target final state
  normalized_distance: float  # distance / number of true transformations
  loose_correct: bool  # distance == 0
  correct: bool  # loose_correct and every predicted step valid
  step_difference: int  # predicted steps - true steps


def _apply(
  objects: list[dict[str, str]],
  steps: Sequence[Triple],
  index_base: int,
  values: Mapping[str, Sequence[str]] | None,
) -> bool:
  """Applies `steps` in place; returns whether every step was valid."""
  valid = True
  for index, attribute, value in steps:
    position = index - index_base
    known_value = values is None or value in values.get(attribute, ())
    if 0 <= position < len(objects) and attribute in objects[position] and known_value:
      objects[position][attribute] = value
    else:
      valid = False
  return valid


def score_transformations(
  predicted: Sequence[Triple],
  target: Sequence[Triple],
  objects: Sequence[Mapping[str, Any]] | None = None,
  index_base: int = 0,
  values: Mapping[str, Sequence[str]] | None = None,
) -> TransformationScore:
  """Compares predicted and true transformations by the final states they produce.

  Args:
    predicted, target: triples (object index, attribute, value).
    objects: the initial objects, each {attribute: value}; index i + index_base names objects[i].
      Without them, objects named by either list start with unknown attribute values, so only
      the listed changes are compared.
    index_base: 0 or 1, how the task numbers objects.
    values: allowed values per attribute; None accepts any value.

  Returns:
    a TransformationScore.
  """
  if objects is None:
    count = max([t[0] - index_base + 1 for t in [*predicted, *target]] + [0])
    attributes = {t[1] for t in [*predicted, *target]}
    objects = [{a: "?" for a in attributes} for _ in range(count)]
  initial = [{str(k): str(v).lower() for k, v in o.items()} for o in objects]
  predicted_state = [dict(o) for o in initial]
  target_state = [dict(o) for o in initial]
  valid = _apply(predicted_state, predicted, index_base, values)
  _apply(target_state, target, index_base, None)
  distance = sum(
    predicted_object.get(k) != v
    for predicted_object, target_object in zip(predicted_state, target_state)
    for k, v in target_object.items()
  )
  return TransformationScore(
    distance=float(distance),
    normalized_distance=distance / len(target) if target else float(distance),
    loose_correct=distance == 0,
    correct=distance == 0 and valid,
    step_difference=len(predicted) - len(target),
  )
