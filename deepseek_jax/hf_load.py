"""Hugging Face safetensors -> deepseek_jax parameters, streamed: each host reads only what its devices hold.

`load_hf_params(path, cfg, param_shardings, bias_shardings)` builds every parameter as a global jax.Array with
`jax.make_array_from_callback`: for each distinct shard on this host's devices it reads the rows of the HF
tensors that the shard covers (plain file reads, no memory map), dequantizes FP8 blocks (spec section 7),
transposes to our layout and casts. Peak host memory is about this host's share of the model plus one shard,
never the whole model. `load_hf_checkpoint` is the same reader with whole-tensor boxes, returning float32
numpy arrays (for `convert import`, export round trips and tests).

Everything that can be checked from the headers (missing, unexpected or misshapen tensors, FP8 scales, the
index) is checked before any tensor data is read. Tensor names and layouts: convert.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import struct
from typing import Any

import jax
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.convert import DTYPES, ConversionError, Group, config_from_hf, flatten, groups, unflatten

Box = tuple[tuple[int, int], ...]   # (start, stop) per dimension
_CHUNK_BYTES = 64 << 20             # rows read at a time when a box takes only part of each row


# Safetensors files ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Tensor:
  file: pathlib.Path
  start: int                # byte offset of the tensor in the file
  dtype: np.dtype
  shape: tuple[int, ...]


def _read_header(path: pathlib.Path) -> dict[str, _Tensor]:
  """{name: _Tensor} of one safetensors file, every entry checked against the file size."""
  try:
    size = path.stat().st_size
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      if 8 + n > size:
        raise ValueError(f"header length {n} exceeds the file size {size}")
      entries = {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}
    tensors = {}
    for name, e in entries.items():
      if e["dtype"] not in DTYPES:
        raise ValueError(f"tensor {name} has unsupported dtype {e['dtype']}")
      dtype, shape, (b, end) = np.dtype(DTYPES[e["dtype"]]), tuple(e["shape"]), e["data_offsets"]
      if not 0 <= b <= end <= size - 8 - n or end - b != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"tensor {name}: data_offsets {e['data_offsets']} outside the file or not "
                         f"{math.prod(shape) * dtype.itemsize} bytes")
      tensors[name] = _Tensor(path, 8 + n + b, dtype, shape)
  except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ConversionError(f"{path}: unreadable or corrupt safetensors file ({msg})") from None
  return tensors


def dequantize_fp8(w8: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128),
                   offset: tuple[int, int] = (0, 0)) -> np.ndarray:
  """W[..., i, j] = float(W8[..., i, j]) * S[..., (i + r) // b0, (j + c) // b1] (spec section 7).

  `offset` = (r, c): where `w8` starts inside its first scale block (0 for a whole tensor); edge blocks may
  be ragged.
  """
  rows, cols = w8.shape[-2:]
  (r, c), (b0, b1) = offset, block
  want = w8.shape[:-2] + (-(-(r + rows) // b0), -(-(c + cols) // b1))
  if scale_inv.shape != want:
    raise ValueError(f"scale shape {scale_inv.shape} does not match weight {w8.shape} (expected {want})")
  s = np.repeat(np.repeat(scale_inv.astype(np.float32), b0, axis=-2), b1, axis=-1)
  out = w8.astype(np.float32)
  out *= s[..., r:r + rows, c:c + cols]
  return out


def _readinto(f, offset: int, out: np.ndarray, what: str) -> None:
  view = memoryview(out.reshape(-1).view(np.uint8))
  f.seek(offset)
  done = 0
  while done < len(view):
    got = f.readinto(view[done:])
    if not got:
      raise ConversionError(f"{what}: file ends after {done} of {len(view)} bytes (truncated?)")
    done += got


class _Reader:
  """All shards of a checkpoint directory: lookup, shape checks, and reads of boxes of tensors."""

  def __init__(self, directory: pathlib.Path, block: tuple[int, int]):
    index, listed = directory / "model.safetensors.index.json", {}
    if index.is_file():
      try:
        listed = dict(json.loads(index.read_text())["weight_map"])
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{index}: unreadable index ({type(e).__name__}: {e})") from None
      paths = [directory / f for f in sorted(set(listed.values()))]
    else:
      paths = sorted(directory.glob("*.safetensors"))
    if not paths:
      raise ConversionError(f"{directory}: no *.safetensors files")
    self.directory, self.block, self.used = directory, block, set()
    self.tensors: dict[str, _Tensor] = {}
    for p in paths:
      if not p.is_file():
        raise ConversionError(f"{p}: listed in model.safetensors.index.json but missing")
      for name, t in _read_header(p).items():
        if name in self.tensors:
          raise ConversionError(f"{name}: present in both {self.tensors[name].file.name} and {p.name}")
        self.tensors[name] = t
    for name, fname in listed.items():
      if name not in self.tensors or self.tensors[name].file.name != fname:
        raise ConversionError(f"{name}: listed in {index.name} under {fname} but not found there")
    self._files: dict[pathlib.Path, Any] = {}

  def close(self) -> None:
    for f in self._files.values():
      f.close()
    self._files.clear()

  def check(self, name: str, shape: tuple[int, ...]) -> None:
    """The tensor exists with this shape (FP8: with a matching `_scale_inv`); marks it used."""
    t = self.tensors.get(name)
    if t is None:
      raise ConversionError(f"{name}: missing from the checkpoint in {self.directory}")
    if t.shape != tuple(shape):
      raise ConversionError(f"{name}: expected shape {tuple(shape)}, got {t.shape} in {t.file}")
    self.used.add(name)
    scale = self.tensors.get(name + "_scale_inv")
    if scale is None:
      if t.dtype.itemsize == 1:
        raise ConversionError(f"{name}: {t.dtype} tensor without a {name}_scale_inv in {t.file}")
      return
    self.used.add(name + "_scale_inv")
    want = t.shape[:-2] + tuple(-(-n // b) for n, b in zip(t.shape[-2:], self.block))
    if len(t.shape) < 2 or scale.shape != want:
      raise ConversionError(f"{name}_scale_inv: scale shape {scale.shape} does not match weight {t.shape} "
                            f"(expected {want}) in {scale.file}")

  def _raw(self, name: str, box: Box) -> np.ndarray:
    """tensor[box] in its stored dtype, reading only the rows box[0] (in chunks when a row is cut)."""
    t = self.tensors[name]
    out = np.empty(tuple(b - a for a, b in box), t.dtype)
    if out.size == 0:
      return out
    if t.file not in self._files:
      self._files[t.file] = open(t.file, "rb", buffering=0)
    f, what = self._files[t.file], f"{name} in {t.file}"
    row = math.prod(t.shape[1:]) * t.dtype.itemsize
    (r0, r1), rest = box[0], box[1:]
    if all(a == 0 and b == n for (a, b), n in zip(rest, t.shape[1:])):   # whole rows: read straight in
      _readinto(f, t.start + r0 * row, out, what)
      return out
    step, inner = max(1, _CHUNK_BYTES // row), tuple(slice(a, b) for a, b in rest)
    for r in range(r0, r1, step):
      rows = np.empty((min(step, r1 - r),) + t.shape[1:], t.dtype)
      _readinto(f, t.start + r * row, rows, what)
      out[r - r0:r - r0 + len(rows)] = rows[(slice(None),) + inner]
    return out

  def read(self, name: str, box: Box) -> np.ndarray:
    """tensor[box] as float32, dequantized with its block scales if it has a `_scale_inv` sibling."""
    x = self._raw(name, box)
    if name + "_scale_inv" not in self.tensors:
      return x.astype(np.float32, copy=False)
    (b0, b1), (r0, r1), (c0, c1) = self.block, box[-2], box[-1]
    scale_box = box[:-2] + ((r0 // b0, -(-r1 // b0)), (c0 // b1, -(-c1 // b1)))
    scale = self._raw(name + "_scale_inv", scale_box)
    return dequantize_fp8(x, scale, self.block, (r0 % b0, c0 % b1))


# Our leaves from boxes of HF tensors ---------------------------------------------------------------------

def _flat_index(box: Box, dims: tuple[int, ...]) -> np.ndarray:
  """Row-major flat indices, in `dims`, of the elements of `box` (in box order)."""
  grids = np.meshgrid(*(np.arange(a, b) for a, b in box), indexing="ij")
  return np.ravel_multi_index(grids, dims).reshape(-1) if dims else np.zeros(1, np.int64)


def _linear_box(reader: _Reader, grp: Group, box: Box) -> np.ndarray:
  """Our kernel [in..., out...] is HF [out, in] transposed, each side flattened: read the HF rows and columns
  that the box spans (exactly the box when it cuts only leading dims of each side)."""
  (out_dim, in_dim), ours = grp.shapes[0], grp.ours[0]
  k = next(k for k in range(1, len(ours) + 1) if math.prod(ours[:k]) == in_dim)
  i_idx, o_idx = _flat_index(box[:k], ours[:k]), _flat_index(box[k:], ours[k:])
  (i0, i1), (o0, o1) = (int(i_idx[0]), int(i_idx[-1]) + 1), (int(o_idx[0]), int(o_idx[-1]) + 1)
  hf = reader.read(grp.names[0], ((o0, o1), (i0, i1)))
  shape = tuple(b - a for a, b in box)
  if len(i_idx) == i1 - i0 and len(o_idx) == o1 - o0:
    return hf.T.reshape(shape)
  return hf[np.ix_(o_idx - o0, i_idx - i0)].T.reshape(shape)


def _leaf_box(reader: _Reader, grp: Group, k: int, box: Box) -> np.ndarray:
  """Our leaf `grp.paths[k]` restricted to `box` (a box of `grp.ours[k]`), as float32."""
  shape = tuple(b - a for a, b in box)
  if grp.kind == "zeros" or math.prod(shape) == 0:
    return np.zeros(shape, np.float32)
  if grp.kind == "copy":
    return reader.read(grp.names[0], box)
  if grp.kind == "linear":
    return _linear_box(reader, grp, box)
  if grp.kind == "experts":            # ours [E, in, out] <- expert j's HF [out, in]
    (e0, e1), i, o = box
    out = np.empty(shape, np.float32)
    for j in range(e0, e1):
      out[j - e0] = reader.read(grp.names[j], (o, i)).T
    return out
  if grp.kind == "gate_up":            # ours [E, D, F]: w1 = rows [0, F) of HF [E, 2F, D], w3 = rows [F, 2F)
    e, d, (f0, f1) = box
    shift = k * grp.ours[k][2]
    return reader.read(grp.names[0], (e, (f0 + shift, f1 + shift), d)).transpose(0, 2, 1)
  e, f, d = box                        # down: ours [E, F, D] <- HF [E, D, F]
  return reader.read(grp.names[0], (e, d, f)).transpose(0, 2, 1)


# Checkpoints ---------------------------------------------------------------------------------------------

def _open(path: str | pathlib.Path, base: ModelConfig | None, load_mtp: bool
          ) -> tuple[ModelConfig, _Reader, list[Group]]:
  """Config, reader and groups of a checkpoint directory, with every header-level check done."""
  directory = pathlib.Path(path)
  cfg_file = directory / "config.json"
  if not cfg_file.is_file():
    raise ConversionError(f"{cfg_file}: not found (not a Hugging Face checkpoint directory?)")
  try:
    hf = json.loads(cfg_file.read_text())
  except (OSError, ValueError) as e:
    raise ConversionError(f"{cfg_file}: unreadable JSON ({e})") from None
  cfg = config_from_hf(hf, base)
  block = tuple((hf.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
  reader = _Reader(directory, block)
  names = reader.tensors
  mtp_prefixes = tuple(f"model.layers.{cfg.n_layers + k}." for k in range(cfg.n_mtp_layers))
  ignored = {p + s for p in mtp_prefixes for s in ("shared_head.head.weight", "embed_tokens.weight")}
  if not (load_mtp and any(n.startswith(mtp_prefixes) for n in names)):
    ignored |= {n for n in names if n.startswith(mtp_prefixes)}
    cfg = dataclasses.replace(cfg, n_mtp_layers=0)
  if not cfg.n_shared_experts:   # transformers writes zero-sized shared experts for n_shared_experts: 0
    ignored |= {n for n, t in names.items() if ".mlp.shared_experts." in n and math.prod(t.shape) == 0}
  fused = any(n.endswith(".mlp.experts.gate_up_proj") for n in names)
  grps = groups(cfg, fused)
  for grp in grps:
    for name, shape in zip(grp.names, grp.shapes):
      reader.check(name, shape)
  unused = sorted(n for n in set(names) - reader.used - ignored if not n.endswith("rotary_emb.inv_freq"))
  if unused:
    raise ConversionError(f"{directory}: {len(unused)} unexpected tensor(s): {', '.join(unused[:5])}"
                          + (", ..." if len(unused) > 5 else ""))
  return cfg, reader, grps


def load_hf_checkpoint(path: str | pathlib.Path, *, base: ModelConfig | None = None,
                       load_mtp: bool = True) -> tuple[ModelConfig, dict]:
  """Reads a HF DeepSeek-V2/V3 checkpoint directory -> (ModelConfig, params pure dict of float32 numpy arrays).

  The dict has the structure of `model.to_pure_dict(model.init_model(cfg))`, router biases included (zeros
  for V2, which has none). FP8 weights are dequantized with their `weight_scale_inv` block scales. Routed
  experts may be per-expert (`experts.{j}.gate_proj.weight`, what checkpoints and `save_pretrained` hold) or
  fused (`experts.gate_up_proj` / `experts.down_proj`, transformers 5.x in memory).

  MTP: module k is `model.layers.{n_layers + k}.*`; its duplicate `shared_head.head` / `embed_tokens` copies are
  ignored. If config.json announces MTP layers but the checkpoint has none (transformers' `save_pretrained`
  drops them), or `load_mtp=False`, the returned config has n_mtp_layers=0.
  Unknown tensors, missing tensors, wrong shapes and unreadable files raise a one-line ConversionError.
  """
  from deepseek_jax.convert import _check_tree
  cfg, reader, grps = _open(path, base, load_mtp)
  try:
    leaves = {p: np.ascontiguousarray(_leaf_box(reader, grp, k, tuple((0, n) for n in grp.ours[k])))
              for grp in grps for k, p in enumerate(grp.paths)}
  finally:
    reader.close()
  params = unflatten(leaves)
  _check_tree(cfg, params, str(path))
  return cfg, params


def _name(path) -> str:
  return ".".join(map(str, path))


def _box(index: tuple[slice, ...], shape: tuple[int, ...]) -> Box:
  box = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ConversionError(f"shard index {index} has a step; only contiguous shards are supported")
    box.append((start, stop))
  return tuple(box)


def _sharded_leaf(reader: _Reader, sources: list[tuple[Group, int]], target: jax.ShapeDtypeStruct, sharding,
                  stacked: bool) -> jax.Array:
  """One global array: each distinct box on this host's devices is read once (replicas share it). A stacked
  leaf (scanned layers, leading layer axis) reads its layer range from one checkpoint tensor per layer."""
  done: dict[Box, np.ndarray] = {}

  def read(box: Box) -> np.ndarray:
    if not stacked:
      grp, k = sources[0]
      return _leaf_box(reader, grp, k, box)
    (l0, l1), rest = box[0], box[1:]
    return np.stack([_leaf_box(reader, *sources[l], rest) for l in range(l0, l1)])

  def shard(index):
    box = _box(index, target.shape)
    if box not in done:
      done[box] = np.ascontiguousarray(read(box), target.dtype)
    return done[box]
  return jax.make_array_from_callback(target.shape, sharding, shard, dtype=target.dtype)


def _layer_paths(cfg: ModelConfig, path: tuple) -> list[tuple] | None:
  """The per-layer checkpoint paths ('layers', i, ...) of a stacked leaf, in stack order; None if unstacked."""
  from deepseek_jax import model
  if path[0] not in model.STACKS:
    return None
  return [("layers", i, *path[1:]) for i in model.stack_layer_ids(cfg)[path[0]]]


def load_hf_params(path: str | pathlib.Path, cfg: ModelConfig, param_shardings: dict, bias_shardings: dict
                   ) -> tuple[dict, dict]:
  """A HF checkpoint -> (params, router biases): pure dicts of global jax.Arrays placed as the shardings say.

  `param_shardings` / `bias_shardings` are pure dicts of Shardings in the structure of
  `nnx.to_pure_dict` of `model.split_model`'s params / bias States (e.g. from `sharding.rules.param_shardings`),
  i.e. with the scanned layer stacks. Each host reads from disk only the parts of tensors that its addressable
  devices hold. Arrays get the dtypes of `model.abstract_model(cfg)`. The checkpoint's architecture must be
  `cfg` (MTP layers are loaded when `cfg.n_mtp_layers > 0`); a difference, or any problem with the files, is a
  one-line ConversionError.
  """
  from deepseek_jax import model
  from flax import nnx
  hf_cfg, reader, grps = _open(path, cfg, load_mtp=cfg.n_mtp_layers > 0)
  if diff := [f"{f.name}={getattr(hf_cfg, f.name)!r} (config: {getattr(cfg, f.name)!r})"
              for f in dataclasses.fields(cfg) if getattr(hf_cfg, f.name) != getattr(cfg, f.name)]:
    reader.close()
    raise ConversionError(f"{path}: checkpoint architecture differs: {'; '.join(diff[:4])}")
  _, abstract_params, abstract_bias = model.abstract_model(cfg)
  targets = [flatten(nnx.to_pure_dict(s)) for s in (abstract_params, abstract_bias)]
  per_layer = {p: t for s in (abstract_params, abstract_bias) for p, t in flatten(model.to_pure_dict(s, cfg)).items()}
  shardings = [flatten(param_shardings), flatten(bias_shardings)]
  for what, want, got in zip(("param_shardings", "bias_shardings"), targets, shardings):
    if bad := sorted(set(want) ^ set(got), key=str):
      raise ConversionError(f"{what}: {'no entry for' if bad[0] in want else 'unexpected entry'} {_name(bad[0])}")
    if bad := [p for p, s in got.items() if not isinstance(s, jax.sharding.Sharding)]:
      raise ConversionError(f"{what}: {_name(bad[0])} is a {type(got[bad[0]]).__name__}, not a Sharding")
  source = {}
  for grp in grps:
    for k, (p, ours) in enumerate(zip(grp.paths, grp.ours)):
      if p not in per_layer or per_layer[p].shape != ours:   # convert.groups disagrees with the model
        raise ConversionError(f"params[{_name(p)}]: the HF mapping gives shape {ours}, the model "
                              f"{per_layer[p].shape if p in per_layer else 'has no such parameter'}")
      source[p] = (grp, k)
  out: tuple[dict, dict] = ({}, {})
  try:
    for i, target in enumerate(targets):
      for p, t in target.items():
        layer_paths = _layer_paths(cfg, p)
        if missing := [q for q in (layer_paths or [p]) if q not in source]:
          raise ConversionError(f"params[{_name(missing[0])}]: not in the HF mapping")
        sources = [source[q] for q in (layer_paths or [p])]
        out[i][p] = _sharded_leaf(reader, sources, t, shardings[i][p], stacked=layer_paths is not None)
  finally:
    reader.close()
  return unflatten(out[0]), unflatten(out[1])
