"""The bench scripts' CPU smoke modes, run as the README runs them, and their JSON checked.

train_step: the bench's step is the loop's step (same losses on the same batches), Hugging Face's train step
on the same weights and batches gives the same losses (so the comparison is of one model), throughput and
MFU are positive. moe_layer: the mesh rows traced the expert-parallel shard_map and the local rows did not,
with the same loss. kernels: every tile setting and attention implementation ran and agrees with XLA.
"""

import importlib.util
import json

import numpy as np
import pytest

from bench import common, kernels, moe_layer, train_step

LOOP_METRICS = {"loss", "mtp_loss", "aux_loss", "dropped", "tokens", "grad_norm", "lr", "load_max", "load_min"}
HAVE_HF = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


def _smoke(module, tmp_path, *extra):
  out = tmp_path / "results.json"
  module.main(["--smoke", "--out", str(out), *extra])
  return json.loads(out.read_text())


def test_synthetic_batches_are_packed_like_the_data_pipeline():
  (b,) = common.synthetic_batches(1, batch=4, seq_len=256, vocab=100, seed=0)
  seg, pos = b["segment_ids"], b["positions"]
  assert {k: v.shape for k, v in b.items()} == {k: (4, 256) for k in b} and all(v.dtype == np.int32 for v in b.values())
  assert (seg >= 1).all() and (np.diff(seg, axis=1) >= 0).all() and min(len(np.unique(r)) for r in seg) >= 2
  new_doc = np.diff(seg, axis=1) > 0
  np.testing.assert_array_equal(pos[:, 1:], np.where(new_doc, 0, pos[:, :-1] + 1))   # restart at each document
  np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
  np.testing.assert_array_equal(b["loss_mask"][:, :-1], ~new_doc)                    # no target across documents
  assert b["inputs"].max() < 100


def test_train_step_smoke(tmp_path):
  r = _smoke(train_step, tmp_path)
  ours = r["systems"]["ours"]
  assert r["data"].startswith("real") and r["batch"] == 2 and r["seq_len"] == 64
  assert ours["mesh"] == "1x1x1x1" and ours["tokens_per_s"] > 0 and 0 < ours["mfu"] < 1
  np.testing.assert_allclose(ours["tokens_per_s"] * ours["step_s"], 2 * 64)
  assert len(ours["losses"]) == 3 and np.isfinite(ours["losses"]).all() and LOOP_METRICS <= set(ours["metrics"])
  loop = r["systems"]["loop"]
  assert loop["tokens_per_s"] > 0 and 0 < loop["mfu"] < 1 and sorted(loop["losses_at"]) == ["1", "2", "3"]
  assert r["compare"]["loop_loss_max_abs_diff"] < 1e-5 and r["compare"]["loop_over_ours"] > 0
  if HAVE_HF:
    hf = r["systems"]["hf"]
    assert hf["init"].startswith("ours") and hf["tokens_per_s"] > 0
    np.testing.assert_allclose(hf["losses"], ours["losses"], rtol=1e-4)
    assert r["compare"]["ours_over_hf"] > 0


@pytest.mark.skipif(not HAVE_HF, reason="needs torch and transformers")
def test_hf_attends_within_documents_and_hf_causal_across():
  """hf passes per-document positions, from which transformers masks attention to each document; hf_causal
  passes 0..S-1: the first document of a row is seen the same way by both, the later ones are not."""
  import torch
  cfg = train_step.bench_config(train_step.parse_args(["--smoke"]))
  model, init = train_step.hf_model(cfg, common.ROOT / "no_such_dir", "cpu")   # transformers' own init
  (b,) = common.synthetic_batches(1, batch=2, seq_len=64, vocab=256, seed=0)
  with torch.no_grad():
    docs, causal = (model(input_ids=x["input_ids"], position_ids=x["position_ids"]).logits.numpy()
                    for x in (train_step.hf_batch(b, "cpu", c) for c in (False, True)))
  first_doc = b["segment_ids"] == 1
  assert init.startswith("transformers")
  np.testing.assert_allclose(docs[first_doc], causal[first_doc], rtol=1e-5, atol=1e-6)
  assert np.abs(docs[~first_doc] - causal[~first_doc]).max() > 1e-4


def test_moe_layer_smoke(tmp_path):
  r = _smoke(moe_layer, tmp_path)
  rows = r["rows"]
  assert r["mesh"] == "1x1x1x1" and r["tokens"] == 2 * 64
  assert [(x["path"], x["gmm_impl"], x["capacity_factor"]) for x in rows] == [
      ("local", "xla", 0.0), ("mesh", "xla", 0.0), ("local", "ref", 0.0), ("mesh", "ref", 0.0),
      ("local", "-", 1.25), ("mesh", "-", 1.25)]
  for x in rows:
    assert x["shard_map"] == (x["path"] == "mesh") and x["ms"] > 0 and x["tflops"] > 0
  for local, mesh in zip(rows[::2], rows[1::2]):
    np.testing.assert_allclose(mesh["loss"], local["loss"], rtol=1e-5)
    assert mesh["mesh_over_local"] > 0


def test_kernels_smoke(tmp_path):
  r = _smoke(kernels, tmp_path)
  assert sorted(t["overrides"] for t in r["tiles"]) == ["model.gmm_tiles.block_m=128", "model.gmm_tiles.block_m=64"]
  assert all(t["ms"] > 0 and t["gmm_impl"] == "ref" for t in r["tiles"])
  attn = {(a["attn_impl"], a["rows"]): a for a in r["attention"]}
  assert set(attn) == {(i, rows) for i in ("xla", "splash_interpret") for rows in ("causal", "packed")}
  for a in attn.values():
    assert "error" not in a and a["ms"] > 0 and a["err_out"] < 1e-4 and a["err_grad"] < 1e-4
