"""bench/grpo_step.py runs end to end on the tiny model beside TRL's GRPOTrainer (no timings)."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

EXPECTED_KEYS = {
    "bench", "model", "prompts", "group_size", "new_tokens", "prompt_tokens",
    "image_tokens_per_prompt", "ours_step_s", "torch_step_s", "ratio", "ours_rollout_s",
    "ours_update_s", "torch_rollout_s", "torch_update_s", "torch_generate_s", "ours_compile_s",
    "ours_warmup_steps_s", "torch_warmup_steps_s", "ours_completion_tokens",
    "torch_completion_tokens", "torch_side", "settings", "trl_version", "other_cpu_share",
    "jax_version", "torch_version", "device", "threads",
}


def test_grpo_step_bench_prints_one_json_line_with_both_sides():
  pytest.importorskip("trl", reason="the PyTorch reference side needs TRL (pip install trl)")
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the benchmark runs on the plain CPU device, not the test mesh
  result = subprocess.run(
      [sys.executable, os.path.join("bench", "grpo_step.py"), "--model", "tiny", "--prompts", "2",
       "--group", "2", "--new_tokens", "4", "--warmup", "1", "--repeats", "1"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, result.stderr[-4000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1, f"expected one JSON line on stdout, got {lines!r}"
  record = json.loads(lines[0])
  assert EXPECTED_KEYS <= set(record), EXPECTED_KEYS - set(record)
  assert record["bench"] == "grpo_step" and record["model"] == "tiny"
  assert (record["prompts"], record["group_size"], record["new_tokens"]) == (2, 2, 4)
  assert record["image_tokens_per_prompt"] == 16
  # Both sides generated exactly the forced completion length.
  assert record["ours_completion_tokens"] == record["torch_completion_tokens"] == 4
  assert len(record["ours_warmup_steps_s"]) == len(record["torch_warmup_steps_s"]) == 1
  for key in ("ours_step_s", "torch_step_s", "ratio", "ours_rollout_s", "torch_rollout_s"):
    assert record[key] > 0, key
  assert record["settings"]["kl"].startswith("none")
