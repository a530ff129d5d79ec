"""Ablations: a grid of config overrides × seeds, each cell a training run in its own workdir.

    python -m metaphorstar_jax.ablate --config=configs/tfq_grpo_tiny.py \
        --grid='rl.preset=grpo,dapo;rl.group_size=4,8' --seeds=3 [--root=runs/ablations]

Every cell runs through the trainer's own API (`train.train(config)`) in
`root/<setting>/seed_<s>`; a cell that finished has a `cell.json` there and is never run again,
and one that was cut short resumes from its own checkpoints, so rerunning an interrupted grid
picks up where it stopped. Each cell's `metrics.jsonl` is the record: the table (one row per
setting, over seeds) and the curves are read back from it.

Table columns: final held-out accuracy (the last evaluation of the run) as mean ± sample std over
seeds; the steps of the last stage until an evaluation first reached `target` (mean over the
seeds that reached it, and how many did); reward, KL and response length as the mean over the
last `tail` logged steps of the last stage, averaged over seeds; wall time per cell.

Cells that share shapes (seeds, and settings that change no program) compile once: the grid
keeps a persistent JAX compilation cache under `root` unless one is configured already.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from metaphorstar_jax import config_files
from metaphorstar_jax import train as train_lib
from metaphorstar_jax.training import checkpoints, metrics as metrics_lib

CELL_FILE = "cell.json"  # written when a cell's run has finished
TABLE_JSON, TABLE_MD, CURVES_PNG = "table.json", "table.md", "curves.png"
# Curves drawn side by side, when the runs logged them.
CURVE_KEYS = ("eval/accuracy", "reward/mean", "kl", "response_length/mean")
_INDEX = re.compile(r"^(\w+)\[(\d+)\]$")  # a path segment like stages[1]


@dataclasses.dataclass(frozen=True)
class Cell:
  """One training run of the grid: a setting (override path -> value) and a seed."""

  overrides: tuple[tuple[str, Any], ...]
  seed: int

  @property
  def setting(self) -> str:
    """The setting's label, e.g. 'rl.preset=grpo rl.group_size=4' ('base' without overrides)."""
    return " ".join(f"{k}={v}" for k, v in self.overrides) or "base"

  def workdir(self, root: str) -> str:
    folder = re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.setting.replace(" ", "__"))
    return os.path.join(root, folder, f"seed_{self.seed}")


# --- the grid -----------------------------------------------------------------------------------

def parse_grid(text: str) -> dict[str, list[str]]:
  """'rl.preset=grpo,dapo;rl.group_size=4,8' -> {'rl.preset': ['grpo', 'dapo'],
  'rl.group_size': ['4', '8']}: axes separated by ';', values by ','. Values stay text until
  `apply_overrides` reads them as the type of the field they replace."""
  grid: dict[str, list[str]] = {}
  for axis in filter(None, (a.strip() for a in text.split(";"))):
    key, sep, values = axis.partition("=")
    parsed = [v.strip() for v in values.split(",")]
    if not sep or not key.strip() or not all(parsed):
      raise ValueError(f"Grid axis {axis!r} is not 'field.path=value1,value2,...'.")
    if key.strip() in grid:
      raise ValueError(f"Grid axis {key.strip()!r} is given twice.")
    grid[key.strip()] = parsed
  return grid


def grid_cells(grid: Mapping[str, Sequence[Any]], seeds: Sequence[int]) -> list[Cell]:
  """Every combination of the grid's values, each with every seed; seeds vary fastest."""
  keys = list(grid)
  return [Cell(tuple(zip(keys, values)), seed)
          for values in itertools.product(*(grid[k] for k in keys)) for seed in seeds]


