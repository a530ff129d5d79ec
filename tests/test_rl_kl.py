"""KL estimators, their clamps and straight-through form, the KL loss, KL in the reward, and the
adaptive controller, against NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaphorstar_jax import rl


def reference_kl(logp, ref, kind):
  """One token at a time, from Schulman's estimators with verl's clamps."""
  d = logp - ref
  if kind in ("kl", "k1"):
    return d
  if kind == "abs":
    return abs(d)
  if kind in ("mse", "k2"):
    return 0.5 * d * d
  x = min(max(ref - logp, -20.0), 20.0)
  return min(max(math.exp(x) - x - 1.0, -10.0), 10.0)


def sample_logprobs(seed, shape=(4, 6), spread=0.5):
  rng = np.random.default_rng(seed)
  logp = -rng.uniform(0.05, 3.0, size=shape)
  ref = logp + rng.normal(scale=spread, size=shape)
  return logp, ref


@pytest.mark.parametrize("kind", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"])
def test_estimators_match_reference(kind):
  logp, ref = sample_logprobs(0)
  got = np.asarray(rl.kl_estimate(jnp.asarray(logp), jnp.asarray(ref), kind))
  want = np.vectorize(lambda a, b: reference_kl(a, b, kind))(logp, ref)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_low_var_kl_is_nonnegative_and_clamped():
  logp = jnp.array([[0.0, -1.0, -30.0, -1.0, -40.0]])
  ref = jnp.array([[0.0, -1.5, -1.0, -30.0, -10.0]])
  got = np.asarray(rl.kl_estimate(logp, ref, "low_var_kl"))
  assert np.all(got >= 0) and got[0, 0] == 0.0
  np.testing.assert_allclose(got[0, 2:], 10.0)  # exp(29) and exp(30) hit the value clamp
  np.testing.assert_allclose(got[0, 3], 10.0)  # (d = 29): e^-29 + 29 - 1 = 28, clamped
  # Beyond the clamp the term is flat: no gradient there, full gradient inside.
  grad = np.asarray(jax.grad(lambda lp: jnp.sum(rl.kl_estimate(lp, ref, "low_var_kl")))(logp))
  np.testing.assert_array_equal(grad[0, 2:], 0.0)
  np.testing.assert_allclose(grad[0, 1], 1.0 - math.exp(-0.5), rtol=1e-5)


def test_straight_through_takes_k3_value_and_k2_gradient():
  logp, ref = (jnp.asarray(x, jnp.float32) for x in sample_logprobs(1))
  plus = rl.kl_estimate(logp, ref, "low_var_kl+")
  np.testing.assert_allclose(np.asarray(plus), np.asarray(rl.kl_estimate(logp, ref, "k3")),
                             rtol=1e-6)
  grad_plus = jax.grad(lambda lp: jnp.sum(rl.kl_estimate(lp, ref, "low_var_kl+")))(logp)
  np.testing.assert_allclose(np.asarray(grad_plus), np.asarray(logp - ref), rtol=1e-5,
                             atol=1e-6)
  grad_k3 = jax.grad(lambda lp: jnp.sum(rl.kl_estimate(lp, ref, "low_var_kl")))(logp)
  assert not np.allclose(np.asarray(grad_k3), np.asarray(grad_plus))


def test_unknown_estimator_is_refused():
  with pytest.raises(ValueError, match="'full'"):
    rl.kl_estimate(jnp.zeros(3), jnp.zeros(3), "full")
  with pytest.raises(ValueError, match="kl_loss_type"):
    rl.LossConfig(kl_loss_type="k4")


@pytest.mark.parametrize("mode", rl.LOSS_AGG_MODES)
def test_kl_loss_aggregates_like_the_policy_loss(mode):
  logp, ref = sample_logprobs(2)
  mask = np.ones(logp.shape, bool)
  mask[1, 3:] = False
  mask[3] = False
  logp[~mask] = -np.inf  # padding garbage
  config = rl.LossConfig(use_kl_loss=True, kl_loss_type="low_var_kl", loss_agg_mode=mode)
  loss, kl_BN = rl.kl_loss(config, jnp.asarray(logp, jnp.float32), jnp.asarray(ref, jnp.float32),
                           jnp.asarray(mask))
  per_token = np.zeros(logp.shape)
  for b, t in zip(*np.nonzero(mask)):
    per_token[b, t] = reference_kl(logp[b, t], ref[b, t], "low_var_kl")
  np.testing.assert_allclose(np.asarray(kl_BN), per_token, rtol=1e-5, atol=1e-6)
  want = float(rl.aggregate(jnp.asarray(per_token, jnp.float32), jnp.asarray(mask), mode))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert np.isfinite(float(loss))


def test_kl_in_reward_subtracts_the_row_sum():
  logp, ref = sample_logprobs(3)
  mask = np.arange(6)[None, :] < np.array([6, 3, 0, 1])[:, None]
  rewards = np.array([1.0, 0.5, 0.0, 1.0])
  got, kl_mean = rl.kl_penalized_rewards(jnp.asarray(rewards), jnp.asarray(logp),
                                         jnp.asarray(ref), jnp.asarray(mask), kl_coef=0.05,
                                         kl_penalty="kl")
  sums = np.array([sum(logp[b, t] - ref[b, t] for t in range(6) if mask[b, t])
                   for b in range(4)])
  np.testing.assert_allclose(np.asarray(got), rewards - 0.05 * sums, rtol=1e-5, atol=1e-6)
  counts = mask.sum(axis=1)
  np.testing.assert_allclose(np.asarray(kl_mean), sums / np.maximum(counts, 1), rtol=1e-5,
                             atol=1e-6)
  assert float(got[2]) == 0.0  # an empty row keeps its reward
  grad = jax.grad(lambda lp: jnp.sum(rl.kl_penalized_rewards(
      jnp.asarray(rewards), lp, jnp.asarray(ref), jnp.asarray(mask), kl_coef=0.05)[0]))(
          jnp.asarray(logp))
  np.testing.assert_array_equal(np.asarray(grad), 0.0)  # rewards carry no gradient


def test_kl_in_reward_follows_the_config():
  logp, ref = sample_logprobs(4)
  mask = jnp.ones(logp.shape, bool)
  rewards = jnp.array([1.0, 0.0, 0.5, 1.0])
  off, kl_off = rl.kl_in_reward(rl.preset("metaphorstar").loss, 0.1, rewards, jnp.asarray(logp),
                                jnp.asarray(ref), mask)
  np.testing.assert_array_equal(np.asarray(off), np.asarray(rewards))
  np.testing.assert_array_equal(np.asarray(kl_off), 0.0)
  cfg = rl.LossConfig(use_kl_in_reward=True, kl_penalty="low_var_kl")
  on, _ = rl.kl_in_reward(cfg, 0.1, rewards, jnp.asarray(logp), jnp.asarray(ref), mask)
  sums = np.vectorize(lambda a, b: reference_kl(a, b, "low_var_kl"))(logp, ref).sum(axis=1)
  np.testing.assert_allclose(np.asarray(on), np.asarray(rewards) - 0.1 * sums, rtol=1e-5)


def test_adaptive_controller_matches_its_formula():
  coef = float(rl.adaptive_kl_coef(0.1, 0.15, 64, target_kl=0.1, horizon=1000, max_error=0.2))
  np.testing.assert_allclose(coef, 0.1 * (1 + 0.2 * 64 / 1000), rtol=1e-6)  # error clipped at 0.2
  coef = float(rl.adaptive_kl_coef(0.1, 0.09, 64, target_kl=0.1, horizon=1000, max_error=0.2))
  np.testing.assert_allclose(coef, 0.1 * (1 - 0.1 * 64 / 1000), rtol=1e-5)
  fixed = rl.LossConfig(kl_ctrl_type="fixed")
  assert rl.next_kl_coef(fixed, 0.1, 5.0, 64) == 0.1
  adaptive = rl.LossConfig(kl_ctrl_type="adaptive", kl_target=0.1, kl_horizon=1000)
  np.testing.assert_allclose(float(rl.next_kl_coef(adaptive, 0.1, 0.15, 64)),
                             0.1 * (1 + 0.2 * 64 / 1000), rtol=1e-6)
