"""Each program's memory budget: the chip less the headroom less the state resident outside the
program, as libtpu's option on TPU only, and the same budgets in the trainer's own programs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metaphorstar_jax import rl
from metaphorstar_jax.training import memory_budget, step as step_lib

GiB = 2**30
RESIDENT = dict(params=4 * GiB, opt_state=8 * GiB, reference=4 * GiB, accumulator=4 * GiB)


def test_each_program_gets_the_chip_less_headroom_less_what_stays_outside():
  budget = memory_budget.MemoryBudget("tpu", 100 * GiB, 0.2, RESIDENT)
  assert budget.limit("grpo_grads") == 80 * GiB - 16 * GiB  # moments, reference, accumulator
  assert budget.limit("prefill") == budget.limit("decode (branches)") == 80 * GiB - 12 * GiB
  assert budget.limit("accumulate") == 80 * GiB - 16 * GiB  # params, moments, reference
  assert budget.limit("apply") == 80 * GiB - 4 * GiB  # the reference only
  assert budget.compiler_options("apply") == {"xla_tpu_max_hbm_size_mib": str(76 * 1024)}
  assert "grpo_grads 64.0 GiB" in budget.describe()


def test_no_budget_off_tpu_or_when_the_state_alone_fills_the_chip():
  for platform in ("cpu", "gpu"):
    budget = memory_budget.MemoryBudget(platform, 100 * GiB, 0.2, RESIDENT)
    assert budget.compiler_options("grpo_grads") is None
    assert platform in budget.describe()
  assert memory_budget.MemoryBudget("tpu", None, 0.2, RESIDENT).limit("apply") is None
  full = memory_budget.MemoryBudget("tpu", 16 * GiB, 0.1, RESIDENT)
  assert full.limit("grpo_grads") is None and full.limit("apply") is not None
  assert "resident state alone fills the chip" in full.describe()


def test_stage_budget_counts_the_bytes_each_chip_holds():
  mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
  on = NamedSharding(mesh, PartitionSpec())
  params = {"w": jax.ShapeDtypeStruct((256, 64), jnp.float32, sharding=on)}
  tx = optax.adam(1e-3)
  opt_state = step_lib.abstract_optimizer_state(tx, params)
  budget = memory_budget.stage_budget(params, opt_state, reference=True, accumulator=False,
                                      headroom=0.1, memory_per_chip=None)
  size = 256 * 64 * 4
  assert budget.resident == dict(params=size, opt_state=2 * size + 4, reference=size,
                                 accumulator=0)
  assert budget.platform == "cpu" and memory_budget.chip_memory(mesh) is None


def test_train_steps_compile_with_their_options():
  # CPU knows no libtpu option, so a TrainSteps given one must fail to compile: the options reach
  # the compiler through the steps' own jitted functions.
  steps = step_lib.TrainSteps(None, optax.sgd(0.1), rl.LossConfig(), temperature=1.0,
                              compiler_options={"accumulate": {"xla_tpu_max_hbm_size_mib": "1"}})
  with pytest.raises(Exception, match="xla_tpu_max_hbm_size_mib"):
    steps.accumulate(jnp.ones(3), jnp.ones(3))
  plain = step_lib.TrainSteps(None, optax.sgd(0.1), rl.LossConfig(), temperature=1.0)
  assert float(plain.accumulate(jnp.ones(3), jnp.ones(3)).sum()) == 6.0
