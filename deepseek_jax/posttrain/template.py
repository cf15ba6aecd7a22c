"""Prompt/response records, the chat template, and their tokenization.

The template (R1-Zero's, shortened for a byte-level tiny model):

    User: {prompt}\\nAssistant: <think>{think}</think><answer>{answer}</answer><eos>
    `------------ prompt -----------'`-------------------- response ---------------------'

The prompt part is what the policy is conditioned on when sampling; the response part (ending with the
end-of-sequence token `posttrain.eos_id`, "\\n" for the byte tokenizer) is what SFT trains on and what GRPO
samples and rewards. Records on disk are JSONL with a "prompt" and either a full "response" or "think" and
"answer" fields.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import zlib
from typing import Sequence

import numpy as np

PROMPT_TEMPLATE = "User: {prompt}\nAssistant: "
RESPONSE_TEMPLATE = "<think>{think}</think><answer>{answer}</answer>"


@dataclasses.dataclass(frozen=True)
class Problem:
  prompt: str         # the question, without the template ("37+58")
  answer: str         # the reference answer the accuracy reward checks ("95"); "" if unknown
  think: str = ""     # a reasoning trace for SFT
  response: str = ""  # a full response for SFT (e.g. a teacher's); "" = RESPONSE_TEMPLATE(think, answer)


def format_prompt(prompt: str) -> str:
  return PROMPT_TEMPLATE.format(prompt=prompt)


def format_response(problem: Problem) -> str:
  return problem.response or RESPONSE_TEMPLATE.format(think=problem.think, answer=problem.answer)


def is_held_out(prompt: str) -> bool:
  """The fixed held-out tenth of all prompts (by a hash of the prompt text, independent of any seed)."""
  return zlib.crc32(prompt.encode("utf-8")) % 10 == 0


def encode_example(tokenizer, problem: Problem, eos_id: int) -> dict[str, np.ndarray]:
  """-> {"tokens": [n], "response_mask": [n]}: template prompt + response + eos; mask = 1 on response and eos."""
  prompt = tokenizer.encode(format_prompt(problem.prompt))
  response = list(tokenizer.encode(format_response(problem))) + [eos_id]
  return {"tokens": np.asarray(list(prompt) + response, np.int32),
          "response_mask": np.asarray([0] * len(prompt) + [1] * len(response), np.int32)}


# JSONL -----------------------------------------------------------------------------------------------------

def read_problems(path: str | pathlib.Path, split: str) -> list[Problem]:
  """Records of `split` ("train" or "test", by `is_held_out` of the prompt) from a JSONL file."""
  path = pathlib.Path(path).expanduser()
  if split not in ("train", "test"):
    raise ValueError(f"split={split!r} must be 'train' or 'test'")
  if not path.is_file():
    raise ValueError(f"posttrain data file not found: {path}")
  out = []
  for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
      raise ValueError(f"{path}:{lineno}: needs a string field 'prompt'")
    if "response" not in rec and "answer" not in rec:
      raise ValueError(f"{path}:{lineno}: needs a 'response' or an 'answer' field")
    fields = {k: rec.get(k, "") for k in ("answer", "think", "response")}
    if bad := [k for k, v in fields.items() if not isinstance(v, str)]:
      raise ValueError(f"{path}:{lineno}: field {bad[0]!r} is {type(fields[bad[0]]).__name__}, expected a string")
    if is_held_out(rec["prompt"]) == (split == "test"):
      out.append(Problem(rec["prompt"], **fields))
  return out


def write_problems(path: str | pathlib.Path, problems: Sequence[Problem]) -> None:
  """One JSON object per line with the non-empty fields of each problem."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for p in problems:
      f.write(json.dumps({k: v for k, v in dataclasses.asdict(p).items() if v or k == "prompt"}) + "\n")
