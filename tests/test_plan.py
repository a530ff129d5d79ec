"""The ahead-of-time plan: topology names, every field of a TPU plan, refusal of a step that
cannot fit (from the plan and from train), and the plan's exact resident sizes against what a
real run allocates on 8 CPU devices."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from metaphorstar_jax import config_defaults as common
from metaphorstar_jax import planning
from metaphorstar_jax import sharding as sharding_lib
from metaphorstar_jax import train as train_lib
from metaphorstar_jax.training import builders
from metaphorstar_jax.sampling import Sampler, SamplingConfig
from metaphorstar_jax.training import step as step_lib

PROGRAM_FIELDS = {"name", "stage", "shapes", "runs_per_step", "arguments", "outputs", "aliased",
                  "temporaries", "peak", "budget", "flops", "bytes_accessed", "compile_seconds",
                  "seconds_estimate"}


def planned_config(preset: str = "tiny", **mesh):
  """A one-stage GRPO run with a reference copy (the metaphorstar preset's KL loss), two
  mini-batches of two micro-batches, one small image per prompt."""
  config = common.base_config()
  config.model.preset = preset
  config.model.tokenizer = "small"
  config.image.min_pixels = config.image.max_pixels = 56 * 56
  config.data.max_prompt_tokens = 64
  config.rl.group_size = 2
  config.rl.max_new_tokens = 8
  config.train.prompts_per_step = 8
  config.train.num_minibatches = 2
  config.train.grad_accum_steps = 2
  config.mesh.update(mesh)
  config.stages = [common.stage("grpo", kind="grpo", steps=1, learning_rate=1e-3)]
  return config


@pytest.mark.parametrize("name, chips, compiled_for", [
    ("v5p-8", 4, "v5p:2x2x1"), ("v5p-32", 16, "v5p:2x2x4"), ("v5p-64", 32, "v5p:2x4x4"),
    ("v4-8", 4, "v4:2x2x1"), ("v5e-4", 4, "v5e:2x2"), ("v5litepod-8", 8, "v5e:2x4"),
    ("v6e-8", 8, "v6e:2x4"), ("h100:8", 8, "v5p:2x2x2"), ("cpu:8", 8, "cpu:8")])
def test_topologies_by_their_usual_names(name, chips, compiled_for):
  target = planning.resolve_target(name)
  assert len(target.devices) == chips and target.compiled_for == compiled_for
  assert target.temporaries_estimated == name.startswith("h100")


def test_unknown_topology_says_what_is_known():
  with pytest.raises(ValueError, match="v5e, v5p"):
    planning.resolve_target("v9x-8")


@pytest.mark.slow
def test_small_plan_on_v5e_4_has_every_field():
  config = planned_config("small")
  config.model.dtype = "bfloat16"
  config.model.remat = True
  plan = planning.make_plan(config, planning.resolve_target("v5e-4"))
  assert plan["fits"] and plan["chips"] == 4 and plan["mesh"] == {"data": 1, "fsdp": 4,
                                                                  "tensor": 1}
  assert {r["name"] for r in plan["programs"]} == {"prefill", "decode", "logprobs", "grpo_grads",
                                                   "accumulate", "apply"}
  for row in plan["programs"]:
    assert PROGRAM_FIELDS <= set(row), (row["name"], PROGRAM_FIELDS - set(row))
    assert 0 < row["peak"] <= 0.8 * plan["memory_per_chip"] and row["budget"] > 0
    assert row["flops"] > 0 and row["bytes_accessed"] > 0 and row["seconds_estimate"] > 0
    assert row["peak"] > row["arguments"] > 0
  state = plan["state_per_chip"]
  assert state["optimizer_state"] > state["params"] == state["reference"] > 0
  assert state["gradient_accumulator"] > 0 and state["kv_cache"] > 0
  assert 0 < plan["estimate"]["actor_mfu"] < 1 and plan["estimate"]["step_seconds"] > 0
  assert plan["peak_per_chip"] == max(r["peak"] for r in plan["programs"])
  table = planning.markdown(plan)
  assert "| grpo_grads | grpo |" in table and "fits" in table


def test_each_program_is_compiled_within_its_budget():
  # The budget reaches the compiler: told half of what the gradient used, it must refuse (naming
  # the budget) or fit in it; the bytes left outside are the Adam moments, reference, accumulator.
  config = planned_config("tiny")
  target = planning.resolve_target("v5e-4")
  memory = target.chip.memory_bytes
  plan = planning.make_plan(config, target, only=("grpo_grads",))
  grads, = plan["programs"]
  state = plan["state_per_chip"]
  outside = state["optimizer_state"] + state["reference"] + state["gradient_accumulator"]
  assert grads["budget"] == int(memory * (1 - config.memory.hbm_headroom) - outside)
  used = grads["arguments"] + grads["outputs"] - grads["aliased"] + grads["temporaries"]
  assert "error" not in grads and used <= grads["budget"]
  config.memory.hbm_headroom = 1 - (outside + used / 2) / memory
  tight = planning.make_plan(config, target, only=("grpo_grads",))
  squeezed, = tight["programs"]
  assert abs(squeezed["budget"] - used / 2) <= 1
  if "error" in squeezed:
    # libtpu names the budget as "... of 6.00M hbm" or "exceeds available HBM (6.00M)".
    budget_m = f"{squeezed['budget'] // 2**20:.2f}M"
    assert (f"of {budget_m} hbm" in squeezed["error"]
            or f"available HBM ({budget_m})" in squeezed["error"]), squeezed["error"]
    assert "--config.memory.hbm_headroom=" in planning.refusal(tight)
  else:  # rematerialised to fit
    assert (squeezed["arguments"] + squeezed["outputs"] - squeezed["aliased"] +
            squeezed["temporaries"]) <= squeezed["budget"] < used


def oversized_config():
  """The tiny model with 8,192 rows of 4,096 completion tokens per micro-batch and unchunked
  logits: those alone are 32 GiB of fp32 per device on 8 devices."""
  config = planned_config("tiny")
  config.train.prompts_per_step = 2048
  config.rl.group_size = 16
  config.rl.max_new_tokens = 4096
  config.train.logit_chunk = 0
  return config


def test_oversized_step_is_refused_with_the_numbers():
  plan = planning.make_plan(oversized_config(), planning.resolve_target("cpu:8"),
                            only=("grpo_grads",))
  assert not plan["fits"] and plan["peak_program"] == "grpo_grads (grpo)"
  grads = next(r for r in plan["programs"] if r["name"] == "grpo_grads")
  assert grads["temporaries"] > 32 * 2**30
  message = planning.refusal(plan)
  assert f"grpo_grads (grpo) needs {grads['peak'] / 2**30:.2f} GiB per chip" in message
  assert "--config.train.grad_accum_steps=" in message
  assert "--config.model.remat=True" in message
  assert "--config.train.logit_chunk=256" in message
  assert "bf16 reference copy" in message


def test_a_program_the_tpu_compiler_refuses_is_reported_with_its_sizes():
  config = planned_config("tiny")
  config.plan.images_per_prompt = 0
  config.data.max_prompt_tokens = 16384
  config.train.prompts_per_step = 4096
  plan = planning.make_plan(config, planning.resolve_target("v5e-4"), only=("prefill",))
  prefill, = plan["programs"]
  assert "RESOURCE_EXHAUSTED" in prefill["error"] and not plan["fits"]
  assert prefill["temporaries"] > 16 * 2**30 and prefill["arguments"] > 0
  assert prefill["peak"] == plan["peak_per_chip"] > prefill["temporaries"]
  assert "prefill (grpo) needs" in planning.refusal(plan)


def test_train_refuses_before_loading_weights(monkeypatch, tmp_path):
  # 4,096 text prompts of 16,384 tokens in one generation batch: the prefill's attention
  # scores alone are terabytes per device, far beyond any host; train's check stops there.
  config = planned_config("tiny")
  config.workdir = str(tmp_path)
  config.plan.check_fit = True
  config.plan.images_per_prompt = 0
  config.data.max_prompt_tokens = 16384
  config.train.prompts_per_step = 4096
  monkeypatch.setattr(builders, "build_model",
                      lambda *a: pytest.fail("train built the model before the fit check"))
  with pytest.raises(planning.DoesNotFit, match=r"prefill \(grpo\) needs [\d.]+ GiB per chip"):
    train_lib.train(config)


def bytes_on_device(tree, device) -> int:
  """What real arrays occupy on `device`: the bytes of their shards there."""
  return sum(shard.data.nbytes for x in jax.tree.leaves(tree) for shard in x.addressable_shards
             if shard.device == device)


@pytest.mark.slow
def test_exact_parts_equal_a_real_run_on_8_cpu_devices():
  config = planned_config("tiny", fsdp=4, tensor=2)
  plan = planning.make_plan(config, planning.resolve_target("cpu:8"), only=("prefill",))
  state = plan["state_per_chip"]

  # What train allocates: the sharded model, the optimizer state, the reference copy, and the
  # KV cache the sampler's prefill returns for a batch of the planned shapes.
  mesh = sharding_lib.make_mesh(**config.mesh.to_dict())
  device = mesh.devices.flat[0]
  model = builders.build_model(config, mesh)
  params = nnx.state(model)
  tx = builders.stage_optimizer(config, config.stages[0], params)
  opt_state = step_lib.init_optimizer_state(tx, params)
  reference = jax.tree.map(lambda a: jax.device_put(a.copy(), a.sharding), params)
  shapes = next(r for r in plan["programs"] if r["name"] == "prefill")["shapes"]
  P, T, S, I = shapes["P"], shapes["T"], shapes["S"], shapes["I"]
  sampler = Sampler(model, SamplingConfig(max_new_tokens=shapes["N"]), mesh=mesh)
  grids = np.zeros((I, 3), np.int32)
  grids[0] = (1, 2, S // 2)
  ids = np.full((P, T), sampler.pad_id, np.int32)
  prefilled = sampler.programs()["prefill"](
      params, sharding_lib.place_rows(ids, mesh), sharding_lib.place_rows(np.ones_like(ids), mesh),
      np.zeros((S, model.config.vision.patch_dim), np.float32), grids,
      group_size=shapes["G"], new_tokens=shapes["N"])
  kv_cache = (prefilled["prompt_cache"], prefilled["cache"])

  assert state["params"] == bytes_on_device(params, device)
  assert state["optimizer_state"] == bytes_on_device(opt_state, device)
  assert state["reference"] == bytes_on_device(reference, device)
  assert state["kv_cache"] == bytes_on_device(kv_cache, device)
  # Sharding matters: one device holds much less than the whole.
  whole = sum(x.nbytes for x in jax.tree.leaves(params))
  assert state["params"] < whole / 2
  assert math.prod(mesh.devices.shape) == 8


@pytest.mark.slow
def test_bench_prints_one_json_line_of_headline_figures():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the benchmark asks for its own cpu:8 devices
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "bench/plan.py", "--runs=tiny@cpu:8",
                           "--only=grpo_grads"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1, lines
  run, = json.loads(lines[0])["runs"]
  assert run["model"] == "tiny" and run["chips"] == 8 and run["partial"] == ["grpo_grads"]
  assert run["grad_temporaries_gib"] >= 0 and run["grad_compile_s"] > 0
  assert run["peak_gib_per_chip"] > 0 and run["peak_program"] == "grpo_grads (grpo)"
  assert run["recorded"] == []  # earlier figures are kept for the headline runs only


def test_the_command_line_takes_a_config():
  """Once train stopped being imported by plan, `python -m metaphorstar_jax.plan --config=...`
  failed with "Unknown command line flag 'config'"."""
  import subprocess
  import sys
  done = subprocess.run([sys.executable, "-m", "metaphorstar_jax.plan", "--helpfull"],
                        capture_output=True, text=True, timeout=300)  # absl's help exits 1
  flag_lines = [line.split(":")[0].strip() for line in done.stdout.splitlines()]
  assert "--config" in flag_lines and "--topology" in flag_lines, done.stderr[-2000:]
