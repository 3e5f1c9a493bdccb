"""The main comparison: which transfer strategy wins on which kind of target, and by how much.

Design (why not a full cross product): the strategy axis is the question, so every
strategy runs on every target and seed. The regularisers (head dropout 0.5, augmentation,
early stopping off) are crossed only with the two ends of the freezing spectrum,
linear_probe and full: that answers "does this regulariser help a frozen / a fully tuned
backbone" at a quarter of the cost of crossing them with every strategy.

Targets: `glyphs_input_shift` (source classes under noise/blur/contrast corruptions: the
input-level shift where the literature expects full fine-tuning to beat a linear probe) and
`digits` (scikit-learn's real handwritten digits, a far domain). k_shot examples per class,
drawn from the seed; 3 paired seeds (same subset, head init, data order and dropout masks
for every strategy under a seed).
"""
import ml_collections

from experiments import _common

STRATEGIES = ["linear_probe", "partial:k=1", "partial:k=2", "full",
              "discriminative:decay=0.5", "scratch"]


def get_config() -> ml_collections.ConfigDict:
  c = _common.sweep(targets=["glyphs_input_shift", "digits"], seeds=[0, 1, 2])
  c.grid = [                   # blocks of axes, each crossed with targets x seeds
      {"strategy": STRATEGIES},
      {"strategy": ["linear_probe", "full"], "model.dropout_rate": [0.5]},
      {"strategy": ["linear_probe", "full"], "train.augment.enabled": [True]},
      {"strategy": ["linear_probe", "full"], "train.early_stopping.enabled": [False]},
  ]
  c.selection.enabled = False  # one shared lr; --config.selection.enabled=True selects per row
  return c
