"""DAPO's dynamic sampling: keep only the groups whose rewards differ, drawing more prompts until
a step has enough of them (verl `algorithm.filter_groups`)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from metaphorstar_jax import rl
from metaphorstar_jax.data.pipeline import collate
from metaphorstar_jax.sampling import Sampler
from metaphorstar_jax.training.batching import rows_of
from metaphorstar_jax.training.objective import Objective
from metaphorstar_jax.training.rollout import ScoredGroups


def filter_metric(loss_cfg: rl.LossConfig, groups: ScoredGroups) -> np.ndarray:
  """The per-row value dynamic sampling tests for equality within a group (verl's names)."""
  name = loss_cfg.filter_groups_metric
  if name == "acc":
    return np.asarray([s.get("accuracy", s["overall"]) for s in groups.scores], np.float32)
  if name in ("seq_reward", "score"):
    return groups.rewards_B
  if name == "seq_final_reward":
    return groups.shaped_B
  raise ValueError(f"filter_groups_metric={name!r}: use 'acc', 'score', 'seq_reward' or "
                   "'seq_final_reward'.")


def keep_groups(parts: list[tuple[ScoredGroups, np.ndarray]], G: int,
                sampler: Sampler) -> ScoredGroups:
  """The kept prompts of several draws, in draw order, as one ScoredGroups."""
  picked = [(g, np.flatnonzero(keep)) for g, keep in parts]
  examples = [g.examples[p] for g, kept in picked for p in kept]
  join = lambda *arrays: np.concatenate(arrays)
  taken = [(g, rows_of(kept, G)) for g, kept in picked]
  return ScoredGroups(
      records=[g.records[p] for g, kept in picked for p in kept], examples=examples,
      prepared=sampler.prepare(collate(examples, sampler.pad_id)),
      rows=jax.tree.map(join, *[g.rows.take(rows) for g, rows in taken]),
      rewards_B=join(*[g.rewards_B[rows] for g, rows in taken]),
      shaped_B=join(*[g.shaped_B[rows] for g, rows in taken]),
      scores=[g.scores[r] for g, rows in taken for r in rows])


def dynamic_sampling(first: ScoredGroups, draw: Callable[[int], ScoredGroups | None],
                     objective: Objective, sampler: Sampler, multiple: int = 1,
                     wanted: int | None = None) -> tuple[ScoredGroups | None, dict]:
  """Keeps groups whose rewards differ, drawing more batches (`draw(i)` gives the i-th extra
  draw, or None when the data ran out) until `wanted` groups (default: as many as the first draw
  has prompts) are kept or `max_num_gen_batches` is reached. Returns (groups, metrics); when the
  bound is reached with fewer groups, the update uses those, down to a multiple of `multiple`
  (the mini-batch and micro-batch split), with a warning; none at all gives None (skip the
  update)."""
  loss_cfg, G = objective.loss, objective.group_size
  wanted = first.num_prompts if wanted is None else wanted
  parts, kept, drawn, draws = [], 0, 0, 0
  groups = first
  while groups is not None:
    draws += 1
    keep_P, _ = rl.filter_groups_mask(jnp.asarray(filter_metric(loss_cfg, groups)).reshape(-1, G))
    keep_P = np.array(keep_P)  # writable: the tail may be trimmed below
    keep_P &= np.cumsum(keep_P) <= wanted - kept  # verl keeps the first train_batch_size groups
    parts.append((groups, keep_P))
    kept, drawn = kept + int(keep_P.sum()), drawn + len(keep_P)
    decision = rl.dynamic_sampling_decision(kept, wanted, draws, loss_cfg.max_num_gen_batches)
    if decision.exhausted:
      logging.warning(decision.message)
    groups = draw(draws) if decision.draw_more else None
  surplus = kept % multiple
  for _, keep_P in reversed(parts):  # drop the last kept groups that do not split evenly
    for p in np.flatnonzero(keep_P)[::-1]:
      if surplus:
        keep_P[p], surplus, kept = False, surplus - 1, kept - 1
  metrics = {"dynamic_sampling/gen_batches": draws, "dynamic_sampling/kept_groups": kept,
             "dynamic_sampling/kept_frac": kept / max(drawn, 1)}
  if len(parts) == 1 and parts[0][1].all():
    return first, metrics
  return (keep_groups(parts, G, sampler) if kept else None), metrics
