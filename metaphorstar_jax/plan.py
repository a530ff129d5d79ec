"""Will it fit? An ahead-of-time plan of every program a run executes, on a target topology.

    python -m metaphorstar_jax.plan --config=configs/tfq_grpo_7b.py --topology=v5p-8
    python -m metaphorstar_jax.plan --config=configs/tfq_grpo_7b.py --topology=h100:8
    python -m metaphorstar_jax.plan --config=configs/tfq_grpo_tiny.py --topology=cpu:8

Everything is abstract: parameters are ShapeDtypeStructs from the preset or from
`model.hf_path`'s config.json (no weights are read, nothing is allocated), laid out by the
trainer's mesh and `sharding.PARAMETER_RULES`. The trainer's own jitted functions (the
sampler's prefill and decode loop, TrainSteps' log-probs, gradients, accumulation and update)
are lowered at the config's worst-case shapes and compiled by XLA for the target: a TPU slice
through libtpu's compile-only topology (this works on a CPU-only host), or `cpu:N` fake devices.
A GPU target (`h100:8`) gives exact sizes for the sharded arrays and caches; its temporaries
come from the same programs compiled for a TPU v5p slice with the same mesh, and are labelled
as estimated.

Per chip the plan reports the resident state (parameters, optimizer state, reference copy,
gradient accumulator, KV cache), each program's arguments, outputs and temporaries, the peak
at any moment of a step against the chip's memory, XLA's FLOPs and bytes for each program, its
compile time, and a roofline estimate of the step time and actor MFU. A step that does not fit
exits non-zero naming the program, the bytes and settings that would fit; `train` runs the
same check before it loads weights when `config.plan.check_fit` is set.

Shapes are the worst a run can meet: every prompt `data.max_prompt_tokens` long carrying
`plan.images_per_prompt` square images of `plan.image_pixels` (0: `image.max_pixels`), every
completion `rl.max_new_tokens` long, padded to the sampler's buckets as a run pads them.

Shape letters: P prompts, G group size, B = P·G rows, T prompt tokens, N completion tokens,
S patches, I images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import config_flags

from metaphorstar_jax import config_files, data
from metaphorstar_jax import sharding as sharding_lib
from metaphorstar_jax.data.image_processor import num_image_tokens
from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.training import batching, learner as learner_lib, objective as objective_lib
from metaphorstar_jax.training import step as step_lib
from metaphorstar_jax.training.policy import SequenceBatch

GiB = 1024**3


# --- chips and topologies -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures: dense bf16 FLOP/s, memory bytes, memory bandwidth (bytes/s)."""

  name: str
  peak_flops: float | None
  memory_bytes: float
  memory_bandwidth: float | None
  source: str


# Vendor spec sheets (per chip; TPU v4 and v5p counted as one megacore device per chip).
CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32 * GiB, 1228e9, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 197e12, 16 * GiB, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 459e12, 95 * GiB, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 918e12, 32 * GiB, 1640e9, "https://cloud.google.com/tpu/docs/v6e"),
    "a100": Chip("NVIDIA A100 80GB SXM", 312e12, 80e9, 2039e9,
                 "https://www.nvidia.com/en-us/data-center/a100/ (datasheet)"),
    "h100": Chip("NVIDIA H100 SXM", 989e12, 80e9, 3350e9,
                 "https://www.nvidia.com/en-us/data-center/h100/ (datasheet)"),
    "h200": Chip("NVIDIA H200 SXM", 989e12, 141e9, 4800e9,
                 "https://www.nvidia.com/en-us/data-center/h200/ (datasheet)"),
}
# Slice names count TensorCores for these (two per chip), chips for the others.
_CORES_PER_CHIP = {"v4": 2, "v5p": 2}
_SLICE_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}
# GPU plans take their temporaries from this TPU generation's compiler, at the same mesh.
GPU_PROXY = "v5p"


@dataclasses.dataclass
class Target:
  """Devices to compile for, the chip they stand for, and how exact the figures are."""

  name: str
  chip: Chip
  devices: list
  compiled_for: str
  temporaries_estimated: bool = False