def _parse_value(text: Any, current: Any) -> Any:
  """`text` read as the type of `current` (the field's value in the base config)."""
  if not isinstance(text, str):
    return text
  if isinstance(current, bool):
    if text.lower() not in ("true", "false"):
      raise ValueError(f"Expected True or False, got {text!r}.")
    return text.lower() == "true"
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, Any]],
                    ) -> ml_collections.ConfigDict:
  """A copy of `config` with each (path, value) set; paths like 'rl.group_size',
  'stages[1].steps' or 'rl.overrides.use_kl_loss'. ValueError for a path the config lacks."""
  config = ml_collections.ConfigDict(config.to_dict())
  for path, value in overrides:
    node, parts = config, path.split(".")
    # A section's fields (rl.group_size) must exist, so that a typo is an error; deeper keys
    # (rl.overrides.use_kl_loss, data.task_options.x) and a stage's optional fields may be new.
    must_exist = len(parts) <= 2 and not _INDEX.match(parts[0])
    try:
      for part in parts[:-1]:
        indexed = _INDEX.match(part)
        node = node[indexed.group(1)][int(indexed.group(2))] if indexed else node[part]
      leaf = parts[-1]
      if leaf not in node and must_exist:
        raise KeyError(leaf)
      current = node[leaf] if leaf in node else None
    except (KeyError, IndexError, AttributeError, TypeError) as error:
      raise ValueError(f"Override {path}={value!r}: the config has no field {path!r} "
                       f"({error!r}).") from error
    try:
      node[leaf] = _parse_value(value, current)
    except (ValueError, TypeError) as error:
      raise ValueError(f"Override {path}={value!r}: {error} (the field holds "
                       f"{current!r}).") from error
  return config


# --- running ------------------------------------------------------------------------------------

def use_compilation_cache(directory: str) -> None:
  """Keeps compiled programs under `directory` across cells, unless a cache is set already."""
  if jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def cell_config(config: ml_collections.ConfigDict, cell: Cell,
                root: str) -> ml_collections.ConfigDict:
  """The run config of `cell`: its overrides, its seed, its own workdir, no progress bar."""
  staged = apply_overrides(config, cell.overrides)
  staged.seed = cell.seed
  staged.workdir = cell.workdir(root)
  staged.log.progress_bar = False
  return staged


def run_cell(config: ml_collections.ConfigDict, cell: Cell, root: str) -> dict:
  """Trains one cell (resuming it if it was cut short) and writes its cell.json; returns it."""
  staged = cell_config(config, cell, root)
  resumed = bool(checkpoints.saved_steps(os.path.join(staged.workdir, "checkpoints")))
  start = time.perf_counter()
  results = train_lib.train(staged)
  record = {"setting": cell.setting, "overrides": [list(o) for o in cell.overrides],
            "seed": cell.seed, "workdir": staged.workdir,
            "wall_seconds": time.perf_counter() - start,
            "resumed": resumed,  # then wall_seconds counts only the part after the resume
            "stage_steps": [int(s.steps) for s in staged.stages],
            "exports": list(results.get("exports", []))}
  with open(os.path.join(staged.workdir, CELL_FILE), "w") as f:
    json.dump(record, f, indent=2)
  return record


def run_grid(config: ml_collections.ConfigDict, cells: Sequence[Cell], root: str, *,
             target: float = 0.9, tail: int = 5, compilation_cache: bool = True) -> dict:
  """Runs every unfinished cell, then tabulates and plots the grid.

  Args:
    config: the base run config (any config file's get_config()).
    cells: from `grid_cells`.
    root: the grid's folder; cell workdirs, table.json, table.md and curves.png go there.
    target: the held-out accuracy whose first step the table reports.
    tail: logged steps at the end of the last stage that reward, KL and length average over.
    compilation_cache: keep compiled programs under root/jax_cache (see the module docstring).

  Returns:
    {"rows": summarize's rows, "markdown": the table, "plot": curves.png's path or None,
     "ran": settings of the cells trained now, "skipped": those that had finished before}.
  """
  os.makedirs(root, exist_ok=True)
  if compilation_cache:
    use_compilation_cache(os.path.join(os.path.abspath(root), "jax_cache"))
  ran, skipped = [], []
  for index, cell in enumerate(cells):
    label = f"{cell.setting} seed {cell.seed}"
    if os.path.exists(os.path.join(cell.workdir(root), CELL_FILE)):
      logging.info("Cell %d/%d (%s) finished before; not rerun.", index + 1, len(cells), label)
      skipped.append(label)
      continue
    logging.info("Cell %d/%d: %s.", index + 1, len(cells), label)
    run_cell(config, cell, root)
    ran.append(label)
  collected = collect(cells, root)
  rows = summarize(collected, target=target, tail=tail)
  markdown = markdown_table(rows, target)
  with open(os.path.join(root, TABLE_JSON), "w") as f:
    json.dump(rows, f, indent=2)
  with open(os.path.join(root, TABLE_MD), "w") as f:
    f.write(markdown)
  plot = plot_curves(collected, os.path.join(root, CURVES_PNG))
  return {"rows": rows, "markdown": markdown, "plot": plot, "ran": ran, "skipped": skipped}


