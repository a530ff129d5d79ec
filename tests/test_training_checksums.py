"""Array checksums: equal however an array is sharded, changed by any one changed or moved word,
named by the leaf's path with its dtype; finiteness per leaf."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from metaphorstar_jax import sharding
from metaphorstar_jax.training.checksums import array_summaries


def checksum(x):
  (_, value), = array_summaries({"x": x})[0].values()
  return value


def test_leaves_are_named_by_path_with_their_dtype_and_finiteness():
  tree = {"params": {"visual": {"kernel": jnp.ones((2, 3))}, "bias": jnp.zeros(4, jnp.bfloat16)},
          "opt_state": {"count": jnp.int32(7), "ok": jnp.array(True)}}
  checksums, finite = array_summaries(tree)
  assert sorted(checksums) == sorted(finite) == ["opt_state/count", "opt_state/ok",
                                                 "params/bias", "params/visual/kernel"]
  assert checksums["params/visual/kernel"][0] == "float32"
  assert checksums["params/bias"][0] == "bfloat16"
  assert all(isinstance(value, int) and 0 <= value < 2**32 for _, value in checksums.values())
  assert all(finite.values())


def test_nan_and_inf_are_not_finite_and_integers_always_are():
  _, finite = array_summaries({"nan": jnp.array([1.0, jnp.nan]), "inf": jnp.array([jnp.inf]),
                               "half": jnp.array([1.0], jnp.bfloat16), "int": jnp.arange(3)})
  assert finite == {"nan": False, "inf": False, "half": True, "int": True}


def test_any_changed_or_moved_word_changes_the_checksum():
  x = np.arange(48, dtype=np.float32).reshape(4, 12)
  base = checksum(jnp.asarray(x))
  assert checksum(jnp.asarray(x)) == base  # deterministic
  flipped = x.view(np.uint32).copy()
  flipped[2, 5] ^= 1 << 4  # one flipped bit
  assert checksum(jnp.asarray(flipped.view(np.float32))) != base
  swapped = x.copy()
  swapped[0, 1], swapped[0, 2] = x[0, 2], x[0, 1]  # same words, other places
  assert checksum(jnp.asarray(swapped)) != base
  assert checksum(jnp.asarray(x.T.copy())) != base  # same words, another layout
  # A narrow dtype's bytes count too: bfloat16 and bool.
  half = jnp.arange(16, dtype=jnp.bfloat16)
  assert checksum(half) != checksum(half.at[3].set(100))
  flags = jnp.zeros(8, bool)
  assert checksum(flags) != checksum(flags.at[5].set(True))


def test_prng_keys_have_a_checksum_of_their_key_data():
  key = jax.random.key(0)
  assert checksum(key) == checksum(jax.random.key_data(key))
  assert checksum(key) != checksum(jax.random.key(1))


def test_the_checksum_does_not_depend_on_the_sharding():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(data=2, fsdp=4)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 16)), jnp.float32)
  placed = [jax.device_put(x, NamedSharding(mesh, spec))
            for spec in (PartitionSpec(), PartitionSpec("fsdp"), PartitionSpec("data", "fsdp"),
                         PartitionSpec(None, ("data", "fsdp")))]
  assert {checksum(a) for a in placed} == {checksum(np.asarray(x))}
