"""Each compiled program's share of a chip's memory, told to the compiler.

XLA's TPU compiler assumes the whole HBM is the program's. The run's optimizer moments, reference
copy and gradient accumulator stay on the chip outside the program's arguments, so that memory is
not free; and what the compiler believes is free it spends keeping gathered weights and
activations alive for longer. Told its real share (libtpu's `xla_tpu_max_hbm_size_mib`: the
chip's memory, less the headroom the run leaves free, less the state resident outside the
program) it schedules within it, and a program that cannot fit is refused when it compiles, with
its sizes, instead of running out of memory mid-step.

Train and plan build the same budgets from the same state (`learner.build_learner`), so the plan
measures the programs a run compiles. Other platforms have no such option and compile as before.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

MiB = 2**20

# What stays on each chip while a program runs without being one of its arguments. Scoring the
# reference policy leaves the policy's parameters outside instead of the reference: the same bytes.
# The accumulator is resident from the second micro-batch of a mini-batch on.
OUTSIDE: Mapping[str, tuple[str, ...]] = {
    "prefill": ("opt_state", "reference"),
    "decode": ("opt_state", "reference"),
    "logprobs": ("opt_state", "reference"),
    "grpo_grads": ("opt_state", "reference", "accumulator"),
    "sft_grads": ("opt_state", "reference", "accumulator"),
    "accumulate": ("params", "opt_state", "reference"),
    "apply": ("reference",),
}


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


def outside_bytes(program: str, resident: Mapping[str, int]) -> int:
  """Bytes per chip of the resident state that `program` ('decode (branches)' is a decode) does
  not take as an argument."""
  base = program.split(" ")[0]
  return sum(resident.get(k, 0) for k in OUTSIDE[base])


def chip_memory(mesh) -> float | None:
  """The memory of each of the mesh's chips as the runtime reports it (None: unknown, e.g. CPU
  or compile-only devices)."""
  device = mesh.devices.flat[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # compile-only devices have no runtime to ask
    return None
  return stats.get("bytes_limit")


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
  """The budgets of one stage's programs on one kind of chip."""

  platform: str
  memory_per_chip: float | None  # bytes; None: unknown, no budgets
  headroom: float  # the fraction of each chip's memory no program may use
  resident: Mapping[str, int]  # bytes per chip: params, opt_state, reference, accumulator

  @property
  def applies(self) -> bool:
    return self.platform == "tpu" and bool(self.memory_per_chip)

  def limit(self, program: str) -> int | None:
    """Bytes `program`'s arguments, outputs and temporaries may take per chip; None: no limit
    (not a TPU, or the resident state alone leaves nothing: the plan reports that misfit)."""
    if not self.applies:
      return None
    left = self.memory_per_chip * (1 - self.headroom) - outside_bytes(program, self.resident)
    return int(left) if left >= MiB else None

  def compiler_options(self, program: str) -> dict[str, str] | None:
    limit = self.limit(program)
    return None if limit is None else {"xla_tpu_max_hbm_size_mib": str(limit // MiB)}

  def describe(self) -> str:
    """One log line: each program's budget, or why there are none."""
    if not self.applies:
      why = ("the chip's memory is unknown" if self.platform == "tpu" else
             f"{self.platform} has no per-program memory option")
      return f"No per-program memory budget: {why}."
    parts = ", ".join(f"{name} {self.limit(name) / 2**30:.1f} GiB" if self.limit(name)
                      else f"{name} none (resident state alone fills the chip)"
                      for name in OUTSIDE)
    return (f"Per-program memory budget ({self.memory_per_chip / 2**30:.1f} GiB per chip, "
            f"{100 * self.headroom:.0f}% left free, less the state resident outside each): "
            f"{parts}.")


def stage_budget(params, opt_state, *, reference: bool, accumulator: bool, headroom: float,
                 memory_per_chip: float | None) -> MemoryBudget:
  """The budget of a stage whose state is `params` and `opt_state` (arrays or ShapeDtypeStructs
  with shardings), plus a reference copy of the params and a gradient accumulator (gradients
  are laid out like the params) when the stage keeps them."""
  some = jax.tree.leaves(params)[0]
  device = next(iter(some.sharding.device_set))
  size = bytes_on(params, device)
  resident = dict(params=size, opt_state=bytes_on(opt_state, device),
                  reference=size if reference else 0, accumulator=size if accumulator else 0)
  return MemoryBudget(device.platform, memory_per_chip, float(headroom), resident)


def options_by_program(budget: MemoryBudget) -> dict[str, Any]:
  """compiler_options for each program name (None where there is no budget)."""
  return {name: budget.compiler_options(name) for name in OUTSIDE}
