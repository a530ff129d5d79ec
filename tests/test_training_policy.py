"""Trainer-side log-probs agree with the sampler's, with images encoded once per prompt."""

import jax
import numpy as np

from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.sampling import Sampler, SamplingConfig
from metaphorstar_jax.training.policy import SequenceBatch, completion_logprobs
from test_qwen2_5_vl_model import tiny_batch


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
