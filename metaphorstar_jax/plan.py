"""Will it fit? An ahead-of-time plan of every program a run executes, on a target topology.

    python -m metaphorstar_jax.plan --config=configs/tfq_grpo_7b.py --topology=v5p-8
    python -m metaphorstar_jax.plan --config=configs/tfq_grpo_7b.py --topology=h100:8
    python -m metaphorstar_jax.plan --config=configs/tfq_grpo_tiny.py --topology=cpu:8

Compiles the trainer's own programs at the config's worst-case shapes for the target (no weights
are read, nothing is allocated; a TPU slice compiles on a CPU-only host), prints the plan as
Markdown (resident state per chip, each program's arguments, outputs, temporaries, peak, FLOPs
and compile time, a roofline estimate of the step) and writes it as JSON. A step that does not
fit exits non-zero naming the program, the bytes and settings that would fit.

This file is the command line; the plan is the package `metaphorstar_jax/planning/`.
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import app, flags

from metaphorstar_jax import config_files, planning
from metaphorstar_jax import sharding as sharding_lib

_CONFIG = config_files.define_config_flag("config", config_files.path(config_files.DEFAULT),
                                          "Training config file to plan.")
_TOPOLOGY = flags.DEFINE_string("topology", "", "v5p-8, v4-8, v5e-4, v6e-8, v5p:2x2x4, cpu:8, "
                                "h100:8, ...; empty: this machine's devices.")
_PROGRAMS = flags.DEFINE_list("programs", [], "Compile only these (e.g. grpo_grads,prefill) and "
                              "what they need; default: every program of every stage.")
_OUT = flags.DEFINE_string("out", "", "JSON path; default <workdir>/plan-<topology>.json.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  # As train: a command-line dict merges into the file's, and a misspelt key is a usage error.
  config_files.merge_dict_overrides(config, flags.FLAGS["config"], sys.argv,
                                    config_files.path(config_files.DEFAULT))
  topology = _TOPOLOGY.value
  planning.use_cpu_devices(topology)
  if topology:
    target = planning.resolve_target(topology)
  else:
    target = planning.local_target(sharding_lib.make_mesh(**config.mesh.to_dict()))
  plan = planning.make_plan(config, target, only=_PROGRAMS.value)
  print(planning.markdown(plan))
  label = re.sub(r"[^A-Za-z0-9_.-]", "_", topology or "local")
  path = _OUT.value or os.path.join(config.workdir, f"plan-{label}.json")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(plan, f, indent=2, default=str)
  print(f"\nWrote {path}")
  if not plan["fits"]:
    print(planning.refusal(plan), file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
