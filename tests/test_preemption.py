"""A run survives what pods do to it: SIGTERM or Ctrl-C in the middle of a step, a damaged latest
checkpoint, a resumption with a changed config, a second run in its workdir and updates that stay
non-finite. Runs are the README default scaled down to three steps (one SFT, two GRPO)."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import flags as absl_flags
from flax import nnx
from ml_collections import config_flags

from metaphorstar_jax import config_files, train
from metaphorstar_jax.training import checkpoints, preemption, step as step_lib, workdir as wd
from helpers import CONFIG, REPO_ROOT, TIMING_KEYS, history, scaled_down_flags


def tiny_flags(workdir):
  return scaled_down_flags(workdir, sft_steps=1, grpo_steps=2) + [
      "--config.rl.max_new_tokens=4", "--config.log.tensorboard=False",
      "--config.log.plot=False", "--config.checkpoint.every=1"]


def tiny_config(workdir, *extra):
  """The config `python -m metaphorstar_jax.train` would run with tiny_flags and `extra`."""
  argv = ["train", *tiny_flags(workdir), *extra]
  values = absl_flags.FlagValues()  # sys_argv: ml_collections defines --config.* from it
  config_flags.DEFINE_config_file("config", CONFIG, flag_values=values, sys_argv=argv)
  return config_files.parse_flags(values, argv).config


def leaves(params):
  return [np.asarray(a) for a in jax.tree.leaves(nnx.to_pure_dict(params))]


def assert_same_params(a, b):
  for x, y in zip(leaves(a), leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted run: (workdir, its final params, its metrics by step)."""
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  results = train.train(tiny_config(workdir))
  return workdir, results["final_params"], history(workdir)


def raw_steps(workdir):
  """The step of every row of `workdir`/metrics.jsonl, evaluations included, in file order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


def copy_run(workdir, tmp_path):
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  return copy


@pytest.mark.slow
def test_sigterm_mid_step_saves_that_step_and_resumes_exactly(tmp_path, straight):
  _, expected_params, expected = straight
  workdir = str(tmp_path / "run")
  handlers = [signal.getsignal(s) for s in preemption.SIGNALS]
  # SIGTERM in the middle of step 2, off the cadence of checkpoint.every=5, with async saves.
  off_cadence = ("--config.checkpoint.every=5", "--config.checkpoint.async_save=True")
  results = train.train(tiny_config(workdir, *off_cadence, "--config.debug.signal_at_step=2"))
  assert results["stopped"] == {"signal": "SIGTERM", "step": 2, "saved": True,
                                "exit_code": 128 + signal.SIGTERM}
  assert [signal.getsignal(s) for s in preemption.SIGNALS] == handlers  # restored
  assert checkpoints.saved_steps(os.path.join(workdir, "checkpoints")) == [1, 2]
  assert max(history(workdir)) == 2
  resumed = train.train(tiny_config(workdir, *off_cadence))
  assert "stopped" not in resumed
  assert history(workdir)[3] == expected[3]
  assert_same_params(resumed["final_params"], expected_params)


@pytest.mark.slow
def test_ctrl_c_stops_the_process_cleanly_with_a_checkpoint_of_its_step(tmp_path):
  """Signalled from outside, as a terminal or a scheduler does: whichever step is in progress is
  finished and saved, the process exits with 128 + SIGINT and no traceback."""
  workdir = str(tmp_path / "run")
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  process = subprocess.Popen([sys.executable, "-m", "metaphorstar_jax.train",
                              *tiny_flags(workdir), "--config.checkpoint.every=5"],
                             cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 600
  while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.time() < deadline:
    assert process.poll() is None, process.communicate()[1][-3000:]
    time.sleep(0.2)
  process.send_signal(signal.SIGINT)  # during step 2: step 1 has just been logged
  _, stderr = process.communicate(timeout=600)
  assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
  last = max(history(workdir))
  assert last < 3 and checkpoints.saved_steps(os.path.join(workdir, "checkpoints"))[-1] == last
  assert f"SIGINT: stopped after step {last}, saved under" in stderr


def test_a_signal_during_an_evaluation_stops_before_the_next_step(tmp_path, monkeypatch,
                                                                  caplog):
  """A pre-emption notice during the (possibly long) evaluation before GRPO: no further step
  runs; the SFT step already saved is what the run stops at."""
  evaluate_records = train.evaluation.evaluate_records

  def signalled(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return evaluate_records(*args, **kwargs)

  monkeypatch.setattr(train.evaluation, "evaluate_records", signalled)
  workdir = str(tmp_path / "run")
  results = train.train(tiny_config(workdir, "--config.checkpoint.every=5"))
  assert results["stopped"] == {"signal": "SIGTERM", "step": 1, "saved": True,
                                "exit_code": 128 + signal.SIGTERM}
  assert max(history(workdir)) == 1
  assert checkpoints.saved_steps(os.path.join(workdir, "checkpoints")) == [1]
  assert "Evaluation stopped after 0 of" in caplog.text  # given up before its first batch


SECOND_SIGNAL = """
import os, signal, time
from metaphorstar_jax.training import preemption
with preemption.StopRequest() as stop:
  os.kill(os.getpid(), signal.SIGTERM)
  print("first:", stop.signum, flush=True)
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(30)
  print("still running")
