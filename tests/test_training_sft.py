"""training/sft.py: which targets a supervised stage learns (the format-only warm start's, or the
records' own), supervised data without targets refused, and one step on the tiny model learning
exactly those target tokens."""

import json
import random

import pytest
from flax import nnx

from metaphorstar_jax import config_defaults, sharding
from metaphorstar_jax.data.pipeline import PromptStream
from metaphorstar_jax.tasks import Record, get_task
from metaphorstar_jax.training import builders, learner as learner_lib, sft
from metaphorstar_jax.training.state import RunState
from helpers import smoke_default_config


def records(*descriptions):
  return [Record(id=f"r{i}", images=(), prompt="q", answer="T",
                 metadata={"description": d, "target": f"own {i}"})
          for i, d in enumerate(descriptions)]


def targets_config(every_answer):
  config = config_defaults.base_config()
  config.sft_targets.think = "I see {description}."
  config.sft_targets.answers = ("T", "F")
  config.sft_targets.every_answer = every_answer
  return config


def test_the_warm_start_teaches_every_answer_with_the_records_description():
  targets, per_record = sft.warmup_targets(records("a cat", "a dog"), targets_config(True),
                                           random.Random(0))
  assert per_record == 2
  assert targets == ["<think>I see a cat.</think><answer>T</answer>",
                     "<think>I see a cat.</think><answer>F</answer>",
                     "<think>I see a dog.</think><answer>T</answer>",
                     "<think>I see a dog.</think><answer>F</answer>"]


def test_without_every_answer_each_record_gets_one_answer_drawn_by_the_rng():
  config = targets_config(False)
  drawn = lambda seed: sft.warmup_targets(records(*["x"] * 20), config, random.Random(seed))
  targets, per_record = drawn(0)
  assert per_record == 1 and len(targets) == 20
  answers = [t.split("<answer>")[1][0] for t in targets]
  assert set(answers) == {"T", "F"}  # never the record's own answer: both appear
  assert drawn(0) == (targets, 1) and drawn(1) != (targets, 1)


def test_a_stage_reading_sft_data_learns_each_records_own_target():
  targets, per_record = sft.warmup_targets(records("a", "b"), targets_config(True),
                                           random.Random(0), from_records=True)
  assert (targets, per_record) == (["own 0", "own 1"], 1)
  stage = lambda **fields: config_defaults.stage("s", steps=1, learning_rate=0.1, **fields)
  assert sft.reads_records(stage(kind="sft", sft_data="/data/cold.jsonl"))
  assert not sft.reads_records(stage(kind="sft", sft_data=""))  # the warm start's targets
  assert not sft.reads_records(stage(kind="grpo", sft_data="/data/cold.jsonl"))


def test_supervised_data_without_a_target_is_refused_naming_the_records(tmp_path):
  task = get_task("cinema")
  path = task.write_miniature(str(tmp_path), 4, 0)
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  for row in rows[1:]:
    row["target"] = "<think>t</think><answer>a</answer>"
  with open(path, "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  with pytest.raises(ValueError, match=r"1 of the 4 records in .* have no 'target' text "
                                       r"\(first: \['[^']+'\]\)"):
    sft.load_sft_records(task, path, str(tmp_path / "scratch"), seed=0)
  rows[0]["target"] = "<think>t</think><answer>a</answer>"
  with open(path, "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  assert len(sft.load_sft_records(task, path, str(tmp_path / "scratch"), seed=0)) == 4


def test_one_step_learns_the_warm_start_targets_and_lowers_their_loss(tmp_path):
  config = smoke_default_config(tmp_path / "run")
  stage = config.stages[0]
  assert stage.kind == "sft" and not stage.sft_data
  stage.learning_rate = 1e-2
  mesh = sharding.make_mesh(**config.mesh.to_dict())
  processor = builders.build_processor(config)
  task, train_records, _ = builders.load_data(config)
  model = builders.build_model(config, mesh)
  graphdef, params = nnx.split(model)
  learner = learner_lib.build_learner(config, stage, model, graphdef, params, task, processor,
                                      mesh)
  run = RunState(params=params, opt_state=None, ref_params=None, global_step=0, stage_index=0,
                 stage_step=0)
  learner_lib.start_stage(run, learner, 0)
  stream = PromptStream(train_records, processor, task.build_conversation,
                        batch_size=config.train.prompts_per_step, seed=0, shuffle=False,
                        max_prompt_tokens=config.data.max_prompt_tokens)
  batch = stream.next_batch()
  first = sft.step(learner, run, batch)
  # Every target of every record, each ending in <|im_end|>, and nothing else is learned.
  targets, _ = sft.warmup_targets(batch.records, config,
                                  random.Random(config.seed * 1_000_003 + run.global_step))
  encode = lambda text: processor.tokenizer.encode(text, add_special_tokens=False).ids
  assert first["num_tokens"] == sum(len(encode(t)) + 1 for t in targets)
  second = sft.step(learner, run, batch)  # the same batch again: its targets are likelier now
  assert second["sft_loss"] < first["sft_loss"]
