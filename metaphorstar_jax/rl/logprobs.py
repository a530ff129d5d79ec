"""Sampled-token log-probs and per-token entropy from logits, computed stably in float32.

Shape letters: B rows, T completion tokens, V vocabulary.

`temperature` is a required argument on purpose. The trainer must divide the logits by the same
temperature the sampler used, or the importance ratios compare two different distributions. That is
a known cause of sampler/trainer mismatch (peers.md §8; trl#4159).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_BTV, tokens_BT, *, temperature: float):
  """log softmax(logits / temperature)[token] for each position.

  Args:
    logits_BTV: [B, T, V] logits that predict the completion tokens (already shifted by one).
    tokens_BT: [B, T] int token ids.
    temperature: the sampling temperature.

  Returns:
    logprobs_BT, float32 [B, T].
  """
  scaled_BTV = logits_BTV.astype(jnp.float32) / temperature
  log_norm_BT = jax.nn.logsumexp(scaled_BTV, axis=-1)
  picked_BT = jnp.take_along_axis(scaled_BTV, tokens_BT[..., None].astype(jnp.int32),
                                  axis=-1)[..., 0]
  return picked_BT - log_norm_BT


def entropy_from_logits(logits_BTV, *, temperature: float):
  """Entropy of softmax(logits / temperature) at each position.

  H = -Σ_v p_v log p_v, with the p·log p of a zero-probability entry (e.g. a -inf logit from a
  top-k/top-p mask) taken as 0 in both the value and its gradient.

  Returns:
    entropy_BT, float32 [B, T].
  """
  scaled_BTV = logits_BTV.astype(jnp.float32) / temperature
  logp_BTV = jax.nn.log_softmax(scaled_BTV, axis=-1)
  p_BTV = jnp.exp(logp_BTV)
  # Where p is 0, log p may be -inf; a finite stand-in keeps 0·log p (and its gradient) at 0.
  safe_logp_BTV = jnp.where(p_BTV > 0, logp_BTV, 0.0)
  return -jnp.sum(p_BTV * safe_logp_BTV, axis=-1)
