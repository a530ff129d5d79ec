"""Train a Qwen2.5-VL policy: optional supervised warm start, then GRPO, over a device mesh.

    python -m metaphorstar_jax.train                                   # tiny CPU default
    python -m metaphorstar_jax.train --config=configs/tfq_grpo_7b.py \
        --config.model.hf_path=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.train=/data/TFQ-Data

A run is a list of stages (e.g. a supervised warm start, then GRPO), each starting from the
weights the previous one left. What one GRPO step does is `training/grpo.py`; an SFT step is
`training/sft.py`. This file builds the run, then loops: batch, step, metrics, evaluation,
checkpoint, export. Interrupted runs resume from the last checkpoint in the workdir, exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

import ml_collections
from absl import app, flags, logging
from flax import nnx

from metaphorstar_jax import config_files, planning
from metaphorstar_jax import sharding as sharding_lib
from metaphorstar_jax.data.pipeline import PromptStream
from metaphorstar_jax.training import (builders, checkpoints, evaluation, grpo, hf_export,
                                       memory_budget, preemption, sft, terminal, validation)
from metaphorstar_jax.training import learner as learner_lib, metrics as metrics_lib
from metaphorstar_jax.training import workdir as workdir_lib
from metaphorstar_jax.training.objective import draw_size
from metaphorstar_jax.training.state import (RunState, check_updates, checkpoint_arrays,
                                             resume_run, save_run)

DEFAULT_CONFIG = config_files.path(config_files.DEFAULT)  # shipped with the package
_CONFIG = config_files.define_config_flag("config", DEFAULT_CONFIG, "Training config file.")


def train(config: ml_collections.ConfigDict) -> dict:
  """Runs every stage of `config`; returns the final metrics and evaluation results.

  On SIGTERM or SIGINT the step in progress finishes and is saved, and train returns early with
  results["stopped"] (the signal, the step, the exit code main uses); see training/preemption.py.
  """
  validation.check_config(config)  # before any weight is read or program compiled
  os.makedirs(config.workdir, exist_ok=True)
  # Whatever ends the run, the lock is released, the signal handlers restored, the last save
  # waited for and Orbax's threads closed: cleanup's callbacks run in reverse order.
  with contextlib.ExitStack() as cleanup:
    cleanup.enter_context(workdir_lib.WorkdirLock(config.workdir))  # one writer per workdir
    stop = cleanup.enter_context(preemption.StopRequest())
    return _train(config, stop, cleanup)


def _train(config, stop: preemption.StopRequest, cleanup: contextlib.ExitStack) -> dict:
  workdir = config.workdir
  workdir_lib.prepare_fresh_workdir(config)
  mesh = sharding_lib.make_mesh(**config.mesh.to_dict())
  if config.plan.check_fit:  # compile every program before any weight is read; refuse a misfit
    planning.check_fit(config, mesh)

  # --- data, checkpoints and the step to resume: a changed config is refused before the model --
  processor = builders.build_processor(config)
  task, train_records, eval_records = builders.load_data(config)
  run_record = workdir_lib.run_record(config, {"train_records": len(train_records),
                                               "eval_records": len(eval_records)})
  ckpt = cleanup.enter_context(checkpoints.Checkpointer.for_run(config))
  resume = workdir_lib.find_resumption(config, ckpt, run_record)
  workdir_lib.write_run_config(config)  # once the config is accepted

  # --- build: policy, evaluation, metrics ------------------------------------------------------
  model = builders.build_model(config, mesh)
  builders.check_vocabulary(model, processor)
  # run.params own the weights from here. Every update donates them, deleting the arrays `model`
  # shares with them, so the samplers keep no weights: each call passes run.params.
  graphdef, params = nnx.split(model)
  evaluate = evaluation.trainer_evaluation(config, model, mesh, task, eval_records, processor)
  # The history keeps the rows up to the restored step (none when nothing is restored).
  writer = metrics_lib.MetricsWriter.for_run(config, resume_step=resume.step if resume else 0)
  cleanup.callback(writer.close)
  run = RunState(params=params, opt_state=None, ref_params=None, global_step=0, stage_index=0,
                 stage_step=0)
  results: dict[str, Any] = {"evaluations": [], "exports": []}

  def run_eval(tag: str) -> dict | None:
    """The evaluation's metrics; None when a signal stopped it (between two batches)."""
    try:
      found = evaluate(run.params, lambda: stop.agreed(run.global_step, ckpt, after_step=False))
    except evaluation.EvaluationStopped as e:
      logging.warning("%s (%s, step %d): a stop was asked for.", e, tag, run.global_step)
      return None
    logging.info("Evaluation (%s, step %d): %s", tag, run.global_step,
                 json.dumps({k: round(v, 4) for k, v in found.items()}))
    writer.write(run.global_step, {f"eval/{k}": v for k, v in found.items()})
    results["evaluations"].append({"tag": tag, "step": run.global_step, **found})
    return found

  def export_now() -> None:  # config.export: an HF checkpoint at workdir/hf/step_N
    out = hf_export.step_dir(workdir, run.global_step)
    if out not in results["exports"]:  # at_end right after `every` wrote this step
      hf_export.export_params(run.params, model.config, out, config, processor,
                              dtype=config.export.dtype or None, replace=True)
      results["exports"].append(out)

  # --- the stages ------------------------------------------------------------------------------
  stage_index = resume.meta["stage_index"] if resume else 0
  stopped = False  # by a signal: the run saves the step it is at and returns
  while stage_index < len(config.stages) and not stopped:
    stage = config.stages[stage_index]
    run.global_step = sum(s.steps for s in config.stages[:stage_index])
    learner = learner_lib.build_learner(config, stage, model, graphdef, run.params, task,
                                        processor, mesh,
                                        memory_per_chip=memory_budget.chip_memory(mesh))
    learner_lib.start_stage(run, learner, stage_index)
    stream = PromptStream(sft.stage_records(config, stage, task, train_records), processor,
                          task.build_conversation,
                          batch_size=draw_size(learner.config, stage, learner.objective),
                          seed=config.seed + stage_index, shuffle=task.shuffle,
                          max_prompt_tokens=config.data.max_prompt_tokens,
                          num_workers=config.data.num_workers)
    save = lambda: save_run(ckpt, run, stream.get_state(), stage.name, run_record)
    if resume and resume.meta["stage_index"] == stage_index:
      found = resume.restore(checkpoint_arrays(run), stage_index)  # or an older step's
      if found is None:  # the newest step that restores is in an earlier stage
        stage_index = resume.meta["stage_index"]
        continue
      resume_run(run, found, stream)  # and say so
      writer.rewind(run.global_step)  # when an older step restored than the one first tried
      resume = None
    elif stage.kind == "grpo":
      previous = f"after {config.stages[stage_index - 1].name}" if stage_index else None
      results[f"before {stage.name}"] = (results[previous] if previous in results
                                         else run_eval(f"before {stage.name}"))

    while run.stage_step < stage.steps:
      # --- a signal during setup or an evaluation stops the run before another step ------------
      if stop.agreed(run.global_step, ckpt, after_step=False):
        stopped = True
        if config.checkpoint.every and run.global_step and \
            ckpt.latest_step() != run.global_step:  # evaluated off the checkpoint cadence
          save()
        break
      # --- one step ----------------------------------------------------------------------------
      ckpt.check()  # a background save that failed stops the run here, naming its step
      batch = stream.next_batch()
      preemption.signal_mid_step(config.debug, run.global_step + 1)
      step_metrics = (sft.step(learner, run, batch) if stage.kind == "sft" else
                      grpo.step(learner, run, batch, next_batch=stream.next_batch))
      run.stage_step += 1
      run.global_step += 1
      step_metrics["data/skipped"] = sum(stream.skipped.values())
      step_metrics["stage"] = stage_index
      if run.global_step % max(1, config.log.every) == 0:
        results["last"] = writer.write(run.global_step, step_metrics)
      check_updates(run, config.optim.max_consecutive_nonfinite, ckpt)

      # --- checkpoint (or stop, when asked to), evaluation, export ------------------------------
      stage_done = run.stage_step == stage.steps
      stopped = stop.agreed(run.global_step, ckpt)
      if config.checkpoint.every and (run.stage_step % config.checkpoint.every == 0
                                      or stage_done or stopped):
        save()  # before evaluating: a pre-emption during the evaluation loses no step
        preemption.kill_after_checkpoint(config.debug, run.global_step, ckpt)
      if stopped:
        break
      if config.eval.every and run.stage_step % config.eval.every == 0 and not stage_done:
        run_eval(f"{stage.name} step {run.stage_step}")  # a stop is taken at the loop's top
      if config.export.every and (run.stage_step % config.export.every == 0 or stage_done):
        export_now()
    if stopped:
      break
    if stage_index + 1 < len(config.stages) and config.checkpoint.every:
      ckpt.wait()
    results[f"after {stage.name}"] = run_eval(f"after {stage.name}")
    stopped = results[f"after {stage.name}"] is None  # a stop during it; the stage end is saved
    stage_index += 1

  # --- the end ---------------------------------------------------------------------------------
  results["final_params"] = run.params
  if stopped:
    results["stopped"] = preemption.stopped_run(stop.signum, run.global_step, ckpt)
    return results
  if config.export.at_end:
    export_now()
  ckpt.close()
  writer.close()
  if config.log.plot:
    results["plot"] = metrics_lib.plot_history(metrics_lib.read_history(writer.history_path),
                                               os.path.join(workdir, "curves.png"))
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  config_files.merge_dict_overrides(config, flags.FLAGS["config"], sys.argv, DEFAULT_CONFIG)
  terminal.quiet_library_logs(config.log.verbose)
  sharding_lib.initialize_distributed(**config.distributed.to_dict())
  start = time.perf_counter()
  try:
    results = train(config)
  except KeyboardInterrupt:  # Ctrl-C before train() took the signal over
    logging.warning("Interrupted before training began; nothing to save.")
    sys.exit(preemption.exit_code(signal.SIGINT))
  summary = {k: v for k, v in results.items() if k not in ("final_params", "evaluations")}
  summary["wall_seconds"] = round(time.perf_counter() - start, 1)
  print(json.dumps(summary, indent=2, default=str))
  if "stopped" in results:  # by a signal, saved: not finished, so not rc 0
    sys.exit(results["stopped"]["exit_code"])


if __name__ == "__main__":
  app.run(main)
