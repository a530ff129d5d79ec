"""GRPO step time: our trainer's step against TRL's `GRPOTrainer`, same weights, prompts, settings.

One step is everything a training step does: build the prompt batch (chat template, image
patches), draw G completions per prompt, decode and score them, compute group advantages, and
take one AdamW update (forward + backward over all P·G rows; ours runs the decoder over each
prompt once and its G completions on the prompt's KV cache, TRL over G prompt+completion rows).
Both sides run the same random 'small' model (bench_models.md; TRL trains the transformers copy
from `load_model_pair`), fp32 on CPU, in one process, on the same one-image true/false prompts of
the built-in `shapes` task (112x112 images, 16 image tokens, MetaphorStar's TFQ prompt), step k
of each side on the same two prompts.

Settings, identical on both sides unless said otherwise:
  - P=2 prompts × G=8 completions, completions forced to 64 new tokens (ours: no stop tokens;
    TRL: `min_new_tokens=64`, which suppresses its EOS ids), temperature 1.0, top_p 1.0, no
    top_k; the four vision special tokens may not be sampled (our sampler's default ban; TRL only
    bans <|image_pad|> by default, so `suppress_tokens` lists the same four).
  - reward: the shapes task's scorer (`task.score(text, record)["overall"]`, format + accuracy) on
    the decoded completion with special tokens skipped; group z-score advantages with the unbiased
    std (TRL `scale_rewards="group"`). A random model earns the same reward (0) on every
    completion, so advantages are 0; neither side skips any work for that.
  - loss: PPO-clip 0.2/0.2 per token, averaged over all completion tokens of the batch (ours
    `loss_agg_mode="token-mean"`, TRL `loss_type="dapo"`), no dual clip, no entropy term, no KL
    (beta=0, so neither side keeps a reference model), one PPO epoch, one mini-batch, no gradient
    accumulation (TRL `steps_per_generation=1`, `num_iterations=1`): both sides reuse the
    sampling-time policy as the old policy instead of a separate log-prob pass.
  - AdamW lr 1e-6 (constant), betas 0.9/0.999, eps 1e-8, weight decay 0, global-norm clip 1.0.
  - fp32 everywhere (TRL: `bf16=False`), no gradient checkpointing (TRL defaults to it), no vLLM
    (TRL samples with transformers `generate`), torch on --threads threads (XLA's CPU client
    takes every core, 2 on the benchmark machine).

Timing. TRL's own `trainer.train()` loop drives: after each of its optimizer steps, a
`TrainerCallback` runs one of our steps, so the two sides take turns (load from other processes
hits both alike). A TRL step is the wall time between the end of our previous step and the end of
TRL's next optimizer step (batch fetch, generation, reward, loss, backward, optimizer step and
the Trainer's bookkeeping); ours is one `training.grpo.step` call plus fetching its batch from our
`PromptStream`. The first --warmup steps of each side are untimed warm-up (`*_warmup_steps_s`):
ours compiles there (in the first step; a later step compiles again only if its prompts or
completions need a wider bucket, which `ours_compiled_update_programs` would show), torch
allocates. `ours_compile_s` is our warm-up time minus as many median steps.

The split: ours `rollout` is grpo_step's `sample_seconds` (prompt preparation, sampling,
decoding) and `update` the rest (reward, advantages, gradients, optimizer); TRL's `rollout` is its
`_generate_and_score_completions` (tokenising, `generate`, decoding, reward, advantages, the
image preprocessing for the loss forward) and `update` the rest; `torch_generate_s` is the
`_generate_single_turn` part of its rollout (padding, `generate`, cutting at EOS).

What it took to run TRL offline on CPU here (all public API, nothing patched):
  - the processor: transformers 5.x's `Qwen2_5_VLProcessor` needs a video processor whose class
    needs torchvision, which has no CPU wheel here. `bench.common.transformers_processor()` builds
    an image-only subclass from `Qwen2VLImageProcessorPil` and the benchmark tokenizer saved by
    `ChatProcessor.save_pretrained`; its ids, pixels and `mm_token_type_ids` are the stock ones.
  - the data: a local in-memory `datasets.Dataset` (conversational `prompt` with an image
    placeholder, `image` column, `record_index` for the reward), `shuffle_dataset=False` so TRL's
    step k sees the prompts our step k sees.
  - the config: `use_cpu=True`, `report_to="none"`, `save_strategy="no"`,
    `logging_strategy="no"` (its per-step metrics are not needed), `disable_tqdm=True`,
    `bf16=False`, `activation_checkpointing=False` (and its deprecated alias
    `gradient_checkpointing=False`, which TRL's config defaults to True), `use_vllm=False`, checked
    on the built trainer; HF_HUB_OFFLINE=1 so any hub access fails fast instead of waiting.
  - measuring: a `TrainerCallback` (timing and our turns) and a subclass of GRPOTrainer that
    only times `_generate_and_score_completions` and `_generate_single_turn` (private methods: if
    a TRL release renames them, the split fields break, not the comparison).
    Anything the Trainer prints to stdout is sent to stderr so stdout keeps its one JSON line.
No TRL feature needed for this comparison was out of reach.

    python bench/grpo_step.py                        # small model, P=2, G=8, 64 tokens
    python -m bench.grpo_step --model tiny --group 2 --new_tokens 4 --warmup 1 --repeats 1

Prints one JSON line; logs go to stderr. Run it on an otherwise idle machine (`other_cpu_share`
in the output says how busy other processes kept the CPUs).

Shape letters: P prompts, G completions per prompt, N new tokens.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make `bench` and `metaphorstar_jax` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "small", ["tiny", "small"], "Benchmark model size (bench_models.md).")
flags.DEFINE_integer("prompts", 2, "Prompts per step (P).")
flags.DEFINE_integer("group", 8, "Completions per prompt (G); TRL needs at least 2.")
flags.DEFINE_integer("new_tokens", 64, "Completion length (stop tokens are ignored).")
flags.DEFINE_integer("warmup", 2, "Untimed steps per side before timing; ours compiles in the "
                     "first (see the module docstring).")
flags.DEFINE_integer("repeats", 3, "Timed steps per side; the median is reported.")
flags.DEFINE_float("learning_rate", 1e-6, "AdamW learning rate, both sides (TRL's default).")
flags.DEFINE_integer("threads", 2, "torch.set_num_threads for the PyTorch side.")
flags.DEFINE_integer("seed", 0, "Seed of the random weights, the prompts and the sampling.")

TASK_NAME = "shapes"
# One statement per 112x112 picture: every prompt of a step has its own image of 16 image tokens.
TASK_OPTIONS = dict(statements_per_image=1)
CLIP_RATIO = 0.2  # PPO clip, both sides, both directions
MAX_GRAD_NORM = 1.0  # TRL's (TrainingArguments') default
WEIGHT_DECAY = 0.0  # TRL's (TrainingArguments') default


def make_task(num_records: int, seed: int):
  """The shapes task with `num_records` records whose pictures fill the benchmark image size."""
  from bench import common
  from metaphorstar_jax.tasks import get_task, load_records
  task = get_task(TASK_NAME, num_records=num_records, seed=seed, image_size=common.IMAGE_SIDE,
                  **TASK_OPTIONS)
  records, _ = load_records(task, None)
  return task, list(records)


# --- ours ---------------------------------------------------------------------------------------

def our_config(num_steps: int):
  """A training config with the settings in the module docstring (see config_defaults)."""
  from metaphorstar_jax import config_defaults
  config = config_defaults.base_config()
  config.rl.preset = "grpo"
  config.rl.overrides = dict(use_kl_loss=False, clip_ratio_low=CLIP_RATIO,
                             clip_ratio_high=CLIP_RATIO, clip_ratio_c=None,
                             loss_agg_mode="token-mean", entropy_coeff=0.0,
                             mask_truncated_completions=False)
  config.rl.group_size = FLAGS.group
  config.rl.temperature = 1.0
  config.rl.top_p = 1.0
  config.rl.top_k = 0
  config.rl.max_new_tokens = FLAGS.new_tokens
  config.train.prompts_per_step = FLAGS.prompts
  config.train.ppo_epochs = 1
  config.train.num_minibatches = 1
  config.train.grad_accum_steps = 1
  config.optim.schedule = "constant"
  config.optim.weight_decay = WEIGHT_DECAY
  config.optim.grad_clip_norm = MAX_GRAD_NORM
  config.stages = [config_defaults.stage("grpo", kind="grpo", steps=num_steps,
                                         learning_rate=FLAGS.learning_rate)]
  config.seed = FLAGS.seed
  return config


class OurTrainer:
  """Our GRPO step over the benchmark model, fed the task's records in order, P per step."""

  def __init__(self, model, processor, task, records, num_steps: int):
    import jax
    from flax import nnx

    from metaphorstar_jax import sharding as sharding_lib
    from metaphorstar_jax.data.pipeline import PromptStream
    from metaphorstar_jax.sampling import Sampler, SamplingConfig
    from metaphorstar_jax.training import builders, learner as learner_lib, step as step_lib
    from metaphorstar_jax.training.objective import build_objective
    from metaphorstar_jax.training.state import RunState

    self.config = config = our_config(num_steps)
    self.mesh = sharding_lib.make_mesh(**config.mesh.to_dict())
    graphdef, params = nnx.split(model)  # placed like builders.build_model places a preset model
    params = jax.device_put(params, sharding_lib.parameter_shardings(params, self.mesh))
    model = nnx.merge(graphdef, params)
    objective = build_objective(config)
    # The trainer's learner, with a sampler that never stops early: every rollout is full length
    # in both stacks.
    sampler = Sampler(model, SamplingConfig(
        max_new_tokens=objective.max_new_tokens, temperature=objective.temperature,
        top_p=objective.top_p, top_k=objective.top_k, stop_token_ids=()), mesh=self.mesh,
        keep_weights=False)
    tx = builders.stage_optimizer(config, config.stages[0], params)
    steps = step_lib.TrainSteps(graphdef, tx, objective.loss, temperature=objective.temperature,
                                logit_chunk=config.train.logit_chunk, mesh=self.mesh)
    self.learner = learner_lib.Learner(config, config.stages[0], objective, steps, sampler, task,
                                       processor, self.mesh)
    self.run = RunState(params=params, opt_state=step_lib.init_optimizer_state(tx, params),
                        ref_params=None, global_step=0, stage_index=0, stage_step=0)
    self.stream = PromptStream(records, processor, task.build_conversation,
                               batch_size=FLAGS.prompts, seed=config.seed, shuffle=False,
                               repeat=False, max_prompt_tokens=config.data.max_prompt_tokens)
    self.task, self.processor = task, processor
    self.step_seconds, self.rollout_seconds, self.completion_lengths = [], [], []
    self.prompt_tokens = self.image_tokens = 0

  def step(self) -> None:
    import jax

    from metaphorstar_jax.training import grpo
    start = time.perf_counter()
    batch = self.stream.next_batch()
    if batch is None or len(batch.records) != FLAGS.prompts:
      raise RuntimeError(f"Our prompt stream ran out at step {self.run.global_step}; the "
                         "benchmark builds exactly P records per step.")
    metrics = grpo.step(self.learner, self.run, batch)
    jax.block_until_ready(self.run.params)
    self.step_seconds.append(time.perf_counter() - start)
    self.rollout_seconds.append(float(metrics["sample_seconds"]))
    self.completion_lengths.append(float(metrics["response_length/mean"]))
    self.prompt_tokens = max(self.prompt_tokens, int(batch.arrays["attention_mask"].sum(1).max()))
    merge = self.processor.image_processor.merge_size
    self.image_tokens = int(batch.arrays["image_grid_thw"][0].prod()) // merge**2
    self.run.global_step += 1
    self.run.stage_step += 1


