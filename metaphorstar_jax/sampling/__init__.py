"""Rollouts: jitted prefill and while-loop decoding over a KV cache, groups of samples per prompt."""

from metaphorstar_jax.sampling.generate import conversation, generate
from metaphorstar_jax.sampling.logits_processing import next_tokens, top_k_filter, top_p_filter
from metaphorstar_jax.sampling.sampler import Rollouts, Sampler, SamplingConfig

__all__ = ["Rollouts", "Sampler", "SamplingConfig", "conversation", "generate", "next_tokens",
           "top_k_filter", "top_p_filter"]
