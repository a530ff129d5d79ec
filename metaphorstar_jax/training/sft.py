"""One supervised step: the targets of a batch of prompts learned by cross-entropy, with gradient
accumulation. Targets come from the records (an `sft` stage reading `sft_data`, e.g. CINEMA's
cold start) or are built from `config.sft_targets` (a format-only warm start)."""

from __future__ import annotations

import os
import random
import time

import numpy as np

from metaphorstar_jax.tasks import io as task_io
from metaphorstar_jax.tasks.records import load_or_generate
from metaphorstar_jax.training.batching import micro_batches, minibatch_metrics, prompt_subsets
from metaphorstar_jax.training.learner import Learner
from metaphorstar_jax.training.state import RunState


def load_sft_records(task, path: str, scratch_dir: str, seed: int) -> list:
  """Supervised trajectories for an `sft` stage: the task's records read from `path`, each with
  the response to learn in its metadata 'target'."""
  records, _ = load_or_generate(task, path, limit=None, scratch_dir=scratch_dir, seed=seed,
                                field="stages[].sft_data", split=task_io.TRAIN_SPLITS)
  missing = [r.id for r in records if not r.metadata.get("target")]
  if missing:
    raise ValueError(f"{len(missing)} of the {len(records)} records in {path} have no 'target' "
                     f"text (first: {missing[:3]}); supervised data needs the response to learn "
                     f"for every record, and the {task.name} reader must keep it.")
  return records


def stage_records(config, stage, task, train_records) -> list:
  """What `stage` draws its prompts from: an sft stage's `sft_data` (see load_sft_records),
  else the run's training records."""
  if not reads_records(stage):
    return train_records
  return load_sft_records(task, stage.sft_data, os.path.join(config.workdir, "data"), config.seed)


def reads_records(stage) -> bool:
  """Whether an sft stage learns its records' own targets (`sft_data`) rather than warm-start
  targets built from config.sft_targets."""
  return stage.kind == "sft" and bool(stage.sft_data)


def warmup_targets(records, config, rng: random.Random,
                   from_records: bool = False) -> tuple[list[str], int]:
  """Warm-start targets and how many there are per record.

  With `from_records` (an `sft` stage reading `sft_data`) each record's own metadata 'target'
  is the one target. Otherwise:

  The <think> text is filled from each record's metadata (e.g. a `{description}` placeholder);
  the answer never comes from the record. With `sft_targets.every_answer` each record gets one
  target per answer in `sft_targets.answers`, which teaches an even answer distribution (the most
  room for GRPO to explore); otherwise one answer drawn uniformly. Either way the warm start
  teaches the response format but not the task.
  """
  if from_records:
    return [record.metadata["target"] for record in records], 1
  answers = tuple(config.sft_targets.answers)
  per_record = len(answers) if config.sft_targets.every_answer else 1
  targets = []
  for record in records:
    think = config.sft_targets.think.format(**record.metadata)
    chosen = answers if config.sft_targets.every_answer else (rng.choice(answers),)
    targets += [f"<think>{think}</think><answer>{answer}</answer>" for answer in chosen]
  return targets, per_record


def step(learner: Learner, run: RunState, batch) -> dict:
  t0 = time.perf_counter()
  config, processor, sampler, steps = (learner.config, learner.processor, learner.sampler,
                                       learner.steps)
  rng = random.Random(config.seed * 1_000_003 + run.global_step)
  targets, per_record = warmup_targets(batch.records, config, rng, reads_records(learner.stage))
  end = processor.special_tokens.im_end
  encoded = [processor.tokenizer.encode(t, add_special_tokens=False).ids + [end] for t in targets]
  width = max(map(len, encoded))
  tokens = np.full((len(encoded), width), sampler.pad_id, np.int32)
  mask = np.zeros((len(encoded), width), np.int32)
  for row, ids in enumerate(encoded):
    tokens[row, :len(ids)], mask[row, :len(ids)] = ids, 1
  parts = prompt_subsets(len(batch.records), config.train.grad_accum_steps)
  grads, collected = None, []
  for seq, _ in micro_batches(batch.examples, sampler.prepare(batch.arrays), tokens, mask, parts,
                              per_record, sampler, learner.mesh):
    g, m = steps.sft_grads(run.params, seq, float(mask.sum()))
    grads = g if grads is None else steps.accumulate(grads, g)
    collected.append(m)
  run.params, run.opt_state, apply_metrics = steps.apply(run.params, run.opt_state, grads)
  return {**minibatch_metrics(collected), **{k: float(v) for k, v in apply_metrics.items()},
          "step_seconds": time.perf_counter() - t0}
