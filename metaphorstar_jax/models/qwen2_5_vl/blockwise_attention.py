"""Softmax attention over key blocks with an online softmax: no (T × S) score matrix is stored.

The forward pass takes the queries `block` at a time and walks the keys `block` at a time,
keeping a running max, sum and weighted value sum per query (the flash-attention recurrence); it
returns the output and each query's log-sum-exp. The backward pass recomputes each block's
probabilities from that log-sum-exp, so neither pass keeps more than one (block × block) block of
scores per head. Because the log-sum-exp is an output (with its own gradient), attention over
keys held in two places (a group's shared prompt and each row's own completion) is two calls
combined exactly by `merge`.

Shape letters (README "Shape letters"): B rows, T queries, S keys, K kv heads, R query heads per
kv head, Q = K·R, H head dim, M query blocks of W queries, J key blocks of L keys. Logits, softmax
statistics and accumulators are fp32.
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


def _query_blocks(q_BTQH, mask_BTS, num_kv_heads: int, block: int):
  """Queries heads-major and padded to whole blocks, (M, B, K, R, W, H), with the mask's matching
  query blocks (M, B, W, S), or (1, B, 1, S) when it broadcasts over queries."""
  B, T, Q, H = q_BTQH.shape
  W = min(block, T)
  M = -(-T // W)
  pad = M * W - T
  q_BTQH = jnp.pad(q_BTQH, ((0, 0), (0, pad), (0, 0), (0, 0)))
  q_MBKRWH = jnp.transpose(q_BTQH.reshape(B, M, W, num_kv_heads, Q // num_kv_heads, H),
                           (1, 0, 3, 4, 2, 5))
  if mask_BTS.shape[1] == 1:
    return q_MBKRWH, mask_BTS[None]
  mask_BTS = jnp.pad(mask_BTS, ((0, 0), (0, pad), (0, 0)))
  return q_MBKRWH, jnp.moveaxis(mask_BTS.reshape(B, M, W, -1), 1, 0)


def _from_query_blocks(a_MBKRW_, T: int):
  """(M, B, K, R, W, ...) -> (B, T, K·R, ...), dropping the padding queries."""
  M, B, K, R, W = a_MBKRW_.shape[:5]
  a_BMWKR_ = jnp.moveaxis(a_MBKRW_, (2, 3), (3, 4)).swapaxes(0, 1)
  return a_BMWKR_.reshape(B, M * W, K * R, *a_MBKRW_.shape[5:])[:, :T]


def _scores(q_BKRWH, k_BKLH, mask_BWL):
  """Scaled fp32 scores of one query block against one key block, EMPTY_LSE where masked."""
  s_BKRWL = jnp.einsum("bkrwh,bklh->bkrwl", q_BKRWH, k_BKLH,
                       preferred_element_type=jnp.float32) * (q_BKRWH.shape[-1] ** -0.5)
  return jnp.where(mask_BWL[:, None, None], s_BKRWL, EMPTY_LSE)


def _one_query_block(q_BKRWH, k_JBKLH, v_JBKLH, mask_JBWL):
  """The online softmax of one query block over every key block: (out_BKRWH, lse_BKRW)."""
  B, K, R, W, H = q_BKRWH.shape

  def step(carry, blocks):
    max_BKRW, sum_BKRW, acc_BKRWH = carry
    k_BKLH, v_BKLH, mask_BWL = blocks
    s_BKRWL = _scores(q_BKRWH, k_BKLH, mask_BWL)
    new_max_BKRW = jnp.maximum(max_BKRW, s_BKRWL.max(axis=-1))
    p_BKRWL = jnp.where(mask_BWL[:, None, None], jnp.exp(s_BKRWL - new_max_BKRW[..., None]), 0.0)
    rescale_BKRW = jnp.exp(max_BKRW - new_max_BKRW)
    sum_BKRW = sum_BKRW * rescale_BKRW + p_BKRWL.sum(axis=-1)
    acc_BKRWH = acc_BKRWH * rescale_BKRW[..., None] + jnp.einsum(
        "bkrwl,bklh->bkrwh", p_BKRWL.astype(v_BKLH.dtype), v_BKLH,
        preferred_element_type=jnp.float32)
    return (new_max_BKRW, sum_BKRW, acc_BKRWH), None

  init = (jnp.full((B, K, R, W), EMPTY_LSE, jnp.float32), jnp.zeros((B, K, R, W), jnp.float32),
          jnp.zeros((B, K, R, W, H), jnp.float32))
  (max_BKRW, sum_BKRW, acc_BKRWH), _ = jax.lax.scan(step, init, (k_JBKLH, v_JBKLH, mask_JBWL))
  seen_BKRW = sum_BKRW > 0
  safe_sum_BKRW = jnp.where(seen_BKRW, sum_BKRW, 1.0)
  lse_BKRW = jnp.where(seen_BKRW, max_BKRW + jnp.log(safe_sum_BKRW), EMPTY_LSE)
  return acc_BKRWH / safe_sum_BKRW[..., None], lse_BKRW


def _mask_of_block(mask_MBWS, i, block: int):
  """Query block i's mask, split into key blocks: (J, B, W, L)."""
  mask_BWS = mask_MBWS[i] if mask_MBWS.shape[0] > 1 else mask_MBWS[0]
  S = mask_BWS.shape[-1]
  J = -(-S // block)
  mask_BWS = jnp.pad(mask_BWS, ((0, 0), (0, 0), (0, J * block - S)))
  return jnp.moveaxis(mask_BWS.reshape(*mask_BWS.shape[:2], J, block), 2, 0)


def _forward(q_BTQH, k_BKSH, v_BKSH, mask_BTS, block: int):
  T = q_BTQH.shape[1]
  K = k_BKSH.shape[1]
  q_MBKRWH, mask_MBWS = _query_blocks(q_BTQH, mask_BTS, K, block)
  k_JBKLH, v_JBKLH = _key_blocks(k_BKSH, v_BKSH, block)
  out_MBKRWH, lse_MBKRW = jax.lax.map(
      lambda i: _one_query_block(q_MBKRWH[i], k_JBKLH, v_JBKLH,
                                 _mask_of_block(mask_MBWS, i, block)),
      jnp.arange(q_MBKRWH.shape[0]))
  return _from_query_blocks(out_MBKRWH, T), _from_query_blocks(lse_MBKRW, T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention_with_lse(q_BTQH, k_BKSH, v_BKSH, mask_BTS, block: int):
  """Attention of q over (k, v) where mask allows, and each query's log-sum-exp of its scores.

  Args:
    q_BTQH: queries; Q must be a multiple of K.
    k_BKSH, v_BKSH: keys and values, kv-head-major (the KV cache's layout).
    mask_BTS: True where a query may see a key; (B, 1, S) broadcasts over queries.
    block: queries and keys per block; each step holds one (block × block) score block per head.

  Returns:
    out_BTQH (fp32; zeros for a query that sees no key) and lse_BTQ (fp32; EMPTY_LSE there).
  """
  return _forward(q_BTQH, k_BKSH, v_BKSH, mask_BTS, block)


def _attention_fwd(q_BTQH, k_BKSH, v_BKSH, mask_BTS, block):
  out_BTQH, lse_BTQ = _forward(q_BTQH, k_BKSH, v_BKSH, mask_BTS, block)
  return (out_BTQH, lse_BTQ), (q_BTQH, k_BKSH, v_BKSH, mask_BTS, out_BTQH, lse_BTQ)


def _attention_bwd(block, residuals, cotangents):
  q_BTQH, k_BKSH, v_BKSH, mask_BTS, out_BTQH, lse_BTQ = residuals
  d_out_BTQH, d_lse_BTQ = cotangents
  B, T, Q, H = q_BTQH.shape
  K, S = k_BKSH.shape[1], k_BKSH.shape[2]
  scale = H ** -0.5
  q_MBKRWH, mask_MBWS = _query_blocks(q_BTQH, mask_BTS, K, block)
  d_out_MBKRWH, _ = _query_blocks(d_out_BTQH.astype(jnp.float32), mask_BTS, K, block)
  # d lse / d s = p, so the log-sum-exp's cotangent adds to every score's like a shifted dP.
  shift_BTQ = d_lse_BTQ - jnp.sum(d_out_BTQH.astype(jnp.float32) * out_BTQH, axis=-1)
  per_query = lambda a_BTQ: _query_blocks(a_BTQ[..., None], mask_BTS, K, block)[0][..., 0]
  lse_MBKRW, shift_MBKRW = per_query(lse_BTQ), per_query(shift_BTQ)
  k_JBKLH, v_JBKLH = _key_blocks(k_BKSH, v_BKSH, block)

  def query_block(dkv, i):
    q_BKRWH, d_out_BKRWH = q_MBKRWH[i], d_out_MBKRWH[i]
    lse_BKRW, shift_BKRW = lse_MBKRW[i], shift_MBKRW[i]

    def key_block(dq_BKRWH, blocks):
      k_BKLH, v_BKLH, mask_BWL = blocks
      s_BKRWL = _scores(q_BKRWH, k_BKLH, mask_BWL)
      p_BKRWL = jnp.where(mask_BWL[:, None, None], jnp.exp(s_BKRWL - lse_BKRW[..., None]), 0.0)
      dv_BKLH = jnp.einsum("bkrwl,bkrwh->bklh", p_BKRWL, d_out_BKRWH)
      dp_BKRWL = jnp.einsum("bkrwh,bklh->bkrwl", d_out_BKRWH, v_BKLH,
                            preferred_element_type=jnp.float32)
      ds_BKRWL = p_BKRWL * (dp_BKRWL + shift_BKRW[..., None]) * scale  # d(q·k) from d(s)
      dq_BKRWH = dq_BKRWH + jnp.einsum("bkrwl,bklh->bkrwh", ds_BKRWL, k_BKLH,
                                       preferred_element_type=jnp.float32)
      dk_BKLH = jnp.einsum("bkrwl,bkrwh->bklh", ds_BKRWL, q_BKRWH,
                           preferred_element_type=jnp.float32)
      return dq_BKRWH, (dk_BKLH, dv_BKLH)

    dq_BKRWH, (dk_JBKLH, dv_JBKLH) = jax.lax.scan(
        key_block, jnp.zeros(q_BKRWH.shape, jnp.float32),
        (k_JBKLH, v_JBKLH, _mask_of_block(mask_MBWS, i, block)))
    return (dkv[0] + dk_JBKLH, dv_JBKLH + dkv[1]), dq_BKRWH

  zeros = jnp.zeros(k_JBKLH.shape, jnp.float32)
  (dk_JBKLH, dv_JBKLH), dq_MBKRWH = jax.lax.scan(query_block, (zeros, zeros),
                                                 jnp.arange(q_MBKRWH.shape[0]))
  unblock = lambda a_JBKLH: jnp.moveaxis(a_JBKLH, 0, 2).reshape(B, K, -1, H)[:, :, :S]
  return (_from_query_blocks(dq_MBKRWH, T).astype(q_BTQH.dtype),
          unblock(dk_JBKLH).astype(k_BKSH.dtype), unblock(dv_JBKLH).astype(v_BKSH.dtype), None)


attention_with_lse.defvjp(_attention_fwd, _attention_bwd)


def merge(out_a_BTQH, lse_a_BTQ, out_b_BTQH, lse_b_BTQ):
  """Attention over the union of two disjoint key sets from the results over each: (out, lse)."""
  lse_BTQ = jnp.logaddexp(lse_a_BTQ, lse_b_BTQ)
  weight = lambda lse_BTN_part: jnp.exp(lse_BTN_part - lse_BTQ)[..., None]
  return weight(lse_a_BTQ) * out_a_BTQH + weight(lse_b_BTQ) * out_b_BTQH, lse_BTQ
