"""Train a Qwen2.5-VL policy: optional supervised warm start, then GRPO, over a device mesh.

    python -m metaphorstar_jax.train                                   # tiny CPU default
    python -m metaphorstar_jax.train --config=configs/tfq_grpo_7b.py \
        --config.model.hf_path=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.train=/data/TFQ-Data

One GRPO step: a batch of prompts → G rollouts each from the sampler → task rewards → group
advantages → (old and reference log-probs) → μ epochs of mini-batch updates with gradient
accumulation → metrics; evaluation and checkpoints every few steps. A run may list several stages
(e.g. a supervised warm start, then GRPO); each starts from the weights the previous one left.
Interrupted runs resume from the last checkpoint in the workdir, exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags

from metaphorstar_jax import config_files, data, evaluate as evaluate_lib, rl
from metaphorstar_jax import export as export_lib
from metaphorstar_jax import redaction
from metaphorstar_jax import sharding as sharding_lib
from metaphorstar_jax.data.pipeline import PromptStream, collate
from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.sampling import Sampler, SamplingConfig
from metaphorstar_jax.tasks import get_task
from metaphorstar_jax.tasks.records import load_or_generate
from metaphorstar_jax.training import checkpoints, metrics as metrics_lib, optimizer, step as step_lib
from metaphorstar_jax.training.policy import SequenceBatch

DEFAULT_CONFIG = config_files.path(config_files.DEFAULT)  # shipped with the package
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Training config file.")


# --- set-up ------------------------------------------------------------------------------------

def build_processor(config) -> data.ChatProcessor:
  images = data.ImageProcessor(min_pixels=config.image.min_pixels,
                               max_pixels=config.image.max_pixels)
  if config.model.tokenizer == "small":
    return data.ChatProcessor.from_tokenizer(data.build_small_tokenizer(), images)
  if config.model.tokenizer == "qwen" or not config.model.hf_path:
    return data.ChatProcessor.from_tokenizer(data.load_tokenizer(), images)
  return data.ChatProcessor.from_tokenizer(data.load_tokenizer(config.model.hf_path), images)


def build_model(config, mesh) -> qwen2_5_vl.Qwen2_5_VL:
  """The policy: loaded from `model.hf_path`, or a random `model.preset`, sharded over `mesh`."""
  m = config.model
  if m.hf_path:
    return qwen2_5_vl.from_pretrained(m.hf_path, dtype=m.dtype, param_dtype=m.param_dtype,
                                      mesh=mesh, remat=m.remat)
  model_config = qwen2_5_vl.preset(m.preset, dtype=m.dtype, param_dtype=m.param_dtype,
                                   remat=m.remat)
  model = qwen2_5_vl.init(model_config, seed=config.seed)
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding_lib.parameter_shardings(state, mesh))
  return nnx.merge(graphdef, state)


def check_vocabulary(model, processor) -> None:
  vocab = processor.tokenizer.get_vocab_size(with_added_tokens=True)
  if vocab > model.config.text.vocab_size:
    raise ValueError(f"The tokenizer has {vocab} tokens but the model embeds only "
                     f"{model.config.text.vocab_size}; pick the matching tokenizer "
                     "(config.model.tokenizer).")
  ids = processor.special_tokens
  if ids.image_pad != model.config.image_token_id:
    raise ValueError(f"The tokenizer's <|image_pad|> is {ids.image_pad} but the model expects "
                     f"{model.config.image_token_id}; tokenizer and model do not belong together.")


@dataclasses.dataclass
class Objective:
  """The RL recipe of a run: loss knobs and sampling knobs, resolved from preset + overrides."""

  loss: rl.LossConfig
  rollout: rl.RolloutConfig
  group_size: int
  temperature: float
  top_p: float
  top_k: int
  max_new_tokens: int
  tree: rl.TreeRollout | None = None  # entropy-branched groups (CURE / CINEMA exploration)


def build_objective(config) -> Objective:
  recipe = rl.preset(config.rl.preset)
  loss = recipe.loss.replace(**dict(config.rl.overrides))
  pick = lambda value, default: default if value is None or value < 0 else value
  group_size = int(pick(config.rl.group_size, recipe.rollout.n))
  tree = None
  if config.rl.get("tree_rollout"):
    tree = rl.TreeRollout(**dict(config.rl.tree_rollout))
    if config.rl.group_size not in (None, -1) and group_size != tree.group_size:
      raise ValueError(f"tree_rollout makes groups of num_roots·(1 + branches) = "
                       f"{tree.group_size} rollouts, but group_size is {group_size}; make them "
                       "agree (or leave group_size at -1).")
    group_size = tree.group_size
  return Objective(
      loss=loss, rollout=recipe.rollout, group_size=group_size, tree=tree,
      temperature=float(pick(config.rl.temperature, recipe.rollout.temperature)),
      top_p=float(pick(config.rl.top_p, recipe.rollout.top_p)),
      top_k=int(config.rl.top_k),
      max_new_tokens=int(config.rl.max_new_tokens))


def stage_config(config, stage) -> ml_collections.ConfigDict:
  """The run config as `stage` sees it: its rl_preset, rl_overrides, group_size, tree_rollout,
  prompts_per_step and gen_prompts_per_step replace the run-wide values."""
  staged = ml_collections.ConfigDict(config.to_dict())
  if "rl_preset" in stage:
    staged.rl.preset = stage.rl_preset
  if "rl_overrides" in stage:
    staged.rl.overrides = {**dict(config.rl.overrides), **dict(stage.rl_overrides)}
  if "group_size" in stage:
    staged.rl.group_size = stage.group_size
  if "tree_rollout" in stage:
    staged.rl.tree_rollout = dict(stage.tree_rollout or {})
  if "prompts_per_step" in stage:
    staged.train.prompts_per_step = stage.prompts_per_step
  if "gen_prompts_per_step" in stage:
    staged.train.gen_prompts_per_step = stage.gen_prompts_per_step
  return staged


def load_sft_records(task, path: str, scratch_dir: str, seed: int) -> list:
  """Supervised trajectories for an `sft` stage: the task's records read from `path`, each with
  the response to learn in its metadata 'target' (e.g. CINEMA's cold-start data)."""
  records, _ = load_or_generate(task, path, limit=None, scratch_dir=scratch_dir, seed=seed)
  missing = [r.id for r in records if not r.metadata.get("target")]
  if missing:
    raise ValueError(f"{len(missing)} of the {len(records)} records in {path} have no 'target' "
                     f"text (first: {missing[:3]}); supervised data needs the response to learn "
                     f"for every record, and the {task.name} reader must keep it.")
  return records


def draw_size(staged, stage, objective: Objective) -> int:
  """Prompts per generation batch: DAPO's gen_prompts_per_step for a dynamic-sampling GRPO
  stage (verl `data.gen_batch_size`), else prompts_per_step."""
  train_cfg = staged.train
  size = train_cfg.get("gen_prompts_per_step", 0) or train_cfg.prompts_per_step
  if stage.kind != "grpo":
    return train_cfg.prompts_per_step
  if size != train_cfg.prompts_per_step and not objective.loss.filter_groups:
    raise ValueError(f"Stage {stage.name} sets gen_prompts_per_step={size} but "
                     f"prompts_per_step={train_cfg.prompts_per_step}; a separate generation "
                     "batch only makes sense with dynamic sampling (rl filter_groups=True).")
  return size


def load_data(config):
  """(task, training records, evaluation records); without data paths, tasks that generate their
  own records do so and file-backed ones fall back to a synthetic miniature (with a warning)."""
  d = config.data
  scratch = os.path.join(config.workdir, "data")
  task = get_task(d.task, **dict(d.task_options))
  train_records, _ = load_or_generate(task, d.train or None, limit=None, scratch_dir=scratch,
                                      seed=config.seed)
  train_records = task.order(train_records, config.seed)
  eval_task = get_task(d.task, **dict(d.eval_task_options or d.task_options))
  limit = config.eval.num_examples if config.eval.num_examples > 0 else None
  eval_records, _ = load_or_generate(eval_task, d.eval or None, limit=limit, scratch_dir=scratch,
                                     seed=config.seed + 1)
  return task, train_records, eval_records


# --- rollouts and scoring -----------------------------------------------------------------------

def completion_texts(processor, sampler: Sampler, tokens_BN, lengths_B) -> list[str]:
  tokens, lengths = sharding_lib.to_host(tokens_BN), sharding_lib.to_host(lengths_B)
  stops = set(sampler.config.stop_token_ids)
  return [processor.decode([int(t) for t in row[:n] if int(t) not in stops],
                           skip_special_tokens=True) for row, n in zip(tokens, lengths)]


def score_rollouts(task, records, texts: list[str], group_size: int):
  """Per-row total reward (B,) and each row's reward components."""
  scores = [task.score(text, records[row // group_size]) for row, text in enumerate(texts)]
  return np.asarray([s["overall"] for s in scores], np.float32), scores


def reward_components(scores: list[dict]) -> dict:
  """The mean of every reward component over rows, as `reward/<name>` metrics."""
  names = sorted({k for s in scores for k in s} - {"overall"})
  return {f"reward/{name}": float(np.mean([s.get(name, 0.0) for s in scores])) for name in names}


# --- updates ------------------------------------------------------------------------------------

def prompt_subsets(num_prompts: int, parts: int, rng: np.random.Generator | None = None):
  order = rng.permutation(num_prompts) if rng is not None else np.arange(num_prompts)
  if num_prompts % parts:
    raise ValueError(f"{num_prompts} prompts per step cannot be split into {parts} parts; make "
                     "train.prompts_per_step a multiple of num_minibatches × grad_accum_steps.")
  return np.split(order, parts)


def rows_of(prompts: np.ndarray, group_size: int) -> np.ndarray:
  return (prompts[:, None] * group_size + np.arange(group_size)[None]).reshape(-1)


def prompt_width(bucket: int, longest: int) -> int:
  """Prompt columns an update keeps of the sampler's `bucket`: the longest prompt, rounded up to
  a multiple of bucket/16 (so at most 16 widths per bucket compile)."""
  granule = max(1, bucket // 16)
  return min(bucket, -(-longest // granule) * granule)


def micro_batches(examples, prepared, rows: dict[str, np.ndarray], prompts_groups, group_size,
                  sampler: Sampler, mesh):
  """Yields (SequenceBatch, per-row arrays) for each group of prompts, placed on the mesh.

  Prompt p's ids and images always travel with rows p·G … p·G+G-1 of `rows`: the sampler's
  `prepared` arrays are reused only for all prompts in their own order; any other selection
  or order is re-collated.
  """
  for prompts in prompts_groups:
    prompts = np.asarray(prompts)
    if np.array_equal(prompts, np.arange(len(examples))):
      ids, mask, pixels, grids = prepared
    else:  # re-collate just these prompts (their images only), bucketed like the sampler's
      ids, mask, pixels, grids = sampler.prepare(
          collate([examples[p] for p in prompts], sampler.pad_id))
    # Drop the leading all-padding columns of the sampler's power-of-two bucket T, keeping a
    # multiple of T/16 so that at most 16 prompt widths per bucket compile.
    bucket = ids.shape[1]
    width = prompt_width(bucket, int(np.asarray(mask).sum(axis=1).max()))
    ids, mask = ids[:, bucket - width:], mask[:, bucket - width:]
    selected = rows_of(np.asarray(prompts), group_size)
    place = lambda a: sharding_lib.place_rows(a, mesh)
    seq = SequenceBatch(place(ids), place(mask), pixels, grids,
                        place(rows["tokens"][selected]), place(rows["mask"][selected]))
    yield seq, {k: (None if v is None else place(v[selected])) for k, v in rows.items()}


def mean_metrics(collected: list[dict]) -> dict:
  keys = {k for m in collected for k in m}
  return {k: float(np.mean([float(m[k]) for m in collected if k in m])) for k in keys}


# Micro-batch metrics already normalised by the whole mini-batch (their sum is the mini-batch's
# value) or counts; the rest are per-micro-batch means, extremes take their extreme.
SUMMED_OVER_MICRO_BATCHES = ("loss", "pg_loss", "kl_loss", "entropy_loss", "sft_loss",
                             "num_tokens")
EXTREMES_OVER_MICRO_BATCHES = {"ratio_max": max, "ratio_min": min}


def minibatch_metrics(micro: list[dict]) -> dict:
  """One mini-batch's metrics from those of its micro-batches."""
  combined = mean_metrics(micro)
  for key in combined:
    values = [float(m[key]) for m in micro if key in m]
    if key in SUMMED_OVER_MICRO_BATCHES:
      combined[key] = float(sum(values))
    elif key in EXTREMES_OVER_MICRO_BATCHES:
      combined[key] = float(EXTREMES_OVER_MICRO_BATCHES[key](values))
  return combined


@dataclasses.dataclass
class RunState:
  params: Any
  opt_state: Any
  ref_params: Any
  global_step: int
  stage_index: int
  stage_step: int
  kl_coef: float = 0.0  # the in-reward KL coefficient (moves under the adaptive controller)


@dataclasses.dataclass
class Groups:
  """P prompts with G scored rollouts each (rows p·G … p·G+G-1 belong to prompt p)."""

  records: list
  examples: list
  prepared: tuple  # the sampler's bucketed prompt arrays, in this order
  # tokens, mask, sampler_logprobs, lengths, truncated: [B, ...]; with tree rollouts also
  # prefix [B, N]: 1 on the tokens a branch row copied from its root (context, not trained on)
  rows: dict[str, np.ndarray]
  rewards: np.ndarray  # [B] the task's overall reward
  shaped: np.ndarray  # [B] after the overlong penalty
  scores: list[dict]  # [B] the task's reward components


def rollout_rows(rollouts) -> dict[str, np.ndarray]:
  host = sharding_lib.to_host
  return {"tokens": host(rollouts.tokens_BN), "mask": host(rollouts.mask_BN),
          "sampler_logprobs": host(rollouts.logprobs_BN), "lengths": host(rollouts.lengths_B),
          "truncated": host(rollouts.truncated_B)}


# (id of the tokenizer, V, min_chars) -> (that tokenizer, its table). Holding the tokenizer keeps
# its id from being reused by another one while its table is cached.
_BRANCHABLE: dict[tuple, tuple[Any, np.ndarray]] = {}


def branchable_table(processor, vocab_size: int, min_chars: int) -> np.ndarray:
  """bool [V] of tokens a tree rollout may branch at (rl.branchable_tokens), built once."""
  tokenizer = processor.tokenizer
  cache_key = (id(tokenizer), vocab_size, min_chars)
  if cache_key not in _BRANCHABLE:
    known = min(vocab_size, tokenizer.get_vocab_size(with_added_tokens=True))
    texts = tokenizer.decode_batch([[i] for i in range(known)], skip_special_tokens=False)
    texts += [""] * (vocab_size - known)  # embedding rows no token maps to
    special = [i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special]
    _BRANCHABLE[cache_key] = tokenizer, rl.branchable_tokens(texts, special, min_chars)
  return _BRANCHABLE[cache_key][1]


def tree_rows(run: RunState, tree: rl.TreeRollout, examples, prepared, processor,
              sampler: Sampler, key):
  """Rows of entropy-branched groups (rl/tree.py): num_roots rollouts per prompt, each cut
  before one of its highest-entropy tokens and continued `branches` times from there. The
  entropies are the policy's own, as CURE asks its actor; the sampler reports them as it draws
  (`return_entropy`), which saves a pass over the roots."""
  if not sampler.config.return_entropy:
    raise ValueError("Tree rollouts branch at high-entropy tokens: build the sampler with "
                     "SamplingConfig(return_entropy=True).")
  n1, n2 = tree.num_roots, tree.branches
  P, N = len(examples), sampler.config.max_new_tokens
  root_key, point_key, branch_key = jax.random.split(key, 3)
  drawn = sampler.sample_prepared(prepared, group_size=n1, state=run.params, key=root_key)
  roots, entropy = rollout_rows(drawn), sharding_lib.to_host(drawn.entropy_BN)
  table = branchable_table(processor, sampler.model_config.text.vocab_size, tree.min_token_chars)
  positions, found = rl.branch_points(point_key, entropy, roots["tokens"], roots["lengths"],
                                      table, tree.entropy_top_k)
  positions = np.asarray(positions)
  # The prompt followed by the root's text up to the branch token is the branch's prompt; its
  # M-RoPE positions continue exactly where the root's decoding had them.
  branch_prompts = [dataclasses.replace(
      examples[r // n1], input_ids_T=np.concatenate(
          [examples[r // n1].input_ids_T, roots["tokens"][r, :positions[r]]]).astype(np.int32))
      for r in range(P * n1)]
  continued = rollout_rows(sampler.sample_prepared(
      sampler.prepare(collate(branch_prompts, sampler.pad_id)), group_size=n2,
      state=run.params, key=branch_key, max_new_tokens_per_row=np.repeat(N - positions, n2)))
  join = lambda name: np.asarray(rl.join_branches(roots[name], positions, continued[name], n2))
  prefix_B = np.repeat(positions, n2)
  lengths_B = prefix_B + continued["lengths"]
  columns_N = np.arange(N)[None]
  branches = {"tokens": join("tokens"), "sampler_logprobs": join("sampler_logprobs"),
              "mask": (columns_N < lengths_B[:, None]).astype(np.int32), "lengths": lengths_B,
              "truncated": continued["truncated"],
              "prefix": (columns_N < prefix_B[:, None]).astype(np.int32)}
  roots["prefix"] = np.zeros_like(roots["mask"])
  order = rl.group_order(P, tree)
  rows = {name: np.concatenate([roots[name], branches[name]])[order] for name in roots}
  return rows, {"tree/branched_frac": float(np.mean(found)),
                "tree/prefix_mean": float(positions.mean())}


def draw_groups(run: RunState, objective: Objective, batch, task, processor, sampler: Sampler,
                key):
  """G rollouts for each prompt of `batch` (independent, or a tree when `objective.tree`),
  decoded, scored and shaped: (Groups, metrics)."""
  G = objective.group_size
  prepared = sampler.prepare(batch.arrays)
  if objective.tree is None:
    rows, metrics = rollout_rows(sampler.sample_prepared(prepared, group_size=G,
                                                         state=run.params, key=key)), {}
  else:
    rows, metrics = tree_rows(run, objective.tree, list(batch.examples), prepared, processor,
                              sampler, key)
  texts = completion_texts(processor, sampler, rows["tokens"], rows["lengths"])
  rewards, scores = score_rollouts(task, batch.records, texts, G)
  shaped = np.asarray(rl.shape_rewards(objective.loss, objective.rollout.replace(
      max_response_length=objective.max_new_tokens), jnp.asarray(rewards),
      jnp.asarray(rows["lengths"])))
  groups = Groups(list(batch.records), list(batch.examples), prepared, rows, rewards, shaped,
                  scores)
  return groups, metrics


def filter_metric(loss_cfg: rl.LossConfig, groups: Groups) -> np.ndarray:
  """The per-row value dynamic sampling tests for equality within a group (verl's names)."""
  name = loss_cfg.filter_groups_metric
  if name == "acc":
    return np.asarray([s.get("accuracy", s["overall"]) for s in groups.scores], np.float32)
  if name in ("seq_reward", "score"):
    return groups.rewards
  if name == "seq_final_reward":
    return groups.shaped
  raise ValueError(f"filter_groups_metric={name!r}: use 'acc', 'score', 'seq_reward' or "
                   "'seq_final_reward'.")


def keep_groups(parts: list[tuple[Groups, np.ndarray]], G: int, sampler: Sampler) -> Groups:
  """The kept prompts of several draws, in draw order, as one Groups."""
  picked = [(g, np.flatnonzero(keep)) for g, keep in parts]
  examples = [g.examples[p] for g, kept in picked for p in kept]
  join = lambda get: np.concatenate([get(g)[rows_of(kept, G)] for g, kept in picked])
  return Groups(
      records=[g.records[p] for g, kept in picked for p in kept], examples=examples,
      prepared=sampler.prepare(collate(examples, sampler.pad_id)),
      rows={k: join(lambda g, k=k: g.rows[k]) for k in parts[0][0].rows},
      rewards=join(lambda g: g.rewards), shaped=join(lambda g: g.shaped),
      scores=[g.scores[r] for g, kept in picked for r in rows_of(kept, G)])


def dynamic_sampling(first: Groups, draw, objective: Objective, sampler: Sampler,
                     multiple: int = 1, wanted: int | None = None):
  """DAPO's dynamic sampling: keep groups whose rewards differ, drawing more batches (`draw(i)`
  gives the i-th extra draw, or None when the data ran out) until `wanted` groups (default: as
  many as the first draw has prompts) are kept or
  `max_num_gen_batches` is reached. Returns (Groups, metrics); when the bound is reached with
  fewer groups, the update uses those, down to a multiple of `multiple` (the mini-batch and
  micro-batch split), with a warning; none at all skips the update."""
  loss_cfg, G = objective.loss, objective.group_size
  wanted = len(first.records) if wanted is None else wanted
  parts, kept, drawn, draws = [], 0, 0, 0
  groups = first
  while groups is not None:
    draws += 1
    keep_P, _ = rl.filter_groups_mask(jnp.asarray(filter_metric(loss_cfg, groups)).reshape(-1, G))
    keep_P = np.array(keep_P)  # writable: the tail may be trimmed below
    keep_P &= np.cumsum(keep_P) <= wanted - kept  # verl keeps the first train_batch_size groups
    parts.append((groups, keep_P))
    kept, drawn = kept + int(keep_P.sum()), drawn + len(keep_P)
    decision = rl.dynamic_sampling_decision(kept, wanted, draws, loss_cfg.max_num_gen_batches)
    if decision.exhausted:
      logging.warning(decision.message)
    groups = draw(draws) if decision.draw_more else None
  surplus = kept % multiple
  for _, keep_P in reversed(parts):  # drop the last kept groups that do not split evenly
    for p in np.flatnonzero(keep_P)[::-1]:
      if surplus:
        keep_P[p], surplus, kept = False, surplus - 1, kept - 1
  metrics = {"dynamic_sampling/gen_batches": draws, "dynamic_sampling/kept_groups": kept,
             "dynamic_sampling/kept_frac": kept / max(drawn, 1)}
  if len(parts) == 1 and parts[0][1].all():
    return first, metrics
  return (keep_groups(parts, G, sampler) if kept else None), metrics


def grpo_step(run: RunState, steps: step_lib.TrainSteps, objective: Objective, batch, task,
              processor, sampler: Sampler, config, mesh, rng_seed: int, next_batch=None) -> dict:
  """One GRPO step on `batch`; with DAPO's `filter_groups`, `next_batch()` draws more prompts."""
  loss_cfg, G = objective.loss, objective.group_size
  t0 = time.perf_counter()
  key = jax.random.fold_in(jax.random.key(rng_seed), run.global_step)
  micro_parts = config.train.num_minibatches * config.train.grad_accum_steps
  groups, sampling_metrics = draw_groups(run, objective, batch, task, processor, sampler, key)
  if loss_cfg.filter_groups:
    def draw(index):
      more = next_batch() if next_batch is not None else None
      return None if more is None else draw_groups(run, objective, more, task, processor,
                                                   sampler, jax.random.fold_in(key, index))[0]
    groups, filter_metrics = dynamic_sampling(groups, draw, objective, sampler,
                                              multiple=micro_parts,
                                              wanted=config.train.prompts_per_step)
    sampling_metrics.update(filter_metrics)
    if groups is None:
      # Not `skipped_updates`: that one counts non-finite updates since the stage began.
      return {**sampling_metrics, "dynamic_sampling/skipped_update": 1.0,
              "sample_seconds": time.perf_counter() - t0,
              "step_seconds": time.perf_counter() - t0}
  t_sample = time.perf_counter() - t0
  rewards, shaped, prepared = groups.rewards, groups.shaped, groups.prepared
  reward_metrics = reward_components(groups.scores)
  lengths, truncated = groups.rows["lengths"], groups.rows["truncated"]
  P = len(groups.records)
  generated = groups.rows["mask"]
  if "prefix" in groups.rows:  # a branch learns its continuation; its root's prefix is context
    generated = generated * (1 - groups.rows["prefix"])
  mask = np.asarray(rl.loss_mask(loss_cfg, generated, truncated))
  rows = {"tokens": groups.rows["tokens"], "mask": groups.rows["mask"],
          "loss_mask": mask, "advantages": None,
          "sampler_logprobs": groups.rows["sampler_logprobs"], "old": None, "ref": None}
  examples = groups.examples
  all_prompts = prompt_subsets(P, micro_parts)
  on_policy = config.train.ppo_epochs == 1 and config.train.num_minibatches == 1
  needs_ref = loss_cfg.use_kl_loss or loss_cfg.use_kl_in_reward
  if not on_policy or needs_ref:
    old, ref = [], []
    for seq, _ in micro_batches(examples, prepared, rows, all_prompts, G, sampler, mesh):
      if not on_policy:
        old.append(sharding_lib.to_host(steps.logprobs(run.params, seq)))
      if needs_ref:
        ref.append(sharding_lib.to_host(steps.logprobs(run.ref_params, seq)))
    order = rows_of(np.concatenate(all_prompts), G)
    for name, parts in (("old", old), ("ref", ref)):
      if parts:
        values = np.empty_like(rows["sampler_logprobs"])
        values[order] = np.concatenate(parts)
        rows[name] = values
  kl_metrics = {}
  if loss_cfg.use_kl_in_reward:
    # verl's order: the sampling policy's log-probs against the reference's, per token, summed
    # into each row's reward before the advantages; the controller then moves the coefficient.
    behaviour = rows["old"] if rows["old"] is not None else rows["sampler_logprobs"]
    shaped, kl_B = rl.kl_in_reward(loss_cfg, run.kl_coef, shaped, behaviour, rows["ref"],
                                   generated)
    shaped, current_kl = np.asarray(shaped), float(np.mean(kl_B))
    kl_metrics = {"kl_in_reward/coef": run.kl_coef, "kl_in_reward/kl": current_kl,
                  "reward/penalised_mean": float(shaped.mean())}
    run.kl_coef = float(rl.next_kl_coef(loss_cfg, run.kl_coef, current_kl, len(shaped)))
  advantages = np.asarray(rl.compute_advantages(loss_cfg, jnp.asarray(shaped).reshape(P, G)))
  rows["advantages"] = advantages = advantages.reshape(-1)

  update_metrics, apply_metrics = [], {}
  shuffle_rng = np.random.default_rng(rng_seed + run.global_step)
  for _ in range(config.train.ppo_epochs):
    for minibatch in prompt_subsets(P, config.train.num_minibatches, shuffle_rng):
      # The sum over a mini-batch does not depend on its order; sorted, a single mini-batch
      # reuses the sampler's prepared prompts instead of collating them again.
      minibatch = np.sort(minibatch)
      micro = np.split(minibatch, config.train.grad_accum_steps)
      selected = rows_of(minibatch, G)
      token_count = float(max(1.0, rows["loss_mask"][selected].sum()))
      seq_count = float(len(selected))
      grads, micro_metrics = None, []
      for seq, row_arrays in micro_batches(examples, prepared, rows, micro, G, sampler, mesh):
        g, m = steps.grpo_grads(run.params, seq, row_arrays["advantages"], row_arrays["old"],
                                row_arrays["ref"], row_arrays["sampler_logprobs"],
                                row_arrays["loss_mask"], token_count, seq_count)
        grads = g if grads is None else steps.accumulate(grads, g)
        micro_metrics.append(m)
      update_metrics.append(minibatch_metrics(micro_metrics))
      run.params, run.opt_state, apply_metrics = steps.apply(run.params, run.opt_state, grads)
  t_total = time.perf_counter() - t0
  new_tokens = int(generated.sum())
  if objective.tree is not None:  # how the branches fared against the roots they came from
    is_root_G = np.arange(G) < objective.tree.num_roots
    by_group = rewards.reshape(P, G)
    sampling_metrics["tree/root_reward_mean"] = float(by_group[:, is_root_G].mean())
    sampling_metrics["tree/branch_reward_mean"] = float(by_group[:, ~is_root_G].mean())
  return {
      "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
      # What the advantages saw: the task reward after the overlong penalty (and in-reward KL,
      # reported as reward/penalised_mean).
      "reward/shaped_mean": float(groups.shaped.mean()),
      "reward/overlong_penalty_mean": float((groups.rewards - groups.shaped).mean()),
      **reward_metrics, **kl_metrics, **sampling_metrics,
      "accuracy": reward_metrics.get("reward/accuracy", float("nan")),
      "response_length/mean": float(lengths.mean()), "response_length/max": int(lengths.max()),
      "response_length/truncated_frac": float(truncated.mean()),
      "advantages/abs_mean": float(np.abs(advantages).mean()),
      **{k: v for k, v in mean_metrics(update_metrics).items()},
      **{k: float(v) for k, v in apply_metrics.items()},
      "rollout_tokens_per_s": new_tokens / max(t_sample, 1e-9),
      "sample_seconds": t_sample, "step_seconds": t_total,
  }


def warmup_targets(records, config, rng: random.Random,
                   from_records: bool = False) -> tuple[list[str], int]:
  """Warm-start targets and how many there are per record.

  With `from_records` (an `sft` stage reading `sft_data`) each record's own metadata 'target'
  is the one target. Otherwise:

  The <think> text is filled from each record's metadata (e.g. a `{description}` placeholder);
  the answer never comes from the record. With `warmup.every_answer` each record gets one target
  per answer in `warmup.answers`, which teaches an even answer distribution (the most room for
  GRPO to explore); otherwise one answer drawn uniformly. Either way the warm start teaches the
  response format but not the task.
  """
  if from_records:
    return [record.metadata["target"] for record in records], 1
  answers = tuple(config.warmup.answers)
  per_record = len(answers) if config.warmup.every_answer else 1
  targets = []
  for record in records:
    think = config.warmup.think.format(**record.metadata)
    chosen = answers if config.warmup.every_answer else (rng.choice(answers),)
    targets += [f"<think>{think}</think><answer>{answer}</answer>" for answer in chosen]
  return targets, per_record


def sft_step(run: RunState, steps: step_lib.TrainSteps, batch, processor, sampler: Sampler,
             config, mesh, rng_seed: int, from_records: bool = False) -> dict:
  t0 = time.perf_counter()
  rng = random.Random(rng_seed * 1_000_003 + run.global_step)
  targets, per_record = warmup_targets(batch.records, config, rng, from_records)
  end = processor.special_tokens.im_end
  encoded = [processor.tokenizer.encode(t, add_special_tokens=False).ids + [end] for t in targets]
  width = max(map(len, encoded))
  tokens = np.full((len(encoded), width), sampler.pad_id, np.int32)
  mask = np.zeros((len(encoded), width), np.int32)
  for row, ids in enumerate(encoded):
    tokens[row, :len(ids)], mask[row, :len(ids)] = ids, 1
  prepared = sampler.prepare(batch.arrays)
  rows = {"tokens": tokens, "mask": mask}
  parts = prompt_subsets(len(batch.records), config.train.grad_accum_steps)
  grads, collected = None, []
  for seq, _ in micro_batches(batch.examples, prepared, rows, parts, per_record, sampler, mesh):
    g, m = steps.sft_grads(run.params, seq, float(mask.sum()))
    grads = g if grads is None else steps.accumulate(grads, g)
    collected.append(m)
  run.params, run.opt_state, apply_metrics = steps.apply(run.params, run.opt_state, grads)
  out = minibatch_metrics(collected)
  return {**out, **{k: float(v) for k, v in apply_metrics.items()},
          "step_seconds": time.perf_counter() - t0}


# --- the run ------------------------------------------------------------------------------------

def frozen_patterns(config) -> tuple[str, ...]:
  """Regexes of the parameter paths no update may change."""
  return (r"^visual/",) if config.model.freeze_vision else ()


def stage_optimizer(config, stage, params):
  optim = ml_collections.ConfigDict(config.optim.to_dict())
  optim.learning_rate = stage.learning_rate
  optim.warmup_steps = stage.get("warmup_steps", 0)
  optim.total_steps = stage.steps
  optim.frozen = frozen_patterns(config)
  return optimizer.make_optimizer(optim, params)


def checkpoint_arrays(run: RunState) -> dict:
  arrays = {"params": nnx.to_pure_dict(run.params), "opt_state": run.opt_state}
  if run.ref_params is not None:
    arrays["ref_params"] = nnx.to_pure_dict(run.ref_params)
  return arrays


def restore_into(run: RunState, restored: dict) -> None:
  nnx.replace_by_pure_dict(run.params, restored["params"])
  run.opt_state = restored["opt_state"]
  if "ref_params" in restored:
    nnx.replace_by_pure_dict(run.ref_params, restored["ref_params"])


# What a run writes into its workdir that a fresh run in that folder must not mix with.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "curves.png")


def prepare_fresh_workdir(config) -> None:
  """For a fresh run (checkpoint.resume=False): refuses a workdir holding another run's
  checkpoints, unless checkpoint.overwrite clears that run's outputs first. Orbax would otherwise
  decline every save at or below the old run's latest step, and a crash would resume the old
  run's weights."""
  if config.checkpoint.resume:
    return
  workdir = config.workdir
  found = checkpoints.saved_steps(os.path.join(workdir, "checkpoints"))
  if not found:
    return
  if not config.checkpoint.overwrite:
    raise ValueError(
        f"{workdir} holds checkpoints of another run (steps {found}), and checkpoint.resume is "
        "False. Use another workdir, resume this run (--config.checkpoint.resume=True), or "
        "delete its outputs with --config.checkpoint.overwrite=True.")
  if jax.process_index() == 0:
    logging.warning("checkpoint.overwrite: deleting %s of the earlier run in %s.",
                    ", ".join(RUN_OUTPUTS), workdir)
    for name in RUN_OUTPUTS:
      path = os.path.join(workdir, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
  if jax.process_count() > 1:  # no host may start writing before the old outputs are gone
    multihost_utils.sync_global_devices("metaphorstar_jax: fresh workdir")


def train(config: ml_collections.ConfigDict) -> dict:
  """Runs every stage of `config`; returns the final metrics and evaluation results."""
  workdir = config.workdir
  os.makedirs(workdir, exist_ok=True)
  prepare_fresh_workdir(config)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(redaction.redact(config).to_json_best_effort(indent=2))  # no keys on disk
  mesh = sharding_lib.make_mesh(**config.mesh.to_dict())
  if config.plan.check_fit:  # compile every program before any weight is read; refuse a misfit
    from metaphorstar_jax import plan  # here, not at the top: plan imports train
    plan.check_fit(config, mesh)
  processor = build_processor(config)
  model = build_model(config, mesh)
  check_vocabulary(model, processor)
  objective = build_objective(config)
  task, train_records, eval_records = load_data(config)
  logging.info("Task %s: %d training and %d evaluation records.", task.name, len(train_records),
               len(eval_records))
  graphdef, params = nnx.split(model)
  # Periodic evaluation is the evaluation CLI's: its sampling settings, repeats and scoring.
  eval_sampler = Sampler(model, evaluate_lib.sampling_config(config), mesh=mesh)
  evaluate_lib.check_repeats(config.eval.num_samples, eval_sampler.config)
  eval_judge, _ = evaluate_lib.make_judge(config, task, os.path.join(workdir, "eval"))
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  max_to_keep=config.checkpoint.keep,
                                  async_save=config.checkpoint.async_save)
  total_steps = sum(s.steps for s in config.stages)
  writer = metrics_lib.MetricsWriter(workdir, total_steps=total_steps,
                                     use_tensorboard=config.log.tensorboard,
                                     wandb_project=config.log.wandb_project or None,
                                     config=config.to_dict(), progress_bar=config.log.progress_bar)
  run = RunState(params=params, opt_state=None, ref_params=None, global_step=0, stage_index=0,
                 stage_step=0)
  resume_step = ckpt.latest_step() if config.checkpoint.resume else None
  resume_meta = ckpt.restore_meta(resume_step) if resume_step is not None else None
  results: dict[str, Any] = {"evaluations": [], "exports": []}

  def run_eval(tag: str) -> dict:
    found = evaluate_lib.evaluate_records(
        task, eval_records, processor, eval_sampler, run.params,
        batch_size=config.eval.batch_size, num_samples=config.eval.num_samples,
        seed=config.seed, judge=eval_judge)["metrics"]
    logging.info("Evaluation (%s, step %d): %s", tag, run.global_step,
                 json.dumps({k: round(v, 4) for k, v in found.items()}))
    writer.write(run.global_step, {f"eval/{k}": v for k, v in found.items()})
    results["evaluations"].append({"tag": tag, "step": run.global_step, **found})
    return found

  def export_now() -> None:  # config.export: an HF checkpoint at workdir/hf/step_N
    out = export_lib.step_dir(workdir, run.global_step)
    if out not in results["exports"]:  # at_end right after `every` wrote this step
      export_lib.export_params(run.params, model.config, out, config, processor,
                               dtype=config.export.dtype or None, replace=True)
      results["exports"].append(out)

  first_stage = resume_meta["stage_index"] if resume_meta else 0
  run.global_step = sum(s.steps for s in config.stages[:first_stage])
  for stage_index in range(first_stage, len(config.stages)):
    stage = config.stages[stage_index]
    staged = stage_config(config, stage)
    objective = build_objective(staged)
    sampler = Sampler(model, SamplingConfig(
        max_new_tokens=objective.max_new_tokens, temperature=objective.temperature,
        top_p=objective.top_p, top_k=objective.top_k,
        return_entropy=objective.tree is not None), mesh=mesh)
    run.stage_index, run.stage_step = stage_index, 0
    tx = stage_optimizer(config, stage, run.params)
    steps = step_lib.TrainSteps(graphdef, tx, objective.loss, temperature=objective.temperature,
                                logit_chunk=config.train.logit_chunk,
                                frozen=frozen_patterns(config))
    run.opt_state = step_lib.init_optimizer_state(tx, run.params)
    if stage.kind == "grpo" and (objective.loss.use_kl_loss or objective.loss.use_kl_in_reward):
      # A frozen copy of the stage's start, placed exactly like the policy so that the log-prob
      # function compiles once for both.
      run.ref_params = jax.tree.map(lambda a: jax.device_put(jnp.copy(a), a.sharding), run.params)
    else:
      run.ref_params = None
    run.kl_coef = float(objective.loss.kl_coef)
    sft_data = stage.kind == "sft" and bool(stage.get("sft_data"))
    stage_records = (load_sft_records(task, stage.sft_data, os.path.join(workdir, "data"),
                                      config.seed) if sft_data else train_records)
    stream = PromptStream(stage_records, processor, task.build_conversation,
                          batch_size=draw_size(staged, stage, objective),
                          seed=config.seed + stage_index, shuffle=task.shuffle,
                          max_prompt_tokens=config.data.max_prompt_tokens,
                          num_workers=config.data.num_workers)
    if resume_meta and resume_meta["stage_index"] == stage_index:
      restored, data_state, _ = ckpt.restore(resume_step, checkpoint_arrays(run))
      restore_into(run, restored)
      stream.set_state(data_state)
      run.stage_step = resume_meta["stage_step"]
      run.global_step = resume_meta["global_step"]
      run.kl_coef = float(resume_meta.get("kl_coef", run.kl_coef))
      logging.info("Resumed stage %s at its step %d (global %d).", stage.name, run.stage_step,
                   run.global_step)
      resume_meta = None
    elif stage.kind == "grpo":
      previous = f"after {config.stages[stage_index - 1].name}" if stage_index else None
      results[f"before {stage.name}"] = (results[previous] if previous in results
                                         else run_eval(f"before {stage.name}"))

    while run.stage_step < stage.steps:
      batch = stream.next_batch()
      if stage.kind == "sft":
        step_metrics = sft_step(run, steps, batch, processor, sampler, staged, mesh, config.seed,
                                from_records=sft_data)
      elif stage.kind == "grpo":
        step_metrics = grpo_step(run, steps, objective, batch, task, processor, sampler, staged,
                                 mesh, config.seed, next_batch=stream.next_batch)
      else:
        raise ValueError(f"Unknown stage kind {stage.kind!r}; use 'sft' or 'grpo'.")
      run.stage_step += 1
      run.global_step += 1
      step_metrics["data/skipped"] = sum(stream.skipped.values())
      step_metrics["stage"] = stage_index
      if run.global_step % max(1, config.log.every) == 0:
        results["last"] = writer.write(run.global_step, step_metrics)
      if config.eval.every and run.stage_step % config.eval.every == 0 \
          and run.stage_step < stage.steps:
        run_eval(f"{stage.name} step {run.stage_step}")
      if config.checkpoint.every and (run.stage_step % config.checkpoint.every == 0
                                      or run.stage_step == stage.steps):
        ckpt.save(run.global_step, checkpoint_arrays(run), stream.get_state(),
                  {"stage_index": stage_index, "stage_step": run.stage_step,
                   "global_step": run.global_step, "stage": stage.name,
                   "kl_coef": run.kl_coef})
        if run.global_step == config.debug.kill_after_checkpoint:
          ckpt.wait()
          os.kill(os.getpid(), signal.SIGKILL)  # simulate a pre-emption
      if config.export.every and (run.stage_step % config.export.every == 0
                                  or run.stage_step == stage.steps):
        export_now()
    if run.stage_step == stage.steps and stage_index + 1 < len(config.stages) and \
        config.checkpoint.every:
      ckpt.wait()
    results[f"after {stage.name}"] = run_eval(f"after {stage.name}")
  if config.export.at_end:
    export_now()
  ckpt.close()
  writer.close()
  if config.log.plot:
    history = metrics_lib.read_history(writer.history_path)
    results["plot"] = metrics_lib.plot_history(history, os.path.join(workdir, "curves.png"))
  results["final_params"] = run.params
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  sharding_lib.initialize_distributed(**config.distributed.to_dict())
  start = time.perf_counter()
  results = train(config)
  summary = {k: v for k, v in results.items() if k not in ("final_params", "evaluations")}
  summary["wall_seconds"] = round(time.perf_counter() - start, 1)
  print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
  app.run(main)
