"""Looking tasks up by name.

A task module exposes `TASK_FACTORIES = {name: make_task}`, each factory taking the task's
options as keyword arguments and returning a `Task`. `get_task(name)` imports the module that
holds `name`: a built-in one from the table below, else `metaphorstar_jax.tasks.<name>`, else the
dotted module path `name` itself. So a fifth task is one new module (plus its config); listing it
below only makes it show up in `task_names()`.
"""

from __future__ import annotations

import importlib
from typing import Any

from metaphorstar_jax.tasks.records import Task

BUILTIN_TASKS = {
  "shapes": "metaphorstar_jax.tasks.shapes",
  "tfq": "metaphorstar_jax.tasks.tfq",
  "tfq_mcq": "metaphorstar_jax.tasks.tfq",
  "tfq_osq": "metaphorstar_jax.tasks.tfq",
  "reasonmap": "metaphorstar_jax.tasks.reasonmap",
  "tvr": "metaphorstar_jax.tasks.tvr",
  "cinema": "metaphorstar_jax.tasks.cinema",
}


def task_names() -> list[str]:
  """The built-in task names."""
  return sorted(BUILTIN_TASKS)


def _factories(name: str) -> dict[str, Any]:
  candidates = (
    [BUILTIN_TASKS[name]] if name in BUILTIN_TASKS else [f"metaphorstar_jax.tasks.{name}", name]
  )
  for module_name in candidates:
    try:
      module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
      if error.name is not None and module_name.startswith(error.name):
        continue  # this candidate does not exist; a missing dependency inside it still raises
      raise
    factories = getattr(module, "TASK_FACTORIES", None)
    if isinstance(factories, dict):
      return factories
  raise ValueError(
    f"Unknown task {name!r}; built-in tasks are {task_names()}, or give a module "
    "path whose module defines TASK_FACTORIES."
  )


def get_task(name: str, **options: Any) -> Task:
  """The task called `name`, built with `options` (unknown options raise, naming the valid ones)."""
  factories = _factories(name)
  if name in factories:
    return factories[name](**options)
  if len(factories) == 1:  # a module path naming a single-task module
    return next(iter(factories.values()))(**options)
  raise ValueError(f"Module for {name!r} defines tasks {sorted(factories)}; ask for one of them.")


def write_miniature(task: str, out_dir: str, n: int, seed: int = 0, **options: Any) -> str:
  """Writes a synthetic `n`-example copy of `task`'s data to `out_dir` in its real on-disk layout.

  Returns:
    the path to pass to the task's `read`.
  """
  return get_task(task, **options).write_miniature(out_dir, n, seed)
