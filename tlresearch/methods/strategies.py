"""Transfer strategies as data: ordered `(pattern, rule)` lists over parameter paths.

A parameter path is the `/`-joined key path inside `params`, e.g. `stage3/block1/conv1/kernel`.
A rule is `FROZEN` or a learning-rate multiplier > 0. For each parameter the first pattern
that matches (`re.fullmatch`) decides; a parameter no pattern matches is an error, so a rule
list can never silently leave something trainable.

A strategy is one or more `Stage`s (multi-stage strategies such as LP-FT or gradual
unfreezing are several, each with its own epoch budget, optimizer state and schedule), plus
which backbone groups start from the pretrained weights. A stage may add a loss penalty or
replace weight decay by one (tlresearch.methods.penalty: L2-SP, DELTA, BSS, LwF), and a
strategy may end with a weight-space method (WiSE-FT, model soups;
tlresearch.training.weight_space). Strategies are named by a spec string `name` or `name:key=value,...`, e.g. `partial:k=2`, `layer_decay:decay=0.7`,
`surgical:group=stage1`, `l2_sp:alpha=0.01,beta=0.01`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Union

from tlresearch.core.errors import UserError, choices

FROZEN = "frozen"
Rule = Union[str, float]


@dataclasses.dataclass(frozen=True)
class Stage:
  rules: tuple[tuple[str, Rule], ...]
  epochs: int | None = None  # None: what earlier stages left of the budget (see stage_epochs)
  name: str = "train"
  fraction: float | None = None  # epochs as a fraction of the budget (when `epochs` is None)
  weight_decay: bool = True  # False when `penalty` replaces the optimizer's weight decay
  penalty: tuple = ()  # ("l2_sp", alpha, beta): see tlresearch.methods.penalty
  # A stage that trains the head alone on cached features is solved to convergence by the
  # converged probe (tlresearch.methods.probe) unless the method itself prescribes its epochs.
  solve: bool = True


@dataclasses.dataclass(frozen=True)
class Strategy:
  spec: str
  stages: tuple[Stage, ...]
  pretrained: bool = True
  # Load only the first n groups from the checkpoint (the rest keep their random init);
  # None: every backbone group. The head is never loaded unless the cell asks for it.
  transfer_groups: int | None = None
  # A weight-space method (tlresearch.training.weight_space): ("wise_ft", bn) interpolates
  # between the last stage's starting and final weights; ("soup", lr multipliers, bn) averages
  # fine-tunings of the stages at those multiples of the lr.
  weight_space: tuple = ()


def stage_epochs(stages, budget: int) -> list[int]:
  """Epochs of each stage for an epoch budget: `epochs` if set, else `fraction` x budget
  (at least 1), else the rest of the budget after the stages before it (may be 0)."""
  out, used = [], 0
  for s in stages:
    if s.epochs is not None:
      n = int(s.epochs)
    elif s.fraction is not None:
      n = max(1, round(float(s.fraction) * budget))
    else:
      n = max(0, budget - used)
    out.append(n)
    used += n
  return out


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


def _decayed(groups, decay: float, name: str) -> tuple[tuple[str, Rule], ...]:
  if not isinstance(decay, (int, float)) or not 0 < decay <= 1:
    raise UserError(f"strategy '{name}': decay must be in (0, 1], got {decay}")
  n = len(groups)
  return tuple((group_pattern(g), float(decay ** (n - 1 - i))) for i, g in enumerate(groups))


def discriminative(groups, decay: float = 0.5) -> Strategy:
  """Discriminative learning rates (Howard & Ruder 2018): head x1, each group below x decay."""
  return Strategy(f"discriminative:decay={decay:g}",
                  (Stage(_decayed(groups, decay, "discriminative")),))


def layer_decay(groups, decay: float = 0.75) -> Strategy:
  """Layer-wise learning-rate decay (ELECTRA, Clark et al. 2020; BEiT, Bao et al. 2022): the
  group n below the head trains at lr x decay**n. The same rule as `discriminative` under the
  transformer literature's name and default (0.75)."""
  return Strategy(f"layer_decay:decay={decay:g}", (Stage(_decayed(groups, decay, "layer_decay")),))


