"""hf_load.load_hf_params: streamed, sharded loading of HF checkpoints.

In-process (8 CPU devices): every shard equals the same slice of `load_hf_checkpoint`'s full load, for every
checkpoint format and for shardings that cut FP8 blocks and flattened head dims; each checkpoint byte is read
once; bad checkpoints and shardings give one-line errors.

Several processes (tests/loading_worker.py), peak memory: each process holds part of an 8-device
data=2 x expert=4 mesh whose expert axis crosses the processes, loads a random sharded float32 checkpoint and
reports its peak RSS growth, the bytes it read and the bytes of its device buffers. CPU devices live in host
memory (one buffer per device: the two data replicas are two copies), so the bound is: growth - device
buffers < a quarter of the model, and bytes read = the process's share (half or a quarter of the experts,
all other weights), well below the model. The slow variant also runs the old path (the whole float32 model in
host memory, then placed) and checks that it breaks the bound.
"""

import dataclasses
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax import convert, hf_load, model
from deepseek_jax.config import MeshConfig, ModelConfig
from deepseek_jax.convert import ConversionError
from sharding import rules
from sharding.mesh import make_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]


# q_b_proj has 4 * 48 = 192 rows, the dense FFN 160: FP8 blocks are ragged and shards cut them. One MTP module.
TINY = ModelConfig(vocab_size=64, dim=64, inter_dim=160, moe_inter_dim=32, n_layers=3, n_dense_layers=1, n_heads=4,
                   q_lora_rank=48, kv_lora_rank=16, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                   n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4,
                   n_limited_groups=2, max_seq_len=1280, original_seq_len=32, n_mtp_layers=1, dtype="float32")
V2 = dataclasses.replace(TINY, score_func="softmax", router_bias=False, norm_topk_prob=False, n_expert_groups=1,
                         n_limited_groups=1, n_mtp_layers=0, q_lora_rank=0)


