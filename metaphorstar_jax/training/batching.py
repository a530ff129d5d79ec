"""Splitting a step's prompts into mini- and micro-batches, placing them on the mesh, and
combining the micro-batches' metrics.

Rows p·G … p·G+G-1 belong to prompt p; a split is always by prompt, so a group never straddles
two micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import numpy as np

from metaphorstar_jax import sharding as sharding_lib
from metaphorstar_jax.data.pipeline import collate
from metaphorstar_jax.sampling import Sampler
from metaphorstar_jax.training.policy import SequenceBatch


def prompt_subsets(num_prompts: int, parts: int,
                   rng: np.random.Generator | None = None) -> list[np.ndarray]:
  """`parts` equal sets of prompt indices, shuffled by `rng` when given."""
  order = rng.permutation(num_prompts) if rng is not None else np.arange(num_prompts)
  if num_prompts % parts:
    raise ValueError(f"{num_prompts} prompts per step cannot be split into {parts} parts; make "
                     "train.prompts_per_step a multiple of num_minibatches × grad_accum_steps.")
  return np.split(order, parts)


def rows_of(prompts: np.ndarray, group_size: int) -> np.ndarray:
  """The row indices of `prompts`' groups, prompt by prompt."""
  return (prompts[:, None] * group_size + np.arange(group_size)[None]).reshape(-1)


def prompt_width(bucket: int, longest: int) -> int:
  """Prompt columns an update keeps of the sampler's `bucket`: the longest prompt, rounded up to
  a multiple of bucket/16 (so at most 16 widths per bucket compile)."""
  granule = max(1, bucket // 16)
  return min(bucket, -(-longest // granule) * granule)


def micro_batches(examples, prepared, tokens_BN: np.ndarray, mask_BN: np.ndarray,
                  prompt_groups: Sequence[np.ndarray], group_size: int, sampler: Sampler,
                  mesh) -> Iterator[tuple[SequenceBatch, np.ndarray]]:
  """Yields (SequenceBatch placed on the mesh, its row indices) for each set of prompts.

  Prompt p's ids and images always travel with rows p·G … p·G+G-1: the sampler's `prepared`
  arrays are reused only for all prompts in their own order; any other selection or order is
  re-collated.
  """
  for prompts in prompt_groups:
    prompts = np.asarray(prompts)
    if np.array_equal(prompts, np.arange(len(examples))):
      ids, mask, pixels, grids = prepared
    else:  # re-collate just these prompts (their images only), bucketed like the sampler's
      ids, mask, pixels, grids = sampler.prepare(
          collate([examples[p] for p in prompts], sampler.pad_id))
    # Drop the leading all-padding columns of the sampler's power-of-two bucket T, keeping a
    # multiple of T/16 so that at most 16 prompt widths per bucket compile.
    bucket = ids.shape[1]
    width = prompt_width(bucket, int(np.asarray(mask).sum(axis=1).max()))
    ids, mask = ids[:, bucket - width:], mask[:, bucket - width:]
    selected = rows_of(prompts, group_size)
    place = lambda a: sharding_lib.place_rows(a, mesh)
    yield SequenceBatch(place(ids), place(mask), pixels, grids, place(tokens_BN[selected]),
                        place(mask_BN[selected])), selected


def place_selected(rows, selected: np.ndarray, mesh):
  """The `selected` rows of every array in the pytree `rows`, placed on the mesh."""
  return jax.tree.map(lambda a: sharding_lib.place_rows(a[selected], mesh), rows)


def mean_metrics(collected: list[dict]) -> dict:
  keys = {k for m in collected for k in m}
  return {k: float(np.mean([float(m[k]) for m in collected if k in m])) for k in keys}


# Micro-batch metrics already normalised by the whole mini-batch (their sum is the mini-batch's
# value) or counts; the rest are per-micro-batch means, extremes take their extreme.
SUMMED_OVER_MICRO_BATCHES = ("loss", "pg_loss", "kl_loss", "entropy_loss", "sft_loss",
                             "num_tokens")
EXTREMES_OVER_MICRO_BATCHES = {"ratio_max": max, "ratio_min": min}


def minibatch_metrics(micro: list[dict]) -> dict:
  """One mini-batch's metrics from those of its micro-batches."""
  combined = mean_metrics(micro)
  for key in combined:
    values = [float(m[key]) for m in micro if key in m]
    if key in SUMMED_OVER_MICRO_BATCHES:
      combined[key] = float(sum(values))
    elif key in EXTREMES_OVER_MICRO_BATCHES:
      combined[key] = float(EXTREMES_OVER_MICRO_BATCHES[key](values))
  return combined
