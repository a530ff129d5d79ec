"""What a run is built from: the tokenizer and image processor, the sharded policy, the task and
its records, and each stage's optimizer. Used by train, evaluate, export and plan alike."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from metaphorstar_jax import data
from metaphorstar_jax import sharding as sharding_lib
from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.models.qwen2_5_vl import splash_attention
from metaphorstar_jax.tasks import Record, Task, get_task
from metaphorstar_jax.tasks import io as task_io
from metaphorstar_jax.tasks.records import load_or_generate
from metaphorstar_jax.training import optimizer


def build_processor(config) -> data.ChatProcessor:
  images = data.ImageProcessor(min_pixels=config.image.min_pixels,
                               max_pixels=config.image.max_pixels)
  if config.model.tokenizer == "small":
    return data.ChatProcessor.from_tokenizer(data.build_small_tokenizer(), images)
  if config.model.tokenizer == "qwen" or not config.model.hf_path:
    return data.ChatProcessor.from_tokenizer(data.load_tokenizer(), images)
  return data.ChatProcessor.from_tokenizer(data.load_tokenizer(config.model.hf_path), images)


def model_runtime(config) -> dict:
  """The model's run-time fields (not architecture) from `config.model`."""
  m = config.model
  return dict(dtype=jnp.dtype(m.dtype).name, param_dtype=jnp.dtype(m.param_dtype).name,
              remat=bool(m.remat), remat_offload=bool(m.remat_offload))


def build_model(config, mesh) -> qwen2_5_vl.Qwen2_5_VL:
  """The policy: loaded from `model.hf_path`, or a random `model.preset`, sharded over `mesh`."""
  m = config.model
  logging.info(splash_attention.describe(mesh.devices.flat[0].platform))
  if m.hf_path:
    return qwen2_5_vl.from_pretrained(m.hf_path, mesh=mesh, **model_runtime(config))
  model_config = qwen2_5_vl.preset(m.preset, **model_runtime(config))
  model = qwen2_5_vl.init(model_config, seed=config.seed)
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding_lib.parameter_shardings(state, mesh))
  return nnx.merge(graphdef, state)


def run_model_config(config) -> qwen2_5_vl.Qwen2_5_VLConfig:
  """The architecture a run trained: `model.hf_path`'s config.json, else `model.preset`."""
  m = config.model
  runtime = dict(model_runtime(config), remat=False, remat_offload=False)
  if not m.hf_path:
    return qwen2_5_vl.preset(m.preset, **runtime)
  if not os.path.exists(os.path.join(m.hf_path, "config.json")):
    raise FileNotFoundError(f"The run started from model.hf_path={m.hf_path!r}, which has no "
                            "config.json on this machine; its config and tokenizer files are "
                            "part of the export. Make that checkpoint folder available here.")
  return qwen2_5_vl.from_json_file(m.hf_path, **runtime)


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


def eval_task(config) -> Task:
  """The task evaluation scores with: data.task under eval_task_options (else task_options)."""
  d = config.data
  return get_task(d.task, **dict(d.eval_task_options or d.task_options))


def eval_records(config, task: Task, scratch_dir: str) -> tuple[list[Record], str]:
  """(records, where they came from): data.eval, else the task's generated records (drawn from
  the evaluation task's options), else the miniature data.miniature asks for (written with
  another seed than training's); at most eval.num_examples (<= 0: all)."""
  limit = int(config.eval.num_examples) if int(config.eval.num_examples) > 0 else None
  return load_or_generate(task, config.data.eval or None, limit=limit, scratch_dir=scratch_dir,
                          seed=config.seed + 1, miniature=config.data.miniature,
                          field="data.eval", split=task_io.EVAL_SPLITS)


def load_data(config):
  """(task, training records, evaluation records); without data paths, tasks that generate their
  own records do so, and file-backed ones need `data.miniature` for a synthetic miniature."""
  d = config.data
  scratch = os.path.join(config.workdir, "data")
  task = get_task(d.task, **dict(d.task_options))
  train_records, train_source = load_or_generate(
      task, d.train or None, limit=None, scratch_dir=scratch, seed=config.seed,
      miniature=d.miniature, split=task_io.TRAIN_SPLITS)
  train_records = task.order(train_records, config.seed)
  held_out, eval_source = eval_records(config, eval_task(config), scratch)
  shared = {r.id for r in held_out} & {r.id for r in train_records}
  if shared and train_source == eval_source == "generated":  # from the same task options
    raise ValueError(f"{len(shared)} of the {len(held_out)} evaluation records are training "
                     f"records (e.g. {sorted(shared)[0]!r}): task {task.name} generates both from "
                     "the same options. Give evaluation its own, e.g. "
                     "--config.data.eval_task_options.seed=1, or pass --config.data.eval.")
  logging.info("Task %s: %d training and %d evaluation records.", task.name, len(train_records),
               len(held_out))
  return task, train_records, held_out


def frozen_patterns(config) -> tuple[str, ...]:
  """Regexes of the parameter paths no update may change."""
  return (r"^visual/",) if config.model.freeze_vision else ()


def stage_optimizer(config, stage, params):
  optim = ml_collections.ConfigDict(config.optim.to_dict())
  optim.learning_rate = stage.learning_rate
  optim.warmup_steps = stage.warmup_steps
  optim.total_steps = stage.steps
  optim.frozen = frozen_patterns(config)
  return optimizer.make_optimizer(optim, params)
