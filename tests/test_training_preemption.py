"""Stop requests, in process: the handlers are installed for the run and restored after it, a
signal is recorded rather than acted on, and the exit code is the shell's for that signal.
(Whole runs stopped by signals are in test_preemption.)"""

import logging
import signal
import threading

from metaphorstar_jax.training import preemption


def test_exit_codes_are_the_shells():
  assert preemption.exit_code(signal.SIGTERM) == 143
  assert preemption.exit_code(signal.SIGINT) == 130


def test_a_signal_is_recorded_for_the_step_boundary_and_the_handlers_are_restored(caplog):
  before = {signum: signal.getsignal(signum) for signum in preemption.SIGNALS}
  with preemption.StopRequest() as stop:
    assert all(signal.getsignal(signum) == stop._handle for signum in preemption.SIGNALS)
    assert stop.signum is None and not stop.agreed(1, checkpointer=None)
    with caplog.at_level(logging.WARNING):
      signal.raise_signal(signal.SIGINT)  # would be KeyboardInterrupt without the handler
    assert stop.signum == signal.SIGINT and stop.agreed(1, checkpointer=None)
    assert "SIGINT received: the step in progress finishes" in caplog.text
  assert {signum: signal.getsignal(signum) for signum in preemption.SIGNALS} == before


def test_outside_the_main_thread_nothing_is_installed(caplog):
  before = signal.getsignal(signal.SIGTERM)
  found = []

  def run():
    with preemption.StopRequest() as stop:
      found.append((signal.getsignal(signal.SIGTERM), stop.signum))

  with caplog.at_level(logging.WARNING):
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
  assert found == [(before, None)]
  assert "outside the main thread" in caplog.text


class Checkpointer:
  directory = "/runs/x/checkpoints"

  def __init__(self, latest):
    self.latest, self.waited = latest, False

  def wait(self):
    self.waited = True

  def latest_step(self):
    return self.latest


def test_a_stopped_run_reports_its_signal_step_and_whether_that_step_is_saved(caplog):
  saved = Checkpointer(latest=4)
  with caplog.at_level(logging.WARNING):
    report = preemption.stopped_run(signal.SIGTERM, 4, saved)
  assert saved.waited  # the step's save is on disk before the report says so
  assert report == {"signal": "SIGTERM", "step": 4, "saved": True, "exit_code": 143}
  assert "saved under /runs/x/checkpoints/4" in caplog.text
  assert preemption.stopped_run(signal.SIGINT, 6, Checkpointer(latest=4))["saved"] is False
  assert "without a checkpoint (checkpoint.every=0)" in caplog.text
  assert preemption.stopped_run(signal.SIGINT, 0, Checkpointer(latest=None))["exit_code"] == 130
  assert "before the first step; nothing to save" in caplog.text
