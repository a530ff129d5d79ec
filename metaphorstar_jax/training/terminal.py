"""What a run prints: the progress bar, our own INFO lines (evaluations, resumption, data) and
every library's warnings and errors. Libraries' INFO lines (Orbax logs each save in several) are
left out unless `log.verbose` asks for them."""

from __future__ import annotations

import logging
import os

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class OursOrWarnings(logging.Filter):
  """Passes records from this package at any level, and other code's warnings and above."""

  def filter(self, record: logging.LogRecord) -> bool:
    return (record.levelno >= logging.WARNING
            or os.path.abspath(record.pathname).startswith(PACKAGE_DIR + os.sep))


def quiet_library_logs(verbose: bool) -> None:
  """Filters every handler of the root logger (absl's among them) unless `verbose`."""
  if verbose:
    return
  for handler in logging.getLogger().handlers:
    if not any(isinstance(f, OursOrWarnings) for f in handler.filters):
      handler.addFilter(OursOrWarnings())
