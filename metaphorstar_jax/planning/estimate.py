"""The plan: every program of a config's stages compiled for a target, the peak bytes per chip
at any moment of a step, a roofline estimate of the step time and actor MFU, and the fit check
`train` runs before it reads weights (`config.plan.check_fit`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from metaphorstar_jax import sharding as sharding_lib
from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.planning.abstract import Layout, model_config, with_shardings
from metaphorstar_jax.training.memory_budget import bytes_on, outside_bytes
from metaphorstar_jax.planning.programs import Program, compile_program, stage_programs
from metaphorstar_jax.planning.report import DoesNotFit, markdown, suggestions
from metaphorstar_jax.planning.targets import Chip, Target, local_target


def make_plan(config, target: Target, only: Sequence[str] = (),
              stop_at_misfit: bool = False) -> dict:
  """Compiles every program of `config`'s stages for `target`; returns the plan (JSON-able).

  `only` (names such as 'prefill', 'grpo_grads') compiles just those programs and what they
  need (decode needs prefill; accumulate and apply need the gradient); the plan is then partial.
  With `stop_at_misfit` it stops after the first program that cannot fit (train's check).
  """
  wanted = set(only)
  if wanted & {"decode", "decode (branches)"}:
    wanted |= {"prefill", "prefill (branches)"}
  if wanted & {"accumulate", "apply"}:
    wanted |= {"grpo_grads", "sft_grads"}
  mesh = sharding_lib.make_mesh(**config.mesh.to_dict(), devices=target.devices)
  device = mesh.devices.flat[0]
  layout = Layout(mesh)
  model = qwen2_5_vl.abstract_model(model_config(config))
  abstract = nnx.state(model)
  params = with_shardings(abstract, sharding_lib.parameter_shardings(abstract, mesh))
  parameter_count = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  stages = []
  stopped = False
  for stage in config.stages:
    if stopped:
      break
    state: dict[str, Any] = {"params": params}
    # A GPU run has no per-program budget; its TPU stand-in is compiled without one too.
    programs = stage_programs(config, stage, model, params, layout, state,
                              None if target.temporaries_estimated else target.chip.memory_bytes)
    accumulates = any(p.name == "accumulate" for p in programs)
    if wanted:
      programs = [p for p in programs if p.name in wanted]
    for program in programs:
      if callable(program.args):  # needs an earlier program's outputs
        earlier = next((p for p in programs if p.name == "prefill" + program.name[6:]), None)
        if program.name.startswith("decode"):
          program.args = program.args(earlier.outputs)
        else:
          program.args = program.args()
      logging.info("Compiling %s (%s) for %s ...", program.name, stage.name, target.compiled_for)
      compile_program(program, device)
      if program.name.endswith("_grads") and accumulates:
        state["accumulator"] = program.outputs[0]
      if program.name == "prefill":
        state["kv_cache"] = (program.outputs["prompt_cache"], program.outputs["cache"])
      if stop_at_misfit:
        peak = _peak(program, {k: bytes_on(v, device) for k, v in state.items()})
        if peak is None or peak > target.chip.memory_bytes:
          stopped = True
          break
    stages.append((stage, state, programs))
  plan = _summarise(config, target, mesh, device, stages, parameter_count)
  plan["partial"] = sorted(wanted)
  return plan



def _peak(program: Program, sizes: dict) -> float | None:
  """Bytes on a chip while `program` runs: the resident state it does not take as an argument,
  plus its arguments, its outputs that do not reuse a donated argument, and its temporaries."""
  r = program.result
  outside = outside_bytes(program.name, sizes)
  if "temporaries" not in r:
    return (outside + r["program_bytes"]) if r.get("program_bytes") else None
  return outside + r["arguments"] + r["outputs"] - r["aliased"] + r["temporaries"]


def _summarise(config, target: Target, mesh: Mesh, device, stages, parameter_count) -> dict:
  chip = target.chip
  parts = {}  # resident state per chip, the largest over stages
  rows, peak = [], (0.0, None)
  rollout_s = update_s = 0.0
  model_flops = 0.0
  for stage, state, programs in stages:
    sizes = {k: bytes_on(v, device) for k, v in state.items()}
    for k, v in sizes.items():
      parts[k] = max(parts.get(k, 0), v)
    for p in programs:
      if not p.result:  # not compiled: the plan stopped at an earlier misfit
        continue
      r = dict(p.result, peak=_peak(p, sizes))
      if "error" not in r:
        r["seconds_estimate"] = _roofline(chip, r, p, parameter_count, chips=len(target.devices),
                                          weight_bytes=_weight_bytes(config, mesh,
                                                                     parameter_count))
        if p.phase == "rollout":
          rollout_s += r["seconds_estimate"] or 0.0
        else:
          update_s += r["seconds_estimate"] or 0.0
      if r["peak"] is not None and r["peak"] > peak[0]:
        peak = (r["peak"], f"{p.name} ({stage.name})")
      rows.append(dict(name=p.name, stage=stage.name, shapes=p.shapes,
                       runs_per_step=p.runs_per_step, budget=p.budget, **r))
      if p.name.endswith("_grads"):  # 6·params·tokens per micro-batch, prompts counted once
        tokens = p.shapes["P"] * p.shapes["T"] + p.shapes["B"] * p.shapes["N"]
        model_flops = max(model_flops, 6.0 * parameter_count * tokens * p.runs_per_step)
  step_s = rollout_s + update_s
  failed = [r for r in rows if r.get("error")]
  fits = not failed and peak[0] <= chip.memory_bytes
  chips = len(target.devices)
  plan = dict(
      config=dict(model=config.model.hf_path or config.model.preset, dtype=config.model.dtype,
                  param_dtype=config.model.param_dtype, remat=bool(config.model.remat),
                  remat_offload=bool(config.model.remat_offload),
                  logit_chunk=int(config.train.logit_chunk),
                  prompts_per_step=int(config.train.prompts_per_step),
                  num_minibatches=int(config.train.num_minibatches),
                  grad_accum_steps=int(config.train.grad_accum_steps),
                  hbm_headroom=float(config.memory.hbm_headroom)),
      topology=target.name, compiled_for=target.compiled_for, chips=chips, chip=chip.name,
      chip_source=chip.source, mesh={k: int(v) for k, v in mesh.shape.items()},
      memory_per_chip=chip.memory_bytes, parameters=parameter_count,
      temporaries_estimated=target.temporaries_estimated,
      state_per_chip=dict(params=parts.get("params", 0), optimizer_state=parts.get("opt_state", 0),
                          reference=parts.get("reference", 0),
                          gradient_accumulator=parts.get("accumulator", 0),
                          kv_cache=parts.get("kv_cache", 0)),
      programs=rows, peak_per_chip=peak[0], peak_program=peak[1], fits=fits,
      headroom=1 - peak[0] / chip.memory_bytes,
      compile_seconds=round(sum(r.get("compile_seconds", 0) for r in rows), 1))
  if chip.peak_flops and not failed:
    plan["estimate"] = dict(
        note="roofline estimate, not a measurement: each program at the slower of its FLOPs "
             "over peak FLOP/s and its bytes over HBM bandwidth (XLA's, or the model's 2 or 6 "
             "FLOPs per parameter and token and weights read per pass where larger: XLA counts "
             "a loop body once), decode steps at full length",
        step_seconds=step_s, rollout_seconds=rollout_s, update_seconds=update_s,
        actor_mfu=(model_flops / chips) / (update_s * chip.peak_flops) if update_s else None)
  if not fits:
    plan["suggestions"] = suggestions(plan)
  return plan


def _weight_bytes(config, mesh: Mesh, parameter_count: int) -> float:
  """Bytes of compute-dtype weights one chip reads per forward pass: all of them once fsdp has
  gathered each layer, a 1/tensor share of them with tensor parallelism."""
  return parameter_count * jnp.dtype(config.model.dtype).itemsize / mesh.shape.get("tensor", 1)


def _model_work(program: Program, parameter_count: int, chips: int,
                weight_bytes: float) -> tuple[float, float]:
  """FLOPs and bytes per chip that one run of `program` cannot do without: 2 FLOPs per parameter
  per token forward (6 with the backward), and for a decode loop the weights read every step.
  XLA's cost analysis counts a loop's body once (the scanned layers, chunk maps, the decode loop),
  so its figures are lower bounds only; the estimate takes the larger of the two."""
  s, name = program.shapes, program.name
  if name.endswith("_grads") or name == "logprobs":
    per_token = 6.0 if name.endswith("_grads") else 2.0
    return per_token * parameter_count * (s["P"] * s["T"] + s["B"] * s["N"]) / chips, 0.0
  if name.startswith("prefill"):
    return 2.0 * parameter_count * s["P"] * s["T"] / chips, weight_bytes
  if name.startswith("decode"):  # per step: one token of each row
    return 2.0 * parameter_count * s["B"] / chips, weight_bytes
  return 0.0, 0.0


def _roofline(chip: Chip, r: dict, program: Program, parameter_count: int, *, chips: int,
              weight_bytes: float) -> float | None:
  """Estimated seconds per step of one program: its per-chip FLOPs and bytes (XLA's, or the
  model's where larger, `_model_work`) against the chip's peaks; a decode loop once per new
  token."""
  if not chip.peak_flops or not chip.memory_bandwidth:
    return None
  flops, nbytes = _model_work(program, parameter_count, chips, weight_bytes)
  once = max(max(r["flops"], flops) / chip.peak_flops,
             max(r["bytes_accessed"], nbytes) / chip.memory_bandwidth)
  trips = program.shapes.get("N", 1) if program.name.startswith("decode") else 1
  return once * trips * program.runs_per_step



def check_fit(config, mesh: Mesh) -> dict:
  """Plans `config` on the mesh's own devices; raises DoesNotFit when a step would not fit."""
  plan = make_plan(config, local_target(mesh), stop_at_misfit=True)
  logging.info("Plan:\n%s", markdown(plan))
  if not plan["fits"]:
    raise DoesNotFit(plan)
  return plan

