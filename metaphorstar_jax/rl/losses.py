"""The GRPO-family policy objective: PPO-clip, dual-clip, GSPO, TIS, and the total loss with KL and
entropy terms.

Shape letters (README "Shape letters"): B rows (completions), N completion tokens.

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

  loss_BN: jnp.ndarray
  ratio_BN: jnp.ndarray
  clipped_low_BN: jnp.ndarray  # A < 0 and r < 1 - clip_ratio_low: the floor was used
  clipped_high_BN: jnp.ndarray  # A > 0 and r > 1 + clip_ratio_high: the ceiling was used
  clipped_dual_BN: jnp.ndarray  # A < 0 and the dual bound -A·clip_ratio_c was used


def clipped_policy_loss(log_ratio_BN, advantages_BN, *, clip_ratio_low: float,
                        clip_ratio_high: float, clip_ratio_c: float | None,
                        log_ratio_clamp: float = _DEFAULTS.log_ratio_clamp) -> ClippedLoss:
  """PPO-clip with separate low/high ranges and an optional dual-clip bound, per token.

  Args:
    log_ratio_BN: log(π/π_old) per token, [B, N] (the GSPO forms pass their sequence ratios here).
    advantages_BN: [B, N].
    clip_ratio_c: dual-clip constant (> 1), applied to negative advantages only; None for none.

  Returns:
    A `ClippedLoss` of [B, N] arrays; masking and aggregation are the caller's job.
  """
  ratio_BN = jnp.exp(jnp.clip(log_ratio_BN, -log_ratio_clamp, log_ratio_clamp))
  unclipped_BN = -advantages_BN * ratio_BN
  clipped_BN = -advantages_BN * jnp.clip(ratio_BN, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
  loss_BN = jnp.maximum(unclipped_BN, clipped_BN)
  range_clipped_BN = clipped_BN > unclipped_BN
  negative_BN = advantages_BN < 0
  clipped_dual_BN = jnp.zeros_like(negative_BN)
  if clip_ratio_c is not None:
    dual_bound_BN = -advantages_BN * clip_ratio_c
    clipped_dual_BN = negative_BN & (loss_BN > dual_bound_BN)
    loss_BN = jnp.where(negative_BN, jnp.minimum(loss_BN, dual_bound_BN), loss_BN)
  return ClippedLoss(loss_BN=loss_BN, ratio_BN=ratio_BN,
                     clipped_low_BN=range_clipped_BN & negative_BN,
                     clipped_high_BN=range_clipped_BN & (advantages_BN > 0),
                     clipped_dual_BN=clipped_dual_BN)


def sequence_log_ratio(logprobs_BN, old_logprobs_BN, mask_BN):
  """GSPO's length-normalised log-ratio per row, (1/n_b) Σ_t m·(log π - log π_old), [B].

  A fully masked row gets 0.
  """
  valid_BN = mask_BN.astype(bool)
  diff_BN = jnp.where(valid_BN, logprobs_BN - old_logprobs_BN, 0.0)
  return jnp.sum(diff_BN, axis=-1) / jnp.maximum(jnp.sum(valid_BN, axis=-1), 1)


def policy_log_ratio(loss_mode: str, logprobs_BN, old_logprobs_BN, mask_BN):
  """The per-token log-ratio the clip acts on, for each `loss_mode`.

  Returns:
    [B, N]: the token log-ratio ("vanilla"); the row's sequence log-ratio on every token ("gspo");
    or sg[sequence log-ratio] + log π - sg[log π] ("gspo_token").
  """
  if loss_mode == "vanilla":
    return logprobs_BN - old_logprobs_BN
  seq_log_ratio_B = sequence_log_ratio(logprobs_BN, old_logprobs_BN, mask_BN)
  if loss_mode == "gspo":
    return jnp.broadcast_to(seq_log_ratio_B[:, None], logprobs_BN.shape)
  if loss_mode == "gspo_token":
    return (jax.lax.stop_gradient(seq_log_ratio_B)[:, None] + logprobs_BN
            - jax.lax.stop_gradient(logprobs_BN))
  raise ValueError(f"loss_mode={loss_mode!r} is not one of 'vanilla', 'gspo', 'gspo_token'.")


def tis_weights(old_logprobs_BN, sampler_logprobs_BN, mask_BN, *, cap: float):
  """Truncated importance weights min(exp(old - sampler), cap), detached; 0 on masked tokens."""
  valid_BN = mask_BN.astype(bool)
  log_w_BN = jnp.where(valid_BN, old_logprobs_BN - sampler_logprobs_BN, 0.0)
  # min(exp(x), cap) = exp(min(x, log cap)): no overflow for a huge log-ratio.
  weights_BN = jnp.exp(jnp.minimum(log_w_BN, jnp.log(cap)))
  return jax.lax.stop_gradient(jnp.where(valid_BN, weights_BN, 0.0))


def policy_loss(config: LossConfig, logprobs_BN, old_logprobs_BN, advantages_B, mask_BN,
                ref_logprobs_BN=None, entropy_BN=None, sampler_logprobs_BN=None, *,
                token_count=None, seq_count=None):
  """The total loss the trainer differentiates, and its metrics.

  loss = agg(ℓ_pg · w_tis) + kl_loss_coef · agg(kl) - entropy_coeff · agg(H), where agg is
  `config.loss_agg_mode`, the KL term is present when `use_kl_loss`, and w_tis when `tis_cap` is
  set.

  Args:
    config: the knobs; static under jit.
    logprobs_BN: log π_θ of the sampled tokens, [B, N]; the only argument gradients flow through
      (besides `entropy_BN`).
    old_logprobs_BN: log π_old, [B, N]; None means on-policy (π_old = sg[π_θ], ratio 1).
    advantages_B: [B] per-row advantages, or [B, N] per-token ones.
    mask_BN: [B, N], 1/True on completion tokens that count.
    ref_logprobs_BN: log π_ref, [B, N]; needed when `use_kl_loss`, else only logged.
    entropy_BN: per-token entropy of π_θ, [B, N] (see `logprobs.token_logprobs_and_entropy`);
      needed when `entropy_coeff` != 0, else only logged.
    sampler_logprobs_BN: log-probs the sampler reported, [B, N]; needed when `tis_cap` is set,
      else only the mismatch is logged.
    token_count, seq_count: mini-batch totals for gradient accumulation (see `aggregation`).

  Returns:
    (loss scalar, metrics: dict of float32 scalars). Masked tokens contribute nothing, and fully
    masked rows (or batches) give finite values.
  """
  f32 = jnp.float32
  valid_BN = mask_BN.astype(bool)
  if logprobs_BN.shape != mask_BN.shape or logprobs_BN.ndim != 2:
    raise ValueError(f"logprobs_BN {logprobs_BN.shape} and mask_BN {mask_BN.shape} must be the "
                     "same [B, N] shape.")
  if config.use_kl_loss and ref_logprobs_BN is None:
    raise ValueError("use_kl_loss=True needs ref_logprobs_BN (the reference policy's log-probs); "
                     "pass them, or set use_kl_loss=False.")
  if config.entropy_coeff != 0 and entropy_BN is None:
    raise ValueError(f"entropy_coeff={config.entropy_coeff} needs entropy_BN; compute it with "
                     "logprobs.token_logprobs_and_entropy, or set entropy_coeff=0.")
  if config.tis_cap is not None and sampler_logprobs_BN is None:
    raise ValueError(f"tis_cap={config.tis_cap} needs sampler_logprobs_BN (the log-probs the "
                     "sampler reported); pass them, or set tis_cap=None.")

  def clean(x_BN):
    # Padding may hold -inf or NaN; replacing it first keeps it out of values and gradients.
    return jnp.where(valid_BN, x_BN.astype(f32), 0.0)

  logprobs_BN = clean(logprobs_BN)
  if old_logprobs_BN is None:
    old_logprobs_BN = jax.lax.stop_gradient(logprobs_BN)
  old_logprobs_BN = jax.lax.stop_gradient(clean(old_logprobs_BN))
  advantages = jax.lax.stop_gradient(jnp.asarray(advantages_B, f32))
  if advantages.shape == logprobs_BN.shape[:1]:
    advantages_BN = jnp.broadcast_to(advantages[:, None], logprobs_BN.shape)
  elif advantages.shape == logprobs_BN.shape:
    advantages_BN = advantages
  else:
    raise ValueError(f"advantages must be [B] or [B, N] = {logprobs_BN.shape}; got "
                     f"{advantages.shape}.")
  advantages_BN = jnp.where(valid_BN, advantages_BN, 0.0)

  agg_kwargs = dict(norm_length=config.loss_agg_norm_length, token_count=token_count,
                    seq_count=seq_count)

  def agg(values_BN):
    return aggregation.aggregate(values_BN, valid_BN, config.loss_agg_mode, **agg_kwargs)

  log_ratio_BN = policy_log_ratio(config.loss_mode, logprobs_BN, old_logprobs_BN, valid_BN)
  clipped = clipped_policy_loss(log_ratio_BN, advantages_BN,
                                clip_ratio_low=config.clip_ratio_low,
                                clip_ratio_high=config.clip_ratio_high,
                                clip_ratio_c=config.clip_ratio_c,
                                log_ratio_clamp=config.log_ratio_clamp)
  pg_loss_BN = clipped.loss_BN
  metrics = {}
  if sampler_logprobs_BN is not None:
    sampler_logprobs_BN = jax.lax.stop_gradient(clean(sampler_logprobs_BN))
    metrics["sampler_trainer_abs_diff"] = aggregation.masked_mean(
        jnp.abs(old_logprobs_BN - sampler_logprobs_BN), valid_BN)
    if config.tis_cap is not None:
      weights_BN = tis_weights(old_logprobs_BN, sampler_logprobs_BN, valid_BN, cap=config.tis_cap)
      pg_loss_BN = pg_loss_BN * weights_BN
      metrics["tis_weight_mean"] = aggregation.masked_mean(weights_BN, valid_BN)
      metrics["tis_capped_frac"] = aggregation.masked_mean(
          old_logprobs_BN - sampler_logprobs_BN >= jnp.log(config.tis_cap), valid_BN)
  pg_loss = agg(pg_loss_BN)
  loss = pg_loss

  if ref_logprobs_BN is not None:
    ref_logprobs_BN = jax.lax.stop_gradient(clean(ref_logprobs_BN))
    kl_term, kl_BN = kl.kl_loss(config, logprobs_BN, ref_logprobs_BN, valid_BN,
                                 token_count=token_count, seq_count=seq_count)
    metrics["kl"] = aggregation.masked_mean(kl_BN, valid_BN)
    if config.use_kl_loss:
      loss = loss + config.kl_loss_coef * kl_term
      metrics["kl_loss"] = kl_term
  if entropy_BN is not None:
    entropy_BN = clean(entropy_BN)
    metrics["entropy"] = aggregation.masked_mean(entropy_BN, valid_BN)
    if config.entropy_coeff != 0:
      entropy_term = agg(entropy_BN)
      loss = loss - config.entropy_coeff * entropy_term
      metrics["entropy_loss"] = entropy_term

  # Diagnostics of the token ratio π/π_old, whatever ratio the loss clipped.
  token_log_ratio_BN = jax.lax.stop_gradient(logprobs_BN - old_logprobs_BN)
  token_ratio_BN = jnp.exp(jnp.clip(token_log_ratio_BN, -config.log_ratio_clamp,
                                    config.log_ratio_clamp))
  any_valid = jnp.any(valid_BN)
  metrics.update(
      loss=loss,
      pg_loss=pg_loss,
      pg_clipfrac=aggregation.masked_mean(clipped.clipped_low_BN | clipped.clipped_high_BN,
                                          valid_BN),
      pg_clipfrac_low=aggregation.masked_mean(clipped.clipped_low_BN, valid_BN),
      pg_clipfrac_high=aggregation.masked_mean(clipped.clipped_high_BN, valid_BN),
      pg_clipfrac_dual=aggregation.masked_mean(clipped.clipped_dual_BN, valid_BN),
      # verl's ppo_kl: the k1 estimate of KL(π_old || π_θ) on tokens sampled from π_old.
      ppo_kl=aggregation.masked_mean(-token_log_ratio_BN, valid_BN),
      # The k3 estimate of the same KL: never negative, lower variance.
      approx_kl=aggregation.masked_mean(token_ratio_BN - 1.0 - token_log_ratio_BN, valid_BN),
      ratio_mean=aggregation.masked_mean(token_ratio_BN, valid_BN),
      ratio_max=jnp.where(any_valid, jnp.max(jnp.where(valid_BN, token_ratio_BN, -jnp.inf)), 0.0),
      ratio_min=jnp.where(any_valid, jnp.min(jnp.where(valid_BN, token_ratio_BN, jnp.inf)), 0.0),
      num_tokens=jnp.sum(valid_BN).astype(f32),
  )
  return loss, metrics
