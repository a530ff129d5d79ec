"""Defaults every training config starts from, and small helpers the configs share (configs/*.py)."""

import difflib

import ml_collections
from absl import logging
from ml_collections import config_dict


def unset(field_type: type):
  """A field left unset (None) that still parses as `field_type` from the command line
  (`--config.rl.group_size=8`); see base_config for what an unset field means."""
  return config_dict.placeholder(field_type)


# A stage's fields: (the default, what it does); a type as the default means unset (None) of that
# type. name, kind, steps and learning_rate are stage()'s required arguments. Every field after
# warmup_steps replaces a run-wide value for this stage only, and its default (unset, or {} for a
# dict) keeps that value. The exception is sft_data, which has no run-wide value: unset, the
# stage needs one (the run refuses to start without it).
STAGE_FIELDS = {
    "name": ("", "names the stage in logs, metrics and checkpoints"),
    "kind": ("", "'sft' (supervised) or 'grpo'; each stage starts from the previous one's weights"),
    "steps": (0, "optimizer steps of this stage"),
    "learning_rate": (0.0, "the peak learning rate (optim.schedule after the warmup)"),
    "warmup_steps": (0, "steps of linear learning-rate warmup from 0"),
    "rl_preset": (str, "replaces rl.preset"),
    "rl_overrides": ({}, "LossConfig fields merged over rl.overrides"),
    "group_size": (int, "replaces rl.group_size (for tree rollouts, the final group size)"),
    "tree_rollout": ({}, "entropy-branched groups for this stage (rl.TreeRollout fields: "
                     "num_roots, branches, entropy_top_k, min_token_chars), replacing "
                     "rl.tree_rollout; {}: rl.tree_rollout's"),
    "prompts_per_step": (int, "replaces train.prompts_per_step"),
    "gen_prompts_per_step": (int, "replaces train.gen_prompts_per_step: prompts drawn per "
                             "generation batch when dynamic sampling (filter_groups) keeps only "
                             "groups with mixed rewards, until prompts_per_step are kept"),
    "sft_data": ("", "an sft stage's supervised trajectories (the task's records plus a 'target' "
                 "text, e.g. JSONL); '': the format-only warm-start targets of "
                 "config.sft_targets; unset (None): required, the run refuses to start without "
                 "it"),
}


def closest_name(name: str, known) -> str | None:
  """The known name closest to `name`, or None when none is close."""
  close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.5)
  return close[0] if close else None


def closest_name_hint(name: str, known) -> str:
  """' (did you mean "group_size"?)' for the known name closest to `name`, or ''."""
  close = closest_name(name, known)
  return f" (did you mean {close!r}?)" if close else ""


def stage(name: str, *, kind: str, steps: int, learning_rate: float,
          **fields) -> ml_collections.ConfigDict:
  """One stage of a run, locked, with every field of STAGE_FIELDS (`fields` set some of them).

  A field not in STAGE_FIELDS is a ValueError naming the closest one."""
  for key in fields:
    if key not in STAGE_FIELDS:
      raise ValueError(f"A stage has no field {key!r}{closest_name_hint(key, STAGE_FIELDS)}; its "
                       f"fields are {', '.join(STAGE_FIELDS)} (config_defaults.STAGE_FIELDS).")
  values = {key: unset(default) if isinstance(default, type) else default
            for key, (default, _) in STAGE_FIELDS.items()}
  values.update(name=name, kind=kind, steps=steps, learning_rate=learning_rate)
  config = ml_collections.ConfigDict(values)
  for key, value in fields.items():  # through the ConfigDict, so placeholders keep their type
    config[key] = value
  config.lock()
  return config


