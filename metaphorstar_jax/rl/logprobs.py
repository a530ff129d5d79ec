"""Sampled-token log-probs and per-token entropy from logits, computed stably in float32: the one
implementation the sampler's decode step and the trainer's scoring both call.

Shape letters (README "Shape letters"): B rows, N completion tokens, V vocabulary. Leading axes are
free: the trainer passes logits_BNV and tokens_BN, the sampler's decode step logits_BV and
tokens_B, and both run the same arithmetic (jitted, equal to the bit on the same logits:
tests/test_rl_logprobs.py).

`temperature` is a required argument on purpose. The trainer must divide the logits by the same
temperature the sampler used, or the importance ratios compare two different distributions. That is
a known cause of sampler/trainer mismatch (peers.md §8; trl#4159).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _normalised(logits_BNV, temperature: float):
  """(logits / temperature less its row maximum, log Σ_v exp of that), in float32: log softmax is
  their difference, which `jax.nn.log_softmax` forms the same way. Log-probs gather before the
  subtraction (no [..., V] result to hold); the entropy needs the whole difference."""
  scaled_BNV = logits_BNV.astype(jnp.float32) / temperature
  shifted_BNV = scaled_BNV - jax.lax.stop_gradient(jnp.max(scaled_BNV, axis=-1, keepdims=True))
  return shifted_BNV, jnp.log(jnp.sum(jnp.exp(shifted_BNV), axis=-1))


def _picked(shifted_BNV, log_norm_BN, tokens_BN):
  picked_BN = jnp.take_along_axis(shifted_BNV, tokens_BN[..., None].astype(jnp.int32),
                                  axis=-1)[..., 0]
  return picked_BN - log_norm_BN


def _entropy(shifted_BNV, log_norm_BN):
  # H = -Σ_v p_v log p_v. Where p is 0 (a -inf logit), log p is -inf; a finite stand-in keeps
  # 0·log p, and its gradient, at 0.
  logp_BNV = shifted_BNV - log_norm_BN[..., None]
  p_BNV = jnp.exp(logp_BNV)
  return -jnp.sum(p_BNV * jnp.where(p_BNV > 0, logp_BNV, 0.0), axis=-1)


def token_logprobs(logits_BNV, tokens_BN, *, temperature: float):
  """log softmax(logits / temperature)[token] over the full vocabulary, at each position.

  Args:
    logits_BNV: [..., V] logits that predict `tokens_BN` (already shifted by one).
    tokens_BN: [...] int token ids.
    temperature: the sampling temperature.

  Returns:
    logprobs_BN, float32 [...].
  """
  return _picked(*_normalised(logits_BNV, temperature), tokens_BN)


def token_logprobs_and_entropy(logits_BNV, tokens_BN, *, temperature: float):
  """`token_logprobs`, and the entropy of softmax(logits / temperature) at each position, from
  one normalisation of the logits.

  Returns:
    (logprobs_BN, entropy_BN), float32 [...]; the log-probs equal `token_logprobs`' exactly.
  """
  shifted_BNV, log_norm_BN = _normalised(logits_BNV, temperature)
  return _picked(shifted_BNV, log_norm_BN, tokens_BN), _entropy(shifted_BNV, log_norm_BN)
