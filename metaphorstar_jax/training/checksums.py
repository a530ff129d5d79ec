"""Checksums and finiteness of every array in a pytree, computed where the arrays live.

A checkpoint stores each array's checksum and refuses to restore arrays whose checksum differs
(a damaged file), and refuses to save parameters that are not finite. The checksum is an integer
sum, so it is the same however an array is sharded and no host gathers the model to compute it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _words(x: jax.Array) -> jax.Array:
  """The bytes of `x` as uint32 words (narrower types widened; 8-byte ones split in two)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if x.dtype.itemsize == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
  """Sum over the words of `x` of word × (2·position + 1), modulo 2^32.

  Integer sums do not depend on the order of reduction, so the value is the same however the
  array is sharded, on any number of hosts, and no host gathers the model to compute it. Odd
  weights are invertible modulo 2^32: any one changed word, a flipped byte say, changes the sum.
  """
  words = _words(x)
  position, stride = jnp.zeros(words.shape, jnp.uint32), 1
  for axis in reversed(range(words.ndim)):
    position += jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride)
    stride = stride * words.shape[axis] % 2**32
  return jnp.sum(words * (2 * position + 1), dtype=jnp.uint32)


def _all_finite(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.isfinite(x).all()
  return jnp.array(True)


@jax.jit
def _summaries(arrays):
  return jax.tree.map(_checksum, arrays), jax.tree.map(_all_finite, arrays)


def array_summaries(arrays: Any) -> tuple[dict[str, list], dict[str, bool]]:
  """({leaf name: [dtype, checksum]}, {leaf name: all finite}) of a pytree of arrays; names are
  the keys from the root joined by '/', e.g. 'params/visual/patch_embed/kernel'."""
  arrays = jax.tree.map(jnp.asarray, arrays)
  checksums, finite = jax.device_get(_summaries(arrays))
  name = lambda path: jax.tree_util.keystr(path, simple=True, separator="/")
  dtypes = {name(p): str(x.dtype) for p, x in jax.tree_util.tree_leaves_with_path(arrays)}
  return ({name(p): [dtypes[name(p)], int(c)]
           for p, c in jax.tree_util.tree_leaves_with_path(checksums)},
          {name(p): bool(f) for p, f in jax.tree_util.tree_leaves_with_path(finite)})
