"""The chips a plan is for: published per-chip figures, and the devices to compile for (a TPU
slice through libtpu's compile-only topology, fake CPU devices, or a GPU node planned through the
TPU compiler at the same mesh)."""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
from jax.sharding import Mesh

from metaphorstar_jax.training.memory_budget import chip_memory

GiB = 1024**3


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
  limit = chip_memory(mesh)
  if match is None:
    match = Chip(devices[0].device_kind, None, float(limit or 0), None, "device.memory_stats")
  if limit:
    match = dataclasses.replace(match, memory_bytes=float(limit))
  return Target("local", match, devices, f"{devices[0].platform}:{len(devices)}")



def use_cpu_devices(topology: str) -> None:
  """For a `cpu:N` topology, asks JAX for N CPU devices (before its backend starts) unless
  XLA_FLAGS already sets a count."""
  if topology.startswith("cpu:") and "host_platform_device_count" not in os.environ.get(
      "XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", int(topology.split(":")[1]))

