"""The optax optimizer: AdamW, warmup then constant or cosine, clipping, frozen parts, NaN guard."""

from __future__ import annotations

import re

import optax

from metaphorstar_jax import sharding as sharding_lib


def learning_rate_schedule(cfg) -> optax.Schedule:
  """Linear warmup from 0, then constant or cosine decay to `final_lr_fraction` of the peak."""
  peak, warmup, total = cfg.learning_rate, int(cfg.warmup_steps), int(cfg.total_steps)
  if cfg.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, max(1, total - warmup), alpha=cfg.final_lr_fraction)
  else:
    raise ValueError(f"Unknown learning-rate schedule {cfg.schedule!r}; use 'constant' or "
                     "'cosine'.")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def frozen_labels(params, frozen_patterns):
  """'frozen' for parameters whose path matches one of the regexes, else 'trained'."""
  import jax
  return jax.tree_util.tree_map_with_path(
      lambda path, _: ("frozen" if any(re.search(p, sharding_lib.path_to_str(path))
                                       for p in frozen_patterns) else "trained"), params)


def make_optimizer(cfg, params=None) -> optax.GradientTransformation:
  """AdamW with clipping; parameters matching `cfg.frozen` (regexes) receive no update.

  A step whose gradients hold NaN or inf leaves parameters and moments untouched and is counted
  (`optax.apply_if_finite`). After `max_consecutive_nonfinite` such steps in a row optax applies
  the next one anyway, NaN and all; `state.check_updates` stops the run before that.

  Args:
    cfg: ConfigDict with learning_rate, warmup_steps, total_steps, schedule, final_lr_fraction,
      b1, b2, eps, weight_decay, grad_clip_norm, frozen (tuple of regexes),
      max_consecutive_nonfinite.
    params: the parameter pytree, needed only when something is frozen.
  """
  chain = []
  if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  chain.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay))
  tx = optax.chain(*chain)
  frozen = tuple(cfg.frozen)
  if frozen:
    if params is None:
      raise ValueError("make_optimizer needs the parameters to freeze parts of them.")
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()},
                               frozen_labels(params, frozen))
  return optax.apply_if_finite(tx, max_consecutive_errors=cfg.max_consecutive_nonfinite)