# --- reading back -------------------------------------------------------------------------------

def read_history(workdir: str) -> tuple[dict[int, dict], dict[int, dict]]:
  """(training rows, evaluation rows) of a run's metrics.jsonl, by step. A resumed run logs
  the steps after its checkpoint twice; the later line wins."""
  train_rows, eval_rows = {}, {}
  for row in metrics_lib.read_history(os.path.join(workdir, "metrics.jsonl")):
    is_eval = any(k.startswith("eval/") for k in row)
    (eval_rows if is_eval else train_rows)[int(row["step"])] = row
  return train_rows, eval_rows


def collect(cells: Sequence[Cell], root: str) -> list[dict]:
  """One dict per finished cell: its cell.json plus "train" and "eval" rows by step."""
  collected = []
  for cell in cells:
    path = os.path.join(cell.workdir(root), CELL_FILE)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      record = json.load(f)
    record["train"], record["eval"] = read_history(cell.workdir(root))
    collected.append(record)
  return collected


def cell_summary(record: Mapping, target: float = 0.9, tail: int = 5) -> dict:
  """One run's figures: final held-out accuracy, steps of the last stage to `target` (None if
  never), and reward / KL / response length over the last `tail` steps of the last stage."""
  last_start = sum(record["stage_steps"][:-1])  # global step at which the last stage began
  evals = sorted(record["eval"].items())
  accuracy = float(evals[-1][1]["eval/accuracy"]) if evals else float("nan")
  reached = [step - last_start for step, row in evals
             if step >= last_start and row.get("eval/accuracy", -1.0) >= target]
  last_rows = [row for step, row in sorted(record["train"].items()) if step > last_start][-tail:]
  mean = lambda key: (float(np.mean([r[key] for r in last_rows if key in r]))
                      if any(key in r for r in last_rows) else float("nan"))
  return {"accuracy": accuracy, "steps_to_target": reached[0] if reached else None,
          "reward": mean("reward/mean"), "kl": mean("kl"),
          "response_length": mean("response_length/mean"),
          "wall_seconds": float(record["wall_seconds"])}


def summarize(collected: Sequence[Mapping], target: float = 0.9, tail: int = 5) -> list[dict]:
  """One row per setting, in grid order, over its seeds: accuracy_mean / accuracy_std (sample
  std; 0 for one seed), steps_to_target_mean and reached (seeds that got there), reward_mean,
  kl_mean, response_length_mean, wall_seconds_mean, and the per-seed values ("seeds")."""
  by_setting: dict[str, list] = {}
  for record in collected:
    by_setting.setdefault(record["setting"], []).append(record)
  rows = []
  for setting, records in by_setting.items():
    runs = [cell_summary(r, target, tail) for r in records]
    column = lambda key: np.asarray([run[key] for run in runs], np.float64)
    accuracies = column("accuracy")
    reached = [run["steps_to_target"] for run in runs if run["steps_to_target"] is not None]
    rows.append({
        "setting": setting, "overrides": records[0]["overrides"],
        "num_seeds": len(runs), "seeds": [r["seed"] for r in records],
        "accuracy_mean": float(accuracies.mean()),
        "accuracy_std": float(accuracies.std(ddof=1)) if len(runs) > 1 else 0.0,
        "steps_to_target_mean": float(np.mean(reached)) if reached else None,
        "reached": len(reached),
        "reward_mean": float(column("reward").mean()), "kl_mean": float(column("kl").mean()),
        "response_length_mean": float(column("response_length").mean()),
        "wall_seconds_mean": float(column("wall_seconds").mean()),
        "per_seed": runs,
    })
  return rows


