"""The experiment config files (the repository's `configs/*.py`), found from any install.

setup.py ships `configs/` as the package `metaphorstar_jax.configs`, so a non-editable install
(`pip install .`, `pip install git+...`, as Colab does) carries the files inside site-packages;
an editable install maps the same package name onto the checkout's folder. A checkout used
without installing (the package on PYTHONPATH) finds the folder next to the package.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Sequence

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from metaphorstar_jax import config_defaults

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


def load(spec: str) -> ml_collections.ConfigDict:
  """The config of a `--config` value: 'path/to/file.py' or 'path/to/file.py:arg'."""
  file, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_metaphorstar_config", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def config_spec(argv: Sequence[str], default: str) -> str:
  """The `--config` value of a command line (its last one), or `default`."""
  found = default
  for index, arg in enumerate(argv):
    if arg.startswith("--config="):
      found = arg[len("--config="):]
    elif arg == "--config" and index + 1 < len(argv):
      found = argv[index + 1]
  return found


def _path_text(parts) -> str:
  """'stages[1].group_size' for ('stages', 1, 'group_size')."""
  text = ""
  for part in parts:
    text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
  return text


def unknown_field_error(config: ml_collections.ConfigDict, path: str) -> str | None:
  """Why `--config.<path>` names no field of `config` (one line, with the closest valid name), or
  None when it names one. `path` is ml_collections' ('rl.group_size', 'stages[1].steps')."""
  try:
    config_path.get_value(path, config)
    return None
  except (KeyError, IndexError, AttributeError, TypeError, ValueError):
    pass
  parts = config_path.split(path)
  node = config
  for depth, part in enumerate(parts):
    where = _path_text(parts[:depth])
    if isinstance(node, (list, tuple)):
      if isinstance(part, int) and 0 <= part < len(node):
        node = node[part]
        continue
      return f"config.{where} has {len(node)} entries (indices 0 to {len(node) - 1})."
    keys = list(node.keys()) if isinstance(node, (dict, ml_collections.ConfigDict)) else []
    if part in keys:
      node = node[part]
      continue
    schemas = config_defaults.dict_field_schemas(config) if where else {}
    if where in schemas:  # a dict-valued field: keys of its own schema, given as a dict
      what, valid = schemas[where]
      if part in valid:
        return (f"config.{where} holds only the keys its config file set; give "
                f"others as a dict, --config.{where}=\"{{'{part}': ...}}\" (merged into the "
                "file's).")
      return (f"config.{where} has no key {part!r}"
              f"{config_defaults.closest_name_hint(part, valid)}; its keys are {what}.")
    if not keys:
      return f"config.{where} is {node!r}, which has no fields."
    close = config_defaults.closest_name(part, keys)
    hint = f" (did you mean {_path_text((*parts[:depth], close))!r}?)" if close else ""
    return (f"config has no field {_path_text(parts[:depth + 1])!r}{hint}; "
            f"config{'.' + where if where else ''} has {', '.join(map(str, keys))}.")
  return None


class _UnknownFieldParser(flags.ArgumentParser):
  """Stands in for an override of a field the config lacks: parsing it is the error."""

  def __init__(self, message: str):
    self.message = message

  def parse(self, argument):
    raise ValueError(self.message)

  def flag_type(self):
    return "an unknown config field"


def define_config_flag(name: str, default: str, help_string: str,
                       flag_values: flags.FlagValues = flags.FLAGS,
                       sys_argv: Sequence[str] | None = None):
  """config_flags.DEFINE_config_file, but `--name.<path>` for a field the config lacks is a
  one-line flags error naming the closest field (ml_collections raised an AttributeError
  traceback, at import for a module-level flag). The config comes out locked (base_config)."""
  argv = list(sys.argv if sys_argv is None else sys_argv)
  override = re.compile(rf"^-{{1,2}}(?:no)?({re.escape(name)}\.[^=]*)")
  overrides = {}  # flag name ('config.rl.group_size') -> its index in argv
  for index, arg in enumerate(argv):
    match = override.match(arg)
    if match:
      overrides[match.group(1)] = index
  bad = {}
  if overrides:
    try:
      config = load(config_spec(argv, default))
    except Exception:  # pylint: disable=broad-except - ml_collections reports a bad file itself
      config = None
    for flag_name in overrides:
      message = config is not None and unknown_field_error(config, flag_name.split(".", 1)[1])
      if message:
        bad[flag_name] = message
  if bad:  # ml_collections must not see them; the stand-in flags below report them
    sys_argv = [arg for index, arg in enumerate(argv)
                if index not in {overrides[flag_name] for flag_name in bad}]
  holder = config_flags.DEFINE_config_file(name, default, help_string, flag_values=flag_values,
                                           sys_argv=sys_argv)
  for flag_name, message in bad.items():
    flag = flags.Flag(_UnknownFieldParser(message), flags.ArgumentSerializer(), flag_name, None,
                      message, boolean=True)
    flags.DEFINE_flag(flag, flag_values)
  return holder


def merge_dict_overrides(config: ml_collections.ConfigDict, config_flag,
                         argv: Sequence[str], default: str) -> dict[str, list[str]]:
  """Merges a command-line dict into the config file's dict, key by key.

  ml_collections replaces a dict field given on the command line (`--config.rl.overrides=
  "{'clip_ratio_high': 0.28}"`) whole, which silently dropped every key the file had set (the
  tiny config's KL settings, say). Here the given keys win and the file's other keys stay; each
  kept key is logged. A given key outside the field's schema (config_defaults.dict_field_schemas)
  is an app.UsageError naming the closest valid key. Returns {field: kept keys}."""
  given = config_flags.get_override_values(config_flag)
  dict_fields = {path: value for path, value in given.items()
                 if isinstance(value, (dict, ml_collections.ConfigDict))}
  if not dict_fields:
    return {}
  schemas = config_defaults.dict_field_schemas(config)
  for path, value in dict_fields.items():
    what, valid = schemas.get(path, (None, None))
    for key in (value if valid is not None else ()):
      if key not in valid:
        raise app.UsageError(f"--config.{path}: no key {key!r}"
                             f"{config_defaults.closest_name_hint(key, valid)}; its keys are "
                             f"{what}, {', '.join(sorted(valid))}.")
  original = load(config_spec(argv, default))
  kept = {}
  for path, value in dict_fields.items():
    before = original
    for part in path.split("."):
      before = before[int(part)] if isinstance(before, (list, tuple)) else before[part]
    if not isinstance(before, (dict, ml_collections.ConfigDict)):
      continue
    before, value = dict(before), dict(value)
    missing = sorted(set(before) - set(value))
    if not missing:
      continue
    *parents, last = path.split(".")
    node = config
    for part in parents:
      node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
    node[last] = {**before, **value}
    kept[path] = missing
    logging.warning("--config.%s merges into the config file's dict: it keeps %s from the file "
                    "(set a key to change it).", path, ", ".join(
                        f"{k}={before[k]!r}" for k in missing))
  return kept


def parse_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> flags.FlagValues:
  """Parses an entry point's command line `argv` (program name first) into `flag_values`, merging
  dict overrides of `--config` key by key (merge_dict_overrides); a bad flag or a stray
  positional argument is an app.UsageError."""
  try:
    rest = flag_values(list(argv))
  except flags.Error as error:
    raise app.UsageError(str(error)) from error
  if len(rest) > 1:
    raise app.UsageError(f"Unexpected arguments: {rest[1:]}")
  if "config" in flag_values and flag_values["config"].value is not None:
    merge_dict_overrides(flag_values["config"].value, flag_values["config"], argv,
                         path(DEFAULT))
  return flag_values
