"""Ablations: a grid of config overrides × seeds, each cell a training run in its own workdir.

    python -m metaphorstar_jax.ablate --config=configs/tfq_grpo_tiny.py \
        --grid='rl.preset=grpo,dapo;rl.group_size=4,8' --seeds=3 [--root=runs/ablations]

Every cell is a trainer run in a process of its own, `python -m metaphorstar_jax.train
--config=<file> --config.<field>=<value> ...`: the command line's own overrides, then the cell's,
its seed and its workdir `root/<setting>/seed_<s>`, where its output goes to `train.log`. Each
cell's command line is parsed as the trainer parses it before any cell runs, so a misspelt field
or a value of the wrong type stops the grid before anything trains. A cell that finished has a
`cell.json` and is never run again, and one that was cut short resumes from its own checkpoints,
so rerunning an interrupted grid picks up where it stopped. SIGINT and SIGTERM are passed on to
the running cell, which saves its step and stops (a second one stops it at once); the grid then
stops with the cell's exit code. Each cell's `metrics.jsonl` is the record: the table (one row
per setting, over seeds) and the curves are read back from it.

Table columns: final held-out accuracy (the last evaluation of the run) as mean ± sample std over
seeds; the steps of the last stage until an evaluation first reached `target` (mean over the
seeds that reached it, and how many did); reward, KL and response length as the mean over the
last `tail` logged steps of the last stage, averaged over seeds; wall time per cell.

Cells that share shapes (seeds, and settings that change no program) compile once: the cells'
processes share a persistent JAX compilation cache under `root` unless one is configured already
(JAX_COMPILATION_CACHE_DIR).
"""

from __future__ import annotations

import ctypes
import dataclasses
import glob
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags, logging

from metaphorstar_jax import config_files
from metaphorstar_jax.training import checkpoints, metrics as metrics_lib

CELL_FILE = "cell.json"  # written when a cell's run has finished
TRAIN_LOG = "train.log"  # a cell's trainer output, appended to on each (re)start
TABLE_JSON, TABLE_MD, CURVES_PNG = "table.json", "table.md", "curves.png"
TRAINER = "metaphorstar_jax.train"  # the module each cell runs
# Curves drawn side by side, when the runs logged them.
CURVE_KEYS = ("eval/accuracy", "reward/mean", "kl", "response_length/mean")
LOG_TAIL_LINES = 30  # of a failed cell's train.log, in the error


@dataclasses.dataclass(frozen=True)
class Cell:
  """One training run of the grid: a setting (override path -> value) and a seed."""

  overrides: tuple[tuple[str, Any], ...]
  seed: int

  @property
  def setting(self) -> str:
    """The setting's label, e.g. 'rl.preset=grpo rl.group_size=4' ('base' without overrides)."""
    return " ".join(f"{k}={v}" for k, v in self.overrides) or "base"

  @property
  def label(self) -> str:
    return f"{self.setting} seed {self.seed}"

  def workdir(self, root: str) -> str:
    folder = re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.setting.replace(" ", "__"))
    return os.path.join(root, folder, f"seed_{self.seed}")


# --- the grid -----------------------------------------------------------------------------------

def parse_grid(text: str) -> dict[str, list[str]]:
  """'rl.preset=grpo,dapo;rl.group_size=4,8' -> {'rl.preset': ['grpo', 'dapo'],
  'rl.group_size': ['4', '8']}: axes separated by ';', values by ','. Values stay text: the
  trainer's command line reads them as the type of the field they replace."""
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


# --- a cell's run -------------------------------------------------------------------------------

def cell_overrides(overrides: Sequence[tuple[str, Any]], cell: Cell,
                   root: str) -> list[tuple[str, Any]]:
  """(field path, value) of `cell`'s run, later ones winning: the grid's base `overrides`, the
  cell's own, its seed and workdir, and no progress bar."""
  return [*overrides, *cell.overrides, ("seed", cell.seed), ("workdir", cell.workdir(root)),
          ("log.progress_bar", False)]


def train_command(config_spec: str, overrides: Sequence[tuple[str, Any]]) -> list[str]:
  """The trainer's command line: the config file `config_spec` ('file.py' or 'file.py:smoke')
  with each (path, value) as `--config.<path>=<value>` (values as text, e.g. 'True', '4')."""
  return [sys.executable, "-m", TRAINER, f"--config={config_spec}",
          *(f"--config.{path}={value}" for path, value in overrides)]


