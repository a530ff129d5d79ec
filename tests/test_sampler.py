"""The rollout sampler: greedy parity with transformers, log-probs, distributions, stops, compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_reference import IMAGE_PAD, random_pixels, sample_ids
from metaphorstar_jax import rl, sharding
from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.sampling import Sampler, SamplingConfig, generate, next_tokens
from metaphorstar_jax.sampling.logits_processing import first_max_index
from helpers import tiny_batch

VISION_SPECIALS = [151652, 151653, 151655, 151656]
_loaded = {}


def ours(hf_tiny, name):
  if name not in _loaded:
    _loaded[name] = qwen2_5_vl.from_pretrained(hf_tiny(name)[1])
  return _loaded[name]


def left_padded(rows):
  T = max(map(len, rows))
  ids = np.zeros((len(rows), T), np.int64)
  mask = np.zeros((len(rows), T), np.int64)
  for b, row in enumerate(rows):
    ids[b, T - len(row):], mask[b, T - len(row):] = row, 1
  return ids, mask


def hf_greedy(hf_model, ids, mask, pixels, grids, new_tokens):
  ids_t = torch.tensor(ids)
  kwargs = dict(input_ids=ids_t, attention_mask=torch.tensor(mask),
                mm_token_type_ids=(ids_t == IMAGE_PAD).int())
  if pixels is not None:
    kwargs.update(pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids))
  hf_model.model.rope_deltas = None  # transformers keeps these between calls
  with torch.no_grad():
    out = hf_model.generate(**kwargs, do_sample=False, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, suppress_tokens=VISION_SPECIALS,
                            eos_token_id=[151645, 151643], pad_token_id=151643)
  return out[:, ids.shape[1]:].numpy()


CASES = {
    "text": ([[23]], None),
    "one_image": ([[9, ("image", 24), 5]], [[1, 8, 12]]),
    "two_images": ([[4, ("image", 24), 3, ("image", 9), 6]], [[1, 8, 12], [1, 6, 6]]),
    "padded_batch": ([[3, ("image", 24), 20], [5], [2, ("image", 9), 2]], [[1, 8, 12], [1, 6, 6]]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_matches_transformers_generate(hf_tiny, case):
  segments, grids = CASES[case]
  rng = np.random.default_rng(len(case))
  ids, mask = left_padded([sample_ids(rng, s) for s in segments])
  pixels = random_pixels(rng, grids) if grids else None
  new_tokens = 10
  # Stops are disabled on both sides so every row runs the full length.
  sampler = Sampler(ours(hf_tiny, "a"), SamplingConfig(max_new_tokens=new_tokens, greedy=True,
                                                       stop_token_ids=()))
  batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels,
               image_grid_thw=None if grids is None else np.asarray(grids))
  got = np.asarray(sampler(batch).tokens_BN)
  expected = hf_greedy(hf_tiny("a")[0], ids, mask, pixels, grids, new_tokens)
  np.testing.assert_array_equal(got, expected)


def teacher_forced_logprobs(model, batch, prepared, rollouts, group_size, temperature):
  """Log-probs of the sampled tokens from one full forward pass over prompt + completion."""
  ids, mask, _, _ = prepared
  num_prompts = ids.shape[0]
  tokens, comp_mask = np.asarray(rollouts.tokens_BN), np.asarray(rollouts.mask_BN)
  full_ids = np.concatenate([np.repeat(ids, group_size, 0), tokens], 1)
  full_mask = np.concatenate([np.repeat(mask, group_size, 0), comp_mask], 1)
  # Images of row p·G + g are prompt p's, in row order.
  per_prompt = np.split(batch["pixel_values"], np.cumsum(
      [int(np.prod(g)) for g in batch["image_grid_thw"]])[:-1])
  images_of = _images_per_prompt(batch, model.config.image_token_id)
  pixels, grids = [], []
  for p in range(num_prompts):
    for _ in range(group_size):
      pixels += [per_prompt[i] for i in images_of[p]]
      grids += [batch["image_grid_thw"][i] for i in images_of[p]]
  logits = model(full_ids, attention_mask=full_mask, pixel_values=np.concatenate(pixels),
                 image_grid_thw=np.asarray(grids))
  T = ids.shape[1]
  picked = rl.token_logprobs(logits[:, T - 1:-1].reshape(-1, logits.shape[-1]),
                             jnp.asarray(tokens.reshape(-1)), temperature=temperature)
  return np.asarray(picked).reshape(tokens.shape) * comp_mask


def _images_per_prompt(batch, image_token_id):
  counts = [int((row == image_token_id).sum()) for row in np.asarray(batch["input_ids"])]
  sizes = [int(np.prod(g)) // 4 for g in batch["image_grid_thw"]]
  out, image = [], 0
  for count in counts:
    mine = []
    while count > 0:
      mine.append(image)
      count -= sizes[image]
      image += 1
    out.append(mine)
  return out


def test_sampled_logprobs_equal_teacher_forcing():
  model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=1)
  batch = tiny_batch(model.config)
  temperature, group = 0.8, 4
  sampler = Sampler(model, SamplingConfig(max_new_tokens=12, temperature=temperature, top_p=0.9,
                                          top_k=50))
  rollouts = sampler(batch, group_size=group, key=jax.random.key(3))
  expected = teacher_forced_logprobs(model, batch, sampler.prepare(batch), rollouts, group,
                                     temperature)
  assert np.abs(expected - np.asarray(rollouts.logprobs_BN)).max() <= 1e-5
  # Rows of a group differ: they were sampled, not copied.
  tokens = np.asarray(rollouts.tokens_BN)
  assert len({tuple(r) for r in tokens[:group]}) > 1


def test_returned_entropy_is_the_trainers_and_changes_no_draw():
  from metaphorstar_jax.training.policy import SequenceBatch, completion_logprobs
  model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=1)
  batch = tiny_batch(model.config)
  settings = dict(max_new_tokens=9, temperature=0.7, top_k=40)
  plain = Sampler(model, SamplingConfig(**settings))
  measured = Sampler(model, SamplingConfig(**settings, return_entropy=True))
  without = plain(batch, group_size=3, key=jax.random.key(5))
  rollouts = measured(batch, group_size=3, key=jax.random.key(5))
  assert without.entropy_BN is None
  np.testing.assert_array_equal(np.asarray(rollouts.tokens_BN), np.asarray(without.tokens_BN))
  mask = np.asarray(rollouts.mask_BN)
  seq = SequenceBatch(*measured.prepare(batch), np.asarray(rollouts.tokens_BN), mask)
  graphdef, state = nnx.split(model)
  # Jitted, as the trainer runs it (the bucketed patches include a padding image no token reads).
  _, entropy = jax.jit(lambda state, seq: completion_logprobs(
      nnx.merge(graphdef, state), seq, temperature=0.7))(state, seq)
  np.testing.assert_allclose(np.asarray(rollouts.entropy_BN), np.asarray(entropy) * mask,
                             atol=1e-5)
  assert (np.asarray(rollouts.entropy_BN)[mask > 0] > 0).all()


TOY_LOGITS = np.log(np.asarray([0.30, 0.25, 0.20, 0.12, 0.08, 0.05]))


def empirical(draws, vocab):
  return np.bincount(np.asarray(draws).reshape(-1), minlength=vocab) / np.asarray(draws).size


def draw(n, **kwargs):
  logits = jnp.broadcast_to(jnp.asarray(TOY_LOGITS, jnp.float32), (n, len(TOY_LOGITS)))
  return next_tokens(jax.random.key(7), logits, greedy=False, **kwargs)


def expected_distribution(temperature=1.0, top_k=0, top_p=1.0, banned=()):
  logits = TOY_LOGITS / temperature
  logits[list(banned)] = -np.inf
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  order = np.argsort(-probs)
  keep = np.zeros_like(probs, bool)
  keep[order[:top_k] if top_k else order] = True
  mass_above = np.cumsum(probs[order]) - probs[order]
  keep[order[mass_above >= top_p]] = False
  probs = np.where(keep, probs, 0)
  return probs / probs.sum()


@pytest.mark.parametrize("kwargs", [
    dict(temperature=1.0, top_k=0, top_p=1.0),
    dict(temperature=0.5, top_k=0, top_p=1.0),
    dict(temperature=2.0, top_k=0, top_p=1.0),
    dict(temperature=1.0, top_k=3, top_p=1.0),
    dict(temperature=1.0, top_k=0, top_p=0.6),
    dict(temperature=0.7, top_k=4, top_p=0.8),
])
def test_sampling_follows_the_filtered_distribution(kwargs):
  n = 60000
  got = empirical(draw(n, **kwargs), len(TOY_LOGITS))
  want = expected_distribution(**kwargs)
  # 5 standard deviations of a frequency estimated from n draws.
  assert np.all(np.abs(got - want) <= 5 * np.sqrt(want * (1 - want) / n) + 1e-9), (got, want)


def test_banned_tokens_are_never_drawn():
  # (Their log-probs still count the banned tokens: see test_sampled_logprobs_equal_teacher_forcing,
  # where the vision tokens are banned.)
  n = 20000
  logits = jnp.broadcast_to(jnp.asarray(TOY_LOGITS, jnp.float32), (n, 6))
  tokens = next_tokens(jax.random.key(1), logits, greedy=False, temperature=1.0, top_k=0,
                       top_p=1.0, banned_ids=(0, 2))
  got = empirical(tokens, 6)
  assert got[0] == 0 and got[2] == 0
  want = expected_distribution(banned=(0, 2))
  assert np.all(np.abs(got - want) <= 5 * np.sqrt(want * (1 - want) / n) + 1e-9)


def test_first_max_index_is_argmax_and_draws_are_jax_categorical():
  x = np.array(jax.random.normal(jax.random.key(0), (8, 300)))
  x[1, [4, 9]] = 5.0          # ties: the first wins
  x[2] = -np.inf              # nothing allowed
  x[3, [7, 2]] = np.nan       # the first NaN, as argmax
  x[4, [5, 11]] = np.inf
  np.testing.assert_array_equal(np.asarray(first_max_index(jnp.asarray(x))), np.argmax(x, -1))
  logits = jnp.asarray(x[5:]).at[:, :10].set(-jnp.inf)
  for seed in range(5):
    key = jax.random.key(seed)
    tokens = next_tokens(key, logits, greedy=False, temperature=1.0, top_k=0, top_p=1.0)
    np.testing.assert_array_equal(np.asarray(tokens),
                                  np.asarray(jax.random.categorical(key, logits, axis=-1)))


def test_vision_tokens_are_never_sampled_even_when_most_likely():
  cfg = qwen2_5_vl.preset("tiny")
  model = qwen2_5_vl.init(cfg, seed=4)
  kernel = model.lm_head.kernel[...]
  for token in (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id,
                cfg.video_token_id):
    kernel = kernel.at[:, token].set(50.0 * jnp.sign(model.language_model.norm.scale[...]))
  model.lm_head.kernel.set_value(kernel)
  batch = tiny_batch(cfg)
  for greedy in (True, False):
    rollouts = Sampler(model, SamplingConfig(max_new_tokens=6, greedy=greedy))(
        batch, group_size=2, key=jax.random.key(0))
    tokens = np.asarray(rollouts.tokens_BN)
    assert not np.isin(tokens, [cfg.image_token_id, cfg.vision_start_token_id,
                                cfg.vision_end_token_id, cfg.video_token_id]).any()


def test_rows_stop_independently():
  cfg = qwen2_5_vl.preset("tiny")
  model = qwen2_5_vl.init(cfg, seed=5)
  stops = tuple(range(0, 2000, 9))  # about one token in nine stops a row
  sampler = Sampler(model, SamplingConfig(max_new_tokens=24, stop_token_ids=stops))
  rollouts = sampler(tiny_batch(cfg), group_size=8, key=jax.random.key(2))
  tokens, lengths = np.asarray(rollouts.tokens_BN), np.asarray(rollouts.lengths_B)
  truncated, mask = np.asarray(rollouts.truncated_B), np.asarray(rollouts.mask_BN)
  assert len(set(lengths.tolist())) > 3
  for row, length, cut in zip(tokens, lengths, truncated):
    assert not np.isin(row[:length - 1], stops).any()
    assert np.isin(row[length - 1], stops) != cut
    assert (row[length:] == sampler.pad_id).all()
  np.testing.assert_array_equal(mask.sum(1), lengths)
  assert (np.asarray(rollouts.logprobs_BN)[mask == 0] == 0).all()


def test_per_row_budgets():
  model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=6)
  sampler = Sampler(model, SamplingConfig(max_new_tokens=10, stop_token_ids=()))
  budgets = [1, 3, 10, 7]
  rollouts = sampler(tiny_batch(model.config), group_size=2, key=jax.random.key(0),
                     max_new_tokens_per_row=budgets)
  np.testing.assert_array_equal(np.asarray(rollouts.lengths_B), budgets)
  assert np.asarray(rollouts.truncated_B).all()


def test_compile_count_is_constant_across_weight_updates_and_bucketed_prompts():
  cfg = qwen2_5_vl.preset("tiny")
  model = qwen2_5_vl.init(cfg, seed=7)
  sampler = Sampler(model, SamplingConfig(max_new_tokens=5))
  batch = tiny_batch(cfg)
  sampler(batch, group_size=2, key=jax.random.key(0))
  compiled = sampler.compiled_programs
  assert compiled == 2  # one prefill, one decode loop
  state = sampler.state
  for step in range(3):
    state = jax.tree.map(lambda x: x * 1.01, state)  # a weight update
    shorter = dict(batch, input_ids=batch["input_ids"].copy(),
                   attention_mask=batch["attention_mask"].copy())
    shorter["attention_mask"][1, :step + 1] = 0  # a shorter prompt, same bucket
    rollouts = sampler(shorter, group_size=2, key=jax.random.key(step), state=state)
  assert sampler.compiled_programs == compiled
  # A different bucket compiles, and the count says so.
  long = {k: v for k, v in batch.items()}
  long["input_ids"] = np.pad(batch["input_ids"], ((0, 0), (70, 0)), constant_values=5)
  long["attention_mask"] = np.pad(batch["attention_mask"], ((0, 0), (70, 0)), constant_values=1)
  sampler(long, group_size=2, key=jax.random.key(0))
  assert sampler.compiled_programs == compiled + 2
  assert np.asarray(rollouts.tokens_BN).shape == (4, 5)


def test_a_sampler_that_keeps_no_weights_takes_them_per_call():
  model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=7)
  config = SamplingConfig(max_new_tokens=4, greedy=True)
  weightless = Sampler(model, config, keep_weights=False)
  assert weightless.state is None
  batch = tiny_batch(model.config)
  with pytest.raises(ValueError, match="state="):
    weightless(batch)
  np.testing.assert_array_equal(np.asarray(weightless(batch, state=nnx.state(model)).tokens_BN),
                                np.asarray(Sampler(model, config)(batch).tokens_BN))


def test_sharded_sampler_matches_single_device(hf_tiny):
  assert jax.device_count() == 8
  _, hf_dir = hf_tiny("a")
  mesh = sharding.make_mesh(data=2, fsdp=4)
  rng = np.random.default_rng(11)
  ids, mask = left_padded([sample_ids(rng, [3, ("image", 24), 5]), sample_ids(rng, [12])])
  batch = dict(input_ids=ids, attention_mask=mask, pixel_values=random_pixels(rng, [[1, 8, 12]]),
               image_grid_thw=np.asarray([[1, 8, 12]]))
  config = SamplingConfig(max_new_tokens=8, greedy=True)
  sharded = Sampler(qwen2_5_vl.from_pretrained(hf_dir, mesh=mesh), config, mesh=mesh)
  single = Sampler(ours(hf_tiny, "a"), config)
  got = sharded(batch, group_size=4)
  assert got.tokens_BN.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_array_equal(np.asarray(got.tokens_BN),
                                np.asarray(single(batch, group_size=4).tokens_BN))


def test_generate_helper_returns_strings():
  from metaphorstar_jax import data
  from metaphorstar_jax.tasks.shape_scenes import example_image
  processor = data.ChatProcessor.from_tokenizer(
      data.build_small_tokenizer(), data.ImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112))
  model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=8)
  texts = generate(model, processor, ["Describe the picture.", "Is the sky green?"],
                   images=[[example_image()], []], max_new_tokens=6, greedy=False,
                   num_samples=3, seed=1)
  assert len(texts) == 2 and all(len(t) == 3 for t in texts)
  assert all(isinstance(s, str) for t in texts for s in t)
  again = generate(model, processor, ["Is the sky green?"], max_new_tokens=6)
  assert again == generate(model, processor, ["Is the sky green?"], max_new_tokens=6)
