"""The config schema: the one base config of every experiment (`sweep()`), and its blocks.

This is the only copy of each default. An experiment (experiments/NAME.py) starts from
`sweep()` and changes only what it declares; `tlresearch.run` applies the command line's
overrides and then locks the config, so a misspelt key is an error. Every key the code
reads is here, with its default and what it means; the library reads configs by attribute.
"""
from __future__ import annotations

import ml_collections


def head(**overrides) -> ml_collections.ConfigDict:
  """The new head (tlresearch.models.heads.HeadSpec); the default is the linear head."""
  h = ml_collections.ConfigDict()
  h.pooling = "avg"            # avg | max (global) | flatten (Keras's Flatten: fixes the input size)
  h.hidden = []                # widths of hidden Dense layers; [] = the linear head, [256] = an MLP
  h.activation = "relu"        # of the hidden layers: relu | gelu | tanh | sigmoid | swish
  h.update(overrides)
  return h


def model(**overrides) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.family = "resnet"          # backbone family (tlresearch.models.FAMILIES)
  m.width = 16                 # channels of stage1; stage i has width * 2**(i-1)
  m.blocks_per_stage = 1       # residual blocks per stage: ResNet-(6n+2), n=1 -> ResNet-8
  m.num_stages = 3             # groups: stem, stage1..stage{num_stages}, head
  m.stem_strides = 2           # 2: stages run at 16/8/4 px, ~10x faster on CPU than 32/16/8
  m.dropout_rate = 0.0         # dropout on the classifier's input (the pooled features)
  m.head = head()              # the new classifier head (the source pretraining keeps the default)
  m.input_size = None          # None: the dataset's own image size; N: images resized to N x N
  m.pretrained = ""            # "": the project's source pretraining (config.pretrain)
  m.update(overrides)
  return m


def keras_model(**overrides) -> ml_collections.ConfigDict:
  """A Keras-application backbone (tlresearch.models.KERAS_FAMILIES) with its weights."""
  m = ml_collections.ConfigDict()
  m.family = "vgg16"           # vgg16 | resnet50 | mobilenet_v2 (Keras applications, layer for layer)
  m.pretrained = "keras:imagenet"  # keras:imagenet (Keras's loader and cache) | keras:PATH.h5
  m.top = "linear"             # linear: pooled features -> new Dense; keras: Keras's fc1, fc2
  #                              (pretrained, group "fc") -> new predictions (needs 224 px)
  m.input_size = 224           # images are resized to this (ImageNet size; >= 32)
  m.width = 64                 # vgg16/resnet50 channel width; 64 is the real network (Keras weights)
  m.alpha = 1.0                # mobilenet_v2 width multiplier (ImageNet weights: 0.35 .. 1.4)
  m.dropout_rate = 0.0         # dropout on the classifier's input (linear top)
  m.head = head()              # the new classifier head (linear top)
  m.update(overrides)
  return m


