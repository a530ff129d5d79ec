"""Chunked prefill: encoding and prefilling a generation batch a few prompts at a time draws
exactly the rollouts of one whole-batch prefill, on one device and on eight."""

import jax
import numpy as np
import pytest
from flax import nnx

from hf_reference import random_pixels
from metaphorstar_jax import sharding
from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.sampling import Sampler, SamplingConfig

# Images per prompt (grids); prompt 0 text only, prompt 1 two images.
PROMPT_IMAGES = [[], [[1, 4, 8], [1, 6, 4]], [[1, 4, 4]], [[1, 2, 8]], [], [[1, 6, 6]],
                 [[1, 4, 8]], []]


def batch_of(cfg, prompt_images, seed=0):
  """Left-padded prompts, each with its own images' placeholder tokens and random text."""
  rng = np.random.default_rng(seed)
  merge = cfg.vision.spatial_merge_size ** 2
  rows = []
  for grids in prompt_images:
    row = rng.integers(0, 1990, int(rng.integers(3, 9))).tolist()
    for g in grids:
      row += [cfg.vision_start_token_id] + [cfg.image_token_id] * (int(np.prod(g)) // merge) + [
          cfg.vision_end_token_id] + rng.integers(0, 1990, 2).tolist()
    rows.append(row)
  T = max(map(len, rows))
  ids = np.zeros((len(rows), T), np.int32)
  mask = np.zeros((len(rows), T), np.int32)
  for p, row in enumerate(rows):
    ids[p, T - len(row):], mask[p, T - len(row):] = row, 1
  grids = np.asarray([g for gs in prompt_images for g in gs], np.int32).reshape(-1, 3)
  return dict(input_ids=ids, attention_mask=mask, pixel_values=random_pixels(rng, grids),
              image_grid_thw=grids)


@pytest.fixture(scope="module")
def model():
  return qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=2)


def draw(model, batch, chunk, mesh=None, **kwargs):
  config = SamplingConfig(max_new_tokens=6, temperature=0.9, prefill_chunk=chunk, **kwargs)
  return Sampler(model, config, mesh=mesh)(batch, group_size=2, key=jax.random.key(5))


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_chunked_prefill_draws_the_whole_batchs_rollouts(model, chunk):
  batch = batch_of(model.config, PROMPT_IMAGES)
  whole, chunked = draw(model, batch, 0), draw(model, batch, chunk)
  np.testing.assert_array_equal(np.asarray(chunked.tokens_BN), np.asarray(whole.tokens_BN))
  np.testing.assert_allclose(np.asarray(chunked.logprobs_BN), np.asarray(whole.logprobs_BN),
                             atol=1e-5)


def test_chunks_of_text_only_prompts(model):
  batch = batch_of(model.config, [[]] * 4)
  del batch["pixel_values"], batch["image_grid_thw"]
  np.testing.assert_array_equal(np.asarray(draw(model, batch, 2).tokens_BN),
                                np.asarray(draw(model, batch, 0).tokens_BN))


def test_each_chunk_gets_its_own_prompts_images(model):
  # Chunk k holds prompts k, K + k, ...: with K = 2, prompts 0, 2, 4, 6 and 1, 3, 5, 7.
  batch = batch_of(model.config, PROMPT_IMAGES)
  sampler = Sampler(model, SamplingConfig(max_new_tokens=2, prefill_chunk=4))
  ids, _, pixels, grids = sampler.prepare(batch)
  pixels_K, grids_K = sampler.chunk_images(ids, pixels, grids, 2)
  assert pixels_K.shape[0] == grids_K.shape[0] == 2 and pixels_K.shape[1] % 64 == 0
  for k in range(2):
    wanted = [g for p in range(k, 8, 2) for g in PROMPT_IMAGES[p]]
    real = grids_K[k][:len(wanted)]
    np.testing.assert_array_equal(real, wanted)
    # Its first image is the first image of prompt k (prompt 0 has none: prompt 2's).
    first_prompt = next(p for p in range(k, 8, 2) if PROMPT_IMAGES[p])
    first = sum(len(PROMPT_IMAGES[p]) for p in range(first_prompt))
    offsets = np.cumsum([0] + [int(np.prod(g)) for g in batch["image_grid_thw"]])
    np.testing.assert_array_equal(pixels_K[k][:offsets[first + 1] - offsets[first]],
                                  batch["pixel_values"][offsets[first]:offsets[first + 1]])


def test_a_chunk_that_does_not_divide_the_batch_is_refused(model):
  batch = batch_of(model.config, PROMPT_IMAGES)
  with pytest.raises(ValueError, match="prefill_chunk=3 does not divide the 8 prompts"):
    draw(model, batch, 3)


def test_grids_that_do_not_match_the_image_tokens_are_refused(model):
  batch = batch_of(model.config, PROMPT_IMAGES)
  batch["image_grid_thw"] = batch["image_grid_thw"][::-1].copy()
  with pytest.raises(ValueError, match="image_grid_thw does not match its image tokens"):
    draw(model, batch, 2)


def test_sharded_chunked_prefill_matches_one_device(model):
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)
  batch = batch_of(model.config, PROMPT_IMAGES * 2, seed=3)  # 16 prompts, chunks of 8
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.parameter_shardings(state, mesh))
  sharded_model = nnx.merge(graphdef, state)
  got = draw(sharded_model, batch, 8, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(got.tokens_BN),
                                np.asarray(draw(model, batch, 0).tokens_BN))
