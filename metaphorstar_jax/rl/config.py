"""Every knob of the GRPO-family objective and of the rollout it assumes, and named presets.

Knob names are the ones verl users type (`actor_rollout_ref.actor.clip_ratio_low`,
`algorithm.norm_adv_by_std_in_grpo`, ...), flattened. Each field's comment names its dotted verl
path or, where verl has no such knob, the TRL or EasyR1 name it comes from. This module is the only
place in `rl/` where numbers live: the functions in the other modules take them as arguments, and
their keyword defaults are read from `LossConfig()` below.

Both config classes are frozen dataclasses, so they hash and can be closed over by, or passed as a
static argument to, a jitted train step.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

ADV_ESTIMATORS = ("grpo", "rloo")
LOSS_MODES = ("vanilla", "gspo", "gspo_token")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                  "seq-mean-token-sum-norm")
SCALE_REWARDS = ("group", "batch")
# verl's spellings and aliases; a trailing "+" (e.g. "low_var_kl+") takes the value of the named
# estimator and the gradient of k2 (verl's straight-through form).
KL_TYPES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
KL_CTRL_TYPES = ("fixed", "adaptive")


def _check_choice(owner: str, name: str, value: str, choices: tuple[str, ...], hint: str = ""):
  if value not in choices:
    raise ValueError(f"{owner}.{name}={value!r} is not one of {list(choices)}.{hint}")


def _check_kl_type(owner: str, name: str, value: str):
  base = value[:-1] if value.endswith("+") else value
  _check_choice(owner, name, base, KL_TYPES,
                " A trailing '+' (e.g. 'low_var_kl+') is also accepted. verl's 'full' needs the "
                "whole vocabulary distribution and is not supported.")


def _from_mapping(cls, values: Mapping[str, Any]):
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = [k for k in values if k not in names]
  if unknown:
    hints = []
    for key in unknown:
      close = difflib.get_close_matches(key, names, n=1)
      hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(f"{cls.__name__} has no field(s) {', '.join(hints)}. Known fields: {names}.")
  return cls(**values)


class _Knobs:
  """What both knob classes offer: copies with changes, and plain dicts both ways."""

  def replace(self, **changes):
    """A copy with `changes` applied; unknown names are reported with the closest known one."""
    return _from_mapping(type(self), {**dataclasses.asdict(self), **changes})

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]):
    """Builds from a plain mapping (e.g. a `ConfigDict.to_dict()`), rejecting unknown keys."""
    return _from_mapping(cls, values)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LossConfig(_Knobs):
  """Advantage estimator, policy loss, KL, entropy, importance correction and DAPO knobs."""

  # --- advantages (verl `algorithm.*`) ----------------------------------------------------------
  adv_estimator: str = "grpo"  # algorithm.adv_estimator: "grpo" (z-score / mean-only) or "rloo"
  norm_adv_by_std_in_grpo: bool = True  # algorithm.norm_adv_by_std_in_grpo; False gives Dr.GRPO
  # TRL `scale_rewards`: the std is taken per group or over the whole batch. TRL's "none" is spelled
  # norm_adv_by_std_in_grpo=False here.
  scale_rewards: str = "group"
  adv_std_unbiased: bool = True  # verl, EasyR1, TRL and Tunix all use torch.std, i.e. ddof=1
  adv_eps: float = 1e-6  # verl/EasyR1 `epsilon` in (r - mean) / (std + eps)

  # --- policy loss (verl `actor_rollout_ref.actor.*`) ---------------------------------------------
  # actor.policy_loss.loss_mode: "vanilla" (PPO clip), "gspo" or "gspo_token" (see losses).
  loss_mode: str = "vanilla"
  clip_ratio_low: float = 0.2  # actor.clip_ratio_low: ratio floor 1 - clip_ratio_low
  clip_ratio_high: float = 0.2  # actor.clip_ratio_high: ratio ceiling 1 + clip_ratio_high
  clip_ratio_c: float | None = 3.0  # actor.clip_ratio_c: dual-clip bound, negative advantages only
  loss_agg_mode: str = "token-mean"  # actor.loss_agg_mode, used for pg, KL and entropy terms alike
  # The constant of "seq-mean-token-sum-norm" (Dr.GRPO's generation budget); None: the padded
  # completion length N of the batch, which is max_response_length for a fixed-size sampler.
  loss_agg_norm_length: int | None = None
  log_ratio_clamp: float = 20.0  # |log pi/pi_old| is clamped here before exp, as verl does
  entropy_coeff: float = 0.0  # actor.entropy_coeff: loss -= entropy_coeff * aggregated entropy

  # --- KL to the reference policy as a loss term (verl `actor_rollout_ref.actor.*`) ---------------
  use_kl_loss: bool = False  # actor.use_kl_loss
  kl_loss_coef: float = 0.001  # actor.kl_loss_coef
  kl_loss_type: str = "low_var_kl"  # actor.kl_loss_type
  kl_log_ratio_clamp: float = 20.0  # verl/EasyR1 clamp (ref - logp) to +-20 inside low_var_kl
  low_var_kl_clamp: float = 10.0  # ... and clamp the low_var_kl value itself to +-10

  # --- KL folded into the token rewards (verl `algorithm.*`) --------------------------------------
  use_kl_in_reward: bool = False  # algorithm.use_kl_in_reward
  kl_penalty: str = "kl"  # algorithm.kl_penalty: the estimator used in the reward
  kl_coef: float = 0.001  # algorithm.kl_ctrl.kl_coef: initial (or fixed) coefficient
  kl_ctrl_type: str = "fixed"  # algorithm.kl_ctrl.type
  kl_target: float = 0.1  # algorithm.kl_ctrl.target_kl (adaptive controller)
  kl_horizon: int = 10000  # algorithm.kl_ctrl.horizon (adaptive controller)
  kl_ctrl_max_error: float = 0.2  # the adaptive controller clips (kl / target - 1) to +-this

  # --- sampler/trainer log-prob mismatch --------------------------------------------------------
  # Truncated importance sampling: the pg loss of each token is weighted by
  # min(exp(old_logprob - sampler_logprob), tis_cap), detached. None turns it off (verl
  # `algorithm.rollout_is_threshold`, TRL `vllm_importance_sampling_cap`).
  tis_cap: float | None = None

  # --- DAPO -------------------------------------------------------------------------------------
  filter_groups: bool = False  # algorithm.filter_groups.enable: drop groups with all-equal rewards
  filter_groups_metric: str = "seq_reward"  # algorithm.filter_groups.metric: which reward to test
  # algorithm.filter_groups.max_num_gen_batches: generation batches per step before giving up;
  # 0 means no bound (verl's default). We default to the DAPO recipe's bound.
  max_num_gen_batches: int = 10
  overlong_buffer: bool = False  # reward_model.overlong_buffer.enable: soft overlong penalty
  overlong_buffer_len: int = 4096  # reward_model.overlong_buffer.len
  overlong_penalty_factor: float = 1.0  # reward_model.overlong_buffer.penalty_factor
  mask_truncated_completions: bool = False  # TRL name: drop truncated completions from the loss

  def __post_init__(self):
    owner = "LossConfig"
    _check_choice(owner, "adv_estimator", self.adv_estimator, ADV_ESTIMATORS,
                  " Dr.GRPO is adv_estimator='grpo' with norm_adv_by_std_in_grpo=False.")
    if self.scale_rewards == "none":
      raise ValueError("LossConfig.scale_rewards='none' (TRL) is spelled "
                       "norm_adv_by_std_in_grpo=False here; keep scale_rewards 'group' or 'batch'.")
    _check_choice(owner, "scale_rewards", self.scale_rewards, SCALE_REWARDS)
    _check_choice(owner, "loss_mode", self.loss_mode, LOSS_MODES)
    _check_choice(owner, "loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
    _check_kl_type(owner, "kl_loss_type", self.kl_loss_type)
    _check_kl_type(owner, "kl_penalty", self.kl_penalty)
    _check_choice(owner, "kl_ctrl_type", self.kl_ctrl_type, KL_CTRL_TYPES)
    if not 0.0 <= self.clip_ratio_low < 1.0:
      raise ValueError(f"LossConfig.clip_ratio_low={self.clip_ratio_low} must lie in [0, 1): the "
                       "ratio floor is 1 - clip_ratio_low.")
    if self.clip_ratio_high < 0.0:
      raise ValueError(f"LossConfig.clip_ratio_high={self.clip_ratio_high} must be >= 0.")
    if self.clip_ratio_c is not None and self.clip_ratio_c <= 1.0:
      raise ValueError(f"LossConfig.clip_ratio_c={self.clip_ratio_c} must be > 1 (verl requires "
                       "the same); use None to turn dual-clip off.")
    if self.loss_agg_norm_length is not None and self.loss_agg_norm_length <= 0:
      raise ValueError(f"LossConfig.loss_agg_norm_length={self.loss_agg_norm_length} must be a "
                       "positive token count, or None for the padded completion length.")
    if self.tis_cap is not None and self.tis_cap <= 0:
      raise ValueError(f"LossConfig.tis_cap={self.tis_cap} must be > 0, or None to turn TIS off.")
    if self.adv_eps < 0 or self.log_ratio_clamp <= 0:
      raise ValueError("LossConfig.adv_eps must be >= 0 and log_ratio_clamp > 0; got "
                       f"{self.adv_eps} and {self.log_ratio_clamp}.")
    if self.max_num_gen_batches < 0:
      raise ValueError(f"LossConfig.max_num_gen_batches={self.max_num_gen_batches} must be >= 0 "
                       "(0 means no bound).")
    if self.overlong_buffer and self.overlong_buffer_len <= 0:
      raise ValueError(f"LossConfig.overlong_buffer_len={self.overlong_buffer_len} must be > 0 "
                       "when overlong_buffer is on.")
    if self.kl_ctrl_type == "adaptive" and self.kl_horizon <= 0:
      raise ValueError(f"LossConfig.kl_horizon={self.kl_horizon} must be > 0 for the adaptive "
                       "KL controller.")


@dataclasses.dataclass(frozen=True)
class RolloutConfig(_Knobs):
  """Sampling knobs the objective assumes (verl `actor_rollout_ref.rollout.*`, `data.*`).

  top_p=1.0 means no truncation, as in vLLM and verl (top-k is `config.rl.top_k`; every preset
  leaves it off). The validation fields are evaluation's defaults (EasyR1 `val_override_config`,
  verl `rollout.val_kwargs`).
  """

  n: int = 1  # rollout.n: completions per prompt, the group size G
  temperature: float = 1.0  # rollout.temperature
  top_p: float = 1.0  # rollout.top_p
  max_response_length: int = 512  # data.max_response_length
  val_temperature: float = 0.0
  val_top_p: float = 1.0

  def __post_init__(self):
    if self.n < 1:
      raise ValueError(f"RolloutConfig.n={self.n} must be >= 1.")
    if self.temperature <= 0:
      raise ValueError(f"RolloutConfig.temperature={self.temperature} must be > 0 for training "
                       "rollouts: the loss needs the sampling distribution's log-probs.")
    for name in ("top_p", "val_top_p"):
      value = getattr(self, name)
      if not 0.0 < value <= 1.0:
        raise ValueError(f"RolloutConfig.{name}={value} must lie in (0, 1].")
    if self.max_response_length <= 0:
      raise ValueError(f"RolloutConfig.max_response_length={self.max_response_length} must be "
                       "> 0.")
    if self.val_temperature < 0:
      raise ValueError(f"RolloutConfig.val_temperature={self.val_temperature} must be >= 0 "
                       "(0 is greedy).")


@dataclasses.dataclass(frozen=True)
class RLPreset:
  """A named recipe: the objective, the rollout it was run with, and where the numbers come from."""

  name: str
  loss: LossConfig
  rollout: RolloutConfig
  source: str

  def __post_init__(self):
    loss, rollout = self.loss, self.rollout
    if loss.overlong_buffer and loss.overlong_buffer_len >= rollout.max_response_length:
      raise ValueError(f"Preset {self.name!r}: overlong_buffer_len={loss.overlong_buffer_len} "
                       f"must be shorter than max_response_length={rollout.max_response_length}; "
                       "the penalty ramps over the last overlong_buffer_len tokens.")
    if loss.adv_estimator == "rloo" and rollout.n < 2:
      raise ValueError(f"Preset {self.name!r}: RLOO needs rollout.n >= 2, got {rollout.n}.")


def _grpo() -> RLPreset:
  # verl defaults for the actor (trainer/config/actor/actor.yaml: clip_ratio 0.2, clip_ratio_c 3.0,
  # token-mean, kl_loss_coef 0.001, low_var_kl) with the KL loss turned on as docs/algo/grpo.md
  # asks, and verl's examples/grpo_trainer scripts (rollout.n=5, temperature 1.0).
  return RLPreset(
      name="grpo",
      loss=LossConfig(use_kl_loss=True),
      rollout=RolloutConfig(n=5),
      source="verl actor defaults + docs/algo/grpo.md; examples/grpo_trainer (n=5)")


def _dr_grpo() -> RLPreset:
  # Dr.GRPO (arXiv 2503.20783): no std normalisation, a constant token normaliser instead of
  # 1/|o_i|, no KL term; 8 samples per prompt at temperature 1.0. verl spells it
  # loss_agg_mode=seq-mean-token-sum-norm, use_kl_loss=False, norm_adv_by_std_in_grpo=False.
  return RLPreset(
      name="dr_grpo",
      loss=LossConfig(norm_adv_by_std_in_grpo=False, loss_agg_mode="seq-mean-token-sum-norm",
                      use_kl_loss=False),
      rollout=RolloutConfig(n=8),
      source="Dr.GRPO paper arXiv 2503.20783; verl docs/algo/grpo.md (Dr.GRPO section)")


def _dapo() -> RLPreset:
  # DAPO (arXiv 2503.14476) and verl recipe/dapo/run_dapo_qwen2.5_32b.sh: clip 0.2/0.28, dual-clip
  # 10.0, token-mean, no KL anywhere, dynamic sampling with at most 10 generation batches, a
  # 4096-token soft overlong buffer with factor 1.0 inside a 20480-token budget, 16 samples,
  # temperature 1.0, top_p 1.0. The recipe leaves overlong filtering off (docs/algo/dapo.md FAQ).
  return RLPreset(
      name="dapo",
      loss=LossConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=10.0,
                      loss_agg_mode="token-mean", use_kl_loss=False, use_kl_in_reward=False,
                      filter_groups=True, filter_groups_metric="acc", max_num_gen_batches=10,
                      overlong_buffer=True, overlong_buffer_len=4096, overlong_penalty_factor=1.0),
      rollout=RolloutConfig(n=16, temperature=1.0, top_p=1.0, max_response_length=20480),
      source="DAPO paper arXiv 2503.14476; verl recipe/dapo/run_dapo_qwen2.5_32b.sh")


def _gspo() -> RLPreset:
  # GSPO (arXiv 2507.18071): sequence-level, length-normalised ratio with clip ranges 3e-4 / 4e-4,
  # no KL; verl's GSPO loss aggregates seq-mean-token-mean and has no dual-clip. Rollout numbers
  # are not part of the method; they follow the grpo preset.
  return RLPreset(
      name="gspo",
      loss=LossConfig(loss_mode="gspo_token", clip_ratio_low=3e-4, clip_ratio_high=4e-4,
                      clip_ratio_c=None, loss_agg_mode="seq-mean-token-mean", use_kl_loss=False),
      rollout=RolloutConfig(n=5),
      source="GSPO paper arXiv 2507.18071; verl core_algos.compute_policy_loss_gspo")


def _metaphorstar() -> RLPreset:
  # MetaphorStar TFQ-GRPO as coded (MING-ZCH/MetaphorStar train/examples/config.yaml and
  # qwen2_5_vl_*_TFQ_Data_Lite_TFQ_GRPO.sh; specs/seed_methods.md 1.3-1.4): group z-score with
  # torch.std and eps 1e-6, clip 0.2/0.3 with dual-clip 3.0, token-mean, low_var_kl 1e-2 as a loss
  # (not in the reward), no entropy bonus; rollout n=5, temperature 1.0, top_p 0.99, prompts up to
  # 5500 and responses up to 2048 tokens; validation at temperature 0.5 with n=1 (EasyR1
  # val_override_config; top_p is not overridden there, so it stays 0.99).
  return RLPreset(
      name="metaphorstar",
      loss=LossConfig(adv_estimator="grpo", norm_adv_by_std_in_grpo=True, adv_eps=1e-6,
                      loss_mode="vanilla", clip_ratio_low=0.2, clip_ratio_high=0.3,
                      clip_ratio_c=3.0, loss_agg_mode="token-mean", use_kl_loss=True,
                      kl_loss_type="low_var_kl", kl_loss_coef=1e-2, use_kl_in_reward=False,
                      entropy_coeff=0.0),
      rollout=RolloutConfig(n=5, temperature=1.0, top_p=0.99, max_response_length=2048,
                            val_temperature=0.5, val_top_p=0.99),
      source="MING-ZCH/MetaphorStar train/examples/config.yaml + TFQ_GRPO launch scripts")


_PRESETS = {"grpo": _grpo, "dr_grpo": _dr_grpo, "dapo": _dapo, "gspo": _gspo,
            "metaphorstar": _metaphorstar}
PRESET_NAMES = tuple(_PRESETS)


def preset(name: str) -> RLPreset:
  """The named recipe; change a knob with `p.loss.replace(...)` / `p.rollout.replace(...)`."""
  if name not in _PRESETS:
    close = difflib.get_close_matches(name, PRESET_NAMES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown RL preset {name!r}; known presets are {list(PRESET_NAMES)}.{hint}")
  return _PRESETS[name]()
