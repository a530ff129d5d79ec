"""Trainer-side log-probs agree with the sampler's, with images encoded once per prompt, and the
prompt-once scoring equals one full pass over the tiled prompt+completion rows."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.sampling import Sampler, SamplingConfig
from metaphorstar_jax.training import policy
from metaphorstar_jax.training.policy import SequenceBatch, completion_logprobs
from helpers import assert_close_to_largest, tiny_batch


def test_trainer_logprobs_equal_sampler_logprobs_and_chunking_is_exact():
  model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=11)
  batch = tiny_batch(model.config)
  temperature, group = 0.9, 3
  sampler = Sampler(model, SamplingConfig(max_new_tokens=8, temperature=temperature))
  rollouts = sampler(batch, group_size=group, key=jax.random.key(5))
  ids, mask, pixels, grids = sampler.prepare(batch)
  seq = SequenceBatch(ids, mask, pixels, grids, rollouts.tokens_BN, rollouts.mask_BN)
  logprobs, entropy = jax.jit(
      lambda s: completion_logprobs(model, s, temperature=temperature))(seq)
  comp_mask = np.asarray(rollouts.mask_BN).astype(bool)
  gap = np.abs(np.asarray(logprobs) - np.asarray(rollouts.logprobs_BN))[comp_mask]
  assert gap.max() <= 1e-5
  assert (np.asarray(entropy) > 0).all()
  chunked, chunked_entropy = jax.jit(lambda s: completion_logprobs(
      model, s, temperature=temperature, chunk_size=4))(seq)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(logprobs), atol=1e-6)
  np.testing.assert_allclose(np.asarray(chunked_entropy), np.asarray(entropy), atol=1e-6)
  # A chunk that does not divide N pads the last chunk instead of silently not chunking.
  ragged, ragged_entropy = jax.jit(lambda s: completion_logprobs(
      model, s, temperature=temperature, chunk_size=3))(seq)
  np.testing.assert_allclose(np.asarray(ragged), np.asarray(logprobs), atol=1e-6)
  np.testing.assert_allclose(np.asarray(ragged_entropy), np.asarray(entropy), atol=1e-6)


def test_chunked_lm_head_gradient_never_holds_all_logits():
  """With logit chunks, the gradient's temporaries stay near one chunk's (B, W, V) logits at
  any completion width, a multiple of the chunk or not (measured by the compiler, not a clock):
  the tiny model with Qwen's 151,936-token vocabulary, B = 8, chunks of 16."""
  cfg = qwen2_5_vl.preset("tiny")
  cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=151936))
  graphdef, params = nnx.split(qwen2_5_vl.init(cfg))
  B, T = 8, 16
  ones = lambda *shape: jnp.ones(shape, jnp.int32)

  def temporaries(new_tokens, chunk):
    seq = SequenceBatch(ones(B // 2, T), ones(B // 2, T), None, None, ones(B, new_tokens),
                        ones(B, new_tokens))

    def loss(params):
      logprobs, entropy = completion_logprobs(nnx.merge(graphdef, params), seq, chunk_size=chunk)
      return logprobs.sum() + entropy.sum()

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  aligned, ragged = temporaries(128, 16), temporaries(120, 16)
  assert abs(ragged - aligned) <= 0.1 * aligned, (aligned, ragged)
  assert aligned < temporaries(128, 0) / 2 and ragged < temporaries(120, 0) / 2


def tiled_completion_hidden_states(model, batch: SequenceBatch):
  """The reference: the prompt tiled G times and one causal pass over B rows of T + N tokens."""
  P, T = batch.prompt_ids_PT.shape
  B, N = batch.completion_BN.shape
  tile = lambda a, axis=0: jnp.repeat(a, B // P, axis=axis)
  positions_3PT, deltas_P = model.position_ids(batch.prompt_ids_PT, batch.prompt_mask_PT,
                                               batch.image_grid_thw_I3)
  prompt_PTD = model.embed(batch.prompt_ids_PT, batch.pixel_values_XY, batch.image_grid_thw_I3)
  first_B = tile(deltas_P + batch.prompt_mask_PT.sum(axis=1).astype(jnp.int32))
  completion_pos_BN = first_B[:, None] + jnp.arange(N, dtype=jnp.int32)[None]
  positions_3BS = jnp.concatenate(
      [tile(positions_3PT, 1), jnp.broadcast_to(completion_pos_BN[None], (3, B, N))], axis=2)
  x_BSD = jnp.concatenate(
      [tile(prompt_PTD), model.language_model.embed_tokens(batch.completion_BN)], axis=1)
  valid_BS = jnp.concatenate([tile(batch.prompt_mask_PT), batch.completion_mask_BN], axis=1) > 0
  S = T + N  # the whole sequence, each token both a query and a key
  mask_BSS = jnp.tril(jnp.ones((S, S), bool))[None] & valid_BS[:, None, :]
  hidden_BSD, _ = model.language_model(x_BSD, positions_3BS, mask_BSS)
  return hidden_BSD[:, T - 1:T + N - 1]


@pytest.mark.parametrize("new_tokens", [7, 1])
def test_prompt_once_scoring_equals_the_tiled_full_pass(new_tokens, monkeypatch):
  model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=4)
  batch = tiny_batch(model.config)  # one row with two images, one text-only and shorter
  group = 3
  sampler = Sampler(model, SamplingConfig(max_new_tokens=new_tokens))
  ids, mask, pixels, grids = sampler.prepare(batch)  # left-padded to the prompt bucket
  assert len(set(np.asarray(mask).sum(1).tolist())) == 2 and not np.asarray(mask)[:, 0].any()
  rng = np.random.default_rng(0)
  B = ids.shape[0] * group
  tokens = rng.integers(0, 1990, (B, new_tokens)).astype(np.int32)
  lengths = rng.integers(1, new_tokens + 1, B)
  lengths[0] = new_tokens
  completion_mask = (np.arange(new_tokens)[None] < lengths[:, None]).astype(np.int32)
  seq = SequenceBatch(ids, mask, pixels, grids, tokens, completion_mask)
  weights = jnp.asarray(rng.normal(size=(B, new_tokens)).astype(np.float32) * completion_mask)
  graphdef, params = nnx.split(model)

  def loss(params, seq):
    logprobs, entropy = completion_logprobs(nnx.merge(graphdef, params), seq, temperature=0.8)
    return (logprobs * weights).sum() + (entropy * weights).sum(), (logprobs, entropy)

  score = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (_, (logprobs, entropy)), grads = score(params, seq)
  monkeypatch.setattr(policy, "completion_hidden_states", tiled_completion_hidden_states)
  (_, (want_logprobs, want_entropy)), want_grads = jax.jit(
      jax.value_and_grad(loss, has_aux=True))(params, seq)
  valid = completion_mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logprobs)[valid], np.asarray(want_logprobs)[valid],
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(entropy)[valid], np.asarray(want_entropy)[valid],
                             atol=1e-5)
  flat, want_flat = jax.tree.leaves(grads), jax.tree.leaves(want_grads)
  assert len(flat) == len(want_flat)
  worst = 0.0
  for got, want in zip(flat, want_flat):
    got, want = np.asarray(got), np.asarray(want)
    # Relative to the leaf's largest entry: fp32 sums in a different order, on any loss scale.
    worst = max(worst, np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
  assert worst <= 1e-5
  # The gradient reaches the vision tower, i.e. flows through the prompt pass.
  assert np.abs(np.asarray(grads["visual"]["merger"]["mlp_out"]["kernel"][...])).max() > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_remat_changes_no_sampled_token_logprob_logit_or_gradient(dtype):
  """A remat=True model samples (the decode loop runs it inside lax.while_loop) and computes
  exactly what remat=False does; only the backward pass differs, by rounding."""
  plain = qwen2_5_vl.init(qwen2_5_vl.preset("tiny", dtype=dtype), seed=6)
  remat = qwen2_5_vl.init(qwen2_5_vl.preset("tiny", dtype=dtype, remat=True), seed=6)
  batch = tiny_batch(plain.config)
  config = SamplingConfig(max_new_tokens=8, temperature=0.9, return_entropy=True)
  drawn = {}
  for name, model in (("plain", plain), ("remat", remat)):
    sampler = Sampler(model, config)
    drawn[name] = sampler(batch, group_size=2, key=jax.random.key(3))
  for field in ("tokens_BN", "logprobs_BN", "lengths_B", "entropy_BN"):
    np.testing.assert_array_equal(np.asarray(getattr(drawn["remat"], field)),
                                  np.asarray(getattr(drawn["plain"], field)), err_msg=field)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda b: remat(**b))(batch)),
                                np.asarray(jax.jit(lambda b: plain(**b))(batch)))

  rollouts = drawn["plain"]
  ids, mask, pixels, grids = Sampler(plain, config).prepare(batch)
  seq = SequenceBatch(ids, mask, pixels, grids, rollouts.tokens_BN, rollouts.mask_BN)
  weights = np.asarray(rollouts.mask_BN, np.float32)

  def loss(model, seq):
    logprobs, _ = completion_logprobs(model, seq, temperature=0.9)
    return (logprobs.astype(jnp.float32) * weights).sum(), logprobs

  no_grad = {name: nnx.jit(loss)(model, seq)[1]
             for name, model in (("plain", plain), ("remat", remat))}
  np.testing.assert_array_equal(np.asarray(no_grad["remat"]), np.asarray(no_grad["plain"]))
  if dtype != "float32":
    return  # bf16 gradients of two differently fused programs differ by bf16 rounding
  results = {name: nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model, seq)
             for name, model in (("plain", plain), ("remat", remat))}
  (_, logprobs_plain), grads_plain = results["plain"]
  (_, logprobs_remat), grads_remat = results["remat"]
  # Under a gradient XLA fuses the two forwards differently: equal to rounding.
  np.testing.assert_allclose(np.asarray(logprobs_remat), np.asarray(logprobs_plain), atol=1e-5)
  flat_plain, flat_remat = jax.tree.leaves(grads_plain), jax.tree.leaves(grads_remat)
  assert len(flat_plain) == len(flat_remat) > 0
  for got, want in zip(flat_remat, flat_plain):
    assert_close_to_largest(got, want)
