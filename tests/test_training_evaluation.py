"""training/evaluation.py: the order of repeated samples, giving up between batches, scoring with
and without a judge, spreads that leave NaN out, and the trainer's evaluation taking the
config's eval settings. Fakes stand in for the sampler, task and judge where the model is not
the point; the trainer's evaluation runs the tiny model."""

import math
import types

import pytest

from metaphorstar_jax import sharding
from metaphorstar_jax.judge import Verdict
from metaphorstar_jax.tasks import Record
from metaphorstar_jax.training import builders, evaluation, evaluation_setup
from helpers import smoke_default_config


class EchoSampler:
  """Stands in for a Sampler: row r of a call is "<prompt id>#<r mod group_size>"."""

  pad_id = 0

  def __init__(self):
    self.calls = []

  def __call__(self, batch, *, group_size, key, state):
    self.calls.append((list(batch["ids"]), group_size, state))
    ids = [i for i in batch["ids"] for _ in range(group_size)]
    return types.SimpleNamespace(tokens_BN=ids, lengths_B=[group_size] * len(ids))

  def texts(self, processor, tokens, lengths):
    return [f"{prompt}#{row % length}" for row, (prompt, length) in
            enumerate(zip(tokens, lengths, strict=True))]


@pytest.fixture
def echo(monkeypatch):
  monkeypatch.setattr(evaluation, "collate", lambda chunk, pad_id: {"ids": chunk})
  return EchoSampler()


def test_generate_gives_each_repeat_its_own_list_in_record_order(echo):
  texts = evaluation.generate(["a", "b", "c"], None, echo, "weights", batch_size=2,
                              num_samples=2)
  assert texts == [["a#0", "b#0", "c#0"], ["a#1", "b#1", "c#1"]]
  assert [(ids, g) for ids, g, _ in echo.calls] == [(["a", "b"], 2), (["c"], 2)]
  assert all(state == "weights" for *_, state in echo.calls)  # the weights given, every batch


def test_generate_gives_up_between_batches_when_asked(echo):
  asked = []

  def should_stop():
    asked.append(len(echo.calls))
    return len(echo.calls) == 1

  with pytest.raises(evaluation.EvaluationStopped, match="after 2 of 3 records"):
    evaluation.generate(["a", "b", "c"], None, echo, batch_size=2, should_stop=should_stop)
  assert asked == [0, 1]  # asked before each batch; the second never ran


class CountingTask:
  """A task whose score rewards 'yes' and whose own metric counts answers."""

  name = "counting"
  build_conversation = None  # screen_records is a fake wherever this task is

  def evaluate(self, texts, records):
    return {"answered": float(len(texts))}

  def score(self, text, record):
    return {"overall": float(text == "yes"), **({"bonus": 1.0} if record.id == "r0" else {})}


def records(n):
  return [Record(id=f"r{i}", prompt=f"question {i}", answer="yes", images=()) for i in range(n)]


def test_score_completions_averages_each_component_over_every_record():
  metrics, details = evaluation.score_completions(CountingTask(), records(2), ["yes", "no"])
  # a component a record lacks counts as 0 for it, not as missing
  assert metrics == {"answered": 2.0, "score/bonus": 0.5, "score/overall": 0.5}
  assert [d["id"] for d in details] == ["r0", "r1"] and "judge" not in details[0]


def test_score_completions_adds_the_judges_grades():
  class Judge:
    def judge_many(self, items):
      self.items = items
      return [Verdict(score=4.0, grades=(4, 4), replies=("4", "4")),
              Verdict(score=None, grades=(None,), replies=("?",))]

  judge = Judge()
  metrics, details = evaluation.score_completions(CountingTask(), records(2), ["yes", "no"],
                                                  judge)
  assert [(i.question, i.answer, i.reference) for i in judge.items] == [
      ("question 0", "yes", "yes"), ("question 1", "no", "yes")]
  assert (metrics["judge/score"], metrics["judge/missing"], metrics["judge/judged"]) == (4.0, 1, 2)
  assert details[0]["judge"] == {"score": 4.0, "grades": [4, 4], "replies": ["4", "4"]}
  assert details[1]["judge"]["score"] is None


