"""Abstract state at a run's worst-case shapes: the policy's architecture, parameters as
ShapeDtypeStructs laid out as the trainer lays them out, their bytes per chip, and the images of
the largest prompt. Nothing is allocated and no weights are read.

Shape letters (README "Shape letters"): P prompts, G group size, B = P·G rows, T prompt tokens,
N completion tokens, X patches, I images.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metaphorstar_jax import data
from metaphorstar_jax import sharding as sharding_lib
from metaphorstar_jax.data.image_processor import num_image_tokens
from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.training import builders
from metaphorstar_jax.training.policy import SequenceBatch


def model_config(config) -> qwen2_5_vl.Qwen2_5_VLConfig:
  """The policy's architecture: `model.hf_path`'s config.json, or the preset; no weights read."""
  m = config.model
  runtime = builders.model_runtime(config)
  if m.hf_path:
    return qwen2_5_vl.from_json_file(m.hf_path, **runtime)
  return qwen2_5_vl.preset(m.preset, **runtime)


def with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree`'s shapes and dtypes carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s,
                                                        weak_type=getattr(x, "weak_type", False)),
                      tree, shardings)


@dataclasses.dataclass(frozen=True)
class ImageShape:
  """The images of one worst-case prompt."""

  patches: int  # S per prompt
  images: int  # I per prompt
  tokens: int  # image placeholder tokens per prompt
  grid: tuple[int, int, int]


def prompt_images(config, vision) -> ImageShape:
  """`plan.images_per_prompt` square images of `plan.image_pixels` (unset: image.max_pixels), as the
  image processor resizes them."""
  count = int(config.plan.images_per_prompt)
  if count == 0:
    return ImageShape(0, 0, 0, (0, 0, 0))
  pixels = int(config.image.max_pixels if config.plan.image_pixels is None
               else config.plan.image_pixels)
  processor = data.ImageProcessor(min_pixels=config.image.min_pixels,
                                  max_pixels=config.image.max_pixels,
                                  patch_size=vision.patch_size,
                                  merge_size=vision.spatial_merge_size)
  side = math.isqrt(pixels)
  grid = processor.grid_thw(side, side)
  tokens = num_image_tokens(grid, vision.spatial_merge_size) * count
  if tokens > config.data.max_prompt_tokens:
    raise ValueError(f"{count} image(s) of {side}x{side} pixels make {tokens} prompt tokens, more "
                     f"than data.max_prompt_tokens={config.data.max_prompt_tokens}; such prompts "
                     "are skipped, so plan smaller ones (--config.plan.image_pixels).")
  return ImageShape(math.prod(grid) * count, count, tokens, tuple(grid))


class Layout:
  """Builds ShapeDtypeStructs placed as the trainer places them on `mesh`."""

  def __init__(self, mesh: Mesh):
    self.mesh = mesh
    self.replicated = NamedSharding(mesh, PartitionSpec())

  def rows(self, shape, dtype, weak_type=False):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_lib.row_sharding(shape, self.mesh),
                                weak_type=weak_type)

  def whole(self, shape, dtype, weak_type=False):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=self.replicated, weak_type=weak_type)



def sequence_batch(layout: Layout, P: int, T: int, B: int, N: int, S: int, I: int,
               patch_dim: int) -> SequenceBatch:
  pixels = layout.whole((S, patch_dim), jnp.float32) if S else None
  grids = layout.whole((I, 3), jnp.int32) if S else None
  return SequenceBatch(layout.rows((P, T), jnp.int32), layout.rows((P, T), jnp.int32), pixels,
                       grids, layout.rows((B, N), jnp.int32), layout.rows((B, N), jnp.int32))

