"""The files an evaluation writes to its output folder: results.json (metrics, their spread,
per-repeat metrics, settings), results.md (the table) and completions.jsonl (every completion
with its scores)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax

RESULTS_JSON, RESULTS_MD, COMPLETIONS = "results.json", "results.md", "completions.jsonl"


def _finite(value: Any) -> Any:
  """JSON has no NaN: NaN and infinities become null, recursively."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite(v) for v in value]
  return value


def markdown_report(result: Mapping[str, Any]) -> str:
  """A heading line and a | metric | value | table (mean ± std over repeats when K > 1)."""
  sampling = result["sampling"]
  how = ("greedy" if sampling["greedy"] else
         f"temperature {sampling['temperature']}, top_p {sampling['top_p']}")
  repeats = sampling["num_samples"]
  lines = [f"## {result['task']}: {result['model']}" + (f" ({result['tag']})" if result['tag']
                                                          else ""),
           "",
           f"{result['num_records']} records from {result['data']}; {how}, "
           f"{sampling['max_new_tokens']} new tokens at most"
           + (f"; mean ± std over {repeats} samples per record" if repeats > 1 else "") + ".",
           ""]
  lines += ["| metric | value |", "|---|---|"]
  for name, value in result["metrics"].items():
    shown = "n/a" if math.isnan(value) else f"{value:.4f}"
    if repeats > 1 and not math.isnan(value):
      shown += f" ± {result['metrics_std'][name]:.4f}"
    lines.append(f"| {name} | {shown} |")
  return "\n".join(lines) + "\n"


def write_results(result: Mapping[str, Any], completions: Sequence[Mapping[str, Any]],
                  output_dir: str) -> dict[str, str]:
  """Writes results.json, results.md and completions.jsonl; returns their paths."""
  if jax.process_index() != 0:
    return {}
  os.makedirs(output_dir, exist_ok=True)
  paths = {"json": os.path.join(output_dir, RESULTS_JSON),
           "markdown": os.path.join(output_dir, RESULTS_MD),
           "completions": os.path.join(output_dir, COMPLETIONS)}
  summary = {k: v for k, v in result.items() if k not in ("markdown", "completions", "paths")}
  with open(paths["json"], "w", encoding="utf-8") as handle:
    json.dump(_finite(summary), handle, indent=2, ensure_ascii=False, default=str)
    handle.write("\n")
  with open(paths["markdown"], "w", encoding="utf-8") as handle:
    handle.write(result["markdown"])
  with open(paths["completions"], "w", encoding="utf-8") as handle:
    for row in completions:
      handle.write(json.dumps(_finite(dict(row)), ensure_ascii=False, default=str) + "\n")
  return paths
