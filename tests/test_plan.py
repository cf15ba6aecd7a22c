"""The memory planner (deepseek_jax/plan.py): exact state bytes from Run's shardings on an abstract mesh, the
analytic activation formulas against JAX's own saved residuals, the expert-parallel buffers against the
lowered step, the compiled extrapolation, and its errors."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from deepseek_jax import model as model_lib
from deepseek_jax import plan, trainer
from deepseek_jax.config import MeshConfig, load_config
from deepseek_jax.loss import Batch
from deepseek_jax.run import Run
from sharding.rules import RULES, spec_axes

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny.yaml")
V3 = str(ROOT / "configs/deepseek-v3-671b.yaml")


def _cfg(path, mesh, *overrides, micro_batch=None):
  return plan.plan_config(load_config(path, list(overrides)), plan.parse_mesh(mesh), micro_batch)


# State bytes ------------------------------------------------------------------------------------------------

def test_state_bytes_equal_a_hand_computation_on_8_devices():
  """tiny (V=256 D=128 I=384 F=96 H=4 Q=64 C=32 K=32 R=16 O=32 E=8, 1 dense + 3 MoE + 1 MTP) on
  fsdp=2 x expert=2 x tensor=2: 'embed' splits 4 ways, 'heads'/'mlp'/'vocab' 2, experts 2 x fsdp 2 x F 2."""
  cfg = _cfg(TINY, "1,2,2,2", "optim.mu_dtype=bfloat16", micro_batch=2)   # 16 = 2 x 4 shards x accum 2
  attn = (128 + 128                  # attn_norm, ffn_norm (replicated)
          + 128 * 64 // 4 + 64       # wq_a [D, Q] over embed; q_norm
          + 64 * 4 * 48 // 8         # wq_b [Q, H, K+R] over lora_in and heads
          + 128 * 48 // 4 + 32       # wkv_a [D, C+R]; kv_norm
          + 32 * 4 * 64 // 8         # wkv_b [C, H, K+O]
          + 4 * 32 * 128 // 8)       # wo [H, O, D]
  dense = attn + 3 * 128 * 384 // 8
  moe = attn + 128 * 8 // 4 + 3 * 8 * 128 * 96 // 8 + 3 * 128 * 96 // 8   # gate, routed, shared experts
  mtp = 128 + 128 + 256 * 128 // 4 + moe + 128                            # enorm, hnorm, eh_proj, block, norm
  elems = dense + 3 * moe + 2 * 256 * 128 // 8 + 128 + mtp                 # + embed, head, final norm
  st = plan.state_bytes(Run(cfg, 8))
  assert st["params"] == 4 * elems + 4 * 8 * 4            # + 4 replicated router biases [E] float32
  assert st["grads"] == st["accum"] == 4 * elems          # grad_accum = 2: one more float32 copy
  assert st["optimizer"] == (2 + 4) * elems + 4 * 4       # mu bf16, nu f32; 3 step counts and the lr
  assert plan.state_bytes(Run(_cfg(TINY, "1,2,2,2"), 8))["accum"] == 0


def _rule_split(names, sizes) -> int:
  return math.prod(sizes[a] for n in names if n is not None for a in spec_axes(RULES[n]))


@pytest.mark.parametrize("n_layers", [pytest.param(5, id="5-layers"),
                                      pytest.param(61, id="61-layers", marks=pytest.mark.slow)])
def test_671b_parameter_bytes_without_allocation(n_layers):
  """V3 widths at (1, 8, 32, 1): the planner's parameter bytes are the sum of each parameter's shard, from
  the rule table, and nothing is allocated (682.6B float32 parameters would be 2.7 TB)."""
  before = len(jax.live_arrays())
  cfg = _cfg(V3, "1,8,32,1", f"model.n_layers={n_layers}", "optim.mu_dtype=bfloat16", micro_batch=1)
  p = plan.plan(cfg, hbm_gb=80, compile=False)
  assert len(jax.live_arrays()) == before
  sizes = {"data": 1, "fsdp": 8, "expert": 32, "tensor": 1}
  _, params, bias = model_lib.abstract_model(cfg.model)
  axes = jax.tree.leaves(model_lib.param_axes(params), is_leaf=lambda x: isinstance(x, tuple))
  shapes = jax.tree.leaves(nnx.to_pure_dict(params))
  expected = sum(4 * x.size // _rule_split(a, sizes) for a, x in zip(axes, shapes))
  n_bias = sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(bias)))
  assert p["bytes"]["params"] == expected + 4 * n_bias
  assert p["bytes"]["optimizer"] == pytest.approx(expected * 6 / 4, abs=64)
  # ZeRO-3 rules: everything but norms and router biases is split over all 256 devices.
  assert p["bytes"]["params"] == pytest.approx(4 * p["n_params"] / 256, rel=0.01)
  assert p["grad_accum"] == 15360 // 256 and p["bytes"]["accum"] == p["bytes"]["grads"]
  if n_layers == 61:
    assert p["n_params"] == pytest.approx(682.64e9, rel=1e-4)


def test_cli_table_json_and_verdict(capsys):
  args = ["--config", TINY, "--mesh", "1,2,2,2", "--no-compile", "--set", "model.remat=full"]
  assert plan.main(args + ["--json"]) == 0
  p = json.loads(capsys.readouterr().out)
  assert p["bytes"]["params"] == plan.state_bytes(Run(_cfg(TINY, "1,2,2,2"), 8))["params"]
  assert p["total"] == p["bytes"]["params"] + p["bytes"]["optimizer"] + max(p["activations"]["phases"].values())
  assert p["fits"] and p["compiled"] is None
  assert plan.main(args + ["--hbm-gb", str(p["total"] / 2e9)]) == 0
  text = capsys.readouterr().out
  assert "| parameters " in text and "| EP buffers " in text
  assert f"fits in {p['total'] / 2e9:g} GB HBM: no (over by" in text


# Errors -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mesh, words", [("1,2,3,1", "n_routed_experts=8"), ("1,1,1,8", "n_heads=4"),
                                         ("1,8,x,1", "--mesh"), ("1,8,32", "--mesh"), ("0,8,1,1", "--mesh")])
def test_bad_mesh_is_a_one_line_error(capsys, mesh, words):
  assert plan.main(["--config", TINY, "--mesh", mesh, "--no-compile"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("plan: error:") and words in err


def test_micro_batch_that_does_not_divide_the_batch_is_an_error(capsys):
  assert plan.main(["--config", TINY, "--mesh", "1,2,2,2", "--micro-batch", "3", "--no-compile"]) == 2
  assert "train.batch_size=16" in capsys.readouterr().err


# Analytic activations ---------------------------------------------------------------------------------------

def _jax_residual_bytes(cfg) -> int:
  """Bytes JAX saves for the backward of the training loss (arguments excluded), on one device."""
  graphdef, params, bias = model_lib.abstract_model(cfg.model)
  params, bias = nnx.to_pure_dict(params), nnx.to_pure_dict(bias)
  batch = Batch(*(jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), jnp.int32) for _ in Batch._fields))
  loss = lambda p, b, x: trainer.loss_fn(p, b, x, graphdef=graphdef, cfg=cfg)[0]
  return sum(a.size * a.dtype.itemsize for a, src in saved_residuals(loss, params, bias, batch)
             if "from the argument" not in src)


@pytest.mark.parametrize("remat", ["full", "none"])
def test_residual_formulas_match_jax_saved_residuals(remat):
  cfg = _cfg(TINY, "1,1,1,1", "model.dtype=bfloat16", f"model.remat={remat}", "data.seq_len=64",
             "train.batch_size=2")
  assert plan.activations(cfg, 0)["residuals"] == pytest.approx(_jax_residual_bytes(cfg), rel=0.03)


def test_remat_full_keeps_only_block_inputs():
  full, none = (plan.activations(_cfg(TINY, "1,1,1,1", "model.dtype=bfloat16", f"model.remat={r}"), 0)
                for r in ("full", "none"))
  assert full["residual_parts"]["blocks"] == (4 + 1) * 16 * 256 * 128 * 2   # (layers + MTP) x B S D bf16
  assert none["residuals"] > 5 * full["residuals"]


# Expert-parallel buffers ------------------------------------------------------------------------------------

def test_v3_ep_buffers_at_ep_64():
  dropless = plan.ep_buffers(_cfg(V3, "1,4,64,1", micro_batch=1))
  assert (dropless["cap"], dropless["rows"]) == (4096 * 4, 64 * 4096 * 4)     # T * min(k, E/P), E/P = 4
  assert dropless["buffer_bytes"] == 64 * 16384 * 7168 * 2                    # 15.0 GB
  assert dropless["payload_bytes"] == 4096 * 8 * 7168 * 2                     # 0.47 GB
  assert dropless["bytes"] == 2 * dropless["buffer_bytes"]                      # send + receive
  capacity = plan.ep_buffers(_cfg(V3, "1,4,64,1", "model.capacity_factor=1.25", micro_batch=1))
  assert capacity["cap"] == 4 * math.ceil(1.25 * 4096 * 8 / 256)              # 640


@pytest.mark.parametrize("cf", [0.0, 1.25])
def test_ep_buffer_is_the_all_to_all_of_the_lowered_step(cf):
  cfg = _cfg(TINY, "1,1,8,1", "model.dtype=bfloat16", f"model.capacity_factor={cf}", "data.seq_len=64",
             "model.n_layers=2", "model.n_mtp_layers=0")
  ep = plan.ep_buffers(cfg)
  text = Run(cfg, jax.devices()[:8]).lower_train_step().as_text()
  shape = f"tensor<{ep['P']}x{ep['cap']}x{ep['D']}xbf16>"
  assert f"stablehlo.all_to_all" in text and shape in text, shape


# Compiled ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_compiled_temp_extrapolates_linearly_in_depth():
  """Temp compiled at the dense prefix + 1 and + 2 MoE layers, extrapolated to + 3, vs compiling + 3."""
  cfg = _cfg(TINY, "1,2,2,2", "data.seq_len=64", "model.n_layers=4")
  c = plan.compiled_temp(cfg, jax.devices()[:8])
  assert c["depths"] == [2, 3] and c["temp_per_layer"] > 0
  direct = plan.compiled_temp(cfg, jax.devices()[:8], depths=(4,))
  assert c["temp_full"] == pytest.approx(direct["temp_full"], rel=0.1)
