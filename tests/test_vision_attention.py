"""Segment-restricted vision attention equals the dense masked attention, values and gradients.

Shape letters (README "Shape letters"): X patches (the queries and keys), Q heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaphorstar_jax.models.qwen2_5_vl import layers, vision_attention
from metaphorstar_jax.models.qwen2_5_vl.positions import vision_layout


def dense_attention(q_XQH, k_XQH, v_XQH, segments_X):
  """The X × X reference: softmax over the keys of the query's own segment."""
  logits = jnp.einsum("qnh,knh->nqk", q_XQH, k_XQH) * q_XQH.shape[-1] ** -0.5
  visible = segments_X[:, None] == segments_X[None, :]
  logits = jnp.where(visible[None], logits, -jnp.inf)
  return jnp.einsum("nqk,knh->qnh", jax.nn.softmax(logits, axis=-1), v_XQH)


def qkv(X, seed=0, Q=3, H=8):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, (X, Q, H), jnp.float32) for k in keys]


def runs(lengths):
  return jnp.asarray(np.repeat(np.arange(len(lengths)), lengths), jnp.int32)


@pytest.mark.parametrize("lengths", [[64, 64, 16, 1, 63, 40, 64], [5], [64] * 3, [30, 3, 64, 7]])
def test_window_attention_matches_dense(lengths):
  segments = runs(lengths)
  q, k, v = qkv(len(segments))
  got = vision_attention.window_attention(q, k, v, segments, block=64)
  np.testing.assert_allclose(got, dense_attention(q, k, v, segments), atol=2e-6)


@pytest.mark.parametrize("chunk,key_block", [(16, None), (128, None), (4096, None), (128, 64)])
def test_frame_attention_matches_dense_with_gradients(chunk, key_block, monkeypatch):
  if key_block:  # chunks this size against all 567 keys take the blockwise path, 64 keys a block
    monkeypatch.setattr(layers, "ATTENTION_BLOCK", key_block)
  segments = runs([300, 5, 171, 1, 90])
  q, k, v = qkv(len(segments), seed=1)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  ours = lambda q, k, v: vision_attention.frame_attention(q, k, v, segments, chunk=chunk)
  reference = lambda q, k, v: dense_attention(q, k, v, segments)
  np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), atol=2e-6)
  got = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_window_attention_gradients_match_dense():
  segments = runs([64, 12, 64, 33])
  q, k, v = qkv(len(segments), seed=2)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.cos(f(q, k, v)))
  ours = lambda q, k, v: vision_attention.window_attention(q, k, v, segments, block=64)
  reference = lambda q, k, v: dense_attention(q, k, v, segments)
  got = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_real_window_layouts_fit_the_block():
  """The precondition of window_attention: Qwen2.5-VL windows (4 × 4 merged cells) are contiguous
  runs of at most 64 patches, for images of any shape, videos and the sampler's padding image."""
  grids = np.asarray([[1, 38, 52], [2, 14, 8], [1, 2, 18], [1, 64, 6]], np.int32)
  X = int(np.prod(grids, axis=1).sum())
  layout = vision_layout(grids, X, merge_size=2, window_cells=4)
  segments = np.asarray(layout.window_segments_X)
  starts = np.flatnonzero(np.diff(segments, prepend=-1))
  lengths = np.diff(np.append(starts, X))
  assert len(set(segments.tolist())) == len(starts), "a window is not contiguous"
  assert lengths.max() <= 64
  q, k, v = qkv(X, seed=3)
  got = vision_attention.window_attention(q, k, v, jnp.asarray(segments), block=64)
  np.testing.assert_allclose(got, dense_attention(q, k, v, jnp.asarray(segments)), atol=2e-6)
