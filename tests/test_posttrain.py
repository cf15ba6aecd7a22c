"""R1 post-training: rewards, SFT masking, rollout layout, the GRPO objective and step, distillation.

Model-based tests use the tiny model of configs/tiny-grpo.yaml and tiny-sft.yaml (2 layers). The sampler below is a plain jitted loop over
`model.apply` without a KV cache; it exists only here, standing in for the project's generator.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax import model as model_lib
from deepseek_jax import trainer
from deepseek_jax.config import Config, ConfigError, MeshConfig, TrainConfig, load_config
from deepseek_jax.data import ByteTokenizer, DataError
from deepseek_jax.posttrain import arithmetic, distill, grpo, grpo_loop, logprobs, rewards, rollout, sft, template
from deepseek_jax.posttrain.template import Problem
from deepseek_jax.loss import Batch
from deepseek_jax.run import Run
from sharding.mesh import make_mesh
from sharding.rules import mesh_spec

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()
TINY = ["model.n_layers=2", "model.seq_aux_alpha=0.0", "optim.warmup_steps=0", "optim.weight_decay=0.0",
        "train.bias_update_speed=0.0"]
FAST_COMPILE = {"xla_backend_optimization_level": 0}   # compile time dominates on 2 cores; LLVM is not under test


def _jit(fn):
  return jax.jit(fn, compiler_options=FAST_COMPILE)


def _cfg(path="configs/tiny-grpo.yaml", *extra):
  return load_config(ROOT / path, TINY + list(extra))


def _model(cfg, seed=0):
  """(graphdef, fresh TrainState, tx), initialized once per model and optimizer config (arrays are immutable)."""
  return _init(cfg.model, cfg.optim, seed)


@functools.lru_cache(maxsize=None)
def _init(model_cfg, optim_cfg, seed):
  cfg = Config(model=model_cfg, optim=optim_cfg, train=TrainConfig(seed=seed), mesh=MeshConfig(data=1))
  run = Run(cfg, jax.devices()[:1])
  return run.graphdef, run.init_state(), run.tx


# Rewards ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("<think>x</think><answer>42</answer>", "42"),
    ("<answer>1</answer> then <answer> 7 </answer>", "7"),                     # the last tag wins
    ("so the result is \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"),               # nested braces
    ("<answer>it is \\boxed{12} or \\boxed{13}</answer>", "13"),
    ("no final answer here", None),
    ("<answer>unclosed", None),
])
def test_extract_answer(text, want):
  assert rewards.extract_answer(text) == want


@pytest.mark.parametrize("pred,ref,same", [
    ("0.5", "1/2", True), ("\\frac{1}{2}", "0.5", True), ("-\\dfrac{6}{4}", "-1.5", True), ("1,234", "1234", True),
    ("$7$", "7", True), ("7.", "7", True), ("\u22123", "-3", True), ("2.5e1", "25", True), ("+4", "4", True),
    ("12", "21", False), ("0.333", "1/3", False), ("1/0", "0", False), ("12 apples", "12", False),
    ("Paris.", "paris", True), ("", "", False),
])
def test_answers_match(pred, ref, same):
  assert rewards.answers_match(pred, ref) is same


def test_accuracy_and_format_rewards():
  good = "<think>7+8=15,3+5+1=9</think><answer>95</answer>"
  assert rewards.accuracy_reward(good, "95") == 1.0
  assert rewards.accuracy_reward(good, "96") == 0.0
  assert rewards.accuracy_reward("95", "95") == 0.0                       # no tag, no box: no stated answer
  assert rewards.accuracy_reward("\\boxed{95}", "95") == 1.0
  assert rewards.format_reward(good, "") == 1.0
  assert rewards.format_reward(" <think>a</think>\n<answer>b</answer> ", "") == 1.0
  for bad in ("<answer>95</answer>", "<think>a</think>", "<answer>1</answer><think>a</think>",
              "<think>a</think><answer>1</answer><answer>2</answer>", "<think>a</think><answer> </answer>",
              "x<think>a</think><answer>1</answer>", "<think>a<think>b</think><answer>1</answer>"):
    assert rewards.format_reward(bad, "") == 0.0, bad
  combined = rewards.make_reward_fn(("accuracy", "format"), (1.0, 0.5))
  assert combined(good, "95") == 1.5 and combined(good, "1") == 0.5
  with pytest.raises(ValueError, match="unknown reward names"):
    rewards.make_reward_fn(("accuracy", "nope"))


# The bundled task and SFT ----------------------------------------------------------------------------------

def test_arithmetic_task_is_deterministic_and_held_out_is_disjoint():
  train = arithmetic.make_problems(300, split="train", digits=2, seed=3)
  test = arithmetic.make_problems(100, split="test", digits=2, seed=3)
  assert train == arithmetic.make_problems(300, split="train", digits=2, seed=3)
  assert not {p.prompt for p in train} & {p.prompt for p in test}
  for p in train + test:
    assert eval(p.prompt) == int(p.answer)                             # the reference answers are right
  noisy = arithmetic.add_noise(train, 0.5, seed=0)
  wrong = sum(n.answer != p.answer for n, p in zip(noisy, train))
  assert 100 < wrong < 200 and all(n.prompt == p.prompt for n, p in zip(noisy, train))


def test_sft_batches_train_on_response_tokens_only():
  problems = arithmetic.make_problems(40, split="train", digits=2, seed=0)
  examples = sft.encode_examples(TOK, problems, eos_id=10, seq_len=160)
  batch = next(sft.make_sft_dataset(examples, seq_len=160, batch_size=4, seed=0))
  responses = {template.format_response(p) + "\n" for p in problems}
  for b in range(4):
    # The masked targets of a row are the whole responses (with eos) of the examples packed into it, in order.
    targets = TOK.decode(batch["targets"][b][batch["loss_mask"][b] > 0].tolist())
    packed = [s for s in targets.split("\n") if s]
    assert packed and all(s + "\n" in responses for s in packed), targets
    assert "User:" not in targets and targets.endswith("\n")
    assert len(packed) == batch["segment_ids"][b].max()                 # several examples per row


def test_sft_loss_ignores_prompt_targets():
  cfg = _cfg("configs/tiny-sft.yaml", "data.seq_len=96")
  graphdef, state, _ = _model(cfg)
  problems = arithmetic.make_problems(8, split="train", digits=2, seed=0)
  batch = next(sft.make_sft_dataset(sft.encode_examples(TOK, problems, 10, 96), seq_len=96, batch_size=2, seed=0))
  loss = _jit(lambda b: trainer.loss_fn(state.params, state.bias, Batch.from_dict(b), graphdef=graphdef,
                                        cfg=cfg)[0])
  prompt = (batch["loss_mask"] == 0) & (batch["segment_ids"] > 0)
  assert prompt.sum() > 20
  scrambled = dict(batch, targets=np.where(prompt, (batch["targets"] + 17) % 256, batch["targets"]))
  np.testing.assert_array_equal(loss(batch), loss(scrambled))
  response = batch["loss_mask"] > 0
  changed = dict(batch, targets=np.where(response, (batch["targets"] + 17) % 256, batch["targets"]))
  assert abs(float(loss(changed)) - float(loss(batch))) > 1e-3


def test_sft_refuses_examples_longer_than_a_row():
  with pytest.raises(DataError, match="raise data.seq_len"):
    sft.encode_examples(TOK, [Problem("1+1", "2", "1+1=2")], eos_id=10, seq_len=16)


def test_problems_jsonl_round_trip(tmp_path):
  problems = [Problem("1+1", "2", "1+1=2"), Problem("what?", "", response="<answer>x</answer>"),
              *arithmetic.make_problems(30, split="test", digits=2, seed=0)]
  template.write_problems(tmp_path / "p.jsonl", problems)
  back = template.read_problems(tmp_path / "p.jsonl", "train") + template.read_problems(tmp_path / "p.jsonl", "test")
  assert sorted(back, key=str) == sorted(problems, key=str)
  assert all(template.is_held_out(p.prompt) for p in template.read_problems(tmp_path / "p.jsonl", "test"))
  (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
  with pytest.raises(ValueError, match="bad.jsonl:1: needs a 'response' or an 'answer' field"):
    template.read_problems(tmp_path / "bad.jsonl", "train")


# Rollouts --------------------------------------------------------------------------------------------------

def _scripted_generate(texts, n_new):
  """A deterministic generate_fn: row b of the batch answers texts[b % len(texts)], padded with 'z'."""
  def generate(params, prompts_BP, lens_B, key):
    del params, lens_B, key
    rows = [TOK.encode(texts[b % len(texts)])[:n_new] for b in range(prompts_BP.shape[0])]
    return np.asarray([r + [ord("z")] * (n_new - len(r)) for r in rows], np.int32)
  return generate


def test_rollout_layout_rewards_and_advantages():
  problems = [Problem("1+2", "3"), Problem("10-4", "6")]
  texts = ["<think>a</think><answer>3</answer>\nJUNK", "<answer>3</answer>\n", "<think>b</think><answer>6</answer>\n",
           "<think>unfinished"]
  reward_fn = rewards.make_reward_fn(("accuracy", "format"))
  rb = rollout.rollout(_scripted_generate(texts, 40), None, problems, 2, jax.random.key(0), tokenizer=TOK,
                       reward_fn=reward_fn, max_prompt_len=24, eos_id=10)
  # Rows 0, 1 answer prompt 0 ("3"); rows 2, 3 answer prompt 1 ("6").
  np.testing.assert_array_equal(rb.rewards, [2.0, 1.0, 2.0, 0.0])
  np.testing.assert_array_equal(rb.finished, [True, True, True, False])
  assert rb.completions[0] == "<think>a</think><answer>3</answer>" and rb.completions[3].startswith("<think>unf")
  adv = np.asarray(grpo.group_advantages(rb.rewards, 2, 1e-4))
  np.testing.assert_allclose(adv, np.array([0.5, -0.5, 1, -1]) / (np.array([0.5, 0.5, 1, 1]) + 1e-4), rtol=1e-6)
  b = rb.batch
  assert all(v.shape == (4, 24 + 40 - 1) for v in b.values())
  for row in range(4):
    prompt = template.format_prompt(problems[row // 2].prompt)
    start = 24 - len(prompt)
    n_resp = rb.completion_lens[row]
    assert TOK.decode(b["inputs"][row, start:24].tolist()) == prompt
    np.testing.assert_array_equal(b["inputs"][row, :start], 0)
    col = np.arange(63)
    np.testing.assert_array_equal(b["segment_ids"][row], (col >= start) & (col - start < len(prompt) + n_resp))
    np.testing.assert_array_equal(b["positions"][row, start:start + len(prompt) + 3], np.arange(len(prompt) + 3))
    want = (texts[row] + "z" * 40)[:n_resp]                              # through the eos, never the junk after it
    assert TOK.decode(b["targets"][row][b["loss_mask"][row] > 0].tolist()) == want
    np.testing.assert_allclose(b["advantages"][row], adv[row] * b["loss_mask"][row])
  assert rb.completion_lens[3] == 40 and b["loss_mask"][3].sum() == 40
  m = rb.metrics(2)
  assert m["reward_mean"] == 1.25 and m["accuracy"] == 0.75 and m["finished"] == 0.75
  assert m["reward_group_std"] == pytest.approx(0.75) and m["completion_len"] == np.mean(rb.completion_lens)


def test_rollout_errors_are_one_line():
  problems = [Problem("1+2", "3")]
  gen = _scripted_generate(["<answer>3</answer>\n"], 8)
  kw = dict(tokenizer=TOK, max_prompt_len=24, eos_id=10)
  with pytest.raises(ValueError, match=r"^reward nan \(not finite\) for completion 0 of prompt '1\+2'$"):
    rollout.rollout(gen, None, problems, 2, None, reward_fn=lambda c, a: float("nan"), **kw)
  with pytest.raises(ValueError, match="has 21 tokens with the template; posttrain.max_prompt_len is 8"):
    rollout.rollout(gen, None, problems, 2, None, reward_fn=rewards.accuracy_reward, **{**kw, "max_prompt_len": 8})
  with pytest.raises(ValueError, match=r"generate_fn returned shape \(3, 8\), expected \(2, max_new_tokens\)"):
    rollout.rollout(lambda *a: np.zeros((3, 8)), None, problems, 2, None, reward_fn=rewards.accuracy_reward, **kw)
  with pytest.raises(ValueError, match="rollout got no prompts"):
    rollout.rollout(gen, None, [], 2, None, reward_fn=rewards.accuracy_reward, **kw)
  with pytest.raises(ValueError, match="do not split into groups of 3"):
    grpo.group_advantages(np.ones(4), 3, 1e-4)
  with pytest.raises(ValueError, match="do not split into groups"):
    grpo.group_advantages(np.ones(0), 2, 1e-4)


def test_prompts_for_step_is_a_pure_function_of_the_step():
  problems = arithmetic.make_problems(10, split="train", digits=2, seed=0)
  epoch = [p for s in range(5) for p in rollout.prompts_for_step(problems, s, 2, seed=1)]
  assert sorted(epoch, key=str) == sorted(problems, key=str)            # every prompt once per epoch
  assert rollout.prompts_for_step(problems, 7, 3, seed=1) == rollout.prompts_for_step(problems, 7, 3, seed=1)
  assert rollout.prompts_for_step(problems, 0, 2, seed=1) != rollout.prompts_for_step(problems, 0, 2, seed=2)


# The GRPO objective ----------------------------------------------------------------------------------------

def _np_grpo(logp, old, ref, adv_b, mask, eps, beta, norm):
  """Loop-by-loop NumPy reference of DeepSeekMath Eq. 3 (with the k3 KL)."""
  B, L = mask.shape
  total, per_seq = 0.0, []
  for b in range(B):
    terms = []
    for t in range(L):
      if not mask[b, t]:
        continue
      r = np.exp(logp[b, t] - old[b, t])
      pg = -min(r * adv_b[b], np.clip(r, 1 - eps, 1 + eps) * adv_b[b])
      kl = np.exp(ref[b, t] - logp[b, t]) - (ref[b, t] - logp[b, t]) - 1
      terms.append(pg + beta * kl)
    per_seq.append(terms)
  if norm == "sequence":
    return np.mean([np.mean(t) for t in per_seq])
  return np.sum([np.sum(t) for t in per_seq]) / sum(len(t) for t in per_seq)


def _random_terms(seed, B=4, L=7):
  rng = np.random.default_rng(seed)
  mask = np.zeros((B, L), np.int32)
  for b, n in enumerate([2, 7, 4, 1][:B]):
    mask[b, L - n:] = 1                                                  # completions of different lengths
  logp, old, ref = (np.log(rng.uniform(0.05, 1.0, (B, L))) for _ in range(3))
  adv_b = rng.normal(size=B)
  return [x.astype(np.float32) for x in (logp, old, ref)], adv_b.astype(np.float32), mask


@pytest.mark.parametrize("norm", ["sequence", "token"])
def test_grpo_objective_matches_numpy_reference(norm):
  (logp, old, ref), adv_b, mask = _random_terms(0)
  w = grpo.loss_weights(jnp.asarray(mask), norm)
  got, _ = grpo.grpo_objective(logp * mask, old * mask, ref * mask, adv_b[:, None] * mask, w, clip_eps=0.2,
                               kl_beta=0.1)
  want = _np_grpo(logp, old, ref, adv_b, mask, 0.2, 0.1, norm)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  other = _np_grpo(logp, old, ref, adv_b, mask, 0.2, 0.1, {"sequence": "token", "token": "sequence"}[norm])
  assert abs(want - other) > 1e-3                                        # the two normalizations differ here


def test_group_advantages_match_numpy_and_vanish_for_equal_rewards():
  r = np.array([1, 0, 0, 1, 5, 5, 5, 5, 0, 2, 4, 7], np.float32)
  got = np.asarray(grpo.group_advantages(r, 4, 1e-4))
  g = r.reshape(3, 4)
  want = ((g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + 1e-4)).reshape(-1)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_array_equal(got[4:8], 0.0)
  np.testing.assert_allclose(got.reshape(3, 4)[[0, 2]].std(1), 1.0, atol=1e-3)   # per group, not global
  np.testing.assert_allclose(got.reshape(3, 4).mean(1), 0.0, atol=1e-6)


def test_equal_reward_group_contributes_no_policy_gradient():
  (logp, _, _), _, mask = _random_terms(1)
  adv = np.asarray(grpo.group_advantages(np.array([3.0, 3.0, 0.0, 1.0], np.float32), 2, 1e-4))
  w = grpo.loss_weights(jnp.asarray(mask), "sequence")
  grad = jax.grad(lambda lp: grpo.grpo_objective(lp * mask, logp * mask, lp * mask, adv[:, None] * mask, w,
                                                 clip_eps=0.2, kl_beta=0.0)[0])(jnp.asarray(logp))
  np.testing.assert_array_equal(grad[:2], 0.0)                            # group 0: rewards 3, 3
  assert np.abs(grad[2:][mask[2:] > 0]).min() > 0                        # group 1 moves every completion token


def test_clipping_zeroes_the_gradient_only_in_the_unfavourable_direction():
  # Tokens: (ratio, advantage). Outside [0.8, 1.2] and pushing further out -> clipped (no gradient).
  cases = [(1.5, 1.0, True), (0.5, -1.0, True), (1.5, -1.0, False), (0.5, 1.0, False), (1.1, 1.0, False),
           (0.9, -1.0, False)]
  ratio = np.array([[c[0] for c in cases]], np.float32)
  adv = np.array([[c[1] for c in cases]], np.float32)
  old = np.full_like(ratio, -1.0)
  w = jnp.full(ratio.shape, 1.0 / ratio.size)
  objective = lambda lp: grpo.grpo_objective(lp, old, lp, adv, w, clip_eps=0.2, kl_beta=0.0)
  logp = jnp.asarray(old + np.log(ratio))
  grad = jax.grad(lambda lp: objective(lp)[0])(logp)[0]
  _, terms = objective(logp)
  for i, (r, a, clipped) in enumerate(cases):
    if clipped:
      assert grad[i] == 0.0 and terms["clipped"][0, i] == 1.0, cases[i]
    else:
      np.testing.assert_allclose(grad[i], -r * a / ratio.size, rtol=1e-5)   # d/dlogp of -ratio * A * w
      assert terms["clipped"][0, i] == 0.0


def test_k3_kl_is_zero_at_the_reference_and_an_unbiased_kl_estimate():
  (logp, old, ref), adv_b, mask = _random_terms(2)
  w = grpo.loss_weights(jnp.asarray(mask), "token")
  zero_adv = np.zeros_like(logp)
  at_ref, terms = grpo.grpo_objective(logp * mask, old * mask, logp * mask, zero_adv, w, clip_eps=0.2, kl_beta=1.0)
  assert float(at_ref) == 0.0
  g = jax.grad(lambda lp: grpo.grpo_objective(lp, old * mask, logp * mask, zero_adv, w, clip_eps=0.2,
                                              kl_beta=1.0)[0])(jnp.asarray(logp * mask))
  np.testing.assert_allclose(g, 0.0, atol=1e-7)                          # a minimum, not just a zero
  away, terms = grpo.grpo_objective(logp * mask, old * mask, ref * mask, zero_adv, w, clip_eps=0.2, kl_beta=1.0)
  assert float(away) > 0 and (np.asarray(terms["kl"])[mask > 0] > 0).all()
  # E_{x~pi}[k3(x)] = KL(pi || ref) exactly, over a whole categorical distribution.
  pi, pref = jax.nn.softmax(jnp.array([0.3, -1.0, 2.0, 0.1])), jax.nn.softmax(jnp.array([1.0, 0.0, -0.5, 0.2]))
  _, t = grpo.grpo_objective(jnp.log(pi)[None], jnp.log(pi)[None], jnp.log(pref)[None], jnp.zeros((1, 4)),
                             jnp.ones((1, 4)), clip_eps=0.2, kl_beta=1.0)
  np.testing.assert_allclose(jnp.sum(pi * t["kl"][0]), jnp.sum(pi * jnp.log(pi / pref)), rtol=1e-5)


# GRPO with the model ---------------------------------------------------------------------------------------

def _rollout_batch(cfg, graphdef, state, *, n_prompts=2, seed=0):
  """A scored rollout batch from scripted completions, with random rewards (so advantages are nonzero)."""
  pt = cfg.posttrain
  texts = ["<think>1+1=2</think><answer>2</answer>\n", "<answer>5</answer>\n", "<think>9</think>\n", "12345678"]
  problems = arithmetic.make_problems(n_prompts, split="train", digits=1, seed=seed)
  rng = np.random.default_rng(seed)
  rb = rollout.rollout(_scripted_generate(texts, 16), None, problems, pt.grpo.group_size, None, tokenizer=TOK,
                       reward_fn=lambda c, a: float(rng.integers(0, 3)), max_prompt_len=24, eos_id=10)
  score = _jit(functools.partial(grpo.score_rollout, graphdef=graphdef, temperature=pt.temperature))
  return score(rb.batch, state.params, state.bias, None, None)


def test_grpo_gradient_at_ratio_one_is_the_reinforce_gradient():
  cfg = _cfg("configs/tiny-grpo.yaml", "posttrain.grpo.kl_beta=0.0", "posttrain.grpo.group_size=4")
  graphdef, state, _ = _model(cfg)
  batch = _rollout_batch(cfg, graphdef, state)
  full = {k: batch[k] for k in grpo.ROLLOUT_KEYS}
  full["weight"] = grpo.loss_weights(full["loss_mask"], "sequence")
  full["token_weight"] = grpo.loss_weights(full["loss_mask"], "token")
  assert np.abs(np.asarray(full["advantages"])).max() > 0.5

  def reinforce(params):   # -(1/B) sum_i (1/|o_i|) sum_t A_i log pi(o_t)
    logp = logprobs.sequence_logprobs(graphdef, params, state.bias, full, cfg.posttrain.temperature)
    return -jnp.sum(full["weight"] * full["advantages"] * logp)

  loss_fn = functools.partial(grpo._loss_fn, graphdef=graphdef, cfg=cfg, n_micro=1)
  (loss, (metrics, _)), g_grpo = _jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params, state.bias, full)
  g_ref = _jit(jax.grad(reinforce))(state.params)
  np.testing.assert_allclose(float(metrics["ratio"]), 1.0, rtol=1e-6)
  assert float(metrics["clip_frac"]) == 0.0
  flat_grpo, flat_ref = jax.tree.leaves(g_grpo), jax.tree.leaves(g_ref)
  scale = max(float(jnp.abs(g).max()) for g in flat_ref)
  assert scale > 1e-4
  for a, b in zip(flat_grpo, flat_ref):
    np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=1e-4)


def _bias_moved(before, after) -> dict[str, bool]:
  return {top: any(bool((np.asarray(a) != np.asarray(b)).any())
                   for a, b in zip(jax.tree.leaves(before[top]), jax.tree.leaves(after[top])))
          for top in before}


def test_grpo_step_inner_updates_and_micro_batches():
  cfg = _cfg("configs/tiny-grpo.yaml", "posttrain.grpo.group_size=4", "train.batch_size=8",
             "train.bias_update_speed=0.01")
  graphdef, state, tx = _model(cfg)
  batch = _rollout_batch(cfg, graphdef, state)
  step = _jit(functools.partial(grpo.grpo_step, graphdef=graphdef, tx=tx, cfg=cfg))
  s1, m1 = step(state, batch)
  assert float(m1["ratio"]) == pytest.approx(1.0, abs=1e-6) and float(m1["kl"]) == pytest.approx(0.0, abs=1e-7)
  s2, m2 = step(s1, batch)                                                # second inner update: off-policy now
  assert abs(float(m2["ratio"]) - 1.0) > 1e-5 and float(m2["kl"]) > 0 and int(s2.step) == 2
  # Router biases: the main model's MoE layers are balanced on the rollout tokens; the MTP block is not run.
  moved = _bias_moved(state.bias, s1.bias)
  assert moved["moe_layers"] and not moved["mtp"]
  # Two micro-batches give the same update as one (the weights are over the whole batch).
  cfg2 = _cfg("configs/tiny-grpo.yaml", "posttrain.grpo.group_size=4", "train.batch_size=8", "train.grad_accum=2",
              "train.bias_update_speed=0.01")
  step2 = _jit(functools.partial(grpo.grpo_step, graphdef=graphdef, tx=tx, cfg=cfg2))
  s1b, m1b = step2(state, batch)
  np.testing.assert_allclose(float(m1b["loss"]), float(m1["loss"]), rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s1b.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_grpo_step_on_eight_devices_matches_one_device():
  cfg = _cfg("configs/tiny-grpo.yaml", "posttrain.grpo.group_size=4", "train.batch_size=8")
  graphdef, state, tx = _model(cfg)
  batch = _rollout_batch(cfg, graphdef, state)
  one_state, one = _jit(functools.partial(grpo.grpo_step, graphdef=graphdef, tx=tx, cfg=cfg))(state, batch)
  cfg8 = _cfg("configs/tiny-grpo.yaml", "posttrain.grpo.group_size=4", "train.batch_size=8", "mesh.data=2",
              "mesh.expert=4")
  mesh = make_mesh(cfg8.mesh, jax.devices()[:8])
  with jax.set_mesh(mesh):
    batch8 = jax.device_put(batch, NamedSharding(mesh, mesh_spec(("batch", None), mesh)))
    state8 = jax.device_put(state, NamedSharding(mesh, P()))
    step8 = _jit(functools.partial(grpo.grpo_step, graphdef=graphdef, tx=tx, cfg=cfg8))
    eight_state, eight = step8(state8, batch8)
  assert len(batch8["inputs"].sharding.device_set) == 8
  for k in ("loss", "pg_loss", "kl", "entropy", "grad_norm"):
    np.testing.assert_allclose(float(eight[k]), float(one[k]), rtol=1e-5, atol=1e-7, err_msg=k)
  # Adam moves a parameter with a near-zero gradient by up to lr whatever its sign, so compare to 0.1 lr.
  for a, b in zip(jax.tree.leaves(one_state.params), jax.tree.leaves(eight_state.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=0.1 * cfg.optim.lr)


def test_check_reference_refuses_another_model():
  def params(*overrides):   # shapes only
    return nnx.to_pure_dict(model_lib.abstract_model(_cfg("configs/tiny-grpo.yaml", *overrides).model)[1])
  grpo.check_reference(params(), params())
  with pytest.raises(ValueError, match=r"reference policy parameter .* has shape \(1, 64, 48\), the policy's \(1, 128, 48\)"):
    grpo.check_reference(params(), params("model.dim=64"))
  with pytest.raises(ValueError, match="do not have the policy's structure"):   # an MTP module more
    grpo.check_reference(params(), params("model.n_mtp_layers=2"))


def make_plain_sampler(graphdef, temperature: float, n_new: int):
  """generate_fn over model.apply without a cache: each new token reruns the whole [B, P + N] buffer."""
  @_jit
  def generate(variables, prompts_BP, lens_B, key):
    params, bias = variables
    B, P = prompts_BP.shape
    col_R = jnp.arange(P + n_new)
    start_B1 = (P - lens_B)[:, None]
    seg_BR = (col_R >= start_B1).astype(jnp.int32)
    pos_BR = jnp.maximum(col_R - start_B1, 0)

    def body(t, carry):
      buf_BR, key = carry
      logits_BRV, _ = model_lib.apply(graphdef, params, bias, buf_BR, pos_BR, seg_BR, mtp=False)
      key, sub = jax.random.split(key)
      tok_B = jax.random.categorical(sub, logits_BRV[:, P - 1 + t] / temperature)
      return buf_BR.at[:, P + t].set(tok_B.astype(jnp.int32)), key

    buf_BR = jnp.concatenate([prompts_BP, jnp.zeros((B, n_new), jnp.int32)], axis=1)
    buf_BR, _ = jax.lax.fori_loop(0, n_new, body, (buf_BR, key))
    return buf_BR[:, P:]
  return generate


def _letter_fraction(completion: str, answer: str) -> float:
  """Toy reward: the fraction of lowercase ASCII letters in the completion."""
  del answer
  return sum("a" <= c <= "z" for c in completion) / max(len(completion), 1)


def test_grpo_iterations_raise_a_toy_reward():
  n_new, G = 8, 4
  cfg = _cfg("configs/tiny-grpo.yaml", f"posttrain.grpo.group_size={G}", "train.batch_size=16",
             "optim.lr=3e-3", f"posttrain.max_new_tokens={n_new}", "posttrain.max_prompt_len=24",
             "posttrain.grpo.inner_steps=2")
  pt = cfg.posttrain
  graphdef, state, tx = _model(cfg)
  sample = make_plain_sampler(graphdef, pt.temperature, n_new)
  problems = arithmetic.make_problems(64, split="train", digits=1, seed=0)
  run = functools.partial(
      grpo_loop.grpo_iteration, cfg=cfg, problems=problems, generate_fn=sample, reward_fn=_letter_fraction,
      tokenizer=TOK, ref=(state.params, state.bias),
      score_fn=_jit(functools.partial(grpo.score_rollout, graphdef=graphdef, temperature=pt.temperature)),
      step_fn=_jit(functools.partial(grpo.grpo_step, graphdef=graphdef, tx=tx, cfg=cfg)))

  def mean_reward(state):   # fresh samples: 4 batches of 4 prompts x 4, the training shapes (no new compile)
    kw = dict(tokenizer=TOK, reward_fn=_letter_fraction, max_prompt_len=24, eos_id=pt.eos_id)
    return np.mean([rollout.rollout(sample, (state.params, state.bias), problems[4 * k:4 * k + 4], G,
                                    jax.random.key(100 + k), **kw).rewards.mean() for k in range(4)])

  before = mean_reward(state)
  for i in range(12):
    state, metrics, rb = run(state, i, jax.random.key(0))
  after = mean_reward(state)
  assert after > before + 0.2, (before, after)      # measured: 0.12 -> 0.51; 0.12 -> 0.12 without the pg term
  assert int(state.step) == 24 and metrics["kl"] > 0 and metrics["reward_mean"] == rb.rewards.mean()


def _oracle_generate(n_new):
  """Answers the templated arithmetic prompt in each row, wrongly in rows 0, 3, 6, ... of every call."""
  def generate(params, prompts_BP, lens_B, key):
    out = []
    for b, row in enumerate(prompts_BP):
      question = TOK.decode(row[len(row) - lens_B[b]:].tolist()).split("User: ")[1].split("\n")[0]
      answer = eval(question) + (1 if b % 3 == 0 else 0)
      out.append(TOK.encode(f"<think></think><answer>{answer}</answer>\n".ljust(n_new, "z"))[:n_new])
    return np.asarray(out, np.int32)
  return generate


def test_heldout_accuracy_scores_real_prompts_only():
  cfg = _cfg("configs/tiny-grpo.yaml")
  problems = arithmetic.make_problems(10, split="test", digits=2, seed=0)
  acc = grpo_loop.heldout_accuracy(_oracle_generate(40), None, problems, jax.random.key(0), cfg=cfg, tokenizer=TOK,
                                   batch_prompts=4)
  assert acc == pytest.approx(0.5)   # batches of 4, 4, 2 (+2 padding rows, one "right"): 2 + 2 + 1 right of 10


# Distillation ----------------------------------------------------------------------------------------------

def test_logit_kl_matches_numpy_and_vanishes_for_equal_logits():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 3, 5)).astype(np.float32), rng.normal(size=(2, 3, 5)).astype(np.float32)
  w = np.array([[0, 0.5, 0.5], [0, 0, 0]], np.float32)
  T = 2.0
  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  p, q = softmax(t / T), softmax(s / T)
  want = T * T * np.sum(w * np.sum(p * (np.log(p) - np.log(q)), -1))
  np.testing.assert_allclose(float(distill.logit_kl(s, t, w, T)), want, rtol=1e-5)
  assert float(distill.logit_kl(t, t, w, T)) == pytest.approx(0.0, abs=1e-7)


def test_distill_step_moves_the_student_towards_the_teacher():
  cfg = _cfg("configs/tiny-sft.yaml", "posttrain.mode=distill", "posttrain.distill.loss=logit",
             "posttrain.distill.teacher_config=configs/tiny-sft.yaml", "posttrain.distill.temperature=2.0",
             "model.n_layers=1", "model.n_mtp_layers=0", "optim.lr=3e-3", "data.seq_len=96")
  teacher_cfg = _cfg("configs/tiny-sft.yaml", "model.init_std=0.2")       # a sharper, different distribution
  distill.check_teacher(cfg.model, teacher_cfg.model)
  graphdef, state, tx = _model(cfg)
  t_graphdef, t_state, _ = _model(teacher_cfg, seed=1)
  problems = arithmetic.make_problems(16, split="train", digits=2, seed=0)
  batch = next(sft.make_sft_dataset(sft.encode_examples(TOK, problems, 10, 96), seq_len=96, batch_size=4, seed=0))
  step = _jit(functools.partial(distill.distill_step, graphdef=graphdef, teacher_graphdef=t_graphdef, tx=tx,
                                   cfg=cfg))
  teacher = (t_state.params, t_state.bias)
  kls = []
  for _ in range(6):
    state, m = step(state, batch, teacher)
    kls.append(float(m["distill_kl"]))
  assert all(b < a for a, b in zip(kls, kls[1:])) and kls[-1] < 0.85 * kls[0], kls
  with pytest.raises(ValueError, match="teacher vocab_size=512 differs from the student's 256"):
    distill.check_teacher(cfg.model, _cfg("configs/tiny-sft.yaml", "model.vocab_size=512").model)


def test_teacher_traces_keep_correct_finished_responses(tmp_path):
  problems = [Problem("1+2", "3"), Problem("2+2", "4")]
  texts = ["<think>x</think><answer>3</answer>\n", "<answer>5</answer>\n", "<answer>4</answer>\n",
           "<answer>4</answer> never ends"]   # rows: p0 right, p0 wrong, p1 right, p1 right but unfinished
  traces = distill.teacher_traces(_scripted_generate(texts, 40), None, problems, jax.random.key(0), tokenizer=TOK,
                                  max_prompt_len=24, eos_id=10, samples_per_prompt=2)
  assert traces == [Problem("1+2", "3", response="<think>x</think><answer>3</answer>"),
                    Problem("2+2", "4", response="<answer>4</answer>")]
  # They become SFT examples whose response is the teacher's text.
  ex = template.encode_example(TOK, traces[0], eos_id=10)
  assert TOK.decode(ex["tokens"][ex["response_mask"] > 0].tolist()) == "<think>x</think><answer>3</answer>\n"
  everything = distill.teacher_traces(_scripted_generate(texts, 40), None, problems, jax.random.key(0),
                                      tokenizer=TOK, max_prompt_len=24, eos_id=10, samples_per_prompt=2,
                                      keep_correct_only=False)
  assert [t.response for t in everything] == ["<think>x</think><answer>3</answer>", "<answer>5</answer>",
                                              "<answer>4</answer>"]
  # One prompt per generate call: each call's rows are texts[0], texts[1] again (the scripted generator).
  chunked = distill.teacher_traces(_scripted_generate(texts, 40), None, problems, jax.random.key(0), tokenizer=TOK,
                                   max_prompt_len=24, eos_id=10, samples_per_prompt=2, prompts_per_batch=1,
                                   keep_correct_only=False)
  assert [t.prompt for t in chunked] == ["1+2", "1+2", "2+2", "2+2"]


# Config ----------------------------------------------------------------------------------------------------

def test_example_configs_load():
  sft_cfg, grpo_cfg = load_config(ROOT / "configs/tiny-sft.yaml"), load_config(ROOT / "configs/tiny-grpo.yaml")
  assert sft_cfg.posttrain.mode == "sft" and grpo_cfg.posttrain.mode == "grpo"
  assert grpo_cfg.posttrain.rewards == ("accuracy", "format") and grpo_cfg.posttrain.reward_weights == (1.0, 0.2)
  assert load_config(ROOT / "configs/tiny.yaml").posttrain.mode == "pretrain"


@pytest.mark.parametrize("override,message", [
    ("posttrain.mode=rlhf", "posttrain.mode='rlhf' is not one of"),
    ("posttrain.grpo.group_size=1", "posttrain.grpo.group_size=1 must be >= 2"),
    ("posttrain.grpo.group_size=5", "train.batch_size=64 (completions per rollout batch) is not divisible by "
                                    "posttrain.grpo.group_size=5"),
    ("posttrain.grpo.clip_eps=0", "posttrain.grpo.clip_eps=0.0 must be in (0, 1)"),
    ("posttrain.grpo.loss_norm=batch", "posttrain.grpo.loss_norm='batch' is not one of"),
    ("posttrain.rewards=[accuracy,vibes]", "posttrain.rewards entry='vibes' is not one of"),
    ("posttrain.rewards=accuracy", "posttrain.rewards='accuracy' should be a list"),
    ("posttrain.reward_weights=[1.0]", "posttrain.reward_weights has 1 entries for 2 rewards"),
    ("posttrain.eos_id=300", "posttrain.eos_id=300 is not below model.vocab_size=256"),
    ("posttrain.max_new_tokens=300", "exceeds model.max_seq_len=256"),
    ("posttrain.grpo.kl_beta=-1", "posttrain.grpo.kl_beta=-1.0 must be >= 0"),
    ("posttrain.mode=distill", "posttrain.mode='distill' needs posttrain.distill.teacher_config or traces_path"),
])
def test_bad_posttrain_config_is_one_line(override, message):
  with pytest.raises(ConfigError) as e:
    load_config(ROOT / "configs/tiny-grpo.yaml", [override])
  assert message in str(e.value) and "\n" not in str(e.value)
