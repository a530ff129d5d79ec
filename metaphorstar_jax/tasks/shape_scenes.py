"""Synthetic scenes of coloured shapes on a grid, and true/false statements about them.

Shared by the built-in `shapes` task (the CPU default) and the TFQ data miniature. Shapes sit in
distinct cells of a grid, so "left of" and "above" compare cell columns and rows and are never
ambiguous; each shape is named by its colour and kind ("the red circle"), unique in its scene.
Statements are drawn true or false with equal probability.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from PIL import Image

from metaphorstar_jax.tasks import drawing

RELATIONS = ("left_of", "right_of", "above", "below", "count", "exists", "larger")
SIZES = {"small": 0.22, "large": 0.38}  # radius as a fraction of a grid cell
DEFAULT_SIZE = 0.3
JITTER = 0.12  # centre offset within a cell, as a fraction of the cell


@dataclasses.dataclass(frozen=True)
class PlacedShape:
  colour: str
  kind: str
  row: int
  column: int
  size: str  # "small", "large", or "" when sizes are not used

  @property
  def name(self) -> str:
    return f"{self.colour} {self.kind}"


@dataclasses.dataclass(frozen=True)
class Scene:
  shapes: tuple[PlacedShape, ...]
  grid_size: int
  jitter: tuple[tuple[float, float], ...]  # per shape, in cells


def describe_scene(scene: Scene, colours: Sequence[str], kinds: Sequence[str]) -> str:
  """The shapes of a scene in palette order (independent of where they sit), e.g.
  "a red circle and a blue square": what a model should say it sees before it answers."""
  order = {(c, k): i for i, (c, k) in enumerate((c, k) for c in colours for k in kinds)}
  names = [f"a {s.name}" for s in sorted(scene.shapes, key=lambda s: order[(s.colour, s.kind)])]
  return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def generate_scene(
  rng: drawing.SeededRandom,
  num_shapes: int,
  grid_size: int,
  colours: Sequence[str],
  kinds: Sequence[str],
  sizes: Sequence[str] = (),
  target: tuple[str, str] | None = None,
  with_target: bool = True,
) -> Scene:
  """Places `num_shapes` shapes with distinct (colour, kind) in distinct grid cells.

  With `target` (a (colour, kind) pair), the scene contains that shape if `with_target`, and
  otherwise does not.
  """
  cells = rng.sample([(r, c) for r in range(grid_size) for c in range(grid_size)], num_shapes)
  pool = [(colour, kind) for colour in colours for kind in kinds]
  if target is None:
    looks = rng.sample(pool, num_shapes)
  else:
    others = rng.sample([look for look in pool if look != target], num_shapes - with_target)
    looks = rng.shuffled(others + [target] * with_target)
  shapes = tuple(
    PlacedShape(colour, kind, row, column, rng.choice(sizes) if sizes else "")
    for (row, column), (colour, kind) in zip(cells, looks)
  )
  jitter = tuple((rng.uniform(-JITTER, JITTER), rng.uniform(-JITTER, JITTER)) for _ in shapes)
  return Scene(shapes, grid_size, jitter)


def render_scene(scene: Scene, image_size: int) -> Image.Image:
  """The scene as an `image_size` x `image_size` RGB image."""
  image, draw = drawing.blank(image_size, image_size)
  cell = image_size / scene.grid_size
  for shape, (dx, dy) in zip(scene.shapes, scene.jitter):
    centre = ((shape.column + 0.5 + dx) * cell, (shape.row + 0.5 + dy) * cell)
    radius = SIZES.get(shape.size, DEFAULT_SIZE) * cell
    drawing.draw_shape(draw, shape.kind, centre, radius, drawing.COLOURS[shape.colour])
  return image



def example_image(image_size: int = 112) -> Image.Image:
  """A red circle to the left of a blue square: a picture with a known answer, for the demo and
  for tests that need any image."""
  shapes = (PlacedShape("red", "circle", 0, 0, ""), PlacedShape("blue", "square", 0, 1, ""))
  return render_scene(Scene(shapes, grid_size=2, jitter=((0.0, 0.0),) * 2), image_size)

_BINARY = {
  # relation: (axis the pair must differ on, phrase, truth of "a REL b")
  "left_of": ("column", "is to the left of", lambda a, b: a.column < b.column),
  "right_of": ("column", "is to the right of", lambda a, b: a.column > b.column),
  "above": ("row", "is above", lambda a, b: a.row < b.row),
  "below": ("row", "is below", lambda a, b: a.row > b.row),
  "larger": ("size", "is larger than", lambda a, b: SIZES[a.size] > SIZES[b.size]),
}


def make_statement(
  rng: drawing.SeededRandom,
  scene: Scene,
  relation: str,
  colours: Sequence[str],
  kinds: Sequence[str],
  canonical_pairs: bool = False,
) -> tuple[str, bool] | None:
  """A statement about the scene using `relation` and whether it is true; None if impossible.

  With `canonical_pairs`, a binary relation always names its two shapes in palette order, so
  the wording never reveals the answer and only the image decides it.
  """
  want_true = rng.coin()
  shapes = scene.shapes
  if relation in _BINARY:
    axis, phrase, holds = _BINARY[relation]
    pairs = [
      (a, b) for a in shapes for b in shapes if a is not b and getattr(a, axis) != getattr(b, axis)
    ]
    if axis == "size":
      pairs = [(a, b) for a, b in pairs if a.size and b.size]
    if canonical_pairs:
      rank = {(c, k): i for i, (c, k) in enumerate((c, k) for c in colours for k in kinds)}
      pairs = [(a, b) for a, b in pairs
               if rank[(a.colour, a.kind)] < rank[(b.colour, b.kind)]]
    if not pairs:
      return None
    a, b = rng.choice(pairs)
    if holds(a, b) != want_true and not canonical_pairs:
      a, b = b, a  # strict orders flip when the pair swaps
    return f"The {a.name} {phrase} the {b.name}.", holds(a, b)
  if relation == "count":
    count = len(shapes) if want_true else max(1, len(shapes) + rng.choice((-1, 1)))
    if count == len(shapes):
      count += 1 if not want_true else 0
    noun = "shape" if count == 1 else "shapes"
    return (
      f"There {'is' if count == 1 else 'are'} exactly {count} {noun} in the image.",
      count == len(shapes),
    )
  if relation == "exists":
    present = {(s.colour, s.kind) for s in shapes}
    if want_true:
      colour, kind = rng.choice(sorted(present))
    else:
      absent = [(c, k) for c in colours for k in kinds if (c, k) not in present]
      if not absent:
        return None
      colour, kind = rng.choice(absent)
    return f"There is a {colour} {kind} in the image.", (colour, kind) in present
  raise ValueError(f"Unknown relation {relation!r}; expected one of {RELATIONS}.")


def scene_statements(
  rng: drawing.SeededRandom,
  scene: Scene,
  relations: Sequence[str],
  count: int,
  colours: Sequence[str],
  kinds: Sequence[str],
  max_tries: int = 50,
  canonical_pairs: bool = False,
) -> list[tuple[str, bool]]:
  """Up to `count` distinct statements about one scene."""
  statements, seen = [], set()
  for _ in range(max_tries):
    if len(statements) == count:
      break
    made = make_statement(rng, scene, rng.choice(relations), colours, kinds, canonical_pairs)
    if made is not None and made[0] not in seen:
      seen.add(made[0])
      statements.append(made)
  return statements