def markdown_table(rows: Sequence[Mapping], target: float = 0.9) -> str:
  """The summary rows as a Markdown table."""
  fmt = lambda v, spec: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) \
      else format(v, spec)
  lines = [f"| setting | seeds | held-out accuracy | steps to {target:.0%} | reward | KL | "
           "response length | wall time / run |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    steps = (f"{fmt(r['steps_to_target_mean'], '.0f')} ({r['reached']}/{r['num_seeds']})"
             if r["reached"] else f"never (0/{r['num_seeds']})")
    lines.append(f"| {r['setting']} | {r['num_seeds']} | {r['accuracy_mean']:.1%} ± "
                 f"{r['accuracy_std']:.1%} | {steps} | {fmt(r['reward_mean'], '.3f')} | "
                 f"{fmt(r['kl_mean'], '.3g')} | {fmt(r['response_length_mean'], '.1f')} | "
                 f"{r['wall_seconds_mean']:.0f} s |")
  return "\n".join(lines) + "\n"


def plot_curves(collected: Sequence[Mapping], out_path: str,
                keys: Sequence[str] = CURVE_KEYS) -> str | None:
  """A PNG with one panel per metric, one line per setting (the mean over seeds at each step)
  and a band from the lowest to the highest seed; returns its path (None: nothing logged)."""
  keys = [k for k in keys if any(k in row for r in collected
                                 for row in (r["eval"] if k.startswith("eval/")
                                             else r["train"]).values())]
  if not keys:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  by_setting: dict[str, list] = {}
  for record in collected:
    by_setting.setdefault(record["setting"], []).append(record)
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for setting, records in by_setting.items():
      series = [{step: row[key] for step, row in
                 (r["eval"] if key.startswith("eval/") else r["train"]).items() if key in row}
                for r in records]
      steps = sorted(set.intersection(*(set(s) for s in series)))
      if not steps:
        continue
      values = np.asarray([[s[step] for step in steps] for s in series], np.float64)
      line, = ax.plot(steps, values.mean(axis=0), label=setting,
                      marker="." if len(steps) < 30 else None)
      ax.fill_between(steps, values.min(axis=0), values.max(axis=0), alpha=0.2,
                      color=line.get_color(), linewidth=0)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)
  return out_path


# --- command line -------------------------------------------------------------------------------

def _define_flags(argv: Sequence[str]) -> flags.FlagValues:
  """Our flags in a FlagValues of their own (the trainer's module holds --config globally)."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", config_files.path(config_files.DEFAULT),
                                  "The base config file; ':smoke' for its smoke mode.",
                                  flag_values=fv, sys_argv=list(argv))
  flags.DEFINE_string("grid", "", "Axes 'path=v1,v2;path2=v3,v4' over config fields; empty: "
                      "the base config alone.", flag_values=fv)
  flags.DEFINE_integer("seeds", 1, "Seeds per setting: 0 … seeds-1.", flag_values=fv)
  flags.DEFINE_string("root", None, "The grid's folder; default <config.workdir>_ablations.",
                      flag_values=fv)
  flags.DEFINE_float("target", 0.9, "Held-out accuracy whose first step the table reports.",
                     flag_values=fv)
  flags.DEFINE_integer("tail", 5, "Last logged steps that reward, KL and length average over.",
                       flag_values=fv)
  return fv


def cli(argv: Sequence[str]) -> dict:
  """Runs the command line `argv` (program name first); returns run_grid's result."""
  fv = _define_flags(argv)
  config_files.parse_flags(fv, argv)
  if fv.seeds < 1:
    raise app.UsageError(f"--seeds must be at least 1, got {fv.seeds}.")
  config = fv.config
  cells = grid_cells(parse_grid(fv.grid), range(fv.seeds))
  for cell in cells:  # every override must name a real field before any cell trains
    apply_overrides(config, cell.overrides)
  root = fv.root or f"{config.workdir.rstrip('/')}_ablations"
  return run_grid(config, cells, root, target=fv.target, tail=fv.tail)


def main(argv):
  try:
    result = cli(argv)
  except ValueError as error:
    print(f"ablate: {error}", file=sys.stderr)
    sys.exit(1)
  print(result["markdown"])
  print(f"Ran {len(result['ran'])} cell(s), {len(result['skipped'])} finished before; "
        f"curves: {result['plot']}")


def _absl_flags(argv):
  """absl's own flags (--verbosity, ...) on the global FlagValues; the whole command line goes
  to `cli`, since importing the trainer puts its own --config on the global flags."""
  flags.FLAGS(argv, known_only=True)
  return argv


if __name__ == "__main__":
  app.run(main, flags_parser=_absl_flags)