def _torus(chips: int, dims: int) -> list[int]:
  """The usual slice shape of `chips` chips: 2x2(x1) doubled one axis at a time (the smallest,
  the last of equals), e.g. 16 chips -> 2x2x4, 32 -> 2x4x4; 2-D: 8 -> 2x4, 32 -> 4x8."""
  if chips < 4 or chips & (chips - 1):
    raise ValueError(f"A slice of {chips} chips has no standard shape here; give a power of two "
                     "of at least 4 chips, or the shape itself (e.g. --topology=v5p:2x2x4).")
  shape = [2, 2] + [1] * (dims - 2)
  while math.prod(shape) < chips:
    smallest = min(shape)
    shape[max(i for i, s in enumerate(shape) if s == smallest)] *= 2
  return shape


def _tpu_devices(generation: str, shape: list[int]) -> tuple[list, str]:
  """Compile-only TPU devices of a slice (libtpu from PyPI; no TPU needed)."""
  # Must be set before libtpu initialises: no metadata server here, and other processes on this
  # host may hold libtpu too.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  name = f"{generation}:{'x'.join(map(str, shape))}"
  options = {"chip_config_name": "megacore"} if generation in _CORES_PER_CHIP else {}
  try:
    topology = topologies.get_topology_desc(platform="tpu", topology_name=name, **options)
  except Exception as e:  # libtpu missing or the shape unknown to it
    raise ValueError(f"Could not describe TPU topology {name}: {e}. TPU plans need libtpu "
                     "(pip install -e '.[test]' installs it).") from e
  return list(topology.devices), name


