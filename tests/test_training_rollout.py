"""A step's rollouts on the host: rows taken together, the trained tokens of a tree's branches,
every row scored against its own prompt's record, reward components averaged."""

import numpy as np

from metaphorstar_jax.training import rollout


def rows(prefix=None):
  tokens = np.arange(12, dtype=np.int32).reshape(4, 3)
  mask = np.asarray([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], np.int32)
  return rollout.RolloutRows(tokens, mask, -0.5 * mask.astype(np.float32), mask.sum(1),
                             np.asarray([False, True, False, True]), prefix)


def test_take_keeps_every_field_of_the_rows_together():
  prefix = np.asarray([[0, 0, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0]], np.int32)
  taken = rows(prefix).take(np.asarray([3, 1]))
  np.testing.assert_array_equal(taken.tokens_BN, [[9, 10, 11], [3, 4, 5]])
  np.testing.assert_array_equal(taken.lengths_B, [3, 3])
  np.testing.assert_array_equal(taken.truncated_B, [True, True])
  np.testing.assert_array_equal(taken.prefix_BN, [[1, 1, 0], [1, 0, 0]])
  assert rows().take(np.asarray([0])).prefix_BN is None


def test_a_branchs_copied_prefix_is_not_trained_on():
  plain = rows()
  np.testing.assert_array_equal(plain.trained_mask_BN(), plain.mask_BN)
  prefix = np.asarray([[0, 0, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0]], np.int32)
  np.testing.assert_array_equal(rows(prefix).trained_mask_BN(),
                                [[1, 1, 0], [0, 1, 1], [1, 0, 0], [0, 0, 1]])


class EchoTask:
  """Scores 1 when the completion names its record's answer."""

  def score(self, text, record):
    right = float(text == record["answer"])
    return {"overall": right, "accuracy": right, "format": 0.5}


def test_each_row_is_scored_against_its_own_prompts_record():
  records = [{"answer": "a"}, {"answer": "b"}]
  rewards, scores = rollout.score_rollouts(EchoTask(), records, ["a", "b", "b", "b"], group_size=2)
  assert rewards.dtype == np.float32
  np.testing.assert_array_equal(rewards, [1.0, 0.0, 1.0, 1.0])
  assert len(scores) == 4 and scores[1]["accuracy"] == 0.0


def test_reward_components_average_each_name_over_all_rows_without_the_total():
  scores = [{"overall": 1.0, "accuracy": 1.0, "format": 0.5},
            {"overall": 0.0, "accuracy": 0.0},
            {"overall": 1.0, "accuracy": 1.0, "format": 1.0, "length": 0.25}]
  assert rollout.reward_components(scores) == {
      "reward/accuracy": 2 / 3, "reward/format": 0.5, "reward/length": 0.25 / 3}
