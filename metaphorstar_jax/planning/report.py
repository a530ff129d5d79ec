"""A plan in words: what does not fit and the settings that probably would, the Markdown table,
and the message a misfit stops with."""

from __future__ import annotations

from metaphorstar_jax.planning.targets import GiB


def suggestions(plan: dict) -> list[str]:
  """What does not fit, then settings that would probably fit, each with a rough estimate of
  the new peak (rerun the plan with the setting to measure it)."""
  limit, peak = plan["memory_per_chip"], plan["peak_per_chip"]
  state, settings, chips = plan["state_per_chip"], plan["config"], plan["chips"]
  worst = max((r for r in plan["programs"] if r.get("peak") is not None),
              key=lambda r: r["peak"], default=None)
  out = [f"{r['name']} ({r['stage']}) did not compile: {r['error']}"
         for r in plan["programs"] if r.get("error") and r.get("peak") is None]
  if worst is None:
    return out
  if worst["peak"] > limit:
    out.append(f"{worst['name']} ({worst['stage']}) needs {_gib(worst['peak'])} per chip at its "
               f"peak, {_gib(worst['peak'] - limit)} over the {_gib(limit)} of a {plan['chip']}")
  rollout = worst["name"].startswith(("prefill", "decode"))
  temporaries = worst.get("temporaries", 0)
  if worst["name"].endswith(("_grads", "logprobs")) and "temporaries" in worst:
    shrinking = temporaries + max(0, worst["arguments"] - state["params"])
    fixed = worst["peak"] - shrinking
    accum = settings["grad_accum_steps"]
    prompts = settings["prompts_per_step"] // settings["num_minibatches"]
    most = max(1, prompts // accum)  # one prompt per micro-batch at the most
    k = next((k for k in range(2, most + 1)
              if most % k == 0 and fixed + shrinking / k <= limit), None)
    if k:
      out.append(f"--config.train.grad_accum_steps={accum * k}: about "
                 f"{_gib(fixed + shrinking / k)} per chip (activations scale with the "
                 "micro-batch)")
    else:
      out.append(f"even one prompt per micro-batch (--config.train.grad_accum_steps={prompts}) "
                 f"leaves about {_gib(fixed + shrinking / most)} per chip")
    if not settings["remat"]:
      out.append("--config.model.remat=True: keeps one activation per block for the backward "
                 "pass")
    if not settings.get("remat_offload"):
      out.append("--config.model.remat_offload=True (with remat): those activations wait in "
                 "host memory instead")
    if settings["logit_chunk"] == 0:
      out.append("--config.train.logit_chunk=256: the LM head forms fp32 logits 256 tokens at "
                 "a time instead of over every completion token at once")
  if state["reference"] and settings["param_dtype"] == "float32":
    out.append(f"a bf16 reference copy would save {_gib(state['reference'] / 2)} per chip (not "
               "a config field yet)")
  sharded = sum(state[k] for k in ("params", "optimizer_state", "reference",
                                   "gradient_accumulator"))
  for factor in (2, 4, 8):
    guess = worst["peak"] - (sharded + temporaries) * (1 - 1 / factor)
    if guess <= limit:
      out.append(f"{chips * factor} chips with --config.mesh.fsdp=-1: about {_gib(guess)} per "
                 "chip, if the temporaries shard as well as the state")
      break
  squeezed = [r for r in plan["programs"] if r.get("error") and r.get("budget")]
  if squeezed and settings["hbm_headroom"] > 0:
    r = squeezed[0]
    out.append(f"{r['name']} ({r['stage']}) was compiled to fit {_gib(r['budget'])}: the chip "
               f"less --config.memory.hbm_headroom={settings['hbm_headroom']:g} of it less the "
               "state outside the program; a smaller headroom gives it more")
  if rollout:
    out.append("the rollout runs the whole generation batch at once: fewer "
               "--config.train.prompts_per_step, shorter --config.rl.max_new_tokens or "
               "data.max_prompt_tokens, or smaller images (--config.image.max_pixels) shrink it")
  return out



def _gib(n) -> str:
  return "—" if n is None else f"{n / GiB:.2f} GiB"


def _num(x, unit="") -> str:
  if x is None:
    return "—"
  for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.1f} {suffix}{unit}"
  return f"{x:.0f} {unit}"


def _seconds(x) -> str:
  return "—" if x is None else f"{x:.2f}"