def _random_params(cfg: ModelConfig, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  abstract = model.to_pure_dict(nnx.eval_shape(lambda: model.init_model(cfg)))
  return jax.tree.map(lambda x: rng.standard_normal(x.shape, dtype=np.float32), abstract)


def _to_fp8(src: pathlib.Path, dst: pathlib.Path) -> None:
  """Rewrites a float32 single-file checkpoint with every 2-D projection as e4m3 + 128x128 block scales."""
  tensors = hf_load._read_header(src / "model.safetensors")
  reader = hf_load._Reader(src, (128, 128))
  out = []
  for name, t in tensors.items():
    w = reader.read(name, tuple((0, n) for n in t.shape))
    if name.endswith("proj.weight") and w.ndim == 2:
      rows, cols = w.shape
      blocks = np.pad(np.abs(w), ((0, -rows % 128), (0, -cols % 128))).reshape(-(-rows // 128), 128, -1, 128)
      scale = np.maximum(blocks.max(axis=(1, 3)), 1e-12) / 448.0
      full = np.repeat(np.repeat(scale, 128, 0), 128, 1)[:rows, :cols]
      out += [(name, (w / full).astype(ml_dtypes.float8_e4m3fn)), (name + "_scale_inv", scale.astype(np.float32))]
    else:
      out.append((name, w.astype(ml_dtypes.bfloat16)))
  reader.close()
  dst.mkdir()
  convert._write_safetensors(dst / "model.safetensors", out)
  hf = json.loads((src / "config.json").read_text())
  hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
  (dst / "config.json").write_text(json.dumps(hf))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name -> (config, directory): float32 sharded, bf16 with fused experts, FP8 blocks, V2 (no router bias)."""
  root = tmp_path_factory.mktemp("ckpts")
  params = _random_params(TINY)
  convert.save_hf_checkpoint(TINY, params, root / "f32", max_shard_bytes=100_000)
  convert.save_hf_checkpoint(TINY, params, root / "bf16_fused", dtype="bfloat16", fused_experts=True)
  convert.save_hf_checkpoint(TINY, params, root / "single")
  _to_fp8(root / "single", root / "fp8")
  convert.save_hf_checkpoint(V2, _random_params(V2, 1), root / "v2", max_shard_bytes=100_000)
  return {"f32": (TINY, root / "f32"), "bf16_fused": (TINY, root / "bf16_fused"), "fp8": (TINY, root / "fp8"),
          "v2": (V2, root / "v2")}


def _mesh():
  return make_mesh(MeshConfig(data=2, expert=4))


def _rule_shardings(cfg, mesh):
  _, p, b = model.abstract_model(cfg)
  return nnx.to_pure_dict(rules.param_shardings(p, mesh)), nnx.to_pure_dict(rules.param_shardings(b, mesh))


def _cutting_shardings(cfg, mesh):
  """Every leaf split on as many dims as the mesh allows: rows and columns at once, mid-FP8-block, and the
  inner (head_dim) side of flattened HF projections."""
  def spec(x):
    n, entries = x.shape, [None] * len(x.shape)
    e = next((d for d in reversed(range(len(n))) if n[d] % 4 == 0 and n[d] > 4), None)
    d = next((d for d in range(len(n)) if d != e and n[d] % 2 == 0 and n[d] > 2), None)
    for dim, axis in ((e, "expert"), (d, "data")):
      if dim is not None:
        entries[dim] = axis
    return NamedSharding(mesh, P(*entries))
  _, p, b = model.abstract_model(cfg)
  return (jax.tree.map(spec, nnx.to_pure_dict(p)), jax.tree.map(spec, nnx.to_pure_dict(b)))


def _assert_shards_equal(params, bias, want, shardings):
  got = {**convert.flatten(params), **convert.flatten(bias)}
  sh = {**convert.flatten(shardings[0]), **convert.flatten(shardings[1])}
  want = convert.flatten(want)
  assert sorted(got, key=str) == sorted(want, key=str)
  for p, a in got.items():
    assert a.dtype == np.float32 and a.shape == want[p].shape and a.sharding == sh[p], p
    for s in a.addressable_shards:
      np.testing.assert_array_equal(np.asarray(s.data).view(np.uint32), want[p][s.index].view(np.uint32),
                                    err_msg=str(p))


@pytest.mark.parametrize("name", ["f32", "bf16_fused", "fp8", "v2"])
@pytest.mark.parametrize("layout", ["rules", "cutting"])
def test_shards_equal_the_full_load(checkpoints, name, layout):
  cfg, path = checkpoints[name]
  mesh = _mesh()
  shardings = _rule_shardings(cfg, mesh) if layout == "rules" else _cutting_shardings(cfg, mesh)
  if layout == "cutting":   # the layout really cuts: FP8 blocks mid-way and the head_dim side of wq_b
    flat = convert.flatten(shardings[0])
    wq = flat.get(("dense_layers", "attn", "wq_b"), flat.get(("dense_layers", "attn", "wq")))
    assert wq.spec[-1] is not None and wq.spec[1] is not None   # [layers, rows, heads, cols]
  params, bias = hf_load.load_hf_params(path, cfg, *shardings)
  _, want = convert.load_hf_checkpoint(path, base=cfg)
  _assert_shards_equal(params, bias, model.stack_layers(cfg, want), shardings)
  if name == "v2":
    assert all(not np.asarray(b).any() for b in jax.tree.leaves(bias))
  else:
    assert sum(b.size for b in jax.tree.leaves(bias)) == (cfg.n_moe_layers + cfg.n_mtp_layers) * cfg.n_routed_experts


def test_each_byte_is_read_once(checkpoints, monkeypatch):
  """Replicated shards are read once per host, partitioned ones once in all: reads = checkpoint bytes."""
  cfg, path = checkpoints["f32"]
  read, real = [], hf_load._readinto

  def counting(f, offset, out, what):
    read.append(out.nbytes)
    real(f, offset, out, what)
  monkeypatch.setattr(hf_load, "_readinto", counting)
  hf_load.load_hf_params(path, cfg, *_rule_shardings(cfg, make_mesh(MeshConfig(data=8))))   # all replicated
  tensor_bytes = sum(t.dtype.itemsize * int(np.prod(t.shape)) for f in path.glob("*.safetensors")
                     for t in hf_load._read_header(f).values())
  assert sum(read) == tensor_bytes   # every weight replicated 8x: each is still read once


# Errors --------------------------------------------------------------------------------------------------

def _load_error(path, cfg, match, shardings=None):
  shardings = shardings or _rule_shardings(cfg, _mesh())
  with pytest.raises(ConversionError, match=match) as e:
    hf_load.load_hf_params(path, cfg, *shardings)
  assert "\n" not in str(e.value)


def _copy_ckpt(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  dst.mkdir()
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


def test_bad_files_are_named(checkpoints, tmp_path):
  cfg, src = checkpoints["f32"]
  files = sorted(src.glob("*.safetensors"))
  bad = _copy_ckpt(src, tmp_path / "missing")
  (bad / files[1].name).unlink()
  _load_error(bad, cfg, rf"{files[1].name}: listed in model.safetensors.index.json but missing")
  bad = _copy_ckpt(src, tmp_path / "corrupt")
  (bad / files[2].name).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  _load_error(bad, cfg, rf"{files[2].name}: unreadable or corrupt safetensors file")
  bad = _copy_ckpt(src, tmp_path / "truncated")
  (bad / files[0].name).write_bytes(files[0].read_bytes()[:-4])
  _load_error(bad, cfg, rf"{files[0].name}: unreadable or corrupt safetensors file \(tensor .* outside the file")
  bad = _copy_ckpt(src, tmp_path / "index")
  index = json.loads((bad / "model.safetensors.index.json").read_text())
  name = "model.layers.2.self_attn.kv_b_proj.weight"
  index["weight_map"][name] = files[0].name if index["weight_map"][name] != files[0].name else files[1].name
  (bad / "model.safetensors.index.json").write_text(json.dumps(index))
  _load_error(bad, cfg, rf"^{re.escape(name)}: listed in model.safetensors.index.json under")
  # A file cut short after its header was checked (e.g. still being copied): the read names tensor and file.
  bad = _copy_ckpt(src, tmp_path / "cut")
  reader = hf_load._Reader(bad, (128, 128))
  name, t = max(reader.tensors.items(), key=lambda kv: kv[1].start)
  with open(t.file, "r+b") as f:
    f.truncate(t.start + 4)
  with pytest.raises(ConversionError, match=rf"^{re.escape(name)} in .*{t.file.name}: file ends after 4 of"):
    reader.read(name, tuple((0, n) for n in t.shape))
  reader.close()


def test_wrong_shape_and_architecture(checkpoints, tmp_path):
  cfg, src = checkpoints["v2"]
  name = "model.layers.1.self_attn.kv_b_proj.weight"
  # The checkpoint is sharded: rewrite the file that holds `name`, that tensor one row short.
  fname = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]
  bad = _copy_ckpt(src, tmp_path / "shape")
  reader = hf_load._Reader(src, (128, 128))
  out = [(n, reader.read(n, tuple((0, k) for k in t.shape))) for n, t in hf_load._read_header(src / fname).items()]
  reader.close()
  out = [(n, x[:-1] if n == name else x) for n, x in out]
  (bad / fname).unlink()
  convert._write_safetensors(bad / fname, out)
  _load_error(bad, cfg, rf"^{re.escape(name)}: expected shape \(256, 16\), got \(255, 16\) in .*{fname}")
  _load_error(src, dataclasses.replace(cfg, n_layers=4), r"checkpoint architecture differs: n_layers=3 \(config: 4\)",
              shardings=_rule_shardings(cfg, _mesh()))


def test_bad_shardings(checkpoints):
  cfg, path = checkpoints["v2"]
  params_sh, bias_sh = _rule_shardings(cfg, _mesh())
  del params_sh["dense_layers"]["attn"]["wo"]
  _load_error(path, cfg, r"param_shardings: no entry for dense_layers.attn.wo", (params_sh, bias_sh))
  params_sh, bias_sh = _rule_shardings(cfg, _mesh())
  bias_sh["moe_layers"]["ffn"]["bias"] = P()
  _load_error(path, cfg, r"bias_shardings: moe_layers.ffn.bias is a P\w*, not a Sharding",
              (params_sh, bias_sh))


# Peak memory, several processes ----------------------------------------------------------------------------

def _rss_config(n_experts: int, n_layers: int) -> ModelConfig:
  """Mostly routed experts, as DeepSeek-V3 (97%), so that a process's share is well below the model."""
  return ModelConfig(vocab_size=2048, dim=256, inter_dim=512, moe_inter_dim=256, n_layers=n_layers,
                     n_dense_layers=1, n_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
                     qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=n_experts, n_shared_experts=1,
                     n_activated_experts=2, n_expert_groups=1, n_limited_groups=1, n_mtp_layers=0, dtype="float32")


def _write_random_checkpoint(cfg: ModelConfig, path: pathlib.Path, shard_bytes: int) -> int:
  params = _random_params(cfg)
  convert.save_hf_checkpoint(cfg, params, path, max_shard_bytes=shard_bytes)
  return sum(x.nbytes for x in jax.tree.leaves(params))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(tmp_path, ckpt, n_procs: int, mode: str, timeout_s: float = 240) -> list[dict]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  port, start = _free_port(), time.monotonic()
  outs = [tmp_path / f"{mode}{i}.json" for i in range(n_procs)]
  logs = [open(tmp_path / f"{mode}{i}.log", "w") for i in range(n_procs)]
  worker = [sys.executable, str(ROOT / "tests" / "loading_worker.py"), str(port)]
  procs = [subprocess.Popen(worker + [str(i), str(n_procs), str(ckpt), mode, str(out)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT) for i, (out, log) in enumerate(zip(outs, logs))]
  try:
    for p in procs:
      p.wait(timeout=max(1.0, timeout_s - (time.monotonic() - start)))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  tails = "\n".join((tmp_path / f"{mode}{i}.log").read_text()[-2000:] for i in range(n_procs))
  assert [p.returncode for p in procs] == [0] * n_procs, tails
  return [json.loads(o.read_text()) for o in outs]


def _check_streaming(results: list[dict], model_bytes: int, share: float) -> None:
  """Each process read exactly its share of the (float32) checkpoint, which is a fraction of the model, and
  its peak RSS rose by what its device buffers hold plus less than a quarter of the model."""
  for r in results:
    print(f"\npeak RSS growth {r['growth'] / 2**20:.1f} MiB; device buffers {r['held'] / 2**20:.1f} MiB; "
          f"share {r['share'] / 2**20:.1f} MiB; read {r['read'] / 2**20:.1f} MiB; "
          f"model {model_bytes / 2**20:.1f} MiB")
    assert r["model"] == model_bytes and r["equal"]
    # A shard split along the checkpoint's rows (HF stores [out, in]; ZeRO-3 splits our [in, out] over its
    # first dim) is read as whole rows, so a process may read a little more than it keeps.
    assert r["share"] <= r["read"] <= 1.25 * r["share"] and r["read"] < share * model_bytes
    assert r["growth"] - r["held"] < 0.25 * model_bytes


def test_peak_rss_two_processes(tmp_path):
  cfg = _rss_config(n_experts=64, n_layers=3)
  model_bytes = _write_random_checkpoint(cfg, tmp_path / "ckpt", shard_bytes=32 << 20)
  assert model_bytes > 100 << 20 and len(list((tmp_path / "ckpt").glob("*.safetensors"))) >= 3
  _check_streaming(_run_workers(tmp_path, tmp_path / "ckpt", 2, "stream"), model_bytes, share=0.6)


@pytest.mark.slow
def test_peak_rss_four_processes_and_the_old_path_fails(tmp_path):
  cfg = _rss_config(n_experts=64, n_layers=6)
  model_bytes = _write_random_checkpoint(cfg, tmp_path / "ckpt", shard_bytes=64 << 20)
  assert model_bytes > 250 << 20
  _check_streaming(_run_workers(tmp_path, tmp_path / "ckpt", 4, "stream"), model_bytes, share=0.3)
  for r in _run_workers(tmp_path, tmp_path / "ckpt", 4, "naive"):
    print(f"\nold path: peak RSS growth {r['growth'] / 2**20:.1f} MiB; device buffers {r['held'] / 2**20:.1f} MiB; "
          f"read {r['read'] / 2**20:.1f} MiB")
    # The whole model was in host memory (part of it became the CPU device buffers: JAX aliases aligned
    # host arrays), and the bound the streaming loader meets is broken.
    assert r["read"] == model_bytes and r["growth"] > model_bytes
    assert r["growth"] - r["held"] > 0.25 * model_bytes
