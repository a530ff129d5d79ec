"""metaphorstar_jax.tasks.shapes and shape_scenes: the synthetic visual true/false task."""

from __future__ import annotations

import re

import numpy as np
import pytest

from metaphorstar_jax.tasks import drawing, get_task, load_records, shape_scenes
from metaphorstar_jax.tasks.shapes import ShapesOptions, generate_records

COLOURS, KINDS = tuple(drawing.COLOURS)[:6], drawing.SHAPES
STATEMENT = re.compile(
  r"The (\w+ \w+) (is to the left of|is to the right of|is above|is below|is larger than) the (\w+ \w+)\."
)


def truth_from_scene(scene: shape_scenes.Scene, statement: str) -> bool:
  """Decides a statement from the scene, independently of how it was generated."""
  by_name = {s.name: s for s in scene.shapes}
  match = STATEMENT.fullmatch(statement)
  if match:
    a, relation, b = by_name[match.group(1)], match.group(2), by_name[match.group(3)]
    return {
      "is to the left of": a.column < b.column,
      "is to the right of": a.column > b.column,
      "is above": a.row < b.row,
      "is below": a.row > b.row,
      "is larger than": shape_scenes.SIZES[a.size] > shape_scenes.SIZES[b.size],
    }[relation]
  match = re.fullmatch(r"There (?:is|are) exactly (\d+) shapes? in the image\.", statement)
  if match:
    return int(match.group(1)) == len(scene.shapes)
  match = re.fullmatch(r"There is a (\w+ \w+) in the image\.", statement)
  return match.group(1) in by_name


def test_statements_are_true_exactly_when_the_scene_says_so():
  for seed in range(40):
    rng = drawing.SeededRandom(seed)
    scene = shape_scenes.generate_scene(
      rng, rng.integer(2, 5), 3, COLOURS, KINDS, tuple(shape_scenes.SIZES)
    )
    for relation in shape_scenes.RELATIONS:
      made = shape_scenes.make_statement(rng, scene, relation, COLOURS, KINDS)
      if made is not None:
        assert truth_from_scene(scene, made[0]) is made[1], made


def test_rendered_shapes_sit_where_the_scene_says():
  rng = drawing.SeededRandom(3)
  scene = shape_scenes.generate_scene(rng, 4, 3, COLOURS, KINDS)
  pixels = np.asarray(shape_scenes.render_scene(scene, 240))
  cell = 240 / 3
  for shape, (dx, dy) in zip(scene.shapes, scene.jitter):
    x, y = int((shape.column + 0.5 + dx) * cell), int((shape.row + 0.5 + dy) * cell)
    assert tuple(pixels[y, x]) == drawing.COLOURS[shape.colour]


def test_generation_is_deterministic_and_balanced():
  options = ShapesOptions(num_records=400, seed=5)
  first, second = generate_records(options), generate_records(options)
  assert [r.prompt for r in first] == [r.prompt for r in second]
  assert all(
    np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    for a, b in zip(first[:20], second[:20])
  )
  assert [r.prompt for r in generate_records(ShapesOptions(num_records=20, seed=6))] != [
    r.prompt for r in first[:20]
  ]
  true_share = sum(r.answer == "T" for r in first) / len(first)
  assert 0.4 < true_share < 0.6
  assert len(first) == 400 and len({r.metadata["group"] for r in first}) >= 100


def test_difficulty_options():
  records = generate_records(
    ShapesOptions(
      num_records=60,
      min_shapes=5,
      max_shapes=6,
      grid_size=4,
      relations=("above", "count"),
      image_size=96,
    )
  )
  assert all(5 <= r.metadata["num_shapes"] <= 6 for r in records)
  assert all(" is above " in r.prompt or "exactly" in r.prompt for r in records)
  assert records[0].images[0].size == (96, 96)
  larger = generate_records(ShapesOptions(num_records=30, relations=("larger",)))
  assert all("larger than" in r.prompt for r in larger)


def test_target_statements_are_fixed_and_decided_by_the_image():
  options = ShapesOptions(num_records=300, min_shapes=1, max_shapes=2, grid_size=2,
                          colours=("red", "blue", "green"), kinds=("circle",),
                          target="red circle", statements_per_image=1, seed=2)
  records = generate_records(options)
  assert {r.prompt for r in records} == {"<image>There is a red circle in the image."}
  for record in records:
    assert record.answer == ("T" if "a red circle" in record.metadata["description"] else "F")
  true_share = sum(r.answer == "T" for r in records) / len(records)
  assert 0.4 < true_share < 0.6
  # The red pixels agree with the answer (the image alone decides it).
  for record in records[:40]:
    pixels = np.asarray(record.images[0])
    has_red = bool(np.all(pixels == drawing.COLOURS["red"], axis=-1).any())
    assert has_red == (record.answer == "T")


def test_prompt_styles():
  record = generate_records(ShapesOptions(num_records=1, seed=3))[0]
  for style in ("tfq", "short", "statement"):
    turns = get_task("shapes", prompt=style).build_conversation(record)
    texts = [item["text"] for item in turns[-1]["content"] if item["type"] == "text"]
    assert texts[-1].endswith(record.prompt.replace("<image>", "").strip())
    assert sum(item["type"] == "image" for item in turns[-1]["content"]) == 1
  bare = get_task("shapes", prompt="statement").build_conversation(record)
  assert bare[-1]["content"][-1]["text"] == record.prompt.replace("<image>", "").strip()


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(relations=("inside",)), "relations"),
    (dict(relations=()), "relations"),
    (dict(min_shapes=3, max_shapes=2), "min_shapes"),
    (dict(max_shapes=10, grid_size=3), "max_shapes"),
    (dict(colours=("teal",)), "Unknown colours"),
    (dict(statements_per_image=0), "statements_per_image"),
    (dict(target="teal circle"), "target"),
    (dict(target="red"), "target"),
  ],
)
def test_bad_options(overrides, message):
  with pytest.raises(ValueError, match=message):
    get_task("shapes", **overrides)


def test_task_reads_generated_and_written_data(tmp_path):
  task = get_task("shapes", num_records=10, seed=1)
  records, stats = load_records(task, None)
  assert len(records) == 10 and stats.read == 10 and not task.options.relations == ()
  path = task.write_miniature(str(tmp_path), 10, 1)
  from_disk, _ = load_records(task, path)
  assert [r.prompt for r in from_disk] == [r.prompt for r in records]
  assert [r.answer for r in from_disk] == [r.answer for r in records]
  # The image-level grouping survives the round trip (by image hash).
  assert len({r.metadata["group"] for r in from_disk}) == len(
    {r.metadata["group"] for r in records}
  )
  result = task.score("<think>x</think><answer>" + records[0].answer + "</answer>", records[0])
  assert result == {"overall": 1.0, "format": 1.0, "accuracy": 1.0}


def test_example_image_shows_a_red_shape_left_of_a_blue_one():
  pixels = np.asarray(shape_scenes.example_image(112))
  assert pixels.shape == (112, 112, 3)
  colour_columns = lambda name: np.nonzero((pixels == drawing.COLOURS[name]).all(-1))[1]
  red, blue = colour_columns("red"), colour_columns("blue")
  assert red.size and blue.size and red.max() < blue.min()
