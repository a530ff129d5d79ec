"""Splitting a step's prompts: equal prompt sets (shuffled when asked), each prompt's rows together,
prompt widths trimmed to a few compiled sizes, and micro-batch metrics combined by kind."""

import numpy as np
import pytest

from metaphorstar_jax.training import batching


def test_prompt_subsets_split_every_prompt_once_into_equal_parts():
  in_order = batching.prompt_subsets(6, 3)
  assert [part.tolist() for part in in_order] == [[0, 1], [2, 3], [4, 5]]
  shuffled = batching.prompt_subsets(8, 2, np.random.default_rng(0))
  assert [len(part) for part in shuffled] == [4, 4]
  assert sorted(np.concatenate(shuffled).tolist()) == list(range(8))
  assert np.concatenate(shuffled).tolist() != list(range(8))
  again = batching.prompt_subsets(8, 2, np.random.default_rng(0))
  assert all(np.array_equal(a, b) for a, b in zip(shuffled, again))
  with pytest.raises(ValueError, match="6 prompts per step cannot be split into 4 parts"):
    batching.prompt_subsets(6, 4)


def test_rows_of_keeps_each_prompts_group_together_in_prompt_order():
  assert batching.rows_of(np.asarray([2, 0]), 3).tolist() == [6, 7, 8, 0, 1, 2]
  assert batching.rows_of(np.asarray([1]), 1).tolist() == [1]


@pytest.mark.parametrize("bucket, longest, width", [
    (256, 1, 16), (256, 16, 16), (256, 17, 32), (256, 250, 256), (256, 256, 256),
    (8, 3, 3), (8, 8, 8), (40, 5, 6)])
def test_prompt_width_rounds_the_longest_prompt_up_to_a_sixteenth_of_the_bucket(bucket, longest,
                                                                               width):
  assert batching.prompt_width(bucket, longest) == width


def test_minibatch_metrics_sum_shares_take_extremes_and_average_the_rest():
  micro = [dict(loss=0.25, pg_loss=0.5, kl_loss=0.125, num_tokens=10, ratio_max=1.5,
                ratio_min=0.75, entropy=2.0, clip_fraction=0.25),
           dict(loss=0.5, pg_loss=-0.25, kl_loss=0.25, num_tokens=6, ratio_max=1.25,
                ratio_min=0.5, entropy=1.0)]
  combined = batching.minibatch_metrics(micro)
  assert combined == dict(loss=0.75, pg_loss=0.25, kl_loss=0.375, num_tokens=16.0,
                          ratio_max=1.5, ratio_min=0.5, entropy=1.5, clip_fraction=0.25)
  assert batching.mean_metrics(micro)["loss"] == 0.375
