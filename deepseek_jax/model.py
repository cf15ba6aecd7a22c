"""DeepSeek-V3 / V2 / DeepSeekMoE transformer with Multi-Token Prediction.

Einsum letter glossary (also used as name suffixes, e.g. `x_BSD`):
  B batch   S query positions   T key positions (or B*S flattened tokens in MoE code)   D model width
  H heads   K nope head dim     R rope head dim   O value head dim   Q q latent   C kv latent
  E routed experts   k top-k   F expert hidden   G expert groups   V vocab   M sorted assignments (T*k)
(In MoE code T is the flattened B*S tokens; attention keeps T for key positions.)

Parameters live in `nnx.Param`s (float32), the router bias in `RouterBias` variables. Call `split_model`
once, then use the pure function `apply(graphdef, params, bias, batch)` under jit/grad/vmap.

The decoder stack is scanned: the dense prefix and the MoE layers are two `Block`s whose variables carry a
leading layer axis (logical name 'layers'), run by `jax.lax.scan`, so compile time does not grow with depth.
The MTP modules stay apart. `to_pure_dict` / `from_pure_dict` speak the per-layer layout ('layers': {i: ...})
used by conversion and export; `Transformer.blocks()` yields per-layer views (for generation).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax import rope
from deepseek_jax.attention import MHA, MLA
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import MLP, RMSNorm, RouterBias, dtype_of, param
from deepseek_jax.moe import MoE
from sharding.rules import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Aux(NamedTuple):
  """What the forward returns besides the main logits."""
  load: Any              # expert load [E] per MoE layer, a tree shaped like the router-bias tree
  aux_loss: jax.Array    # sum of the sequence-wise balance losses
  dropped: jax.Array     # int32: assignments dropped by capacity limits
  mtp_logits: list       # [B, S, V] per MTP depth; entry k-1 predicts token i+k+1 from position i


class Block(nnx.Module):
  """Pre-norm decoder block: h += attn(norm(h)); h += ffn(norm(h)); ffn is dense or MoE."""

  def __init__(self, cfg: ModelConfig, moe: bool, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
    self.attn = MLA(cfg, rngs=rngs) if cfg.attn_type == "mla" else MHA(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
    self.ffn = MoE(cfg, rngs=rngs) if moe else MLP(cfg, cfg.inter_dim, rngs=rngs)
    self.is_moe = moe

  def __call__(self, h_BSD, cos_sin, segment_ids_BS, token_mask_BS):
    h_BSD = h_BSD + self.attn(self.attn_norm(h_BSD), cos_sin, segment_ids_BS)
    h_BSD = constrain(h_BSD, ("batch", "seq", "act_embed"))
    if self.is_moe:
      y_BSD, stats = self.ffn(self.ffn_norm(h_BSD), token_mask_BS)
    else:
      y_BSD, stats = self.ffn(self.ffn_norm(h_BSD)), None
    return constrain(h_BSD + y_BSD, ("batch", "seq", "act_embed")), stats


class MTPModule(nnx.Module):
  """Depth-k MTP module: h' = eh_proj[enorm(emb(t_{i+k})) ; hnorm(h^{k-1}_i)], then one block, then a norm.

  The embedding half comes first, as in the released checkpoints (`eh_proj` [D, 2D]); spec section 6.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.enorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
    self.hnorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
    self.eh_proj = param(rngs, (2 * cfg.dim, cfg.dim), (None, "embed"), cfg.init_std)
    self.block = Block(cfg, cfg.n_routed_experts > 0, rngs=rngs)
    self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)   # shared_head.norm


