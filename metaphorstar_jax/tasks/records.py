"""What every task shares: the Record, the Task bundle, read statistics and option handling."""

from __future__ import annotations

import collections
import os
import dataclasses
import difflib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from absl import logging

Conversation = list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Record:
  """One example of a task.

  Attributes:
    id: unique within its source; skips and metrics name records by it.
    images: the images in prompt order, each encoded bytes (checked to decode when read) or a
      PIL image.
    prompt: the question text as the data holds it (e.g. TFQ's `problem`).
    answer: the ground truth, in the task's own type ("T", an int, a list of triples, ...).
    metadata: everything else the prompt, the scorer or the metrics need.
  """

  id: str
  images: tuple[Any, ...]
  prompt: str
  answer: Any
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ReadStats:
  """Counts what a reader kept and skipped, every skip also logged with the record id, and the
  ids that more than one kept record has (id -> records after the first)."""

  source: str = ""
  read: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  duplicate_ids: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def skip(self, record_id: str, reason: str, detail: str = "") -> None:
    """Counts one skipped record under `reason` and logs it."""
    self.skipped[reason] += 1
    logging.warning(
      "Skipping record %s of %s: %s%s",
      record_id,
      self.source or "input",
      reason,
      f" ({detail})" if detail else "",
    )

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def summary(self) -> str:
    reasons = ", ".join(f"{count} {reason}" for reason, count in self.skipped.most_common())
    return f"{self.source}: read {self.read} records, skipped {self.num_skipped}" + (
      f" ({reasons})" if reasons else ""
    ) + (f"; {self.duplicates()}" if self.duplicate_ids else "")

  def duplicates(self, examples: int = 3) -> str:
    """'N records repeat an earlier id (e.g. 'a' x2, ...)', naming the `examples` most repeated."""
    named = ", ".join(f"{record_id!r} x{count + 1}"
                      for record_id, count in self.duplicate_ids.most_common(examples))
    more = ", ..." if len(self.duplicate_ids) > examples else ""
    return (f"{sum(self.duplicate_ids.values())} records repeat an earlier id (e.g. "
            f"{named}{more})")


class RecordError(ValueError):
  """A row cannot become a record; `reason` is the short category counted in ReadStats."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class Task:
  """A task bundled for the trainer and the evaluator; built by `get_task(name, **options)`.

  Attributes:
    name: the registry name.
    options: the task's options dataclass, with defaults filled in.
    read: (path, stats) -> iterator of Records; skips bad rows, counting them in `stats`.
    build_conversation: Record -> chat messages for ChatProcessor (PIL images inline).
    score: (completion text, Record) -> {"overall": float, ...}; never raises.
    evaluate: (completion texts, Records) -> {metric name: float}.
    write_miniature: (out_dir, n, seed) -> path that `read` accepts; a synthetic copy of the
      data in its on-disk layout.
    order: (records, seed) -> records in training order (a curriculum, or unchanged).
    shuffle: whether a data pipeline may shuffle after `order` (False keeps a curriculum).
  """

  name: str
  options: Any
  read: Callable[..., Iterator[Record]]
  build_conversation: Callable[[Record], Conversation]
  score: Callable[[Any, Record], dict[str, float]]
  evaluate: Callable[[Sequence[Any], Sequence[Record]], dict[str, float]]
  write_miniature: Callable[[str, int, int], str]
  order: Callable[[list[Record], int], list[Record]] = lambda records, seed: list(records)
  shuffle: bool = True


def guard_score(task_name: str, score: Callable[[Any, Record], dict[str, float]]):
  """Wraps a scorer so that an unexpected bug costs one zero reward, logged, not a crash.

  The scorers are tested never to raise; this is the last line of defence in a long run. The
  unguarded scorer stays reachable as `.__wrapped__`.
  """

  @functools.wraps(score)
  def guarded(completion: Any, record: Record) -> dict[str, float]:
    try:
      return score(completion, record)
    except Exception as error:  # noqa: BLE001 - a reward must never stop training
      logging.error(
        "%s scorer failed on record %s: %r; scoring it 0.",
        task_name,
        getattr(record, "id", "?"),
        error,
      )
      return {"overall": 0.0, "scoring_error": 1.0}

  return guarded


def make_options(options_class: type, task_name: str, overrides: Mapping[str, Any]) -> Any:
  """Builds `options_class(**overrides)`, naming the valid options when one is unknown."""
  valid = {field.name for field in dataclasses.fields(options_class)}
  unknown = sorted(set(overrides) - valid)
  if unknown:
    close = difflib.get_close_matches(unknown[0], sorted(valid), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(
      f"Unknown option(s) {unknown}{hint} for task {task_name!r}; valid options are "
      f"{sorted(valid)}."
    )
  return options_class(**overrides)


def load_records(
  task: Task, path: str | None, limit: int | None = None,
  split: str | Sequence[str] | None = None,
) -> tuple[list[Record], ReadStats]:
  """Reads all records of `path` with `task.read` (up to `limit`), logging a summary.

  `split` picks the split a folder of several is read by (io.TRAIN_SPLITS, io.EVAL_SPLITS; see
  io.table_files); without it such a folder is refused. Repeated record ids are kept, counted
  and warned about: ids name records in skips, metrics and saved completions.

  Raises:
    ValueError: when every row was skipped, since the path is then almost surely wrong.
  """
  from metaphorstar_jax.tasks import io  # here: io imports this module

  stats = ReadStats(source=str(path) if path is not None else f"{task.name} (generated)")
  records = []
  for record in task.read(io.table_files(path, split) if path is not None else None, stats):
    records.append(record)
    if limit is not None and len(records) >= limit:
      break
  logging.info("%s", stats.summary())
  if stats.duplicate_ids:
    logging.warning("%s: %s. Records are named by id in skips, metrics and saved completions; "
                    "give each row its own 'id'.", stats.source, stats.duplicates())
  if not records and stats.num_skipped:
    raise ValueError(f"No usable record in {stats.summary()}; check the path and the data layout.")
  return records, stats


def load_or_generate(task: Task, path: str | None, *, limit: int | None, scratch_dir: str,
                     seed: int = 0, miniature: bool = False, miniature_size: int = 16,
                     field: str = "data.train",
                     split: str | Sequence[str] | None = None) -> tuple[list[Record], str]:
  """(records, where they came from): `path` if given (a folder of several splits read by
  `split`, see `load_records`), else the task's own generated records
  (tasks such as `shapes` read path None), else, when `miniature` is asked for, a synthetic
  miniature written under `scratch_dir`, with a warning that its numbers mean nothing for the
  real benchmark. A file-backed task with neither is an error naming `field`: on a pod, training
  on a miniature by mistake wastes the whole allocation."""
  if path:
    return load_records(task, path, limit=limit, split=split)[0], str(path)
  try:
    return load_records(task, None, limit=limit)[0], "generated"
  except (TypeError, FileNotFoundError):
    pass  # a file-backed task: it needs data on disk
  if not miniature:
    raise ValueError(f"Task {task.name} reads its records from files and config.{field} is "
                     f"empty. Pass --config.{field}=/path/to/data, or "
                     f"--config.data.miniature=True to use a {limit or miniature_size}-record "
                     "synthetic miniature (for trying the code; its numbers mean nothing).")
  folder = os.path.join(scratch_dir, f"{task.name}_miniature")
  written = task.write_miniature(folder, limit or miniature_size, seed)
  logging.warning("No data path for task %s: using a synthetic miniature at %s. Its numbers say "
                  "nothing about the real benchmark.", task.name, written)
  return load_records(task, written, limit=limit)[0], f"miniature:{written}"
