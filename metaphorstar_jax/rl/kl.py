"""KL to the reference policy: per-token estimators, the KL loss term, KL folded into the rewards.

Shape letters (README "Shape letters"): B rows (completions), N completion tokens.

With d = log π(y_t) - log π_ref(y_t) for the sampled token (samples from π; Schulman's note
"Approximating KL divergence"), the estimators of KL(π || π_ref) are, under verl's names:

  kl (k1)          d                       unbiased, high variance, can be negative
  abs              |d|
  mse (k2)         d² / 2                  biased, low variance; its gradient is KL's gradient
  low_var_kl (k3)  e^{-d} + d - 1          unbiased, low variance, >= 0

As in verl and EasyR1, low_var_kl clamps -d to ±`log_ratio_clamp` (20) before the exp, and clamps
the result to ±`value_clamp` (10). Inside those bounds nothing changes. Beyond them the term is flat
and gives no gradient: that happens once the reference puts about 2.6 nats more on the token than
the policy (or the policy about 11 nats more than the reference). It is verl's trade of exactness
for freedom from overflow, and we keep it so that coefficients port.

A trailing "+" (e.g. "low_var_kl+") takes the value of the named estimator and the gradient of k2,
which is the true KL gradient. This is verl's straight-through option.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metaphorstar_jax.rl import aggregation
from metaphorstar_jax.rl.config import KL_TYPES, LossConfig

_DEFAULTS = LossConfig()


def _estimate(diff_BN, kl_type, log_ratio_clamp, value_clamp):
  if kl_type in ("kl", "k1"):
    return diff_BN
  if kl_type == "abs":
    return jnp.abs(diff_BN)
  if kl_type in ("mse", "k2"):
    return 0.5 * jnp.square(diff_BN)
  if kl_type in ("low_var_kl", "k3"):
    neg_diff_BN = jnp.clip(-diff_BN, -log_ratio_clamp, log_ratio_clamp)
    value_BN = jnp.exp(neg_diff_BN) - neg_diff_BN - 1.0
    return jnp.clip(value_BN, -value_clamp, value_clamp)
  raise ValueError(f"KL estimator {kl_type!r} is not one of {list(KL_TYPES)} (optionally with a "
                   "trailing '+').")


def kl_estimate(logprobs_BN, ref_logprobs_BN, kl_type: str, *,
                log_ratio_clamp: float = _DEFAULTS.kl_log_ratio_clamp,
                value_clamp: float = _DEFAULTS.low_var_kl_clamp):
  """Per-token KL(π || π_ref) estimate from sampled-token log-probs.

  Args:
    logprobs_BN: log π of the sampled tokens, [B, N].
    ref_logprobs_BN: log π_ref of the same tokens, [B, N].
    kl_type: "kl"/"k1", "abs", "mse"/"k2", "low_var_kl"/"k3", each optionally with a trailing "+".

  Returns:
    kl_BN, float32 [B, N]; masking is the caller's job.
  """
  diff_BN = logprobs_BN.astype(jnp.float32) - ref_logprobs_BN.astype(jnp.float32)
  if kl_type.endswith("+"):
    forward_BN = _estimate(diff_BN, kl_type[:-1], log_ratio_clamp, value_clamp)
    k2_BN = 0.5 * jnp.square(diff_BN)
    return k2_BN + jax.lax.stop_gradient(forward_BN - k2_BN)
  return _estimate(diff_BN, kl_type, log_ratio_clamp, value_clamp)


def kl_loss(config: LossConfig, logprobs_BN, ref_logprobs_BN, mask_BN, *, token_count=None,
            seq_count=None):
  """The KL loss term before its coefficient, aggregated like the policy loss.

  Returns:
    (scalar loss, kl_BN [B, N] with masked tokens set to 0).
  """
  valid_BN = mask_BN.astype(bool)
  kl_BN = kl_estimate(jnp.where(valid_BN, logprobs_BN, 0.0),
                      jnp.where(valid_BN, ref_logprobs_BN, 0.0), config.kl_loss_type,
                      log_ratio_clamp=config.kl_log_ratio_clamp,
                      value_clamp=config.low_var_kl_clamp)
  kl_BN = jnp.where(valid_BN, kl_BN, 0.0)
  loss = aggregation.aggregate(kl_BN, mask_BN, config.loss_agg_mode,
                               norm_length=config.loss_agg_norm_length,
                               token_count=token_count, seq_count=seq_count)
  return loss, kl_BN


def kl_penalized_rewards(rewards_B, old_logprobs_BN, ref_logprobs_BN, mask_BN, *, kl_coef,
                         kl_penalty: str = _DEFAULTS.kl_penalty,
                         log_ratio_clamp: float = _DEFAULTS.kl_log_ratio_clamp,
                         value_clamp: float = _DEFAULTS.low_var_kl_clamp):
  """KL folded into the reward (verl `use_kl_in_reward`), for outcome-reward estimators.

  verl subtracts kl_coef·kl_t from every token's reward. GRPO and RLOO then sum the token rewards of
  a row, so the row's reward drops by kl_coef·Σ_t kl_t. The log-probs are those of the policy that
  sampled (verl uses the recomputed old log-probs) and carry no gradient.

  Args:
    rewards_B: [B] scalar rewards.
    old_logprobs_BN, ref_logprobs_BN, mask_BN: [B, N].
    kl_coef: the current coefficient (see `adaptive_kl_coef`).

  Returns:
    (penalised rewards_B [B], mean per-token KL of each row [B] for the controller and logs).
  """
  valid_BN = mask_BN.astype(bool)
  kl_BN = kl_estimate(jax.lax.stop_gradient(jnp.where(valid_BN, old_logprobs_BN, 0.0)),
                      jax.lax.stop_gradient(jnp.where(valid_BN, ref_logprobs_BN, 0.0)),
                      kl_penalty, log_ratio_clamp=log_ratio_clamp, value_clamp=value_clamp)
  kl_BN = jnp.where(valid_BN, kl_BN, 0.0)
  kl_sum_B = jnp.sum(kl_BN, axis=-1)
  kl_mean_B = kl_sum_B / jnp.maximum(jnp.sum(valid_BN, axis=-1), 1)
  return jnp.asarray(rewards_B, jnp.float32) - kl_coef * kl_sum_B, kl_mean_B


def kl_in_reward(config: LossConfig, kl_coef, rewards_B, old_logprobs_BN, ref_logprobs_BN,
                 mask_BN):
  """`kl_penalized_rewards` with `config`'s estimator when `use_kl_in_reward`, else a no-op.

  Returns:
    (rewards_B [B], per-row mean KL [B]; zeros when the penalty is off).
  """
  rewards_B = jnp.asarray(rewards_B, jnp.float32)
  if not config.use_kl_in_reward:
    return rewards_B, jnp.zeros_like(rewards_B)
  return kl_penalized_rewards(rewards_B, old_logprobs_BN, ref_logprobs_BN, mask_BN,
                              kl_coef=kl_coef, kl_penalty=config.kl_penalty,
                              log_ratio_clamp=config.kl_log_ratio_clamp,
                              value_clamp=config.low_var_kl_clamp)


def adaptive_kl_coef(kl_coef, current_kl, n_steps, *, target_kl: float = _DEFAULTS.kl_target,
                     horizon: int = _DEFAULTS.kl_horizon,
                     max_error: float = _DEFAULTS.kl_ctrl_max_error):
  """One update of the adaptive KL controller (Ziegler et al. 2019, as in verl and EasyR1).

  coef ← coef · (1 + clip(current_kl / target_kl - 1, ±max_error) · n_steps / horizon).
  `current_kl` is the batch mean of `kl_penalized_rewards`' per-row KL; `n_steps` the batch size.
  """
  error = jnp.clip(current_kl / target_kl - 1.0, -max_error, max_error)
  return kl_coef * (1.0 + error * n_steps / horizon)


def next_kl_coef(config: LossConfig, kl_coef, current_kl, n_steps):
  """The coefficient for the next step under `config.kl_ctrl_type` ("fixed" leaves it alone)."""
  if config.kl_ctrl_type == "fixed":
    return kl_coef
  return adaptive_kl_coef(kl_coef, current_kl, n_steps, target_kl=config.kl_target,
                          horizon=config.kl_horizon, max_error=config.kl_ctrl_max_error)