def train(**overrides) -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.epochs = 12                # epoch budget (the schedule is laid out over all of it)
  t.batch_size = 64            # capped at the training-set size
  t.optimizer = "sgd"          # sgd (Nesterov momentum) | adam | adamw
  t.lr = 0.05                  # peak learning rate (x each group's multiplier)
  t.warmup_epochs = 1.0        # linear warmup, then cosine decay to 0 over the budget
  t.schedule = "warmup_cosine"  # warmup_cosine (as above) | constant (the peak lr throughout)
  t.weight_decay = 5e-4        # on kernels of trainable groups only
  t.momentum = 0.9             # sgd only
  t.cache_frozen_prefix = True  # run a frozen prefix once per split instead of every step
  t.probe_solver = "lbfgs"     # a head trained alone on cached features: lbfgs solves it to
  #                              convergence with its L2 chosen on validation (the literature's
  #                              probe; tlresearch.methods.probe); sgd trains it like any
  #                              other stage
  t.compute_dtype = "float32"  # bfloat16: convolutions and matmuls in bf16 (accelerators);
  #                              params, optimizer state, BatchNorm statistics, loss stay fp32
  t.min_steps = 0              # raise the epoch budget to at least this many optimizer steps
  t.data_parallel = True       # split each batch over all local devices (fewer if the batch
  #                              does not divide by their number); False: one device. Only
  #                              float reduction order depends on it, so it is operational
  #                              (not in cell.IDENTITY_FIELDS): it never invalidates a cell
  t.bn_stats = "update"        # update: BatchNorm of trainable groups uses batch statistics and
  #                              updates them; frozen: every BatchNorm in inference mode
  t.augment = ml_collections.ConfigDict()
  t.augment.enabled = False    # classic augmentation on device (rotation, shifts, shear, zoom)
  t.augment.rotation = 15.0    # max degrees
  t.augment.width_shift = 0.1  # max fraction of the width
  t.augment.height_shift = 0.1  # max fraction of the height
  t.augment.shear = 10.0       # max degrees
  t.augment.zoom = 0.1         # scale in [1 - zoom, 1 + zoom]
  t.augment.horizontal_flip = False  # off: glyphs and digits are not mirror-symmetric
  t.augment.fill_mode = "nearest"  # outside the image: nearest | reflect | wrap | constant (0)
  t.early_stopping = ml_collections.ConfigDict()
  t.early_stopping.enabled = True  # stop after `patience` epochs without improvement,
  #                                  then restore the best epoch's weights
  t.early_stopping.monitor = "val_accuracy"  # val_accuracy | val_loss
  t.early_stopping.patience = 5  # epochs without improvement before stopping
  t.early_stopping.min_delta = 0.0  # smallest change that counts as improvement
  # How a configuration's seeds train: "loop" one after another, "vmap" all in one vmapped
  # program (on one device), "auto" loop on CPU or on several devices (each seed then data
  # parallel), vmap on a single GPU/TPU (tlresearch.training.train.seeds_mode; measurements in
  # docs/performance.md). Operational: results agree within float tolerance, so it is not
  # part of a cell's identity (tlresearch.experiment.cell.IDENTITY_FIELDS).
  t.seeds_mode = "auto"
  t.update(overrides)
  return t


def pretrain() -> ml_collections.ConfigDict:
  p = ml_collections.ConfigDict()
  p.dataset = "glyphs_source"  # source task (tlresearch.data.DATASETS)
  p.class_subset = ""          # "" all classes; "A" / "B": one half of a fixed random split
  p.data_dir = ""              # "" -> $TLRESEARCH_DATA_DIR or ~/.cache/tlresearch/tensorflow_datasets
  p.seed = 0                   # one pretrained backbone serves every fine-tuning seed
  p.model = model()            # its architecture fields are taken from the fine-tuned model
  p.train = train(epochs=12, batch_size=128, lr=0.1)
  p.train.early_stopping.patience = 3
  return p


def data() -> ml_collections.ConfigDict:
  """How tfds: and folder: datasets are read and split (tlresearch.data.splits.DataOptions);
  the project's own datasets ignore it, except `drop_duplicates`."""
  d = ml_collections.ConfigDict()
  d.download = False           # tfds: may this run download and prepare a missing dataset
  d.val_fraction = 0.1         # carved from train (per class) when a dataset has no validation
  d.test_fraction = 0.2        # carved from train the same way when it has no test split
  d.split_seed = 0             # fixed carve: every seed and strategy sees the same val / test
  d.vtab1k = False             # VTAB-1k: 800 train + 200 validation drawn from train
  d.val_examples = 0           # >0: a fixed random subset of validation (CPU smoke runs)
  d.test_examples = 0          # >0: the same for test; 0 = the whole split
  d.follow_external_links = False  # folder: follow symbolic links that leave the dataset's folder
  d.drop_duplicates = False    # drop validation / test images that are also in an earlier split
  return d


def checkpoint() -> ml_collections.ConfigDict:
  """`config.checkpoint`: how cells survive a kill (tlresearch.training.checkpoint).
  Operational only: changing it never invalidates a finished or checkpointed cell (not in
  cell.IDENTITY_FIELDS)."""
  c = ml_collections.ConfigDict()
  c.enabled = True             # save per-cell training progress; a rerun resumes from it
  c.every_epochs = 1           # at most one save per this many epochs ...
  c.min_seconds = 30.0         # ... and per this many seconds (a save costs ~0.1 s here)
  c.keep = 2                   # newest checkpoints kept per cell; deleted once it finishes
  return c


