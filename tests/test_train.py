"""The trainer end to end: a scaled-down default, exact resumption after SIGKILL, sharded steps
matching one device, and non-finite updates skipped."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metaphorstar_jax import rl, sharding
from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.sampling import Sampler, SamplingConfig
from metaphorstar_jax.training import batching, checkpoints, metrics as metrics_lib, optimizer
from metaphorstar_jax.training import step as step_lib
from metaphorstar_jax.training.policy import SequenceBatch
from helpers import (REPO_ROOT, history, make_steps, optim_config, scaled_down_flags,
                     shapes_prompt_batches, smoke_default_config, tiny_batch)

def run_train(flags, expect_kill=False):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-m", "metaphorstar_jax.train", *flags], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
  if expect_kill:
    assert result.returncode == -9, (result.returncode, result.stderr[-3000:])
  else:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def final_params(workdir):
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  step = ckpt.latest_step()
  meta = ckpt.restore_meta(step)
  params = ckpt.restore_saved_arrays(step)["params"]
  ckpt.close()
  return step, meta, params


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted_run(tmp_path):
  straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
  run_train(scaled_down_flags(straight))
  run_train(scaled_down_flags(interrupted) + ["--config.debug.kill_after_checkpoint=3"],
            expect_kill=True)
  killed = history(interrupted)
  assert max(killed) == 3  # nothing after the kill
  run_train(scaled_down_flags(interrupted))
  expected, resumed = history(straight), history(interrupted)
  assert sorted(resumed) == sorted(expected) == [1, 2, 3, 4, 5]
  for step in (4, 5):
    assert resumed[step] == expected[step], step
  assert np.isfinite(expected[5]["loss"])
  step_a, meta_a, params_a = final_params(straight)
  step_b, meta_b, params_b = final_params(interrupted)
  assert step_a == step_b == 5 and meta_a == meta_b
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_scaled_down_default_trains_and_checkpoint_restores(tmp_path):
  from metaphorstar_jax import train
  config = smoke_default_config(tmp_path / "run")
  results = train.train(config)
  assert np.isfinite(results["last"]["loss"])
  assert "before grpo" in results and "after grpo" in results
  assert os.path.exists(os.path.join(config.workdir, "curves.png"))
  assert os.path.isdir(os.path.join(config.workdir, "tensorboard"))
  ckpt = checkpoints.Checkpointer(os.path.join(config.workdir, "checkpoints"), async_save=False)
  assert ckpt.latest_step() == 4
  params = results["final_params"]
  saved = ckpt.restore_saved_arrays(4)
  for a, b in zip(jax.tree.leaves(saved["params"]), jax.tree.leaves(nnx.to_pure_dict(params))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert ckpt.restore_meta(4)["stage"] == "grpo"
  ckpt.close()

  # A fresh run in this used workdir is refused before anything loads; overwrite clears it.
  config.checkpoint.resume = False
  with pytest.raises(ValueError, match=r"holds checkpoints of another run \(steps \[.*4\]\)"):
    train.train(config)
  config.checkpoint.overwrite = True
  config.stages[0].steps = config.stages[1].steps = 1
  train.train(config)
  assert checkpoints.saved_steps(os.path.join(config.workdir, "checkpoints")) == [1, 2]
  rows = metrics_lib.read_history(os.path.join(config.workdir, "metrics.jsonl"))
  assert sorted({row["step"] for row in rows}) == [1, 2]  # nothing of the old run's 4 steps


def grpo_inputs(model, group=4):
  batch = tiny_batch(model.config)
  sampler = Sampler(model, SamplingConfig(max_new_tokens=6))
  rollouts = sampler(batch, group_size=group, key=jax.random.key(0))
  prepared = sampler.prepare(batch)
  seq = SequenceBatch(*prepared, np.asarray(rollouts.tokens_BN), np.asarray(rollouts.mask_BN))
  rewards = np.random.default_rng(0).random((2, group)).astype(np.float32)
  advantages = np.asarray(rl.grpo_advantages(jnp.asarray(rewards))).reshape(-1)
  return seq, advantages, np.asarray(rollouts.logprobs_BN)


def one_update(steps, params, opt_state, seq, advantages, sampler_logprobs, mesh=None):
  place = lambda a: sharding.place_rows(a, mesh)
  seq = SequenceBatch(place(seq.prompt_ids_PT), place(seq.prompt_mask_PT), seq.pixel_values_XY,
                      seq.image_grid_thw_I3, place(seq.completion_BN),
                      place(seq.completion_mask_BN))
  mask = seq.completion_mask_BN
  # A reference policy a little off the sampler's, so the low_var_kl term is not zero.
  ref_logprobs = place(sampler_logprobs - 0.05 * np.asarray(seq.completion_mask_BN))
  grads, metrics = steps.grpo_grads(params, seq, place(advantages), None, ref_logprobs,
                                    place(sampler_logprobs), mask, float(np.asarray(mask).sum()),
                                    float(mask.shape[0]))
  params, opt_state, applied = steps.apply(params, opt_state, grads)
  return params, opt_state, {**metrics, **applied}


def test_grpo_step_on_eight_devices_matches_one_device(hf_tiny):
  assert jax.device_count() == 8
  _, hf_dir = hf_tiny("a")
  mesh = sharding.make_mesh(data=2, fsdp=4)
  single = qwen2_5_vl.from_pretrained(hf_dir)
  sharded = qwen2_5_vl.from_pretrained(hf_dir, mesh=mesh)
  seq, advantages, sampler_logprobs = grpo_inputs(single)
  steps_a, params_a, opt_a = make_steps(single)
  steps_b, params_b, opt_b = make_steps(sharded)
  up_kernel = params_b["language_model"]["layers"]["mlp"]["up_proj"]["kernel"][...]  # (L, in, out)
  assert up_kernel.sharding.spec[:2] == (None, "fsdp")
  new_a, _, metrics_a = one_update(steps_a, params_a, opt_a, seq, advantages, sampler_logprobs)
  new_b, _, metrics_b = one_update(steps_b, params_b, opt_b, seq, advantages, sampler_logprobs,
                                   mesh)
  np.testing.assert_allclose(float(metrics_b["loss"]), float(metrics_a["loss"]), atol=1e-6)
  assert abs(float(metrics_a["loss"])) > 0
  for a, b in zip(jax.tree.leaves(new_a), jax.tree.leaves(new_b)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5)


def test_non_finite_loss_skips_the_update_and_counts_it():
  model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=3)
  seq, advantages, sampler_logprobs = grpo_inputs(model, group=2)
  steps, params, opt_state = make_steps(model)
  before = jax.tree.map(np.asarray, params)
  bad = advantages.copy()
  bad[0] = np.nan
  params, opt_state, metrics = one_update(steps, params, opt_state, seq, bad, sampler_logprobs)
  assert not np.isfinite(float(metrics["loss"]))
  assert int(metrics["skipped_updates"]) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  params, opt_state, metrics = one_update(steps, params, opt_state, seq, advantages,
                                          sampler_logprobs)
  assert int(metrics["skipped_updates"]) == 1 and np.isfinite(float(metrics["loss"]))
  changed = any(not np.array_equal(a, np.asarray(b))
                for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params)))
  assert changed


def test_update_compiles_once_and_keeps_the_placement_over_three_steps():
  mesh = sharding.make_mesh(data=2, fsdp=4)
  model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=5)
  graphdef, params = nnx.split(model)
  placement = sharding.parameter_shardings(params, mesh)
  model = nnx.merge(graphdef, jax.device_put(params, placement))
  seq, advantages, sampler_logprobs = grpo_inputs(model, group=2)
  steps, params, opt_state = make_steps(model)
  moments = opt_state.inner_state[1][0].mu
  assert jax.tree.leaves(jax.tree.map(lambda a: a.sharding, moments)) == jax.tree.leaves(placement)
  for _ in range(3):
    params, opt_state, _ = one_update(steps, params, opt_state, seq, advantages,
                                      sampler_logprobs, mesh)
  # XLA would return some replicated vectors as P() or even fsdp-sharded: a recompile per change.
  assert jax.tree.leaves(jax.tree.map(lambda a: a.sharding, params)) == jax.tree.leaves(placement)
  assert steps._compiled_apply._cache_size() == 1
  assert steps._compiled_grads["grpo_grads"]._cache_size() == 1


def test_scoring_only_the_used_completion_columns_changes_nothing():
  model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=6)
  seq, advantages, sampler_logprobs = grpo_inputs(model, group=2)
  B, N = seq.completion_BN.shape
  lengths = np.asarray([1, 2, 3, 2][:B] + [1] * (B - 4))
  mask = (np.arange(N)[None] < lengths[:, None]).astype(np.int32)
  seq = seq._replace(completion_mask_BN=mask)
  trimmed, params, _ = make_steps(model)
  whole = step_lib.TrainSteps(trimmed.graphdef, trimmed.tx, trimmed.loss_config, temperature=1.0,
                              completion_buckets=1)
  assert trimmed.scored_columns(mask) == 3 and whole.scored_columns(mask) == N
  logprobs, want_logprobs = trimmed.logprobs(params, seq), whole.logprobs(params, seq)
  assert logprobs.shape == (B, N) and not np.asarray(logprobs)[:, 3:].any()
  np.testing.assert_allclose(np.asarray(logprobs)[mask > 0], np.asarray(want_logprobs)[mask > 0],
                             atol=1e-6)
  args = (seq, advantages, None, sampler_logprobs - 0.05 * mask, sampler_logprobs, mask,
          float(mask.sum()), float(B))
  (grads, metrics), (want_grads, want_metrics) = (trimmed.grpo_grads(params, *args),
                                                  whole.grpo_grads(params, *args))
  for key in ("loss", "kl", "entropy", "num_tokens"):
    np.testing.assert_allclose(float(metrics[key]), float(want_metrics[key]), atol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_micro_batches_drop_prompt_padding_without_changing_the_logprobs():
  model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=7)
  seq, _, _ = grpo_inputs(model, group=2)
  sampler = Sampler(model, SamplingConfig(max_new_tokens=6))
  bucket, longest = seq.prompt_ids_PT.shape[1], int(seq.prompt_mask_PT.sum(1).max())
  # All prompts in order: the prepared arrays are used as they are (no examples needed).
  (trimmed, _), = batching.micro_batches([None] * 2, tuple(seq[:4]), seq.completion_BN,
                                         seq.completion_mask_BN, [np.arange(2)], 2, sampler, None)
  width = trimmed.prompt_ids_PT.shape[1]
  assert longest <= width < bucket and width % (bucket // 16) == 0
  np.testing.assert_array_equal(np.asarray(trimmed.prompt_ids_PT), seq.prompt_ids_PT[:, -width:])
  steps, params, _ = make_steps(model)
  # Only float rounding may differ (a few ulps of log-probs around -7); wrong masking would not.
  np.testing.assert_allclose(np.asarray(steps.logprobs(params, trimmed)),
                             np.asarray(steps.logprobs(params, seq)), rtol=1e-6, atol=1e-6)


def test_update_scores_every_completion_against_its_own_prompt_and_image():
  """A shuffled selection of prompts must carry their own ids and images to the update."""
  batch, = shapes_prompt_batches(1, num_records=8, seed=3)
  model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=2)
  sampler = Sampler(model, SamplingConfig(max_new_tokens=5))
  prepared = sampler.prepare(batch.arrays)
  G = 2
  rng = np.random.default_rng(0)
  tokens_BN = rng.integers(0, 1990, (4 * G, 5)).astype(np.int32)
  mask_BN = np.ones((4 * G, 5), np.int32)
  steps, params, _ = make_steps(model)
  score = lambda order: np.concatenate([
      np.asarray(steps.logprobs(params, seq))
      for seq, _ in batching.micro_batches(batch.examples, prepared, tokens_BN, mask_BN,
                                           [np.asarray(order)], G, sampler, None)])
  in_order = score([0, 1, 2, 3])
  shuffled = score([2, 0, 3, 1])
  np.testing.assert_allclose(shuffled, in_order[batching.rows_of(np.asarray([2, 0, 3, 1]), G)],
                             atol=1e-5)


def test_kl_in_reward_penalises_rewards_and_the_adaptive_coefficient_resumes(tmp_path):
  from metaphorstar_jax import train
  config = smoke_default_config(tmp_path / "run")
  config.log.plot = config.log.tensorboard = False
  # A large step on the warm-started policy so that it differs from the reference at once.
  config.stages[1].learning_rate = 0.05
  config.rl.overrides = dict(use_kl_loss=False, use_kl_in_reward=True, kl_penalty="low_var_kl",
                             kl_coef=0.5, kl_ctrl_type="adaptive", kl_target=1e-4, kl_horizon=10)
  train.train(config)
  with open(os.path.join(config.workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  grpo = [r for r in rows if r.get("stage") == 1 and "kl_in_reward/coef" in r]
  assert len(grpo) == config.stages[1].steps
  assert grpo[0]["kl_in_reward/coef"] == 0.5
  assert any(r["kl_in_reward/kl"] > 0 for r in grpo)
  for r in grpo:  # low_var_kl is never negative, so the penalty only lowers rewards
    assert r["reward/penalised_mean"] <= r["reward/mean"] + 1e-6
  # KL above target raises the coefficient: coef · (1 + clip(kl/target - 1, ±0.2) · B / horizon).
  for before, after in zip(grpo, grpo[1:]):
    error = np.clip(before["kl_in_reward/kl"] / 1e-4 - 1, -0.2, 0.2)
    batch = config.train.prompts_per_step * config.rl.group_size
    np.testing.assert_allclose(after["kl_in_reward/coef"],
                               before["kl_in_reward/coef"] * (1 + error * batch / 10), rtol=1e-5)
  ckpt = checkpoints.Checkpointer(os.path.join(config.workdir, "checkpoints"), async_save=False)
  meta = ckpt.restore_meta(ckpt.latest_step())
  ckpt.close()
  last = grpo[-1]
  error = np.clip(last["kl_in_reward/kl"] / 1e-4 - 1, -0.2, 0.2)
  batch = config.train.prompts_per_step * config.rl.group_size
  np.testing.assert_allclose(meta["kl_coef"], last["kl_in_reward/coef"] * (1 + error * batch / 10),
                             rtol=1e-5)


def test_checkpointer_takes_a_relative_directory(tmp_path, monkeypatch):
  # The README's main command uses the relative workdir runs/tfq_grpo_tiny.
  monkeypatch.chdir(tmp_path)
  ckpt = checkpoints.Checkpointer(os.path.join("runs", "x", "checkpoints"), async_save=False)
  arrays = {"w": jnp.arange(4.0)}
  ckpt.save(1, arrays, {"position": 3}, {"stage": "grpo"})
  ckpt.wait()
  restored, data_state, meta = ckpt.restore(1, arrays)
  ckpt.close()
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0))
  assert data_state == {"position": 3} and meta["stage"] == "grpo"
  assert os.path.isdir(tmp_path / "runs" / "x" / "checkpoints" / "1")


def test_loss_metrics_of_micro_batches_add_up_to_the_mini_batch():
  """Each micro-batch's loss is normalised by the whole mini-batch, so its share must be summed:
  averaging made loss, pg_loss and kl_loss read grad_accum_steps times too low."""
  model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=7)
  seq, advantages, sampler_logprobs = grpo_inputs(model, group=2)  # 2 prompts, 4 rows
  steps, params, _ = make_steps(model)
  mask = np.asarray(seq.completion_mask_BN)
  ref = sampler_logprobs - 0.05 * mask
  tokens, rows = float(mask.sum()), float(mask.shape[0])

  def grads_of(prompt, row_slice):
    part = SequenceBatch(seq.prompt_ids_PT[prompt], seq.prompt_mask_PT[prompt],
                         seq.pixel_values_XY, seq.image_grid_thw_I3,
                         seq.completion_BN[row_slice], seq.completion_mask_BN[row_slice])
    return steps.grpo_grads(params, part, advantages[row_slice], None, ref[row_slice],
                            sampler_logprobs[row_slice], mask[row_slice], tokens, rows)

  _, whole = grads_of(slice(0, 2), slice(0, 4))
  halves = [grads_of(slice(0, 1), slice(0, 2)), grads_of(slice(1, 2), slice(2, 4))]
  combined = batching.minibatch_metrics([m for _, m in halves])
  for key in ("loss", "pg_loss", "kl_loss", "num_tokens"):
    np.testing.assert_allclose(combined[key], float(whole[key]), rtol=1e-4, atol=1e-6,
                               err_msg=key)
  assert abs(combined["kl_loss"]) > 0
  assert combined["ratio_max"] == max(float(m["ratio_max"]) for _, m in halves)


def test_grad_norm_leaves_out_frozen_parameters():
  model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=8)
  graphdef, params = nnx.split(model)
  config = optim_config()
  config.frozen = (r"^visual/",)
  tx = optimizer.make_optimizer(config, params)
  steps = step_lib.TrainSteps(graphdef, tx, rl.preset("metaphorstar").loss, temperature=1.0,
                              frozen=config.frozen)
  grads = jax.tree.map(jnp.ones_like, params)
  opt_state = step_lib.init_optimizer_state(tx, params)
  _, _, applied = steps.apply(params, opt_state, grads)
  trained = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(grads)
             if not sharding.path_to_str(path).startswith("visual/")]
  assert len(trained) < len(jax.tree.leaves(grads))
  expected = float(np.sqrt(sum(float(np.sum(np.square(leaf))) for leaf in trained)))
  np.testing.assert_allclose(float(applied["grad_norm"]), expected, rtol=1e-5)


def test_the_trainer_runs_dapo_dynamic_sampling(tmp_path):
  from metaphorstar_jax import train
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
