"""DAPO dynamic sampling in the trainer: which groups are kept, in which order, with which rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from metaphorstar_jax import rl, train
from metaphorstar_jax.training.dynamic_sampling import dynamic_sampling, filter_metric
from metaphorstar_jax.training.objective import Objective, draw_size
from metaphorstar_jax.training.rollout import RolloutRows, ScoredGroups
from metaphorstar_jax.data.pipeline import collate
from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.sampling import Sampler, SamplingConfig
from helpers import shapes_prompt_batches, smoke_default_config

G = 2


@pytest.fixture(scope="module")
def setting():
  batches = shapes_prompt_batches(3, num_records=24, seed=4)
  sampler = Sampler(qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=0),
                    SamplingConfig(max_new_tokens=3))
  return batches, sampler


def fake_groups(batch, sampler, rewards_PG, tag):
  """Groups for `batch` with given rewards; each row's tokens encode (tag, row) to trace it."""
  P = len(batch.records)
  rewards = np.asarray(rewards_PG, np.float32).reshape(-1)
  rows = RolloutRows(
      tokens_BN=np.stack([np.full(3, 100 * tag + r, np.int32) for r in range(P * G)]),
      mask_BN=np.ones((P * G, 3), np.int32), sampler_logprobs_BN=np.zeros((P * G, 3), np.float32),
      lengths_B=np.full(P * G, 3, np.int32), truncated_B=np.zeros(P * G, bool))
  scores = [{"overall": float(r), "accuracy": float(r)} for r in rewards]
  return ScoredGroups(list(batch.records), list(batch.examples), sampler.prepare(batch.arrays),
                      rows, rewards, rewards.copy(), scores)


def objective(**loss):
  return Objective(loss=rl.LossConfig(filter_groups=True, filter_groups_metric="acc", **loss),
                   rollout=rl.RolloutConfig(), group_size=G, temperature=1.0, top_p=1.0, top_k=0,
                   max_new_tokens=3)


def test_keeps_mixed_groups_in_draw_order_until_the_batch_is_full(setting):
  batches, sampler = setting
  rewards = [[[1, 1], [0, 1], [0, 0], [1, 0]],
             [[0, 1], [1, 1], [0, 0], [0, 0]],
             [[1, 0], [0, 1], [1, 0], [0, 0]]]
  draws = [fake_groups(batches[d], sampler, rewards[d], tag=d + 1) for d in range(3)]
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
  first = fake_groups(batches[0], sampler, [[0, 1]] * 4, tag=1)
  kept, metrics = dynamic_sampling(first, lambda i: pytest.fail("drew more"), objective(),
                                   sampler)
  assert kept is first and metrics["dynamic_sampling/gen_batches"] == 1


def test_the_bound_keeps_what_splits_evenly_and_warns(setting, caplog):
  batches, sampler = setting
  draws = [fake_groups(batches[0], sampler, [[1, 1], [0, 1], [0, 0], [1, 0]], tag=1),
           fake_groups(batches[1], sampler, [[0, 1], [1, 1], [0, 0], [0, 0]], tag=2)]
  kept, metrics = dynamic_sampling(draws[0], lambda i: draws[i],
                                   objective(max_num_gen_batches=2), sampler, multiple=2)
  assert [r.id for r in kept.records] == [batches[0].records[1].id, batches[0].records[3].id]
  assert metrics["dynamic_sampling/kept_groups"] == 2
  assert "Dynamic sampling kept 3 of the 4 groups" in caplog.text
  dead = fake_groups(batches[0], sampler, [[1, 1]] * 4, tag=1)
  none, _ = dynamic_sampling(dead, lambda i: None, objective(), sampler)
  assert none is None  # the data ran out with nothing kept: the step's update is skipped


def test_unknown_filter_metric_is_a_clear_error(setting):
  batches, sampler = setting
  groups = fake_groups(batches[0], sampler, [[0, 1]] * 4, tag=1)
  with pytest.raises(ValueError, match="filter_groups_metric"):
    filter_metric(dataclasses.replace(objective().loss, filter_groups_metric="reward"), groups)


def test_the_trainer_runs_dapo_dynamic_sampling(tmp_path):
  import json
  import os

  config = smoke_default_config(tmp_path / "run")
  config.log.plot = config.log.tensorboard = False
  config.rl.overrides = dict(config.rl.overrides, filter_groups=True,
                             filter_groups_metric="seq_reward", max_num_gen_batches=3)
  train.train(config)
  with open(os.path.join(config.workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  grpo = [r for r in rows if r.get("stage") == 1]
  assert len(grpo) == config.stages[1].steps
  for row in grpo:
    assert 1 <= row["dynamic_sampling/gen_batches"] <= 3
    assert 0 <= row["dynamic_sampling/kept_frac"] <= 1
    kept = row["dynamic_sampling/kept_groups"]
    assert kept == 0 or np.isfinite(row["loss"])


def test_a_generation_batch_needs_dynamic_sampling():
  from metaphorstar_jax import config_defaults as common
  config = common.base_config()
  config.train.prompts_per_step, config.train.gen_prompts_per_step = 4, 8
  stage = common.stage("rl", kind="grpo", steps=1, learning_rate=1e-6)
  with pytest.raises(ValueError, match="gen_prompts_per_step=8"):
    draw_size(config, stage, dataclasses.replace(objective(), loss=rl.LossConfig()))
  assert draw_size(config, stage, objective()) == 8
  assert draw_size(config, common.stage("sft", kind="sft", steps=1, learning_rate=1e-6),
                   objective()) == 4
