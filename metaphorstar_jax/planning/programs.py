"""The programs one stage runs (the sampler's prefill and decode loop, TrainSteps' log-probs,
gradients, accumulation and update: the trainer's own jitted functions, from the stage's learner),
lowered at the stage's worst-case shapes and compiled for the plan's target.

Shape letters as in `abstract.py`.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from metaphorstar_jax.planning.abstract import Layout, prompt_images, sequence_batch, with_shardings
from metaphorstar_jax.training import batching, learner as learner_lib, objective as objective_lib
from metaphorstar_jax.training import step as step_lib
from metaphorstar_jax.training.memory_budget import bytes_on


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
  phase: str = "update"  # 'rollout' or 'update' (for the roofline's actor MFU)
  result: dict = dataclasses.field(default_factory=dict)
  outputs: Any = None
  # The outputs' layout when the program does not compile (its shapes are known from lowering).
  assumed_outputs: Any = None
  budget: int | None = None  # the bytes per chip it was compiled to fit (memory_budget)



def _from_message(pattern: str, message: str) -> float | None:
  """Bytes from a compiler message such as '... HLO temporaries (342.61G) ...'."""
  found = re.search(pattern + r"\(?([\d.]+)([KMGT]?)\)?", message)
  scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
  return float(found.group(1)) * scale[found.group(2)] if found else None


def compile_program(program: Program, device) -> None:
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
      host_temporaries=int(memory.host_temp_size_in_bytes),  # e.g. offloaded layer inputs
      flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      compile_seconds=round(seconds, 1))



def stage_programs(config, stage, model, params, layout: Layout, state: dict,
                   memory_per_chip: float | None) -> list[Program]:
  """The programs one stage runs, at its worst-case shapes; fills `state` with the resident
  parts (opt_state, reference) it implies. `memory_per_chip` sets the programs' memory budgets
  as train sets them (None: none)."""
  # The stage's learner, exactly as train builds it (sampler, steps, recipe, memory budgets), on
  # abstract params.
  learner = learner_lib.build_learner(config, stage, model, nnx.graphdef(model), params,
                                      task=None, processor=None, mesh=layout.mesh,
                                      memory_per_chip=memory_per_chip)
  staged, objective, steps, sampler = (learner.config, learner.objective, learner.steps,
                                       learner.sampler)
  model_cfg = model.config
  images = prompt_images(staged, model_cfg.vision)
  patch_dim = model_cfg.vision.patch_dim
  longest = int(staged.data.max_prompt_tokens)
  N = objective.max_new_tokens
  opt_state = step_lib.abstract_optimizer_state(steps.tx, params)
  programs_of_steps = steps.programs(params, opt_state)
  name = stage.name
  uses_ref = learner_lib.keeps_reference(stage, objective)
  state["opt_state"] = opt_state
  if uses_ref:
    state["reference"] = params
  train_cfg = staged.train
  out: list[Program] = []

  def micro_shapes(prompts: int, per_prompt: int):
    T, S, I = sampler.padded_sizes(longest, prompts * images.patches, prompts * images.images)
    return dict(P=prompts, G=per_prompt, B=prompts * per_prompt,
                T=batching.prompt_width(T, longest), N=N, S=S if images.images else 0, I=I)

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
      K = sampler.config.prefill_chunks(prompts)  # each chunk's images packed on their own
      T, S, I = sampler.padded_sizes(tokens, prompts // K * images.patches,
                                     prompts // K * images.images)
      S = S if images.images else 0
      B = prompts * per_prompt
      chunked = (K,) if K > 1 else ()
      pixels = layout.whole((*chunked, S, patch_dim), jnp.float32) if S else None
      grids = layout.whole((*chunked, I, 3), jnp.int32) if S else None
      shapes = dict(P=prompts, G=per_prompt, B=B, T=T, N=N, S=S, I=I, **(dict(K=K) if K > 1
                                                                      else {}))
      prefill = Program(f"prefill{suffix}", name, sampler.programs()["prefill"],
                        (params, layout.rows((prompts, T), jnp.int32),
                         layout.rows((prompts, T), jnp.int32), pixels, grids),
                        dict(group_size=per_prompt, new_tokens=N), shapes, 1, phase="rollout",
                        assumed_outputs=lambda info: with_shardings(  # the prefill's own
                            info, sampler.prefill_shardings(info)))
      out.append(prefill)
      decode = Program(f"decode{suffix}", name, sampler.programs()["decode"], None, {}, shapes,
                       1, phase="rollout")
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
    seq = sequence_batch(layout, shapes["P"], shapes["T"], shapes["B"], N, shapes["S"],
                     shapes["I"], patch_dim)
    on_policy = train_cfg.ppo_epochs == 1 and train_cfg.num_minibatches == 1
    scorings = (0 if on_policy else 1) + (1 if uses_ref else 0)
    kw = dict(columns=N)
    if scorings:
      out.append(Program("logprobs", name, programs_of_steps["logprobs"], (params, seq), kw,
                         shapes, parts * scorings))
    B = shapes["B"]
    per_token = lambda: layout.rows((B, N), jnp.float32)
    count = layout.whole((), jnp.float32, weak_type=True)
    updates = train_cfg.ppo_epochs * train_cfg.num_minibatches
    out.append(Program(
        "grpo_grads", name, programs_of_steps["grpo_grads"],
        (params, seq, layout.rows((B,), jnp.float32), None if on_policy else per_token(),
         per_token() if uses_ref else None, per_token(), layout.rows((B, N), jnp.int32), count,
         count), kw, shapes, updates * train_cfg.grad_accum_steps, assumed_outputs=like_params))
  elif stage.kind == "sft":
    per_record = 1 if stage.sft_data else (
        len(tuple(config.sft_targets.answers)) if config.sft_targets.every_answer else 1)
    shapes = micro_shapes(train_cfg.prompts_per_step // train_cfg.grad_accum_steps, per_record)
    shapes["N"] = N  # targets are bounded here by rl.max_new_tokens
    seq = sequence_batch(layout, shapes["P"], shapes["T"], shapes["B"], N, shapes["S"], shapes["I"],
                     patch_dim)
    updates = 1
    out.append(Program("sft_grads", name, programs_of_steps["sft_grads"],
                       (params, seq, layout.whole((), jnp.float32, weak_type=True)),
                       dict(columns=N), shapes, train_cfg.grad_accum_steps,
                       assumed_outputs=like_params))
  else:
    raise ValueError(f"Unknown stage kind {stage.kind!r}; use 'sft' or 'grpo'.")
  grads_program = out[-1]
  if train_cfg.grad_accum_steps > 1:
    out.append(Program("accumulate", name, programs_of_steps["accumulate"], None, {}, {},
                       updates * (train_cfg.grad_accum_steps - 1)))
  out.append(Program("apply", name, programs_of_steps["apply"], None, {}, {}, updates))
  # Gradients come out of the gradient program with its output shardings.
  grads = lambda: grads_program.outputs[0]
  for p in out:
    p.budget = learner.budget.limit(p.name)
    if p.name == "accumulate":
      p.args = lambda: (grads(), grads())
    elif p.name == "apply":
      p.args = lambda: (params, opt_state, grads())
  return out

