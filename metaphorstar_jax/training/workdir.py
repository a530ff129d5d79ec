"""The run's folder: what a fresh run may find there, and the config it records."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from metaphorstar_jax import redaction
from metaphorstar_jax.training import checkpoints

# What a run writes into its workdir that a fresh run in that folder must not mix with.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "curves.png")
RUN_CONFIG = "config.json"  # export and evaluate read the run's settings back from it


def prepare_fresh_workdir(config) -> None:
  """For a fresh run (checkpoint.resume=False): refuses a workdir holding another run's
  checkpoints, unless checkpoint.overwrite clears that run's outputs first. Orbax would otherwise
  decline every save at or below the old run's latest step, and a crash would resume the old
  run's weights."""
  if config.checkpoint.resume:
    return
  workdir = config.workdir
  found = checkpoints.saved_steps(os.path.join(workdir, "checkpoints"))
  if not found:
    return
  if not config.checkpoint.overwrite:
    raise ValueError(
        f"{workdir} holds checkpoints of another run (steps {found}), and checkpoint.resume is "
        "False. Use another workdir, resume this run (--config.checkpoint.resume=True), or "
        "delete its outputs with --config.checkpoint.overwrite=True.")
  if jax.process_index() == 0:
    logging.warning("checkpoint.overwrite: deleting %s of the earlier run in %s.",
                    ", ".join(RUN_OUTPUTS), workdir)
    for name in RUN_OUTPUTS:
      path = os.path.join(workdir, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
  if jax.process_count() > 1:  # no host may start writing before the old outputs are gone
    multihost_utils.sync_global_devices("metaphorstar_jax: fresh workdir")


def write_run_config(config) -> None:
  """The run's config as JSON at the top of its workdir, with secrets redacted."""
  if jax.process_index() == 0:
    with open(os.path.join(config.workdir, RUN_CONFIG), "w") as f:
      f.write(redaction.redact(config).to_json_best_effort(indent=2))  # no keys on disk


# --- one writer per workdir ----------------------------------------------------------------------

LOCK = "run.lock"  # names the run writing this workdir: {"host", "pid", "started"}


class WorkdirLock:
  """Holds `workdir/run.lock` for one run, as a context manager, so that a second run cannot
  write the same folder (interleaved metrics, checkpoints deleted under the first run). Only
  process 0 of a multi-host run holds it; every process raises if it cannot be had.

  A lock whose holder is gone (its pid no longer runs on this host) is taken over with a
  warning; a lock held from another host is only ever released by that host or by hand.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK)
    self._held = False

  def __enter__(self) -> WorkdirLock:
    refusal = ""
    if jax.process_index() == 0 and "://" not in self.path:
      refusal = self._acquire()
    if jax.process_count() > 1:  # the others must not go on when process 0 was refused
      refused = multihost_utils.broadcast_one_to_all(np.int32(bool(refusal)))
      refusal = refusal or (f"{self.path} is held by another run (see process 0's error)."
                            if refused else "")
    if refusal:
      raise RuntimeError(refusal)
    return self

  def __exit__(self, *exc) -> None:
    if self._held and _read_holder(self.path) == self._holder:
      os.remove(self.path)
    self._held = False

  def _acquire(self) -> str:
    """Creates the lock file; returns why it could not ('' when it did)."""
    self._holder = {"host": socket.gethostname(), "pid": os.getpid(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for _ in range(2):  # a second try after removing a stale lock
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = _read_holder(self.path)
        if holder and holder["host"] == self._holder["host"] and not _running(holder["pid"]):
          logging.warning("Taking over %s: its holder, pid %d on %s (started %s), is no longer "
                          "running.", self.path, holder["pid"], holder["host"], holder["started"])
          os.remove(self.path)
          continue
        named = (f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
                 if holder else "a run whose lock file cannot be read")
        return (f"{os.path.dirname(self.path)} is in use by another run: {named}. Wait for it "
                f"to finish or use another workdir; if that run is gone, delete {self.path}.")
      with os.fdopen(fd, "w") as f:
        json.dump(self._holder, f)
      self._held = True
      return ""
    return f"Could not take over the stale lock {self.path}: another run took it first."


def _read_holder(path: str) -> dict | None:
  try:
    with open(path) as f:
      holder = json.load(f)
    return holder if {"host", "pid", "started"} <= set(holder) else None
  except (OSError, ValueError):
    return None


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return not _exited_unreaped(pid)


def _exited_unreaped(pid: int) -> bool:
  """Whether `pid` is a zombie: it has exited, but no one has collected its status yet (e.g. a
  killed ablation's cell, orphaned in a container whose init reaps nothing)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # the state follows "(command)"
  except (OSError, IndexError):  # no /proc (macOS), or the process just went
    return False


# --- what a checkpoint records of its run, and what a resumed run must keep ------------------

# Fields that give a resumed run's steps another meaning: other weights, data, batches or
# stages. `*` is any stage. Everything else (workers, logging, evaluation, export, cadences) may
# change between a run and its resumption.
RESUME_FIELDS = (
    "seed", "model.preset", "model.hf_path", "model.param_dtype", "model.freeze_vision",
    "data.task", "data.task_options", "data.train", "data.eval", "data.max_prompt_tokens",
    "rl.preset", "rl.overrides", "rl.group_size", "rl.tree_rollout",
    "train.prompts_per_step", "train.gen_prompts_per_step", "train.ppo_epochs",
    "train.num_minibatches", "train.grad_accum_steps",
    "stages.*.name", "stages.*.kind", "stages.*.steps", "stages.*.sft_data",
    "stages.*.group_size", "stages.*.prompts_per_step", "stages.*.gen_prompts_per_step",
    "stages.*.rl_overrides", "stages.*.tree_rollout",
)


def run_record(config, data_fingerprint: dict) -> dict:
  """What each checkpoint keeps of the run that saved it: its config (redacted) and its data."""
  return {"config": json.loads(redaction.redact(config).to_json_best_effort()),
          "data": data_fingerprint}


def find_resumption(config, checkpointer, record: dict) -> checkpoints.Resumption | None:
  """The saved step a run resumes from (checkpoint.step, else the newest that restores), once
  check_resume accepts the config; None for a fresh run or an empty checkpoint folder. `record`
  is the current run's `run_record`."""
  if not config.checkpoint.resume:
    return None
  resume = checkpoints.Resumption.find(checkpointer, config.checkpoint.step)
  if resume:
    check_resume(resume.record, config, record["data"], resume.step)
  return resume


def check_resume(saved: dict, config, data_fingerprint: dict, step: int) -> None:
  """Refuses to resume step `step` (ValueError naming each field, saved and current value) when
  a field of RESUME_FIELDS or the data fingerprint differs from the run that saved it, unless
  checkpoint.allow_config_change, which logs the differences instead."""
  if not saved:
    logging.warning("Step %d records no config (saved by an older version); resuming without "
                    "comparing configs.", step)
    return
  now = run_record(config, data_fingerprint)
  differences = [f"{name}: saved {before!r}, now {after!r}"
                 for name, before, after in _compared(saved, now) if before != after]
  if not differences:
    return
  listed = "; ".join(differences)
  if config.checkpoint.allow_config_change:
    logging.warning("Resuming step %d with a changed config (checkpoint.allow_config_change): "
                    "%s.", step, listed)
    return
  raise ValueError(
      f"The config differs from the one that saved step {step} in {config.workdir} in fields "
      f"that change what the resumed steps mean: {listed}. Restore those values, train into a "
      "fresh workdir, or pass --config.checkpoint.allow_config_change=True to resume anyway.")


def _compared(saved: dict, now: dict):
  """(field, saved value, current value) for every field compared on resume."""
  absent = "<absent>"
  saved_config, now_config = saved.get("config", {}), now["config"]
  stages = max(len(saved_config.get("stages", [])), len(now_config.get("stages", [])))
  yield "len(stages)", len(saved_config.get("stages", [])), len(now_config.get("stages", []))
  for field in RESUME_FIELDS:
    names = ([field.replace("*", str(i)) for i in range(stages)] if "*" in field else [field])
    for name in names:
      yield name, _lookup(saved_config, name, absent), _lookup(now_config, name, absent)
  for key in sorted(set(saved.get("data", {})) | set(now["data"])):
    yield f"data fingerprint {key}", saved.get("data", {}).get(key), now["data"].get(key)


def _lookup(tree, dotted: str, default):
  for key in dotted.split("."):
    if isinstance(tree, list) and key.isdigit() and int(key) < len(tree):
      tree = tree[int(key)]
    elif isinstance(tree, dict) and key in tree:
      tree = tree[key]
    else:
      return default
  return tree
