"""Transfer strategies as data: ordered `(pattern, rule)` lists over parameter paths.

A parameter path is the `/`-joined key path inside `params`, e.g. `stage3/block1/conv1/kernel`.
A rule is `FROZEN` or a learning-rate multiplier > 0. For each parameter the first pattern
that matches (`re.fullmatch`) decides; a parameter no pattern matches is an error, so a rule
list can never silently leave something trainable.

A strategy is one or more `Stage`s (multi-stage strategies such as LP-FT are several), plus
whether the backbone starts from the pretrained weights. Strategies are named by a spec
string `name` or `name:key=value,...`, e.g. `partial:k=2`, `discriminative:decay=0.5`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Union

from tlresearch.errors import UserError, choices

FROZEN = "frozen"
Rule = Union[str, float]


@dataclasses.dataclass(frozen=True)
class Stage:
  rules: tuple[tuple[str, Rule], ...]
  epochs: int | None = None  # None: the whole epoch budget (or what earlier stages left).
  name: str = "train"


@dataclasses.dataclass(frozen=True)
class Strategy:
  spec: str
  stages: tuple[Stage, ...]
  pretrained: bool = True


def group_pattern(group: str) -> str:
  return re.escape(group) + "/.*"


def _top_k(groups, k: int, spec: str) -> tuple[tuple[str, Rule], ...]:
  backbone = groups[:-1]  # groups[-1] is the head.
  if not 0 <= k <= len(backbone):
    raise UserError(f"strategy '{spec}': k must be in 0..{len(backbone)} for this backbone "
                    f"(groups: {', '.join(groups)}), got {k}")
  trainable = list(backbone[len(backbone) - k:]) + [groups[-1]]
  return tuple((group_pattern(g), 1.0) for g in trainable) + ((".*", FROZEN),)


def linear_probe(groups) -> Strategy:
  """Full freezing: only the new head learns."""
  return Strategy("linear_probe", (Stage(((group_pattern(groups[-1]), 1.0), (".*", FROZEN))),))


def partial(groups, k: int) -> Strategy:
  """The top k backbone groups and the head learn; everything below is frozen."""
  return Strategy(f"partial:k={k}", (Stage(_top_k(groups, k, f"partial:k={k}")),))


def full(groups) -> Strategy:
  return Strategy("full", (Stage(((".*", 1.0),)),))


def scratch(groups) -> Strategy:
  """Control: same network and budget as `full`, from random initialisation."""
  return Strategy("scratch", (Stage(((".*", 1.0),)),), pretrained=False)


def discriminative(groups, decay: float = 0.5) -> Strategy:
  """Discriminative learning rates (Howard & Ruder 2018): head x1, each group below x decay."""
  if not 0 < decay <= 1:
    raise UserError(f"strategy 'discriminative': decay must be in (0, 1], got {decay}")
  n = len(groups)
  rules = tuple((group_pattern(g), float(decay ** (n - 1 - i))) for i, g in enumerate(groups))
  return Strategy(f"discriminative:decay={decay:g}", (Stage(rules),))


STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "linear_probe": linear_probe,
    "partial": partial,
    "full": full,
    "scratch": scratch,
    "discriminative": discriminative,
}


def _parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def parse_spec(spec: str) -> tuple[str, dict]:
  name, _, opts = str(spec).partition(":")
  kwargs = {}
  for item in filter(None, opts.split(",")):
    key, eq, value = item.partition("=")
    if not eq:
      raise UserError(f"strategy '{spec}': options must look like key=value, got '{item}'")
    kwargs[key.strip()] = _parse_value(value.strip())
  return name.strip(), kwargs


def get(spec: str, groups) -> Strategy:
  """The strategy named by `spec` for a backbone with ordered `groups` (head last)."""
  name, kwargs = parse_spec(spec)
  if name not in STRATEGIES:
    raise UserError(f"unknown strategy '{spec}'; valid: {choices(STRATEGIES)} "
                    "(options as name:key=value, e.g. partial:k=2)")
  try:
    return STRATEGIES[name](tuple(groups), **kwargs)
  except TypeError as e:
    raise UserError(f"strategy '{spec}': bad options ({e})") from None


def resolve(rules, paths) -> dict[str, Rule]:
  """path -> rule, first match wins; raises ValueError naming unmatched parameters."""
  compiled = [(re.compile(p), r) for p, r in rules]
  out, unmatched = {}, []
  for path in paths:
    for pattern, rule in compiled:
      if pattern.fullmatch(path):
        out[path] = rule
        break
    else:
      unmatched.append(path)
  if unmatched:
    raise ValueError(f"no rule matches parameters: {', '.join(unmatched)}")
  for path, rule in out.items():
    if rule != FROZEN and not (isinstance(rule, (int, float)) and rule > 0):
      raise ValueError(f"rule for {path} must be '{FROZEN}' or a multiplier > 0, got {rule!r}")
  return out


def frozen_groups(rule_by_path: dict[str, Rule], groups) -> tuple[str, ...]:
  """Groups whose every parameter is frozen: their BatchNorm runs in inference mode."""
  return tuple(g for g in groups
               if all(r == FROZEN for p, r in rule_by_path.items() if p.split("/")[0] == g))