def cell_config(config_spec: str, overrides: Sequence[tuple[str, Any]], cell: Cell,
                root: str) -> ml_collections.ConfigDict:
  """The config `cell`'s run trains with: its command line parsed as the trainer parses it.
  ValueError, naming the cell, for a field the config lacks or a value its type refuses."""
  argv = [TRAINER, *train_command(config_spec, cell_overrides(overrides, cell, root))[3:]]
  fv = flags.FlagValues()
  config_files.define_config_flag("config", config_spec, "The cell's config.", flag_values=fv,
                                  sys_argv=argv)
  try:
    config_files.parse_flags(fv, argv)
  except (app.UsageError, AttributeError, IndexError, KeyError, TypeError, ValueError) as error:
    given = " ".join(f"{k}={v}" for k, v in [*overrides, *cell.overrides])
    raise ValueError(f"Cell {cell.label}: the trainer refuses the overrides {given!r} of "
                     f"{config_spec}: {type(error).__name__}: {error}") from error
  return fv.config


class CellFailed(RuntimeError):
  """A cell's trainer exited with `returncode` (not 0) before the cell finished."""

  def __init__(self, cell: Cell, returncode: int, log_path: str):
    with open(log_path, errors="replace") as f:
      tail = "".join(f.readlines()[-LOG_TAIL_LINES:])
    how = (f"was stopped by {signal.Signals(returncode - 128).name} after saving its last step "
           "(with checkpoint.every > 0); rerun the grid to resume it" if returncode in (130, 143)
           else f"exited with {returncode}")
    super().__init__(f"Cell {cell.label}: the trainer {how}. The end of {log_path}:\n{tail}")
    self.returncode = returncode


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
  """In the trainer's process before it starts: a grid killed outright (SIGKILL) takes its cell
  along instead of leaving it running unwatched; SIGINT and SIGTERM are passed on instead."""
  _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def run_trainer(command: Sequence[str], log_path: str, env: Mapping[str, str]) -> int:
  """Runs `command` with its output appended to `log_path`; returns its exit code. SIGINT and
  SIGTERM that this process gets are passed on to it (from the main thread)."""
  with open(log_path, "a") as log:
    log.write(f"$ {shlex.join(command)}\n")
    log.flush()
    process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=dict(env),
                               start_new_session=True,  # a Ctrl-C reaches it once, through us
                               preexec_fn=_die_with_parent if _LIBC is not None else None)
    previous = {}
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, lambda s, _: process.send_signal(s))
    try:
      return process.wait()
    finally:
      for signum, handler in previous.items():
        signal.signal(signum, handler)


def trainer_env(root: str, compilation_cache: bool) -> dict[str, str]:
  """The cells' environment: this one, this package first on the path (the cells run the code
  the grid runs), and a compilation cache under `root` unless one is set already."""
  env = dict(os.environ)
  package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
  if compilation_cache and not env.get("JAX_COMPILATION_CACHE_DIR"):
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.path.abspath(root), "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env


def run_cell(cell: Cell, staged: ml_collections.ConfigDict, command: Sequence[str],
             env: Mapping[str, str]) -> dict:
  """Trains one cell in a trainer process running `command` (resuming it if it was cut short)
  and writes its cell.json; returns it. `staged` is the cell's parsed config (cell_config).
  CellFailed if the trainer does not finish."""
  os.makedirs(staged.workdir, exist_ok=True)
  resumed = bool(checkpoints.saved_steps(os.path.join(staged.workdir, "checkpoints")))
  log_path = os.path.join(staged.workdir, TRAIN_LOG)
  start = time.perf_counter()
  returncode = run_trainer(command, log_path, env)
  if returncode != 0:
    raise CellFailed(cell, returncode if returncode > 0 else 128 - returncode, log_path)
  exports = glob.glob(os.path.join(staged.workdir, "hf", "step_*"))
  record = {"setting": cell.setting, "overrides": [list(o) for o in cell.overrides],
            "seed": cell.seed, "workdir": staged.workdir,
            "wall_seconds": time.perf_counter() - start,
            "resumed": resumed,  # then wall_seconds counts only the part after the resume
            "stage_steps": [int(s.steps) for s in staged.stages],
            "exports": sorted(exports, key=lambda path: int(path.rsplit("_", 1)[1]))}
  with open(os.path.join(staged.workdir, CELL_FILE), "w") as f:
    json.dump(record, f, indent=2)
  return record


