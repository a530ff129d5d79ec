"""Stopping a run at a step boundary when it is asked to: SIGTERM (spot VMs, SLURM, Kubernetes
before their SIGKILL) or SIGINT (Ctrl-C).

The first signal only raises a flag: the step in progress finishes, the trainer saves it, waits
for the save and returns. A second signal ends the process at once, by the signal's default
action. Every process of a multi-host run must stop after the same step, or the others would wait
forever in the next step's collectives for the ones that left, so `StopRequest.agreed` takes the
largest signal number over all processes once per step; it also honours JAX's own pre-emption
notice (Orbax's `reached_preemption`), which on Cloud TPU includes maintenance events.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
  """The shell's code for a process that stopped because of signal `signum` (143 for SIGTERM,
  130 for SIGINT): a stopped run has not finished, and schedulers requeue on it."""
  return 128 + signum


class StopRequest:
  """The signal handlers of one `train()` call, as a context manager: they are installed on
  entry and the previous ones restored on exit. `signum` is the signal received, else None."""

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, object] = {}

  def __enter__(self) -> StopRequest:
    if threading.current_thread() is not threading.main_thread():
      logging.warning("train() runs outside the main thread, where Python cannot handle "
                      "signals: SIGTERM and SIGINT will end the run without a checkpoint.")
      return self
    for signum in SIGNALS:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    name = signal.Signals(signum).name
    if self.signum is not None:  # asked twice: go now, the way the signal alone would
      logging.warning("%s again: stopping at once, without a checkpoint of this step.", name)
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.signum = signum
    logging.warning("%s received: the step in progress finishes, is saved, and the run stops. "
                    "Send it again to stop at once.", name)

  def agreed(self, step: int, checkpointer, *, after_step: bool = True) -> bool:
    """Whether the run stops after global step `step`. With several processes this is a
    collective: every process makes the same calls, and all get the same answer. JAX's notice
    is asked for once per step, `after_step` (its sync points go step by step); the check
    before a step (for a signal during setup or an evaluation) asks only about signals."""
    if jax.process_count() == 1:
      return self.signum is not None
    signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
    if self.signum is None and signums.max() > 0:  # another process was signalled
      self.signum = int(signums.max())
    if after_step and checkpointer.reached_preemption(step) and self.signum is None:
      self.signum = int(signal.SIGTERM)  # JAX's notice; Orbax saw it on every process
    return self.signum is not None


def stopped_run(signum: int, step: int, checkpointer) -> dict:
  """Waits for the checkpoint of global step `step`, the last one run; what a run stopped by
  `signum` reports (train's results["stopped"]): the signal, the step, whether it is saved, and
  the exit code."""
  checkpointer.wait()
  saved = checkpointer.latest_step() == step
  name = signal.Signals(signum).name
  if saved:
    logging.warning("%s: stopped after step %d, saved under %s/%d; run the same command to "
                    "resume.", name, step, checkpointer.directory, step)
  elif not step:
    logging.warning("%s: stopped before the first step; nothing to save.", name)
  else:
    logging.warning("%s: stopped after step %d without a checkpoint (checkpoint.every=0).",
                    name, step)
  return {"signal": name, "step": step, "saved": saved, "exit_code": exit_code(signum)}


# --- fault injection for the resumption tests (config.debug; 0: never) --------------------------

def signal_mid_step(debug, step: int) -> None:
  """SIGTERM to process 0 during global step `step` when debug.signal_at_step names it: a
  pre-emption of one host, which the others must follow."""
  if step == debug.signal_at_step and jax.process_index() == 0:
    os.kill(os.getpid(), signal.SIGTERM)


def kill_after_checkpoint(debug, step: int, checkpointer) -> None:
  """SIGKILL once the checkpoint of global step `step` is on disk, when
  debug.kill_after_checkpoint names it: a pre-emption with no warning."""
  if step == debug.kill_after_checkpoint:
    checkpointer.wait()
    os.kill(os.getpid(), signal.SIGKILL)
