"""Peak host memory of `python -m metaphorstar_jax.export` against the checkpoint it reads.

Saves a training checkpoint of a random model ('small' by default) laid out as the trainer lays
it out (params, AdamW state, KL reference copy), then measures in fresh processes, each on one
CPU device: the baseline (imports and the JAX backend, nothing read), the export, and for
comparison restoring the whole step at once (`Checkpointer.restore_saved_arrays`). Prints one
JSON line; sizes in MB (10^6 bytes).

    python bench/export_rss.py [--model small] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np

# Each child prints its own peak resident set size (VmHWM, kB) as its last line; unlike
# ru_maxrss it starts afresh at exec, so the parent's memory does not count.
_PEAK = ("print([l.split()[1] for l in open('/proc/self/status') "
         "if l.startswith('VmHWM:')][0])")
CHILDREN = {
    "baseline": "import jax, metaphorstar_jax.export; jax.devices(); " + _PEAK,
    "export": "import sys; from metaphorstar_jax import export; "
              "export.cli(['export', '--checkpoint=' + sys.argv[1], '--out=' + sys.argv[2]]"
              " + sys.argv[3:]); " + _PEAK,
    "restore_whole_step": "import os, sys; from metaphorstar_jax.training import checkpoints; "
                          "c = checkpoints.Checkpointer(os.path.join(sys.argv[1], 'checkpoints'));"
                          " a = c.restore_saved_arrays(c.latest_step()); " + _PEAK,
}


def save_run(workdir: str, preset: str) -> dict:
  """Writes a one-step training checkpoint and config.json under `workdir`; returns the bytes
  of each part of the checkpoint's arrays."""
  from flax import nnx
  from metaphorstar_jax import config_defaults
  from metaphorstar_jax.models import qwen2_5_vl
  from metaphorstar_jax.training import builders, checkpoints, step as step_lib
  from metaphorstar_jax.training.state import RunState, checkpoint_arrays
  config = config_defaults.base_config()
  config.workdir = workdir
  config.model.preset, config.model.tokenizer = preset, "small"
  model = qwen2_5_vl.init(qwen2_5_vl.preset(preset), seed=0)
  _, params = nnx.split(model)
  stage = config.stages[0]
  tx = builders.stage_optimizer(config, stage, params)
  run = RunState(params=params, opt_state=step_lib.init_optimizer_state(tx, params),
                 ref_params=jax.tree.map(lambda a: a.copy(), params), global_step=1,
                 stage_index=0, stage_step=1)
  arrays = checkpoint_arrays(run)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  ckpt.save(1, arrays, {}, {"stage_index": 0, "stage_step": 1, "global_step": 1})
  ckpt.close()
  nbytes = lambda tree: int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))
  return {name: nbytes(tree) for name, tree in arrays.items()}


def peak_mb(name: str, *args: str) -> float:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  done = subprocess.run([sys.executable, "-c", CHILDREN[name], *args], env=env,
                        capture_output=True, text=True, timeout=900)
  if done.returncode != 0:
    raise RuntimeError(f"{name} failed: {done.stderr[-2000:]}")
  return int(done.stdout.strip().splitlines()[-1]) * 1024 / 1e6


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="small", choices=("tiny", "small"))
  parser.add_argument("--dtype", default=None, help="export --dtype (default: as saved)")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as scratch:
    run_dir = os.path.join(scratch, "run")
    parts = save_run(run_dir, args.model)
    extra = [f"--dtype={args.dtype}"] if args.dtype else []
    out = os.path.join(scratch, "hf")
    peaks = {"baseline": peak_mb("baseline"),
             "export": peak_mb("export", run_dir, out, *extra),
             "restore_whole_step": peak_mb("restore_whole_step", run_dir)}
    exported = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
                   if f.endswith(".safetensors"))
  mb = lambda n: round(n / 1e6, 1)
  print(json.dumps({
      "bench": "export_rss", "model": args.model, "dtype": args.dtype or "as saved",
      "checkpoint_arrays_mb": mb(sum(parts.values())),
      **{f"{name}_mb": mb(size) for name, size in parts.items()},
      "exported_safetensors_mb": mb(exported),
      "peak_rss_baseline_mb": round(peaks["baseline"], 1),
      "peak_rss_export_mb": round(peaks["export"], 1),
      "export_above_baseline_mb": round(peaks["export"] - peaks["baseline"], 1),
      "peak_rss_restore_whole_step_mb": round(peaks["restore_whole_step"], 1),
      "jax_version": jax.__version__,
  }))


if __name__ == "__main__":
  main()
