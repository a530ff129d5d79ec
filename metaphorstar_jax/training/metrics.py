"""Where per-step metrics go: a progress bar, TensorBoard event files, optional W&B, a JSONL
history and, at the end, a PNG plot of the curves that tell whether RL is working.

Only process 0 writes; the others keep quiet.
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


class MetricsWriter:
  """Collects scalar metrics per step and fans them out."""

  def __init__(self, workdir: str, *, total_steps: int, use_tensorboard: bool = True,
               wandb_project: str | None = None, config: Mapping | None = None,
               progress_bar: bool = True):
    self.enabled = jax.process_index() == 0
    self.workdir = workdir
    self.history_path = os.path.join(workdir, "metrics.jsonl")
    self._tb = self._wandb = self._bar = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if use_tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
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
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


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
