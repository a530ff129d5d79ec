"""Networks. Modules here import nothing from rl/, data/ or sampling/."""

from metaphorstar_jax.models import qwen2_5_vl

__all__ = ["qwen2_5_vl"]