def lp_ft(groups, probe: float = 0.5) -> Strategy:
  """LP-FT (Kumar et al. 2022): a linear probe, then full fine-tuning starting from the
  probe's head. The fine-tuning stage gets the whole epoch budget, as `full` does; the probe
  runs before it for `probe` x the budget (cheap: it trains on cached features)."""
  if not isinstance(probe, (int, float)) or not 0 < probe <= 1:
    raise UserError(f"strategy 'lp_ft': probe must be a fraction of the budget in (0, 1], "
                    f"got {probe}")
  head_only = linear_probe(groups).stages[0].rules
  return Strategy(f"lp_ft:probe={probe:g}", (Stage(head_only, fraction=probe, name="probe"),
                                             Stage(((".*", 1.0),), fraction=1.0, name="fine_tune")))


def head_then_top(groups, k: int = 1, lr_scale: float = 0.1, head: float = 0.5) -> Strategy:
  """The Keras transfer-learning recipe's two stages (Chollet 2016; the Keras guide): the
  new head trains alone on the frozen base for `head` x the budget, then the top `k`
  backbone groups are unfrozen and train with the head for the rest of the budget, all at
  `lr_scale` x the learning rate (the guide's "very low learning rate"), so the pretrained
  block is not wrecked by large updates."""
  spec = f"head_then_top:k={k},lr_scale={lr_scale:g},head={head:g}"
  if not isinstance(lr_scale, (int, float)) or not 0 < lr_scale <= 1:
    raise UserError(f"strategy '{spec}': lr_scale must be in (0, 1], got {lr_scale}")
  if not isinstance(head, (int, float)) or not 0 < head < 1:
    raise UserError(f"strategy '{spec}': head must be a fraction of the budget in (0, 1), "
                    f"got {head}")
  top = tuple((p, FROZEN if r == FROZEN else float(lr_scale)) for p, r in _top_k(groups, k, spec))
  return Strategy(spec, (Stage(linear_probe(groups).stages[0].rules, fraction=head, name="head"),
                         Stage(top, name="top")))


def gradual_unfreeze(groups, epochs_per_stage: int = 1) -> Strategy:
  """Gradual unfreezing (ULMFiT, Howard & Ruder 2018): the head alone first, then one more
  group from the top each stage of `epochs_per_stage` epochs; the last stage trains every
  group for the rest of the budget."""
  if not isinstance(epochs_per_stage, int) or epochs_per_stage < 1:
    raise UserError(f"strategy 'gradual_unfreeze': epochs_per_stage must be an integer >= 1, "
                    f"got {epochs_per_stage}")
  spec = f"gradual_unfreeze:epochs_per_stage={epochs_per_stage}"
  n = len(groups) - 1
  # The head-alone first stage trains its prescribed epochs (solve=False): the schedule of
  # unfreezing is the method.
  stages = tuple(Stage(_top_k(groups, k, spec), epochs=epochs_per_stage if k < n else None,
                       name=f"top{k}", solve=False) for k in range(n + 1))
  return Strategy(spec, stages)


# Parameter-name conventions of the backbones: BatchNorm modules are named `bn`, `bn1`,
# `proj_bn`, ...; their shift is `bias`, their scale `scale`.
BIAS = r".*/bias"
NORM = r".*bn\d*/(scale|bias)"


def bitfit(groups) -> Strategy:
  """BitFit (Ben Zaken et al. 2022): only the biases and the head learn. The backbone's
  convolutions have no bias, so its biases are the BatchNorm shifts."""
  head = group_pattern(groups[-1])
  return Strategy("bitfit", (Stage(((head, 1.0), (BIAS, 1.0), (".*", FROZEN))),))


def norm_only(groups) -> Strategy:
  """Only the normalisation layers' scales and shifts, and the head, learn (Frankle et al.
  2021, "Training BatchNorm and only BatchNorm")."""
  head = group_pattern(groups[-1])
  return Strategy("norm_only", (Stage(((head, 1.0), (NORM, 1.0), (".*", FROZEN))),))


def l2_sp(groups, alpha: float = 0.01, beta: float = 0.01) -> Strategy:
  """L2-SP (Li et al. 2018): everything learns, with the penalty alpha/2 ||w - w0||^2 toward
  the pretrained weights w0 on the backbone and beta/2 ||w||^2 on the new head, in place of
  weight decay (which would pull the backbone toward zero, i.e. away from what it knows)."""
  _nonnegative("l2_sp", alpha=alpha, beta=beta)
  stage = Stage(((".*", 1.0),), weight_decay=False, penalty=("l2_sp", float(alpha), float(beta)))
  return Strategy(f"l2_sp:alpha={alpha:g},beta={beta:g}", (stage,))


