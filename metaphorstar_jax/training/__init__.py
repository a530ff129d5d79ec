"""What `metaphorstar_jax.train` builds and runs, one concern per module; README.md lists them in
reading order (one GRPO step is `grpo.py`)."""
