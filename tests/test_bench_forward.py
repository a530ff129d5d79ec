"""bench/forward.py runs end to end on the tiny model and compares like with like (no timings)."""

import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED_KEYS = {
    "bench", "model", "batch", "seq_len", "image_tokens_per_sample", "ours_tokens_per_s",
    "torch_tokens_per_s", "ratio", "ours_compile_s", "ours_median_ms", "torch_median_ms",
    "max_abs_logit_diff", "jax_version", "torch_version", "device", "threads",
}


def test_forward_bench_prints_one_json_line_with_matching_logits():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the benchmark runs on the plain CPU device, not the test mesh
  result = subprocess.run(
      [sys.executable, os.path.join("bench", "forward.py"), "--model", "tiny", "--batch", "2",
       "--repeats", "1"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-4000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1, f"expected one JSON line on stdout, got {lines!r}"
  record = json.loads(lines[0])
  assert EXPECTED_KEYS <= set(record), EXPECTED_KEYS - set(record)
  assert record["bench"] == "forward" and record["model"] == "tiny" and record["batch"] == 2
  assert record["image_tokens_per_sample"] == 16
  assert record["max_abs_logit_diff"] < 1e-4
