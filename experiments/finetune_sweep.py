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
  c = ml_collections.ConfigDict()
  c.kind = "sweep"             # what tlresearch.run does with this config
  c.targets = ["glyphs_input_shift", "digits"]  # grid axis: target datasets (tlresearch.data.DATASETS)
  c.seeds = [0, 1, 2]          # grid axis: paired seeds
  c.target = "digits"          # set per cell from `targets`
  c.seed = 0                   # set per cell from `seeds`
  c.k_shot = 20                # training examples per class (0 -> the whole train split)
  c.strategy = "full"          # set per cell from the grid; see tlresearch.strategies
  c.data_dir = ""              # "" -> $TLRESEARCH_DATA_DIR or ~/.cache/tlresearch/tensorflow_datasets
  c.cache_dir = ""             # "" -> $TLRESEARCH_CACHE_DIR or ~/.cache/tlresearch (checkpoints)
  c.model = _common.model()    # the fine-tuned network (its architecture must match the pretrained one)
  c.train = _common.train()    # fine-tuning optimisation and regularisers
  c.pretrain = _common.pretrain()  # how the source backbone is made (cached by this config)
  c.grid = [                   # blocks of axes, each crossed with targets x seeds
      {"strategy": STRATEGIES},
      {"strategy": ["linear_probe", "full"], "model.dropout_rate": [0.5]},
      {"strategy": ["linear_probe", "full"], "train.augment.enabled": [True]},
      {"strategy": ["linear_probe", "full"], "train.early_stopping.enabled": [False]},
  ]
  c.selection = _common.selection(enabled=False)  # per-configuration lr/wd selection: off
  #                              here (one shared lr); --config.selection.enabled=True turns it on
  c.report = _common.report()  # table labels
  c.checkpoint = _common.checkpoint()  # per-cell progress saves, for kill and resume
  return c
