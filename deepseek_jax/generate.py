"""Generate text: prefill, then a jitted decode loop over the absorbed-MLA latent cache; MTP speculative decoding.

  python -m deepseek_jax.generate --checkpoint RUN_DIR --prompt "Once upon a time" [--max-new-tokens 64]
  python -m deepseek_jax.generate --hf HF_DIR --prompt "..." [--temperature 0.8 --top-p 0.95 --top-k 50 --seed 0]

Prompts of different lengths are right-padded into one batch (decode.py: slot = position). The whole decode loop
is one `lax.while_loop` inside one jit: no Python runs between tokens. It stops when every sequence has produced
EOS or `max_new_tokens`. Generation is always dropless (`capacity_factor` = 0): capacity is a training-time device
and would make a token's output depend on the rest of the batch.

Speculative decoding (`speculative=True`, needs an MTP module): each step feeds the pending token and the MTP
draft of the token after it; the main model verifies the draft (greedy: equal to its own argmax; sampling: the
accept/reject rule of sampling.speculative_accept), so one step yields 1 or 2 tokens with exactly the
distribution of plain decoding. The MTP module then drafts the next token from the main model's hidden state.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import pathlib
import sys
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax import decode, sampling
from deepseek_jax import model as model_lib
from deepseek_jax.config import Config, ModelConfig, from_dict
from deepseek_jax.sampling import SamplingConfig
from sharding import rules

PAD = -1   # in `Generated.tokens_BN` after a sequence has stopped


class Generated(NamedTuple):
  tokens_BN: jax.Array   # int32 [B, capacity]; PAD after the sequence stopped
  n_B: jax.Array         # tokens generated per sequence (its EOS included)
  steps: jax.Array       # decode-loop iterations (main-model calls after the prefill)
  drafted: jax.Array     # speculative: drafts verified (live sequences x steps); 0 otherwise
  accepted: jax.Array    # speculative: drafts equal to (greedy) or accepted by (sampling) the main model


def generate_tokens(model: model_lib.Transformer, prompt_BP, lens_B, key, *, sampling_cfg: SamplingConfig,
                    capacity: int, n_new, eos_id, speculative: bool) -> Generated:
  """Pure: prompts right-padded to P, `lens_B` their lengths (>= 1). Generates at most `n_new` (traced, <=
  the static `capacity`, which sizes the cache and the output) tokens per sequence; `eos_id` (traced) < 0 = none.
  """
  B, P = prompt_BP.shape
  T = P + capacity                                    # the last token fed sits at slot <= P + capacity - 1
  n_layers = model.cfg.n_layers
  h_BPD, caches = decode.prefill(model, prompt_BP, decode.init_cache(model.cfg, B, T, n_layers))
  h_last_B1D = h_BPD[jnp.arange(B), lens_B - 1][:, None]
  k_first, k_draft, key = jax.random.split(key, 3)   # the loop's step i uses fold_in(key, i)
  first_B = sampling.sample(k_first, decode.logits(model, h_last_B1D)[:, 0], sampling_cfg)
  state = dict(i=jnp.int32(0), caches=caches, tok_B=first_B, pos_B=lens_B.astype(jnp.int32),
               n_B=jnp.ones((B,), jnp.int32), done_B=(first_B == eos_id) | (n_new <= 1),
               out_BN=jnp.full((B, capacity), PAD, jnp.int32).at[:, 0].set(first_B),
               drafted=jnp.int32(0), accepted=jnp.int32(0))
  if speculative:
    # MTP over the prompt: position i sees h_i and token i+1; the last one sees the first generated token.
    next_BP = jnp.roll(prompt_BP, -1, axis=1).at[jnp.arange(B), lens_B - 1].set(first_B)
    mtp_cache = decode.init_cache(model.cfg, B, T, 1)[0]
    mtp_BPD, mtp_cache = decode.mtp_prefill(model, h_BPD, next_BP, mtp_cache)
    q_logits_BV = decode.logits(model, mtp_BPD[jnp.arange(B), lens_B - 1][:, None])[:, 0]
    state.update(mtp_cache=mtp_cache, draft_B=sampling.sample(k_draft, q_logits_BV, sampling_cfg))
    if not sampling_cfg.greedy:
      state.update(q_BV=sampling.probs(q_logits_BV, sampling_cfg))
  body = _speculative_step if speculative else _plain_step
  body = functools.partial(body, model, key=key, cfg=sampling_cfg, n_new=n_new, eos_id=eos_id)
  state = jax.lax.while_loop(lambda s: (s["i"] < n_new) & ~jnp.all(s["done_B"]), body, state)
  return Generated(state["out_BN"], state["n_B"], state["i"], state["drafted"], state["accepted"])


def _emit(out_BN, idx_B, live_B, tok_B):
  """out[b, idx_b] = tok_b where live (indices past the end are dropped)."""
  B, N = out_BN.shape
  return out_BN.at[jnp.arange(B), jnp.where(live_B, idx_B, N)].set(tok_B, mode="drop")


def _plain_step(model, state, *, key, cfg, n_new, eos_id):
  """Feed the pending token, sample the next one."""
  h_B1D, caches = decode.step(model, state["tok_B"][:, None], state["pos_B"], state["caches"])
  tok_B = sampling.sample(jax.random.fold_in(key, state["i"] + 1), decode.logits(model, h_B1D)[:, 0], cfg)
  live_B = ~state["done_B"]
  n_B = state["n_B"] + live_B
  done_B = state["done_B"] | (live_B & ((tok_B == eos_id) | (n_B >= n_new)))
  return dict(state, i=state["i"] + 1, caches=caches, tok_B=tok_B, pos_B=state["pos_B"] + live_B, n_B=n_B,
              done_B=done_B, out_BN=_emit(state["out_BN"], state["n_B"], live_B, tok_B))


def _speculative_step(model, state, *, key, cfg, n_new, eos_id):
  """Feed [pending token t_n, draft d] at positions n, n+1; verify d; draft again with the MTP module."""
  k_verify, k_second, k_draft = jax.random.split(jax.random.fold_in(key, state["i"] + 1), 3)
  draft_B, pos_B = state["draft_B"], state["pos_B"]
  h_B2D, caches = decode.step(model, jnp.stack([state["tok_B"], draft_B], 1), pos_B, state["caches"])
  logits_B2V = decode.logits(model, h_B2D)
  if cfg.greedy:
    t1_B = jnp.argmax(logits_B2V[:, 0], axis=-1).astype(jnp.int32)
    match_B = t1_B == draft_B
  else:
    match_B, t1_B = sampling.speculative_accept(k_verify, sampling.probs(logits_B2V[:, 0], cfg), state["q_BV"],
                                                draft_B)
  t2_B = sampling.sample(k_second, logits_B2V[:, 1], cfg)   # the token after the draft; valid if it matched
  live_B = ~state["done_B"]
  two_B = live_B & match_B & (t1_B != eos_id) & (state["n_B"] + 1 < n_new)
  n_new_B = live_B.astype(jnp.int32) + two_B
  last_B = jnp.where(two_B, t2_B, t1_B)
  out_BN = _emit(state["out_BN"], state["n_B"], live_B, t1_B)
  out_BN = _emit(out_BN, state["n_B"] + 1, two_B, t2_B)
  n_B = state["n_B"] + n_new_B
  done_B = state["done_B"] | (live_B & ((last_B == eos_id) | (n_B >= n_new)))
  # MTP at positions n, n+1 (h_n with t1, h_{n+1} with t2); the draft comes from the last accepted position.
  mtp_B2V, mtp_cache = decode.mtp_step(model, h_B2D, jnp.stack([t1_B, t2_B], 1), pos_B, state["mtp_cache"])
  q_logits_BV = jnp.where(two_B[:, None], mtp_B2V[:, 1], mtp_B2V[:, 0])
  new = dict(state, i=state["i"] + 1, caches=caches, mtp_cache=mtp_cache, tok_B=last_B, pos_B=pos_B + n_new_B,
             n_B=n_B, done_B=done_B, out_BN=out_BN, draft_B=sampling.sample(k_draft, q_logits_BV, cfg),
             drafted=state["drafted"] + live_B.sum(), accepted=state["accepted"] + (live_B & match_B).sum())
  if not cfg.greedy:
    new["q_BV"] = sampling.probs(q_logits_BV, cfg)
  return new


# The engine --------------------------------------------------------------------------------------------

class Result(NamedTuple):
  tokens: list[list[int]]   # per prompt, the generated tokens (EOS included, nothing after it)
  steps: int                # decode-loop iterations
  acceptance: float | None  # speculative: accepted / drafted


def _is_router_gate(path) -> bool:
  return getattr(path[-1], "key", None) == "gate"


class Generator:
  """A model ready to generate: parameters cast once to the compute dtype (the router gate stays float32, as
  moe.route reads it), placed on `mesh` by the sharding rules when one is given."""

  def __init__(self, cfg: ModelConfig, tree: dict, *, mesh=None):
    self.cfg = dataclasses.replace(cfg, capacity_factor=0.0, remat="none")
    self.mesh = mesh
    if "layers" not in tree:   # the scanned layout of a train state: the per-layer one is what from_pure_dict takes
      tree = model_lib.unstack_layers(self.cfg, tree)
    self.graphdef, params, bias = model_lib.split_model(model_lib.from_pure_dict(self.cfg, tree))
    dt = jnp.dtype(self.cfg.dtype)
    cast = lambda path, x: x if _is_router_gate(path) else x.astype(dt)   # numpy input: cast on the host
    host_params = jax.tree_util.tree_map_with_path(cast, nnx.to_pure_dict(params))
    if mesh is None:
      self.params, self.bias = jax.device_put((host_params, nnx.to_pure_dict(bias)))
    else:
      self.params = jax.device_put(host_params, nnx.to_pure_dict(rules.param_shardings(params, mesh)))
      self.bias = jax.device_put(nnx.to_pure_dict(bias), nnx.to_pure_dict(rules.param_shardings(bias, mesh)))
    self._run = jax.jit(self._generate, static_argnames=("sampling_cfg", "capacity", "speculative"))

  def _generate(self, params, bias, prompt_BP, lens_B, key, n_new, eos_id, **static) -> Generated:
    model = nnx.merge(self.graphdef, params, bias)
    return generate_tokens(model, prompt_BP, lens_B, key, n_new=n_new, eos_id=eos_id, **static)

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               sampling_cfg: SamplingConfig = SamplingConfig(), seed: int = 0, eos_id: int | None = None,
               speculative: bool = False) -> Result:
    prompt_BP, lens_B = self.check(prompts, max_new_tokens, speculative)
    out = self.run(prompt_BP, lens_B, max_new_tokens=max_new_tokens, sampling_cfg=sampling_cfg, seed=seed,
                   eos_id=eos_id, speculative=speculative)
    tokens = np.asarray(out.tokens_BN)
    return Result([tokens[b, :n].tolist() for b, n in enumerate(np.asarray(out.n_B))], int(out.steps),
                  int(out.accepted) / max(int(out.drafted), 1) if speculative else None)

  def check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, speculative: bool):
    """One-line ValueErrors for unusable requests; -> (right-padded prompts [B, P] int32, lengths [B])."""
    cfg = self.cfg
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError("empty prompt: every prompt needs at least one token")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
      raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
                       f"model.max_seq_len={cfg.max_seq_len}")
    if bad := [t for p in prompts for t in p if not 0 <= t < cfg.vocab_size]:
      raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    if speculative and cfg.n_mtp_layers < 1:
      raise ValueError("speculative decoding needs an MTP module (model.n_mtp_layers >= 1)")
    prompt_BP = np.zeros((len(prompts), longest), np.int32)
    for b, p in enumerate(prompts):
      prompt_BP[b, :len(p)] = p
    return prompt_BP, np.array([len(p) for p in prompts], np.int32)

  def run(self, prompt_BP, lens_B, *, max_new_tokens: int, sampling_cfg: SamplingConfig, seed: int = 0,
          eos_id: int | None = None, speculative: bool = False, capacity: int | None = None) -> Generated:
    """The jitted call on prepared arrays (see `check`); returns device arrays without waiting for them.
    One compiled program per `capacity` (default: max_new_tokens) serves every max_new_tokens <= capacity."""
    args, static = self._arguments(prompt_BP, lens_B, max_new_tokens, sampling_cfg, seed, eos_id, speculative,
                                   capacity)
    with self._mesh_context():
      return self._run(*args, **static)

  def lower(self, prompt_BP, lens_B, *, max_new_tokens: int, sampling_cfg: SamplingConfig = SamplingConfig(),
            speculative: bool = False) -> jax.stages.Lowered:
    """The lowered program of `run` (for inspection and cost analysis)."""
    args, static = self._arguments(prompt_BP, lens_B, max_new_tokens, sampling_cfg, 0, None, speculative, None)
    with self._mesh_context():
      return self._run.lower(*args, **static)

  def _arguments(self, prompt_BP, lens_B, max_new_tokens, sampling_cfg, seed, eos_id, speculative, capacity):
    capacity = max_new_tokens if capacity is None else capacity
    if not 1 <= max_new_tokens <= capacity:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be in [1, capacity={capacity}]")
    prompt_BP, lens_B = np.asarray(prompt_BP, np.int32), np.asarray(lens_B, np.int32)
    if self.mesh is not None:
      spec = rules.mesh_spec(("batch", None), self.mesh)
      if prompt_BP.shape[0] % (n := rules.axis_size(self.mesh, spec[0])):
        raise ValueError(f"batch of {prompt_BP.shape[0]} prompts cannot be split over the {n} batch shards of "
                         f"the mesh {dict(zip(self.mesh.axis_names, self.mesh.axis_sizes))}")
      prompt_BP = jax.device_put(prompt_BP, NamedSharding(self.mesh, spec))
      lens_B = jax.device_put(lens_B, NamedSharding(self.mesh, P(spec[0])))
    traced = (jnp.int32(max_new_tokens), jnp.int32(-1 if eos_id is None else eos_id))
    static = dict(sampling_cfg=sampling_cfg, capacity=capacity, speculative=speculative)
    return (self.params, self.bias, prompt_BP, lens_B, jax.random.key(seed)) + traced, static

  def _mesh_context(self):
    return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)


# Loading -----------------------------------------------------------------------------------------------

def _deep_merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and k in out else v
  return out


def load_checkpoint(directory: str, step: int | None = None) -> tuple[Config, dict]:
  """A train.py run directory (Checkpointer steps; params and router bias are read, the optimizer state is
  not) or a `convert import` directory (config.yaml + params/). -> (Config, full params pure dict in the
  per-layer layout of model.to_pure_dict)."""
  import orbax.checkpoint as ocp
  from deepseek_jax.checkpoint import Checkpointer, CheckpointError
  from deepseek_jax.config import load_config
  path = pathlib.Path(directory)
  if not path.is_dir():
    raise ValueError(f"checkpoint directory not found: {directory}")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = lambda state: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                        nnx.to_pure_dict(state))
  if (path / "config.yaml").is_file() and (path / "params").is_dir():   # `python -m deepseek_jax.convert import`
    cfg = load_config(path / "config.yaml")
    per_layer = model_lib.to_pure_dict(nnx.eval_shape(lambda: model_lib.init_model(cfg.model)))
    with ocp.StandardCheckpointer() as ckptr:   # convert writes the per-layer layout
      return cfg, ckptr.restore(path / "params", jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), per_layer))
  ckpt = Checkpointer(path, keep=1, every=1, async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"{path}: no committed checkpoint (expected the train.ckpt_dir of a train.py run, or "
                          f"the output of `python -m deepseek_jax.convert import`)")
  if step not in ckpt.all_steps():
    raise CheckpointError(f"{path}: step {step} is not a committed checkpoint (committed: {ckpt.all_steps()})")
  meta = ckpt.read_meta(step) or {}
  if "config" not in meta:
    raise CheckpointError(f"{path / str(step)}: no config in the checkpoint's meta")
  cfg = from_dict(Config, meta["config"])
  _, params, bias = model_lib.abstract_model(cfg.model)
  target = {"params": abstract(params), "bias": abstract(bias)}
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      got = ckptr.restore(path / str(step) / "state", args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  except Exception as e:
    raise CheckpointError(f"{path / str(step)}: cannot read params and bias ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]})") from e
  return cfg, model_lib.unstack_layers(cfg.model, _deep_merge(got["params"], got["bias"]))   # train: scanned stacks


def _tokenizer(spec: str):
  from deepseek_jax import data
  return data.ByteTokenizer() if spec == "byte" else data.HFTokenizer(spec)


# CLI ---------------------------------------------------------------------------------------------------

def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m deepseek_jax.generate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", metavar="DIR", help="train.ckpt_dir of a train.py run, or `convert import` output")
  src.add_argument("--hf", metavar="DIR", help="Hugging Face DeepSeek-V2/V3 checkpoint directory")
  p.add_argument("--prompt", required=True)
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0, help="0 = no limit")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--speculative", action="store_true", help="draft with the MTP module (needs one)")
  p.add_argument("--tokenizer", help="'byte' or a tokenizer.json (default: the run's data.tokenizer; for --hf "
                                     "DIR/tokenizer.json)")
  p.add_argument("--eos-id", type=int, help="stop token (default: none; for --hf config.json's eos_token_id)")
  p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), help="compute dtype (default: the checkpoint's; "
                                                                   "bfloat16 for --hf)")
  return p.parse_args(argv)


def _load(args):
  """-> (ModelConfig, params tree, tokenizer spec, eos id)."""
  import json
  if args.checkpoint:
    cfg, tree = load_checkpoint(args.checkpoint, args.step)
    model_cfg, tok, eos = cfg.model, args.tokenizer or cfg.data.tokenizer, args.eos_id
  else:
    from deepseek_jax import convert
    tok = args.tokenizer or str(pathlib.Path(args.hf) / "tokenizer.json")
    if not args.tokenizer and (pathlib.Path(args.hf) / "config.json").is_file() and not pathlib.Path(tok).is_file():
      raise ValueError(f"{args.hf} has no tokenizer.json: pass --tokenizer byte or --tokenizer PATH")
    model_cfg, tree = convert.load_hf_checkpoint(args.hf, base=ModelConfig(dtype=args.dtype or "bfloat16"))
    eos = args.eos_id
    if eos is None:
      eos = json.loads((pathlib.Path(args.hf) / "config.json").read_text()).get("eos_token_id")
      eos = eos[0] if isinstance(eos, list) else eos
  if args.dtype:
    model_cfg = dataclasses.replace(model_cfg, dtype=args.dtype)
  return model_cfg, tree, tok, eos


def main(argv: list[str] | None = None) -> int:
  import time
  from absl import logging as absl_logging
  from deepseek_jax.checkpoint import CheckpointError
  absl_logging.set_verbosity(absl_logging.ERROR)   # orbax warns about metadata files we do not need
  args = _parse(argv)
  try:
    sampling_cfg = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if not args.prompt:
      raise ValueError("empty prompt: --prompt needs some text")
    cfg, tree, tok_spec, eos = _load(args)
    tok = _tokenizer(tok_spec)
    prompt = tok.encode(args.prompt)
    gen = Generator(cfg, tree)
    gen.check([prompt], args.max_new_tokens, args.speculative)
    start = time.perf_counter()
    res = gen.generate([prompt], max_new_tokens=args.max_new_tokens, sampling_cfg=sampling_cfg, seed=args.seed,
                       eos_id=eos, speculative=args.speculative)
    seconds = time.perf_counter() - start
  except (ValueError, CheckpointError) as e:   # ValueError: also ConfigError, DataError, ConversionError
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  out = res.tokens[0]
  print(args.prompt + tok.decode([t for t in out if t < tok.vocab_size]))
  extra = f", draft acceptance {res.acceptance:.1%}" if args.speculative else ""
  print(f"[{len(out)} tokens in {res.steps} decode steps, {seconds:.1f} s including compilation{extra}]",
        file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
