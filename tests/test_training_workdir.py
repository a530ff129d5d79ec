"""The run's folder: a fresh run refuses another run's checkpoints unless told to clear its
outputs, and a resume refuses a config or data that change what the saved steps mean."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from metaphorstar_jax import config_defaults
from metaphorstar_jax.training import checkpoints, workdir as wd

FINGERPRINT = {"num_records": 16, "ids_sha256": "ab12"}


def run_config(workdir="runs/x"):
  config = config_defaults.base_config()
  config.workdir = str(workdir)
  return config


def test_a_resume_with_the_same_config_and_data_passes_and_a_changed_field_is_named():
  config = run_config()
  saved = wd.run_record(config, FINGERPRINT)
  wd.check_resume(saved, config, FINGERPRINT, step=4)
  config.log.progress_bar = not config.log.progress_bar  # not a RESUME_FIELDS field
  config.data.num_workers = 3
  wd.check_resume(saved, config, FINGERPRINT, step=4)
  config.train.prompts_per_step += 1
  with pytest.raises(ValueError, match=r"saved step 4 in runs/x .*train.prompts_per_step: saved "
                                       r"8, now 9\. .*allow_config_change=True"):
    wd.check_resume(saved, config, FINGERPRINT, step=4)


def test_changed_data_or_stages_are_refused_and_allow_config_change_only_warns(caplog):
  config = run_config()
  saved = wd.run_record(config, FINGERPRINT)
  with pytest.raises(ValueError, match=r"data fingerprint ids_sha256: saved 'ab12', now 'cd34'"):
    wd.check_resume(saved, config, dict(FINGERPRINT, ids_sha256="cd34"), step=2)
  config.stages = [*config.stages, config_defaults.stage("more", kind="grpo", steps=1,
                                                         learning_rate=1e-6)]
  with pytest.raises(ValueError, match=r"len\(stages\): saved \d+, now \d+.*stages\.\d+\.name: "
                                       r"saved '<absent>', now 'more'"):
    wd.check_resume(saved, config, FINGERPRINT, step=2)
  config.checkpoint.allow_config_change = True
  with caplog.at_level(logging.WARNING):
    wd.check_resume(saved, config, FINGERPRINT, step=2)
  assert "Resuming step 2 with a changed config" in caplog.text and "'more'" in caplog.text


def test_a_step_without_a_record_resumes_with_a_warning(caplog):
  with caplog.at_level(logging.WARNING):
    wd.check_resume({}, run_config(), FINGERPRINT, step=3)
  assert "Step 3 records no config" in caplog.text


def test_a_fresh_run_refuses_old_checkpoints_unless_it_clears_that_runs_outputs(tmp_path):
  config = run_config(tmp_path)
  config.checkpoint.resume = False
  wd.prepare_fresh_workdir(config)  # an empty workdir is fine
  with checkpoints.Checkpointer(str(tmp_path / "checkpoints"), async_save=False) as ckpt:
    ckpt.save(3, {"w": jnp.arange(2.0)}, {}, {})
  (tmp_path / "metrics.jsonl").write_text("{}\n")
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match=r"holds checkpoints of another run \(steps \[3\]\)"):
    wd.prepare_fresh_workdir(config)
  config.checkpoint.resume = True
  wd.prepare_fresh_workdir(config)  # resuming keeps them
  assert os.path.exists(tmp_path / "metrics.jsonl")
  config.checkpoint.resume, config.checkpoint.overwrite = False, True
  wd.prepare_fresh_workdir(config)
  assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # only the run's outputs went


def test_a_lock_held_by_a_process_that_exited_unreaped_is_taken_over(tmp_path, caplog):
  """A killed ablation leaves its cell's trainer orphaned; where init reaps nothing (containers)
  it stays a zombie, which os.kill(pid, 0) still finds."""
  exited = subprocess.Popen([sys.executable, "-c", "pass"])  # not waited for: a zombie
  deadline = time.time() + 60
  while time.time() < deadline and wd._exited_unreaped(exited.pid) is False:
    time.sleep(0.05)
  assert wd._exited_unreaped(exited.pid)
  try:
    with open(tmp_path / wd.LOCK, "w") as f:
      json.dump({"host": socket.gethostname(), "pid": exited.pid, "started": "earlier"}, f)
    with caplog.at_level(logging.WARNING), wd.WorkdirLock(str(tmp_path)):
      assert json.load(open(tmp_path / wd.LOCK))["pid"] == os.getpid()
    assert f"its holder, pid {exited.pid}" in caplog.text
  finally:
    exited.wait()



class SavedRun:
  """A checkpoint folder holding steps 2 and 5 of the run whose record is `record`."""

  directory = "runs/x/checkpoints"

  def __init__(self, record, steps=(2, 5)):
    self.record, self.steps = record, list(steps)

  def all_steps(self):
    return self.steps

  def restore_meta(self, step):
    return {"stage_index": 0, "stage_step": step, "global_step": step}

  def restore_run_record(self, step):
    return self.record


def test_find_resumption_picks_the_newest_or_the_asked_step_of_an_unchanged_run():
  config = run_config()
  record = wd.run_record(config, FINGERPRINT)
  assert wd.find_resumption(config, SavedRun(record, steps=()), record) is None  # nothing saved
  assert wd.find_resumption(config, SavedRun(record), record).step == 5
  config.checkpoint.step = 2
  assert wd.find_resumption(config, SavedRun(record), record).step == 2
  config.checkpoint.resume = False  # a fresh run reads no checkpoint at all
  assert wd.find_resumption(config, None, record) is None
  config.checkpoint.resume = True
  config.seed += 1
  with pytest.raises(ValueError, match=r"saved step 2 in runs/x .*seed: saved 0, now 1"):
    wd.find_resumption(config, SavedRun(record), wd.run_record(config, FINGERPRINT))
