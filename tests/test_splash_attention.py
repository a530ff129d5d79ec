"""The TPU attention kernel (Pallas splash attention, run here by its interpreter) equals the
decoder's reference attention in value and gradient, with the left padding, grouped kv heads and
shared prompts the decoder gives it; and `layers.attend` takes it exactly when traced for a TPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaphorstar_jax import sharding
from metaphorstar_jax.models.qwen2_5_vl import layers, splash_attention
from metaphorstar_jax.planning import targets


def normal(rng, *shape):
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


def max_gap(a, b):
  return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def causal_mask(kv_valid_BT):
  T = kv_valid_BT.shape[1]
  return jnp.tril(jnp.ones((T, T), bool))[None] & kv_valid_BT[:, None, :]


def test_causal_kernel_equals_reference_attention_and_its_gradients():
  rng = np.random.default_rng(0)
  B, T, Q, K, H = 2, 100, 4, 2, 16
  q, k, v, weights = normal(rng, B, T, Q, H), normal(rng, B, K, T, H), normal(rng, B, K, T, H), \
      normal(rng, B, T, Q, H)
  # Row 1 is a left-padded prompt: its first 37 queries see no key and must come back as zeros.
  kv_valid_BT = jnp.asarray(np.arange(T)[None] >= np.array([[0], [37]]))
  mask_BTS = causal_mask(kv_valid_BT)

  def loss(attention, q, k, v):
    return (attention(q, k, v) * weights).sum()

  fused = lambda q, k, v: splash_attention.causal(q, k, v, kv_valid_BT, interpret=True)
  reference = lambda q, k, v: layers.attend(q, k, v, mask_BTS, blockwise=False)
  assert max_gap(fused(q, k, v), reference(q, k, v)) <= 1e-5
  assert float(jnp.abs(fused(q, k, v)[1, :37]).max()) == 0
  grads = lambda attention: jax.grad(loss, argnums=(1, 2, 3))(attention, q, k, v)
  assert max_gap(grads(fused), grads(reference)) <= 1e-5


def test_after_prefix_kernel_equals_reference_attention_and_its_gradients():
  rng = np.random.default_rng(1)
  P, G, T, A, Q, K, H = 2, 2, 60, 40, 4, 2, 16
  B = P * G
  q, k, v, weights = normal(rng, B, T, Q, H), normal(rng, B, K, T, H), normal(rng, B, K, T, H), \
      normal(rng, B, T, Q, H)
  prefix_k, prefix_v = normal(rng, P, K, A, H), normal(rng, P, K, A, H)
  # Prompts left-padded by 0 and 13 keys; completions ending (right padding) at various lengths.
  prefix_valid_PA = jnp.asarray(np.arange(A)[None] >= np.array([[0], [13]]))
  own_valid_BT = jnp.asarray(np.arange(T)[None] < np.array([[T], [21], [1], [45]]))
  own_mask_BTS = causal_mask(own_valid_BT)

  def loss(attention, *args):
    return (attention(*args) * weights).sum()

  fused = lambda q, k, v, pk, pv: splash_attention.after_prefix(
      q, k, v, own_valid_BT, pk, pv, prefix_valid_PA, interpret=True)
  reference = lambda q, k, v, pk, pv: layers.attend_after_prefix(
      q, k, v, own_mask_BTS, pk, pv, prefix_valid_PA)
  args = (q, k, v, prefix_k, prefix_v)
  assert max_gap(fused(*args), reference(*args)) <= 1e-5
  grads = lambda attention: jax.grad(loss, argnums=(1, 2, 3, 4, 5))(attention, *args)
  assert max_gap(grads(fused), grads(reference)) <= 1e-5


def test_the_shared_prompt_mask_reaches_the_prompt_and_only_the_rows_own_past():
  mask = splash_attention._shared_prompt_mask(Ap=2, G=2, Tp=3)
  assert mask[:, :2].all()
  own = mask[:, 2:]
  assert own[0].tolist() == [True, False, False, False, False, False]
  assert own[2].tolist() == [True, True, True, False, False, False]
  assert own[3].tolist() == [False, False, False, True, False, False]  # row 1 starts afresh


def lowered_attention(mesh, T, prefix=False):
  """The text of `layers.attend` (or `attend_after_prefix`) with a `CausalMask`, lowered for the
  devices of `mesh`, rows split over its batch axes."""
  B, Q, K, H, P, A = 8, 4, 2, 64, 4, 600
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))
  spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)

  def attention(q, k, v, kv_valid, prefix_k, prefix_v, prefix_valid):
    mask = layers.CausalMask(kv_valid, 0)
    with sharding.activations_on(mesh):
      if prefix:
        return layers.attend_after_prefix(q, k, v, mask, prefix_k, prefix_v, prefix_valid)
      return layers.attend(q, k, v, mask)

  return jax.jit(attention).lower(
      spec(B, T, Q, H), spec(B, K, T, H), spec(B, K, T, H), spec(B, T, dtype=bool),
      spec(P, K, A, H), spec(P, K, A, H), spec(P, A, dtype=bool)).as_text()


def tpu_mesh():
  try:
    target = targets.resolve_target("v5e-4")
  except ValueError as e:
    pytest.skip(str(e))
  return sharding.make_mesh(devices=target.devices)


@pytest.mark.parametrize("prefix", [False, True])
def test_long_attention_takes_the_kernel_when_traced_for_a_tpu(prefix):
  mesh = tpu_mesh()
  assert "tpu_custom_call" in lowered_attention(mesh, T=600, prefix=prefix)
  # Short sequences stay on the direct path, and the CPU never takes the kernel.
  assert "tpu_custom_call" not in lowered_attention(mesh, T=200, prefix=prefix)
  cpu = sharding.make_mesh(devices=jax.devices("cpu")[:1])
  assert "tpu_custom_call" not in lowered_attention(cpu, T=600, prefix=prefix)
