"""Token log-probs and entropy from logits against NumPy, with -inf (masked) vocab entries, and the
decode step's (B, V) case as the same arithmetic as the trainer's (B, N, V)."""

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


def entropy(logits, temperature):
  tokens = jnp.zeros(logits.shape[:-1], jnp.int32)
  return rl.token_logprobs_and_entropy(logits, tokens, temperature=temperature)[1]


def test_entropy_matches_reference_and_bounds():
  rng = np.random.default_rng(1)
  logits = rng.normal(scale=2.0, size=(3, 5, 9))
  got = np.asarray(entropy(jnp.asarray(logits, jnp.float32), 1.0))
  logp = reference_log_softmax(logits)
  want = -(np.exp(logp) * logp).sum(axis=-1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  uniform = entropy(jnp.zeros((1, 1, 9)), 1.0)
  np.testing.assert_allclose(float(uniform[0, 0]), np.log(9), rtol=1e-6)
  peaked = entropy(jnp.array([[[1e4, 0.0, 0.0]]]), 1.0)
  assert 0.0 <= float(peaked[0, 0]) < 1e-6


def test_masked_vocab_entries_give_finite_values_and_gradients():
  logits = jnp.array([[[2.0, -jnp.inf, 0.5, -jnp.inf], [0.0, 1.0, -jnp.inf, 3.0]]])
  tokens = jnp.array([[0, 3]])
  finite = jnp.where(jnp.isfinite(logits), logits, -1e30)  # same distribution, finite logits
  np.testing.assert_allclose(np.asarray(entropy(logits, 1.0)), np.asarray(entropy(finite, 1.0)),
                             rtol=1e-6)

  def objective(z):
    logprobs, entropies = rl.token_logprobs_and_entropy(z, tokens, temperature=0.9)
    return jnp.sum(entropies) + jnp.sum(logprobs)

  grad = np.asarray(jax.grad(objective)(logits))
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[~np.isfinite(np.asarray(logits))], 0.0)


def test_one_position_at_a_time_is_the_same_arithmetic_as_all_at_once():
  """The sampler scores (B, V) per decode step, the trainer (B, N, V): equal to the bit, and the
  log-probs that come with the entropy are `token_logprobs`' own."""
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(scale=4.0, size=(3, 6, 50)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 50, size=(3, 6)))
  score = jax.jit(lambda z, t: rl.token_logprobs_and_entropy(z, t, temperature=0.8))
  at_once = score(logits, tokens)
  steps = [score(logits[:, n], tokens[:, n]) for n in range(6)]
  for got, want in zip(zip(*steps), at_once):
    np.testing.assert_array_equal(np.stack(got, axis=1), np.asarray(want))
  alone = jax.jit(lambda z, t: rl.token_logprobs(z, t, temperature=0.8))(logits, tokens)
  np.testing.assert_array_equal(np.asarray(alone), np.asarray(at_once[0]))
