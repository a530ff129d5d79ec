"""training/terminal.py: libraries' INFO lines stay off the terminal unless log.verbose."""

from __future__ import annotations

import logging
import os

import orbax.checkpoint

from metaphorstar_jax.training import terminal


def record(path: str, level: int) -> logging.LogRecord:
  return logging.LogRecord("absl", level, path, 1, "message", None, None)


def test_library_info_is_filtered_and_warnings_and_our_own_lines_pass():
  orbax_file = os.path.join(os.path.dirname(orbax.checkpoint.__file__), "checkpointer.py")
  ours = os.path.join(terminal.PACKAGE_DIR, "train.py")
  keep = terminal.OursOrWarnings().filter
  assert not keep(record(orbax_file, logging.INFO))
  assert keep(record(orbax_file, logging.WARNING)) and keep(record(orbax_file, logging.ERROR))
  assert keep(record(ours, logging.INFO))


def test_verbose_leaves_the_handlers_alone_and_quiet_adds_one_filter():
  handler = logging.StreamHandler()
  root = logging.getLogger()
  root.addHandler(handler)
  try:
    terminal.quiet_library_logs(verbose=True)
    assert not handler.filters
    terminal.quiet_library_logs(verbose=False)
    terminal.quiet_library_logs(verbose=False)
    assert len(handler.filters) == 1
  finally:
    root.removeHandler(handler)
