"""Ablation grids: parsing and overrides, the table's arithmetic, and a 2-setting × 2-seed grid
through the command line that is killed half-way and resumed without rerunning finished cells."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from metaphorstar_jax import ablate, config_files

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The default config cut to 1 warm-start step and 2 GRPO steps with tiny batches.
SCALED_DOWN = ["--config.stages[0].steps=1", "--config.stages[1].steps=2",
               "--config.stages[1].warmup_steps=0", "--config.train.prompts_per_step=2",
               "--config.rl.group_size=2", "--config.rl.max_new_tokens=6",
               "--config.eval.num_examples=2", "--config.eval.every=0",
               "--config.checkpoint.every=1", "--config.checkpoint.async_save=False",
               "--config.data.task_options.num_records=16",
               "--config.data.eval_task_options.num_records=4", "--config.log.tensorboard=False",
               "--config.log.plot=False"]


def test_grid_parsing_and_the_cells_command_lines():
  grid = ablate.parse_grid("rl.preset=grpo,dapo; rl.overrides.use_kl_loss=True,False")
  assert grid == {"rl.preset": ["grpo", "dapo"], "rl.overrides.use_kl_loss": ["True", "False"]}
  cells = ablate.grid_cells(grid, seeds=[0, 1])
  assert len(cells) == 8 and [c.seed for c in cells[:2]] == [0, 1]
  assert cells[0].setting == "rl.preset=grpo rl.overrides.use_kl_loss=True"
  assert len({c.workdir("root") for c in cells}) == 8
  base = [("stages[0].steps", 7), ("rl.group_size", "4"), ("rl.preset", "grpo")]
  cell = cells[-1]
  command = ablate.train_command(config_files.path(), ablate.cell_overrides(base, cell, "root"))
  assert command[1:4] == ["-m", "metaphorstar_jax.train", f"--config={config_files.path()}"]
  assert "--config.stages[0].steps=7" in command and "--config.seed=1" in command
  # The config the trainer will parse from that command line; the cell's own values win.
  config = ablate.cell_config(config_files.path(), base, cell, "root")
  assert config.rl.preset == "dapo" and config.rl.overrides.use_kl_loss is False
  assert config.rl.overrides.kl_loss_coef == 1.0  # the file's other keys stay
  assert config.stages[0].steps == 7 and config.rl.group_size == 4
  assert config.seed == 1 and config.workdir == cell.workdir("root")
  assert config.log.progress_bar is False
  for bad, message in [("rl.gruop_size=4", "no field 'rl.gruop_size'"),
                       ("stages[3].steps=1", r"stages\[3\].*has 2 entries"),
                       ("rl.group_size=four", "invalid literal .* 'four'")]:
    with pytest.raises(ValueError, match=message):
      ablate.cell_config(config_files.path(), [],
                         ablate.grid_cells(ablate.parse_grid(bad), [0])[0], "root")
  for bad in ["rl.preset", "rl.preset=grpo,", "rl.preset=a;rl.preset=b"]:
    with pytest.raises(ValueError):
      ablate.parse_grid(bad)
  assert ablate.config_overrides(["ablate", "--config=x.py", "--config.rl.group_size=4",
                                  "--config.seed", "3", "--grid=a=1"]) == [
                                      ("rl.group_size", "4"), ("seed", "3")]


def synthetic_record(setting, seed, accuracies, rewards):
  """A finished cell as `collect` returns it: stages of 2 and 4 steps, evaluations at steps 2
  (before GRPO), 4 and 6, training rows at every step."""
  train = {step: {"step": step, "sft_loss": 1.0} for step in (1, 2)}
  train.update({step: {"step": step, "reward/mean": r, "kl": 0.1 * r,
                       "response_length/mean": 10 + r} for step, r in zip((3, 4, 5, 6), rewards)})
  evals = {step: {"step": step, "eval/accuracy": a} for step, a in zip((2, 4, 6), accuracies)}
  return {"setting": setting, "overrides": [], "seed": seed, "stage_steps": [2, 4],
          "wall_seconds": 10.0 + seed, "train": train, "eval": evals}


def test_summary_arithmetic():
  records = [synthetic_record("a", 0, [0.5, 0.95, 1.0], [0.1, 0.2, 0.3, 0.4]),
             synthetic_record("a", 1, [0.5, 0.6, 0.8], [0.0, 0.0, 0.5, 0.5]),
             synthetic_record("b", 0, [0.9, 0.9, 0.9], [1.0, 1.0, 1.0, 1.0])]
  rows = ablate.summarize(records, target=0.9, tail=2)
  a, b = rows
  assert a["setting"] == "a" and a["num_seeds"] == 2
  assert a["accuracy_mean"] == pytest.approx(0.9)
  assert a["accuracy_std"] == pytest.approx(np.std([1.0, 0.8], ddof=1))
  assert a["steps_to_target_mean"] == 2 and a["reached"] == 1  # step 4 is GRPO step 2
  assert a["reward_mean"] == pytest.approx(np.mean([0.35, 0.5]))
  assert a["kl_mean"] == pytest.approx(np.mean([0.035, 0.05]))
  assert a["wall_seconds_mean"] == pytest.approx(10.5)
  assert b["steps_to_target_mean"] == 0 and b["accuracy_std"] == 0.0  # reached before GRPO
  table = ablate.markdown_table(rows)
  assert "| a | 2 | 90.0% ± 14.1% | 2 (1/2) |" in table


def run_cli(root, *extra):
  return [sys.executable, "-m", "metaphorstar_jax.ablate", f"--config={config_files.path()}",
          "--grid=rl.preset=grpo,dr_grpo", "--seeds=2", f"--root={root}", "--tail=2",
          *SCALED_DOWN, *extra]


def finished(root):
  return sorted(os.path.relpath(os.path.join(d, ablate.CELL_FILE), root)
                for d, _, files in os.walk(root) if ablate.CELL_FILE in files)


@pytest.mark.slow
def test_grid_is_killed_half_way_resumes_and_tabulates_the_runs_own_metrics(tmp_path):
  root = tmp_path / "grid"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  log = tmp_path / "first.log"  # a file, not a pipe nobody reads while the grid runs
  with open(log, "w") as stderr:
    first = subprocess.Popen(run_cli(root), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=stderr)
    deadline = time.time() + 900
    while len(finished(root)) < 2 and first.poll() is None and time.time() < deadline:
      time.sleep(0.2)
    first.send_signal(signal.SIGKILL)  # in the middle of the third cell
    first.wait()
  assert first.returncode == -signal.SIGKILL, log.read_text()[-3000:]
  assert len(finished(root)) == 2, (finished(root), log.read_text()[-3000:])
  done_before = finished(root)
  kept = {path: open(os.path.join(root, os.path.dirname(path), "metrics.jsonl")).read()
          for path in done_before}

  second = subprocess.run(run_cli(root), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Ran 2 cell(s), 2 finished before" in second.stdout
  assert len(finished(root)) == 4
  for path, metrics in kept.items():  # the finished cells were not touched
    assert open(os.path.join(root, os.path.dirname(path), "metrics.jsonl")).read() == metrics

  rows = json.load(open(root / ablate.TABLE_JSON))
  assert [r["setting"] for r in rows] == ["rl.preset=grpo", "rl.preset=dr_grpo"]
  for row in rows:
    finals, rewards, kls, lengths = [], [], [], []
    for seed in (0, 1):
      cell = ablate.Cell((("rl.preset", row["setting"].split("=")[1]),), seed)
      lines = [json.loads(l) for l in open(os.path.join(cell.workdir(str(root)),
                                                        "metrics.jsonl"))]
      by_step = {}
      for line in lines:  # the killed cell logged some steps twice; the later line counts
        by_step[(line["step"], "eval/accuracy" in line)] = line
      evals = [by_step[k] for k in sorted(by_step) if k[1]]
      grpo = [by_step[k] for k in sorted(by_step) if not k[1] and k[0] > 1][-2:]
      assert evals[-1]["step"] == 3  # after the last GRPO step
      finals.append(evals[-1]["eval/accuracy"])
      rewards.append(np.mean([r["reward/mean"] for r in grpo]))
      kls.append(np.mean([r["kl"] for r in grpo]))
      lengths.append(np.mean([r["response_length/mean"] for r in grpo]))
    assert row["num_seeds"] == 2 and row["seeds"] == [0, 1]
    assert row["accuracy_mean"] == pytest.approx(np.mean(finals))
    assert row["accuracy_std"] == pytest.approx(np.std(finals, ddof=1))
    assert row["reward_mean"] == pytest.approx(np.mean(rewards))
    assert row["kl_mean"] == pytest.approx(np.mean(kls))
    assert row["response_length_mean"] == pytest.approx(np.mean(lengths))
    assert row["wall_seconds_mean"] > 0
  assert open(root / ablate.CURVES_PNG, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert "| rl.preset=dr_grpo | 2 |" in open(root / ablate.TABLE_MD).read()
