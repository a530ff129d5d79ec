"""The GRPO-family policy objective: PPO-clip, dual-clip, GSPO, TIS, and the total loss with KL and
entropy terms.

Shape letters: B rows (completions), T completion tokens.

Per token, with r = π/π_old the importance ratio and A the advantage:

  ℓ = max(-A·r, -A·clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high))       (PPO, clip-higher)
  ℓ = min(ℓ, -A·clip_ratio_c)   where A < 0                              (dual-clip, as in verl)

The dual bound only matters for negative advantages. There a very large ratio would otherwise make
-A·r unbounded. For A > 0 the clipped objective is already bounded.

GSPO (arXiv 2507.18071) replaces the token ratio by the sequence's length-normalised ratio
s = exp((1/n) Σ_t log(π_t / π_old,t)):
- `loss_mode="gspo"` uses s itself, so the gradient flows through the mean of the row's log-ratios.
  This is EasyR1's "gspo".
- `loss_mode="gspo_token"` uses sg[s]·π_t/sg[π_t]. It has the same value and, with one advantage per
  row, the same gradient, and it also admits per-token advantages. This is verl's "gspo" and
  EasyR1's "gspo_token".

Truncated importance sampling (TIS) corrects for the sampler's log-probs differing from the
trainer's. Each token's loss is weighted by the detached w = min(exp(old_logprob - sampler_logprob),
tis_cap).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from metaphorstar_jax.rl import aggregation, kl
from metaphorstar_jax.rl.config import LossConfig

_DEFAULTS = LossConfig()


class ClippedLoss(NamedTuple):
  """Per-token clipped policy loss and which clip was active at each token."""

  loss_BT: jnp.ndarray
  ratio_BT: jnp.ndarray
  clipped_low_BT: jnp.ndarray  # A < 0 and r < 1 - clip_ratio_low: the floor was used
  clipped_high_BT: jnp.ndarray  # A > 0 and r > 1 + clip_ratio_high: the ceiling was used
  clipped_dual_BT: jnp.ndarray  # A < 0 and the dual bound -A·clip_ratio_c was used


def clipped_policy_loss(log_ratio_BT, advantages_BT, *, clip_ratio_low: float,
                        clip_ratio_high: float, clip_ratio_c: float | None,
                        log_ratio_clamp: float = _DEFAULTS.log_ratio_clamp) -> ClippedLoss:
  """PPO-clip with separate low/high ranges and an optional dual-clip bound, per token.

  Args:
    log_ratio_BT: log(π/π_old) per token, [B, T] (the GSPO forms pass their sequence ratios here).
    advantages_BT: [B, T].
    clip_ratio_c: dual-clip constant (> 1), applied to negative advantages only; None for none.

  Returns:
    A `ClippedLoss` of [B, T] arrays; masking and aggregation are the caller's job.
  """
  ratio_BT = jnp.exp(jnp.clip(log_ratio_BT, -log_ratio_clamp, log_ratio_clamp))
  unclipped_BT = -advantages_BT * ratio_BT
  clipped_BT = -advantages_BT * jnp.clip(ratio_BT, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
  loss_BT = jnp.maximum(unclipped_BT, clipped_BT)
  range_clipped_BT = clipped_BT > unclipped_BT
  negative_BT = advantages_BT < 0
  clipped_dual_BT = jnp.zeros_like(negative_BT)
  if clip_ratio_c is not None:
    dual_bound_BT = -advantages_BT * clip_ratio_c
    clipped_dual_BT = negative_BT & (loss_BT > dual_bound_BT)
    loss_BT = jnp.where(negative_BT, jnp.minimum(loss_BT, dual_bound_BT), loss_BT)
  return ClippedLoss(loss_BT=loss_BT, ratio_BT=ratio_BT,
                     clipped_low_BT=range_clipped_BT & negative_BT,
                     clipped_high_BT=range_clipped_BT & (advantages_BT > 0),
                     clipped_dual_BT=clipped_dual_BT)


def sequence_log_ratio(logprobs_BT, old_logprobs_BT, mask_BT):
  """GSPO's length-normalised log-ratio per row, (1/n_b) Σ_t m·(log π - log π_old), [B].

  A fully masked row gets 0.
  """
  valid_BT = mask_BT.astype(bool)
  diff_BT = jnp.where(valid_BT, logprobs_BT - old_logprobs_BT, 0.0)
  return jnp.sum(diff_BT, axis=-1) / jnp.maximum(jnp.sum(valid_BT, axis=-1), 1)


def policy_log_ratio(loss_mode: str, logprobs_BT, old_logprobs_BT, mask_BT):
  """The per-token log-ratio the clip acts on, for each `loss_mode`.

  Returns:
    [B, T]: the token log-ratio ("vanilla"); the row's sequence log-ratio on every token ("gspo");
    or sg[sequence log-ratio] + log π - sg[log π] ("gspo_token").
  """
  if loss_mode == "vanilla":
    return logprobs_BT - old_logprobs_BT
  seq_log_ratio_B = sequence_log_ratio(logprobs_BT, old_logprobs_BT, mask_BT)
  if loss_mode == "gspo":
    return jnp.broadcast_to(seq_log_ratio_B[:, None], logprobs_BT.shape)
  if loss_mode == "gspo_token":
    return (jax.lax.stop_gradient(seq_log_ratio_B)[:, None] + logprobs_BT
            - jax.lax.stop_gradient(logprobs_BT))
  raise ValueError(f"loss_mode={loss_mode!r} is not one of 'vanilla', 'gspo', 'gspo_token'.")


def tis_weights(old_logprobs_BT, sampler_logprobs_BT, mask_BT, *, cap: float):
  """Truncated importance weights min(exp(old - sampler), cap), detached; 0 on masked tokens."""
  valid_BT = mask_BT.astype(bool)
  log_w_BT = jnp.where(valid_BT, old_logprobs_BT - sampler_logprobs_BT, 0.0)
  # min(exp(x), cap) = exp(min(x, log cap)): no overflow for a huge log-ratio.
  weights_BT = jnp.exp(jnp.minimum(log_w_BT, jnp.log(cap)))
  return jax.lax.stop_gradient(jnp.where(valid_BT, weights_BT, 0.0))


def policy_loss(config: LossConfig, logprobs_BT, old_logprobs_BT, advantages_B, mask_BT,
                ref_logprobs_BT=None, entropy_BT=None, sampler_logprobs_BT=None, *,
                token_count=None, seq_count=None):
  """The total loss the trainer differentiates, and its metrics.

  loss = agg(ℓ_pg · w_tis) + kl_loss_coef · agg(kl) - entropy_coeff · agg(H), where agg is
  `config.loss_agg_mode`, the KL term is present when `use_kl_loss`, and w_tis when `tis_cap` is
  set.

  Args:
    config: the knobs; static under jit.
    logprobs_BT: log π_θ of the sampled tokens, [B, T]; the only argument gradients flow through
      (besides `entropy_BT`).
    old_logprobs_BT: log π_old, [B, T]; None means on-policy (π_old = sg[π_θ], ratio 1).
    advantages_B: [B] per-row advantages, or [B, T] per-token ones.
    mask_BT: [B, T], 1/True on completion tokens that count.
    ref_logprobs_BT: log π_ref, [B, T]; needed when `use_kl_loss`, else only logged.
    entropy_BT: per-token entropy of π_θ, [B, T] (see `logprobs.token_logprobs_and_entropy`);
      needed when `entropy_coeff` != 0, else only logged.
    sampler_logprobs_BT: log-probs the sampler reported, [B, T]; needed when `tis_cap` is set,
      else only the mismatch is logged.
    token_count, seq_count: mini-batch totals for gradient accumulation (see `aggregation`).

  Returns:
    (loss scalar, metrics: dict of float32 scalars). Masked tokens contribute nothing, and fully
    masked rows (or batches) give finite values.
  """
  f32 = jnp.float32
  valid_BT = mask_BT.astype(bool)
  if logprobs_BT.shape != mask_BT.shape or logprobs_BT.ndim != 2:
    raise ValueError(f"logprobs_BT {logprobs_BT.shape} and mask_BT {mask_BT.shape} must be the "
                     "same [B, T] shape.")
  if config.use_kl_loss and ref_logprobs_BT is None:
    raise ValueError("use_kl_loss=True needs ref_logprobs_BT (the reference policy's log-probs); "
                     "pass them, or set use_kl_loss=False.")
  if config.entropy_coeff != 0 and entropy_BT is None:
    raise ValueError(f"entropy_coeff={config.entropy_coeff} needs entropy_BT; compute it with "
                     "logprobs.token_logprobs_and_entropy, or set entropy_coeff=0.")
  if config.tis_cap is not None and sampler_logprobs_BT is None:
    raise ValueError(f"tis_cap={config.tis_cap} needs sampler_logprobs_BT (the log-probs the "
                     "sampler reported); pass them, or set tis_cap=None.")

  def clean(x_BT):
    # Padding may hold -inf or NaN; replacing it first keeps it out of values and gradients.
    return jnp.where(valid_BT, x_BT.astype(f32), 0.0)

  logprobs_BT = clean(logprobs_BT)
  if old_logprobs_BT is None:
    old_logprobs_BT = jax.lax.stop_gradient(logprobs_BT)
  old_logprobs_BT = jax.lax.stop_gradient(clean(old_logprobs_BT))
  advantages = jax.lax.stop_gradient(jnp.asarray(advantages_B, f32))
  if advantages.shape == logprobs_BT.shape[:1]:
    advantages_BT = jnp.broadcast_to(advantages[:, None], logprobs_BT.shape)
  elif advantages.shape == logprobs_BT.shape:
    advantages_BT = advantages
  else:
    raise ValueError(f"advantages must be [B] or [B, T] = {logprobs_BT.shape}; got "
                     f"{advantages.shape}.")
  advantages_BT = jnp.where(valid_BT, advantages_BT, 0.0)

  agg_kwargs = dict(norm_length=config.loss_agg_norm_length, token_count=token_count,
                    seq_count=seq_count)

  def agg(values_BT):
    return aggregation.aggregate(values_BT, valid_BT, config.loss_agg_mode, **agg_kwargs)

  log_ratio_BT = policy_log_ratio(config.loss_mode, logprobs_BT, old_logprobs_BT, valid_BT)
  clipped = clipped_policy_loss(log_ratio_BT, advantages_BT,
                                clip_ratio_low=config.clip_ratio_low,
                                clip_ratio_high=config.clip_ratio_high,
                                clip_ratio_c=config.clip_ratio_c,
                                log_ratio_clamp=config.log_ratio_clamp)
  pg_loss_BT = clipped.loss_BT
  metrics = {}
  if sampler_logprobs_BT is not None:
    sampler_logprobs_BT = jax.lax.stop_gradient(clean(sampler_logprobs_BT))
    metrics["sampler_trainer_abs_diff"] = aggregation.masked_mean(
        jnp.abs(old_logprobs_BT - sampler_logprobs_BT), valid_BT)
    if config.tis_cap is not None:
      weights_BT = tis_weights(old_logprobs_BT, sampler_logprobs_BT, valid_BT, cap=config.tis_cap)
      pg_loss_BT = pg_loss_BT * weights_BT
      metrics["tis_weight_mean"] = aggregation.masked_mean(weights_BT, valid_BT)
      metrics["tis_capped_frac"] = aggregation.masked_mean(
          old_logprobs_BT - sampler_logprobs_BT >= jnp.log(config.tis_cap), valid_BT)
  pg_loss = agg(pg_loss_BT)
  loss = pg_loss

  if ref_logprobs_BT is not None:
    ref_logprobs_BT = jax.lax.stop_gradient(clean(ref_logprobs_BT))
    kl_term, kl_BT = kl.kl_loss(config, logprobs_BT, ref_logprobs_BT, valid_BT,
                                 token_count=token_count, seq_count=seq_count)
    metrics["kl"] = aggregation.masked_mean(kl_BT, valid_BT)
    if config.use_kl_loss:
      loss = loss + config.kl_loss_coef * kl_term
      metrics["kl_loss"] = kl_term
  if entropy_BT is not None:
    entropy_BT = clean(entropy_BT)
    metrics["entropy"] = aggregation.masked_mean(entropy_BT, valid_BT)
    if config.entropy_coeff != 0:
      entropy_term = agg(entropy_BT)
      loss = loss - config.entropy_coeff * entropy_term
      metrics["entropy_loss"] = entropy_term

  # Diagnostics of the token ratio π/π_old, whatever ratio the loss clipped.
  token_log_ratio_BT = jax.lax.stop_gradient(logprobs_BT - old_logprobs_BT)
  token_ratio_BT = jnp.exp(jnp.clip(token_log_ratio_BT, -config.log_ratio_clamp,
                                    config.log_ratio_clamp))
  any_valid = jnp.any(valid_BT)
  metrics.update(
      loss=loss,
      pg_loss=pg_loss,
      pg_clipfrac=aggregation.masked_mean(clipped.clipped_low_BT | clipped.clipped_high_BT,
                                          valid_BT),
      pg_clipfrac_low=aggregation.masked_mean(clipped.clipped_low_BT, valid_BT),
      pg_clipfrac_high=aggregation.masked_mean(clipped.clipped_high_BT, valid_BT),
      pg_clipfrac_dual=aggregation.masked_mean(clipped.clipped_dual_BT, valid_BT),
      # verl's ppo_kl: the k1 estimate of KL(π_old || π_θ) on tokens sampled from π_old.
      ppo_kl=aggregation.masked_mean(-token_log_ratio_BT, valid_BT),
      # The k3 estimate of the same KL: never negative, lower variance.
      approx_kl=aggregation.masked_mean(token_ratio_BT - 1.0 - token_log_ratio_BT, valid_BT),
      ratio_mean=aggregation.masked_mean(token_ratio_BT, valid_BT),
      ratio_max=jnp.where(any_valid, jnp.max(jnp.where(valid_BT, token_ratio_BT, -jnp.inf)), 0.0),
      ratio_min=jnp.where(any_valid, jnp.min(jnp.where(valid_BT, token_ratio_BT, jnp.inf)), 0.0),
      num_tokens=jnp.sum(valid_BT).astype(f32),
  )
  return loss, metrics
