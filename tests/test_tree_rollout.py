"""Entropy-branched (tree) rollouts: the pure pieces in rl/tree.py and the trainer's use of them."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metaphorstar_jax import data, rl, train
from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.sampling import Sampler, SamplingConfig
from metaphorstar_jax.training import batching, objective as objective_lib, rollout
from metaphorstar_jax.training import step as step_lib
from metaphorstar_jax.training.policy import completion_logprobs
from helpers import make_steps, shapes_prompt_batches, smoke_default_config


# --- pure pieces ---------------------------------------------------------------------------------

def test_branchable_tokens_skip_special_and_short_tokens():
  texts = ["the", " a", "  ", "ok", "<|im_end|>", ",", " word "]
  table = rl.branchable_tokens(texts, special_ids=[4, 99], min_chars=2)
  assert table.tolist() == [True, False, False, True, False, False, True]


def test_branch_points_pick_uniformly_among_the_top_k_candidates():
  # Position 0 has the highest entropy but is never a candidate; position 2 holds an
  # unbranchable token; positions from the length on are not part of the answer.
  entropy = jnp.asarray([[9.0, 5.0, 8.0, 4.0, 1.0, 3.0, 7.0, 6.0]])
  tokens = jnp.asarray([[1, 1, 0, 1, 1, 1, 1, 1]])
  branchable = jnp.asarray([False, True])
  lengths = jnp.asarray([7])
  pick = jax.jit(jax.vmap(lambda key: rl.branch_points(key, entropy, tokens, lengths, branchable,
                                                       top_k=3)))
  positions, found = pick(jax.random.split(jax.random.key(0), 6000))
  assert bool(found.all())
  counts = np.bincount(np.asarray(positions).reshape(-1), minlength=8)
  # Candidates by entropy: 6 (7.0), 1 (5.0), 3 (4.0); position 7 (6.0) is past the length.
  assert set(np.flatnonzero(counts)) == {1, 3, 6}
  np.testing.assert_allclose(counts[[1, 3, 6]] / 6000, 1 / 3, atol=0.03)


def test_branch_points_fall_back_to_the_start_without_candidates():
  entropy = jnp.ones((3, 4))
  tokens = jnp.asarray([[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 5000, 1]])
  branchable = jnp.asarray([False, True])
  positions, found = rl.branch_points(jax.random.key(1), entropy, tokens, jnp.asarray([4, 1, 3]),
                                      branchable, top_k=20)
  # Row 0: nothing branchable. Row 1: only position 0. Row 2: position 1 (5000 is past V).
  assert np.asarray(found).tolist() == [False, False, True]
  assert np.asarray(positions).tolist() == [0, 0, 1]


def test_join_branches_copies_the_prefix_then_the_continuation():
  roots = jnp.asarray([[1, 2, 3, 4], [5, 6, 7, 8]])
  continuations = jnp.asarray([[10, 11, 0, 0], [12, 13, 0, 0], [20, 21, 22, 23], [24, 0, 0, 0]])
  joined = rl.join_branches(roots, jnp.asarray([2, 0]), continuations, branches=2)
  assert np.asarray(joined).tolist() == [[1, 2, 10, 11], [1, 2, 12, 13],
                                         [20, 21, 22, 23], [24, 0, 0, 0]]


def test_group_order_puts_each_prompts_roots_then_their_branches_together():
  tree = rl.TreeRollout(num_roots=2, branches=2)
  assert tree.group_size == 6
  # Rows: roots 0-3 (prompt 0: 0, 1; prompt 1: 2, 3), branches 4-11 (root r: 4 + 2r, 5 + 2r).
  assert rl.group_order(2, tree).tolist() == [0, 1, 4, 5, 6, 7, 2, 3, 8, 9, 10, 11]


def test_tree_settings_are_checked():
  with pytest.raises(ValueError, match="branches"):
    rl.TreeRollout(num_roots=4, branches=0)
  with pytest.raises(ValueError, match="entropy_top_k"):
    rl.TreeRollout(entropy_top_k=0)


def test_a_group_size_that_disagrees_with_the_tree_is_an_error():
  config = smoke_default_config("unused")
  config.rl.tree_rollout = dict(num_roots=2, branches=1)
  config.rl.group_size = 6
  with pytest.raises(ValueError, match="num_roots"):
    objective_lib.build_objective(config)
  config.rl.group_size = None
  assert objective_lib.build_objective(config).group_size == 4


# --- the trainer's tree rows ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tree_draw():
  """Tree rows for 4 real one-image prompts from a tiny random model; no stop tokens, so every
  root runs its full budget and has branch candidates."""
  batch, = shapes_prompt_batches(1, num_records=8, seed=5)
  processor = data.ChatProcessor.from_tokenizer(data.build_small_tokenizer())
  model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=3)
  sampler = Sampler(model, SamplingConfig(max_new_tokens=8, stop_token_ids=(),
                                          return_entropy=True))
  steps, params, _ = make_steps(model)
  tree = rl.TreeRollout(num_roots=2, branches=3, entropy_top_k=3, min_token_chars=2)
  prepared = sampler.prepare(batch.arrays)
  rows, metrics = rollout.tree_rows(params, tree, list(batch.examples), prepared, processor,
                                    sampler, jax.random.key(0))
  return dict(batch=batch, processor=processor, sampler=sampler, steps=steps, params=params,
              model=model, tree=tree, prepared=prepared, rows=rows, metrics=metrics)


def test_tree_rows_form_groups_of_roots_and_their_branches(tree_draw):
  rows, tree = tree_draw["rows"], tree_draw["tree"]
  P, G, N = 4, tree.group_size, 8
  assert rows.tokens_BN.shape == (P * G, N) and G == 8
  assert tree_draw["metrics"]["tree/branched_frac"] == 1.0
  for p in range(P):
    group = rows.take(np.arange(p * G, (p + 1) * G))
    assert not group.prefix_BN[:tree.num_roots].any()
    for root in range(tree.num_roots):
      for j in range(tree.branches):
        b = tree.num_roots + root * tree.branches + j
        cut = int(group.prefix_BN[b].sum())
        assert 1 <= cut < N
        assert group.prefix_BN[b].tolist() == [1] * cut + [0] * (N - cut)
        np.testing.assert_array_equal(group.tokens_BN[b, :cut], group.tokens_BN[root, :cut])
        np.testing.assert_array_equal(group.sampler_logprobs_BN[b, :cut],
                                      group.sampler_logprobs_BN[root, :cut])
  # Without stop tokens every row spends its whole budget: prefix + continuation = N.
  assert (rows.lengths_B == N).all() and rows.truncated_B.all() and rows.mask_BN.all()


def test_branch_continuations_are_the_policys_own_samples_after_the_prefix(tree_draw):
  """A branch's log-probs, drawn from prompt + prefix, equal a teacher-forced pass over the
  original prompt with prefix + continuation as the completion: the prefix prompt's M-RoPE
  positions continue exactly where the root's decoding had them."""
  rows, tree = tree_draw["rows"], tree_draw["tree"]
  batch, sampler, steps = tree_draw["batch"], tree_draw["sampler"], tree_draw["steps"]
  P = len(batch.examples)
  seq, _ = next(batching.micro_batches(batch.examples, tree_draw["prepared"], rows.tokens_BN,
                                       rows.mask_BN, [np.arange(P)], tree.group_size, sampler,
                                       None))
  forced = np.asarray(steps.logprobs(tree_draw["params"], seq))
  np.testing.assert_allclose(forced, rows.sampler_logprobs_BN, atol=1e-5)


