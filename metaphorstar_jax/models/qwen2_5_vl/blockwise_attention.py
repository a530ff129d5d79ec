"""Softmax attention over key blocks with an online softmax: no (T × S) score matrix is stored.

The forward pass takes the queries `block` at a time and walks the keys `block` at a time,
keeping a running max, sum and weighted value sum per query (the flash-attention recurrence); it
returns the output and each query's log-sum-exp. The backward pass recomputes each block's
probabilities from that log-sum-exp, so neither pass keeps more than one (block × block) block of
scores per head. Because the log-sum-exp is an output (with its own gradient), attention over
keys held in two places (a group's shared prompt and each row's own completion) is two calls
combined exactly by `merge`.

Shape letters: B rows, T queries, S keys, K kv heads, G query heads per kv head, N = K·G, H head
dim, I query blocks of Q queries, J key blocks of L keys. Logits, softmax statistics and
accumulators are fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# A row that sees no key at all gets this log-sum-exp (not -inf, which would make merging two
# empty partial results NaN) and a zero output.
EMPTY_LSE = jnp.finfo(jnp.float32).min


def _key_blocks(k_BKSH, v_BKSH, block: int):
  """Keys and values padded to whole blocks and stacked block-major: (J, B, K, L, H) each."""
  B, K, S, H = k_BKSH.shape
  J = -(-S // block)
  pad = ((0, 0), (0, 0), (0, J * block - S), (0, 0))
  to_blocks = lambda a_BKSH: jnp.moveaxis(jnp.pad(a_BKSH, pad).reshape(B, K, J, block, H), 2, 0)
  return to_blocks(k_BKSH), to_blocks(v_BKSH)


def _query_blocks(q_BTNH, mask_BTS, num_kv_heads: int, block: int):
  """Queries heads-major and padded to whole blocks, (I, B, K, G, Q, H), with the mask's matching
  query blocks (I, B, Q, S), or (1, B, 1, S) when it broadcasts over queries."""
  B, T, N, H = q_BTNH.shape
  Q = min(block, T)
  I = -(-T // Q)
  pad = I * Q - T
  q_BTNH = jnp.pad(q_BTNH, ((0, 0), (0, pad), (0, 0), (0, 0)))
  q_IBKGQH = jnp.transpose(q_BTNH.reshape(B, I, Q, num_kv_heads, N // num_kv_heads, H),
                           (1, 0, 3, 4, 2, 5))
  if mask_BTS.shape[1] == 1:
    return q_IBKGQH, mask_BTS[None]
  mask_BTS = jnp.pad(mask_BTS, ((0, 0), (0, pad), (0, 0)))
  return q_IBKGQH, jnp.moveaxis(mask_BTS.reshape(B, I, Q, -1), 1, 0)


def _from_query_blocks(a_IBKGQ_, T: int):
  """(I, B, K, G, Q, ...) -> (B, T, K·G, ...), dropping the padding queries."""
  I, B, K, G, Q = a_IBKGQ_.shape[:5]
  a_BIQKG_ = jnp.moveaxis(a_IBKGQ_, (2, 3), (3, 4)).swapaxes(0, 1)
  return a_BIQKG_.reshape(B, I * Q, K * G, *a_IBKGQ_.shape[5:])[:, :T]


def _scores(q_BKGQH, k_BKLH, mask_BQL):
  """Scaled fp32 scores of one query block against one key block, EMPTY_LSE where masked."""
  s_BKGQL = jnp.einsum("bkgqh,bklh->bkgql", q_BKGQH, k_BKLH,
                       preferred_element_type=jnp.float32) * (q_BKGQH.shape[-1] ** -0.5)
  return jnp.where(mask_BQL[:, None, None], s_BKGQL, EMPTY_LSE)


def _one_query_block(q_BKGQH, k_JBKLH, v_JBKLH, mask_JBQL):
  """The online softmax of one query block over every key block: (out_BKGQH, lse_BKGQ)."""
  B, K, G, Q, H = q_BKGQH.shape

  def step(carry, blocks):
    max_BKGQ, sum_BKGQ, acc_BKGQH = carry
    k_BKLH, v_BKLH, mask_BQL = blocks
    s_BKGQL = _scores(q_BKGQH, k_BKLH, mask_BQL)
    new_max_BKGQ = jnp.maximum(max_BKGQ, s_BKGQL.max(axis=-1))
    p_BKGQL = jnp.where(mask_BQL[:, None, None], jnp.exp(s_BKGQL - new_max_BKGQ[..., None]), 0.0)
    rescale_BKGQ = jnp.exp(max_BKGQ - new_max_BKGQ)
    sum_BKGQ = sum_BKGQ * rescale_BKGQ + p_BKGQL.sum(axis=-1)
    acc_BKGQH = acc_BKGQH * rescale_BKGQ[..., None] + jnp.einsum(
        "bkgql,bklh->bkgqh", p_BKGQL.astype(v_BKLH.dtype), v_BKLH,
        preferred_element_type=jnp.float32)
    return (new_max_BKGQ, sum_BKGQ, acc_BKGQH), None

  init = (jnp.full((B, K, G, Q), EMPTY_LSE, jnp.float32), jnp.zeros((B, K, G, Q), jnp.float32),
          jnp.zeros((B, K, G, Q, H), jnp.float32))
  (max_BKGQ, sum_BKGQ, acc_BKGQH), _ = jax.lax.scan(step, init, (k_JBKLH, v_JBKLH, mask_JBQL))
  seen_BKGQ = sum_BKGQ > 0
  safe_sum_BKGQ = jnp.where(seen_BKGQ, sum_BKGQ, 1.0)
  lse_BKGQ = jnp.where(seen_BKGQ, max_BKGQ + jnp.log(safe_sum_BKGQ), EMPTY_LSE)
  return acc_BKGQH / safe_sum_BKGQ[..., None], lse_BKGQ


def _mask_of_block(mask_IBQS, i, block: int):
  """Query block i's mask, split into key blocks: (J, B, Q, L)."""
  mask_BQS = mask_IBQS[i] if mask_IBQS.shape[0] > 1 else mask_IBQS[0]
  S = mask_BQS.shape[-1]
  J = -(-S // block)
  mask_BQS = jnp.pad(mask_BQS, ((0, 0), (0, 0), (0, J * block - S)))
  return jnp.moveaxis(mask_BQS.reshape(*mask_BQS.shape[:2], J, block), 2, 0)


def _forward(q_BTNH, k_BKSH, v_BKSH, mask_BTS, block: int):
  T = q_BTNH.shape[1]
  K = k_BKSH.shape[1]
  q_IBKGQH, mask_IBQS = _query_blocks(q_BTNH, mask_BTS, K, block)
  k_JBKLH, v_JBKLH = _key_blocks(k_BKSH, v_BKSH, block)
  out_IBKGQH, lse_IBKGQ = jax.lax.map(
      lambda i: _one_query_block(q_IBKGQH[i], k_JBKLH, v_JBKLH,
                                 _mask_of_block(mask_IBQS, i, block)),
      jnp.arange(q_IBKGQH.shape[0]))
  return _from_query_blocks(out_IBKGQH, T), _from_query_blocks(lse_IBKGQ, T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention_with_lse(q_BTNH, k_BKSH, v_BKSH, mask_BTS, block: int):
  """Attention of q over (k, v) where mask allows, and each query's log-sum-exp of its scores.

  Args:
    q_BTNH: queries; N must be a multiple of K.
    k_BKSH, v_BKSH: keys and values, kv-head-major (the KV cache's layout).
    mask_BTS: True where a query may see a key; (B, 1, S) broadcasts over queries.
    block: queries and keys per block; each step holds one (block × block) score block per head.

  Returns:
    out_BTNH (fp32; zeros for a query that sees no key) and lse_BTN (fp32; EMPTY_LSE there).
  """
  return _forward(q_BTNH, k_BKSH, v_BKSH, mask_BTS, block)


def _attention_fwd(q_BTNH, k_BKSH, v_BKSH, mask_BTS, block):
  out_BTNH, lse_BTN = _forward(q_BTNH, k_BKSH, v_BKSH, mask_BTS, block)
  return (out_BTNH, lse_BTN), (q_BTNH, k_BKSH, v_BKSH, mask_BTS, out_BTNH, lse_BTN)


def _attention_bwd(block, residuals, cotangents):
  q_BTNH, k_BKSH, v_BKSH, mask_BTS, out_BTNH, lse_BTN = residuals
  d_out_BTNH, d_lse_BTN = cotangents
  B, T, N, H = q_BTNH.shape
  K, S = k_BKSH.shape[1], k_BKSH.shape[2]
  scale = H ** -0.5
  q_IBKGQH, mask_IBQS = _query_blocks(q_BTNH, mask_BTS, K, block)
  d_out_IBKGQH, _ = _query_blocks(d_out_BTNH.astype(jnp.float32), mask_BTS, K, block)
  # d lse / d s = p, so the log-sum-exp's cotangent adds to every score's like a shifted dP.
  shift_BTN = d_lse_BTN - jnp.sum(d_out_BTNH.astype(jnp.float32) * out_BTNH, axis=-1)
  per_query = lambda a_BTN: _query_blocks(a_BTN[..., None], mask_BTS, K, block)[0][..., 0]
  lse_IBKGQ, shift_IBKGQ = per_query(lse_BTN), per_query(shift_BTN)
  k_JBKLH, v_JBKLH = _key_blocks(k_BKSH, v_BKSH, block)

  def query_block(dkv, i):
    q_BKGQH, d_out_BKGQH = q_IBKGQH[i], d_out_IBKGQH[i]
    lse_BKGQ, shift_BKGQ = lse_IBKGQ[i], shift_IBKGQ[i]

    def key_block(dq_BKGQH, blocks):
      k_BKLH, v_BKLH, mask_BQL = blocks
      s_BKGQL = _scores(q_BKGQH, k_BKLH, mask_BQL)
      p_BKGQL = jnp.where(mask_BQL[:, None, None], jnp.exp(s_BKGQL - lse_BKGQ[..., None]), 0.0)
      dv_BKLH = jnp.einsum("bkgql,bkgqh->bklh", p_BKGQL, d_out_BKGQH)
      dp_BKGQL = jnp.einsum("bkgqh,bklh->bkgql", d_out_BKGQH, v_BKLH,
                            preferred_element_type=jnp.float32)
      ds_BKGQL = p_BKGQL * (dp_BKGQL + shift_BKGQ[..., None]) * scale  # d(q·k) from d(s)
      dq_BKGQH = dq_BKGQH + jnp.einsum("bkgql,bklh->bkgqh", ds_BKGQL, k_BKLH,
                                       preferred_element_type=jnp.float32)
      dk_BKLH = jnp.einsum("bkgql,bkgqh->bklh", ds_BKGQL, q_BKGQH,
                           preferred_element_type=jnp.float32)
      return dq_BKGQH, (dk_BKLH, dv_BKLH)

    dq_BKGQH, (dk_JBKLH, dv_JBKLH) = jax.lax.scan(
        key_block, jnp.zeros(q_BKGQH.shape, jnp.float32),
        (k_JBKLH, v_JBKLH, _mask_of_block(mask_IBQS, i, block)))
    return (dkv[0] + dk_JBKLH, dv_JBKLH + dkv[1]), dq_BKGQH

  zeros = jnp.zeros(k_JBKLH.shape, jnp.float32)
  (dk_JBKLH, dv_JBKLH), dq_IBKGQH = jax.lax.scan(query_block, (zeros, zeros),
                                                 jnp.arange(q_IBKGQH.shape[0]))
  unblock = lambda a_JBKLH: jnp.moveaxis(a_JBKLH, 0, 2).reshape(B, K, -1, H)[:, :, :S]
  return (_from_query_blocks(dq_IBKGQH, T).astype(q_BTNH.dtype),
          unblock(dk_JBKLH).astype(k_BKSH.dtype), unblock(dv_JBKLH).astype(v_BKSH.dtype), None)


attention_with_lse.defvjp(_attention_fwd, _attention_bwd)


def merge(out_a_BTNH, lse_a_BTN, out_b_BTNH, lse_b_BTN):
  """Attention over the union of two disjoint key sets from the results over each: (out, lse)."""
  lse_BTN = jnp.logaddexp(lse_a_BTN, lse_b_BTN)
  weight = lambda lse_BTN_part: jnp.exp(lse_BTN_part - lse_BTN)[..., None]
  return weight(lse_a_BTN) * out_a_BTNH + weight(lse_b_BTN) * out_b_BTNH, lse_BTN
