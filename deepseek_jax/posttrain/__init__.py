"""DeepSeek-R1 post-training: SFT, GRPO with rule-based rewards, and distillation.

  template.py    prompt/response records, the chat template (<think>/<answer>), JSONL
  arithmetic.py  the bundled, procedurally generated verifiable task (train / held-out splits)
  sft.py         SFT batches: loss on response tokens only, packed like deepseek_jax.data batches
  rewards.py     rule-based rewards (accuracy with a deterministic answer checker, format), by name
  logprobs.py    per-token log-probs and entropies of given sequences under the model
  rollout.py     sample G completions per prompt through an injected generate_fn, reward, lay out rows
  grpo.py        group advantages, the clipped GRPO objective with k3 KL, grpo_step
  distill.py     teacher traces for sequence-level distillation; logit-level KL and distill_step
  update.py      micro-batch gradient sums and the optimizer / router-bias update shared by the steps
"""
