"""STAR-R1 on TVR: name the transformations between an initial and a final image (spec §3).

STAR-R1's data and code are unreleased, so this layout is ours [GAP], modelled on TRANCE and on
Reason-RFT's TRANCE conversion: JSONL (or parquet) rows

  {"id", "images": [initial, final] (paths relative to the file's folder, image structs or base64),
   "objects": [{"color", "shape", "size", "material"}, ...]  (the initial scene, index order),
   "transformations": [{"object": 2, "attribute": "color", "value": "cyan"}, ...],
   "view": "center" | "left" | "right"}

`initial_image`/`final_image` may replace `images`. The final image is rendered from the view
named (TRANCE's View setting: left/right are the cross-view, out-of-distribution cases).

The prompt lists the initial objects (as Reason-RFT's TRANCE prompt does) and asks for
`index.attribute.value` items (the CVPR STAR-R1 notation); the scorer also reads other
notations. Metrics are TVR's, overall and per view: accuracy, loose accuracy, distance,
normalised distance and step difference (rewards/tvr.py).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from metaphorstar_jax.rewards import tvr as tvr_rewards
from metaphorstar_jax.tasks import drawing, io
from metaphorstar_jax.tasks.records import (
  Conversation,
  Record,
  RecordError,
  Task,
  guard_score,
  make_options,
)

VIEWS = ("center", "left", "right")
TRANCE_COLOURS = {
  "gray": (87, 87, 87),
  "red": (173, 35, 35),
  "blue": (42, 75, 215),
  "green": (29, 105, 20),
  "brown": (129, 74, 25),
  "purple": (129, 38, 192),
  "cyan": (41, 208, 208),
  "yellow": (255, 238, 51),
}
_SIZE_RADIUS = {"small": 0.035, "medium": 0.05, "large": 0.065}  # fraction of image width
_VIEW_SHIFT = {"center": 0.0, "left": -0.12, "right": 0.12}  # camera pan, fraction of width


@dataclasses.dataclass(frozen=True)
class TvrOptions:
  """Options of the `tvr` task (the reward's unknowns are documented in rewards/tvr.py).

  Attributes:
    format_weight, full_match, index_attribute_match, index_match: reward weights.
    over_enumeration_penalty: per predicted change beyond the true count [GAP].
    empty_answer_penalty: when no change is named but some happened [GAP].
    strict_format: whole-completion <think>/<answer> match.
    include_object_list: list the initial objects' attributes in the prompt.
    index_base: objects are numbered from 0 (TRANCE) or 1.
    check_images: decode images when reading.
    miniature_image_size: (width, height) of miniature images; TRANCE renders 320x240.
    miniature_max_changes: most transformations per miniature sample.
  """

  format_weight: float = 1.0
  full_match: float = 5.0
  index_attribute_match: float = 1.5
  index_match: float = 0.5
  over_enumeration_penalty: float = 1.0
  empty_answer_penalty: float = 1.0
  strict_format: bool = True
  include_object_list: bool = True
  index_base: int = 0
  check_images: bool = True
  miniature_image_size: tuple[int, int] = (320, 240)
  miniature_max_changes: int = 3

  def __post_init__(self):
    if self.index_base not in (0, 1):
      raise ValueError(f"index_base must be 0 or 1, got {self.index_base}.")


def _parse(row: io.Row, record_id: str, options: TvrOptions) -> Record:
  fields = row.fields
  images = fields.get("images")
  if images is None and fields.get("initial_image") is not None:
    images = [fields.get("initial_image"), fields.get("final_image")]
  if not isinstance(images, (list, tuple)) or len(images) != 2 or any(i is None for i in images):
    raise RecordError("missing field 'images'", "need exactly two images: initial and final")
  folder = os.path.dirname(os.path.abspath(row.source))
  loaded = []
  for index, image in enumerate(images):
    try:
      loaded.append(
        io.load_image_bytes(image, [folder, os.path.dirname(folder)], check=options.check_images)
      )
    except RecordError as error:
      raise RecordError(error.reason, f"image {index}: {error.detail}") from error
  objects = io.require(fields, "objects", (list, tuple))
  if not all(isinstance(o, Mapping) for o in objects):
    raise RecordError("bad field 'objects'", "each object must be a mapping of attributes")
  raw = io.require(fields, "transformations", (list, tuple, str))
  transformations = tvr_rewards.as_triples(raw)
  if not transformations or (not isinstance(raw, str) and len(transformations) != len(raw)):
    raise RecordError("bad field 'transformations'", f"could not read every change in {raw!r}")
  for index, attribute, _ in transformations:
    position = index - options.index_base
    if not 0 <= position < len(objects) or attribute not in objects[position]:
      raise RecordError(
        "bad field 'transformations'", f"({index}, {attribute}) names no object attribute"
      )
  view = str(fields.get("view") or "center").lower()
  if view not in VIEWS:
    raise RecordError("bad field 'view'", f"{view!r} not in {VIEWS}")
  objects = tuple({str(k): str(v).lower() for k, v in o.items()} for o in objects)
  return Record(
    record_id, tuple(loaded), "", tuple(transformations), {"objects": objects, "view": view}
  )


def describe_object(obj: Mapping[str, str]) -> str:
  """'small red rubber cube' style description of an object's attributes."""
  order = ("size", "color", "material", "shape")
  return " ".join(
    [obj[k] for k in order if k in obj] + [f"{k}={v}" for k, v in obj.items() if k not in order]
  )


def conversation(record: Record, options: TvrOptions) -> Conversation:
  initial, final = (io.to_pil(image) for image in record.images)
  view = record.metadata.get("view", "center")
  lines = [
    f"The first image shows a scene in its initial state; the second shows its final state, seen "
    f"from the {view} camera. Some objects changed one of their attributes (color, shape, size "
    f"or material) in between."
  ]
  if options.include_object_list:
    lines.append("Objects in the initial state (index: size color material shape):")
    lines += [
      f"{i + options.index_base}: {describe_object(o)}"
      for i, o in enumerate(record.metadata["objects"])
    ]
  lines.append(
    "Find every change. Reason inside <think> </think>, then list the changes inside <answer> "
    "</answer> as index.attribute.value items separated by semicolons, e.g. <answer>2.color.cyan; "
    "0.size.large</answer>."
  )
  content = [
    {"type": "text", "text": "Initial state: "},
    {"type": "image", "image": initial},
    {"type": "text", "text": "\nFinal state: "},
    {"type": "image", "image": final},
    {"type": "text", "text": "\n" + "\n".join(lines)},
  ]
  return [{"role": "user", "content": content}]


def score_record(completion: Any, record: Record, options: TvrOptions) -> dict[str, float]:
  return tvr_rewards.tvr_reward(
    completion,
    record.answer,
    options.format_weight,
    options.full_match,
    options.index_attribute_match,
    options.index_match,
    options.over_enumeration_penalty,
    options.empty_answer_penalty,
    options.strict_format,
  )


def tvr_metrics(
  completions: Sequence[Any], records: Sequence[Record], options: TvrOptions
) -> dict[str, float]:
  """TVR metrics overall and per view ("<view>_acc", ...), plus the mean reward.

  Returns:
    {"acc", "loose_acc", "avg_dist", "avg_norm_dist", "avg_step_diff", "reward", and the same
     five prefixed by each view present, e.g. "left_acc", with "n_left"}.
  """
  if len(completions) != len(records):
    raise ValueError(
      f"Got {len(completions)} completions for {len(records)} records; pass one per record."
    )
  sums = collections.defaultdict(lambda: collections.defaultdict(float))
  counts, reward = collections.Counter(), 0.0
  for completion, record in zip(completions, records):
    answer = tvr_rewards.answer_text(completion)
    predicted = tvr_rewards.parse_transformations(answer) if answer is not None else []
    result = tvr_rewards.score_transformations(
      predicted,
      record.answer,
      record.metadata.get("objects"),
      options.index_base,
      tvr_rewards.VALUES,
    )
    values = {
      "acc": float(result.correct),
      "loose_acc": float(result.loose_correct),
      "avg_dist": result.distance,
      "avg_norm_dist": result.normalized_distance,
      "avg_step_diff": float(result.step_difference),
    }
    for prefix in ("", f"{record.metadata.get('view', 'center')}_"):
      counts[prefix] += 1
      for name, value in values.items():
        sums[prefix][name] += value
    reward += score_record(completion, record, options)["overall"]
  metrics = {
    prefix + name: total / counts[prefix]
    for prefix, group in sums.items()
    for name, total in group.items()
  }
  metrics.update({f"n_{prefix[:-1]}": float(count) for prefix, count in counts.items() if prefix})
  if records:
    metrics["reward"] = reward / len(records)
  return metrics


# ---------------------------------------------------------------------------------------------
# Miniature.


def _render(
  objects: Sequence[Mapping[str, str]], positions, size: tuple[int, int], view: str
) -> bytes:
  width, height = size
  image, draw = drawing.blank(width, height)
  draw.rectangle((0, int(height * 0.55), width, height), fill=(205, 205, 200))  # the floor
  shift = _VIEW_SHIFT[view]
  # Far objects first, so near ones overlap them.
  for obj, (x, y) in sorted(zip(objects, positions), key=lambda item: item[1][1]):
    cx, cy = (x + shift) * width, y * height
    radius = _SIZE_RADIUS[obj["size"]] * width * (0.8 + 0.4 * y)  # nearer is bigger
    colour = TRANCE_COLOURS[obj["color"]]
    if obj["material"] == "glass":
      colour = tuple((c + 255) // 2 for c in colour)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if obj["shape"] == "sphere":
      draw.ellipse(box, fill=colour, outline=(30, 30, 30))
    elif obj["shape"] == "cube":
      draw.rectangle(box, fill=colour, outline=(30, 30, 30))
    else:
      draw.rounded_rectangle(
        (cx - radius * 0.75, cy - radius, cx + radius * 0.75, cy + radius),
        radius=radius * 0.5,
        fill=colour,
        outline=(30, 30, 30),
      )
    if obj["material"] == "metal":
      draw.ellipse(
        (cx - radius * 0.5, cy - radius * 0.6, cx - radius * 0.1, cy - radius * 0.2),
        fill=(245, 245, 245),
      )
  return io.png_bytes(image)


def write_tvr_miniature(out_dir: str, n: int, seed: int, options: TvrOptions = TvrOptions()) -> str:
  """Writes `n` synthetic TVR samples (JSONL + images/), views cycling center/left/right."""
  rng = drawing.SeededRandom(seed)
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  rows = []
  for index in range(n):
    count = rng.integer(3, 6)
    looks = rng.sample(
      [(c, s) for c in tvr_rewards.VALUES["color"] for s in tvr_rewards.VALUES["shape"]], count
    )
    objects = [
      {
        "color": c,
        "shape": s,
        "size": rng.choice(tvr_rewards.VALUES["size"]),
        "material": rng.choice(tvr_rewards.VALUES["material"]),
      }
      for c, s in looks
    ]
    slots = rng.sample(
      [(0.12 + 0.19 * k, 0.66 + 0.2 * r) for k in range(5) for r in range(2)], count
    )
    final = [dict(o) for o in objects]
    changes = []
    for position in rng.sample(
      range(count), rng.integer(1, min(count, options.miniature_max_changes))
    ):
      attribute = rng.choice(tvr_rewards.ATTRIBUTES)
      value = rng.choice(
        [v for v in tvr_rewards.VALUES[attribute] if v != final[position][attribute]]
      )
      final[position][attribute] = value
      changes.append(
        {"object": position + options.index_base, "attribute": attribute, "value": value}
      )
    view = VIEWS[index % len(VIEWS)]
    names = []
    for stage, (state, stage_view) in (("initial", (objects, "center")), ("final", (final, view))):
      name = f"images/tvr-{seed}-{index}-{stage}.png"
      with open(os.path.join(out_dir, name), "wb") as handle:
        handle.write(_render(state, slots, tuple(options.miniature_image_size), stage_view))
      names.append(name)
    rows.append(
      {
        "id": f"tvr-{seed}-{index}",
        "images": names,
        "objects": objects,
        "transformations": changes,
        "view": view,
      }
    )
  return io.write_jsonl(os.path.join(out_dir, "tvr.jsonl"), rows)


def make_tvr_task(**overrides: Any) -> Task:
  options = make_options(TvrOptions, "tvr", overrides)
  return Task(
    name="tvr",
    options=options,
    read=lambda path, stats=None: io.read_records(
      path, stats, lambda row, record_id: _parse(row, record_id, options)
    ),
    build_conversation=lambda record: conversation(record, options),
    score=guard_score("tvr", lambda completion, record: score_record(completion, record, options)),
    evaluate=lambda completions, records: tvr_metrics(completions, records, options),
    write_miniature=lambda out_dir, n, seed: write_tvr_miniature(out_dir, n, seed, options),
  )


TASK_FACTORIES = {"tvr": make_tvr_task}