"""


def test_a_second_signal_ends_the_process_at_once():
  start = time.perf_counter()
  result = subprocess.run([sys.executable, "-c", SECOND_SIGNAL], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == -signal.SIGTERM, result.stderr[-2000:]
  assert result.stdout == f"first: {int(signal.SIGTERM)}\n"
  assert time.perf_counter() - start < 30


def test_a_workdir_has_one_writer(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with wd.WorkdirLock(workdir):
    holder = json.load(open(os.path.join(workdir, wd.LOCK)))
    assert holder["pid"] == os.getpid()
    with pytest.raises(RuntimeError, match=rf"in use by another run: pid {os.getpid()} on host "
                                           rf"{holder['host']}, started {holder['started']}"):
      train.train(tiny_config(workdir))  # refused before anything is read
    assert not os.path.exists(os.path.join(workdir, wd.RUN_CONFIG))
  assert not os.path.exists(os.path.join(workdir, wd.LOCK))  # released
  # A lock left by a process that is gone is taken over.
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  with open(os.path.join(workdir, wd.LOCK), "w") as f:
    json.dump({"host": holder["host"], "pid": gone.pid, "started": "earlier"}, f)
  with wd.WorkdirLock(workdir):
    assert json.load(open(os.path.join(workdir, wd.LOCK)))["pid"] == os.getpid()
  assert f"its holder, pid {gone.pid} on {holder['host']} (started earlier)" in caplog.text


@pytest.mark.slow
def test_damaged_latest_step_resumes_from_the_one_before(tmp_path, straight, caplog):
  workdir, expected_params, expected = straight
  workdir = copy_run(workdir, tmp_path)
  data_files = glob.glob(os.path.join(workdir, "checkpoints", "3", "arrays", "**", "d", "*"),
                         recursive=True)
  biggest = max(data_files, key=os.path.getsize)
  os.truncate(biggest, os.path.getsize(biggest) // 2)
  resumed = train.train(tiny_config(workdir))
  assert "Resuming from step 2; passed over: step 3" in caplog.text
  assert_same_params(resumed["final_params"], expected_params)
  # Each step's rows once, as in the uninterrupted run: step 3's were dropped and written again.
  assert raw_steps(workdir) == raw_steps(straight[0])
  assert checkpoints.saved_steps(os.path.join(workdir, "checkpoints")) == [1, 2, 3]


@pytest.mark.slow
def test_resuming_refuses_a_changed_group_size_and_resumes_with_other_workers(tmp_path,
                                                                               straight):
  workdir, expected_params, _ = straight
  workdir = copy_run(workdir, tmp_path)
  with pytest.raises(ValueError, match=r"rl.group_size: saved 2, now 4"):
    train.train(tiny_config(workdir, "--config.rl.group_size=4"))
  # Workers are a performance setting: resuming step 2 with a worker gives the same run.
  absl_flags.FLAGS.mark_as_parsed()  # grain's workers read its absl flags; app.run parses them
  resumed = train.train(tiny_config(workdir, "--config.data.num_workers=1",
                                    "--config.checkpoint.step=2"))
  assert_same_params(resumed["final_params"], expected_params)
  # allow_config_change lets a changed run resume.
  changed = train.train(tiny_config(workdir, "--config.train.num_minibatches=2",
                                    "--config.checkpoint.allow_config_change=True"))
  assert "stopped" not in changed


def test_updates_that_stay_non_finite_stop_the_run_naming_the_step(tmp_path, monkeypatch):
  """optax.apply_if_finite skips max_consecutive_nonfinite updates, then applies the next."""
  apply = step_lib.TrainSteps.apply
  monkeypatch.setattr(step_lib.TrainSteps, "apply", lambda self, params, opt_state, grads: apply(
      self, params, opt_state, jax.tree.map(lambda g: g * np.nan, grads)))
  config = tiny_config(str(tmp_path / "run"), "--config.optim.max_consecutive_nonfinite=1")
  with pytest.raises(FloatingPointError, match=r"Step 1: the last 1 optimizer updates had NaN.*"
                                               r"no checkpoint was saved"):
    train.train(config)