def base_config() -> ml_collections.ConfigDict:
  """Every field a run config has, with its default, locked: a config file or a command-line
  override can change a field but not add one (a typo is an error naming the closest field).

  One convention for "not set here": None (a field made by `unset(type)`, which still parses as
  its type on the command line). An unset field takes the value its comment names: the RL
  preset's (rl.group_size, rl.temperature, rl.top_p), the evaluation preset's (eval.temperature,
  eval.top_p), another field's (eval.max_new_tokens, train.gen_prompts_per_step,
  plan.image_pixels, a stage's overrides of run-wide fields), or the newest saved step
  (checkpoint.step). Dict-valued fields (rl.overrides, rl.tree_rollout,
  data.task_options, data.eval_task_options) are {} when they add nothing; their keys are checked
  against their own schemas (check_dict_keys).
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.workdir = "runs/default"

  config.model = ml_collections.ConfigDict(dict(
      hf_path="",  # a local HF checkpoint directory; empty: a random `preset` model
      preset="tiny",
      tokenizer="",  # '', 'qwen' (offline Qwen2.5) or 'small'; '' means the checkpoint's own
      dtype="float32",  # compute dtype
      param_dtype="float32",  # master weights and optimizer state
      remat=False,
      # With remat, each layer's saved input waits in host memory for the backward pass.
      remat_offload=False,
      freeze_vision=False,
  ))
  config.image = ml_collections.ConfigDict(dict(min_pixels=3136, max_pixels=12845056))
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  # Multi-host runs: `auto` lets JAX find the cluster (Cloud TPU pod slices, SLURM); or name the
  # coordinator ("host:port"), the number of processes and this one's id. Default: one process.
  config.distributed = ml_collections.ConfigDict(dict(
      auto=False, coordinator_address="", num_processes=1, process_id=0))

  config.data = ml_collections.ConfigDict(dict(
      task="shapes",
      task_options={},
      eval_task_options={},
      train="",  # path of the training data; empty: the task generates or needs none
      eval="",
      max_prompt_tokens=4096,
      num_workers=0,  # grain worker processes for image decoding
      # File-backed tasks without data paths: True trains and evaluates on a small synthetic
      # miniature (for trying the code); False refuses to start.
      miniature=False,
  ))

  config.rl = ml_collections.ConfigDict(dict(
      preset="metaphorstar",  # rl.preset(): grpo, dr_grpo, dapo, gspo, metaphorstar
      overrides={},  # LossConfig fields, e.g. {"clip_ratio_high": 0.28}
      group_size=unset(int),  # unset: the preset's rollout.n
      temperature=unset(float),  # unset: the preset's
      top_p=unset(float),  # unset: the preset's
      top_k=0,  # 0: no top-k truncation
      max_new_tokens=256,
      # Entropy-branched groups (rl.TreeRollout fields: num_roots, branches, entropy_top_k,
      # min_token_chars); empty: G independent rollouts per prompt.
      tree_rollout={},
  ))
  config.train = ml_collections.ConfigDict(dict(
      prompts_per_step=8,
      # DAPO dynamic sampling's generation batch; unset: prompts_per_step.
      gen_prompts_per_step=unset(int),
      ppo_epochs=1,  # μ: passes over each step's rollouts
      num_minibatches=1,  # optimizer updates per pass
      grad_accum_steps=1,  # micro-batches per update
      # Form LM-head logits this many completion tokens at a time (0: all at once), each chunk
      # recomputed in the backward pass: (rows × 2048 × 152k) fp32 logits never exist at once.
      logit_chunk=128,
      # Encode and prefill the generation batch this many prompts at a time (0: all at once);
      # decoding still runs every rollout together. Must divide the generation batch.
      prefill_chunk=0,
  ))
  config.optim = ml_collections.ConfigDict(dict(
      schedule="constant", final_lr_fraction=0.0, b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.01, grad_clip_norm=1.0, max_consecutive_nonfinite=10))
  # The targets an sft stage without sft_data learns (a format-only warm start).
  config.sft_targets = ml_collections.ConfigDict(dict(
      think="Let me look at the image carefully.",  # the <think> text of each target
      answers=("T", "F"),  # never the record's own: the warm start teaches format, not the task
      every_answer=True,  # one target per answer (an even split); False: one drawn at random
  ))
  config.stages = [stage("grpo", kind="grpo", steps=100, learning_rate=1e-6)]

  # Evaluation, periodic and by the evaluate CLI alike (training/evaluation_setup.py): greedy,
  # or sampled at `temperature` / `top_p` (unset: the RL preset's validation values);
  # `max_new_tokens` (unset: rl.max_new_tokens); `num_samples` completions per record, metrics
  # averaged over them.
  config.eval = ml_collections.ConfigDict(dict(
      every=0, num_examples=64, batch_size=32, greedy=True, temperature=unset(float),
      top_p=unset(float), max_new_tokens=unset(int), num_samples=1))
  # resume: continue from the workdir's newest checkpoint that restores (older ones when it is
  # damaged), or from `step` (unset: the newest). A resumed run keeps the config fields that give
  # its steps their meaning (training/workdir.py RESUME_FIELDS) unless `allow_config_change`.
  # A fresh run (resume=False) refuses a workdir that holds checkpoints unless `overwrite`
  # clears them and the old metrics first.
  config.checkpoint = ml_collections.ConfigDict(dict(every=0, keep=3, async_save=True,
                                                     resume=True, overwrite=False, step=unset(int),
                                                     allow_config_change=False))
  # HF checkpoints written as the run trains, to workdir/hf/step_N: every `every` steps of each
  # stage and at its last step (0: never), and after the last stage (`at_end`). dtype on disk:
  # '' keeps the parameter dtype, or 'bfloat16' / 'float16' / 'float32'.
  config.export = ml_collections.ConfigDict(dict(every=0, at_end=False, dtype=""))
  # verbose: also print libraries' INFO lines (Orbax, grain); their warnings always show.
  config.log = ml_collections.ConfigDict(dict(every=1, tensorboard=True, wandb_project="",
                                              progress_bar=True, plot=True, verbose=False))
  # Each chip's memory, as the compiler is told it (training/memory_budget.py): on TPU every
  # program may use the chip's memory less `hbm_headroom` of it less the state kept outside the
  # program (optimizer moments, reference, accumulator); it is refused at compile time otherwise.
  config.memory = ml_collections.ConfigDict(dict(hbm_headroom=0.2))
  # The ahead-of-time plan (python -m metaphorstar_jax.plan): `check_fit` makes train compile
  # every program first and refuse a step that cannot fit; worst-case prompts carry
  # `images_per_prompt` square images of `image_pixels` (unset: image.max_pixels).
  config.plan = ml_collections.ConfigDict(dict(check_fit=False, image_pixels=unset(int),
                                               images_per_prompt=1))
  # Fault injection for resumption tests (0: never): SIGKILL the process right after the
  # checkpoint of global step `kill_after_checkpoint` is on disk; SIGTERM it in the middle of
  # global step `signal_at_step` (a pre-emption; of process 0 only, which the others must follow).
  config.debug = ml_collections.ConfigDict(dict(kill_after_checkpoint=0, signal_at_step=0))
  # The LLM judge of open-ended answers (tfq_osq, judge.py). URL and key come from here or from
  # METAPHORSTAR_JUDGE_URL / METAPHORSTAR_JUDGE_API_KEY. timeout_s bounds each socket read,
  # deadline_s a whole request (a server may trickle), and max_reply_bytes a reply (a grade is a
  # few hundred bytes). Empty base_url, model or api_key: the environment's.
  config.judge = ml_collections.ConfigDict(dict(
      base_url="", model="", api_key="", repeats=3, temperature=0.0, top_p=0.9,
      image_detail="high", cache_path="", timeout_s=60.0, deadline_s=120.0,
      max_reply_bytes=1 << 20))
  config.lock()
  return config


# What a smoke run may change: sizes, counts and paths, never a switch that selects code. A
# field path; `*` stands for any stage index. tests/test_configs.py checks every other field of
# each smoke config against its full config.
SMOKE_SIZE_FIELDS = (
    "workdir",
    "model.hf_path", "model.preset", "model.tokenizer",
    "image.min_pixels", "image.max_pixels",
    "data.max_prompt_tokens",
    "data.miniature",  # a data source, like the paths: the smoke run's synthetic records
    "rl.group_size", "rl.max_new_tokens", "rl.overrides.overlong_buffer_len",
    "train.prompts_per_step", "train.gen_prompts_per_step", "train.num_minibatches",
    "train.grad_accum_steps", "train.logit_chunk", "train.prefill_chunk",
    "eval.every", "eval.num_examples", "eval.max_new_tokens",
    "checkpoint.every",
    "stages.*.steps", "stages.*.warmup_steps", "stages.*.prompts_per_step",
    "stages.*.gen_prompts_per_step", "stages.*.group_size",
    "stages.*.rl_overrides.overlong_buffer_len",
    "stages.*.tree_rollout.num_roots", "stages.*.tree_rollout.branches",
)

# The switches a smoke run cannot keep, each with the reason; the only non-size fields it changes.
SMOKE_SWITCHES_OFF = {
    "rl.overrides.filter_groups": (
        "DAPO dynamic sampling keeps only groups whose rewards differ; a random tiny model gives "
        "every sample of a group the same reward, so it would keep no group and never update"),
}
SMOKE_SWITCHES_OFF["stages.*.rl_overrides.filter_groups"] = SMOKE_SWITCHES_OFF[
    "rl.overrides.filter_groups"]
SMOKE_SWITCHES_OFF["stages.*.sft_data"] = (
    "a supervised stage's trajectories are a dataset a smoke run does not have; it learns the "
    "trainer's format-only warm-start targets instead (tests/test_train_sft_data.py covers "
    "the sft_data path)")

SMOKE_NEW_TOKENS = 8
SMOKE_GROUP_SIZE = 2


def make_smoke(config: ml_collections.ConfigDict) -> None:
  """Shrinks any config to a few seconds on a laptop CPU, keeping every switch that picks code.

  remat, dtypes, freeze_vision, logit_chunk, prefill_chunk, KL placement, tree rollouts and the mini-batch /
  micro-batch structure (num_minibatches > 1 and grad_accum_steps > 1 where the config has them)
  stay as configured; only SMOKE_SIZE_FIELDS shrink, and SMOKE_SWITCHES_OFF say what cannot run
  (each logged).
  """
  config.model.hf_path = ""
  config.model.preset = "tiny"
  config.model.tokenizer = "small"
  config.image.min_pixels = config.image.max_pixels = 56 * 56
  config.data.max_prompt_tokens = min(config.data.max_prompt_tokens, 512)
  config.data.miniature = True
  minibatches = min(config.train.num_minibatches, 2)
  accumulation = min(config.train.grad_accum_steps, 2)
  parts = minibatches * accumulation
  prompts = parts * -(-2 // parts)  # at least two prompts, split evenly into every part
  config.train.num_minibatches, config.train.grad_accum_steps = minibatches, accumulation
  config.train.prompts_per_step = prompts
  config.train.gen_prompts_per_step = None
  if config.train.logit_chunk > 0:  # still chunked: a chunk below the smoke completions' length
    config.train.logit_chunk = min(config.train.logit_chunk, SMOKE_NEW_TOKENS // 2)
  if config.train.prefill_chunk > 0:  # still chunked: two chunks of the smoke batch
    config.train.prefill_chunk = max(1, prompts // 2)
  config.rl.group_size = SMOKE_GROUP_SIZE
  config.rl.max_new_tokens = SMOKE_NEW_TOKENS
  config.rl.overrides = _smoke_overrides(config.rl.overrides)
  config.eval.every = min(config.eval.every, 1)  # 0 stays off; else once inside each stage
  config.eval.num_examples = 4
  config.eval.max_new_tokens = SMOKE_NEW_TOKENS
  config.checkpoint.every = 2
  for s in config.stages:
    s.steps = 2
    s.warmup_steps = 0
    if s.prompts_per_step is not None:
      s.prompts_per_step = prompts
    if s.gen_prompts_per_step is not None:
      s.gen_prompts_per_step = prompts
    s.rl_overrides = _smoke_overrides(s.rl_overrides)
    if s.tree_rollout:
      s.tree_rollout = dict(s.tree_rollout, num_roots=1, branches=1)
    if s.group_size is not None:
      s.group_size = SMOKE_GROUP_SIZE  # a smoke tree's 1 root + 1 branch too
    if s.sft_data is None:  # required data: see SMOKE_SWITCHES_OFF
      s.sft_data = ""


def _smoke_overrides(overrides) -> dict:
  """Loss overrides for a smoke run: the overlong buffer fits its short budget; no dynamic
  sampling (see SMOKE_SWITCHES_OFF)."""
  overrides = dict(overrides)
  if "overlong_buffer_len" in overrides:
    overrides["overlong_buffer_len"] = SMOKE_NEW_TOKENS // 2
  if overrides.get("filter_groups"):
    logging.warning("Smoke mode turns dynamic sampling (filter_groups) off: %s.",
                    SMOKE_SWITCHES_OFF["rl.overrides.filter_groups"])
  if "filter_groups" in overrides:
    overrides["filter_groups"] = False
  return overrides


def dict_field_schemas(config) -> dict[str, tuple[str, list[str]]]:
  """{path of a dict-valued field: (what its keys are, the valid keys)} for `config`."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from metaphorstar_jax import rl  # here: config files import this module, and rl imports jax
  from metaphorstar_jax.tasks import get_task
  loss = ("rl.LossConfig fields", [f.name for f in dataclasses.fields(rl.LossConfig)])
  tree = ("rl.TreeRollout fields", [f.name for f in dataclasses.fields(rl.TreeRollout)])
  schemas = {"rl.overrides": loss, "rl.tree_rollout": tree}
  task_options = getattr(get_task(config.data.task), "options", None)
  if dataclasses.is_dataclass(task_options):  # a task of our own kind (tasks/records.py)
    options = (f"options of the task {config.data.task!r}",
               [f.name for f in dataclasses.fields(task_options)])
    schemas.update({"data.task_options": options, "data.eval_task_options": options})
  for index in range(len(config.stages)):
    schemas[f"stages[{index}].rl_overrides"] = loss
    schemas[f"stages[{index}].tree_rollout"] = tree
  return schemas


