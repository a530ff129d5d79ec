"""Shared test setup: eight simulated CPU devices for sharding tests, tiny HF reference models."""

import os
import sys
import tempfile

# Must precede the first jax import anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One persistent compilation cache for the session and the processes its tests start: many tests
# compile the same tiny-model programs, and on two cores compiling is most of their time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jax_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
  """name -> (transformers model, directory it was saved to); built once per session."""
  from hf_reference import build_hf_model
  built = {}

  def get(name):
    if name not in built:
      model = build_hf_model(name)
      directory = tmp_path_factory.mktemp(f"hf_tiny_{name}")
      model.save_pretrained(directory)
      built[name] = (model, str(directory))
    return built[name]

  return get
