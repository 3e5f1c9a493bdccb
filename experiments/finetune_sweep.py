"""The main comparison: which transfer strategy wins on which kind of target, and by how much.

Protocol (the fair one, so that a row measures the strategy and not a shared setting):
- every configuration (row x target) gets its own learning rate, chosen on the validation
  split from {0.01, 0.03, 0.1} (widened past an edge when the winner sits there; see
  tlresearch.experiment.selection) under a selection seed (100) that is none of the final seeds;
- the linear probe is solved to convergence (L-BFGS) with its L2 strength chosen on
  validation per seed (tlresearch.methods.probe), the literature's probe protocol;
- 5 paired seeds (same k-shot subset, head init, data order and dropout masks for every
  strategy under a seed), 95% t intervals, paired differences to `full`.

Grid (why not a full cross product): the strategy axis is the question, so every strategy
runs on every target and seed. Augmentation, the regulariser no other experiment covers, is
crossed with `full` only: the converged probe's regulariser is its L2 strength, chosen on
validation, and augmentation would turn it back into an SGD probe. Head dropout and early
stopping have their own experiments (dropout_ablation, early_stopping_ablation).

`scratch` is the control: the same network from random init, with its own selected lr and a
3x longer budget (36 epochs, shown in the table's `epochs` column). At the shared 12 epochs
it was no control: its selected lr ran off the top of the widened grid (1.11), its best
epoch was the last, and on digits one seed of five stayed near chance (71 +- 41%).

Targets: `glyphs_input_shift` (source classes under noise/blur/contrast corruptions: the
input-level shift where the literature expects full fine-tuning to beat a linear probe) and
`digits` (scikit-learn's real handwritten digits, a far domain); k_shot examples per class.
"""
import ml_collections

from tlresearch.core import schema

STRATEGIES = ["linear_probe", "partial:k=1", "partial:k=2", "full",
              "discriminative:decay=0.5"]
SCRATCH_EPOCHS = 36


def get_config() -> ml_collections.ConfigDict:
  c = schema.sweep(targets=["glyphs_input_shift", "digits"], seeds=[0, 1, 2, 3, 4])
  c.grid = [                   # blocks of axes, each crossed with targets x seeds
      {"strategy": STRATEGIES},
      {"strategy": ["scratch"], "train.epochs": [SCRATCH_EPOCHS]},
      {"strategy": ["full"], "train.augment.enabled": [True]},
  ]
  return c