# --- TRL ----------------------------------------------------------------------------------------

def trl_dataset(records):
  """A local `datasets.Dataset`: conversational prompts with an image placeholder, the images, and
  each row's record index (the reward function's extra column)."""
  from datasets import Dataset

  from metaphorstar_jax.tasks import tfq
  from metaphorstar_jax.tasks.io import to_pil
  prompts, images = [], []
  for record in records:
    conversation = tfq.tfq_conversation(record)
    # TRL fills image placeholders from the `image` column (prepare_multimodal_messages).
    prompts.append([{**message, "content": [{"type": "image"} if part["type"] == "image" else part
                                            for part in message["content"]]}
                    for message in conversation])
    (image,) = record.images
    images.append(to_pil(image))
  return Dataset.from_dict({"prompt": prompts, "image": images,
                            "record_index": list(range(len(records)))})


def trl_trainer(hf_model, processor, task, records, banned_token_ids, num_steps: int,
                output_dir: str, callback):
  from trl import GRPOConfig, GRPOTrainer

  class TimedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that records how long generate-and-score, and `generate` within it, take."""

    def __init__(self, *args, **kwargs):
      self.rollout_seconds: list[float] = []
      self.generate_seconds: list[float] = []
      super().__init__(*args, **kwargs)

    def _generate_and_score_completions(self, inputs):
      start = time.perf_counter()
      outputs = super()._generate_and_score_completions(inputs)
      self.rollout_seconds.append(time.perf_counter() - start)
      return outputs

    def _generate_single_turn(self, *args, **kwargs):
      start = time.perf_counter()
      outputs = super()._generate_single_turn(*args, **kwargs)
      self.generate_seconds.append(time.perf_counter() - start)
      return outputs

  completion_lengths = []

  def shapes_reward(prompts, completions, completion_ids, record_index, **kwargs):
    """The task's overall reward of each decoded completion; also records completion lengths."""
    del prompts, kwargs
    completion_lengths.append(sum(len(ids) for ids in completion_ids) / len(completion_ids))
    return [float(task.score(completion[0]["content"], records[index])["overall"])
            for completion, index in zip(completions, record_index)]

  args = GRPOConfig(
      output_dir=output_dir,
      use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no",
      disable_tqdm=True, dataloader_num_workers=0, seed=FLAGS.seed,
      # TRL defaults to bf16 and to checkpointing (its deprecated gradient_checkpointing).
      bf16=False, fp16=False, activation_checkpointing=False, gradient_checkpointing=False,
      use_vllm=False,
      max_steps=num_steps, per_device_train_batch_size=FLAGS.prompts * FLAGS.group,
      gradient_accumulation_steps=1, num_generations=FLAGS.group, shuffle_dataset=False,
      max_completion_length=FLAGS.new_tokens, temperature=1.0, top_p=1.0, top_k=0,
      generation_kwargs={"min_new_tokens": FLAGS.new_tokens,
                         "suppress_tokens": list(banned_token_ids)},
      learning_rate=FLAGS.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
      weight_decay=WEIGHT_DECAY, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
      max_grad_norm=MAX_GRAD_NORM,
      beta=0.0, num_iterations=1, epsilon=CLIP_RATIO, loss_type="dapo", scale_rewards="group",
      mask_truncated_completions=False, top_entropy_quantile=1.0, log_completions=False)
  trainer = TimedGRPOTrainer(model=hf_model, reward_funcs=shapes_reward, args=args,
                             train_dataset=trl_dataset(records), processing_class=processor,
                             callbacks=[callback])
  checkpointing = getattr(trainer.model, "is_activation_checkpointing", False)
  if trainer.args.bf16 or trainer.args.fp16 or checkpointing:
    raise RuntimeError("TRL's trainer runs in reduced precision or with activation checkpointing "
                       "although both were turned off; check this TRL version's GRPOConfig.")
  return trainer, completion_lengths


