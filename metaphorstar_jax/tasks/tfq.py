"""MetaphorStar tasks: TFQ (true/false, the RL task), MCQ and OSQ on image implications (spec §1).

Data layouts read:
* Hugging Face parquet, as TFQ-Data / TFQ-Bench publish them: one row per question with
  `images` (list of {"bytes", "path"} image structs), `problem` (str) and `answer` ("T"/"F").
* JSONL plus an image folder: {"id", "images": [relative paths] or "image": path, "problem",
  "answer"} per line, paths relative to the JSONL file's folder (or its parent).
MCQ rows hold `question` (default "What is the implication in this image?"), `options` (list of
option texts, six in MetaphorStar's bench) and `answer` (a letter); OSQ rows `question` and the
reference `answer` text. Records whose `problem` marks `<image>` positions must mark one per
image; without marks the images go first.

Prompts: TFQ uses the released TFQ-GRPO template (train/examples/format_prompt/
TFQ-GRPO_format.jinja) verbatim, since the released checkpoints were trained on that exact text;
the rendered prompt is split on `<image>` into one user message, as EasyR1 does. The MCQ and OSQ
inference prompts are not released; ours ask for the same <think>/<answer> layout.

Metrics (evaluation/eval_TFQ.py, eval_MCQ.py): per-question accuracy, the headline per-image
all-or-nothing accuracy (an image counts only if all its questions are right), and empty answers.
OSQ needs an LLM judge (GPT-4o with a 1-5 rubric); metaphorstar_jax/judge.py grades with it.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

from metaphorstar_jax.rewards import tfq as tfq_rewards
from metaphorstar_jax.rewards.tags import as_text
from metaphorstar_jax.tasks import drawing, io, shape_scenes
from metaphorstar_jax.tasks.records import (
  Conversation,
  Record,
  RecordError,
  Task,
  guard_score,
  make_options,
)

IMAGE_MARKER = "<image>"
# Verbatim from the release: the model was trained on this exact prompt.
TFQ_GRPO_PROMPT = (
  "Please according to the image, and try to answer the following true-false questions with the "
  "option T (True) or F (False). First, describe the image, then analyze the image implication, "
  "and finally reason to get the answer. Output the thinking process in <think> </think> and the "
  "final correct answer in <answer> </answer> tags. The output format should be as follows: "
  "<think>...</think> <answer>...</answer>. True-false questions: "
)
MCQ_INSTRUCTION = (
  "Reason about what the image shows and what it implies inside <think> </think>, then give only "
  "the letter of the correct option inside <answer> </answer>."
)
OSQ_INSTRUCTION = (
  "Describe the image, analyse its implication and reason about its deeper meaning inside "
  "<think> </think>, then write your interpretation inside <answer> </answer>."
)
DEFAULT_QUESTION = "What is the implication in this image?"
OPTION_LETTERS = "ABCDEFGHIJ"


@dataclasses.dataclass(frozen=True)
class TfqOptions:
  """Options of the `tfq` task.

  Attributes:
    format_weight: w in reward = (1 - w) * accuracy + w * format (0.5 in the release).
    answers: the allowed ground truths; rows with others are skipped (None allows any string).
    check_images: decode every image once when reading, to skip corrupt ones early.
    miniature_layout: "parquet" (the published layout) or "jsonl" (JSONL + image folder).
    miniature_image_size: side of the miniature's images in pixels.
  """

  format_weight: float = 0.5
  answers: tuple[str, ...] | None = ("T", "F")
  check_images: bool = True
  miniature_layout: str = "parquet"
  miniature_image_size: int = 224


@dataclasses.dataclass(frozen=True)
class McqOptions:
  """Options of the `tfq_mcq` task (format_weight as in TfqOptions, for RL use)."""

  format_weight: float = 0.5
  check_images: bool = True
  miniature_image_size: int = 224


@dataclasses.dataclass(frozen=True)
class OsqOptions:
  """Options of the `tfq_osq` task."""

  check_images: bool = True
  miniature_image_size: int = 224


# ---------------------------------------------------------------------------------------------
# Reading.


def _roots(source: str) -> list[str]:
  folder = os.path.dirname(os.path.abspath(source))
  return [folder, os.path.dirname(folder)]


def _images(
  fields: Mapping[str, Any], source: str, check: bool, seen: dict[str, bytes]
) -> tuple[Any, ...]:
  """The row's images as bytes; `seen` (hash -> bytes) keeps one checked copy of each distinct
  image, since TFQ repeats an image on every one of its 5-10 question rows."""
  images = fields.get("images")
  if images is None and fields.get("image") is not None:
    images = [fields["image"]]
  if images is None or (isinstance(images, (list, tuple)) and not images):
    raise RecordError("missing field 'images'")
  if not isinstance(images, (list, tuple)):
    images = [images]
  roots = _roots(source)
  loaded = []
  for index, image in enumerate(images):
    try:
      data = io.load_image_bytes(image, roots, check=False)
      if not isinstance(data, bytes):
        loaded.append(data)
        continue
      key = hashlib.sha1(data).hexdigest()
      if key not in seen:
        if check:
          io.check_image_bytes(data)
        seen[key] = data
      loaded.append(seen[key])
    except RecordError as error:
      raise RecordError(error.reason, f"image {index}: {error.detail}") from error
  return tuple(loaded)


def _group_key(fields: Mapping[str, Any], images: Sequence[Any]) -> str:
  """The image a question is about: an explicit id/URL column, else a hash of its image bytes."""
  for key in ("Image_URL", "image_url", "url", "image_id", "group"):
    if fields.get(key):
      return str(fields[key])
  first = images[0]
  data = first if isinstance(first, bytes) else first.tobytes()
  return hashlib.sha1(data).hexdigest()[:16]


def _check_markers(text: str, num_images: int) -> None:
  markers = text.count(IMAGE_MARKER)
  if markers not in (0, num_images):
    raise RecordError(
      "image markers mismatch", f"{markers} {IMAGE_MARKER} marks for {num_images} images"
    )


def _parse_tfq_row(options: TfqOptions):
  seen: dict[str, bytes] = {}

  def parse(row: io.Row, record_id: str) -> Record:
    fields = row.fields
    problem = io.require(fields, "problem", str)
    answer = io.require(fields, "answer", str)
    if options.answers is not None and answer.strip() not in options.answers:
      raise RecordError("bad answer", f"{answer!r} not in {options.answers}")
    images = _images(fields, row.source, options.check_images, seen)
    _check_markers(problem, len(images))
    return Record(record_id, images, problem, answer, {"group": _group_key(fields, images)})

  return parse


def _parse_mcq_row(options: McqOptions):
  seen: dict[str, bytes] = {}

  def parse(row: io.Row, record_id: str) -> Record:
    fields = row.fields
    choices = fields.get("options", fields.get("choices"))
    if not isinstance(choices, (list, tuple)) or len(choices) < 2:
      raise RecordError("missing field 'options'", "need a list of at least two options")
    if len(choices) > len(OPTION_LETTERS):
      raise RecordError(
        "bad field 'options'", f"{len(choices)} options, at most {len(OPTION_LETTERS)}"
      )
    answer = io.require(fields, "answer", str).strip()
    if answer.upper() not in OPTION_LETTERS[: len(choices)]:
      raise RecordError("bad answer", f"{answer!r} is not one of the {len(choices)} option letters")
    images = _images(fields, row.source, options.check_images, seen)
    question = str(fields.get("question") or DEFAULT_QUESTION)
    _check_markers(question, len(images))
    return Record(
      record_id,
      images,
      question,
      answer,
      {"options": tuple(str(c) for c in choices), "group": _group_key(fields, images)},
    )

  return parse


def _parse_osq_row(options: OsqOptions):
  seen: dict[str, bytes] = {}

  def parse(row: io.Row, record_id: str) -> Record:
    fields = row.fields
    answer = io.require(fields, "answer", str)
    images = _images(fields, row.source, options.check_images, seen)
    question = str(fields.get("question") or DEFAULT_QUESTION)
    _check_markers(question, len(images))
    return Record(record_id, images, question, answer, {"group": _group_key(fields, images)})

  return parse


# ---------------------------------------------------------------------------------------------
# Prompts.


def interleave(text: str, images: Sequence[Any]) -> list[dict[str, Any]]:
  """User-message content: text split on <image> marks with the images in between (EasyR1's
  rule), or all images first when the text has no mark."""
  pil_images = [io.to_pil(image) for image in images]
  if IMAGE_MARKER not in text:
    return [{"type": "image", "image": image} for image in pil_images] + [
      {"type": "text", "text": text}
    ]
  content = []
  for index, piece in enumerate(text.split(IMAGE_MARKER)):
    if index:
      content.append({"type": "image", "image": pil_images[index - 1]})
    if piece:
      content.append({"type": "text", "text": piece})
  return content


def tfq_conversation(record: Record) -> Conversation:
  """The TFQ-GRPO prompt: one user message, template text around the stripped problem."""
  return [
    {"role": "user", "content": interleave(TFQ_GRPO_PROMPT + record.prompt.strip(), record.images)}
  ]


def mcq_conversation(record: Record) -> Conversation:
  options = "\n".join(
    f"{OPTION_LETTERS[i]}. {text}" for i, text in enumerate(record.metadata["options"])
  )
  text = f"{record.prompt}\nOptions:\n{options}\n{MCQ_INSTRUCTION}"
  return [{"role": "user", "content": interleave(text, record.images)}]


def osq_conversation(record: Record) -> Conversation:
  return [
    {"role": "user", "content": interleave(f"{record.prompt}\n{OSQ_INSTRUCTION}", record.images)}
  ]


# ---------------------------------------------------------------------------------------------
# Metrics.


def _check_lengths(completions: Sequence[Any], records: Sequence[Record]) -> None:
  if len(completions) != len(records):
    raise ValueError(
      f"Got {len(completions)} completions for {len(records)} records; pass one per record."
    )


def question_metrics(
  completions: Sequence[Any], records: Sequence[Record], extract
) -> dict[str, float]:
  """Per-question and per-image ("group") accuracy, as evaluation/eval_TFQ.py reports them.

  Returns:
    {"accuracy", "group_accuracy", "empty_answers", "num_questions", "num_groups",
     "format_rate"}; group_accuracy counts an image only if all its questions are right.
  """
  _check_lengths(completions, records)
  groups: dict[str, list[bool]] = collections.defaultdict(list)
  correct = empty = formatted = 0
  for completion, record in zip(completions, records):
    extracted = extract(completion)
    is_correct = tfq_rewards.answer_matches(extracted, record.answer)
    correct += is_correct
    empty += tfq_rewards.is_empty_answer(extracted)
    formatted += tfq_rewards.format_score(completion) > 0
    groups[str(record.metadata.get("group", record.id))].append(is_correct)
  total = len(records)
  return {
    "accuracy": correct / total if total else 0.0,
    "group_accuracy": sum(all(g) for g in groups.values()) / len(groups) if groups else 0.0,
    "empty_answers": float(empty),
    "num_questions": float(total),
    "num_groups": float(len(groups)),
    "format_rate": formatted / total if total else 0.0,
  }


def tfq_metrics(completions: Sequence[Any], records: Sequence[Record]) -> dict[str, float]:
  """TFQ-Bench metrics (`question_metrics` with the TFQ extraction and its fallbacks)."""
  return question_metrics(completions, records, tfq_rewards.extract_tfq_answer)


def mcq_metrics(completions: Sequence[Any], records: Sequence[Record]) -> dict[str, float]:
  """MCQ metrics: "accuracy" is the released per-question pass@1."""
  return question_metrics(completions, records, tfq_rewards.extract_mcq_answer)


def osq_metrics(completions: Sequence[Any], records: Sequence[Record]) -> dict[str, float]:
  """What OSQ can report without a judge: the format rate and answer count (the judge client
  grades the headline score)."""
  _check_lengths(completions, records)
  total = len(records)
  formatted = sum(tfq_rewards.format_score(c) > 0 for c in completions)
  return {"format_rate": formatted / total if total else 0.0, "num_questions": float(total)}


def osq_score(completion: Any, record: Record) -> dict[str, float]:
  """OSQ has no rule-based reward; this reports the format only (overall 0 without a judge)."""
  return {"overall": 0.0, "format": tfq_rewards.format_score(completion)}


# ---------------------------------------------------------------------------------------------
# Miniatures.


def miniature_records(n: int, seed: int, image_size: int) -> list[Record]:
  """About `n` TFQ-like records: shape scenes with 5-10 statements each, as TFQ-Data has."""
  rng = drawing.SeededRandom(seed)
  colours, kinds = tuple(drawing.COLOURS)[:6], drawing.SHAPES
  records, scene_index = [], 0
  while len(records) < n:
    scene = shape_scenes.generate_scene(
      rng, rng.integer(2, 5), 3, colours, kinds, tuple(shape_scenes.SIZES)
    )
    count = min(rng.integer(5, 10), n - len(records))
    statements = shape_scenes.scene_statements(
      rng, scene, shape_scenes.RELATIONS, count, colours, kinds
    )
    image = io.png_bytes(shape_scenes.render_scene(scene, image_size))
    group = f"scene-{seed}-{scene_index}"
    records.extend(
      Record(
        f"{group}-{i}", (image,), IMAGE_MARKER + statement, "T" if truth else "F", {"group": group}
      )
      for i, (statement, truth) in enumerate(statements)
    )
    scene_index += 1
  return records


def write_tfq_records(out_dir: str, records: Sequence[Record], layout: str = "parquet") -> str:
  """Writes records in a TFQ layout (module doc); returns the path `read` takes.

  "parquet" writes data/test-00000-of-00001.parquet with the published columns; "jsonl" writes
  tfq.jsonl and one PNG per distinct image under images/.
  """
  if layout == "jsonl":
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rows, names = [], {}
    for record in records:
      paths = []
      for image in record.images:
        data = image if isinstance(image, bytes) else io.png_bytes(io.to_pil(image))
        key = hashlib.sha1(data).hexdigest()[:16]
        if key not in names:
          names[key] = f"images/{key}.png"
          with open(os.path.join(out_dir, names[key]), "wb") as handle:
            handle.write(data)
        paths.append(names[key])
      rows.append(
        {"id": record.id, "images": paths, "problem": record.prompt, "answer": record.answer}
      )
    return io.write_jsonl(os.path.join(out_dir, "tfq.jsonl"), rows)
  if layout != "parquet":
    raise ValueError(f"layout must be 'parquet' or 'jsonl', got {layout!r}.")
  import pyarrow as pa

  schema = pa.schema(
    [io.hf_images_schema_field(), pa.field("problem", pa.string()), pa.field("answer", pa.string())]
  )
  rows = [
    {
      "images": [
        {
          "bytes": image if isinstance(image, bytes) else io.png_bytes(io.to_pil(image)),
          "path": None,
        }
        for image in record.images
      ],
      "problem": record.prompt,
      "answer": record.answer,
    }
    for record in records
  ]
  return io.write_parquet(
    os.path.join(out_dir, "data", "test-00000-of-00001.parquet"), rows, schema
  )


def write_tfq_miniature(out_dir: str, n: int, seed: int, options: TfqOptions = TfqOptions()) -> str:
  """Writes about `n` synthetic TFQ questions in `options.miniature_layout`."""
  records = miniature_records(n, seed, options.miniature_image_size)
  return write_tfq_records(out_dir, records, options.miniature_layout)


def _write_choice_miniature(
  out_dir: str, n: int, seed: int, image_size: int, with_options: bool
) -> str:
  """MCQ/OSQ miniature: one question per image; options are statements, one of them true."""
  rng = drawing.SeededRandom(seed)
  colours, kinds = tuple(drawing.COLOURS)[:6], drawing.SHAPES
  rows = []
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  for index in range(n):
    scene = shape_scenes.generate_scene(rng, rng.integer(2, 4), 3, colours, kinds)
    statements = shape_scenes.scene_statements(
      rng, scene, ("left_of", "above", "exists"), 12, colours, kinds
    )
    true = [s for s, truth in statements if truth]
    false = [s for s, truth in statements if not truth]
    if not true or len(false) < 5:
      continue
    name = f"images/{'mcq' if with_options else 'osq'}-{index}.png"
    shape_scenes.render_scene(scene, image_size).save(os.path.join(out_dir, name))
    row = {
      "id": f"{'mcq' if with_options else 'osq'}-{index}",
      "image": name,
      "question": DEFAULT_QUESTION,
    }
    if with_options:
      options = rng.shuffled([true[0], *false[:5]])
      row["options"] = options
      row["answer"] = OPTION_LETTERS[options.index(true[0])]
    else:
      row["answer"] = " ".join(true)
    rows.append(row)
  return io.write_jsonl(os.path.join(out_dir, "mcq.jsonl" if with_options else "osq.jsonl"), rows)


# ---------------------------------------------------------------------------------------------
# Task factories.


def make_tfq_task(**overrides: Any) -> Task:
  options = make_options(TfqOptions, "tfq", overrides)
  score = lambda completion, record: tfq_rewards.tfq_reward(
    completion, record.answer, options.format_weight
  )
  return Task(
    name="tfq",
    options=options,
    read=lambda path, stats=None: io.read_records(path, stats, _parse_tfq_row(options)),
    build_conversation=tfq_conversation,
    score=guard_score("tfq", score),
    evaluate=tfq_metrics,
    write_miniature=lambda out_dir, n, seed: write_tfq_miniature(out_dir, n, seed, options),
  )


def make_mcq_task(**overrides: Any) -> Task:
  options = make_options(McqOptions, "tfq_mcq", overrides)
  score = lambda completion, record: tfq_rewards.tfq_reward(
    completion, record.answer, options.format_weight
  )
  return Task(
    name="tfq_mcq",
    options=options,
    read=lambda path, stats=None: io.read_records(path, stats, _parse_mcq_row(options)),
    build_conversation=mcq_conversation,
    score=guard_score("tfq_mcq", score),
    evaluate=mcq_metrics,
    write_miniature=lambda out_dir, n, seed: _write_choice_miniature(
      out_dir, n, seed, options.miniature_image_size, with_options=True
    ),
  )


def make_osq_task(**overrides: Any) -> Task:
  options = make_options(OsqOptions, "tfq_osq", overrides)
  return Task(
    name="tfq_osq",
    options=options,
    read=lambda path, stats=None: io.read_records(path, stats, _parse_osq_row(options)),
    build_conversation=osq_conversation,
    score=guard_score("tfq_osq", osq_score),
    evaluate=osq_metrics,
    write_miniature=lambda out_dir, n, seed: _write_choice_miniature(
      out_dir, n, seed, options.miniature_image_size, with_options=False
    ),
  )


TASK_FACTORIES = {"tfq": make_tfq_task, "tfq_mcq": make_mcq_task, "tfq_osq": make_osq_task}
