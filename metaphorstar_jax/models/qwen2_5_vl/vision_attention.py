"""Vision-tower attention restricted to segments (windows or frames) without an S × S matrix.

The ViT sees every patch of a batch packed into one sequence of S patches, and a patch may only
attend within its segment: its window (most blocks) or its frame (the full-attention blocks). A
dense masked attention is exact but holds S × S logits per head; one 2048² image alone has
S ≈ 21k patches, i.e. 28 GB of fp32 logits for 16 heads in every layer.

- `window_attention`: windows are contiguous runs of at most `block` patches (64 for
  Qwen2.5-VL: 4 × 4 merged cells of 4 patches), so a query in block j only needs the keys of
  blocks j-1, j and j+1. Memory and compute O(S · 3·block).
- `frame_attention`: frames can be as long as the sequence, so queries go `chunk` at a time
  against all keys, each chunk rematerialised in the backward pass. Memory O(chunk · S), compute
  unchanged.

Both equal the dense masked attention to float round-off (tests/test_vision_attention.py), and
both run `layers.attend` on their blocks of queries and keys.
Shape letters: S patches, N heads, H head size, J blocks, Q block or chunk length, K keys seen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metaphorstar_jax.models.qwen2_5_vl import layers


def _heads_major(x_JSNH):
  """(J, S, N, H) -> (J, N, S, H), the key/value layout `layers.attend` reads."""
  return jnp.swapaxes(x_JSNH, 1, 2)


def _pad_rows(x, rows: int, value=0):
  return jnp.pad(x, [(0, rows)] + [(0, 0)] * (x.ndim - 1), constant_values=value)


def window_attention(q_SNH, k_SNH, v_SNH, segments_S, block: int):
  """Attention within segments that are contiguous and at most `block` patches long."""
  S, N, H = q_SNH.shape
  pad = -S % block
  # Padding patches get a segment of their own; their outputs are dropped.
  q, k, v = (_pad_rows(x, pad) for x in (q_SNH, k_SNH, v_SNH))
  segments = _pad_rows(segments_S.astype(jnp.int32), pad, value=-1)
  J = (S + pad) // block
  blocks = lambda x: x.reshape(J, block, *x.shape[1:])
  q_JQNH, k_JQNH, v_JQNH, seg_JQ = blocks(q), blocks(k), blocks(v), blocks(segments)

  def neighbours(x_J_Q_, fill, axis):
    """Each block's keys next to its two neighbours' (a segment spans at most two blocks);
    `axis` is the within-block position axis."""
    edge = jnp.full_like(x_J_Q_[:1], fill)
    before = jnp.concatenate([edge, x_J_Q_[:-1]])
    after = jnp.concatenate([x_J_Q_[1:], edge])
    return jnp.concatenate([before, x_J_Q_, after], axis=axis)

  seg_JK = neighbours(seg_JQ, -2, axis=1)  # -2: no patch's segment
  visible_JQK = seg_JQ[:, :, None] == seg_JK[:, None, :]
  out_JQNH = layers.attend(q_JQNH, neighbours(_heads_major(k_JQNH), 0, axis=2),
                           neighbours(_heads_major(v_JQNH), 0, axis=2), visible_JQK,
                           blockwise=False)
  return out_JQNH.reshape(J * block, N, H)[:S]


def frame_attention(q_SNH, k_SNH, v_SNH, segments_S, chunk: int):
  """Attention within segments of any length, `chunk` queries at a time."""
  S, N, H = q_SNH.shape
  segments_S = segments_S.astype(jnp.int32)
  k_1NSH, v_1NSH = _heads_major(k_SNH[None]), _heads_major(v_SNH[None])
  if S <= chunk:
    visible_1SS = (segments_S[:, None] == segments_S[None, :])[None]
    return layers.attend(q_SNH[None], k_1NSH, v_1NSH, visible_1SS, blockwise=False)[0]
  pad = -S % chunk
  J = (S + pad) // chunk
  q_JQNH = _pad_rows(q_SNH, pad).reshape(J, chunk, N, H)
  seg_JQ = _pad_rows(segments_S, pad, value=-1).reshape(J, chunk)

  @jax.checkpoint  # the backward pass recomputes a chunk's logits instead of keeping them all
  def one_chunk(args):
    q_QNH, seg_Q = args
    visible_1QS = (seg_Q[:, None] == segments_S[None, :])[None]
    # Already chunked and bounded by chunk × S: the direct path is the faster one here.
    return layers.attend(q_QNH[None], k_1NSH, v_1NSH, visible_1QS, blockwise=False)[0]

  out_JQNH = jax.lax.map(one_chunk, (q_JQNH, seg_JQ))
  return out_JQNH.reshape(J * chunk, N, H)[:S]
