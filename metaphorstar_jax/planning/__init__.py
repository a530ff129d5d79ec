"""Will it fit? An ahead-of-time plan of every program a run executes, on a target topology.

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
names the program, the bytes and settings that would fit; `train` runs the same check
(`check_fit`) before it loads weights when `config.plan.check_fit` is set.

Shapes are the worst a run can meet: every prompt `data.max_prompt_tokens` long carrying
`plan.images_per_prompt` square images of `plan.image_pixels` (unset: `image.max_pixels`), every
completion `rl.max_new_tokens` long, padded to the sampler's buckets as a run pads them.

Modules, in reading order: `targets` (chips and the devices to compile for), `abstract` (the
abstract state and worst-case shapes), `programs` (each stage's programs, compiled), `estimate`
(the plan: peaks, roofline, the fit check), `report` (suggestions, Markdown, the refusal).
`python -m metaphorstar_jax.plan` is the command line.
"""

from metaphorstar_jax.planning.estimate import check_fit, make_plan
from metaphorstar_jax.planning.report import DoesNotFit, markdown, refusal
from metaphorstar_jax.planning.targets import (CHIPS, Chip, Target, local_target, resolve_target,
                                               use_cpu_devices)

__all__ = ["CHIPS", "Chip", "DoesNotFit", "Target", "check_fit", "local_target", "make_plan",
           "markdown", "refusal", "resolve_target", "use_cpu_devices"]
