"""metaphorstar_jax: reinforcement learning for vision-language models in JAX/Flax."""

__version__ = "0.1.0"
