"""Token log-probs and entropy from logits against NumPy, with -inf (masked) vocab entries."""

import jax
import jax.numpy as jnp
import numpy as np

from metaphorstar_jax import rl


def reference_log_softmax(logits):
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_token_logprobs_match_reference_at_a_temperature():
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=3.0, size=(2, 4, 11))
  tokens = rng.integers(0, 11, size=(2, 4))
  got = rl.token_logprobs(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens), temperature=0.7)
  logp = reference_log_softmax(logits / 0.7)
  want = np.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # Temperature 1.0 gives something else, so a trainer that forgets it is caught.
  plain = rl.token_logprobs(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens), temperature=1.0)
  assert not np.allclose(np.asarray(plain), want, atol=1e-3)


def test_entropy_matches_reference_and_bounds():
  rng = np.random.default_rng(1)
  logits = rng.normal(scale=2.0, size=(3, 5, 9))
  got = np.asarray(rl.entropy_from_logits(jnp.asarray(logits, jnp.float32), temperature=1.0))
  logp = reference_log_softmax(logits)
  want = -(np.exp(logp) * logp).sum(axis=-1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  uniform = rl.entropy_from_logits(jnp.zeros((1, 1, 9)), temperature=1.0)
  np.testing.assert_allclose(float(uniform[0, 0]), np.log(9), rtol=1e-6)
  peaked = rl.entropy_from_logits(jnp.array([[[1e4, 0.0, 0.0]]]), temperature=1.0)
  assert 0.0 <= float(peaked[0, 0]) < 1e-6


def test_masked_vocab_entries_give_finite_values_and_gradients():
  logits = jnp.array([[[2.0, -jnp.inf, 0.5, -jnp.inf], [0.0, 1.0, -jnp.inf, 3.0]]])
  tokens = jnp.array([[0, 3]])
  entropy = rl.entropy_from_logits(logits, temperature=1.0)
  finite = jnp.where(jnp.isfinite(logits), logits, -1e30)  # same distribution, finite logits
  np.testing.assert_allclose(np.asarray(entropy),
                             np.asarray(rl.entropy_from_logits(finite, temperature=1.0)),
                             rtol=1e-6)

  def objective(z):
    return (jnp.sum(rl.entropy_from_logits(z, temperature=0.9))
            + jnp.sum(rl.token_logprobs(z, tokens, temperature=0.9)))

  grad = np.asarray(jax.grad(objective)(logits))
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[~np.isfinite(np.asarray(logits))], 0.0)
