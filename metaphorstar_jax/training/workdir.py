"""The run's folder: what a fresh run may find there, and the config it records."""

from __future__ import annotations

import os
import shutil

import jax
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
