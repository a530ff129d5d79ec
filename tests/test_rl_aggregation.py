"""loss_agg_mode reductions against a loop-by-loop NumPy reference, masking and accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaphorstar_jax import rl

MODES = rl.LOSS_AGG_MODES


def reference_aggregate(values, mask, mode, norm_length=None):
  """Written from the definitions in the module docstring, one row at a time."""
  num_rows, num_tokens = values.shape
  if mode == "token-mean":
    total, count = 0.0, 0
    for b in range(num_rows):
      for t in range(num_tokens):
        if mask[b, t]:
          total += values[b, t]
          count += 1
    return total / count if count else 0.0
  per_row = []
  for b in range(num_rows):
    kept = [values[b, t] for t in range(num_tokens) if mask[b, t]]
    if mode == "seq-mean-token-mean":
      per_row.append(sum(kept) / len(kept) if kept else 0.0)
    elif mode == "seq-mean-token-sum":
      per_row.append(sum(kept))
    else:
      per_row.append(sum(kept) / (norm_length or num_tokens))
  return sum(per_row) / num_rows


def ragged_batch(seed, num_rows=5, num_tokens=7):
  rng = np.random.default_rng(seed)
  values = rng.normal(size=(num_rows, num_tokens))
  lengths = rng.integers(1, num_tokens + 1, size=num_rows)
  lengths[2] = 0  # one fully masked row
  mask = np.arange(num_tokens)[None, :] < lengths[:, None]
  values[~mask] = np.nan  # padding garbage must not leak
  return values, mask


@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(mode):
  values, mask = ragged_batch(0)
  got = rl.aggregate(jnp.asarray(values, jnp.float32), jnp.asarray(mask), mode)
  want = reference_aggregate(values, mask, mode)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
  assert np.isfinite(float(got))


def test_modes_differ_so_the_reference_can_fail():
  values, mask = ragged_batch(1)
  results = {m: float(rl.aggregate(jnp.asarray(values, jnp.float32), jnp.asarray(mask), m))
             for m in MODES}
  assert len({round(v, 6) for v in results.values()}) == len(MODES)


def test_norm_length_is_the_dr_grpo_constant():
  values, mask = ragged_batch(2)
  got = rl.aggregate(jnp.asarray(values, jnp.float32), jnp.asarray(mask),
                     "seq-mean-token-sum-norm", norm_length=100)
  np.testing.assert_allclose(float(got), reference_aggregate(values, mask,
                                                             "seq-mean-token-sum-norm", 100),
                             rtol=1e-5)
  # ... and it is the seq-mean-token-sum divided by that constant.
  token_sum = rl.aggregate(jnp.asarray(values, jnp.float32), jnp.asarray(mask),
                           "seq-mean-token-sum")
  np.testing.assert_allclose(float(got), float(token_sum) / 100, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_all_masked_batch_is_zero_with_zero_gradient(mode):
  values = jnp.full((3, 4), jnp.nan)
  mask = jnp.zeros((3, 4), bool)
  assert float(rl.aggregate(values, mask, mode)) == 0.0
  grad = jax.grad(lambda v: rl.aggregate(v, mask, mode))(jnp.ones((3, 4)))
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_sum_to_the_full_batch_with_global_counts(mode):
  values, mask = ragged_batch(3, num_rows=6)
  values, mask = jnp.asarray(values, jnp.float32), jnp.asarray(mask)
  full = rl.aggregate(values, mask, mode)
  token_count, seq_count = jnp.sum(mask), values.shape[0]
  parts = [rl.aggregate(values[i:i + 3], mask[i:i + 3], mode, token_count=token_count,
                        seq_count=seq_count, norm_length=values.shape[1]) for i in (0, 3)]
  np.testing.assert_allclose(float(sum(parts)), float(full), rtol=1e-5, atol=1e-6)


def test_gradient_is_zero_on_masked_tokens():
  values, mask = ragged_batch(4)
  for mode in MODES:
    grad = jax.grad(lambda v, m=mode: rl.aggregate(v, jnp.asarray(mask), m))(
        jnp.asarray(np.nan_to_num(values), jnp.float32))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="loss_agg_mode='mean'"):
    rl.aggregate(jnp.ones((2, 3)), jnp.ones((2, 3)), "mean")
  with pytest.raises(ValueError, match=r"\[B, N\]"):
    rl.aggregate(jnp.ones((2, 3)), jnp.ones((2, 4)), "token-mean")