def markdown(plan: dict) -> str:
  """The plan as Markdown: resident state, one row per program, the verdict and the estimate."""
  est = " (estimated from TPU)" if plan["temporaries_estimated"] else ""
  mesh = ", ".join(f"{k}={v}" for k, v in plan["mesh"].items())
  lines = [f"### Plan: {plan['config']['model']} on {plan['topology']} ({plan['chips']} × "
           f"{plan['chip']}, {_gib(plan['memory_per_chip'])} each; compiled for "
           f"{plan['compiled_for']}; mesh {mesh})", "",
           "| resident per chip | bytes |", "|---|---|"]
  for k, v in plan["state_per_chip"].items():
    lines.append(f"| {k.replace('_', ' ')} | {_gib(v)} |")
  lines += ["", f"| program | stage | shapes | runs/step | arguments | outputs | "
                f"temporaries{est} | peak per chip | budget | FLOPs | bytes accessed | compile s | "
                "est. s/step |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in plan["programs"]:
    shapes = " ".join(f"{k}={v}" for k, v in r["shapes"].items())
    if r.get("error"):
      sizes = (f"{_gib(r['arguments'])} | {_gib(r['outputs'])} | {_gib(r['temporaries'])} "
               "(from the compiler's refusal)" if "temporaries" in r else " | | ")
      lines.append(f"| {r['name']} | {r['stage']} | {shapes} | {r['runs_per_step']} | {sizes} | "
                   f"{_gib(r.get('peak'))} | {_gib(r.get('budget'))} | did not compile | | "
                   f"{r.get('compile_seconds', '')} | |")
      continue
    lines.append(
        f"| {r['name']} | {r['stage']} | {shapes} | {r['runs_per_step']} | "
        f"{_gib(r['arguments'])} | {_gib(r['outputs'] - r['aliased'])} | "
        f"{_gib(r['temporaries'])} | {_gib(r['peak'])} | {_gib(r.get('budget'))} | "
        f"{_num(r['flops'])} | "
        f"{_num(r['bytes_accessed'], 'B')} | {r['compile_seconds']} | "
        f"{_seconds(r.get('seconds_estimate'))} |")
  verdict = "fits" if plan["fits"] else "DOES NOT FIT"
  headroom = (f", {100 * plan['headroom']:.0f}% headroom" if plan["headroom"] >= 0 else
              f", {_gib(plan['peak_per_chip'] - plan['memory_per_chip'])} over")
  lines += ["", f"Peak per chip: {_gib(plan['peak_per_chip'])} in {plan['peak_program']} of "
                f"{_gib(plan['memory_per_chip'])}: **{verdict}**{headroom}. Compiling took "
                f"{plan['compile_seconds']} s."]
  if any(r.get("budget") for r in plan["programs"]):
    lines.append("Budget: the bytes per chip the compiler was told each program may use, the "
                 "chip's memory less memory.hbm_headroom="
                 f"{plan['config']['hbm_headroom']:g} of it less the state resident outside the "
                 "program (train compiles with the same budgets).")
  offloaded = [r for r in plan["programs"] if r.get("host_temporaries")]
  if offloaded:
    lines.append("Host memory (model.remat_offload: layer inputs kept for the backward pass): " +
                 ", ".join(f"{r['name']} {_gib(r['host_temporaries'])}" for r in offloaded) +
                 " per chip, not counted in the peak.")
  if plan["temporaries_estimated"]:
    lines.append("Arguments, outputs and resident state are exact for this mesh; temporaries "
                 f"are estimated from the same programs compiled for {plan['compiled_for']}.")
  if "estimate" in plan:
    e = plan["estimate"]
    mfu = "—" if e["actor_mfu"] is None else f"{100 * e['actor_mfu']:.0f}%"
    lines.append(f"Estimate ({e['note']}): step {e['step_seconds']:.1f} s (rollout "
                 f"{e['rollout_seconds']:.1f} s, update {e['update_seconds']:.1f} s), actor MFU "
                 f"about {mfu}. Chip figures: {plan['chip_source']}.")
  for s in plan.get("suggestions", []):
    lines.append(f"- {s}")
  return "\n".join(lines)


def refusal(plan: dict) -> str:
  """The message a plan that does not fit stops with."""
  return ("This step does not fit:\n  " + "\n  ".join(plan.get("suggestions", [])) +
          "\n(Plan: python -m metaphorstar_jax.plan --config=... --topology=...)")


class DoesNotFit(ValueError):
  """A step whose peak memory exceeds the chip's, with the plan that says so."""

  def __init__(self, plan: dict):
    super().__init__(refusal(plan))
    self.plan = plan

