"""Deterministic randomness and PIL drawing for the synthetic tasks and data miniatures.

`SeededRandom` draws only through `random.Random.random()`, the one method whose sequence Python
promises to keep across versions for a given seed, so a seed gives the same data everywhere.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, TypeVar

from PIL import Image, ImageDraw, ImageFont

T = TypeVar("T")

COLOURS = {
  "red": (220, 40, 40),
  "green": (40, 160, 60),
  "blue": (40, 80, 220),
  "yellow": (235, 200, 30),
  "purple": (140, 60, 180),
  "orange": (240, 130, 30),
  "cyan": (40, 190, 200),
  "gray": (128, 128, 128),
  "brown": (140, 90, 40),
}
SHAPES = ("circle", "square", "triangle", "diamond")
BACKGROUND = (255, 255, 255)


class SeededRandom:
  """A seeded generator built on `random.Random.random()` only (stable across Python versions)."""

  def __init__(self, seed: int):
    self._random = random.Random(seed)

  def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * self._random.random()

  def integer(self, low: int, high: int) -> int:
    """Uniform in [low, high] inclusive."""
    return low + min(int(self._random.random() * (high - low + 1)), high - low)

  def choice(self, items: Sequence[T]) -> T:
    return items[self.integer(0, len(items) - 1)]

  def shuffled(self, items: Sequence[T]) -> list[T]:
    """A Fisher-Yates shuffled copy."""
    items = list(items)
    for i in range(len(items) - 1, 0, -1):
      j = self.integer(0, i)
      items[i], items[j] = items[j], items[i]
    return items

  def sample(self, items: Sequence[T], count: int) -> list[T]:
    return self.shuffled(items)[:count]

  def coin(self, probability: float = 0.5) -> bool:
    return self._random.random() < probability


def font(size: int = 12) -> Any:
  """PIL's bundled font at `size` (a bitmap font on Pillow builds without FreeType)."""
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1 has no size argument
    return ImageFont.load_default()


def draw_shape(
  draw: ImageDraw.ImageDraw,
  kind: str,
  centre: tuple[float, float],
  radius: float,
  fill: tuple[int, int, int],
  outline: tuple[int, int, int] | None = (0, 0, 0),
  width: int = 2,
) -> None:
  """Draws a filled circle, square, triangle or diamond of half-size `radius` around `centre`."""
  x, y = centre
  if kind == "circle":
    draw.ellipse(
      (x - radius, y - radius, x + radius, y + radius), fill=fill, outline=outline, width=width
    )
  elif kind == "square":
    draw.rectangle(
      (x - radius, y - radius, x + radius, y + radius), fill=fill, outline=outline, width=width
    )
  elif kind == "triangle":
    height = radius * math.sqrt(3)
    points = [
      (x, y - radius),
      (x - height / 2 * 1.15, y + radius * 0.8),
      (x + height / 2 * 1.15, y + radius * 0.8),
    ]
    draw.polygon(points, fill=fill, outline=outline, width=width)
  elif kind == "diamond":
    draw.polygon(
      [(x, y - radius), (x + radius, y), (x, y + radius), (x - radius, y)],
      fill=fill,
      outline=outline,
      width=width,
    )
  else:
    raise ValueError(f"Unknown shape {kind!r}; expected one of {SHAPES}.")


def blank(width: int, height: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
  """A white RGB canvas and a drawer on it."""
  image = Image.new("RGB", (width, height), BACKGROUND)
  return image, ImageDraw.Draw(image)