# --- the grid's runs ----------------------------------------------------------------------------

def run_grid(config_spec: str, cells: Sequence[Cell], root: str, *,
             overrides: Sequence[tuple[str, Any]] = (), target: float = 0.9, tail: int = 5,
             compilation_cache: bool = True) -> dict:
  """Runs every unfinished cell, then tabulates and plots the grid.

  Args:
    config_spec: the base config file (e.g. `config_files.path("tfq_grpo_tiny")`), with
      ':smoke' or another argument of its get_config if wanted.
    cells: from `grid_cells`.
    root: the grid's folder; cell workdirs, table.json, table.md and curves.png go there.
    overrides: (field path, value) every cell starts from, before its own; values as the
      trainer's command line takes them (text, or numbers and booleans).
    target: the held-out accuracy whose first step the table reports.
    tail: logged steps at the end of the last stage that reward, KL and length average over.
    compilation_cache: the cells share compiled programs under root/jax_cache (see the module
      docstring).

  Returns:
    {"rows": summarize's rows, "markdown": the table, "plot": curves.png's path or None,
     "ran": labels of the cells trained now, "skipped": those that had finished before}.
  """
  file, sep, argument = config_spec.partition(":")
  config_spec = os.path.abspath(file) + sep + argument  # as each cell's train.log records it
  overrides = list(overrides)
  # Every cell's command line must parse before any cell trains.
  configs = [cell_config(config_spec, overrides, cell, root) for cell in cells]
  os.makedirs(root, exist_ok=True)
  env = trainer_env(root, compilation_cache)
  ran, skipped = [], []
  for index, (cell, config) in enumerate(zip(cells, configs, strict=True)):
    if os.path.exists(os.path.join(cell.workdir(root), CELL_FILE)):
      logging.info("Cell %d/%d (%s) finished before; not rerun.", index + 1, len(cells),
                   cell.label)
      skipped.append(cell.label)
      continue
    logging.info("Cell %d/%d: %s (log: %s).", index + 1, len(cells), cell.label,
                 os.path.join(cell.workdir(root), TRAIN_LOG))
    run_cell(cell, config,
             train_command(config_spec, cell_overrides(overrides, cell, root)), env)
    ran.append(cell.label)
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
  """Our flags in a FlagValues of their own; each call starts from the defaults."""
  fv = flags.FlagValues()
  config_files.define_config_flag("config", config_files.path(config_files.DEFAULT),
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


def config_overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
  """The `--config.<path>=<value>` (or `--config.<path> <value>`) overrides of a command line,
  as (path, value text) in their order."""
  found = []
  for index, arg in enumerate(argv):
    if not arg.startswith("--config."):
      continue
    path, sep, value = arg[len("--config."):].partition("=")
    if not sep and index + 1 < len(argv):
      value = argv[index + 1]
    found.append((path, value))
  return found


def cli(argv: Sequence[str]) -> dict:
  """Runs the command line `argv` (program name first); returns run_grid's result."""
  fv = _define_flags(argv)
  config_files.parse_flags(fv, argv)
  if fv.seeds < 1:
    raise app.UsageError(f"--seeds must be at least 1, got {fv.seeds}.")
  cells = grid_cells(parse_grid(fv.grid), range(fv.seeds))
  root = fv.root or f"{fv.config.workdir.rstrip('/')}_ablations"
  config_spec = config_files.config_spec(argv, config_files.path(config_files.DEFAULT))
  return run_grid(config_spec, cells, root, overrides=config_overrides(argv), target=fv.target,
                  tail=fv.tail)


def main(argv):
  try:
    result = cli(argv)
  except ValueError as error:
    print(f"ablate: {error}", file=sys.stderr)
    sys.exit(1)
  except CellFailed as error:
    print(f"ablate: {error}", file=sys.stderr)
    sys.exit(error.returncode)
  print(result["markdown"])
  print(f"Ran {len(result['ran'])} cell(s), {len(result['skipped'])} finished before; "
        f"curves: {result['plot']}")


def _absl_flags(argv):
  """absl's own flags (--verbosity, ...) on the global FlagValues; the whole command line goes
  to `cli`, which parses ours into a FlagValues of their own."""
  flags.FLAGS(argv, known_only=True)
  return argv


if __name__ == "__main__":
  app.run(main, flags_parser=_absl_flags)
