"""Shared test setup: eight simulated CPU devices for sharding tests, tiny HF reference models."""

import os
import sys

# Must precede the first jax import anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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