def _nonnegative(spec: str, **values) -> None:
  for key, v in values.items():
    if not isinstance(v, (int, float)) or v < 0:
      raise UserError(f"strategy '{spec}': {key} must be a number >= 0, got {v}")


def delta(groups, alpha: float = 0.01, beta: float = 0.01, attention: int = 0) -> Strategy:
  """DELTA (Li et al. 2019): everything learns, with alpha/2 x the distance of every backbone
  group's output feature maps to the frozen pretrained network's on the same batch, and
  beta/2 ||w||^2 on the new head, in place of weight decay (tlresearch.methods.penalty): the
  network may move its weights as long as its features stay close. `attention=1` weighs
  each channel by how much the target's loss depends on it (tlresearch.training.attention; the
  weights of a group sum to 1)."""
  _nonnegative("delta", alpha=alpha, beta=beta)
  if attention not in (0, 1):
    raise UserError(f"strategy 'delta': attention must be 0 or 1, got {attention}")
  spec = f"delta:alpha={alpha:g},beta={beta:g}" + (",attention=1" if attention else "")
  pen = ("delta", float(alpha), float(beta)) + (("attention",) if attention else ())
  stage = Stage(((".*", 1.0),), weight_decay=False, penalty=pen)
  return Strategy(spec, (stage,))


def bss(groups, eta: float = 0.001, k: int = 1) -> Strategy:
  """Batch spectral shrinkage (Chen et al. 2019): full fine-tuning plus eta x the k smallest
  squared singular values of each batch's penultimate features (tlresearch.methods.penalty), which
  suppresses the feature directions that do not transfer; weight decay as usual."""
  _nonnegative("bss", eta=eta)
  if not isinstance(k, int) or k < 1:
    raise UserError(f"strategy 'bss': k must be an integer >= 1, got {k}")
  spec = f"bss:eta={eta:g},k={k}"
  return Strategy(spec, (Stage(((".*", 1.0),), penalty=("bss", float(eta), k)),))


def lwf(groups, lam: float = 1.0, temperature: float = 2.0) -> Strategy:
  """Learning without forgetting (Li & Hoiem 2017): full fine-tuning plus lam x the KL
  divergence of the network's temperature-softened source-task predictions (through the
  pretrained source head) from the frozen pretrained network's, on the target images
  (tlresearch.methods.penalty); weight decay as usual. Needs the project's source pretraining,
  whose checkpoint holds the source head."""
  _nonnegative("lwf", lam=lam)
  if not isinstance(temperature, (int, float)) or temperature <= 0:
    raise UserError(f"strategy 'lwf': temperature must be > 0, got {temperature}")
  spec = f"lwf:lam={lam:g},temperature={temperature:g}"
  return Strategy(spec, (Stage(((".*", 1.0),),
                               penalty=("lwf", float(lam), float(temperature))),))


WISE_FT_BN = ("interpolate", "recompute")


def wise_ft(groups, probe: float = 0.5, bn: str = "interpolate") -> Strategy:
  """WiSE-FT (Wortsman et al. 2022) on LP-FT: the linear probe, then full fine-tuning from
  it (as `lp_ft`), then the weights are interpolated, theta(a) = (1 - a) theta_probe +
  a theta_fine_tuned, over a = 0, 0.1, ..., 1, with a chosen on validation
  (tlresearch.training.weight_space); BatchNorm statistics `bn=interpolate`d like the weights or
  `recompute`d on the training split at each point. theta_probe, the pretrained backbone
  with the probe's head, plays the zero-shot model's part: it is the fine-tuning's start."""
  base = lp_ft(groups, probe)
  if bn not in WISE_FT_BN:
    raise UserError(f"strategy 'wise_ft': bn must be one of {choices(WISE_FT_BN)}, got '{bn}'")
  # The default keeps the spec "wise_ft:probe=P" that tables showed before `bn` existed.
  spec = f"wise_ft:probe={probe:g}" + (f",bn={bn}" if bn != "interpolate" else "")
  return Strategy(spec, base.stages, weight_space=("wise_ft", bn))


SOUP_BN = ("recompute", "average")


