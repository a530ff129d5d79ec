"""DAPO's data-side pieces: dynamic sampling, the soft overlong penalty, overlong filtering.

Shape letters (README "Shape letters"): P prompts (one group each), G group size, B rows,
N completion tokens.

DAPO (arXiv 2503.14476) has four techniques, the last of which (overlong reward shaping) comes in
two forms. Each piece is its own knob here, so a "dapo" run says what it turned on (peers.md §8,
verl#3200):
- clip-higher: `clip_ratio_high` > `clip_ratio_low` (losses).
- token-level loss: `loss_agg_mode="token-mean"` (aggregation).
- dynamic sampling: `filter_groups` and `max_num_gen_batches`, via `filter_groups_mask`,
  `dynamic_sampling_decision` below.
- soft overlong punishment: `overlong_buffer*`, via `overlong_penalty`, counted in tokens.
- overlong filtering: `mask_truncated_completions`, via `mask_truncated`. The DAPO recipe leaves it
  off.

The draw-more loop is the trainer's, since it calls the sampler. This module gives it pure
decisions.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from metaphorstar_jax.rl.advantages import flatten_groups
from metaphorstar_jax.rl.config import LossConfig, RolloutConfig


def filter_groups_mask(values, group_ids_B=None, num_groups=None, valid_B=None):
  """Which groups dynamic sampling keeps: those whose values are not all equal.

  Equality is exact (max > min), so float round-off cannot keep a group whose rewards are equal.
  verl tests std > 0, which agrees up to that round-off. As in verl, a group of one valid row is
  kept. A group with no valid row is not.

  Args:
    values: the filter metric (verl `filter_groups.metric`, e.g. accuracy), [P, G], or [B] with
      `group_ids_B` and a static `num_groups`.
    valid_B: optional bool mask of real rows.

  Returns:
    (keep_P bool [P], keep_B bool [B]): per group, and broadcast to its rows (False on invalid
    rows).
  """
  values_B, ids_B, num_groups, valid_B = flatten_groups(values, group_ids_B, num_groups, valid_B)
  high_P = jax.ops.segment_max(jnp.where(valid_B, values_B, -jnp.inf), ids_B,
                               num_segments=num_groups)
  low_P = jax.ops.segment_min(jnp.where(valid_B, values_B, jnp.inf), ids_B,
                              num_segments=num_groups)
  count_P = jax.ops.segment_sum(valid_B.astype(jnp.int32), ids_B, num_segments=num_groups)
  keep_P = (count_P == 1) | ((count_P > 1) & (high_P > low_P))
  return keep_P, keep_P[ids_B] & valid_B


class DrawDecision(NamedTuple):
  """What the trainer should do after a generation batch of a dynamic-sampling step."""

  draw_more: bool  # too few groups kept and the bound allows another generation batch
  exhausted: bool  # too few groups kept and the bound is reached: stop and report `message`
  message: str  # for the user when exhausted, else ""


def dynamic_sampling_decision(num_kept: int, num_wanted: int, num_gen_batches: int,
                              max_num_gen_batches: int) -> DrawDecision:
  """Whether to draw another generation batch (host-side; the counts are Python ints).

  Args:
    num_kept: groups kept so far this step, summed over its generation batches.
    num_wanted: groups the update needs (verl `data.train_batch_size`).
    num_gen_batches: generation batches drawn so far this step (>= 1).
    max_num_gen_batches: the bound; 0 means none (verl's convention).
  """
  if num_kept >= num_wanted:
    return DrawDecision(draw_more=False, exhausted=False, message="")
  if max_num_gen_batches <= 0 or num_gen_batches < max_num_gen_batches:
    return DrawDecision(draw_more=True, exhausted=False, message="")
  return DrawDecision(
      draw_more=False, exhausted=True,
      message=(f"Dynamic sampling kept {num_kept} of the {num_wanted} groups it needs after "
               f"{num_gen_batches} generation batches (max_num_gen_batches="
               f"{max_num_gen_batches}): most prompts give every sample the same reward. Raise "
               "max_num_gen_batches (0 removes the bound), draw bigger generation batches, or "
               "check the reward function and the data's difficulty."))


def overlong_penalty(lengths_B, *, max_response_length: int, overlong_buffer_len: int,
                     penalty_factor: float):
  """DAPO's soft overlong punishment, in tokens, to add to the rewards.

  0 up to max_response_length - overlong_buffer_len tokens, then falling linearly to
  -penalty_factor at max_response_length, and held there for anything longer. verl's reward
  manager has the same ramp; the paper's -1 for longer outputs corresponds to the hold.

  Args:
    lengths_B: [B] completion lengths in tokens.

  Returns:
    penalties_B, float32 [B], each in [-penalty_factor, 0].
  """
  if not 0 < overlong_buffer_len < max_response_length:
    raise ValueError(f"overlong_buffer_len={overlong_buffer_len} must lie in (0, "
                     f"max_response_length={max_response_length}); the penalty ramps over the last "
                     "overlong_buffer_len tokens of the budget.")
  expected_length = max_response_length - overlong_buffer_len
  excess_B = jnp.asarray(lengths_B, jnp.float32) - expected_length
  penalties_B = -excess_B / overlong_buffer_len * penalty_factor
  return jnp.clip(penalties_B, -penalty_factor, 0.0)


def mask_truncated(mask_BN, truncated_B):
  """Overlong filtering: a completion cut off by the length budget drops out of the loss.

  Args:
    mask_BN: [B, N] completion mask.
    truncated_B: [B] bool, True where the sampler stopped on the budget, not on EOS.

  Returns:
    mask_BN with truncated rows zeroed, same dtype.
  """
  keep_B1 = ~jnp.asarray(truncated_B, bool)[:, None]
  return jnp.where(keep_B1, mask_BN, jnp.zeros_like(mask_BN))


def shape_rewards(config: LossConfig, rollout: RolloutConfig, rewards_B, lengths_B):
  """Adds the overlong penalty when `config.overlong_buffer` is on; rewards unchanged otherwise.

  Returns:
    rewards_B float32 [B].
  """
  rewards_B = jnp.asarray(rewards_B, jnp.float32)
  if not config.overlong_buffer:
    return rewards_B
  return rewards_B + overlong_penalty(lengths_B, max_response_length=rollout.max_response_length,
                                      overlong_buffer_len=config.overlong_buffer_len,
                                      penalty_factor=config.overlong_penalty_factor)


def loss_mask(config: LossConfig, mask_BN, truncated_B):
  """The completion mask with truncated rows dropped when `config.mask_truncated_completions`."""
  if not config.mask_truncated_completions:
    return mask_BN
  return mask_truncated(mask_BN, truncated_B)
