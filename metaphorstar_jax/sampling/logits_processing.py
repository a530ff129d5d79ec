"""Turning next-token logits into a sampled token (its log-probability is `rl.token_logprobs`,
the trainer's).

Shape letters (README "Shape letters"): B rows, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf


def ban_tokens(logits_BV, banned_ids: tuple[int, ...]):
  """Sets the logits of `banned_ids` to -inf so they can never be drawn."""
  if not banned_ids:
    return logits_BV
  return logits_BV.at[:, jnp.asarray(banned_ids)].set(_NEG_INF)


def top_k_filter(logits_BV, k: int):
  """Keeps the k largest logits of each row (ties with the k-th kept); k <= 0 keeps all."""
  if k <= 0 or k >= logits_BV.shape[-1]:
    return logits_BV
  kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
  return jnp.where(logits_BV < kth_B1, _NEG_INF, logits_BV)


def top_p_filter(logits_BV, p: float):
  """Nucleus filter: keeps the smallest set of top tokens whose probability reaches `p`.

  A token is kept when the probability mass strictly above it is below p, so the most likely
  token always survives.
  """
  if p >= 1.0:
    return logits_BV
  sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  mass_above_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  kept_BV = mass_above_BV < p
  threshold_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BV < threshold_B1, _NEG_INF, logits_BV)


def first_max_index(x_BV):
  """jnp.argmax over the last axis (the first maximum; the first NaN if any), as int32.

  Written as single-operand reductions: XLA CPU runs argmax's (value, index) reduction
  unvectorised, several times slower over a vocabulary-wide row.
  """
  V = x_BV.shape[-1]
  index_V = jnp.arange(V, dtype=jnp.int32)
  is_nan_BV = jnp.isnan(x_BV)
  is_max_BV = (x_BV == jnp.max(x_BV, axis=-1, keepdims=True)) | is_nan_BV
  return jnp.min(jnp.where(is_max_BV, index_V, V), axis=-1)


def next_tokens(key, logits_BV, *, greedy: bool, temperature: float, top_k: int, top_p: float,
                banned_ids: tuple[int, ...] = ()):
  """Draws one token per row: temperature, then top-k, then top-p, as transformers orders them.

  Returns:
    tokens_B, int32.
  """
  allowed_BV = ban_tokens(logits_BV.astype(jnp.float32), banned_ids)
  if greedy:
    return first_max_index(allowed_BV)
  filtered_BV = top_p_filter(top_k_filter(allowed_BV / temperature, top_k), top_p)
  # The Gumbel-max draw of jax.random.categorical, with its argmax made cheaper: same tokens.
  gumbel_BV = jax.random.gumbel(key, filtered_BV.shape, filtered_BV.dtype)
  return first_max_index(gumbel_BV + filtered_BV)
