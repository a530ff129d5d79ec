"""Export a training run's policy as an HF Qwen2.5-VL checkpoint directory.

    python -m metaphorstar_jax.export --checkpoint=runs/tfq_grpo_tiny --out=/tmp/hf \
        [--step=N] [--dtype=bfloat16]

Only the policy parameters of the Orbax step are read, one tensor at a time, so the host holds
about one tensor whatever the model size, and the saving run's mesh need not match this
machine's. The directory holds config.json, generation_config.json, the safetensors shards and
their index, and the tokenizer, processor and chat template. It is assembled in a scratch folder
next to --out and renamed into place last, so a failed export leaves nothing half-written.

This file is the command line; the export is `training/hf_export.py`, which the trainer also
calls (`config.export.every` / `config.export.at_end`, to workdir/hf/step_N).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import app, flags

from metaphorstar_jax import config_files
from metaphorstar_jax.training import hf_export


def _define_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_string("checkpoint", None, "A training run folder (holding checkpoints/ and "
                      "config.json), its checkpoints/ folder or one step's folder.",
                      flag_values=fv, required=True)
  flags.DEFINE_string("out", None, "The HF checkpoint folder to create (new or empty).",
                      flag_values=fv, required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.", flag_values=fv)
  flags.DEFINE_enum("dtype", None, list(hf_export.DTYPES), "dtype on disk; default the saved "
                    "parameter dtype.", flag_values=fv)
  flags.DEFINE_integer("max_shard_bytes", 5 * 2**30, "The largest safetensors shard.",
                       flag_values=fv)
  return fv


def cli(argv: Sequence[str]) -> dict:
  """Runs the command line `argv` (program name first); returns export_checkpoint's summary."""
  fv = _define_flags()
  config_files.parse_flags(fv, argv)
  return hf_export.export_checkpoint(fv.checkpoint, fv.out, step=fv.step, dtype=fv.dtype,
                                     max_shard_bytes=fv.max_shard_bytes)


def main(argv):
  try:
    summary = cli(argv)
  except (FileNotFoundError, FileExistsError, ValueError) as error:
    print(f"export: {error}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: flags.FLAGS(argv, known_only=True))