def resolve_target(topology: str) -> Target:
  """A target by its usual name: 'v5p-8', 'v4-8', 'v5e-4' / 'v5litepod-4', 'v6e-8', a shape
  such as 'v5p:2x2x4', 'cpu:8' (fake CPU devices), or a GPU node 'h100:8' / 'a100:8' /
  'h200:8'."""
  name = topology.strip().lower()
  if name.startswith("cpu:"):
    count = int(name.split(":", 1)[1])
    devices = jax.devices("cpu")
    if len(devices) < count:
      raise ValueError(f"--topology={topology} needs {count} CPU devices but this process has "
                       f"{len(devices)}; set XLA_FLAGS=--xla_force_host_platform_device_count="
                       f"{count} before JAX starts.")
    return Target(topology, cpu_chip(count), devices[:count], name)
  gpu = re.fullmatch(r"(a100|h100|h200):(\d+)", name)
  if gpu:
    count = int(gpu.group(2))
    devices, compiled_for = _tpu_devices(GPU_PROXY, _torus(count, 3))
    return Target(topology, CHIPS[gpu.group(1)], devices, compiled_for,
                  temporaries_estimated=True)
  shaped = re.fullmatch(r"(v\w+):(\d+(?:x\d+)*)", name)
  sliced = re.fullmatch(r"(v\w+?)-(\d+)", name)
  if not shaped and not sliced:
    raise ValueError(f"Unknown topology {topology!r}: use e.g. v5p-8, v4-8, v5e-4, v6e-8, "
                     "v5p:2x2x4, cpu:8 or h100:8.")
  generation = (shaped or sliced).group(1)
  generation = _SLICE_ALIASES.get(generation, generation)
  if generation not in CHIPS:
    raise ValueError(f"Unknown TPU generation {generation!r} in {topology!r}; known: "
                     f"{', '.join(sorted(k for k in CHIPS if k.startswith('v')))}.")
  if shaped:
    shape = [int(s) for s in shaped.group(2).split("x")]
  else:
    cores = _CORES_PER_CHIP.get(generation, 1)
    shape = _torus(int(sliced.group(2)) // cores, 3 if generation in _CORES_PER_CHIP else 2)
  devices, compiled_for = _tpu_devices(generation, shape)
  return Target(topology, CHIPS[generation], devices, compiled_for)


def cpu_chip(count: int) -> Chip:
  """Fake CPU devices share the host's memory; there is no meaningful peak to roofline against."""
  memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return Chip(f"CPU ({count} fake devices sharing host memory)", None, memory / count, None,
              "os.sysconf")


def local_target(mesh: Mesh) -> Target:
  """The devices a run actually has (for `train`'s check), with their reported memory limit."""
  devices = list(mesh.devices.flat)
  kind = devices[0].device_kind.lower()
  if devices[0].platform == "cpu":
    return Target("local", cpu_chip(len(devices)), devices, f"cpu:{len(devices)}")
  known = {"tpu v4": "v4", "tpu v5 lite": "v5e", "tpu v5": "v5p", "tpu v6 lite": "v6e",
           "a100": "a100", "h100": "h100", "h200": "h200"}
  match = next((CHIPS[v] for k, v in known.items() if k in kind), None)
  limit = (devices[0].memory_stats() or {}).get("bytes_limit")
  if match is None:
    match = Chip(devices[0].device_kind, None, float(limit or 0), None, "device.memory_stats")
  if limit:
    match = dataclasses.replace(match, memory_bytes=float(limit))
  return Target("local", match, devices, f"{devices[0].platform}:{len(devices)}")


# --- abstract state -----------------------------------------------------------------------------

def model_config(config) -> qwen2_5_vl.Qwen2_5_VLConfig:
  """The policy's architecture: `model.hf_path`'s config.json, or the preset; no weights read."""
  m = config.model
  runtime = dict(dtype=jnp.dtype(m.dtype).name, param_dtype=jnp.dtype(m.param_dtype).name,
                 remat=bool(m.remat))
  if m.hf_path:
    return qwen2_5_vl.from_json_file(m.hf_path, **runtime)
  return qwen2_5_vl.preset(m.preset, **runtime)


def with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree`'s shapes and dtypes carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s,
                                                        weak_type=getattr(x, "weak_type", False)),
                      tree, shardings)


def bytes_on(tree, device) -> int:
  """Bytes of the arrays of `tree` (ShapeDtypeStructs or arrays with shardings) on `device`."""
  total = 0
  for x in jax.tree.leaves(tree):
    index = x.sharding.devices_indices_map(tuple(x.shape)).get(device)
    if index is None:
      continue
    shard = [len(range(*s.indices(d))) for s, d in zip(index, x.shape)]
    total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
  return total


@dataclasses.dataclass(frozen=True)
class ImageShape:
  """The images of one worst-case prompt."""

  patches: int  # S per prompt
  images: int  # I per prompt
  tokens: int  # image placeholder tokens per prompt
  grid: tuple[int, int, int]


def prompt_images(config, vision) -> ImageShape:
  """`plan.images_per_prompt` square images of `plan.image_pixels` (0: image.max_pixels), as the
  image processor resizes them."""
  count = int(config.plan.images_per_prompt)
  if count == 0:
    return ImageShape(0, 0, 0, (0, 0, 0))
  pixels = int(config.plan.image_pixels) or int(config.image.max_pixels)
  processor = data.ImageProcessor(min_pixels=config.image.min_pixels,
                                  max_pixels=config.image.max_pixels,
                                  patch_size=vision.patch_size,
                                  merge_size=vision.spatial_merge_size)
  side = math.isqrt(pixels)
  grid = processor.grid_thw(side, side)
  tokens = num_image_tokens(grid, vision.spatial_merge_size) * count
  if tokens > config.data.max_prompt_tokens:
    raise ValueError(f"{count} image(s) of {side}x{side} pixels make {tokens} prompt tokens, more "
                     f"than data.max_prompt_tokens={config.data.max_prompt_tokens}; such prompts "
                     "are skipped, so plan smaller ones (--config.plan.image_pixels).")
  return ImageShape(math.prod(grid) * count, count, tokens, tuple(grid))


# --- programs -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Program:
  """One jitted function at one set of shapes, and how it sits in a step."""

  name: str
  stage: str
  fn: Any  # a jax.jit object
  args: tuple
  kwargs: dict
  shapes: dict
  runs_per_step: int
  # Resident state that is also an argument of this program (not to be counted twice), and
  # state resident only while this program runs (the gradient accumulator of later micro-batches).
  resident_args: tuple[str, ...] = ()
  extra_resident: tuple[str, ...] = ()
  phase: str = "update"  # 'rollout' or 'update' (for the roofline's actor MFU)
  result: dict = dataclasses.field(default_factory=dict)
  outputs: Any = None
  # The outputs' layout when the program does not compile (its shapes are known from lowering).
  assumed_outputs: Any = None


class _Layout:
  """Builds ShapeDtypeStructs placed as the trainer places them on `mesh`."""

  def __init__(self, mesh: Mesh):
    self.mesh = mesh
    self.replicated = NamedSharding(mesh, PartitionSpec())

  def rows(self, shape, dtype, weak_type=False):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_lib.row_sharding(shape, self.mesh),
                                weak_type=weak_type)

  def whole(self, shape, dtype, weak_type=False):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=self.replicated, weak_type=weak_type)


def _from_message(pattern: str, message: str) -> float | None:
  """Bytes from a compiler message such as '... HLO temporaries (342.61G) ...'."""
  found = re.search(pattern + r"\(?([\d.]+)([KMGT]?)\)?", message)
  scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
  return float(found.group(1)) * scale[found.group(2)] if found else None


def _compile(program: Program, device) -> None:
  """Lowers and compiles `program`, recording memory, cost and compile time."""
  start = time.perf_counter()
  lowered = program.fn.lower(*program.args, **program.kwargs)
  try:
    compiled = lowered.compile()
  except Exception as e:  # the compiler refuses programs that overflow the chip's memory
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message:
      raise
    program.result = dict(error=message.strip().splitlines()[0][:500], compile_seconds=round(
        time.perf_counter() - start, 1))
    # Later programs take these outputs as inputs: lay them out as the trainer constrains them.
    if program.assumed_outputs is not None:
      program.outputs = program.assumed_outputs(lowered.out_info)
    # The sizes the compiler names in its refusal, and the exact arguments and outputs.
    temporaries = _from_message(r"HLO temporaries ", message)
    used = _from_message(r"Used ", message)
    if temporaries is not None and program.outputs is not None:
      program.result.update(arguments=bytes_on(program.args, device),
                            outputs=bytes_on(program.outputs, device), aliased=0,
                            temporaries=int(temporaries))
    elif used is not None:
      program.result["program_bytes"] = used
    return
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  program.outputs = with_shardings(lowered.out_info, compiled.output_shardings)
  program.result = dict(
      arguments=int(memory.argument_size_in_bytes), outputs=int(memory.output_size_in_bytes),
      aliased=int(memory.alias_size_in_bytes), temporaries=int(memory.temp_size_in_bytes),
      code=int(memory.generated_code_size_in_bytes),
      flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      compile_seconds=round(seconds, 1))


def _seq_batch(layout: _Layout, P: int, T: int, B: int, N: int, S: int, I: int,
               patch_dim: int) -> SequenceBatch:
  pixels = layout.whole((S, patch_dim), jnp.float32) if S else None
  grids = layout.whole((I, 3), jnp.int32) if S else None
  return SequenceBatch(layout.rows((P, T), jnp.int32), layout.rows((P, T), jnp.int32), pixels,
                       grids, layout.rows((B, N), jnp.int32), layout.rows((B, N), jnp.int32))


def stage_programs(config, stage, model, params, layout: _Layout, state: dict) -> list[Program]:
  """The programs one stage runs, at its worst-case shapes; fills `state` with the resident
  parts (opt_state, reference) it implies."""
  # The stage's learner, exactly as train builds it (sampler, steps, recipe), on abstract params.
  learner = learner_lib.build_learner(config, stage, model, nnx.graphdef(model), params,
                                      task=None, processor=None, mesh=layout.mesh)
  staged, objective, steps, sampler = (learner.config, learner.objective, learner.steps,
                                       learner.sampler)
  model_cfg = model.config
  images = prompt_images(staged, model_cfg.vision)
  patch_dim = model_cfg.vision.patch_dim
  longest = int(staged.data.max_prompt_tokens)
  N = objective.max_new_tokens
  abstract_opt = jax.eval_shape(steps.tx.init, params)
  opt_state = with_shardings(abstract_opt,
                             step_lib.optimizer_state_shardings(abstract_opt, params))
  programs_of_steps = steps.programs(params, opt_state)
  name = stage.name
  uses_ref = stage.kind == "grpo" and (objective.loss.use_kl_loss or
                                       objective.loss.use_kl_in_reward)
  state["opt_state"] = opt_state
  if uses_ref:
    state["reference"] = params
  train_cfg = staged.train
  out: list[Program] = []

  def micro_shapes(prompts: int, per_prompt: int):
    T, S, I = sampler.padded_sizes(longest, prompts * images.patches, prompts * images.images)
    return dict(P=prompts, G=per_prompt, B=prompts * per_prompt,
                T=batching.prompt_width(T, longest), N=N, S=S if images.images else 0, I=I)

  accumulator = ("accumulator",) if train_cfg.grad_accum_steps > 1 else ()

  def like_params(info):  # gradients laid out like the parameters, metrics replicated
    return (jax.tree.map(lambda o, p: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=p.sharding),
                         info[0], params),
            jax.tree.map(lambda o: layout.whole(o.shape, o.dtype), info[1]))

  if stage.kind == "grpo":
    G = objective.group_size
    draws = [("", objective_lib.draw_size(staged, stage, objective), G, longest)]
    if objective.tree is not None:  # roots, then branches from prompt + prefix
      t = objective.tree
      draws = [("", draws[0][1], t.num_roots, longest),
               (" (branches)", draws[0][1] * t.num_roots, t.branches, longest + N)]
    for suffix, prompts, per_prompt, tokens in draws:
      T, S, I = sampler.padded_sizes(tokens, prompts * images.patches, prompts * images.images)
      S = S if images.images else 0
      B = prompts * per_prompt
      pixels = layout.whole((S, patch_dim), jnp.float32) if S else None
      grids = layout.whole((I, 3), jnp.int32) if S else None
      shapes = dict(P=prompts, G=per_prompt, B=B, T=T, N=N, S=S, I=I)
      prefill = Program(f"prefill{suffix}", name, sampler.programs()["prefill"],
                        (params, layout.rows((prompts, T), jnp.int32),
                         layout.rows((prompts, T), jnp.int32), pixels, grids),
                        dict(group_size=per_prompt, new_tokens=N), shapes, 1,
                        resident_args=("params",), phase="rollout",
                        assumed_outputs=lambda info: jax.tree.map(  # the prefill's constraint
                            lambda o: layout.rows(o.shape, o.dtype), info))
      out.append(prefill)
      decode = Program(f"decode{suffix}", name, sampler.programs()["decode"], None, {}, shapes,
                       1, resident_args=("params",), phase="rollout")
      # The decode loop's carry is the prefill's output plus per-row state; built once the
      # prefill has compiled (its output shardings are the loop's input shardings).
      decode.args = lambda prefilled, B=B: (params, dict(
          prefilled, step=layout.whole((), jnp.int32),
          **{k: layout.rows(shape, dtype) for k, (shape, dtype, _) in
             sampler.decode_state(B).items()}),
          jax.eval_shape(lambda: jax.random.key(0)), layout.rows((B,), jnp.int32))
      out.append(decode)
    parts = train_cfg.num_minibatches * train_cfg.grad_accum_steps
    shapes = micro_shapes(train_cfg.prompts_per_step // parts, G)
    seq = _seq_batch(layout, shapes["P"], shapes["T"], shapes["B"], N, shapes["S"],
                     shapes["I"], patch_dim)
    on_policy = train_cfg.ppo_epochs == 1 and train_cfg.num_minibatches == 1
    scorings = (0 if on_policy else 1) + (1 if uses_ref else 0)
    kw = dict(columns=N)
    if scorings:
      out.append(Program("logprobs", name, programs_of_steps["logprobs"], (params, seq), kw,
                         shapes, parts * scorings, resident_args=("params",)))
    B = shapes["B"]
    per_token = lambda: layout.rows((B, N), jnp.float32)
    count = layout.whole((), jnp.float32, weak_type=True)
    updates = train_cfg.ppo_epochs * train_cfg.num_minibatches
    out.append(Program(
        "grpo_grads", name, programs_of_steps["grpo_grads"],
        (params, seq, layout.rows((B,), jnp.float32), None if on_policy else per_token(),
         per_token() if uses_ref else None, per_token(), layout.rows((B, N), jnp.int32), count,
         count), kw, shapes, updates * train_cfg.grad_accum_steps, resident_args=("params",),
        extra_resident=accumulator, assumed_outputs=like_params))
  elif stage.kind == "sft":
    per_record = 1 if stage.get("sft_data") else (
        len(tuple(config.warmup.answers)) if config.warmup.every_answer else 1)
    shapes = micro_shapes(train_cfg.prompts_per_step // train_cfg.grad_accum_steps, per_record)
    shapes["N"] = N  # targets are bounded here by rl.max_new_tokens
    seq = _seq_batch(layout, shapes["P"], shapes["T"], shapes["B"], N, shapes["S"], shapes["I"],
                     patch_dim)
    updates = 1
    out.append(Program("sft_grads", name, programs_of_steps["sft_grads"],
                       (params, seq, layout.whole((), jnp.float32, weak_type=True)),
                       dict(columns=N), shapes, train_cfg.grad_accum_steps,
                       resident_args=("params",), extra_resident=accumulator,
                       assumed_outputs=like_params))
  else:
    raise ValueError(f"Unknown stage kind {stage.kind!r}; use 'sft' or 'grpo'.")
  grads_program = out[-1]
  if train_cfg.grad_accum_steps > 1:
    out.append(Program("accumulate", name, programs_of_steps["accumulate"], None, {}, {},
                       updates * (train_cfg.grad_accum_steps - 1),
                       resident_args=("accumulator",)))
  out.append(Program("apply", name, programs_of_steps["apply"], None, {}, {}, updates,
                     resident_args=("params", "opt_state")))
  # Gradients come out of the gradient program with its output shardings.
  grads = lambda: grads_program.outputs[0]
  for p in out:
    if p.name == "accumulate":
      p.args = lambda: (grads(), grads())
    elif p.name == "apply":
      p.args = lambda: (params, opt_state, grads())
  return out


# --- the plan -----------------------------------------------------------------------------------

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
  layout = _Layout(mesh)
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
    programs = stage_programs(config, stage, model, params, layout, state)
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
      _compile(program, device)
      if program.name.endswith("_grads"):
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
  resident = sum(sizes.get(k, 0) for k in ("params", "opt_state", "reference"))
  outside = resident - sum(sizes.get(k, 0) for k in program.resident_args if k != "accumulator")
  outside += sum(sizes.get(k, 0) for k in program.extra_resident)
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
        r["seconds_estimate"] = _roofline(chip, r, p)
        if p.phase == "rollout":
          rollout_s += r["seconds_estimate"] or 0.0
        else:
          update_s += r["seconds_estimate"] or 0.0
      if r["peak"] is not None and r["peak"] > peak[0]:
        peak = (r["peak"], f"{p.name} ({stage.name})")
      rows.append(dict(name=p.name, stage=stage.name, shapes=p.shapes,
                       runs_per_step=p.runs_per_step, **r))
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
                  logit_chunk=int(config.train.logit_chunk),
                  prompts_per_step=int(config.train.prompts_per_step),
                  num_minibatches=int(config.train.num_minibatches),
                  grad_accum_steps=int(config.train.grad_accum_steps)),
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
        note="roofline estimate, not a measurement: each program at the slower of XLA's FLOPs "
             "over peak FLOP/s and its bytes over HBM bandwidth, decode steps at full length",
        step_seconds=step_s, rollout_seconds=rollout_s, update_seconds=update_s,
        actor_mfu=(model_flops / chips) / (update_s * chip.peak_flops) if update_s else None)
  if not fits:
    plan["suggestions"] = suggestions(plan)
  return plan


def _roofline(chip: Chip, r: dict, program: Program) -> float | None:
  """Estimated seconds per step of one program: XLA's per-chip FLOPs and bytes against the
  chip's peaks; a decode loop's body is counted once by XLA, so once per new token here."""
  if not chip.peak_flops or not chip.memory_bandwidth:
    return None
  once = max(r["flops"] / chip.peak_flops, r["bytes_accessed"] / chip.memory_bandwidth)
  trips = program.shapes.get("N", 1) if program.name.startswith("decode") else 1
  return once * trips * program.runs_per_step


def suggestions(plan: dict) -> list[str]:
  """What does not fit, then settings that would probably fit, each with a rough estimate of
  the new peak (rerun the plan with the setting to measure it)."""
  limit, peak = plan["memory_per_chip"], plan["peak_per_chip"]
  state, settings, chips = plan["state_per_chip"], plan["config"], plan["chips"]
  worst = max((r for r in plan["programs"] if r.get("peak") is not None),
              key=lambda r: r["peak"], default=None)
  out = [f"{r['name']} ({r['stage']}) did not compile: {r['error']}"
         for r in plan["programs"] if r.get("error") and r.get("peak") is None]
  if worst is None:
    return out
  if worst["peak"] > limit:
    out.append(f"{worst['name']} ({worst['stage']}) needs {_gib(worst['peak'])} per chip at its "
               f"peak, {_gib(worst['peak'] - limit)} over the {_gib(limit)} of a {plan['chip']}")
  rollout = worst["name"].startswith(("prefill", "decode"))
  temporaries = worst.get("temporaries", 0)
  if worst["name"].endswith(("_grads", "logprobs")) and "temporaries" in worst:
    shrinking = temporaries + max(0, worst["arguments"] - state["params"])
    fixed = worst["peak"] - shrinking
    accum = settings["grad_accum_steps"]
    prompts = settings["prompts_per_step"] // settings["num_minibatches"]
    most = max(1, prompts // accum)  # one prompt per micro-batch at the most
    k = next((k for k in range(2, most + 1)
              if most % k == 0 and fixed + shrinking / k <= limit), None)
    if k:
      out.append(f"--config.train.grad_accum_steps={accum * k}: about "
                 f"{_gib(fixed + shrinking / k)} per chip (activations scale with the "
                 "micro-batch)")
    else:
      out.append(f"even one prompt per micro-batch (--config.train.grad_accum_steps={prompts}) "
                 f"leaves about {_gib(fixed + shrinking / most)} per chip")
    if not settings["remat"]:
      out.append("--config.model.remat=True: keeps one activation per block for the backward "
                 "pass")
    if settings["logit_chunk"] == 0:
      out.append("--config.train.logit_chunk=256: the LM head forms fp32 logits 256 tokens at "
                 "a time instead of over every completion token at once")
  if state["reference"] and settings["param_dtype"] == "float32":
    out.append(f"a bf16 reference copy would save {_gib(state['reference'] / 2)} per chip (not "
               "a config field yet)")
  sharded = sum(state[k] for k in ("params", "optimizer_state", "reference",
                                   "gradient_accumulator"))
  for factor in (2, 4, 8):
    guess = worst["peak"] - (sharded + temporaries) * (1 - 1 / factor)
    if guess <= limit:
      out.append(f"{chips * factor} chips with --config.mesh.fsdp=-1: about {_gib(guess)} per "
                 "chip, if the temporaries shard as well as the state")
      break
  if rollout:
    out.append("the rollout runs the whole generation batch at once: fewer "
               "--config.train.prompts_per_step, shorter --config.rl.max_new_tokens or "
               "data.max_prompt_tokens, or smaller images (--config.image.max_pixels) shrink it")
  return out


# --- output -------------------------------------------------------------------------------------

def _gib(n) -> str:
  return "—" if n is None else f"{n / GiB:.2f} GiB"


def _num(x, unit="") -> str:
  if x is None:
    return "—"
  for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.1f} {suffix}{unit}"
  return f"{x:.0f} {unit}"


def _seconds(x) -> str:
  return "—" if x is None else f"{x:.2f}"


def markdown(plan: dict) -> str:
  """The plan as Markdown: resident state, one row per program, the verdict and the estimate."""
  est = " (estimated from TPU)" if plan["temporaries_estimated"] else ""
  mesh = ", ".join(f"{k}={v}" for k, v in plan["mesh"].items())
  lines = [f"### Plan: {plan['config']['model']} on {plan['topology']} ({plan['chips']} × "
           f"{plan['chip']}, {_gib(plan['memory_per_chip'])} each; compiled for "
           f"{plan['compiled_for']}; mesh {mesh})", "",
           "| resident per chip | bytes |", "|---|---|"]
  for k, v in plan["state_per_chip"].items():
    lines.append(f"| {k.replace('_', ' ')} | {_gib(v)} |")
  lines += ["", f"| program | stage | shapes | runs/step | arguments | outputs | "
                f"temporaries{est} | peak per chip | FLOPs | bytes accessed | compile s | "
                "est. s/step |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in plan["programs"]:
    shapes = " ".join(f"{k}={v}" for k, v in r["shapes"].items())
    if r.get("error"):
      sizes = (f"{_gib(r['arguments'])} | {_gib(r['outputs'])} | {_gib(r['temporaries'])} "
               "(from the compiler's refusal)" if "temporaries" in r else " | | ")
      lines.append(f"| {r['name']} | {r['stage']} | {shapes} | {r['runs_per_step']} | {sizes} | "
                   f"{_gib(r.get('peak'))} | did not compile | | {r.get('compile_seconds', '')} "
                   "| |")
      continue
    lines.append(
        f"| {r['name']} | {r['stage']} | {shapes} | {r['runs_per_step']} | "
        f"{_gib(r['arguments'])} | {_gib(r['outputs'] - r['aliased'])} | "
        f"{_gib(r['temporaries'])} | {_gib(r['peak'])} | {_num(r['flops'])} | "
        f"{_num(r['bytes_accessed'], 'B')} | {r['compile_seconds']} | "
        f"{_seconds(r.get('seconds_estimate'))} |")
  verdict = "fits" if plan["fits"] else "DOES NOT FIT"
  headroom = (f", {100 * plan['headroom']:.0f}% headroom" if plan["headroom"] >= 0 else
              f", {_gib(plan['peak_per_chip'] - plan['memory_per_chip'])} over")
  lines += ["", f"Peak per chip: {_gib(plan['peak_per_chip'])} in {plan['peak_program']} of "
                f"{_gib(plan['memory_per_chip'])}: **{verdict}**{headroom}. Compiling took "
                f"{plan['compile_seconds']} s."]
  if plan["temporaries_estimated"]:
    lines.append("Arguments, outputs and resident state are exact for this mesh; temporaries "
                 f"are estimated from the same programs compiled for {plan['compiled_for']}.")
  if "estimate" in plan:
    e = plan["estimate"]
    mfu = "—" if e["actor_mfu"] is None else f"{100 * e['actor_mfu']:.0f}%"
    lines.append(f"Estimate ({e['note']}): step {e['step_seconds']:.1f} s (rollout "
                 f"{e['rollout_seconds']:.1f} s, update {e['update_seconds']:.1f} s), actor MFU "
                 f"about {mfu}. Chip figures: {plan['chip_source']}.")
  for s in plan.get("suggestions", []):
    lines.append(f"- {s}")
  return "\n".join(lines)


def refusal(plan: dict) -> str:
  """The message a plan that does not fit stops with."""
  return ("This step does not fit:\n  " + "\n  ".join(plan.get("suggestions", [])) +
          "\n(Plan: python -m metaphorstar_jax.plan --config=... --topology=...)")


class DoesNotFit(ValueError):
  """A step whose peak memory exceeds the chip's, with the plan that says so."""

  def __init__(self, plan: dict):
    super().__init__(refusal(plan))
    self.plan = plan


def check_fit(config, mesh: Mesh) -> dict:
  """Plans `config` on the mesh's own devices; raises DoesNotFit when a step would not fit."""
  plan = make_plan(config, local_target(mesh), stop_at_misfit=True)
  logging.info("Plan:\n%s", markdown(plan))
  if not plan["fits"]:
    raise DoesNotFit(plan)
  return plan


# --- command line -------------------------------------------------------------------------------

_TOPOLOGY = flags.DEFINE_string("topology", "", "v5p-8, v4-8, v5e-4, v6e-8, v5p:2x2x4, cpu:8, "
                                "h100:8, ...; empty: this machine's devices.")
_PROGRAMS = flags.DEFINE_list("programs", [], "Compile only these (e.g. grpo_grads,prefill) and "
                              "what they need; default: every program of every stage.")
_OUT = flags.DEFINE_string("out", "", "JSON path; default <workdir>/plan-<topology>.json.")


def use_cpu_devices(topology: str) -> None:
  """For a `cpu:N` topology, asks JAX for N CPU devices (before its backend starts) unless
  XLA_FLAGS already sets a count."""
  if topology.startswith("cpu:") and "host_platform_device_count" not in os.environ.get(
      "XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", int(topology.split(":")[1]))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  topology = _TOPOLOGY.value
  use_cpu_devices(topology)
  if topology:
    target = resolve_target(topology)
  else:
    target = local_target(sharding_lib.make_mesh(**config.mesh.to_dict()))
  plan = make_plan(config, target, only=_PROGRAMS.value)
  print(markdown(plan))
  path = _OUT.value or os.path.join(config.workdir,
                                    f"plan-{re.sub(r'[^A-Za-z0-9_.-]', '_', topology or 'local')}.json")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(plan, f, indent=2, default=str)
  print(f"\nWrote {path}")
  if not plan["fits"]:
    print(refusal(plan), file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  # --config as train has it; defined only here, because train (which imports this module for its
  # fit check) defines the same flag.
  config_flags.DEFINE_config_file("config", config_files.path(config_files.DEFAULT),
                                  "Training config file to plan.")
  app.run(main)
