"""An `sft` stage that reads supervised trajectories (`sft_data`), as CINEMA's cold start does."""

from __future__ import annotations

import json
import os

import pytest

from metaphorstar_jax import data, train
from metaphorstar_jax.tasks import get_task
from helpers import smoke_config

CINEMA_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "configs", "cinema_7b.py")
TARGET = "<global>shapes</global><answer>A</answer>"


def cinema_smoke_config(workdir):
  config = smoke_config(CINEMA_CONFIG)
  config.workdir = str(workdir)
  config.log.progress_bar = config.log.plot = config.log.tensorboard = False
  config.checkpoint.every = 0
  config.stages = [config.stages[0]]  # the cold start alone
  return config


def write_trajectories(folder, with_targets):
  path = get_task("cinema").write_miniature(str(folder), 6, 0)
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  for index, row in enumerate(rows):
    if with_targets or index:
      row["target"] = TARGET
  with open(path, "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  return path


def test_sft_stage_learns_each_records_own_target(tmp_path):
  config = cinema_smoke_config(tmp_path / "run")
  config.stages[0].sft_data = write_trajectories(tmp_path / "cold", with_targets=True)
  config.data.train = config.data.eval = ""
  results = train.train(config)
  with open(os.path.join(config.workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if "sft_loss" in line]
  tokenizer = data.build_small_tokenizer()
  per_row = len(tokenizer.encode(TARGET, add_special_tokens=False).ids) + 1  # + <|im_end|>
  # Every row of every step is the records' own target (the format-only warm start differs).
  assert [r["num_tokens"] for r in rows] == [config.train.prompts_per_step * per_row] * len(rows)
  assert "after cold_start" in results


def test_sft_data_without_targets_is_a_clear_error(tmp_path):
  config = cinema_smoke_config(tmp_path / "run")
  config.stages[0].sft_data = write_trajectories(tmp_path / "cold", with_targets=False)
  with pytest.raises(ValueError, match="1 of the 6 records .* no 'target'"):
    train.train(config)
