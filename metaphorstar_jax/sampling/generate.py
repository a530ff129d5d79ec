"""A small user-facing helper: prompts and images in, completion strings out."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from PIL import Image

from metaphorstar_jax.sampling.sampler import Sampler, SamplingConfig


def conversation(prompt: str, images: Sequence[Image.Image] = ()) -> list[dict]:
  """One user turn: the images first, then the text."""
  content = [{"type": "image", "image": image} for image in images]
  return [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]


def generate(model, processor, prompts: Sequence[str | list[dict]],
             images: Sequence[Sequence[Image.Image]] | None = None, *, max_new_tokens: int = 128,
             greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             num_samples: int = 1, seed: int = 0, sampler: Sampler | None = None) -> list[list[str]]:
  """Generates text for each prompt.

  Args:
    model: a Qwen2_5_VL.
    processor: a `metaphorstar_jax.data.ChatProcessor`.
    prompts: strings (one user turn each) or whole conversations.
    images: per prompt, the images of its user turn (only for string prompts).
    num_samples: completions per prompt.
    sampler: reuse a Sampler across calls to keep its compiled programs.

  Returns:
    For each prompt, `num_samples` completion strings (stop tokens and padding removed).
  """
  images = images or [()] * len(prompts)
  conversations = [p if not isinstance(p, str) else conversation(p, imgs)
                   for p, imgs in zip(prompts, images)]
  sampler = sampler or Sampler(model, SamplingConfig(
      max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p,
      top_k=top_k))
  rollouts = sampler(processor(conversations), group_size=num_samples,
                     key=jax.random.key(seed))
  texts = sampler.texts(processor, rollouts.tokens_BN, rollouts.lengths_B)
  return [texts[p * num_samples:(p + 1) * num_samples] for p in range(len(conversations))]
