"""Evaluate a policy on a task's held-out records; write the metrics as JSON and as a table.

    python -m metaphorstar_jax.evaluate --config=configs/tfq_grpo_7b.py \
        --checkpoint=runs/tfq_grpo_7b --config.data.eval=/data/TFQ-Bench-Lite
    python -m metaphorstar_jax.evaluate --config=configs/tfq_grpo_7b.py \
        --hf_path=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.eval=/data/TFQ-Bench-Lite
    python -m metaphorstar_jax.evaluate --config=configs/star_r1_7b.py:smoke   # random, miniature

The policy is, in order: the params of a training run's Orbax checkpoint (`--checkpoint`, a run
directory or its `checkpoints/` folder; the latest step or `--step`; only the params are read),
an HF checkpoint directory (`--hf_path`, or the config's `model.hf_path`), else a random
`model.preset` (for smoke tests). Records are `config.data.eval`, else the ones the task
generates (shapes), else a synthetic miniature of the task written under the output folder.

Completions are greedy, or sampled with the config's evaluation sampling (`--sampling`);
`--num_samples=K` draws K completions per record and reports the mean (and spread) of each metric
over the K repeats. The task's metrics score them; open-ended tasks (OSQ) are graded 1-5 by an
LLM judge (metaphorstar_jax/judge.py) configured by `config.judge` or METAPHORSTAR_JUDGE_*.
This file is the command line; the evaluation is `training/evaluation.py`.

Writes to --output_dir (default <run>/eval/<model>): results.json (metrics, their spread,
per-repeat metrics, settings), results.md (the table printed at the end) and completions.jsonl
(every completion with its scores). The trainer's periodic evaluation is the same code
(`evaluation.evaluate_records`) with its own sampler and records.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags

from metaphorstar_jax import config_files
from metaphorstar_jax import sharding as sharding_lib
from metaphorstar_jax.training import evaluation, evaluation_setup

DEFAULT_CONFIG = config_files.path(config_files.DEFAULT)  # shipped with the package


def _define_flags(argv: Sequence[str]) -> flags.FlagValues:
  """Our flags in a FlagValues of their own: the trainer's module defines --config on the global
  one, and each call starts from the defaults."""
  fv = flags.FlagValues()
  config_files.define_config_flag("config", DEFAULT_CONFIG, "Training/evaluation config file; "
                                  "append ':smoke' for its smoke mode.", flag_values=fv,
                                  sys_argv=list(argv))
  flags.DEFINE_string("checkpoint", None, "A training run folder (or its checkpoints/ folder) "
                      "whose params to evaluate.", flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.", flag_values=fv)
  flags.DEFINE_string("hf_path", None, "A local HF Qwen2.5-VL checkpoint folder to evaluate.",
                      flag_values=fv)
  flags.DEFINE_string("output_dir", None, "Where results go; default <run>/eval/<model>.",
                      flag_values=fv)
  flags.DEFINE_integer("num_samples", None, "Completions per record, metrics averaged; default "
                       "config.eval.num_samples or 1.", flag_values=fv)
  flags.DEFINE_enum("sampling", None, list(evaluation_setup.SAMPLING_MODES), "greedy, or "
                    "validation (the config's evaluation temperature/top_p); default by "
                    "config.eval.greedy.",
                    flag_values=fv)
  return fv


def cli(argv: Sequence[str]) -> dict:
  """Runs the command line `argv` (program name first); returns run_evaluation's result."""
  fv = _define_flags(argv)
  config_files.parse_flags(fv, argv)
  if fv.checkpoint and fv.hf_path:
    raise app.UsageError("Give --checkpoint or --hf_path, not both: a training checkpoint already "
                         "holds the weights (its architecture comes from config.model).")
  if "distributed" in fv.config:
    sharding_lib.initialize_distributed(**fv.config.distributed.to_dict())
  return evaluation.run_evaluation(fv.config, checkpoint=fv.checkpoint, step=fv.step,
                                   hf_path=fv.hf_path, output_dir=fv.output_dir,
                                   num_samples=fv.num_samples, sampling=fv.sampling)


def main(argv):
  result = cli(argv)
  print(result["markdown"])
  if "paths" in result:
    print(f"Written: {result['paths']['json']}, {result['paths']['markdown']}")


def _absl_flags(argv):
  """absl's own flags (--verbosity, ...) on the global FlagValues; ours go to `cli`."""
  return flags.FLAGS(argv, known_only=True)


if __name__ == "__main__":
  app.run(main, flags_parser=_absl_flags)
