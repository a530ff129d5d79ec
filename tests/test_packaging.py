"""A non-editable install (what `pip install git+...` gives Colab) runs the README's main command
from any folder: the configs ship inside the package."""

import os
import shutil
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

from metaphorstar_jax import config_files


def test_configs_resolve_by_name():
  assert config_files.path() == config_files.path("tfq_grpo_tiny.py")
  assert os.path.basename(config_files.path("tfq_grpo_7b")) == "tfq_grpo_7b.py"
  assert {"tfq_grpo_tiny", "tfq_grpo_7b"} <= set(config_files.names())
  with pytest.raises(FileNotFoundError, match="available: .*tfq_grpo_tiny"):
    config_files.path("tfq_grpo_huge")


@pytest.mark.slow
def test_fresh_venv_with_a_non_editable_install_runs_the_main_command(tmp_path):
  source = tmp_path / "source"  # a copy, since building writes build/ and *.egg-info beside it
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  for folder in ("metaphorstar_jax", "configs"):
    shutil.copytree(os.path.join(REPO_ROOT, folder), source / folder, ignore=ignore)
  for name in ("setup.py", "README.md"):
    shutil.copy(os.path.join(REPO_ROOT, name), source / name)
  venv = tmp_path / "venv"
  # The installed dependencies are reused; only this package goes into the venv, offline.
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                  str(venv)], check=True)
  python = str(venv / "bin" / "python")
  install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                            "--no-build-isolation", str(source)], capture_output=True, text=True)
  assert install.returncode == 0, install.stderr[-3000:]
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env.pop("PYTHONPATH", None)
  where = subprocess.run([python, "-c", "import metaphorstar_jax.train as t; print(t.__file__); "
                          "print(t.DEFAULT_CONFIG)"], cwd=elsewhere, env=env,
                         capture_output=True, text=True)
  module, default_config = where.stdout.split()
  assert module.startswith(str(venv)) and default_config.startswith(str(venv)), where.stdout
  run = subprocess.run(
      [python, "-m", "metaphorstar_jax.train", "--config.stages[0].steps=1",
       "--config.stages[1].steps=1", "--config.stages[1].warmup_steps=0",
       "--config.train.prompts_per_step=2", "--config.rl.group_size=2",
       "--config.rl.max_new_tokens=4", "--config.eval.num_examples=2",
       "--config.data.task_options.num_records=8", "--config.data.eval_task_options.num_records=2",
       "--config.log.progress_bar=False", "--config.log.tensorboard=False"],
      cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert '"after grpo"' in run.stdout
  assert os.path.exists(elsewhere / "runs" / "tfq_grpo_tiny" / "curves.png")
