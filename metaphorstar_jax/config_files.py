"""The experiment config files (the repository's `configs/*.py`), found from any install.

setup.py ships `configs/` as the package `metaphorstar_jax.configs`, so a non-editable install
(`pip install .`, `pip install git+...`, as Colab does) carries the files inside site-packages;
an editable install maps the same package name onto the checkout's folder. A checkout used
without installing (the package on PYTHONPATH) finds the folder next to the package.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

from absl import app, flags

DEFAULT = "tfq_grpo_tiny"  # the embedded default every entry point starts from


def directory() -> str:
  """The folder holding the config files; FileNotFoundError if this install has none."""
  spec = importlib.util.find_spec(f"{__package__}.configs")
  if spec is not None and spec.submodule_search_locations:
    return os.path.abspath(list(spec.submodule_search_locations)[0])
  checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  if os.path.isdir(checkout):
    return checkout
  raise FileNotFoundError(f"No configs in this install of {__package__} (looked for the package "
                          f"{__package__}.configs and for {checkout}); reinstall it with "
                          "`pip install .` from a checkout, which ships configs/.")


def names() -> list[str]:
  """The config names available, e.g. ['cinema_7b', ..., 'tfq_grpo_tiny']."""
  return sorted(f[:-3] for f in os.listdir(directory())
                if f.endswith(".py") and not f.startswith("_"))


def path(name: str = DEFAULT) -> str:
  """The absolute path of the config called `name` ('tfq_grpo_tiny' or 'tfq_grpo_tiny.py')."""
  stem = name[:-3] if name.endswith(".py") else name
  found = os.path.join(directory(), stem + ".py")
  if not os.path.isfile(found):
    raise FileNotFoundError(f"No config named {name!r} in {directory()}; available: "
                            f"{', '.join(names())}.")
  return found


def parse_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> flags.FlagValues:
  """Parses an entry point's command line `argv` (program name first) into `flag_values`; a bad
  flag or a stray positional argument is an app.UsageError."""
  try:
    rest = flag_values(list(argv))
  except flags.Error as error:
    raise app.UsageError(str(error)) from error
  if len(rest) > 1:
    raise app.UsageError(f"Unexpected arguments: {rest[1:]}")
  return flag_values
