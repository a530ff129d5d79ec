"""Tasks: what to read, how to prompt, how to score and how to evaluate, per seed method.

  get_task(name, **options) -> Task   the trainer's and evaluator's entry point
  load_records(task, path) -> (records, ReadStats)   read a data set, counting skips
  write_miniature(task, out_dir, n, seed)   a synthetic copy of a task's data on disk

A trainer does: task = get_task(name, **options); records, _ = load_records(task, path);
records = task.order(records, seed) (then shuffles only if task.shuffle); prompts via
task.build_conversation(record) and ChatProcessor; rewards via task.score.

Built-in tasks: "shapes" (synthetic visual true/false, the CPU default), "tfq", "tfq_mcq",
"tfq_osq" (MetaphorStar), "reasonmap" (RewardMap), "tvr" (STAR-R1), "cinema" (CINEMA).
"""

from metaphorstar_jax.tasks.records import ReadStats, Record, Task, load_records
from metaphorstar_jax.tasks.registry import get_task, task_names, write_miniature

__all__ = [
  "ReadStats",
  "Record",
  "Task",
  "get_task",
  "load_records",
  "task_names",
  "write_miniature",
]
