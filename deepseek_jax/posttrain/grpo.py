"""Group Relative Policy Optimization (DeepSeekMath section 4.1, Eq. 3; used for DeepSeek-R1-Zero and R1).

For each prompt, G completions o_1..o_G are sampled from the old policy and rewarded by rules. Then

  A_i      = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + adv_eps)          every token of o_i gets A_i
  ratio_t  = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t)
  pg_t     = -min(ratio_t A, clip(ratio_t, 1 - eps, 1 + eps) A)
  kl_t     = pi_ref / pi - log(pi_ref / pi) - 1                          (k3: unbiased, always >= 0)
  loss     = sum_{i,t} w_it (pg_t + beta kl_t)

with no value model. The weights w pick the normalization:
  "sequence" (DeepSeekMath, R1): w_it = 1 / (B |o_i|): each completion's tokens are averaged, then completions;
  "token" (DAPO, Dr. GRPO):      w_it = 1 / sum_i |o_i|: one mean over all completion tokens of the batch, so
                                 long completions are not down-weighted per token.
std is the population std of the group (ddof 0). Prompt and padding tokens have w = 0. The old-policy and
reference log-probs are inputs (see `score_rollout`): the step itself never holds the reference parameters.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deepseek_jax.config import Config
from deepseek_jax.posttrain import logprobs as lp
from deepseek_jax.posttrain.update import apply_gradients, summed_grads
from deepseek_jax.trainer import BATCH_KEYS, TrainState

# A rollout batch: the model batch (BATCH_KEYS; loss_mask = completion tokens) plus these float32 [B, L] arrays.
ROLLOUT_KEYS = BATCH_KEYS + ("advantages", "old_logp", "ref_logp")


def group_advantages(rewards_B, group_size: int, eps: float):
  """(r - group mean) / (group std + eps); rows i*G .. i*G+G-1 are the G completions of prompt i."""
  rewards_B = jnp.asarray(rewards_B, jnp.float32)
  if rewards_B.ndim != 1 or rewards_B.shape[0] % group_size or rewards_B.shape[0] == 0:
    raise ValueError(f"rewards of shape {rewards_B.shape} do not split into groups of {group_size}")
  r_NG = rewards_B.reshape(-1, group_size)
  adv_NG = (r_NG - r_NG.mean(axis=1, keepdims=True)) / (r_NG.std(axis=1, keepdims=True) + eps)
  return adv_NG.reshape(-1)


def loss_weights(mask_BL, norm: str):
  """Per-token weights of the loss (module docstring); 0 on prompt and padding tokens."""
  mask_BL = mask_BL.astype(jnp.float32)
  if norm == "sequence":
    lengths_B1 = jnp.maximum(mask_BL.sum(axis=1, keepdims=True), 1.0)
    return mask_BL / lengths_B1 / mask_BL.shape[0]
  if norm == "token":
    return mask_BL / jnp.maximum(mask_BL.sum(), 1.0)
  raise ValueError(f"loss_norm={norm!r} is not 'sequence' or 'token'")


def grpo_objective(logp_BL, old_logp_BL, ref_logp_BL, adv_BL, weight_BL, *, clip_eps: float, kl_beta: float):
  """The GRPO loss (module docstring) from per-token log-probs -> (loss, per-token terms for metrics)."""
  ratio_BL = jnp.exp(logp_BL - old_logp_BL)
  unclipped_BL = ratio_BL * adv_BL
  clipped_BL = jnp.clip(ratio_BL, 1.0 - clip_eps, 1.0 + clip_eps) * adv_BL
  pg_BL = -jnp.minimum(unclipped_BL, clipped_BL)
  log_ref_ratio_BL = ref_logp_BL - logp_BL
  kl_BL = jnp.exp(log_ref_ratio_BL) - log_ref_ratio_BL - 1.0
  loss = jnp.sum(weight_BL * (pg_BL + kl_beta * kl_BL))
  # The clipped term won the min: this token's gradient is zero.
  is_clipped_BL = (clipped_BL < unclipped_BL).astype(jnp.float32)
  return loss, {"pg": pg_BL, "kl": kl_BL, "clipped": is_clipped_BL, "ratio": ratio_BL}


def _loss_fn(params, bias, mb, *, graphdef, cfg: Config, n_micro: int):
  pt = cfg.posttrain
  logits_BLV, aux = lp.forward_logits(graphdef, params, bias, mb, pt.temperature)
  logp_BL = lp.token_logprobs_from_logits(logits_BLV, mb["targets"], mb["loss_mask"])
  loss, terms = grpo_objective(logp_BL, mb["old_logp"], mb["ref_logp"], mb["advantages"], mb["weight"],
                               clip_eps=pt.grpo.clip_eps, kl_beta=pt.grpo.kl_beta)
  tw_BL = mb["token_weight"]   # metrics are means over completion tokens of the whole batch
  metrics = {"loss": loss, "pg_loss": jnp.sum(mb["weight"] * terms["pg"]), "kl": jnp.sum(tw_BL * terms["kl"]),
             "clip_frac": jnp.sum(tw_BL * terms["clipped"]), "ratio": jnp.sum(tw_BL * terms["ratio"]),
             "entropy": jnp.sum(tw_BL * lp.token_entropy_from_logits(logits_BLV, mb["loss_mask"])),
             "aux_loss": aux.aux_loss / n_micro, "completion_tokens": mb["loss_mask"].sum()}
  return loss + aux.aux_loss / n_micro, (metrics, aux.load)


def grpo_step(state: TrainState, batch: dict, *, graphdef, tx, cfg: Config):
  """One optimizer update on a rollout batch (keys ROLLOUT_KEYS, [B, L]) -> (new state, metrics).

  Shaped like `trainer.train_step` (bind graphdef/tx/cfg with functools.partial, jit with donation); the
  caller runs it `posttrain.grpo.inner_steps` times per rollout batch, against the same stored old_logp.
  """
  n_micro = cfg.train.grad_accum
  full = {k: batch[k] for k in ROLLOUT_KEYS}
  full["weight"] = loss_weights(batch["loss_mask"], cfg.posttrain.grpo.loss_norm)
  full["token_weight"] = loss_weights(batch["loss_mask"], "token")
  loss_fn = functools.partial(_loss_fn, graphdef=graphdef, cfg=cfg, n_micro=n_micro)
  grads, metrics, load_LE = summed_grads(loss_fn, state.params, state.bias, full, n_micro)
  state, more = apply_gradients(state, grads, load_LE, tx=tx, cfg=cfg)
  return state, {**metrics, **more}


def score_rollout(batch: dict, params, bias, ref_params, ref_bias, *, graphdef, temperature: float) -> dict:
  """Adds old_logp (under `params`, the policy that sampled) and ref_logp (under the frozen reference) to a
  rollout batch. With ref_params None (kl_beta = 0) ref_logp = old_logp, so the 'kl' metric then measures the
  drift from the sampling policy. Jit it once with graphdef and temperature bound."""
  old = lp.sequence_logprobs(graphdef, params, bias, batch, temperature)
  ref = old if ref_params is None else lp.sequence_logprobs(graphdef, ref_params, ref_bias, batch, temperature)
  return {**batch, "old_logp": jax.lax.stop_gradient(old), "ref_logp": jax.lax.stop_gradient(ref)}


def check_reference(params, ref_params, what: str = "reference policy") -> None:
  """Raises a one-line ValueError unless `ref_params` has the structure and shapes of `params`."""
  if jax.tree.structure(params) != jax.tree.structure(ref_params):
    raise ValueError(f"{what} parameters do not have the policy's structure (a different model config?)")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params)):
    if a.shape != b.shape:
      raise ValueError(f"{what} parameter {jax.tree_util.keystr(path)} has shape {b.shape}, the policy's {a.shape}")