def field_value(config, path: str):
  """The value at a field path such as 'rl.overrides' or 'stages[1].tree_rollout'."""
  value = config
  for part in path.replace("[", ".").replace("]", "").split("."):
    value = value[int(part)] if part.isdigit() else value[part]
  return value


def check_dict_keys(config, paths=None) -> None:
  """ValueError for a key of a dict-valued field (rl.overrides, rl.tree_rollout, the task
  options, a stage's rl_overrides and tree_rollout; only those in `paths` when given) outside
  that field's schema, naming the closest valid key."""
  for path, (what, valid) in dict_field_schemas(config).items():
    if paths is not None and path not in paths:
      continue
    for key in field_value(config, path) or {}:
      if key not in valid:
        raise ValueError(f"config.{path} has no key {key!r}{closest_name_hint(key, valid)}: its "
                         f"keys are {what}, {', '.join(sorted(valid))}.")


def tfq_grpo(size: str, *, grad_accum_steps: int, prefill_chunk: int = 8,
             smoke: bool = False) -> ml_collections.ConfigDict:
  """MetaphorStar's TFQ-GRPO recipe for Qwen2.5-VL-`size` (spec §1.3-1.4); sizes share every
  number but the micro-batching and the rollout's prefill chunks, which only trade memory for
  time (and are best a multiple of the chips, so that each chip holds whole rows)."""
  config = base_config()
  config.workdir = f"runs/tfq_grpo_{size}"

  config.model.hf_path = ""  # --config.model.hf_path=/ckpt/Qwen2.5-VL-<size>-Instruct
  config.model.preset = size  # §1.3: Qwen2.5-VL-{3B,7B,32B}-Instruct
  config.model.tokenizer = ""  # the checkpoint's own
  config.model.dtype = "bfloat16"  # §6.1: bf16 compute
  config.model.param_dtype = "float32"  # fp32 master weights and Adam state [infer, FSDP default]
  config.model.remat = True  # §1.4: gradient checkpointing on
  # Layer inputs saved for the backward pass in host memory: 11 GiB per chip off the 7B
  # gradient micro-batch on a v5p-8 (README "Will it fit?").
  config.model.remat_offload = True
  config.model.freeze_vision = False  # §1.4: the vision tower is trained
  config.image.min_pixels = 262144  # §1.4: 512²
  config.image.max_pixels = 4194304  # §1.4: 2048²
  # The base mesh (data=1, fsdp=-1, tensor=1) is §1.2's FSDP full shard over every device.

  config.data.task = "tfq"
  # The tfq task's defaults are §1.6's reward (0.5·accuracy + 0.5·format); leaving the options
  # empty keeps the config valid for --config.data.task=tfq_mcq and tfq_osq too.
  config.data.task_options = {}
  config.data.train = ""  # §1.4: MING-ZCH/TFQ-Data-Lite (train split), local parquet folder
  config.data.eval = ""  # §1.4: MING-ZCH/TFQ-Bench-Lite (test split)
  config.data.max_prompt_tokens = 5500  # §1.4: max_prompt_length

  config.rl.preset = "metaphorstar"  # §1.3: z-score GRPO, clip 0.2/0.3, dual-clip 3, KL 1e-2
  config.rl.overrides = {}
  config.rl.group_size = 5  # §1.4: rollout.n
  config.rl.temperature = 1.0  # §1.4
  config.rl.top_p = 0.99  # §1.4
  config.rl.max_new_tokens = 2048  # §1.4: max_response_length

  config.train.prompts_per_step = 64  # §1.4: rollout_batch_size
  config.train.ppo_epochs = 1  # §1.3
  config.train.num_minibatches = 2  # §1.4: actor global_batch_size 32 of the 64 prompts
  # Memory only: the loss normaliser spans the whole mini-batch.
  config.train.grad_accum_steps = grad_accum_steps
  # Memory only: the rollout encodes and prefills this many prompts at a time (README "Will it
  # fit?").
  config.train.prefill_chunk = prefill_chunk

  config.optim.schedule = "constant"  # §1.4
  config.optim.weight_decay = 1e-2  # §1.4
  config.optim.grad_clip_norm = 1.0  # §1.4: max_grad_norm
  # §1.4: 5 epochs × (984 // 64 = 15 steps, drop_last) = 75 steps; lr 1e-6, no warmup.
  config.stages = [stage("grpo", kind="grpo", steps=75, learning_rate=1e-6,
                                warmup_steps=0)]

  config.eval.every = 5  # §1.4: val_freq 5 (and val_before_train)
  config.eval.num_examples = 492  # §1.7: TFQ-Bench-Lite has 492 questions on 50 images
  config.eval.batch_size = 32
  config.eval.greedy = False  # §1.8: the benchmark samples at temperature 0.5
  config.eval.temperature = 0.5  # §1.8: TFQ/MCQ inference (OSQ candidates: 0.7)
  config.eval.top_p = 0.9  # §1.8
  config.eval.max_new_tokens = 2048  # §1.4: max_response_length
  config.eval.num_samples = 1  # §1.4: validation n=1
  config.checkpoint.every = 5  # §1.4: save_freq
  config.checkpoint.keep = 3  # §1.4: save_limit

  # The OSQ judge (§1.8): GPT-4o at temperature 0, top_p 0.9, image at detail "high", at least 3
  # repeats averaged.
  config.judge.model = "gpt-4o-2024-11-20"  # §1.8
  config.judge.repeats = 3  # §1.8
  config.judge.temperature, config.judge.top_p = 0.0, 0.9  # §1.8
  config.judge.image_detail = "high"  # §1.8

  if smoke:
    make_smoke(config)
  return config