def take_turns_callback(ours: OurTrainer):
  """A TrainerCallback that times each TRL step and runs one of our steps after it."""
  from transformers import TrainerCallback

  class TakeTurns(TrainerCallback):
    def __init__(self):
      self.torch_seconds: list[float] = []
      self._resumed = None

    def on_train_begin(self, args, state, control, **kwargs):
      self._resumed = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      self.torch_seconds.append(time.perf_counter() - self._resumed)
      logging.info("TRL step %d: %.2f s.", len(self.torch_seconds), self.torch_seconds[-1])
      ours.step()
      logging.info("Our step %d: %.2f s.", len(ours.step_seconds), ours.step_seconds[-1])
      self._resumed = time.perf_counter()

  return TakeTurns()


# --- the run ------------------------------------------------------------------------------------

def split(total: list[float], rollout: list[float], warmup: int) -> dict[str, float | None]:
  """Median step, rollout and update (step minus rollout) seconds over the timed steps.

  Rollout and update are None when `rollout` did not record one time per step.
  """
  result = dict(step=statistics.median(total[warmup:]), rollout=None, update=None)
  if len(rollout) == len(total):
    timed = list(zip(total[warmup:], rollout[warmup:]))
    result.update(rollout=statistics.median(r for _, r in timed),
                  update=statistics.median(t - r for t, r in timed))
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.group < 2:
    raise app.UsageError(f"--group must be at least 2 (GRPO needs a group; TRL refuses fewer), "
                         f"got {FLAGS.group}.")
  if FLAGS.prompts < 1 or FLAGS.new_tokens < 1 or FLAGS.warmup < 1 or FLAGS.repeats < 1:
    raise app.UsageError("--prompts, --new_tokens, --warmup and --repeats must be positive.")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub: fail fast if asked
  import torch
  import trl

  from bench import common

  torch.set_num_threads(FLAGS.threads)
  num_steps = FLAGS.warmup + FLAGS.repeats
  task, records = make_task(FLAGS.prompts * num_steps, FLAGS.seed)
  hf_model, model = common.load_model_pair(FLAGS.model, FLAGS.seed)
  ours = OurTrainer(model, common.chat_processor(), task, records, num_steps)
  callback = take_turns_callback(ours)
  with tempfile.TemporaryDirectory(prefix="bench_grpo_trl_") as output_dir:
    trainer, torch_lengths = trl_trainer(
        hf_model, common.transformers_processor(), task, records,
        ours.learner.sampler.config.banned_token_ids, num_steps, output_dir, callback)
    with common.OtherLoad() as other_load, contextlib.redirect_stdout(sys.stderr):
      trainer.train()
  if len(callback.torch_seconds) != num_steps or len(ours.step_seconds) != num_steps:
    raise RuntimeError(f"Expected {num_steps} steps per side, got {len(callback.torch_seconds)} "
                       f"(TRL) and {len(ours.step_seconds)} (ours).")
  if other_load.share is not None and other_load.share > 0.1:
    logging.warning("Other processes used %.0f%% of the CPUs while timing; rerun when idle.",
                    100 * other_load.share)

  w = FLAGS.warmup
  mine = split(ours.step_seconds, ours.rollout_seconds, w)
  theirs = split(callback.torch_seconds, trainer.rollout_seconds, w)
  logging.info("Median step: ours %.2f s (rollout %s), TRL %.2f s (rollout %s).",
               mine["step"], mine["rollout"], theirs["step"], theirs["rollout"])
  env = common.environment()
  common.print_result(dict(
      bench="grpo_step", model=FLAGS.model, parameters=common.num_parameters(hf_model),
      dtype="float32", prompts=FLAGS.prompts, group_size=FLAGS.group,
      new_tokens=FLAGS.new_tokens, prompt_tokens=ours.prompt_tokens,
      image_tokens_per_prompt=ours.image_tokens,
      ours_step_s=mine["step"], torch_step_s=theirs["step"], ratio=theirs["step"] / mine["step"],
      ours_rollout_s=mine["rollout"], ours_update_s=mine["update"],
      torch_rollout_s=theirs["rollout"], torch_update_s=theirs["update"],
      torch_generate_s=split(callback.torch_seconds, trainer.generate_seconds, w)["rollout"],
      ours_compile_s=sum(ours.step_seconds[:w]) - w * mine["step"],
      ours_warmup_steps_s=ours.step_seconds[:w], torch_warmup_steps_s=callback.torch_seconds[:w],
      ours_completion_tokens=statistics.mean(ours.completion_lengths),
      torch_completion_tokens=statistics.mean(torch_lengths),
      ours_compiled_sampler_programs=ours.learner.sampler.compiled_programs,
      ours_compiled_update_programs=ours.learner.steps.compiled_update_programs(),
      warmup_steps=w, timed_steps=FLAGS.repeats,
      torch_side=f"trl.GRPOTrainer {trl.__version__} (transformers generate, no vLLM)",
      settings=dict(kl="none (beta=0, no reference model)", learning_rate=FLAGS.learning_rate,
                    loss="PPO clip 0.2, token-mean over the batch (TRL loss_type='dapo')",
                    advantages="group z-score, unbiased std", ppo_epochs=1, temperature=1.0,
                    top_p=1.0, top_k=0, optimizer="AdamW, wd 0, clip-norm 1.0, constant lr",
                    reward=f"{TASK_NAME} task score (overall)", gradient_checkpointing=False),
      trl_version=trl.__version__, threads=FLAGS.threads,
      other_cpu_share=None if other_load.share is None else round(other_load.share, 3),
      **env))


if __name__ == "__main__":
  app.run(main)