def report() -> ml_collections.ConfigDict:
  r = ml_collections.ConfigDict()
  r.reference = "full"         # strategy whose base-config row the paired differences use
  # Print each final cell's per-class report (scikit-learn's classification_report on the
  # test split) as it finishes, and write them all to classification_reports.md.
  r.classification_reports = False
  # (axis, column name) pairs for tables; axes without one are shown by their config key.
  r.axis_labels = [("model.dropout_rate", "dropout"), ("train.augment.enabled", "augmentation"),
                   ("train.early_stopping.enabled", "early stopping"), ("train.epochs", "epochs")]
  return r


def selection(enabled: bool = True) -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.enabled = enabled          # select lr and weight decay per configuration on validation
  s.lr = [0.01, 0.03, 0.1]     # candidate peak learning rates
  s.weight_decay = [5e-4]      # candidate weight decays
  s.seeds = [100]              # selection seeds, apart from the final ones (no reuse of a
  #                              final seed's data subset for the choice)
  s.widen = 2                  # a winner at the edge of the lr grid adds one more lr past that
  #                              edge, at most this many times (tlresearch.experiment.selection)
  return s


def sweep(**overrides) -> ml_collections.ConfigDict:
  """The keys every sweep experiment has; an experiment sets its targets, grid and report."""
  c = ml_collections.ConfigDict()
  c.kind = "sweep"             # what tlresearch.run does with this config
  c.targets = ["digits"]       # grid axis: target datasets (tlresearch.data.DATASETS)
  c.seeds = [0, 1, 2, 3, 4]    # grid axis: paired seeds
  c.target = "digits"          # set per cell from `targets`
  c.seed = 0                   # set per cell from `seeds`
  c.k_shot = 20                # training examples per class (0 -> the whole train split)
  c.class_subset = ""          # "" all classes of the target; "A" / "B": one half of them
  c.strategy = "full"          # set per cell from the grid; see tlresearch.methods.strategies
  c.pretrained_head = False    # load the source head too (target must have the source classes)
  c.probes = []                # extra measurements (tlresearch.analysis.probes.PROBES)
  c.data_dir = ""              # "" -> $TLRESEARCH_DATA_DIR or ~/.cache/tlresearch/tensorflow_datasets
  c.cache_dir = ""             # "" -> $TLRESEARCH_CACHE_DIR or ~/.cache/tlresearch (checkpoints)
  c.data = data()              # how tfds:/folder: datasets are read and split
  c.model = model()            # the fine-tuned network (architecture must match the pretrained one)
  c.train = train()            # fine-tuning optimisation and regularisers
  c.pretrain = pretrain()      # how the source backbone is made (cached by this config)
  c.selection = selection()    # per-configuration lr / weight-decay selection on validation
  c.grid = []                  # blocks of axes, each crossed with targets x seeds
  c.report = report()          # table labels, reference row, metrics
  # The tables' metrics (tlresearch.analysis.report.METRIC_NAMES).
  c.report.metrics = ["test_accuracy", "test_macro_f1"]
  c.checkpoint = checkpoint()  # per-cell progress saves, for kill and resume (operational)
  # Processes that train cells at once (tlresearch.experiment.workers). 0 = auto: one per
  # core on a CPU backend when there are >= 4 seed groups per worker to train, else this
  # process alone (and always on GPU/TPU, where train.seeds_mode / data_parallel use the
  # device); N: exactly N. Operational: a cell's result is bitwise the same for any value.
  c.workers = 0
  # CPU threads per training process (tlresearch.core.layout): 1 = each process held to one
  # core (the fastest layout on small convolutions); 0 = every core in one XLA pool. Part of
  # the execution layout: results are bitwise the same for the same value, and each cell
  # records the layout it ran in (final.json, timing.csv).
  c.threads = 1
  # Which trained models are kept for export and predict (tlresearch.deploy.recognizer): "none";
  # "best": per target, the best configuration by mean validation accuracy, its best seed;
  # "all": every final cell's. Operational: it never changes a cell's result.
  c.save_model = "none"
  c.update(overrides)
  return c
