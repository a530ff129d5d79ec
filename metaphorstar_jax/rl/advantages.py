"""Outcome advantages from one scalar reward per completion: GRPO, Dr.GRPO and RLOO.

Shape letters (README "Shape letters"): P prompts, G completions per prompt (group size), B rows
(P·G in the grid form).

Rewards come either as a [P, G] grid (row b of the output is prompt b // G, sample b % G) or flat as
[B] with an integer group id per row (the prompt it answers) and a static group count P. Groups
may then differ in size, e.g. after filtering. A `valid_B` mask leaves padding rows out of every
statistic; their advantage is 0. The loss broadcasts the per-row advantage over the row's tokens.

- GRPO: (r - mean_group) / (std + eps). The std is per group (`scale_rewards="group"`) or over the
  whole batch (`"batch"`, TRL). It is the unbiased ddof=1 std by default, as in verl, EasyR1 and
  TRL (torch.std's default) and Tunix (ddof=1). MetaphorStar's TFQ-GRPO is this with eps 1e-6.
- Dr.GRPO: r - mean_group, with no std (`norm_by_std=False`; verl `norm_adv_by_std_in_grpo=False`).
- RLOO: r - mean of the *other* members of the group, which is G/(G-1)·(r - mean_group).

A group of one has no baseline. Like verl, we give it mean 0 and std 1, so its advantage is its raw
reward (scaled by 1/(1+eps) in GRPO with the group std; the batch std still applies with "batch").
EasyR1 asserts G > 1 instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metaphorstar_jax.rl.config import SCALE_REWARDS, LossConfig

_DEFAULTS = LossConfig()


def flatten_groups(rewards, group_ids_B=None, num_groups=None, valid_B=None):
  """Brings per-completion values in either form to (values_B, group_ids_B, P, valid_B).

  Args:
    rewards: [P, G] grid (then row b is group b // G), or [B] with `group_ids_B` [B] ints in
      [0, num_groups) and a static `num_groups` (P).
    valid_B: optional [B] or [P, G] bool; all True when None.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim == 2:
    if group_ids_B is not None:
      raise ValueError("Rewards given as a [P, G] grid already say their groups; pass group_ids "
                       "only with flat [B] rewards.")
    num_prompts, group_size = rewards.shape
    group_ids_B = jnp.repeat(jnp.arange(num_prompts, dtype=jnp.int32), group_size)
    num_groups = num_prompts
    rewards_B = rewards.reshape(-1)
  elif rewards.ndim == 1:
    if group_ids_B is None or num_groups is None:
      raise ValueError("Flat [B] rewards need group_ids_B (which prompt each row answers) and a "
                       "static num_groups; or pass rewards as a [P, G] grid.")
    rewards_B = rewards
    group_ids_B = jnp.asarray(group_ids_B, jnp.int32)
    if group_ids_B.shape != rewards_B.shape:
      raise ValueError(f"group_ids_B has shape {group_ids_B.shape} but rewards have "
                       f"{rewards_B.shape}; give one group id per row.")
  else:
    raise ValueError(f"Rewards must be [P, G] or flat [B]; got shape {rewards.shape}.")
  if valid_B is None:
    valid_B = jnp.ones(rewards_B.shape, bool)
  else:
    valid_B = jnp.asarray(valid_B, bool).reshape(-1)
    if valid_B.shape != rewards_B.shape:
      raise ValueError(f"valid_B has {valid_B.shape[0]} entries for {rewards_B.shape[0]} rows.")
  return rewards_B, group_ids_B, num_groups, valid_B


def group_statistics(rewards, group_ids_B=None, num_groups=None, valid_B=None):
  """Per-group count, mean and sum of squared deviations of the valid rows.

  Returns:
    (count_P, mean_P, sq_dev_P), float32 [P] each. An empty group has
    count 0 and mean 0.
  """
  rewards_B, ids_B, num_groups, valid_B = flatten_groups(rewards, group_ids_B, num_groups, valid_B)
  weight_B = valid_B.astype(jnp.float32)
  count_P = jax.ops.segment_sum(weight_B, ids_B, num_segments=num_groups)
  total_P = jax.ops.segment_sum(jnp.where(valid_B, rewards_B, 0.0), ids_B, num_segments=num_groups)
  mean_P = total_P / jnp.maximum(count_P, 1.0)
  # Two passes (mean, then squared deviations) keep the variance exact for all-equal groups.
  dev_B = jnp.where(valid_B, rewards_B - mean_P[ids_B], 0.0)
  sq_dev_P = jax.ops.segment_sum(dev_B * dev_B, ids_B, num_segments=num_groups)
  return count_P, mean_P, sq_dev_P


def _std(sq_dev, count, unbiased):
  """Std from a sum of squared deviations; 1 where fewer than two samples leave it undefined."""
  ddof = 1.0 if unbiased else 0.0
  std = jnp.sqrt(sq_dev / jnp.maximum(count - ddof, 1.0))
  return jnp.where(count > 1, std, 1.0)


def grpo_advantages(rewards, group_ids_B=None, num_groups=None, valid_B=None, *,
                    norm_by_std: bool = _DEFAULTS.norm_adv_by_std_in_grpo,
                    scale_rewards: str = _DEFAULTS.scale_rewards,
                    unbiased: bool = _DEFAULTS.adv_std_unbiased,
                    eps: float = _DEFAULTS.adv_eps):
  """GRPO (norm_by_std=True) or Dr.GRPO (norm_by_std=False) advantages.

  Args:
    rewards: [P, G] grid, or [B] with `group_ids_B` [B] ints in [0, num_groups).
    valid_B: optional [B] (or [P, G]) bool; False rows are left out and get advantage 0.
    scale_rewards: "group" or "batch", where the std is taken (TRL's `scale_rewards`).

  Returns:
    advantages_B, float32 [B].
  """
  if scale_rewards not in SCALE_REWARDS:
    raise ValueError(f"scale_rewards={scale_rewards!r} is not one of {list(SCALE_REWARDS)}.")
  rewards_B, ids_B, num_groups, valid_B = flatten_groups(rewards, group_ids_B, num_groups, valid_B)
  count_P, mean_P, sq_dev_P = group_statistics(rewards_B, ids_B, num_groups, valid_B)
  count_B = count_P[ids_B]
  baseline_B = jnp.where(count_B > 1, mean_P[ids_B], 0.0)
  advantages_B = rewards_B - baseline_B
  if norm_by_std:
    if scale_rewards == "group":
      std_B = _std(sq_dev_P, count_P, unbiased)[ids_B]
    else:
      # TRL's batch scale: the std of the raw rewards of all valid rows.
      n = jnp.sum(valid_B.astype(jnp.float32))
      batch_mean = jnp.sum(jnp.where(valid_B, rewards_B, 0.0)) / jnp.maximum(n, 1.0)
      dev_B = jnp.where(valid_B, rewards_B - batch_mean, 0.0)
      std_B = _std(jnp.sum(dev_B * dev_B), n, unbiased)
    advantages_B = advantages_B / (std_B + eps)
  return jnp.where(valid_B, advantages_B, 0.0)


def rloo_advantages(rewards, group_ids_B=None, num_groups=None, valid_B=None):
  """RLOO: each reward minus the mean of the other rewards of its group.

  Returns:
    advantages_B, float32 [B]; a group of one keeps its raw reward (verl), invalid rows get 0.
  """
  rewards_B, ids_B, num_groups, valid_B = flatten_groups(rewards, group_ids_B, num_groups, valid_B)
  count_P, mean_P, _ = group_statistics(rewards_B, ids_B, num_groups, valid_B)
  count_B = count_P[ids_B]
  scale_B = count_B / jnp.maximum(count_B - 1.0, 1.0)
  advantages_B = jnp.where(count_B > 1, scale_B * (rewards_B - mean_P[ids_B]), rewards_B)
  return jnp.where(valid_B, advantages_B, 0.0)


def compute_advantages(config: LossConfig, rewards, group_ids_B=None, num_groups=None,
                       valid_B=None):
  """The advantage estimator `config.adv_estimator` names, with its knobs from `config`.

  Args:
    rewards: [P, G], or [B] with `group_ids_B` and a static `num_groups`.
    valid_B: optional bool mask of real rows.

  Returns:
    advantages_B, float32 [B].
  """
  if config.adv_estimator == "grpo":
    return grpo_advantages(rewards, group_ids_B, num_groups, valid_B,
                           norm_by_std=config.norm_adv_by_std_in_grpo,
                           scale_rewards=config.scale_rewards,
                           unbiased=config.adv_std_unbiased, eps=config.adv_eps)
  if config.adv_estimator == "rloo":
    return rloo_advantages(rewards, group_ids_B, num_groups, valid_B)
  raise ValueError(f"adv_estimator={config.adv_estimator!r} has no implementation here.")
