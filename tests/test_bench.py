"""The benchmarks run end to end on the tiny model and compare like with like (no timings)."""

import json
import os
import subprocess
import sys

from helpers import REPO_ROOT

EXPECTED_KEYS = {
    "bench", "model", "batch", "seq_len", "image_tokens_per_sample", "ours_tokens_per_s",
    "torch_tokens_per_s", "ratio", "ours_compile_s", "ours_median_ms", "torch_median_ms",
    "max_abs_logit_diff", "jax_version", "torch_version", "device", "threads",
}


def run_bench(script: str, *args: str) -> dict:
  """Runs bench/<script> in a subprocess and returns its single JSON line."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the benchmark runs on the plain CPU device, not the test mesh
  result = subprocess.run([sys.executable, os.path.join("bench", script), *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, result.stderr[-4000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1, f"expected one JSON line on stdout, got {lines!r}"
  return json.loads(lines[0])


def test_forward_bench_prints_one_json_line_with_matching_logits():
  record = run_bench("forward.py", "--model", "tiny", "--batch", "2", "--repeats", "1")
  assert EXPECTED_KEYS <= set(record), EXPECTED_KEYS - set(record)
  assert record["bench"] == "forward" and record["model"] == "tiny" and record["batch"] == 2
  assert record["image_tokens_per_sample"] == 16
  assert record["max_abs_logit_diff"] < 1e-4


def test_rollout_bench_prints_one_json_line_per_call():
  record = run_bench("rollout.py", "--model", "tiny", "--shapes", "2x3,1x2", "--new_tokens", "6",
                     "--repeats", "1")
  assert record["bench"] == "rollout" and len(record["runs"]) == 2
  first = record["runs"][0]
  assert (first["prompts"], first["group_size"], first["new_tokens"]) == (2, 3, 6)
  assert first["ours_compiled_programs"] == 2
  for key in ("ours_new_tokens_per_s", "torch_new_tokens_per_s", "ratio", "ours_compile_s"):
    assert first[key] > 0
