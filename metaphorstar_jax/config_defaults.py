"""Defaults every training config starts from, and small helpers the configs share (configs/*.py)."""

import ml_collections


def stage(name: str, *, kind: str, steps: int, learning_rate: float, warmup_steps: int = 0,
          **extra) -> ml_collections.ConfigDict:
  """One stage of a run: 'sft' (supervised warm start) or 'grpo'; its output starts the next."""
  return ml_collections.ConfigDict(dict(name=name, kind=kind, steps=steps,
                                        learning_rate=learning_rate, warmup_steps=warmup_steps,
                                        **extra))


def base_config() -> ml_collections.ConfigDict:
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
      freeze_vision=False,
  ))
  config.image = ml_collections.ConfigDict(dict(min_pixels=3136, max_pixels=12845056))
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

  config.data = ml_collections.ConfigDict(dict(
      task="shapes",
      task_options={},
      eval_task_options={},
      train="",  # path of the training data; empty: the task generates or needs none
      eval="",
      max_prompt_tokens=4096,
      num_workers=0,  # grain worker processes for image decoding
  ))

  config.rl = ml_collections.ConfigDict(dict(
      preset="metaphorstar",  # rl.preset(): grpo, dr_grpo, dapo, gspo, metaphorstar
      overrides={},  # LossConfig fields, e.g. {"clip_ratio_high": 0.28}
      group_size=-1,  # -1: the preset's rollout.n
      temperature=-1.0,  # -1: the preset's
      top_p=-1.0,
      top_k=0,
      max_new_tokens=256,
  ))
  config.train = ml_collections.ConfigDict(dict(
      prompts_per_step=8,
      ppo_epochs=1,  # μ: passes over each step's rollouts
      num_minibatches=1,  # optimizer updates per pass
      grad_accum_steps=1,  # micro-batches per update
      logit_chunk=0,  # >0: form LM-head logits this many tokens at a time
  ))
  config.optim = ml_collections.ConfigDict(dict(
      schedule="constant", final_lr_fraction=0.0, b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.01, grad_clip_norm=1.0, max_consecutive_nonfinite=10))
  config.warmup = ml_collections.ConfigDict(dict(
      think="Let me look at the image carefully.",  # the <think> text of warm-start targets
      answers=("T", "F"),  # never the record's own: the warm start teaches format, not the task
      every_answer=True,  # one target per answer (an even split); False: one drawn at random
  ))
  config.stages = [stage("grpo", kind="grpo", steps=100, learning_rate=1e-6)]

  config.eval = ml_collections.ConfigDict(dict(every=0, num_examples=64, greedy=True,
                                               batch_size=32))
  config.checkpoint = ml_collections.ConfigDict(dict(every=0, keep=3, async_save=True,
                                                     resume=True))
  config.log = ml_collections.ConfigDict(dict(every=1, tensorboard=True, wandb_project="",
                                              progress_bar=True, plot=True))
  # Fault injection for resumption tests: SIGKILL the process right after the checkpoint of
  # this global step is on disk (0: never).
  config.debug = ml_collections.ConfigDict(dict(kill_after_checkpoint=0))
  return config


def make_smoke(config: ml_collections.ConfigDict) -> None:
  """Shrinks any config to a few seconds on a laptop CPU."""
  config.model.hf_path = ""
  config.model.preset = "tiny"
  config.model.tokenizer = "small"
  config.image.min_pixels = config.image.max_pixels = 56 * 56
  config.train.prompts_per_step = 2
  config.rl.group_size = 2
  config.rl.max_new_tokens = 8
  config.eval.num_examples = 4
  for s in config.stages:
    s.steps = 2
    s.warmup_steps = 0
  config.checkpoint.every = 2