def test_branches_start_at_one_of_the_top_k_entropy_tokens(tree_draw):
  rows, tree, processor = tree_draw["rows"], tree_draw["tree"], tree_draw["processor"]
  batch, sampler = tree_draw["batch"], tree_draw["sampler"]
  P, G = len(batch.examples), tree.group_size
  seq, _ = next(batching.micro_batches(batch.examples, tree_draw["prepared"], rows.tokens_BN,
                                       rows.mask_BN, [np.arange(P)], G, sampler, None))
  # The policy's entropy recomputed by a teacher-forced pass, not the sampler's report.
  graphdef = nnx.graphdef(tree_draw["model"])
  _, entropy = jax.jit(lambda params, seq: completion_logprobs(
      nnx.merge(graphdef, params), seq))(tree_draw["params"], seq)
  entropy = np.asarray(entropy)
  table = rollout.branchable_table(processor, sampler.model_config.text.vocab_size,
                                   tree.min_token_chars)
  for p in range(P):
    for root in range(tree.num_roots):
      r = p * G + root
      candidates = [t for t in range(1, int(rows.lengths_B[r])) if table[rows.tokens_BN[r, t]]]
      top = sorted(candidates, key=lambda t: -entropy[r, t])[:tree.entropy_top_k]
      for j in range(tree.branches):
        b = p * G + tree.num_roots + root * tree.branches + j
        assert int(rows.prefix_BN[b].sum()) in top


def test_tree_rollouts_need_a_sampler_that_reports_entropy(tree_draw):
  plain = Sampler(tree_draw["model"], SamplingConfig(max_new_tokens=8))
  with pytest.raises(ValueError, match="return_entropy"):
    rollout.tree_rows(tree_draw["params"], tree_draw["tree"], list(tree_draw["batch"].examples),
                      tree_draw["prepared"], tree_draw["processor"], plain, jax.random.key(0))


def test_a_tree_stage_trains_only_on_each_branchs_continuation(tmp_path, monkeypatch):
  config = smoke_default_config(tmp_path / "run")
  config.log.plot = config.log.tensorboard = False
  config.checkpoint.every = 0
  config.stages[1].steps = 1
  config.rl.group_size = None
  config.rl.tree_rollout = dict(num_roots=1, branches=2, entropy_top_k=4, min_token_chars=1)
  drawn, masks = [], []
  tree_rows, grpo_grads = rollout.tree_rows, step_lib.TrainSteps.grpo_grads

  def spy_rows(*args, **kwargs):
    drawn.append(tree_rows(*args, **kwargs)[0])
    return drawn[-1], {"tree/branched_frac": 1.0, "tree/prefix_mean": 0.0}

  def spy_grads(self, params, seq, advantages, old, ref, sampler_logprobs, loss_mask, *rest):
    masks.append(np.asarray(loss_mask))
    return grpo_grads(self, params, seq, advantages, old, ref, sampler_logprobs, loss_mask, *rest)

  monkeypatch.setattr(rollout, "tree_rows", spy_rows)
  monkeypatch.setattr(step_lib.TrainSteps, "grpo_grads", spy_grads)
  train.train(config)
  rows, = drawn
  loss_mask, = masks
  np.testing.assert_array_equal(loss_mask, rows.mask_BN * (1 - rows.prefix_BN))
  assert rows.prefix_BN.any(), "no branch kept a prefix: the test would not see the masking"
  with open(os.path.join(config.workdir, "metrics.jsonl")) as f:
    step = [json.loads(line) for line in f if "tree/root_reward_mean" in line]
  assert len(step) == 1 and np.isfinite(step[0]["loss"])
