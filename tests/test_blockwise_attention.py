"""Blockwise (online-softmax) attention equals the direct masked softmax, in value and gradient,
through the model and the trainer, and never holds a head's whole score matrix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.models.qwen2_5_vl import blockwise_attention, layers
from metaphorstar_jax.sampling import Sampler, SamplingConfig
from metaphorstar_jax.training.policy import SequenceBatch, completion_logprobs
from helpers import tiny_batch


def random_inputs(seed, B=4, T=6, N=4, K=2, H=8, S=13):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  mask = rng.random((B, T, S)) > 0.5
  mask[0, 2] = False  # a query that sees nothing (left padding makes these)
  mask[1] = np.tril(np.ones((T, S), bool), k=S - T)  # causal over a longer cache
  return normal(B, T, N, H), normal(B, K, S, H), normal(B, K, S, H), jnp.asarray(mask), \
      normal(B, T, N, H)


def max_gap(a, b):
  return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("block", [1, 4, 13, 32])
def test_blockwise_equals_direct_attention_and_its_gradients(block, monkeypatch):
  q, k, v, mask, weights = random_inputs(block)
  monkeypatch.setattr(layers, "ATTENTION_BLOCK", block)

  def loss(q, k, v, blockwise):
    return (layers.attend(q, k, v, mask, blockwise=blockwise) * weights).sum()

  direct = layers.attend(q, k, v, mask, blockwise=False)
  blockwise = layers.attend(q, k, v, mask, blockwise=True)
  assert float(jnp.abs(direct - blockwise).max()) <= 1e-5
  assert float(jnp.abs(blockwise[0, 2]).max()) == 0.0  # the blind query: zeros, not NaN
  grads = [jax.grad(loss, argnums=(0, 1, 2))(q, k, v, flag) for flag in (False, True)]
  assert max_gap(*grads) <= 1e-5


def test_log_sum_exp_and_its_gradient():
  q, k, v, mask, weights = random_inputs(7)
  _, lse = blockwise_attention.attention_with_lse(q, k, v, mask, 4)
  scores = jnp.einsum("btkgh,bksh->bkgts", q.reshape(*q.shape[:2], 2, 2, -1), k) * 8 ** -0.5
  want = jax.nn.logsumexp(jnp.where(mask[:, None, None], scores, -jnp.inf), axis=-1)
  want = jnp.transpose(want, (0, 3, 1, 2)).reshape(lse.shape)
  seen = np.asarray(mask.any(-1))
  np.testing.assert_allclose(np.asarray(lse)[seen], np.asarray(want)[seen], atol=1e-5)
  assert (np.asarray(lse)[~seen] == blockwise_attention.EMPTY_LSE).all()

  def through_lse(q, k, v, custom):
    run = blockwise_attention.attention_with_lse if custom else blockwise_attention._forward
    out, lse = run(q, k, v, mask, 4)
    return (out * weights).sum() + (lse * weights[..., 0]).sum()

  # The custom backward against autodiff through the forward recurrence.
  grads = [jax.grad(through_lse, argnums=(0, 1, 2))(q, k, v, flag) for flag in (False, True)]
  assert max_gap(*grads) <= 1e-5


def test_shared_prefix_attention_blockwise_equals_direct(monkeypatch):
  rng = np.random.default_rng(3)
  P, C, T, N, K, H, R, S = 2, 3, 5, 4, 2, 8, 9, 5
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  q, k, v = normal(P * C, T, N, H), normal(P * C, K, S, H), normal(P * C, K, S, H)
  prefix_k, prefix_v = normal(P, K, R, H), normal(P, K, R, H)
  prefix_mask = jnp.asarray(np.arange(R)[None] >= np.array([[0], [4]]))  # left padding
  mask = jnp.asarray(np.broadcast_to(np.tril(np.ones((T, S), bool)), (P * C, T, S)))
  weights = normal(P * C, T, N, H)
  monkeypatch.setattr(layers, "ATTENTION_BLOCK", 2)

  def run(q, k, v, prefix_k, prefix_v, blockwise):
    monkeypatch.setattr(layers, "_blockwise", lambda *_: blockwise)
    return layers.attend_after_prefix(q, k, v, mask, prefix_k, prefix_v, prefix_mask)

  args = (q, k, v, prefix_k, prefix_v)
  assert max_gap(run(*args, False), run(*args, True)) <= 1e-5
  loss = lambda *a: (run(*a) * weights).sum()
  grads = [jax.grad(lambda *a: loss(*a, flag), argnums=tuple(range(5)))(*args)
           for flag in (False, True)]
  assert max_gap(*grads) <= 1e-5


def test_model_logits_and_sampler_equal_trainer_logprobs_on_the_blockwise_path(monkeypatch):
  model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=8)
  batch = tiny_batch(model.config)
  direct = np.asarray(jax.jit(lambda b: model(**b))(batch))
  monkeypatch.setattr(layers, "ATTENTION_BLOCK", 4)  # every decoder attention goes blockwise
  blockwise = np.asarray(jax.jit(lambda b: model(**b))(batch))
  valid = batch["attention_mask"].astype(bool)
  assert np.abs(blockwise - direct)[valid].max() <= 1e-5
  sampler = Sampler(model, SamplingConfig(max_new_tokens=8, temperature=0.9))
  rollouts = sampler(batch, group_size=3, key=jax.random.key(1))
  seq = SequenceBatch(*sampler.prepare(batch), rollouts.tokens_BN, rollouts.mask_BN)
  logprobs, _ = jax.jit(lambda s: completion_logprobs(model, s, temperature=0.9))(seq)
  drawn = np.asarray(rollouts.mask_BN).astype(bool)
  assert np.abs(np.asarray(logprobs) - np.asarray(rollouts.logprobs_BN))[drawn].max() <= 1e-5


def test_blockwise_gradient_never_holds_the_score_matrix():
  """Compiled temporaries of the attention gradient at T = S = 2048 (measured by the compiler):
  a few (block × block) score blocks instead of several (T × S) matrices."""
  B, T, N, K, H = 1, 2048, 4, 2, 16
  q = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
  kv = jax.ShapeDtypeStruct((B, K, T, H), jnp.float32)
  mask = jnp.tril(jnp.ones((T, T), bool))[None]

  def temporaries(blockwise):
    loss = lambda q, k, v: layers.attend(q, k, v, mask, blockwise=blockwise).sum()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  scores = B * N * T * T * 4
  direct, blockwise = temporaries(False), temporaries(True)
  assert direct >= scores
  assert blockwise < scores / 2, (direct, blockwise, scores)
  print(f"attention gradient temporaries at T = S = {T}: direct {direct / 2**20:.0f} MiB, "
        f"blockwise {blockwise / 2**20:.0f} MiB")
