"""Where per-step metrics go: a progress bar, TensorBoard event files, optional W&B, a JSONL
history and, at the end, a PNG plot of the curves that tell whether RL is working.

Only process 0 writes; the others keep quiet. The history (`metrics.jsonl`, one JSON object per
line, each with its "step") is repaired when a writer starts: a line a kill tore is dropped, and a
resumed run drops the rows of the steps after its checkpoint, which it is about to write again.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import logging

from metaphorstar_jax import redaction

# Shown on the progress bar, in this order, when present.
BAR_KEYS = ("reward/mean", "accuracy", "kl", "entropy", "response_length/mean", "step_seconds")
# Plotted at the end, one panel each, when present.
PLOT_KEYS = ("reward/mean", "accuracy", "eval/accuracy", "kl", "entropy", "response_length/mean")


def _scalar(value) -> float | None:
  try:
    value = float(np.asarray(value))
  except (TypeError, ValueError):
    return None
  return value


def _history_rows(path: str) -> tuple[list[tuple[bytes, dict]], list[int]]:
  """(line, row) of every readable line of the history at `path`, and the numbers of the lines
  that are not (a torn last line, or one that is not a row with a step)."""
  with open(path, "rb") as f:  # bytes: a torn line may end inside a UTF-8 character
    lines = f.read().split(b"\n")
  rows, unreadable = [], []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
      row = None
    if isinstance(row, dict) and isinstance(row.get("step"), int):
      rows.append((line, row))
    else:
      unreadable.append(number)
  return rows, unreadable


def repair_history(path: str, resume_step: int | None = None) -> None:
  """Makes the history at `path` fit a run that starts now, rewriting it (atomically) if needed.

  Args:
    path: a metrics.jsonl; nothing happens when it does not exist.
    resume_step: the global step the run restored. Rows of later steps are dropped: the resumed
      run writes them again. 0 means nothing was restored: every row goes, the "before"
      evaluation at step 0 included, since the run starts over. None keeps every readable row.

  Lines that do not parse (a kill tore the last one) are dropped with a warning.
  """
  if not os.path.exists(path):
    return
  rows, unreadable = _history_rows(path)
  if unreadable:
    logging.warning("Dropping unreadable line(s) %s of %s (a run killed mid-write tears the "
                    "last one).", unreadable, path)
  kept = rows if resume_step is None else [
      (line, row) for line, row in rows if resume_step > 0 and row["step"] <= resume_step]
  if len(kept) < len(rows):
    later = sorted({row["step"] for _, row in rows} - {row["step"] for _, row in kept})
    logging.warning("Resuming at step %d: dropping %d row(s) of steps %d-%d from %s; this run "
                    "writes them again.", resume_step, len(rows) - len(kept), later[0],
                    later[-1], path)
  if unreadable or len(kept) < len(rows):
    with open(path + ".tmp", "wb") as f:
      f.write(b"".join(line + b"\n" for line, _ in kept))
    os.replace(path + ".tmp", path)


def purge_step(resume_step: int | None) -> int | None:
  """The first step whose TensorBoard events a run starting now writes again (None: none): the
  ones after the restored step, or every one on a fresh start (0)."""
  if resume_step is None:
    return None
  return resume_step + 1 if resume_step > 0 else 0


class MetricsWriter:
  """Collects scalar metrics per step and fans them out.

  `resume_step` is the global step the run restored (0: none, a fresh start; None: leave the
  history as it is, torn lines apart); see `repair_history`. TensorBoard hides the events of
  the steps it writes again (tensorboardX `purge_step`), so a resumed run shows each step once;
  W&B starts a new run at each start, whose steps begin after the restored one.
  """

  @classmethod
  def for_run(cls, config, resume_step: int = 0) -> MetricsWriter:
    """The writer of the run `config` (its workdir, total steps and config.log), keeping the
    history up to `resume_step`."""
    return cls(config.workdir, total_steps=sum(s.steps for s in config.stages),
               use_tensorboard=config.log.tensorboard,
               wandb_project=config.log.wandb_project or None, config=config.to_dict(),
               progress_bar=config.log.progress_bar, resume_step=resume_step)

  def __init__(self, workdir: str, *, total_steps: int, use_tensorboard: bool = True,
               wandb_project: str | None = None, config: Mapping | None = None,
               progress_bar: bool = True, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0
    self.workdir = workdir
    self.history_path = os.path.join(workdir, "metrics.jsonl")
    self._tb = self._wandb = self._bar = None
    self.resume_step = resume_step
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    repair_history(self.history_path, resume_step)
    if use_tensorboard:
      self._open_tensorboard(resume_step)
    if wandb_project:
      try:
        import wandb
      except ImportError as e:
        raise ImportError("W&B logging was asked for (wandb_project) but wandb is not "
                          "installed: pip install wandb.") from e
      self._wandb = wandb.init(project=wandb_project, dir=workdir,  # a dashboard: no keys
                               config=redaction.redact(dict(config or {})))
    if progress_bar:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, dynamic_ncols=True, desc="train")

  def _open_tensorboard(self, resume_step: int | None) -> None:
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"),
                             purge_step=purge_step(resume_step))

  def rewind(self, resume_step: int) -> None:
    """The run restored an older step than the writer was opened for (the newer ones did not
    restore): the history and TensorBoard drop the steps after `resume_step` too."""
    if not self.enabled or resume_step == self.resume_step:
      return
    self.resume_step = resume_step
    repair_history(self.history_path, resume_step)
    if self._tb is not None:
      self._tb.close()
      self._open_tensorboard(resume_step)

  def write(self, step: int, metrics: Mapping[str, float]) -> dict[str, float]:
    """Records one step's metrics; returns them as plain floats."""
    scalars = {k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
    if not self.enabled:
      return scalars
    with open(self.history_path, "a") as f:
      f.write(json.dumps({"step": step, **scalars}) + "\n")
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, value, step)
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(scalars, step=step)
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix({k.split("/")[0]: f"{scalars[k]:.3g}" for k in BAR_KEYS
                             if k in scalars}, refresh=True)
    return scalars

  def close(self):
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


def read_history(path: str) -> list[dict]:
  """The rows of the history at `path`, in file order; unreadable lines are skipped with a
  warning (a run still writing, or killed, may leave a torn last line)."""
  if not os.path.exists(path):
    return []
  rows, unreadable = _history_rows(path)
  if unreadable:
    logging.warning("Skipping unreadable line(s) %s of %s.", unreadable, path)
  return [row for _, row in rows]


def plot_history(history: Sequence[Mapping], out_path: str,
                 keys: Sequence[str] = PLOT_KEYS) -> str | None:
  """A PNG with one panel per metric over steps; returns its path (None when nothing to plot)."""
  keys = [k for k in keys if any(k in row for row in history)]
  if not keys or jax.process_index() != 0:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = min(3, len(keys))
  rows = math.ceil(len(keys) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    points = [(row["step"], row[key]) for row in history if key in row]
    steps, values = zip(*points)
    ax.plot(steps, values, marker="." if len(points) < 30 else None)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)
  logging.info("Wrote the training curves to %s.", out_path)
  return out_path
