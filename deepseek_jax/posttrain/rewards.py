"""Rule-based rewards, as in DeepSeek-R1 (section 2.2.2): answer accuracy checked by a deterministic rule, and a
format reward for `<think>...</think><answer>...</answer>`. No learned reward model.

Every reward is a plain function `reward(completion: str, answer: str) -> float`, where `completion` is the decoded
response (end-of-sequence token removed) and `answer` is the reference answer of the prompt. They are registered
by name in `REWARDS`; `make_reward_fn` combines the names in `posttrain.rewards` with their weights.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Callable, Sequence

RewardFn = Callable[[str, str], float]

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


# Answer extraction -----------------------------------------------------------------------------------------

def _boxed_contents(text: str) -> list[str]:
  """Contents of every `\\boxed{...}` (and `\\fbox{...}`), with nested braces balanced."""
  out = []
  for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
    depth, i = 1, m.end()
    while i < len(text) and depth:
      depth += {"{": 1, "}": -1}.get(text[i], 0)
      i += 1
    if depth == 0:
      out.append(text[m.end():i - 1])
  return out


def extract_answer(text: str) -> str | None:
  """The final answer of a response: the last `<answer>` tag's content; inside it (or, without a tag, in the
  whole text) the last `\\boxed{}` wins. None when the response states no answer this way."""
  tags = _ANSWER_TAG.findall(text)
  scope = tags[-1] if tags else text
  boxed = _boxed_contents(scope)
  if boxed:
    return boxed[-1].strip()
  return scope.strip() if tags else None


# Normalization ---------------------------------------------------------------------------------------------

_FRAC = re.compile(r"^(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d*)?$")


def parse_number(s: str) -> Fraction | None:
  """An exact rational for '42', '-3.50', '1,234', '3/4', '\\frac{3}{4}', '-\\dfrac{1}{2}', '2.5e3', '$7', '7.';
  None if `s` is not a number. Fractions compare exactly, so '0.5' == '1/2' == '\\frac{1}{2}'."""
  s = s.strip().replace("\u2212", "-")            # unicode minus
  s = re.sub(r"^\$|\$$", "", s).strip()           # $7 or math-mode $7$
  s = re.sub(r"\\[,!; ]", "", s).replace(" ", "")
  s = s.rstrip(".") if re.match(r"^[+-]?\d+\.$", s) else s
  if _THOUSANDS.match(s):
    s = s.replace(",", "")
  if m := _FRAC.match(s):
    num, den = parse_number(m.group(2)), parse_number(m.group(3))
    if num is None or den is None or den == 0:
      return None
    return -num / den if m.group(1) else num / den
  if s.count("/") == 1:
    num, den = (parse_number(p) for p in s.split("/"))
    return None if num is None or den is None or den == 0 else num / den
  if _NUMBER.match(s):
    return Fraction(s)
  return None


def normalize_text(s: str) -> str:
  """Non-numeric answers: case, spaces, surrounding $ and a final period do not matter."""
  s = re.sub(r"^\$|\$$", "", s.strip()).strip().rstrip(".")
  return " ".join(s.lower().split())


def answers_match(predicted: str, reference: str) -> bool:
  """Numbers compare as exact rationals; anything else as normalized text."""
  p, r = parse_number(predicted), parse_number(reference)
  if p is not None and r is not None:
    return p == r
  if p is not None or r is not None:
    return False
  return normalize_text(predicted) == normalize_text(reference) != ""


# Rewards ---------------------------------------------------------------------------------------------------

def accuracy_reward(completion: str, answer: str) -> float:
  """1.0 if the response's final answer (see `extract_answer`) equals the reference answer, else 0.0."""
  predicted = extract_answer(completion)
  return float(predicted is not None and answers_match(predicted, answer))


def format_reward(completion: str, answer: str) -> float:
  """1.0 if the response is exactly `<think>...</think><answer>...</answer>` (whitespace around the blocks
  allowed), each tag once and a non-empty answer; else 0.0. `answer` is unused."""
  del answer
  m = _FORMAT.fullmatch(completion)
  if m is None or any(completion.count(t) != 1 for t in _TAGS):
    return 0.0
  return float(bool(m.group(2).strip()))


REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
}


def make_reward_fn(names: Sequence[str], weights: Sequence[float] = ()) -> RewardFn:
  """sum_i w_i * REWARDS[name_i](completion, answer); weights default to 1. Non-finite results raise."""
  unknown = [n for n in names if n not in REWARDS]
  if unknown or not names:
    raise ValueError(f"unknown reward names {unknown or list(names)} (known: {sorted(REWARDS)})")
  if weights and len(weights) != len(names):
    raise ValueError(f"{len(weights)} reward weights for {len(names)} rewards")
  pairs = list(zip(names, weights or [1.0] * len(names)))

  def reward(completion: str, answer: str) -> float:
    total = 0.0
    for name, w in pairs:
      r = float(REWARDS[name](completion, answer))
      if not math.isfinite(r):
        raise ValueError(f"reward {name!r} returned {r} for completion {completion[:40]!r}")
      total += w * r
    return total

  return reward