def _stack(blocks: list[Block]) -> Block | None:
  """One Block whose variables are the given blocks' variables stacked on a new leading 'layers' axis."""
  if not blocks:
    return None
  stacked = jax.tree.map(lambda *vs: jnp.stack(vs), *(nnx.state(b) for b in blocks))
  for var in jax.tree.leaves(stacked, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    var.set_metadata(axes=("layers", *var.get_metadata()["axes"]))
  return nnx.merge(nnx.graphdef(blocks[0]), stacked)


STACKS = ("dense_layers", "moe_layers")   # the scanned stacks, in layer order


class Transformer(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), cfg.init_std)
    layers = [Block(cfg, cfg.is_moe_layer(i), rngs=rngs) for i in range(cfg.n_layers)]
    self.dense_layers = _stack([b for b in layers if not b.is_moe])
    self.moe_layers = _stack([b for b in layers if b.is_moe])
    self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
    self.head = param(rngs, (cfg.dim, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)
    self.mtp = nnx.List([MTPModule(cfg, rngs=rngs) for _ in range(cfg.n_mtp_layers)])

  def _embed(self, tokens_BS):
    # Gather the table's width in the compute dtype before the lookup: a lookup into a table split over the
    # token axes would make the partitioner rematerialize the whole table in float32.
    table_VD = constrain(self.embed[...].astype(dtype_of(self.cfg)), ("vocab", None))
    return table_VD[tokens_BS]

  def _logits(self, h_BSD):
    logits = jnp.einsum("bsd,dv->bsv", h_BSD, self.head[...].astype(h_BSD.dtype),
                        preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "seq", "act_vocab"))

  def _run_block(self, block: Block, h_BSD, cos_sin, segment_ids, token_mask):
    if self.cfg.remat == "none":
      return block(h_BSD, cos_sin, segment_ids, token_mask)
    fn = jax.checkpoint(lambda blk, h, cs, sg, tm: blk(h, cs, sg, tm), policy=REMAT_POLICIES[self.cfg.remat])
    return fn(block, h_BSD, cos_sin, segment_ids, token_mask)

  def _scan_stack(self, stack: Block, h_BSD, cos_sin, segment_ids, token_mask):
    """h through every layer of a stacked Block; returns (h, per-layer stats stacked, or None)."""
    graphdef, state = nnx.split(stack)

    def body(h, state_l):
      h, st = self._run_block(nnx.merge(graphdef, state_l), h, cos_sin, segment_ids, token_mask)
      return h, st if st is not None else {}

    if self.cfg.scan_layers:
      h_BSD, stats = jax.lax.scan(body, h_BSD, state)
    else:   # unrolled over static slices of the same stacked parameters (XLA reuses buffers across layers)
      per_layer = []
      for i in range(jax.tree.leaves(state)[0].shape[0]):
        h_BSD, st = body(h_BSD, jax.tree.map(lambda x, i=i: x[i], state))
        per_layer.append(st)
      stats = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return h_BSD, stats or None

  def blocks(self):
    """Per-layer Block views in layer order (slices of the stacks)."""
    for stack in (getattr(self, name) for name in STACKS):
      if stack is None:
        continue
      graphdef, state = nnx.split(stack)
      for i in range(jax.tree.leaves(state)[0].shape[0]):
        yield nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state))

  def __call__(self, tokens_BS, positions_BS=None, segment_ids_BS=None, *, mtp: bool = True):
    """Returns (logits_BSV float32, Aux). The last k positions of MTP depth k's logits are junk."""
    cfg = self.cfg
    B, S = tokens_BS.shape
    if positions_BS is None:
      positions_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    token_mask_BS = jnp.ones((B, S), bool) if segment_ids_BS is None else segment_ids_BS > 0
    cos_sin = rope.cos_sin(cfg, positions_BS)

    h_BSD = constrain(self._embed(tokens_BS), ("batch", "seq", "act_embed"))
    stats, load = [], {}     # load mirrors the router-bias tree: moe_layers.ffn.bias [L, E], mtp.j.block.ffn.bias
    for name in STACKS:
      if getattr(self, name) is not None:
        h_BSD, st = self._scan_stack(getattr(self, name), h_BSD, cos_sin, segment_ids_BS, token_mask_BS)
        if st is not None:
          stats.append(jax.tree.map(lambda x: x.sum(0), {k: v for k, v in st.items() if k != "load"}))
          load[name] = {"ffn": {"bias": st["load"]}}
    h_BSD = self.norm(h_BSD)
    logits_BSV = self._logits(h_BSD)

    mtp_logits = []
    if mtp:
      for j, module in enumerate(self.mtp):
        k = j + 1
        # Position i combines h^{k-1}_i with the embedding of token i+k (rolled; the tail is junk, masked
        # by the loss).
        emb_BSD = self._embed(jnp.roll(tokens_BS, -k, axis=1))
        x_BSD = jnp.concatenate([module.enorm(emb_BSD), module.hnorm(h_BSD)], axis=-1)
        h_BSD = x_BSD @ module.eh_proj[...].astype(x_BSD.dtype)
        h_BSD, st = self._run_block(module.block, h_BSD, cos_sin, segment_ids_BS, token_mask_BS)
        if st is not None:
          stats.append(st)
          load.setdefault("mtp", {})[j] = {"block": {"ffn": {"bias": st["load"]}}}
        mtp_logits.append(self._logits(module.norm(h_BSD)))
    return logits_BSV, Aux(load=load,
                           aux_loss=sum((st["aux_loss"] for st in stats), jnp.zeros((), jnp.float32)),
                           dropped=sum((st["dropped"] for st in stats), jnp.zeros((), jnp.int32)),
                           mtp_logits=mtp_logits)


