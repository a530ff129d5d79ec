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
