"""train.py end to end on CPU: exact resume, mesh equivalence (through the expert-parallel path), metrics,
bad inputs."""

import pathlib
import shutil

import json

import jax
import numpy as np
import pytest

import train as train_cli
from deepseek_jax import loop as train_lib
from deepseek_jax.config import load_config
from deepseek_jax.run import Run
from sharding import expert_parallel

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["data.seq_len=32", "train.batch_size=8", "train.eval_every=0", "train.log_every=1",
         "model.n_layers=2", "model.n_mtp_layers=1", "optim.warmup_steps=2"]


def _cfg(*extra):
  return load_config(ROOT / "configs/tiny.yaml", SMALL + list(extra))


def _losses(history):
  return {h["step"]: (h["loss"], h["mtp_loss"]) for h in history if "loss" in h}


def test_stop_and_resume_is_bitwise_identical(tmp_path):
  straight, hist_a = train_lib.train(_cfg("train.steps=4", f"train.ckpt_dir={tmp_path / 'a'}", "train.ckpt_every=2"),
                                     devices=jax.devices()[:1])
  b = [f"train.ckpt_dir={tmp_path / 'b'}", "train.ckpt_every=2"]
  train_lib.train(_cfg("train.steps=2", *b), devices=jax.devices()[:1])
  resumed, hist_b = train_lib.train(_cfg("train.steps=4", *b), resume=True, devices=jax.devices()[:1])
  la, lb = _losses(hist_a), _losses(hist_b)
  assert sorted(lb) == [3, 4]
  for step in (3, 4):
    assert la[step] == lb[step], (step, la[step], lb[step])
  for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert (tmp_path / "b" / "metrics.jsonl").exists()


def test_eight_device_mesh_matches_one_device(monkeypatch):
  """Same losses, and the 8-device run really traced the expert-parallel shard_map (the maths is the same
  either way, so equality alone would not show it)."""
  calls = []
  ep = expert_parallel.routed_experts
  monkeypatch.setattr(expert_parallel, "routed_experts", lambda *a, **k: calls.append(a[-1].shape) or ep(*a, **k))
  steps = ["train.steps=5"]
  _, one = train_lib.train(_cfg(*steps), devices=jax.devices()[:1])
  _, eight = train_lib.train(_cfg(*steps, "mesh.data=2", "mesh.expert=4"), devices=jax.devices()[:8])
  assert {tuple(c.values()) for c in calls} >= {(2, 1, 4, 1)}, calls
  l1, l8 = _losses(one), _losses(eight)
  assert sorted(l1) == [1, 2, 3, 4, 5]
  for s in l1:
    np.testing.assert_allclose(l8[s], l1[s], rtol=1e-5, atol=1e-5)


def test_loss_falls():
  _, hist = train_lib.train(_cfg("train.steps=12", "optim.lr=3e-3"), devices=jax.devices()[:1])
  losses = _losses(hist)
  assert losses[12][0] < losses[1][0] - 0.5, losses


def _run_main(capsys, *args):
  rc = train_cli.main(["--config", str(ROOT / "configs/tiny.yaml"), *args])
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]  # skip the progress bar
  assert len(lines) == 1, lines
  return rc, lines[0]


@pytest.mark.parametrize("args, message", [
    (["--set", "data.path=/nonexistent/corpus.txt"], "not found"),
    (["--set", "data.seq_len=4096"], "exceeds model.max_seq_len"),
    (["--set", "model.dimm=3"], "unknown config key 'model.dimm'"),
    (["--set", "mesh.expert=3"], "mesh"),
    (["--set", "optim=0"], "section 'optim' must be a mapping, got int"),
    (["--set", "train=false"], "section 'train' must be a mapping, got bool"),
    (["--set", "model.gmm_impl=mgpu"], "model.gmm_impl='mgpu' needs Hopper GPUs"),
    (["--coordinator", "localhost:1234"], "--coordinator, --num-processes and --process-id must be given together"),
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "must look like host:port"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "--process-id=2 must be in [0"),
])
def test_bad_inputs_give_one_line_errors(capsys, args, message):
  rc, err = _run_main(capsys, *args)
  assert rc == 2
  assert message in err, err


def test_empty_corpus(tmp_path, capsys):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n")
  rc, err = _run_main(capsys, "--set", f"data.path={empty}")
  assert rc == 2 and "empty" in err.lower(), err


def test_corrupt_checkpoint_is_reported(tmp_path, capsys):
  ckpt = tmp_path / "ckpt"
  train_lib.train(_cfg("train.steps=2", f"train.ckpt_dir={ckpt}", "train.ckpt_every=2"), devices=jax.devices()[:1])
  shutil.rmtree(ckpt / "2" / "state")
  rc, err = _run_main(capsys, "--resume", *[f"--set={s}" for s in SMALL], "--set", "train.steps=4",
                      "--set", f"train.ckpt_dir={ckpt}")
  assert rc == 2 and str(ckpt / "2") in err, err