def test_mean_over_repeats_leaves_nan_out_and_keeps_the_first_repeats_order():
  means, stds = evaluation.mean_over_repeats([{"b": 1.0, "a": float("nan")},
                                              {"b": 3.0, "a": 2.0, "c": float("nan")}])
  assert list(means) == ["b", "a", "c"]
  assert (means["b"], stds["b"], means["a"], stds["a"]) == (2.0, 1.0, 2.0, 0.0)
  assert math.isnan(means["c"]) and math.isnan(stds["c"])


def test_trainer_evaluation_samples_with_the_eval_settings_and_passes_the_weights(
    tmp_path, monkeypatch):
  """One evaluation path: the trainer's periodic evaluation samples with sampling_config (the
  CLI's), not at the rollout temperature, and scores the records with the config's eval
  batch size, repeats and seed."""
  config = smoke_default_config(tmp_path / "run")
  config.eval.greedy = False
  config.eval.temperature, config.eval.top_p, config.eval.num_samples = 0.5, 0.9, 2
  config.eval.batch_size, config.seed = 3, 7
  mesh = sharding.make_mesh(**config.mesh.to_dict())
  processor = builders.build_processor(config)
  task, _, eval_records = builders.load_data(config)
  model = builders.build_model(config, mesh)
  seen = {}

  def recorded(task_, records_, processor_, sampler, params, **settings):
    seen.update(settings, sampler=sampler, params=params, records=records_)
    return {"metrics": {"accuracy": 0.25}}

  monkeypatch.setattr(evaluation, "evaluate_records", recorded)
  evaluate = evaluation.trainer_evaluation(config, model, mesh, task, eval_records, processor)
  stop = lambda: False
  assert evaluate("the run's params", stop) == {"accuracy": 0.25}
  used, wanted = seen["sampler"].config, evaluation_setup.sampling_config(config)
  knobs = lambda c: (c.greedy, c.temperature, c.top_p, c.top_k, c.max_new_tokens)
  assert knobs(used) == knobs(wanted) == (False, 0.5, 0.9, wanted.top_k, config.eval.max_new_tokens)
  assert seen["sampler"].state is None  # keeps no weights: the updates donate them
  assert seen["params"] == "the run's params" and seen["records"] is eval_records
  assert (seen["batch_size"], seen["num_samples"], seen["seed"]) == (3, 2, 7)
  assert seen["max_prompt_tokens"] == config.data.max_prompt_tokens
  assert seen["should_stop"] is stop and seen["judge"] is None  # shapes needs no judge


def test_trainer_evaluation_refuses_repeats_of_greedy_decoding(tmp_path):
  config = smoke_default_config(tmp_path / "run")
  config.eval.greedy, config.eval.num_samples = True, 3
  mesh = sharding.make_mesh(**config.mesh.to_dict())
  model = builders.build_model(config, mesh)
  with pytest.raises(ValueError, match="num_samples=3 with greedy decoding"):
    evaluation.trainer_evaluation(config, model, mesh, None, [], None)


def test_evaluate_records_refuses_when_every_record_is_skipped(monkeypatch):
  monkeypatch.setattr(evaluation, "screen_records",
                      lambda *args: ([], {"too_long": 2}))
  sampler = types.SimpleNamespace(config=evaluation_setup.sampling_config(
      smoke_default_config("unused")))
  with pytest.raises(ValueError,
                     match=r"All 2 evaluation records were skipped \({'too_long': 2}"):
    evaluation.evaluate_records(CountingTask(), records(2), None, sampler, batch_size=1,
                                max_prompt_tokens=8)
