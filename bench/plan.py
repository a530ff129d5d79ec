"""Will it fit? Headline figures of the ahead-of-time plan (metaphorstar_jax.plan), one JSON line.

For each run `size@topology` (default: TFQ-GRPO 7B on v5p-8, 32B on v5p-32, 72B on v5p-64, at
the published shapes of configs/tfq_grpo_<size>.py; 72B, which MetaphorStar did not train, has
no config file: the shared recipe with one micro-batch of 32 prompts, the rollout prefilled 32
prompts at a time, one per chip of a v5p-64), the plan compiles every program of a step for that
TPU slice on this host and reports the per-chip peak against HBM, the gradient micro-batch's
temporaries, the gradient's compile time and the whole plan's, beside the figures recorded for
the same run at earlier commits (`RECORDED`, the before of the next change). Compiling is slow
on 2 cores: each plan takes 10 to 13 minutes.

    python bench/plan.py
    python bench/plan.py --runs=7b@v5p-8 --only=grpo_grads       # the gradient alone
    python bench/plan.py --runs=small@v5e-4                       # a quick check
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make `bench` and `metaphorstar_jax` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_list("runs", ["7b@v5p-8", "32b@v5p-32", "72b@v5p-64"], "size@topology, one plan each.")
flags.DEFINE_list("only", [], "Compile only these programs (and what they need).")
flags.DEFINE_integer("image_pixels", None,
                     "plan.image_pixels of every run (unset: image.max_pixels).")


def run_config(size: str):
  """configs/tfq_grpo_<size>.py; 72b from the shared recipe, micro-batched for 32 chips; the
  random-weight sizes (tiny, small) from the tiny config at its own shapes."""
  from metaphorstar_jax import config_defaults
  if size == "72b":
    return config_defaults.tfq_grpo("72b", grad_accum_steps=1, prefill_chunk=32)
  name = "tiny" if size in ("tiny", "small") else size
  path = os.path.join(REPO_ROOT, "configs", f"tfq_grpo_{name}.py")
  spec = importlib.util.spec_from_file_location(f"tfq_grpo_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.preset = size
  return config


# Earlier figures of the same runs, printed beside the new ones so a change can be compared
# (README "Will it fit?"; GiB per chip, seconds on this 2-core machine, load as noted there).
RECORDED = {
    "7b@v5p-8": [
        dict(at="issue 10's starting point (unrolled layers, dense attention)", fits=False,
             grad_temporaries_gib=61.2, grad_compile_s=198),
        dict(at="2e3c8ee", fits=True, peak_gib_per_chip=66.2, grad_temporaries_gib=13.18,
             grad_compile_s=451.6, plan_compile_s=763.0),
    ],
    "32b@v5p-32": [dict(at="2e3c8ee", fits=True, peak_gib_per_chip=66.04,
                        grad_temporaries_gib=14.37, grad_compile_s=395.4, plan_compile_s=720.0)],
    "72b@v5p-64": [dict(at="2e3c8ee", fits=True, peak_gib_per_chip=68.99,
                        grad_temporaries_gib=21.61, grad_compile_s=218.1, plan_compile_s=611.3)],
}


def headline(size: str, plan: dict) -> dict:
  """The figures later changes are compared by."""
  grads = next((r for r in plan["programs"] if r["name"] == "grpo_grads"), {})
  gib = lambda n: None if n is None else round(n / 2**30, 2)
  return dict(
      model=size, topology=plan["topology"], chips=plan["chips"], fits=plan["fits"],
      partial=plan["partial"], peak_gib_per_chip=gib(plan["peak_per_chip"]),
      peak_program=plan["peak_program"], hbm_gib_per_chip=gib(plan["memory_per_chip"]),
      grad_temporaries_gib=gib(grads.get("temporaries")),
      grad_compile_s=grads.get("compile_seconds"), plan_compile_s=plan["compile_seconds"],
      failed=[f"{r['name']}: {r['error'][:160]}" for r in plan["programs"] if r.get("error")],
      state_gib_per_chip={k: gib(v) for k, v in plan["state_per_chip"].items()},
      programs={r["name"]: dict(peak_gib=gib(r.get("peak")), temporaries_gib=gib(
          r.get("temporaries")), compile_s=r.get("compile_seconds")) for r in plan["programs"]},
      step_seconds_estimate=plan.get("estimate", {}).get("step_seconds"),
      actor_mfu_estimate=plan.get("estimate", {}).get("actor_mfu"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax

  from metaphorstar_jax import planning

  results, start = [], time.perf_counter()
  for run in FLAGS.runs:
    size, _, topology = run.partition("@")
    if not topology:
      raise app.UsageError(f"--runs entries look like 7b@v5p-8, got {run!r}.")
    planning.use_cpu_devices(topology)
    config = run_config(size)
    config.plan.image_pixels = FLAGS.image_pixels
    logging.info("Planning %s on %s ...", size, topology)
    plan = planning.make_plan(config, planning.resolve_target(topology), only=FLAGS.only)
    logging.info("\n%s", planning.markdown(plan))
    results.append(dict(headline(size, plan), recorded=RECORDED.get(run, [])))
  line = dict(bench="plan", runs=results, wall_s=round(time.perf_counter() - start, 1),
              jax_version=jax.__version__, cpu_count=os.cpu_count(),
              note="compiled on this host for the named TPU slices; compile times depend on "
                   "how busy the host is")
  sys.stdout.write(json.dumps(line) + "\n")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