def test_resume_onto_a_different_mesh(tmp_path):
  """Saved on 1 device, resumed on a (data=2, expert=4) mesh: same losses as the straight 1-device run."""
  _, hist_a = train_lib.train(_cfg("train.steps=4"), devices=jax.devices()[:1])
  b = [f"train.ckpt_dir={tmp_path / 'b'}", "train.ckpt_every=2"]
  train_lib.train(_cfg("train.steps=2", *b), devices=jax.devices()[:1])
  state, hist_b = train_lib.train(_cfg("train.steps=4", "mesh.data=2", "mesh.expert=4", *b), resume=True,
                                  devices=jax.devices()[:8])
  la, lb = _losses(hist_a), _losses(hist_b)
  for step in (3, 4):
    np.testing.assert_allclose(lb[step], la[step], rtol=1e-5, atol=1e-5)
  w1 = state.params["moe_layers"]["ffn"]["w1"]
  assert w1.sharding.spec[1] == "expert" and len(w1.sharding.device_set) == 8


def test_metrics_jsonl_has_the_documented_keys(tmp_path):
  cfg = _cfg("train.steps=3", f"train.ckpt_dir={tmp_path}", "train.eval_every=3", "train.eval_batches=1")
  _, hist = train_lib.train(cfg, devices=jax.devices()[:1])
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_rows, eval_rows = [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3] and [r["step"] for r in eval_rows] == [3]
  keys = {"step", "loss", "mtp_loss", "aux_loss", "dropped", "tokens", "grad_norm", "lr", "load_max", "load_min",
          "tokens_per_s", "mfu"}
  for r in train_rows:
    assert keys <= set(r), keys - set(r)
    assert np.isfinite(r["loss"]) and 0 < r["loss"] < 10 and r["mtp_loss"] > 0 and r["grad_norm"] > 0
    assert r["dropped"] == 0 and r["tokens"] > 0.9 * 8 * 32 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    n_moe = 2   # one MoE layer (n_layers=2, first dense) + the MTP block
    assert len(r["load_max"]) == n_moe and all(mx >= 1.0 >= mn >= 0 for mx, mn in zip(r["load_max"], r["load_min"]))
  assert train_rows[0]["lr"] < train_rows[-1]["lr"]                       # warmup
  assert set(eval_rows[0]) == {"step", "val_loss", "val_ppl", "val_tokens"}
  np.testing.assert_allclose(eval_rows[0]["val_ppl"], np.exp(eval_rows[0]["val_loss"]), rtol=1e-6)
  assert rows == [{k: v for k, v in h.items()} for h in hist]


def test_grad_accumulation_matches_full_batch():
  from deepseek_jax import data as data_lib
  cfg1 = _cfg("model.n_mtp_layers=0")
  cfg2 = _cfg("model.n_mtp_layers=0", "train.grad_accum=2")
  local = next(data_lib.make_dataset(cfg1.data, batch_size=8))
  local["loss_mask"] = np.ones_like(local["loss_mask"])     # equal token counts per micro-batch
  out = []
  for cfg in (cfg1, cfg2):
    run = Run(cfg, jax.devices()[:1])
    out.append(run.train_step(run.init_state(), run.device_batch(local)))
  (s1, m1), (s2, m2) = out
  np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
  for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)


def test_init_from_hf_checkpoint(tmp_path):
  """Fine-tuning start: params exported to HF format and loaded through train.init_from are used as is."""
  from deepseek_jax import model as model_lib
  from deepseek_jax.convert import save_hf_checkpoint
  cfg = _cfg("train.steps=1", "model.n_mtp_layers=0")
  src = model_lib.to_pure_dict(model_lib.init_model(cfg.model, seed=7))
  save_hf_checkpoint(cfg.model, src, tmp_path / "hf")
  run = Run(_cfg("train.steps=1", "model.n_mtp_layers=0", f"train.init_from={tmp_path / 'hf'}"),
                      jax.devices()[:1])
  state = run.init_state()
  np.testing.assert_array_equal(np.asarray(state.params["embed"]), src["embed"])
  np.testing.assert_array_equal(np.asarray(state.bias["moe_layers"]["ffn"]["bias"][0]), src["layers"][1]["ffn"]["bias"])
  with pytest.raises(Exception, match="architecture differs"):
    Run(_cfg("model.n_mtp_layers=0", "model.route_scale=2.0", f"train.init_from={tmp_path / 'hf'}"),
                  jax.devices()[:1]).init_state()
