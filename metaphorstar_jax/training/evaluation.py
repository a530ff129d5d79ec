"""Evaluating a policy on a task's held-out records: sampling, scoring (with the LLM judge for
open-ended tasks), repeats and their spread, and the results written as JSON and Markdown.

`run_evaluation` is what `python -m metaphorstar_jax.evaluate` runs; the trainer's periodic
evaluation (`trainer_evaluation`) calls `evaluate_records` with its own sampler and records and
the config's eval settings (evaluation_setup: sampling, repeats, judge), so both score the same
way. The results files are `evaluation_report`'s.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from metaphorstar_jax import judge as judge_lib
from metaphorstar_jax import redaction
from metaphorstar_jax import sharding as sharding_lib
from metaphorstar_jax.data.pipeline import Example, collate, screen_records
from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.sampling import Sampler
from metaphorstar_jax.tasks import Record, Task
from metaphorstar_jax.training import builders, checkpoints
from metaphorstar_jax.training.evaluation_report import markdown_report, write_results
from metaphorstar_jax.training.evaluation_setup import check_repeats, make_judge, sampling_config

# --- what to evaluate ---------------------------------------------------------------------------

def restore_policy(config, checkpoint: str, mesh, step: int | None = None):
  """(model, step): the architecture of `config.model`, with the params of a training checkpoint.

  Only `arrays["params"]` is read (not the optimizer state or reference weights), straight into
  the shardings the mesh rules give, so a 32B evaluation needs no memory for Adam's moments.
  `checkpoint` may name one step's folder, which then picks the step when `step` is None.
  """
  manager_dir, _, step = checkpoints.checkpoint_step(checkpoint, step)
  graphdef, state = nnx.split(qwen2_5_vl.abstract_model(builders.run_model_config(config)))
  shardings = nnx.to_pure_dict(sharding_lib.parameter_shardings(state, mesh))
  target = {"params": jax.tree.map(
      lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      nnx.to_pure_dict(state), shardings)}
  manager = ocp.CheckpointManager(manager_dir, item_names=("arrays", "data", "meta"),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  restored = manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True)))
  manager.close()
  nnx.replace_by_pure_dict(state, restored["arrays"]["params"])
  logging.info("Restored the params of step %d from %s.", step, manager_dir)
  return nnx.merge(graphdef, state), step


# --- generating and scoring ---------------------------------------------------------------------

class EvaluationStopped(Exception):
  """An evaluation given up between batches because its `should_stop` said so (a pre-emption)."""


def generate(examples: Sequence[Example], processor, sampler: Sampler, params=None, *,
             batch_size: int, num_samples: int = 1, key=None, progress: bool = False,
             should_stop: Callable[[], bool] | None = None) -> list[list[str]]:
  """texts[k][i]: the k-th of `num_samples` completions of examples[i] (screened records, see
  data.pipeline.screen_records).

  The K samples of a record come from one prefill whose cache they share (group_size=K).
  `should_stop`, asked before each batch (by every process: it may be a collective), ends the
  evaluation with EvaluationStopped when it returns True.
  """
  key = jax.random.key(0) if key is None else key
  texts: list[list[str]] = [[] for _ in range(num_samples)]
  starts = range(0, len(examples), batch_size)
  if progress:
    from tqdm import tqdm
    starts = tqdm(starts, desc="evaluate", dynamic_ncols=True)
  for start in starts:
    if should_stop is not None and should_stop():
      raise EvaluationStopped(f"Evaluation stopped after {start} of {len(examples)} records.")
    chunk = examples[start:start + batch_size]
    rollouts = sampler(collate(chunk, sampler.pad_id), group_size=num_samples,
                       key=jax.random.fold_in(key, start), state=params)
    for row, text in enumerate(sampler.texts(processor, rollouts.tokens_BN, rollouts.lengths_B)):
      texts[row % num_samples].append(text)
  return texts


def score_completions(task: Task, records: Sequence[Record], texts: Sequence[str],
                      judge: judge_lib.Judge | None = None) -> tuple[dict[str, float], list[dict]]:
  """(metrics, per-record details) of one completion per record.

  Metrics: the task's own (`task.evaluate`), the mean of every reward component as
  `score/<name>`, and, with a judge, `judge/*` (judge_lib.verdict_metrics).
  """
  metrics = {k: float(v) for k, v in task.evaluate(list(texts), list(records)).items()}
  scores = [task.score(text, record) for text, record in zip(texts, records, strict=True)]
  for name in sorted({k for s in scores for k in s}):
    metrics[f"score/{name}"] = float(np.mean([s.get(name, 0.0) for s in scores]))
  details = [{"id": r.id, "completion": t, "score": s}
             for r, t, s in zip(records, texts, scores, strict=True)]
  if judge is not None:
    verdicts = judge.judge_many([
        judge_lib.JudgeItem(question=r.prompt, reference=str(r.answer), answer=t, images=r.images)
        for r, t in zip(records, texts, strict=True)])
    metrics.update(judge_lib.verdict_metrics(verdicts))
    for detail, verdict in zip(details, verdicts, strict=True):
      detail["judge"] = {"score": verdict.score, "grades": list(verdict.grades),
                         "replies": list(verdict.replies)}
  return metrics, details


def mean_over_repeats(repeats: Sequence[Mapping[str, float]]) -> tuple[dict, dict]:
  """(mean, standard deviation) of each metric over repeats, in the first repeat's key order;
  NaNs (e.g. a judge score with no grade) are left out of both."""
  keys = list(dict.fromkeys(k for r in repeats for k in r))
  means, stds = {}, {}
  for k in keys:
    values = [float(r[k]) for r in repeats if k in r and not math.isnan(float(r[k]))]
    means[k] = float(np.mean(values)) if values else float("nan")
    stds[k] = float(np.std(values)) if values else float("nan")
  return means, stds


def evaluate_records(task: Task, records: Sequence[Record], processor, sampler: Sampler,
                     params=None, *, batch_size: int, max_prompt_tokens: int,
                     num_samples: int = 1, seed: int = 0, judge: judge_lib.Judge | None = None,
                     progress: bool = False,
                     should_stop: Callable[[], bool] | None = None) -> dict:
  """Generates `num_samples` completions per record and scores each repeat. Records training
  would skip (bad images, missing fields, prompts over `max_prompt_tokens`) are skipped and
  counted here too. `should_stop`: see `generate`.

  Returns:
    {"metrics": mean over repeats, "metrics_std": their spread, "repeats": per-repeat metrics,
     "completions": one dict per (repeat, record), "num_scored", "skipped": {kind: count}}.
  """
  check_repeats(num_samples, sampler.config)
  examples, skipped = screen_records(records, processor, task.build_conversation,
                                     max_prompt_tokens)
  if not examples:
    raise ValueError(f"All {len(records)} evaluation records were skipped ({dict(skipped)}); "
                     "see the warnings above for each record's reason.")
  if skipped:
    logging.warning("Evaluation skipped %d of %d records (%s); its metrics cover the other %d.",
                    sum(skipped.values()), len(records), dict(skipped), len(examples))
  records = [e.record for e in examples]
  texts = generate(examples, processor, sampler, params, batch_size=batch_size,
                   num_samples=num_samples, key=jax.random.key(seed), progress=progress,
                   should_stop=should_stop)
  repeats, completions = [], []
  for k, repeat_texts in enumerate(texts):
    metrics, details = score_completions(task, records, repeat_texts, judge)
    repeats.append(metrics)
    completions += [{"repeat": k, **d} for d in details]
  means, stds = mean_over_repeats(repeats)
  return {"metrics": means, "metrics_std": stds, "repeats": repeats, "completions": completions,
          "num_scored": len(records), "skipped": dict(skipped)}


def trainer_evaluation(config, model, mesh, task: Task, records: Sequence[Record], processor
                       ) -> Callable[[Any, Callable[[], bool]], dict[str, float]]:
  """The trainer's periodic evaluation on `records`, with the evaluation CLI's sampling settings,
  repeats and judge: `evaluate(params, should_stop)` returns the metrics (mean over repeats) of
  the policy `params`, or raises EvaluationStopped (see `generate`). Its sampler keeps no weights
  (the trainer's updates donate them), so every call passes the current ones."""
  sampler = Sampler(model, sampling_config(config), mesh=mesh, keep_weights=False)
  check_repeats(config.eval.num_samples, sampler.config)
  judge, _ = make_judge(config, task, os.path.join(config.workdir, "eval"))

  def evaluate(params, should_stop: Callable[[], bool]) -> dict[str, float]:
    return evaluate_records(task, records, processor, sampler, params,
                            batch_size=config.eval.batch_size,
                            max_prompt_tokens=config.data.max_prompt_tokens,
                            num_samples=config.eval.num_samples, seed=config.seed, judge=judge,
                            should_stop=should_stop)["metrics"]
  return evaluate


# --- one evaluation ----------------------------------------------------------------------------

def run_evaluation(config: ml_collections.ConfigDict, params=None, *,
                   sampler: Sampler | None = None, processor=None, task: Task | None = None,
                   records: Sequence[Record] | None = None, mesh=None,
                   checkpoint: str | None = None, step: int | None = None,
                   hf_path: str | None = None, output_dir: str | None = None,
                   num_samples: int | None = None, sampling: str | None = None,
                   judge: judge_lib.Judge | None = None, tag: str = "",
                   write: bool = True, progress: bool | None = None) -> dict:
  """Evaluates a policy on the config's evaluation records; returns (and writes) the results.

  Whatever is not passed is built from `config`: the command line gives only `config` and where
  the weights are (`checkpoint` + `step`, or `hf_path`; neither: a random `model.preset`); pass a
  `sampler` with its `processor` and `params` (an nnx.State for its graph) to evaluate weights in
  memory without compiling anew. The trainer's periodic evaluation is `trainer_evaluation`.

  Args:
    num_samples: completions per record (default config.eval.num_samples).
    sampling: "greedy" or "validation" when the sampler is built here (see `sampling_config`).
    judge: the OSQ judge; None builds one from config.judge / the environment when the task
      needs it.
    tag: a label stored with the results (e.g. "step 50").
    write: write results.json, results.md and completions.jsonl to `output_dir`.

  Returns:
    {"metrics": {name: mean over repeats}, "metrics_std", "repeats", "task", "num_records",
     "data", "model", "step", "sampling", "judge", "seconds", "tag", "markdown", "paths"
     (when written), "completions" (one dict per repeat and record)}.
  """
  start = time.perf_counter()
  config = ml_collections.ConfigDict(config.to_dict())  # never mutate the caller's config
  if hf_path:
    config.model.hf_path = hf_path
  if num_samples is None:
    num_samples = int(config.eval.num_samples)
  progress = config.log.progress_bar if progress is None else progress

  model_label = ("given params" if sampler is not None else
                 f"checkpoint {checkpoint}" if checkpoint else
                 f"hf {config.model.hf_path}" if config.model.hf_path else
                 f"random preset {config.model.preset}")
  run_dir = checkpoints.checkpoint_location(checkpoint)[1] if checkpoint else config.workdir
  task = task or builders.eval_task(config)

  if sampler is None:
    sampling_used = sampling_config(config, sampling)
    check_repeats(num_samples, sampling_used)  # before minutes of model loading, not after
    mesh = mesh or sharding_lib.make_mesh(**config.mesh.to_dict())
    processor = processor or builders.build_processor(config)
    if checkpoint:
      model, step = restore_policy(config, checkpoint, mesh, step)
    else:
      model = builders.build_model(config, mesh)
    builders.check_vocabulary(model, processor)
    sampler = Sampler(model, sampling_used, mesh=mesh)
    params = None
  elif processor is None:
    raise ValueError("run_evaluation got a sampler but no processor; pass the one the sampler's "
                     "prompts were built with.")

  if output_dir is None:
    label = (f"step_{step}" if checkpoint else
             "hf_" + os.path.basename(os.path.normpath(config.model.hf_path))
             if config.model.hf_path else f"random_{config.model.preset}")
    output_dir = os.path.join(run_dir, "eval", label)
  if write:
    os.makedirs(output_dir, exist_ok=True)
  if records is None:
    records, data_source = builders.eval_records(config, task, output_dir)
  else:
    data_source = "given"
  if not records:
    raise ValueError(f"No evaluation records for task {task.name!r} (data.eval="
                     f"{config.data.eval!r}); check the path or eval.num_examples.")
  judge_reason = "given"
  if judge is None:
    judge, judge_reason = make_judge(config, task, output_dir if write else None)
  judge_before = dict(judge.stats) if judge is not None else {}

  logging.info("Evaluating %s on %d %s records (%s), %d sample(s) each.", model_label,
               len(records), task.name, data_source, num_samples)
  found = evaluate_records(task, records, processor, sampler, params,
                           batch_size=int(config.eval.batch_size),
                           max_prompt_tokens=int(config.data.max_prompt_tokens),
                           num_samples=num_samples, seed=int(config.seed), judge=judge,
                           progress=progress)
  sampling_used = sampler.config
  result = {
      "tag": tag,
      "task": task.name,
      "num_records": len(records),
      "num_scored": found["num_scored"],
      "skipped": found["skipped"],
      "data": data_source,
      "model": model_label,
      "step": step,
      "sampling": {"greedy": sampling_used.greedy,
                   **({} if sampling_used.greedy else {"temperature": sampling_used.temperature,
                                                       "top_p": sampling_used.top_p,
                                                       "top_k": sampling_used.top_k}),
                   "max_new_tokens": sampling_used.max_new_tokens, "num_samples": num_samples},
      "judge": {"used": judge is not None, "detail": judge_reason,
                **({k: v - judge_before.get(k, 0) for k, v in judge.stats.items()}
                   if judge is not None else {})},
      "metrics": found["metrics"],
      "metrics_std": found["metrics_std"],
      "repeats": found["repeats"],
      "seconds": round(time.perf_counter() - start, 2),
  }
  # Results are shared; the judge's key (from the config or the environment) stays out of them.
  secrets = redaction.secret_values(config) + ([judge.config.api_key] if judge else [])
  result = redaction.redact(result, secrets)
  completions = redaction.redact(found["completions"], secrets)
  result["markdown"] = markdown_report(result)
  if write:
    result["paths"] = write_results(result, completions, output_dir)
  logging.info("Evaluation of %s on %s: %s", model_label, task.name,
               json.dumps({k: round(v, 4) for k, v in result["metrics"].items()}))
  result["completions"] = completions
  return result
