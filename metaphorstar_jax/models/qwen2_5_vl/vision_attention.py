"""Vision-tower attention restricted to segments (windows or frames) without an X × X matrix.

The ViT sees every patch of a batch packed into one sequence of X patches, and a patch may only
attend within its segment: its window (most blocks) or its frame (the full-attention blocks). A
dense masked attention is exact but holds X × X logits per head; one 2048² image alone has
X ≈ 21k patches, i.e. 28 GB of fp32 logits for 16 heads in every layer.

- `window_attention`: windows are contiguous runs of at most `block` patches (64 for
  Qwen2.5-VL: 4 × 4 merged cells of 4 patches), so a query in block j only needs the keys of
  blocks j-1, j and j+1. Memory and compute O(X · 3·block).
- `frame_attention`: frames can be as long as the sequence, so queries go `chunk` at a time
  against all keys (in blocks, `layers.attend`'s blockwise path, once that is large), each chunk
  rematerialised in the backward pass. Memory O(chunk · block), compute unchanged.

Both equal the dense masked attention to float round-off (tests/test_vision_attention.py), and
both run `layers.attend` on their blocks of queries and keys.
Shape letters (README "Shape letters"): X patches, Q heads, H head dim, J windows or chunks,
W queries per window or chunk, L keys a window sees.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metaphorstar_jax.models.qwen2_5_vl import layers


def _heads_major(x_JXQH):
  """(J, X, Q, H) -> (J, Q, X, H), the key/value layout `layers.attend` reads."""
  return jnp.swapaxes(x_JXQH, 1, 2)


def _pad_rows(x, rows: int, value=0):
  return jnp.pad(x, [(0, rows)] + [(0, 0)] * (x.ndim - 1), constant_values=value)


def window_attention(q_XQH, k_XQH, v_XQH, segments_X, block: int):
  """Attention within segments that are contiguous and at most `block` patches long."""
  X, Q, H = q_XQH.shape
  pad = -X % block
  # Padding patches get a segment of their own; their outputs are dropped.
  q, k, v = (_pad_rows(x, pad) for x in (q_XQH, k_XQH, v_XQH))
  segments = _pad_rows(segments_X.astype(jnp.int32), pad, value=-1)
  J = (X + pad) // block
  blocks = lambda x: x.reshape(J, block, *x.shape[1:])
  q_JWQH, k_JWQH, v_JWQH, seg_JW = blocks(q), blocks(k), blocks(v), blocks(segments)

  def neighbours(x_J_W_, fill, axis):
    """Each block's keys next to its two neighbours' (a segment spans at most two blocks);
    `axis` is the within-block position axis."""
    edge = jnp.full_like(x_J_W_[:1], fill)
    before = jnp.concatenate([edge, x_J_W_[:-1]])
    after = jnp.concatenate([x_J_W_[1:], edge])
    return jnp.concatenate([before, x_J_W_, after], axis=axis)

  seg_JL = neighbours(seg_JW, -2, axis=1)  # -2: no patch's segment
  visible_JWL = seg_JW[:, :, None] == seg_JL[:, None, :]
  out_JWQH = layers.attend(q_JWQH, neighbours(_heads_major(k_JWQH), 0, axis=2),
                           neighbours(_heads_major(v_JWQH), 0, axis=2), visible_JWL,
                           blockwise=False)
  return out_JWQH.reshape(J * block, Q, H)[:X]


def frame_attention(q_XQH, k_XQH, v_XQH, segments_X, chunk: int):
  """Attention within segments of any length, `chunk` queries at a time."""
  X, Q, H = q_XQH.shape
  segments_X = segments_X.astype(jnp.int32)
  k_1QXH, v_1QXH = _heads_major(k_XQH[None]), _heads_major(v_XQH[None])
  if X <= chunk:
    visible_1XX = (segments_X[:, None] == segments_X[None, :])[None]
    return layers.attend(q_XQH[None], k_1QXH, v_1QXH, visible_1XX, blockwise=False)[0]
  pad = -X % chunk
  J = (X + pad) // chunk
  q_JWQH = _pad_rows(q_XQH, pad).reshape(J, chunk, Q, H)
  seg_JW = _pad_rows(segments_X, pad, value=-1).reshape(J, chunk)

  @jax.checkpoint  # the backward pass recomputes a chunk's logits instead of keeping them all
  def one_chunk(args):
    q_WQH, seg_W = args
    visible_1WX = (seg_W[:, None] == segments_X[None, :])[None]
    # Keys in blocks too once a chunk's scores would be large: at the 7B's 65,536 patches per
    # chip a chunk's fp32 scores were 2 GiB, several alive at once in the gradient.
    return layers.attend(q_WQH[None], k_1QXH, v_1QXH, visible_1WX)[0]

  out_JWQH = jax.lax.map(one_chunk, (q_JWQH, seg_JW))
  return out_JWQH.reshape(J * chunk, Q, H)[:X]
