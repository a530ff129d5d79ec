"""Device mesh and parameter partitioning, as data: (regex on parameter path, partition spec) rules.

The mesh has three named axes: `data` (batch), `fsdp` (batch and parameter shards) and `tensor`
(Megatron-style splits of heads and MLP width). The same rules serve every model size; a dimension
that an axis does not divide is replicated along it instead, and the reason is logged.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Kernels are (in, out). Column-parallel layers split `out` over tensor; row-parallel split `in`.
# Decoder layers and ViT blocks stack their parameters on a leading layer axis, which the scan
# over layers walks: it stays whole (None) on every chip. The first matching rule wins.
PARAMETER_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens/embedding$", P("tensor", "fsdp")),
    (r"lm_head/kernel$", P("fsdp", "tensor")),
    (r"mlp_in/kernel$", P("fsdp", "tensor")),
    (r"mlp_in/bias$", P("tensor")),
    (r"(mlp_out|patch_embed)/kernel$", P("tensor", "fsdp")),
    (r"(layers|blocks)/.*(q_proj|k_proj|v_proj|gate_proj|up_proj|qkv)/kernel$",
     P(None, "fsdp", "tensor")),
    (r"(layers|blocks)/.*(q_proj|k_proj|v_proj|gate_proj|up_proj|qkv)/bias$", P(None, "tensor")),
    (r"(layers|blocks)/.*(o_proj|down_proj|proj)/kernel$", P(None, "tensor", "fsdp")),
    (r".*", P()),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got data={data} fsdp={fsdp} "
                     f"tensor={tensor}.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot be split into data={data} fsdp={fsdp} "
                       f"tensor={tensor}.")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"Mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs "
                     f"{int(np.prod(sizes))} devices but {len(devices)} are available.")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def path_to_str(path) -> str:
  """A pytree key path or tuple as 'language_model/layers/self_attn/q_proj/kernel'.

  The trailing `.value` attribute of an NNX Variable is dropped so rules match parameter names.
  """
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.GetAttrKey):
      if key.name == "value":
        continue
      parts.append(key.name)
    else:
      parts.append(str(getattr(key, "key", getattr(key, "idx", key))))
  return "/".join(parts)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, name: str = "") -> P:
  """Drops the axes of `spec` that the mesh lacks or that do not divide their dimension.

  An entry may name several mesh axes, e.g. ('data', 'fsdp') for rows split over both.
  """
  entries = list(spec) + [None] * (len(shape) - len(spec))
  fitted = []
  for dim, entry in zip(shape, entries[:len(shape)]):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if axes and dim % size:
      logging.info("Replicating %s dim %d (size %d) over %s of size %d: not divisible.",
                   name, len(fitted), dim, axes, size)
      axes = ()
    fitted.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*fitted)


def spec_for(name: str, shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple[str, P]] = PARAMETER_RULES) -> P:
  for pattern, spec in rules:
    if re.search(pattern, name):
      return fit_spec(spec, shape, mesh, name)
  return P()


def parameter_shardings(state, mesh: Mesh, rules: Sequence[tuple[str, P]] = PARAMETER_RULES):
  """A pytree like `state` (arrays or ShapeDtypeStructs) of NamedShardings chosen by the rules."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, spec_for(path_to_str(path), x.shape, mesh, rules)),
      state)


BATCH_AXES = ("data", "fsdp")


def initialize_distributed(coordinator_address: str = "", num_processes: int = 1,
                           process_id: int = 0, auto: bool = False) -> None:
  """Joins this process to a multi-host run (a TPU pod slice, a GPU cluster) before JAX starts.

  With a coordinator address the run is described explicitly; with `auto` JAX finds it from the
  environment (Cloud TPU, SLURM, Open MPI). Neither: a single-process run, nothing to do. Every
  process then runs the same program on the same data; arrays span all hosts' devices.
  """
  if not coordinator_address and not auto:
    return
  # CPU devices need a collectives backend to talk across processes (tests, CPU clusters); the
  # setting only concerns the CPU client and is ignored by TPU and GPU runs.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()
  logging.info("Process %d of %d: %d local of %d devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def to_host(array) -> np.ndarray:
  """A (possibly sharded, possibly multi-host) array as one NumPy array on every process.

  Rows sharded over several hosts are gathered from all of them (every process must call this
  together); replicated or local arrays are read directly.
  """
  if isinstance(array, jax.Array) and not (array.is_fully_addressable
                                           or array.is_fully_replicated):
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(array)


def place_rows(array, mesh: Mesh | None):
  """Puts `array` on the mesh with its leading (row) axis split over the batch axes.

  Without a mesh it goes to the default device; rows that the axes do not divide are replicated.
  """
  if mesh is None:
    return jax.numpy.asarray(array)
  return jax.device_put(array, row_sharding(np.shape(array), mesh))


def row_sharding(shape: Sequence[int], mesh: Mesh, axis: int = 0) -> NamedSharding:
  """The sharding `place_rows` gives an array of `shape`: rows (dimension `axis`; 1 for a KV
  cache, which stacks the layers in front) over the batch axes if they divide, else replicated."""
  return NamedSharding(mesh, fit_spec(P(*[None] * axis, BATCH_AXES), shape, mesh))


def activations_on(mesh: Mesh | None):
  """A context in which functions traced lay out their activations on `mesh` (`constrain_rows`);
  no-op without one. Used inside jitted functions, around the model's forward pass."""
  if mesh is None:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def constrain_rows(x, axis: int = 0):
  """`x` with its rows (dimension `axis`: 0 for activations and the ViT's packed patches, 1 for a
  KV cache) split over the batch axes of the mesh being traced under (`activations_on`);
  unchanged outside one.

  Left to propagation alone, XLA replicated the ViT's packed patches on every chip (they come from
  replicated pixel values) and some of the decoder's MLP activations: 4× the work and memory on a
  4-chip slice.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, fit_spec(P(*[None] * axis, BATCH_AXES), x.shape,
                                                      mesh))


def constrain_layer(layer_state):
  """One layer's parameters, sliced from their (L, ...) stack by a scan over layers, kept split as
  the stack is (its rule without the layer axis) on the mesh being traced under; unchanged
  outside one.

  Pinned, each layer is gathered inside the loop and its gradient reduce-scattered there; left to
  propagation, XLA may gather or reduce the whole stack outside the loop at once.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return layer_state

  def constrain(path, x):
    # The stacked parameter's rule ('layers/' matches the decoder's and the ViT's alike).
    spec = spec_for("layers/" + path_to_str(path), (1, *x.shape), mesh)
    return jax.lax.with_sharding_constraint(x, P(*tuple(spec)[1:]))

  return jax.tree_util.tree_map_with_path(constrain, layer_state)

