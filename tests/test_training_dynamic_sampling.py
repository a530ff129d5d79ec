"""DAPO dynamic sampling (training/dynamic_sampling.py): which groups are kept, in which order,
with which rows, judged by which metric."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from metaphorstar_jax import rl
from metaphorstar_jax.training.dynamic_sampling import dynamic_sampling, filter_metric
from metaphorstar_jax.training.objective import Objective
from metaphorstar_jax.data.pipeline import collate
from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.sampling import Sampler, SamplingConfig
from helpers import scored_groups, shapes_prompt_batches

G = 2


@pytest.fixture(scope="module")
def setting():
  batches = shapes_prompt_batches(3, num_records=24, seed=4)
  sampler = Sampler(qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=0),
                    SamplingConfig(max_new_tokens=3))
  return batches, sampler


def objective(**loss):
  return Objective(loss=rl.LossConfig(filter_groups=True, filter_groups_metric="acc", **loss),
                   rollout=rl.RolloutConfig(), group_size=G, temperature=1.0, top_p=1.0, top_k=0,
                   max_new_tokens=3)


def test_keeps_mixed_groups_in_draw_order_until_the_batch_is_full(setting):
  batches, sampler = setting
  rewards = [[[1, 1], [0, 1], [0, 0], [1, 0]],
             [[0, 1], [1, 1], [0, 0], [0, 0]],
             [[1, 0], [0, 1], [1, 0], [0, 0]]]
  draws = [scored_groups(batches[d], sampler, rewards[d], tag=d + 1) for d in range(3)]
  kept, metrics = dynamic_sampling(draws[0], lambda i: draws[i], objective(), sampler)
  want = [(0, 1), (0, 3), (1, 0), (2, 0)]  # (draw, prompt)
  assert [r.id for r in kept.records] == [batches[d].records[p].id for d, p in want]
  assert metrics == {"dynamic_sampling/gen_batches": 3, "dynamic_sampling/kept_groups": 4,
                     "dynamic_sampling/kept_frac": 4 / 12}
  # Every row travels with its own prompt: tokens say where they came from.
  traced = [100 * (d + 1) + p * G + g for d, p in want for g in range(G)]
  assert kept.rows.tokens_BN[:, 0].tolist() == traced
  np.testing.assert_array_equal(kept.rewards_B, [r for d, p in want for r in rewards[d][p]])
  assert [s["overall"] for s in kept.scores] == kept.rewards_B.tolist()
  # The prompt arrays are the kept prompts', in the kept order.
  again = sampler.prepare(collate([batches[d].examples[p] for d, p in want], sampler.pad_id))
  for a, b in zip(kept.prepared, again):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_full_first_draw_is_used_as_it_is(setting):
  batches, sampler = setting
  first = scored_groups(batches[0], sampler, [[0, 1]] * 4, tag=1)
  kept, metrics = dynamic_sampling(first, lambda i: pytest.fail("drew more"), objective(),
                                   sampler)
  assert kept is first and metrics["dynamic_sampling/gen_batches"] == 1


def test_the_bound_keeps_what_splits_evenly_and_warns(setting, caplog):
  batches, sampler = setting
  draws = [scored_groups(batches[0], sampler, [[1, 1], [0, 1], [0, 0], [1, 0]], tag=1),
           scored_groups(batches[1], sampler, [[0, 1], [1, 1], [0, 0], [0, 0]], tag=2)]
  kept, metrics = dynamic_sampling(draws[0], lambda i: draws[i],
                                   objective(max_num_gen_batches=2), sampler, multiple=2)
  assert [r.id for r in kept.records] == [batches[0].records[1].id, batches[0].records[3].id]
  assert metrics["dynamic_sampling/kept_groups"] == 2
  assert "Dynamic sampling kept 3 of the 4 groups" in caplog.text
  dead = scored_groups(batches[0], sampler, [[1, 1]] * 4, tag=1)
  none, _ = dynamic_sampling(dead, lambda i: None, objective(), sampler)
  assert none is None  # the data ran out with nothing kept: the step's update is skipped


def test_unknown_filter_metric_is_a_clear_error(setting):
  batches, sampler = setting
  groups = scored_groups(batches[0], sampler, [[0, 1]] * 4, tag=1)
  with pytest.raises(ValueError, match="filter_groups_metric"):
    filter_metric(dataclasses.replace(objective().loss, filter_groups_metric="reward"), groups)


def test_a_generation_batch_keeps_only_the_first_groups_the_step_wants(setting):
  batches, sampler = setting
  first = scored_groups(batches[0], sampler, [[1, 1], [0, 1], [1, 0], [0, 1]], tag=1)
  kept, metrics = dynamic_sampling(first, lambda i: pytest.fail("drew more"), objective(),
                                   sampler, wanted=2)
  assert [r.id for r in kept.records] == [batches[0].records[p].id for p in (1, 2)]
  assert kept.rows.tokens_BN[:, 0].tolist() == [102, 103, 104, 105]
  assert metrics == {"dynamic_sampling/gen_batches": 1, "dynamic_sampling/kept_groups": 2,
                     "dynamic_sampling/kept_frac": 2 / 4}


def test_the_filter_metric_reads_the_reward_verl_names(setting):
  batches, sampler = setting
  groups = scored_groups(batches[0], sampler, [[0, 1], [1, 1], [0, 0], [1, 0]], tag=1)
  groups.shaped_B = groups.rewards_B - 0.5 * np.arange(8)  # an overlong penalty, say
  groups.scores = [{"overall": 2.0, "accuracy": 1.0 - r} for r in groups.rewards_B]
  judged_by = lambda name: dataclasses.replace(
      objective(), loss=dataclasses.replace(objective().loss, filter_groups_metric=name))
  metric = lambda name: filter_metric(judged_by(name).loss, groups)
  np.testing.assert_array_equal(metric("acc"), 1.0 - groups.rewards_B)
  np.testing.assert_array_equal(metric("score"), groups.rewards_B)
  np.testing.assert_array_equal(metric("seq_reward"), groups.rewards_B)
  np.testing.assert_array_equal(metric("seq_final_reward"), groups.shaped_B)
  groups.scores = [{"overall": float(r)} for r in 3 * groups.rewards_B]  # no accuracy component
  np.testing.assert_array_equal(metric("acc"), 3 * groups.rewards_B)
  # Judged by the shaped rewards every group differs, so all four are kept.
  kept, _ = dynamic_sampling(groups, lambda i: None, judged_by("seq_final_reward"), sampler)
  assert kept is groups
