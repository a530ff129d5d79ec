"""Training machinery used by `metaphorstar_jax.train`: policy scoring, update steps, state I/O."""