def soup(groups, n: int = 3, spread: float = 3.0, bn: str = "recompute") -> Strategy:
  """Model soups (Wortsman et al. 2022): n `full` fine-tunings from the same start (same
  seed: same head init, data subset and order), at the lr x spread**t for t evenly spaced
  in [-1, 1] (n=3, spread=3: lr/3, lr, 3 lr), averaged in weight space. The uniform soup
  averages all; the greedy soup (the reported result) adds ingredients in order of
  validation accuracy, each only if the soup's validation accuracy does not drop
  (tlresearch.training.weight_space). BatchNorm statistics: `recompute` on the training split for
  the averaged weights (as SWA's update_bn), or `average` them like the weights."""
  if not isinstance(n, int) or n < 2:
    raise UserError(f"strategy 'soup': n must be an integer >= 2, got {n}")
  if not isinstance(spread, (int, float)) or spread < 1:
    raise UserError(f"strategy 'soup': spread must be a number >= 1, got {spread}")
  if bn not in SOUP_BN:
    raise UserError(f"strategy 'soup': bn must be one of {choices(SOUP_BN)}, got '{bn}'")
  multipliers = tuple(float(spread ** (-1 + 2 * i / (n - 1))) for i in range(n))
  return Strategy(f"soup:n={n},spread={spread:g},bn={bn}", full(groups).stages,
                  weight_space=("soup", multipliers, bn))


def _group(groups, group, spec: str) -> str:
  if group not in groups:
    raise UserError(f"strategy '{spec}': unknown group '{group}'; valid: {', '.join(groups)}")
  return group


def surgical(groups, group: str = "") -> Strategy:
  """Surgical fine-tuning (Lee et al. 2023): only `group` learns, everything else is frozen,
  the head included, so the head must come from pretraining (`pretrained_head`) unless
  `group` is the head."""
  spec = f"surgical:group={group}"
  rules = ((group_pattern(_group(groups, group, spec)), 1.0), (".*", FROZEN))
  return Strategy(spec, (Stage(rules),))


def _n_groups(groups, n, spec: str) -> int:
  backbone = len(groups) - 1
  if not isinstance(n, int) or not 1 <= n <= backbone:
    raise UserError(f"strategy '{spec}': n must be in 1..{backbone} for this backbone "
                    f"(groups: {', '.join(groups)}), got {n}")
  return n


def layer_transfer(groups, n: int = 0, fine_tune: int = 0) -> Strategy:
  """Yosinski et al. (2014): the first n groups come from the pretrained network, the groups
  above are re-initialised and trained; the transferred groups are frozen (AnB, BnB) or
  fine-tuned too (`fine_tune=1`: AnB+, BnB+). Which network (A or B) is `pretrain`'s."""
  spec = f"layer_transfer:n={n},fine_tune={fine_tune}"
  n = _n_groups(groups, n, spec)
  if fine_tune not in (0, 1):
    raise UserError(f"strategy '{spec}': fine_tune must be 0 or 1, got {fine_tune}")
  rules = (((".*", 1.0),) if fine_tune else
           tuple((group_pattern(g), FROZEN) for g in groups[:n]) + ((".*", 1.0),))
  return Strategy(spec, (Stage(rules),), transfer_groups=n)


def random_features(groups, n: int = 0) -> Strategy:
  """Control (Jarrett et al. 2009; Yosinski et al. 2014): the first n groups keep their random
  init and are frozen, the groups above train from random init."""
  spec = f"random_features:n={n}"
  n = _n_groups(groups, n, spec)
  rules = tuple((group_pattern(g), FROZEN) for g in groups[:n]) + ((".*", 1.0),)
  return Strategy(spec, (Stage(rules),), pretrained=False)


STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "linear_probe": linear_probe,
    "partial": partial,
    "full": full,
    "scratch": scratch,
    "discriminative": discriminative,
    "layer_decay": layer_decay,
    "lp_ft": lp_ft,
    "gradual_unfreeze": gradual_unfreeze,
    "head_then_top": head_then_top,
    "bitfit": bitfit,
    "norm_only": norm_only,
    "l2_sp": l2_sp,
    "delta": delta,
    "bss": bss,
    "lwf": lwf,
    "wise_ft": wise_ft,
    "soup": soup,
    "surgical": surgical,
    "layer_transfer": layer_transfer,
    "random_features": random_features,
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
                    "(options as name:key=value, e.g. partial:k=2, surgical:group=stage1)")
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


def trains(strategy: Strategy, paths, group: str) -> bool:
  """Whether any stage of `strategy` trains a parameter of `group` (paths: every parameter)."""
  return any(r != FROZEN and p.split("/")[0] == group
             for s in strategy.stages for p, r in resolve(s.rules, paths).items())
