"""AdamW with global-norm clipping and DeepSeek-V3's learning-rate schedule (report section 4.2).

The schedule is warmup -> constant -> cosine -> constant. V3 used 2K warmup steps to 2.2e-4, held it, then a
cosine to 2.2e-5 (final_lr_ratio=0.1). The optimizer state is a plain optax pytree, so it checkpoints as is.

Router gates (the [D, E] `gate` of every MoE layer) can take a smaller step than the other weights
(`optim.router_lr_scale`): Adam moves each gate weight by about the same amount whatever the size of its
gradient, and early in training the router input is nearly the same vector for every token, so those steps
shift each expert's score for all tokens at once, faster than the aux-loss-free bias (a fixed gamma per step)
can follow. DeepSeek-V3 does not say how it treats the gate; see bench/results/2026-11-24-balance.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepseek_jax.config import ConfigError, OptimConfig

# Substrings of a parameter path that exclude it from weight decay. Shape alone does this for unstacked
# norms and biases (1-D), but a norm or router bias stacked over layers (scan) would be 2-D.
NO_DECAY_NAMES = ("norm", "bias")
# Name of the router gate weight in an MoE layer (moe.MoE.gate; Hugging Face `mlp.gate.weight`).
ROUTER_GATE_NAME = "gate"


def validate(cfg: OptimConfig) -> None:
  """Raises ConfigError (a ValueError) naming the first inconsistent optim.* value."""
  for name in ("warmup_steps", "constant_steps", "decay_steps"):
    if getattr(cfg, name) < 0:
      raise ConfigError(f"optim.{name}={getattr(cfg, name)} must be >= 0")
  if not cfg.lr > 0:
    raise ConfigError(f"optim.lr={cfg.lr} must be > 0")
  if not 0.0 <= cfg.final_lr_ratio <= 1.0:
    raise ConfigError(f"optim.final_lr_ratio={cfg.final_lr_ratio} must be in [0, 1]")
  if not (0.0 <= cfg.b1 < 1.0 and 0.0 <= cfg.b2 < 1.0):
    raise ConfigError(f"optim.b1={cfg.b1} and optim.b2={cfg.b2} must be in [0, 1)")
  if not cfg.eps > 0:
    raise ConfigError(f"optim.eps={cfg.eps} must be > 0")
  if cfg.weight_decay < 0:
    raise ConfigError(f"optim.weight_decay={cfg.weight_decay} must be >= 0")
  if not 0.0 <= cfg.router_lr_scale <= 1.0:
    raise ConfigError(f"optim.router_lr_scale={cfg.router_lr_scale} must be in [0, 1] (1 = same lr as the rest)")
  if cfg.schedule == "cosine":
    if cfg.decay_steps <= cfg.warmup_steps:
      raise ConfigError(f"optim.schedule='cosine' needs decay_steps (total steps incl. warmup) > warmup_steps, "
                        f"got decay_steps={cfg.decay_steps} warmup_steps={cfg.warmup_steps}")
    if cfg.constant_steps:
      raise ConfigError(f"optim.constant_steps={cfg.constant_steps} is only used by schedule='deepseek'; "
                        "set it to 0 for 'cosine'")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
  """Learning rate as a function of the optimizer step (0-based).

  "deepseek": 0 -> lr linearly over warmup_steps, lr for constant_steps, cosine to lr*final_lr_ratio over
  decay_steps, then lr*final_lr_ratio forever. decay_steps=0 means no decay: lr stays at peak after warmup.
  "cosine": optax's warmup_cosine_decay_schedule; decay_steps is the total length including warmup.
  """
  validate(cfg)
  peak, end = cfg.lr, cfg.lr * cfg.final_lr_ratio
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, cfg.warmup_steps, cfg.decay_steps, end_value=end)
  parts = []  # (length in steps, schedule); join_schedules restarts each schedule's count at 0
  if cfg.warmup_steps:
    parts.append((cfg.warmup_steps, optax.linear_schedule(0.0, peak, cfg.warmup_steps)))
  if cfg.constant_steps or not cfg.decay_steps:
    parts.append((cfg.constant_steps, optax.constant_schedule(peak)))
  if cfg.decay_steps:
    # After decay_steps the cosine stays at alpha*peak: that is the final constant phase.
    parts.append((cfg.decay_steps, optax.cosine_decay_schedule(peak, cfg.decay_steps, alpha=cfg.final_lr_ratio)))
  boundaries = np.cumsum([n for n, _ in parts[:-1]], dtype=int).tolist()
  return optax.join_schedules([s for _, s in parts], boundaries)


def _names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", "")))).lower() for k in path]


def decay_mask(params):
  """True where AdamW applies weight decay: matrices, embeddings and stacked experts (ndim >= 2), but never
  norm scales or biases. Works on any pytree of arrays or ShapeDtypeStructs."""
  def keep(path, x) -> bool:
    names = _names(path)
    return x.ndim >= 2 and not any(word in n for n in names for word in NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(keep, params)


def router_mask(params):
  """True on the router gate weights: the leaves whose last path key is exactly 'gate'."""
  return jax.tree_util.tree_map_with_path(lambda path, x: bool(path) and _names(path)[-1] == ROUTER_GATE_NAME,
                                          params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """chain(clip_by_global_norm, adamw, router scale) with the learning rate kept in the state (`current_lr`).

  Only the learning rate is injected: b1/b2/eps/weight_decay stay static, so after a resume the config, not
  the checkpoint, decides them. clip_norm <= 0 disables clipping through `identity`, which keeps the state's
  tree structure (and so old checkpoints) the same either way. The last stage multiplies the router gates'
  updates (Adam step and decoupled weight decay alike) by router_lr_scale; it is stateless and always
  present, so the state's structure does not depend on the value either.
  """
  clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity()
  static = ("b1", "b2", "eps", "eps_root", "weight_decay", "mask", "mu_dtype")
  adamw = optax.inject_hyperparams(optax.adamw, static_args=static)(
      learning_rate=make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
      weight_decay=cfg.weight_decay, mask=decay_mask, mu_dtype=jnp.dtype(cfg.mu_dtype))
  router = optax.masked(optax.scale(cfg.router_lr_scale), router_mask)
  return optax.chain(clip, adamw, router)


def current_lr(opt_state) -> jax.Array:
  """The learning rate used by the most recent update (the schedule at step 0 before any update)."""
  return opt_state[1].hyperparams["learning_rate"]