# Functional interface ----------------------------------------------------------------------------------

def init_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  return Transformer(cfg, rngs=nnx.Rngs(params=seed))


def split_model(model: Transformer):
  """-> (graphdef, params State, router-bias State). Both states are pytrees."""
  graphdef, params, bias = nnx.split(model, nnx.Param, RouterBias)
  return graphdef, params, bias


def apply(graphdef, params, bias, tokens_BS, positions_BS=None, segment_ids_BS=None, *, mtp: bool = True):
  """Pure forward: (logits_BSV, aux)."""
  model = nnx.merge(graphdef, params, bias)
  return model(tokens_BS, positions_BS, segment_ids_BS, mtp=mtp)


def abstract_model(cfg: ModelConfig):
  """(graphdef, params, bias) with ShapeDtypeStruct leaves: no memory allocated (for big configs)."""
  return split_model(nnx.eval_shape(lambda: init_model(cfg)))


def param_axes(state) -> Any:
  """Logical axis names of every variable in a State (same tree structure, tuples as leaves)."""
  return jax.tree.map(lambda v: v.get_metadata().get("axes"), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def to_pure_dict(model_or_state, cfg: ModelConfig | None = None) -> dict:
  """Nested dict of arrays (params and router biases together) in the per-layer layout ('layers': {i: ...}),
  e.g. for conversion and export. A State needs its model's `cfg` (to number the layers)."""
  if isinstance(model_or_state, nnx.State):
    if cfg is None:
      raise TypeError("to_pure_dict(state) needs the model config to number the layers")
    return unstack_layers(cfg, nnx.to_pure_dict(model_or_state))
  return unstack_layers(model_or_state.cfg, nnx.to_pure_dict(nnx.state(model_or_state)))


def from_pure_dict(cfg: ModelConfig, tree: dict) -> Transformer:
  """Builds a model whose variables are the arrays of `tree` (the per-layer layout of `to_pure_dict`)."""
  model = nnx.eval_shape(lambda: init_model(cfg))
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, stack_layers(cfg, tree))
  nnx.update(model, state)
  return model


def _layer(x, i: int):
  return jax.ShapeDtypeStruct(x.shape[1:], x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x[i]


def _stack_leaves(*xs):
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in xs):
    return jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype)
  return (np.stack if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack)(xs)


def stack_layer_ids(cfg: ModelConfig) -> dict[str, list[int]]:
  """The model layers each stack holds, in order."""
  moe = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
  return {"dense_layers": [i for i in range(cfg.n_layers) if i not in moe], "moe_layers": moe}


def unstack_layers(cfg: ModelConfig, tree: dict) -> dict:
  """Scanned layout (dense_layers / moe_layers with a leading layer axis) -> 'layers': {i: block tree}."""
  tree, layers = dict(tree), {}
  for name, ids in stack_layer_ids(cfg).items():
    stack = tree.pop(name, None)
    if stack:
      layers.update({i: jax.tree.map(lambda x, j=j: _layer(x, j), stack) for j, i in enumerate(ids)})
  return {**tree, "layers": dict(sorted(layers.items()))}


def stack_layers(cfg: ModelConfig, tree: dict) -> dict:
  """'layers': {i: block tree} -> the scanned layout (numpy stays numpy: nothing moves to a device)."""
  tree = dict(tree)
  layers = tree.pop("layers")
  for name, ids in stack_layer_ids(cfg).items():
    if ids and all(i in layers for i in ids):
      tree[name] = jax.tree.map(_stack_leaves, *(layers[i] for i in ids))
  return tree
