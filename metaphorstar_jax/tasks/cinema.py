"""CINEMA-style multi-image reasoning with five meta-actions (spec §4).

CINEMA releases neither code nor data, so the layout is ours [GAP]: JSONL (or parquet) rows

  {"id", "images": [one or more: paths relative to the file's folder, image structs or base64],
   "question", "answer", "answer_type": "mcq" | "numeric" | "short", "options": [...] (mcq)}

with `answer` an option letter, a number, or a text (or list of acceptable texts). Video frames
are images here. The prompt labels the images "Image k:" and asks for the meta-actions Global,
Focus, Hint and Think in any order, ending with Answer (rewards/cinema.py holds the format rule).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from metaphorstar_jax.rewards import cinema as cinema_rewards
from metaphorstar_jax.tasks import drawing, io, shape_scenes
from metaphorstar_jax.tasks.records import (
  Conversation,
  Record,
  RecordError,
  Task,
  guard_score,
  make_options,
)

OPTION_LETTERS = "ABCDEFGHIJ"
META_ACTION_INSTRUCTION = (
  "Work in steps, each inside its own tag: <global> how the images relate to each other </global>, "
  "<focus> the details of the images that matter </focus>, <hint> the key points and pitfalls of "
  "the question </hint>, <think> your reasoning </think>. Use them in any order and as often as "
  "useful, then end with the final answer inside <answer> </answer>."
)
ANSWER_INSTRUCTIONS = {
  "mcq": "The answer is only the letter of the correct option.",
  "numeric": "The answer is only a number.",
  "short": "The answer is a word or a short phrase.",
}


@dataclasses.dataclass(frozen=True)
class CinemaOptions:
  """Options of the `cinema` task (unknown weights and rules [GAP], see rewards/cinema.py).

  Attributes:
    format_weight, accuracy_weight: overall = accuracy_weight * accuracy + format_weight * format.
    required_actions: meta-actions every answer must use (none by default: order is flexible).
    min_meta_actions: meta-action blocks required before the answer.
    numeric_rel_tol: relative tolerance of numeric answers.
    label_images: put "Image k:" before each image.
    check_images: decode images when reading.
    miniature_image_size: side of the miniature's images.
  """

  format_weight: float = 0.5
  accuracy_weight: float = 1.0
  required_actions: tuple[str, ...] = ()
  min_meta_actions: int = 1
  numeric_rel_tol: float = 1e-6
  label_images: bool = True
  check_images: bool = True
  miniature_image_size: int = 160

  def __post_init__(self):
    unknown = sorted(set(self.required_actions) - set(cinema_rewards.META_ACTIONS))
    if unknown:
      raise ValueError(
        f"required_actions {unknown} are not meta-actions {cinema_rewards.META_ACTIONS}."
      )


def _parse(row: io.Row, record_id: str, options: CinemaOptions) -> Record:
  fields = row.fields
  images = io.require(fields, "images", (list, tuple))
  folder = os.path.dirname(os.path.abspath(row.source))
  loaded = []
  for index, image in enumerate(images):
    try:
      loaded.append(
        io.load_image_bytes(image, [folder, os.path.dirname(folder)], check=options.check_images)
      )
    except RecordError as error:
      raise RecordError(error.reason, f"image {index}: {error.detail}") from error
  question = io.require(fields, "question", str)
  answer_type = str(fields.get("answer_type") or "")
  if answer_type not in cinema_rewards.ANSWER_TYPES:
    raise RecordError(
      "bad field 'answer_type'", f"{answer_type!r} not in {cinema_rewards.ANSWER_TYPES}"
    )
  answer = fields.get("answer")
  if answer is None or answer == "" or answer == []:
    raise RecordError("missing field 'answer'")
  metadata = {"answer_type": answer_type}
  target = fields.get("target")
  if isinstance(target, str) and target.strip():  # a cold-start trajectory (SFT data)
    metadata["target"] = target
  if answer_type == "mcq":
    choices = fields.get("options") or ()
    letters = OPTION_LETTERS[: len(choices)] if choices else OPTION_LETTERS
    if str(answer).strip().upper() not in letters:
      raise RecordError("bad answer", f"{answer!r} is not an option letter")
    metadata["options"] = tuple(str(c) for c in choices)
  if answer_type == "numeric":
    try:
      answer = float(answer)
    except (TypeError, ValueError) as error:
      raise RecordError("bad answer", f"{answer!r} is not a number") from error
  return Record(record_id, tuple(loaded), question, answer, metadata)


def conversation(record: Record, options: CinemaOptions) -> Conversation:
  content = []
  for index, image in enumerate(record.images, start=1):
    if options.label_images:
      content.append({"type": "text", "text": f"Image {index}: "})
    content.append({"type": "image", "image": io.to_pil(image)})
    content.append({"type": "text", "text": "\n"})
  text = record.prompt
  choices = record.metadata.get("options") or ()
  if choices:
    text += "\nOptions:\n" + "\n".join(f"{OPTION_LETTERS[i]}. {c}" for i, c in enumerate(choices))
  text += f"\n{META_ACTION_INSTRUCTION}\n{ANSWER_INSTRUCTIONS[record.metadata['answer_type']]}"
  content.append({"type": "text", "text": text})
  return [{"role": "user", "content": content}]


def score_record(completion: Any, record: Record, options: CinemaOptions) -> dict[str, float]:
  return cinema_rewards.cinema_reward(
    completion,
    record.answer,
    record.metadata.get("answer_type", ""),
    options.format_weight,
    options.accuracy_weight,
    options.required_actions,
    options.min_meta_actions,
    options.numeric_rel_tol,
  )


def cinema_metrics(
  completions: Sequence[Any], records: Sequence[Record], options: CinemaOptions
) -> dict[str, float]:
  """{"accuracy", "accuracy_<answer type>", "format_rate", "reward"} means over the records."""
  if len(completions) != len(records):
    raise ValueError(
      f"Got {len(completions)} completions for {len(records)} records; pass one per record."
    )
  sums, counts = collections.defaultdict(float), collections.Counter()
  for completion, record in zip(completions, records):
    scores = score_record(completion, record, options)
    answer_type = record.metadata.get("answer_type", "")
    for name, value in (
      ("accuracy", scores["accuracy"]),
      (f"accuracy_{answer_type}", scores["accuracy"]),
      ("format_rate", scores["format"]),
      ("reward", scores["overall"]),
    ):
      sums[name] += value
      counts[name] += 1
  return {name: sums[name] / counts[name] for name in sorted(sums)}


def write_cinema_miniature(
  out_dir: str, n: int, seed: int, options: CinemaOptions = CinemaOptions()
) -> str:
  """Writes `n` synthetic multi-image questions (JSONL + images/), answer types cycling."""
  rng = drawing.SeededRandom(seed)
  colours, kinds = tuple(drawing.COLOURS)[:6], drawing.SHAPES
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  rows = []
  for index in range(n):
    scenes = [
      shape_scenes.generate_scene(rng, rng.integer(1, 3), 2, colours, kinds)
      for _ in range(rng.integer(2, 4))
    ]
    names = []
    for k, scene in enumerate(scenes):
      name = f"images/cinema-{seed}-{index}-{k}.png"
      shape_scenes.render_scene(scene, options.miniature_image_size).save(
        os.path.join(out_dir, name)
      )
      names.append(name)
    answer_type = cinema_rewards.ANSWER_TYPES[index % 3]
    # Unambiguous questions only: a shape found in exactly one image, a kind once in an image.
    in_one_image = [
      (k, shape)
      for k, scene in enumerate(scenes)
      for shape in scene.shapes
      if sum(any(t.name == shape.name for t in other.shapes) for other in scenes) == 1
    ]
    single_kind = [
      (k, shape)
      for k, scene in enumerate(scenes)
      for shape in scene.shapes
      if sum(t.kind == shape.kind for t in scene.shapes) == 1
    ]
    if (answer_type == "mcq" and not in_one_image) or (answer_type == "short" and not single_kind):
      answer_type = "numeric"
    row = {"id": f"cinema-{seed}-{index}", "images": names, "answer_type": answer_type}
    if answer_type == "mcq":
      target, shape = rng.choice(in_one_image)
      row["question"] = f"Which image contains a {shape.name}?"
      row["options"] = [f"Image {k + 1}" for k in range(len(scenes))]
      row["answer"] = OPTION_LETTERS[target]
    elif answer_type == "numeric":
      kind = rng.choice(kinds)
      row["question"] = f"How many of the images contain a {kind}?"
      row["answer"] = sum(any(s.kind == kind for s in scene.shapes) for scene in scenes)
    else:
      target, shape = rng.choice(single_kind)
      row["question"] = f"What colour is the {shape.kind} in image {target + 1}?"
      row["answer"] = shape.colour
    rows.append(row)
  return io.write_jsonl(os.path.join(out_dir, "cinema.jsonl"), rows)


def make_cinema_task(**overrides: Any) -> Task:
  options = make_options(CinemaOptions, "cinema", overrides)
  return Task(
    name="cinema",
    options=options,
    read=lambda path, stats=None: io.read_records(
      path, stats, lambda row, record_id: _parse(row, record_id, options)
    ),
    build_conversation=lambda record: conversation(record, options),
    score=guard_score(
      "cinema", lambda completion, record: score_record(completion, record, options)
    ),
    evaluate=lambda completions, records: cinema_metrics(completions, records, options),
    write_miniature=lambda out_dir, n, seed: write_cinema_miniature(out_dir, n, seed, options),
  )


TASK_FACTORIES = {"cinema": make_cinema_task}
